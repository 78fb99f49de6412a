"""benchmarks/attribution_fidelity.py on a tiny random Llama: the single-neuron effects are what explicit forward
passes give, and gradient x activation predicts small zero ablations (the Taylor argument the script tests).

Tasks are token ids (no tokenizer): random prompts whose correct token is the model's own top prediction and whose
wrong token is its bottom one, each with a random corrupted prompt of the same length.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from hf_lrp_surgery.circuits import ABLATIONS, Ablation, NextTokenTask, PreparedTask, next_token_task
from hf_lrp_surgery.circuits.tasks import last_token_logits
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp import resolve

pytestmark = pytest.mark.usefixtures("single_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attribution_fidelity.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("attribution_fidelity", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


fidelity = _load_script()


def _task(model, size: int = 12, seed: int = 0) -> NextTokenTask:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 9, (size,), generator=generator).tolist()
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    corrupted = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    logits = last_token_logits(model, None, next_token_task([(p, 0) for p in prompts]))
    return next_token_task(
        [
            {"prompt": p, "correct": int(row.argmax()), "wrong": int(row.argmin()), "corrupted": c}
            for p, c, row in zip(prompts, corrupted, logits)
        ],
        name="own-predictions",
    )


def _logit_diffs(model, task: NextTokenTask) -> torch.Tensor:
    logits = last_token_logits(model, None, task).double()
    correct, wrong = task.token_ids(None)
    rows = torch.arange(len(task))
    return logits[rows, correct] - logits[rows, wrong]


def test_single_neuron_effects_are_those_of_explicit_forward_passes() -> None:
    model = tiny_model("llama")
    arch = resolve(model)
    with torch.no_grad():
        arch.layers[1].mlp_out.weight[:, 7] = 0  # neuron 7 of block 1 writes nothing
    task = _task(model)
    prepared = PreparedTask(model, None, task, batch_size=5)  # several batches: the corrupted values must line up
    sample = fidelity.NeuronSample(torch.tensor([1, 0, 1]), torch.tensor([7, 3, 20]), ("uniform",) * 3)
    clean = _logit_diffs(model, task)
    effects = {}
    for kind in ABLATIONS:
        ablation = Ablation.record(kind, model, None, "neurons", reference=task, evaluation=prepared, batch_size=5)
        effects[kind] = fidelity.single_neuron_effects(
            model, prepared, ablation, sample, fingerprint=fingerprint(model), progress=False
        )
        for target in fidelity.TARGETS:
            assert torch.equal(effects[kind].changes[target][0], torch.zeros(len(task), dtype=torch.float64))

    # Zero ablation of neuron 3 of block 0: the model with that column of the output projection zeroed.
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        resolve(zeroed).layers[0].mlp_out.weight[:, 3] = 0
    by_hand = _logit_diffs(zeroed, task) - clean
    assert by_hand.abs().max() > 1e-4  # the neuron does something
    # The logits come back as float32 (``last_token_logits``) and the by-hand passes batch and pad differently: on
    # some CPUs that is one float32 step apart (4.8e-7 at logit differences of ~4), far below the effect (> 1e-4).
    torch.testing.assert_close(effects["zero"].changes["logit_diff"][1], by_hand, rtol=0, atol=2e-6)

    # Corrupted patching of neuron 20 of block 1: each prompt alone, its input replaced by the corrupted run's.
    module = arch.layers[1].mlp_out
    patched = []
    for example in task.examples:
        seen: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) or None)
        with torch.no_grad():
            model(input_ids=torch.tensor([example.info["corrupted"]]))
        handle.remove()

        def patch(m, args, value=seen[0]):
            x = args[0].clone()
            x[..., 20] = value[..., 20]
            return (x,)

        handle = module.register_forward_pre_hook(patch)
        patched.append(_logit_diffs(model, next_token_task([(example.prompt, example.correct, example.wrong)]))[0])
        handle.remove()
    by_hand = torch.stack(patched) - clean
    assert by_hand.abs().max() > 1e-4
    torch.testing.assert_close(effects["corrupted"].changes["logit_diff"][2], by_hand, rtol=0, atol=2e-6)
    assert effects["mean"].changes["logit_diff"][2].abs().max() > 1e-4


def test_gradient_times_activation_predicts_small_zero_ablations(tmp_path) -> None:
    """With the MLPs scaled down, removing one neuron is a small perturbation: its first-order estimate, -g·a of the
    logit difference (``taylor``), ranks and scales the real effects almost exactly, and the cumulative check's
    first-order prediction is close to the real change."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in resolve(model).layers:
            layer.mlp_out.weight.mul_(0.05)
    task = _task(model, seed=1)
    report = fidelity.measure_fidelity(
        model, None, task, task, neurons=40, top=2, fractions=(0.25,), eval_batch_size=8, progress=False
    )
    assert len(report.sample) > 40 and report.sample.strata.count("uniform") == 40
    uniform = report.sample.layers[: report.sample.strata.count("uniform")]
    assert uniform.tolist().count(0) == 20  # stratified: the same number per layer
    taylor = report.correlations["taylor"]["signed"]["zero"]["logit_diff"]
    assert taylor["all"]["spearman"] > 0.95 and taylor["all"]["pearson"] > 0.99
    assert set(taylor) == {"all", "uniform", "layers 0-0", "layers 1-1"}
    # With the correct token's logit as objective, gradient x activation is the Taylor estimate of that logit.
    gradient = report.correlations["gradient"]["signed"]["zero"]["correct_logit"]["all"]
    assert gradient["spearman"] > 0.95 and gradient["pearson"] > 0.99
    for scorer, per in report.correlations.items():
        expected = {"signed"} if scorer == "taylor" else {"abs"} if scorer == "activation" else {"abs", "signed"}
        assert set(per) == expected
        for by_kind in per.values():
            assert set(by_kind) == set(ABLATIONS)
    for records in report.cumulative.values():
        (record,) = records
        assert record["pruned"] == round(0.25 * 96)
        assert record["real_change"] == pytest.approx(record["predicted_taylor"], rel=0.3)  # first order
    json.dumps(report.to_dict())
    assert fidelity.plot(report, tmp_path / "fidelity.png").stat().st_size > 0
    assert "taylor" in report.table()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "7"], "must be even"),
        (["--fractions", "1.5"], "in (0, 1)"),
        (["--neurons", "0"], "must be >= 1"),
        (["--kinds", "half"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv: list[str], message: str, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as stop:
        fidelity.parse_args([*argv, "--output", str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("attribution_fidelity.py: error:") and message in error
