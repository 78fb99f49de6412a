"""The Surgeon API and the attribute / correct / apply / inspect commands, on a tiny text_checkpoint and on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer
from transformers import AutoModelForCausalLM

from hf_lrp_surgery import Mask, Scores, Surgeon, load_corrected
from hf_lrp_surgery.carriers import read_surgery, set_adapter_enabled
from hf_lrp_surgery.cli import main

UNDESIRED = [
    ("the cat sat on the", " mat mat mat mat"),
    ("hello world", " bad bad bad bad"),
    ("the dog was", " very very very very"),
]
GENERAL = [
    ("the capital of france is", " paris"),
    ("one two", " three"),
    ("the sun and the", " moon"),
    ("a big red", " house"),
]


def _write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "continuation": c}) + "\n" for p, c in pairs))
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 4, 5, 9, 10, 11, 12]])).logits


def test_surgeon_steps_return_values_that_save_and_load(text_checkpoint: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(text_checkpoint).eval()
    surgeon = Surgeon(model, tiny_tokenizer(), progress=False)
    general = surgeon.attribute(GENERAL, components=("neurons", "heads"))
    assert general.method == "lrp" and general.num_samples == 4 and general.neurons.shape == (2, 48)
    scores = surgeon.contrast(undesired=UNDESIRED, general=general, components=("neurons", "heads"), protect_top=0.1)
    assert scores.method == "contrast" and int(torch.isinf(scores.neurons).sum()) == int(0.1 * 96)
    scores.save(tmp_path / "scores")
    assert torch.equal(Scores.load(tmp_path / "scores").neurons, scores.neurons)

    neurons = surgeon.select(scores, "neurons", 6)
    heads = surgeon.select(scores, "heads", 2, scope="per_layer")
    assert neurons.count == 6 and heads.count == 2 and heads.per_layer() == [1, 1]
    finite = scores.neurons[torch.isfinite(scores.neurons)]
    chosen = torch.cat([scores.neurons[neurons.layer_of(n), idx] for n, idx in neurons.indices.items()])
    assert float(chosen.max()) <= float(finite.sort().values[5]), "the lowest contrastive scores are pruned"

    original = _logits(model)
    corrected = surgeon.apply([neurons, heads], carrier="adapter")
    assert torch.equal(_logits(model), original), "the Surgeon's model is untouched by default"
    surgeon.save(tmp_path / "adapter")
    loaded = load_corrected(tmp_path / "adapter")
    assert (_logits(loaded) - _logits(corrected.model)).abs().max() <= 1e-5
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()


def test_surgeon_reference_sets_from_files_and_datasets(text_checkpoint: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(text_checkpoint).eval()
    surgeon = Surgeon(model, tiny_tokenizer(), progress=False)
    from_list = surgeon.attribute(UNDESIRED)
    from_file = surgeon.attribute(_write_jsonl(tmp_path / "u.jsonl", UNDESIRED))
    dataset = Dataset.from_dict({"prompt": [p for p, _ in UNDESIRED], "continuation": [c for _, c in UNDESIRED]})
    from_dataset = surgeon.attribute(dataset)
    assert torch.equal(from_list.neurons, from_file.neurons) and torch.equal(from_list.neurons, from_dataset.neurons)
    assert surgeon.attribute(UNDESIRED, limit=1).num_samples == 1


def test_surgeon_baselines_and_errors(text_checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(text_checkpoint).eval()
    surgeon = Surgeon(model, tiny_tokenizer(), progress=False)
    for method in ("gradient", "activation", "wanda"):
        scores = surgeon.contrast(undesired=UNDESIRED, general=GENERAL, method=method)
        assert scores.settings["of"] == method and torch.isfinite(scores.neurons).sum() > 0
    random = surgeon.contrast(undesired=UNDESIRED, general=GENERAL, method="random")
    assert random.method == "random", "sample-free methods have nothing to contrast"
    with pytest.raises(ValueError, match="apply"):
        surgeon.save("never")
    from hf_lrp_surgery.exceptions import ReferenceSetError

    with pytest.raises(ReferenceSetError, match="empty"):
        surgeon.attribute([])


def test_cli_attribute_correct_apply_inspect(
    text_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    undesired = _write_jsonl(tmp_path / "undesired.jsonl", UNDESIRED)
    general = _write_jsonl(tmp_path / "general.jsonl", GENERAL)
    common = ["--model", str(text_checkpoint), "--no-progress"]

    assert (
        main(
            [
                "attribute",
                *common,
                "--samples",
                str(general),
                "--components",
                "neurons",
                "heads",
                "--output",
                str(tmp_path / "scores"),
            ]
        )
        == 0
    )
    assert Scores.load(tmp_path / "scores").heads.shape == (2, 4)

    out = tmp_path / "correct"
    assert (
        main(
            [
                "correct",
                *common,
                "--undesired",
                str(undesired),
                "--general",
                str(general),
                "--budget",
                "0.06",
                "--protect-top",
                "0.1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "5 neurons pruned" in printed and "verified" in printed
    mask = Mask.load(out / "mask")
    assert mask.count == 5 and mask.provenance["scores"]["settings"]["protect_top"] == 0.1
    baked = load_corrected(out / "baked")
    via_peft = load_corrected(out / "adapter", via="peft")
    assert isinstance(via_peft, PeftModel)
    assert (_logits(via_peft) - _logits(baked)).abs().max() <= 1e-5
    stock = AutoModelForCausalLM.from_pretrained(out / "adapter").eval()
    assert (_logits(stock) - _logits(baked)).abs().max() <= 1e-5
    set_adapter_enabled(stock, False)
    assert torch.equal(_logits(stock), _logits(AutoModelForCausalLM.from_pretrained(text_checkpoint)))
    assert (out / "mask_per_layer.png").stat().st_size > 5_000

    assert (
        main(
            ["apply", *common, "--mask", str(out / "mask"), "--carrier", "bake", "--output", str(tmp_path / "applied")]
        )
        == 0
    )
    assert torch.equal(_logits(load_corrected(tmp_path / "applied" / "baked")), _logits(baked))
    assert not (tmp_path / "applied" / "adapter").exists()

    assert main(["inspect", str(out / "adapter"), "--plot", str(tmp_path / "plot.png")]) == 0
    printed = capsys.readouterr().out
    assert "corrected model (adapter)" in printed and printed.count("\n    ") >= 2  # one row per layer
    assert (tmp_path / "plot.png").is_file()
    masks, carrier, _, _ = read_surgery(out / "adapter")
    assert carrier == "adapter" and masks[0].count == 5


def test_cli_weights_are_baked_by_default(text_checkpoint: Path, tmp_path: Path) -> None:
    undesired = _write_jsonl(tmp_path / "undesired.jsonl", UNDESIRED)
    general = _write_jsonl(tmp_path / "general.jsonl", GENERAL)
    out = tmp_path / "weights"
    assert (
        main(
            [
                "correct",
                "--model",
                str(text_checkpoint),
                "--no-progress",
                "--undesired",
                str(undesired),
                "--general",
                str(general),
                "--granularity",
                "weights",
                "--modules",
                "mlp.*",
                "--budget",
                "30",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert Mask.load(out / "mask").count == 30
    assert (out / "baked").is_dir() and not (out / "adapter").exists()
    load_corrected(out / "baked")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--granularity", "weights", "--carrier", "adapter"], "weight masks are baked"),
        (["--budget", "100000"], "exceeds"),
        (["--granularity", "weights", "--modules", "nonsense"], "matches no prunable module"),
    ],
)
def test_cli_errors_are_one_line(
    text_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    undesired = _write_jsonl(tmp_path / "undesired.jsonl", UNDESIRED)
    status = main(
        [
            "correct",
            "--model",
            str(text_checkpoint),
            "--no-progress",
            "--undesired",
            str(undesired),
            "--general",
            str(undesired),
            "--output",
            str(tmp_path / "out"),
            *extra,
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert status == 2 and len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out" / "adapter").exists()


def test_cli_apply_refuses_another_models_mask(
    text_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other"
    model = tiny_model("llama", dtype=torch.float32, seed=3)
    model.resize_token_embeddings(len(WORDS))
    model.save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    surgeon = Surgeon(AutoModelForCausalLM.from_pretrained(text_checkpoint), tiny_tokenizer(), progress=False)
    surgeon.select(surgeon.attribute(GENERAL), "neurons", 3).save(tmp_path / "mask")
    assert (
        main(["apply", "--model", str(other), "--mask", str(tmp_path / "mask"), "--output", str(tmp_path / "out")]) == 2
    )
    assert "different weights" in capsys.readouterr().err


def test_cli_help_is_complete(capsys: pytest.CaptureFixture) -> None:
    for command, options in {
        "attribute": ["--samples", "--components", "--method"],
        "correct": [
            "--undesired",
            "--general",
            "--budget",
            "--scope",
            "--normalize",
            "--protect-top",
            "--carrier",
            "--base-model-id",
        ],
        "apply": ["--mask", "--carrier"],
        "inspect": ["--plot"],
    }.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert all(option in text for option in options), command


@pytest.mark.e2e
def test_smollm2_correct_end_to_end_offline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """attribute -> contrast -> mask -> adapter + baked -> save -> both loading paths, on the embedded model."""
    examples = Path(__file__).resolve().parents[1] / "recipes" / "examples"
    out = tmp_path / "correct"
    assert (
        main(
            [
                "correct",
                "--undesired",
                str(examples / "repetition.jsonl"),
                "--general",
                str(examples / "general.jsonl"),
                "--budget",
                "20",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert "20 neurons pruned" in capsys.readouterr().out
    baked = load_corrected(out / "baked")
    probe = torch.tensor([[1, 504, 3458, 314, 4649, 2057, 30, 216]])
    with torch.no_grad():
        expected = baked(input_ids=probe).logits
        for model in (
            load_corrected(out / "adapter", via="peft"),
            AutoModelForCausalLM.from_pretrained(out / "adapter").eval(),
        ):
            assert (model(input_ids=probe).logits - expected).abs().max() <= 1e-4
