"""The relevance report and the command line, on a tiny local model and on the embedded SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from hf_lrp_surgery.cli import main
from hf_lrp_surgery.lrp import ReferenceSample, RelevanceResult, collect_relevance
from hf_lrp_surgery.report import default_report_prompts


def test_report_command_on_a_local_checkpoint(text_checkpoint, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the\n\nthe capital of france is\n")
    out = tmp_path / "report"
    status = main(
        [
            "report",
            "--model",
            str(text_checkpoint),
            "--prompts",
            str(prompts),
            "--max-new-tokens",
            "3",
            "--top-k",
            "4",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "Top MLP neurons" in printed and "Top attention heads" in printed
    report = json.loads((out / "report.json").read_text())
    assert [s["prompt"] for s in report["samples"]] == ["the cat sat on the", "the capital of france is"]
    assert len(report["top_neurons"]) == 4 and len(report["top_heads"]) == 4
    assert len(report["per_layer"]["neurons_mean_abs"]) == 2
    assert (out / "relevance_per_layer.png").stat().st_size > 10_000
    relevance = RelevanceResult.load(out / "relevance")
    assert relevance.num_samples == 2 and relevance.neurons.shape == (2, 48)


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["report", "--model", "no such model", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "smollm2-135m-instruct" in err  # says what exists
    assert not (tmp_path / "r").exists()


def test_cli_help_lists_the_report(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "report" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "--prompts" in capsys.readouterr().out


def test_shipped_prompts() -> None:
    prompts = default_report_prompts()
    assert len(prompts) >= 5 and all(isinstance(p, str) and p for p in prompts)


@pytest.mark.e2e
def test_smollm2_report_and_conservation(tmp_path, capsys) -> None:
    """The README's main job runs offline on the embedded model; CP-LRP conserves on the real model."""
    from hf_lrp_surgery.models import load_model

    assert main(["report", "--output", str(tmp_path / "report"), "--no-progress", "--max-new-tokens", "4"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["samples"]) == len(default_report_prompts())
    assert report["model"]["model_type"] == "llama" and len(report["per_layer"]["neurons_mean_abs"]) == 30
    assert "Top MLP neurons" in capsys.readouterr().out

    model, tokenizer = load_model()
    samples = [ReferenceSample("The capital of France is", " Paris."), "Two plus two equals"]
    cp = collect_relevance(model, samples, tokenizer, variant="cp", components=("inputs", "neurons"), progress=False)
    # SmolLM2 has no biases: with CP-LRP the input relevance sums to the explained logits.
    totals = torch.stack([r.double().sum() for r in cp.input_relevance])
    torch.testing.assert_close(totals, cp.explained, rtol=1e-4, atol=1e-3)
    attn = collect_relevance(model, samples[:1], tokenizer, components=("neurons", "weights"), progress=False)
    torch.testing.assert_close(
        attn.weights["model.layers.29.mlp.down_proj"].sum(0),
        attn.neurons[29],
        rtol=1e-4,
        atol=1e-4 * float(attn.neurons[29].abs().max()),
    )
