"""Circuit discovery: the IOI generator, the task metrics, ablation, task scores, discovery and comparison.

Models are tiny random Llamas built from local configs; IOI prompts are tokenised by a word-level
tokenizer built here from the shipped templates and part of the shipped names (the others are
unknown to it, so the per-tokenizer name filter must drop them). A random model does not do IOI,
so discovery runs on a task made of the model's own predictions (correct = its top token, wrong =
its bottom token), whose unpruned logit difference is positive by construction.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import EXTRA_FAMILIES, FAMILIES, model_from_config, tiny_config, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from hf_lrp_surgery.carriers import apply_masks, bake
from hf_lrp_surgery.circuits import (
    Ablation,
    NextTokenTask,
    PreparedTask,
    ablated,
    discover_circuit,
    evaluate_task,
    ioi_sets,
    ioi_task,
    load_task,
    metrics_from_logits,
    next_token_task,
    pruning_curve,
    sparsity_grid,
    specificity,
    task_scores,
)
from hf_lrp_surgery.circuits.compare import compare_methods
from hf_lrp_surgery.circuits.discovery import Circuit, NoCircuitError, _Ranking
from hf_lrp_surgery.circuits.tasks import last_token_logits, load_ioi_data, single_token_names
from hf_lrp_surgery.exceptions import AblationError, ReferenceSetError
from hf_lrp_surgery.lrp import resolve
from hf_lrp_surgery.masks import Mask, select
from hf_lrp_surgery.scoring import score

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = load_ioi_data()
#: The names the test tokenizer knows (every other shipped name is unknown to it).
KNOWN_NAMES = DATA["names"][:20]


def _ioi_tokenizer(names: list[str] = KNOWN_NAMES) -> PreTrainedTokenizerFast:
    words = set()
    for text in DATA["templates"] + DATA["places"] + DATA["objects"]:
        words.update(re.findall(r"\w+|[^\w\s]", text))
    vocab = ["<pad>", "<bos>", "<eos>", "<unk>"] + sorted(words | set(names) | {"-"})
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _ioi_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast):
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    return model_from_config(config, dtype=torch.float64)


def _own_prediction_task(model, tokenizer, size: int = 12, seed: int = 0) -> NextTokenTask:
    """A task the model does: correct = its top next token, wrong = its bottom one, on IOI prompts."""
    prompts = ioi_task(tokenizer, size, seed=seed)
    logits = last_token_logits(model, tokenizer, prompts)
    return next_token_task(
        [(e.prompt, int(row.argmax()), int(row.argmin())) for e, row in zip(prompts.examples, logits)],
        name="own-predictions",
    )


# -- IOI generator ----------------------------------------------------------------------------
def test_ioi_is_deterministic_and_seeded(tokenizer) -> None:
    first, again = ioi_task(tokenizer, 32, seed=3), ioi_task(tokenizer, 32, seed=3)
    other = ioi_task(tokenizer, 32, seed=4)
    assert first.examples == again.examples
    assert [e.prompt for e in first.examples] != [e.prompt for e in other.examples]
    sets = ioi_sets(tokenizer, 3, 16, seed=7)
    assert [s.settings["seed"] for s in sets] == [7, 8, 9]
    assert len({tuple(e.prompt for e in s.examples) for s in sets}) == 3


@pytest.mark.parametrize("size", [48, 64])
def test_ioi_balances_orders_and_templates(tokenizer, size: int) -> None:
    task = ioi_task(tokenizer, size, seed=1)
    assert len(task) == size
    assert Counter(e.info["order"] for e in task.examples) == {"ABBA": size // 2, "BABA": size // 2}
    per_template = Counter(e.info["template"] for e in task.examples)
    assert max(per_template.values()) - min(per_template.values()) <= 2  # within one ABBA/BABA pair
    if size == 48:  # 24 pairs over 12 templates: exactly two each
        assert set(per_template.values()) == {4} and len(per_template) == len(DATA["templates"])
    for abba, baba in zip(task.examples[::2], task.examples[1::2]):
        assert (abba.info["order"], baba.info["order"]) == ("ABBA", "BABA")
        assert abba.info["io"] == baba.info["io"] != abba.info["s"] == baba.info["s"]
        assert abba.info["template"] == baba.info["template"]


def test_ioi_prompts_name_the_indirect_object_once_and_the_subject_twice(tokenizer) -> None:
    for example in ioi_task(tokenizer, 64, seed=2).examples:
        io, s = example.info["io"], example.info["s"]
        words = re.findall(r"\w+", example.prompt)
        assert words.count(io) == 1 and words.count(s) == 2
        assert example.correct == " " + io and example.wrong == " " + s
        first_io, first_s = words.index(io), words.index(s)
        assert (first_io < first_s) == (example.info["order"] == "ABBA")
        assert not example.prompt.endswith(" ") and example.prompt.split()[-1] == "to"
    correct, wrong = ioi_task(tokenizer, 8, seed=2).token_ids(tokenizer)
    assert correct.shape == wrong.shape == (8,) and bool((correct != wrong).all())


def test_ioi_keeps_only_single_token_names(tokenizer) -> None:
    assert single_token_names(tokenizer, ["Mary-Ann", "Zebedee", KNOWN_NAMES[0]]) == [KNOWN_NAMES[0]]
    task = ioi_task(tokenizer, 64, seed=0)
    used = {e.info["io"] for e in task.examples} | {e.info["s"] for e in task.examples}
    assert used <= set(KNOWN_NAMES) and task.settings["num_names"] == len(KNOWN_NAMES)
    with pytest.raises(ReferenceSetError, match="one token"):
        ioi_task(_ioi_tokenizer(names=KNOWN_NAMES[:1]), 8)
    with pytest.raises(ReferenceSetError, match="even"):
        ioi_task(tokenizer, 7)


# -- metrics and tasks ------------------------------------------------------------------------
def test_metrics_from_known_logits() -> None:
    logits = torch.tensor(
        [
            [3.0, 1.0, 0.0, -2.0],  # correct 0 first, diff 3 - (-2) = 5
            [0.0, 2.0, 1.0, 0.5],  # correct 2 second, diff 1 - 2 = -1
            [1.0, 1.0, 0.0, 0.0],
        ]
    )  # correct 1 tied first, diff 1 - 0 = 1
    metrics = metrics_from_logits(logits, torch.tensor([0, 2, 1]), torch.tensor([3, 1, 2]))
    assert metrics.accuracy == pytest.approx(2 / 3)
    assert metrics.logit_diff == pytest.approx(5 / 3)
    assert metrics.num_examples == 3
    no_wrong = metrics_from_logits(logits, torch.tensor([1, 1, 1]))
    assert no_wrong.accuracy == pytest.approx(2 / 3) and no_wrong.logit_diff is None
    with pytest.raises(ReferenceSetError, match="wrong token"):
        no_wrong.get("logit_diff")


def test_evaluate_task_reads_each_prompts_last_token(model, tokenizer) -> None:
    task = ioi_task(tokenizer, 6, seed=5)
    batched = last_token_logits(model, tokenizer, task, batch_size=4)  # padded batches of prompts of different lengths
    for example, row in zip(task.examples, batched):
        ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0, -1].float()
        torch.testing.assert_close(row, alone, rtol=1e-5, atol=1e-5)
    correct, wrong = task.token_ids(tokenizer)
    expected = (batched[torch.arange(6), correct] - batched[torch.arange(6), wrong]).double().mean()
    assert evaluate_task(model, tokenizer, task).logit_diff == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_last_token_logits_in_every_family(family: str) -> None:
    model = tiny_model(family)
    task = next_token_task([([1, 5, 7, 9], 3, 4), ([1, 5, 7], 3, 4), ([2, 9, 11, 12, 13, 14], 3, 4)])
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([e.prompt])).logits[0, -1].float() for e in task.examples])
    torch.testing.assert_close(last_token_logits(model, None, task, batch_size=3), alone, rtol=1e-5, atol=1e-5)


def test_user_tasks_from_pairs_and_files(tmp_path: Path, tokenizer) -> None:
    task = next_token_task([("the cat sat on the", " mat", " dog"), {"prompt": "the dog", "correct": " sat"}])
    assert len(task) == 2 and not task.has_wrong
    assert task.token_ids(tokenizer)[1] is None
    path = tmp_path / "task.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": p, "correct": c, "wrong": w})
            for p, c, w in [("the cat", " sat", " mat"), ("a dog", " sat", " the")]
        )
    )
    loaded = load_task(path)
    assert loaded.has_wrong and loaded.settings["source"] == str(path)
    with pytest.raises(ReferenceSetError, match="exactly one"):
        next_token_task([("the cat", " sat on", " mat")]).token_ids(tokenizer)
    with pytest.raises(ReferenceSetError):
        next_token_task([])


# -- ablation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["neurons", "heads", "weights"])
def test_ablation_equals_baking_and_is_undone(model, tokenizer, granularity: str) -> None:
    task = ioi_task(tokenizer, 4, seed=0)
    before = last_token_logits(model, tokenizer, task)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = select(
        score(model, method="random", components=(granularity,), random_seed=1, progress=False), granularity, 0.3
    )
    with ablated(model, mask):
        during = last_token_logits(model, tokenizer, task)
    baked = last_token_logits(bake(copy.deepcopy(model), mask), tokenizer, task)
    torch.testing.assert_close(during, baked, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(during, before)
    torch.testing.assert_close(last_token_logits(model, tokenizer, task), before, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights_before[key]), key
    assert all(
        not layer.mlp_out._forward_pre_hooks and not layer.o_proj._forward_pre_hooks for layer in resolve(model).layers
    )


def test_complement_splits_the_units(model) -> None:
    mask = select(score(model, method="random", components=("neurons",), progress=False), "neurons", 30)
    other = mask.complement()
    assert mask.count + other.count == 2 * 48
    for name in mask.carriers():
        assert not bool((mask.dense(name, 48) & other.dense(name, 48)).any())


# -- task scores ------------------------------------------------------------------------------
def test_logit_difference_scores_match_a_hand_gradient(model, tokenizer) -> None:
    task = ioi_task(tokenizer, 4, seed=3)
    scores = task_scores(
        model, tokenizer, task, method="gradient", seed="logit_diff", aggregation="signed", progress=False
    )
    correct, wrong = task.token_ids(tokenizer)
    arch = resolve(model)
    expected = torch.zeros(2, 48, dtype=torch.float64)
    for i, example in enumerate(task.examples):
        ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
        inputs: list[torch.Tensor] = []
        handles = [
            layer.mlp_out.register_forward_pre_hook(lambda m, a: inputs.append(a[0]) or None) for layer in arch.layers
        ]
        try:
            logits = model(input_ids=ids).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        grads = torch.autograd.grad(logits[correct[i]] - logits[wrong[i]], inputs)
        for layer, (x, g) in enumerate(zip(inputs, grads)):
            expected[layer] += (x * g).detach()[0].sum(0)
    torch.testing.assert_close(scores.neurons.double(), expected / len(task), rtol=1e-4, atol=1e-8)
    assert scores.settings["task_seed"] == "logit_diff" and scores.settings["task"]["name"] == "ioi"


def test_lrp_logit_difference_is_the_difference_of_two_seeds(model, tokenizer) -> None:
    task = ioi_task(tokenizer, 4, seed=3)
    diff = task_scores(
        model,
        tokenizer,
        task,
        method="lrp",
        granularity="heads",
        seed="logit_diff",
        aggregation="signed",
        progress=False,
    )
    correct = score(model, task.samples("correct"), tokenizer, components=("heads",), progress=False)
    wrong = score(model, task.samples("wrong"), tokenizer, components=("heads",), progress=False)
    torch.testing.assert_close(diff.heads, correct.heads - wrong.heads)
    assert not torch.allclose(diff.heads, correct.heads)
    # |R(correct) - R(wrong)| per sample, averaged: the per-sample differences of single-sample passes.
    absolute = task_scores(
        model, tokenizer, task, method="lrp", granularity="heads", seed="logit_diff", aggregation="abs", progress=False
    )
    expected = sum(
        (
            score(model, [c], tokenizer, components=("heads",), progress=False).heads
            - score(model, [w], tokenizer, components=("heads",), progress=False).heads
        ).abs()
        for c, w in zip(task.samples("correct"), task.samples("wrong"))
    ) / len(task)
    torch.testing.assert_close(absolute.heads, expected)
    assert bool((absolute.heads >= diff.heads.abs() - 1e-6).all()) and absolute.num_samples == 4


# -- discovery --------------------------------------------------------------------------------
def test_sparsity_grid_is_log_spaced() -> None:
    grid = sparsity_grid(10000, 8, min_kept=1e-3)
    assert grid == [0, 10, 79, 630, 5000, 9370, 9921, 9990]
    assert sparsity_grid(3, 16) == [0, 1, 2]


def test_discovered_circuit_keeps_the_threshold_and_is_the_smallest_measured(model, tokenizer, tmp_path) -> None:
    task = _own_prediction_task(model, tokenizer)
    circuit = discover_circuit(model, tokenizer, task, threshold=0.8, grid_points=8, refine_steps=12, progress=False)
    base = circuit.baseline.logit_diff
    assert base > 0 and circuit.metrics.logit_diff >= 0.8 * base
    assert circuit.size + circuit.mask.count == circuit.total == 96
    assert sum(circuit.per_layer()) == circuit.size
    # The circuit's metric is what the baked model scores.
    baked = evaluate_task(bake(copy.deepcopy(model), circuit.mask), tokenizer, task)
    assert baked.logit_diff == pytest.approx(circuit.metrics.logit_diff, rel=1e-9)
    # Bisection: one more pruned unit (when measured) breaks the threshold; no measured larger pruning holds
    # unless it is beyond a failing point that the grid measured.
    measured = {p.pruned: p.metrics.logit_diff for p in circuit.curve.points}
    if circuit.mask.count + 1 in measured:
        assert measured[circuit.mask.count + 1] < 0.8 * base
    assert all(v < 0.8 * base for c, v in measured.items() if c > circuit.mask.count)
    info = circuit.mask.provenance["circuit"]
    assert info["size"] == circuit.size and info["threshold"] == 0.8 and info["task"]["name"] == "own-predictions"
    assert circuit.mask.provenance["scores"]["method"] == "gradient"  # the default: sparsest on SmolLM2
    circuit.save(tmp_path / "circuit")
    loaded = Mask.load(tmp_path / "circuit" / "mask")
    assert loaded.count == circuit.mask.count and loaded.provenance["circuit"]["size"] == circuit.size
    assert Mask.load(tmp_path / "circuit" / "components").count == circuit.size
    assert json.loads((tmp_path / "circuit" / "circuit.json").read_text())["size"] == circuit.size


def test_reattribution_and_heads(model, tokenizer) -> None:
    task = _own_prediction_task(model, tokenizer, seed=1)
    circuit = discover_circuit(
        model, tokenizer, task, granularity="heads", threshold=0.7, reattribute=True, grid_points=6, progress=False
    )
    assert circuit.total == 8 and circuit.metrics.logit_diff >= 0.7 * circuit.baseline.logit_diff
    with ablated(model, circuit.mask):
        again = evaluate_task(model, tokenizer, task)
    assert again.logit_diff == pytest.approx(circuit.metrics.logit_diff, rel=1e-9)


def test_no_circuit_when_nothing_can_be_pruned(model, tokenizer) -> None:
    task = _own_prediction_task(model, tokenizer, seed=2)
    relevant_first = task_scores(model, tokenizer, task, granularity="heads", progress=False)
    relevant_first.heads = -relevant_first.heads  # prune the most relevant head first
    with pytest.raises(NoCircuitError, match="already drops"):
        discover_circuit(
            model,
            tokenizer,
            task,
            scores=relevant_first,
            threshold=1.0,
            granularity="heads",
            grid_points=3,
            progress=False,
        )


def test_pruning_curve_and_comparison_report(model, tokenizer, tmp_path) -> None:
    sets = [
        (_own_prediction_task(model, tokenizer, 8, seed=i), _own_prediction_task(model, tokenizer, 8, seed=i))
        for i in range(2)
    ]
    scores = task_scores(model, tokenizer, sets[0][0], method="wanda", progress=False)
    curve = pruning_curve(model, tokenizer, sets[0][1], scores, counts=[0, 10, 50], progress=False)
    assert [p.pruned for p in curve.points] == [0, 10, 50] and curve.relative("logit_diff")[0] == 1.0
    comparison = compare_methods(
        model,
        tokenizer,
        sets,
        methods=("lrp", "random"),
        threshold=0.8,
        grid_points=6,
        refine_steps=4,
        random_draws=2,
        progress=False,
    )
    report = comparison.to_dict()
    lrp = report["methods"]["lrp"]
    assert len(lrp["circuit_size"]["per_set"]) == 2
    assert lrp["circuit_size"]["mean"] == pytest.approx(sum(lrp["circuit_size"]["per_set"]) / 2)
    assert len(lrp["curve"]["relative_mean"]) == len(report["grid"]) and lrp["curve"]["relative_mean"][0] == 1.0
    for check in lrp["specificity"]:
        assert check["full"] > 0 and len(check["random_ablated"]["values"]) == 2
    assert len(lrp["per_layer_mean"]) == 2
    comparison.save(tmp_path / "report")
    for name in ("report.json", "report.txt", "curves.png", "circuit_sizes.png", "composition.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert (tmp_path / "report" / "circuits" / "lrp" / "set0" / "mask" / "mask.json").is_file()
    assert "lrp" in comparison.table() and "random" in comparison.table()


def test_circuit_command_on_a_saved_model(model, tokenizer, tmp_path, capsys) -> None:
    import argparse

    from hf_lrp_surgery.cli.circuits import register

    checkpoint = tmp_path / "tiny"
    model.to(torch.float32).save_pretrained(checkpoint)
    model.to(torch.float64)
    tokenizer.save_pretrained(checkpoint)
    task = _own_prediction_task(model, tokenizer, 8, seed=4)
    path = tmp_path / "task.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": e.prompt, "correct": e.correct, "wrong": e.wrong}) for e in task.examples)
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "circuit",
            "--model",
            str(checkpoint),
            "--task",
            str(path),
            "--methods",
            "lrp",
            "random",
            "--threshold",
            "0.8",
            "--grid-points",
            "6",
            "--refine-steps",
            "3",
            "--random-draws",
            "1",
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "lrp" in printed and "specificity" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["threshold"] == 0.8 and set(report["methods"]) == {"lrp", "random"}
    assert report["settings"]["command"]


@pytest.mark.e2e
def test_smollm2_does_ioi_and_keeps_it_with_a_light_pruning() -> None:
    from hf_lrp_surgery.models import load_model

    model, tokenizer = load_model()
    task = ioi_task(tokenizer, 16, seed=0)
    assert task.settings["num_names"] == 194  # of 228: the rest are several tokens for SmolLM2
    full = evaluate_task(model, tokenizer, task)
    assert full.logit_diff > 2.0  # measured 4.4 on 64 prompts
    scores = task_scores(model, tokenizer, task, progress=False)
    curve = pruning_curve(model, tokenizer, task, scores, counts=[0, 1000], progress=False)
    assert curve.relative("logit_diff")[1] > 0.9  # the 1000 least relevant of 46,080 neurons are not needed


# -- ablation kinds, granularities, specificity, timings (issue 17) ---------------------------


def _own_task_with_corruption(model, tokenizer, size: int = 8, seed: int = 0) -> NextTokenTask:
    """The model's own predictions on IOI prompts, keeping each prompt's ABC-corrupted counterpart."""
    prompts = ioi_task(tokenizer, size, seed=seed)
    logits = last_token_logits(model, tokenizer, prompts)
    return next_token_task(
        [
            {
                "prompt": e.prompt,
                "correct": int(row.argmax()),
                "wrong": int(row.argmin()),
                "corrupted": e.info["corrupted"],
            }
            for e, row in zip(prompts.examples, logits)
        ],
        name="own-predictions",
    )


def _inputs_by_prompt(model, tokenizer, prompts: list[str], module) -> list[torch.Tensor]:
    """``module``'s input ``[T, in]`` on each prompt run alone (no padding)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach().clone()) or None)
    try:
        with torch.no_grad():
            for prompt in prompts:
                model(input_ids=tokenizer(prompt, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    return seen


def _logits_with_hook(model, tokenizer, prompts: list[str], module, make_hook) -> torch.Tensor:
    rows = []
    for i, prompt in enumerate(prompts):
        handle = module.register_forward_pre_hook(make_hook(i))
        try:
            with torch.no_grad():
                rows.append(model(input_ids=tokenizer(prompt, return_tensors="pt")["input_ids"]).logits[0, -1].float())
        finally:
            handle.remove()
    return torch.stack(rows)


def test_ioi_corrupted_prompts_are_abc_of_the_same_length(tokenizer) -> None:
    task = ioi_task(tokenizer, 16, seed=2)
    corrupted = task.corrupted()
    assert task.has_corrupted and len(corrupted) == len(task) and corrupted.name == "ioi-corrupted"
    for clean, bad in zip(task.examples, corrupted.examples):
        assert len(tokenizer(clean.prompt)["input_ids"]) == len(tokenizer(bad.prompt)["input_ids"])
        words = set(re.findall(r"\w+", bad.prompt))
        assert clean.info["io"] not in words and clean.info["s"] not in words
        assert bad.correct == clean.correct and bad.wrong == clean.wrong
    assert ioi_task(tokenizer, 16, seed=2).examples == task.examples  # still deterministic
    with pytest.raises(ReferenceSetError, match="corrupted"):
        next_token_task([("the cat sat", " on", " mat")]).corrupted()


@pytest.mark.parametrize("granularity", ["neurons", "heads", "weights"])
def test_zero_ablation_gives_the_old_metrics(model, tokenizer, granularity: str) -> None:
    task = _own_prediction_task(model, tokenizer, 8, seed=3)
    mask = select(
        score(model, method="random", components=(granularity,), random_seed=2, progress=False), granularity, 0.3
    )
    with ablated(model, mask):
        old = evaluate_task(model, tokenizer, task)
    zero = Ablation.record("zero", model, tokenizer, granularity)
    with ablated(model, mask, zero):
        new = PreparedTask(model, tokenizer, task).metrics(model, zero)  # the same batch as evaluate_task
        regrouped = PreparedTask(model, tokenizer, task, batch_size=3).metrics(model, zero)
    assert new == old  # identical
    # Length-sorted batches of another size: the same up to the fp32 rounding of the logits.
    assert regrouped.logit_diff == pytest.approx(old.logit_diff, rel=1e-6) and regrouped.accuracy == old.accuracy
    baked = evaluate_task(bake(copy.deepcopy(model), mask), tokenizer, task)
    assert new.logit_diff == pytest.approx(baked.logit_diff, rel=1e-9)


@pytest.mark.parametrize("granularity", ["neurons", "heads"])
def test_mean_ablation_equals_a_hand_computation(model, tokenizer, granularity: str) -> None:
    reference, evaluation = ioi_task(tokenizer, 6, seed=0), ioi_task(tokenizer, 4, seed=1)
    arch = resolve(model)
    mask = select(
        score(model, method="random", components=(granularity,), random_seed=3, progress=False), granularity, 0.5
    )
    ablation = Ablation.record("mean", model, tokenizer, granularity, reference=reference, batch_size=4)
    prepared = PreparedTask(model, tokenizer, evaluation, batch_size=3)
    with ablated(model, mask, ablation):
        got = prepared.logits(model)
    # By hand: the mean input of each carrier over every token of every reference prompt (run alone).
    carriers = [layer.mlp_out if granularity == "neurons" else layer.o_proj for layer in arch.layers]
    width = 1 if granularity == "neurons" else arch.head_dim
    means = [
        torch.cat(_inputs_by_prompt(model, tokenizer, [e.prompt for e in reference.examples], module)).mean(0)
        for module in carriers
    ]  # on the unpruned model
    handles = []
    for layer, (module, mean) in enumerate(zip(carriers, means)):
        name = mask.carriers()[layer]
        pruned = torch.zeros(mean.shape[0], dtype=torch.bool)
        for unit in mask.indices.get(name, torch.tensor([], dtype=torch.long)).tolist():
            pruned[unit * width : (unit + 1) * width] = True

        def hook(m, args, mean=mean, pruned=pruned):
            x = args[0].clone()
            x[..., pruned] = mean[pruned]
            return (x,)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            expected = torch.stack(
                [
                    model(input_ids=tokenizer(e.prompt, return_tensors="pt")["input_ids"]).logits[0, -1].float()
                    for e in evaluation.examples
                ]
            )
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with ablated(model, mask):
        zeroed = prepared.logits(model)
    assert not torch.allclose(got, zeroed)


def test_mean_ablation_of_weights_adds_w_times_the_mean_input(model, tokenizer) -> None:
    reference, evaluation = ioi_task(tokenizer, 6, seed=0), ioi_task(tokenizer, 4, seed=1)
    arch = resolve(model)
    name = arch.layers[1].mlp_out  # the down projection of block 1
    module_name = next(p.name for p in arch.prunable if p.module is name or p.name.endswith("1.mlp.down_proj"))
    scores = score(model, method="random", components=("weights",), random_seed=4, progress=False)
    mask = select(scores, "weights", 0.4, modules=[module_name])
    ablation = Ablation.record(
        "mean", model, tokenizer, "weights", reference=reference, modules=[module_name], batch_size=4
    )
    prepared = PreparedTask(model, tokenizer, evaluation, batch_size=4)
    with ablated(model, mask, ablation):
        got = prepared.logits(model)
    module = model.get_submodule(module_name)
    mean = torch.cat(_inputs_by_prompt(model, tokenizer, [e.prompt for e in reference.examples], module)).mean(0)
    weight = module.weight.detach()
    pruned = mask.dense(module_name, weight.numel()).view_as(weight)
    kept, removed = weight * ~pruned, weight * pruned
    handle = module.register_forward_hook(
        lambda m, args, out: torch.nn.functional.linear(args[0], kept, m.bias) + removed @ mean
    )
    try:
        with torch.no_grad():
            expected = torch.stack(
                [
                    model(input_ids=tokenizer(e.prompt, return_tensors="pt")["input_ids"]).logits[0, -1].float()
                    for e in evaluation.examples
                ]
            )
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(module.weight, weight)  # restored


@pytest.mark.parametrize("granularity", ["neurons", "heads", "weights"])
def test_corrupted_patching_of_a_whole_layer_runs_it_on_the_corrupted_prompt(model, tokenizer, granularity) -> None:
    task = _own_task_with_corruption(model, tokenizer, 6, seed=5)
    arch = resolve(model)
    scores = score(model, method="random", components=(granularity,), random_seed=0, progress=False)
    if granularity == "weights":
        name = next(p.name for p in arch.prunable if p.layer == 0 and p.role.endswith("down_proj"))
        module = model.get_submodule(name)
        carrier = module
        whole = {name: torch.arange(module.weight.numel())}
    else:
        name = scores.layout.carriers(granularity)[0]
        carrier = model.get_submodule(name)
        whole = {name: torch.arange(arch.num_neurons if granularity == "neurons" else arch.num_heads)}
    base = select(scores, granularity, 1)
    mask = Mask(granularity, base.fingerprint, base.layout, whole, dict(base.provenance))
    prepared = PreparedTask(model, tokenizer, task, batch_size=4)
    modules = [name] if granularity == "weights" else None
    ablation = Ablation.record("corrupted", model, tokenizer, granularity, evaluation=prepared, modules=modules)
    with ablated(model, mask, ablation):
        got = prepared.logits(model, on_batch=ablation.at_batch)
    corrupted_inputs = _inputs_by_prompt(model, tokenizer, [e.info["corrupted"] for e in task.examples], carrier)
    expected = _logits_with_hook(
        model,
        tokenizer,
        [e.prompt for e in task.examples],
        carrier,
        lambda i: lambda m, args: (corrupted_inputs[i][None],),
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with ablated(model, mask, ablation), pytest.raises(AblationError, match="prepared"):
        ablation.batch = None
        evaluate_task(model, tokenizer, task)


def test_corrupted_ablation_needs_same_length_corruptions(model, tokenizer) -> None:
    task = next_token_task([{"prompt": "When Mary and John went", "correct": 5, "wrong": 6, "corrupted": "When Mary"}])
    prepared = PreparedTask(model, tokenizer, task)
    with pytest.raises(AblationError, match="same token length"):
        Ablation.record("corrupted", model, tokenizer, "neurons", evaluation=prepared)
    with pytest.raises(AblationError, match="recorded values"), ablated(model, [], "mean"):
        pass


@pytest.mark.parametrize(
    ("granularity", "scope"),
    [
        ("neurons", "global"),
        ("neurons", "per_layer"),
        ("weights", "global"),
        ("weights", "per_layer"),
        ("weights", "per_row"),
    ],
)
def test_the_ranking_gives_selects_masks(model, granularity: str, scope: str) -> None:
    scores = score(model, method="random", components=(granularity,), random_seed=5, progress=False)
    if granularity == "neurons":
        scores.neurons[0, :5] = 0.5  # ties
    modules = ["mlp.*"] if granularity == "weights" else None
    ranking = _Ranking(scores, granularity, scope, modules)  # type: ignore[arg-type]
    for count in (1, 7, 40, ranking.eligible - 1):
        got, expected = ranking.mask(count), select(scores, granularity, count, scope=scope, modules=modules)
        assert got.indices.keys() == expected.indices.keys()
        assert all(torch.equal(got.indices[k], expected.indices[k]) for k in got.indices)


def test_the_row_wise_scope_prunes_the_same_share_of_every_row(model) -> None:
    scores = score(model, method="random", components=("weights",), random_seed=6, progress=False)
    ranking = _Ranking(scores, "weights", "per_row", ["mlp.*"])
    mask = ranking.mask(ranking.total // 4)
    assert mask.count == ranking.total // 4
    for name in mask.indices:
        values = scores.weights[name]
        pruned = mask.dense(name, values.numel()).view_as(values)
        per_row = pruned.sum(1)
        assert int(per_row.max() - per_row.min()) <= 1
        for row in range(values.shape[0]):  # the pruned ones are the lowest of their row
            if pruned[row].any() and (~pruned[row]).any():
                assert values[row][pruned[row]].max() <= values[row][~pruned[row]].min()


@pytest.mark.parametrize("ablation", ["zero", "mean", "corrupted"])
@pytest.mark.parametrize("granularity", ["neurons", "heads", "weights"])
def test_every_granularity_and_ablation_through_discover_circuit(model, tokenizer, granularity, ablation) -> None:
    task = _own_task_with_corruption(model, tokenizer, 8, seed=6)
    circuit = discover_circuit(
        model,
        tokenizer,
        task,
        method="wanda" if granularity == "weights" else "gradient",
        granularity=granularity,
        ablation=ablation,
        threshold=0.5,
        grid_points=6,
        refine_steps=4,
        progress=False,
    )
    assert circuit.metrics.logit_diff >= 0.5 * circuit.baseline.logit_diff
    assert circuit.ablation["kind"] == ablation == circuit.to_dict()["ablation"]["kind"]
    assert circuit.mask.provenance["circuit"]["ablation"]["kind"] == ablation
    assert set(circuit.timings) == {"baseline", "ablation", "relevance", "search"}
    if granularity == "weights":
        assert circuit.curve.scope == "per_row"  # Wanda's protocol
        assert all(".mlp." in name for name in circuit.mask.indices)
        assert (
            circuit.size + circuit.mask.count
            == circuit.total
            == sum(p.weight.numel() for p in resolve(model).prunable if ".mlp." in p.name)
        )
        assert circuit.components().count == circuit.size
    if ablation == "zero":
        assert circuit.carrier_mask() is circuit.mask
        if granularity != "weights":
            apply_masks(model, circuit.mask, "bake")  # a zero-ablation circuit's mask is carried
    else:
        with pytest.raises(AblationError, match=f"found with {ablation} ablation"):
            circuit.carrier_mask()
        # The mask itself, handed to a carrier, is refused too (the carriers can only zero).
        with pytest.raises(AblationError, match=f"comes from a circuit found with {ablation} ablation"):
            apply_masks(model, circuit.mask, "bake")
    with pytest.raises(AblationError, match="soft mask"):
        with ablated(
            model, circuit.mask.with_scales({n: torch.full((len(i),), 0.5) for n, i in circuit.mask.indices.items()})
        ):
            pass


def test_specificity_on_a_constructed_case(tokenizer) -> None:
    """Only neurons 0-9 of each block write anything: the circuit of those costs the task, random ones little."""
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    model = model_from_config(config, dtype=torch.float64)
    arch = resolve(model)
    with torch.no_grad():
        for layer in arch.layers:
            layer.mlp_out.weight[:, 10:] = 0
            layer.mlp_out.weight[:, :10] *= 5
    task = _own_prediction_task(model, tokenizer, 8, seed=7)
    scores = score(model, method="random", components=("neurons",), random_seed=0, progress=False)
    live = {name: torch.arange(10, 48) for name in scores.layout.neuron_modules}  # the pruning keeps 0-9
    base = select(scores, "neurons", 1)
    mask = Mask("neurons", base.fingerprint, base.layout, live, dict(base.provenance))
    baseline = evaluate_task(model, tokenizer, task)
    with ablated(model, mask):
        alone = evaluate_task(model, tokenizer, task)
    curve = pruning_curve(model, tokenizer, task, scores, counts=[0], progress=False)
    circuit = Circuit(mask, 20, 96, baseline, alone, curve, 0.9, "logit_diff")
    check = specificity(model, tokenizer, circuit, task, random_draws=3, seed=0)
    assert set(check) >= {
        "metric",
        "full",
        "circuit_ablated",
        "random_ablated",
        "relative_drop_circuit",
        "relative_drop_random",
        "relative_drop_random_std",
        "faithfulness",
    }
    assert len(check["random_ablated"]["values"]) == 3
    assert check["faithfulness"] == pytest.approx(1.0)  # the dead neurons do nothing
    assert check["relative_drop_circuit"] == pytest.approx((check["full"] - check["circuit_ablated"]) / check["full"])
    assert check["relative_drop_circuit"] > 0.1
    assert check["relative_drop_circuit"] > check["relative_drop_random"] + 2 * check["relative_drop_random_std"]


def test_comparison_records_stage_timings_faithfulness_and_specificity(model, tokenizer) -> None:
    sets = [
        (_own_task_with_corruption(model, tokenizer, 8, seed=i), _own_task_with_corruption(model, tokenizer, 8, seed=i))
        for i in range(2)
    ]
    comparison = compare_methods(
        model,
        tokenizer,
        sets,
        methods=("gradient", "wanda"),
        granularity="weights",
        ablation="corrupted",
        threshold=0.5,
        grid_points=6,
        refine_steps=3,
        random_draws=2,
        progress=False,
    )
    report = comparison.to_dict()
    assert report["settings"]["scopes"] == {"gradient": "global", "wanda": "per_row"}
    assert set(report["settings"]["seconds_per_stage"]) == {"setup", "relevance", "search", "specificity"}
    for data in report["methods"].values():
        assert set(data["timings"]["total"]) == {"setup", "relevance", "search", "specificity"}
        for timing in data["timings"]["per_set"]:
            assert set(timing) == {"baseline", "ablation", "relevance", "search", "setup", "specificity"}
        assert set(data["faithfulness"]) == {"mean", "std"} and data["faithfulness"]["mean"] >= 0.5
        summary = data["specificity_summary"]
        assert set(summary) == {"relative_drop_circuit", "relative_drop_random", "relative_drop_random_draw_std"}
    assert "drop: circuit" in comparison.table()


@pytest.mark.parametrize(("granularity", "ablation"), [("heads", "mean"), ("weights", "corrupted")])
def test_circuit_command_with_every_granularity(model, tokenizer, tmp_path, capsys, granularity, ablation) -> None:
    import argparse

    from hf_lrp_surgery.cli.circuits import register

    checkpoint = tmp_path / "tiny"
    model.to(torch.float32).save_pretrained(checkpoint)
    model.to(torch.float64)
    tokenizer.save_pretrained(checkpoint)
    task = _own_task_with_corruption(model, tokenizer, 8, seed=4)
    path = tmp_path / "task.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": e.prompt, "correct": e.correct, "wrong": e.wrong, "corrupted": e.info["corrupted"]})
            for e in task.examples
        )
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["circuit", "--model", str(checkpoint), "--task", str(path), "--methods", "lrp", "wanda"]
        + ["--granularity", granularity, "--ablation", ablation, "--threshold", "0.5", "--grid-points", "6"]
        + ["--refine-steps", "2", "--random-draws", "1", "--output", str(tmp_path / "out"), "--no-progress"]
    )
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert f"{ablation} ablation" in printed and "seconds per stage" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["granularity"] == granularity and report["settings"]["ablation"] == ablation
    expected_scope = "per_row" if granularity == "weights" else "global"
    assert report["settings"]["scopes"] == {"lrp": "global", "wanda": expected_scope}
    circuit = json.loads((tmp_path / "out" / "circuits" / "lrp" / "set0" / "circuit.json").read_text())
    assert circuit["ablation"]["kind"] == ablation and "search" in circuit["timings"]


def test_circuit_command_passes_the_lrp_variant_and_epsilon(model, tokenizer, tmp_path, capsys) -> None:
    import argparse

    from hf_lrp_surgery.cli.circuits import register

    checkpoint = tmp_path / "tiny"
    model.to(torch.float32).save_pretrained(checkpoint)
    model.to(torch.float64)
    tokenizer.save_pretrained(checkpoint)
    task = _own_prediction_task(model, tokenizer, 8, seed=4)
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": e.prompt, "correct": e.correct}) for e in task.examples))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    reports = {}
    for variant, epsilon in (("attnlrp", 0.0), ("cp", 0.1)):
        out = tmp_path / f"out-{variant}"
        args = parser.parse_args(
            ["circuit", "--model", str(checkpoint), "--task", str(path), "--methods", "lrp", "--sets", "1"]
            + ["--variant", variant, "--epsilon", str(epsilon), "--metric", "accuracy", "--threshold", "0.5"]
            + [
                "--grid-points",
                "4",
                "--refine-steps",
                "1",
                "--random-draws",
                "1",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        assert args.handler(args) == 0
        reports[variant] = json.loads((out / "report.json").read_text())
    assert (reports["cp"]["settings"]["variant"], reports["cp"]["settings"]["epsilon"]) == ("cp", 0.1)
    assert reports["attnlrp"]["settings"]["variant"] == "attnlrp"


def _needed_first(model, samples, tokenizer):
    """Negated signed gradient x activation: the neurons that raise the correct logit most rank lowest."""
    scores = score(model, samples, tokenizer, method="gradient", components=("neurons",), aggregation="signed")
    scores.neurons = -scores.neurons
    return scores


def test_comparison_reports_the_curve_of_a_set_without_a_circuit(model, tokenizer, tmp_path) -> None:
    """A method whose first grid point already breaks the threshold still has its measured curve in the report."""
    from hf_lrp_surgery.scoring import register_scorer, unregister_scorer

    sets = [
        (_own_prediction_task(model, tokenizer, 8, seed=i), _own_prediction_task(model, tokenizer, 8, seed=i))
        for i in range(2)
    ]
    register_scorer(
        "needed_first",
        lambda request: _needed_first(request.model, request.samples, request.tokenizer),
        description="test: the most needed neurons first",
    )
    try:
        comparison = compare_methods(
            model,
            tokenizer,
            sets,
            methods=("needed_first",),
            threshold=1.0,
            grid_points=6,
            patience=2,
            random_draws=1,
            progress=False,
        )
    finally:
        unregister_scorer("needed_first")
    assert comparison.results["needed_first"].circuits == [None, None]  # the case: no set has a circuit
    expected = []
    for reference, evaluation in sets:  # the first grid point, measured by hand
        with ablated(
            model, select(_needed_first(model, reference.samples(), tokenizer), "neurons", comparison.grid[1])
        ):
            pruned = evaluate_task(model, tokenizer, evaluation).logit_diff
        expected.append(pruned / evaluate_task(model, tokenizer, evaluation).logit_diff)
    report = comparison.to_dict()["methods"]["needed_first"]
    assert report["circuit_size"]["per_set"] == [comparison.total] * 2  # no circuit: the whole model
    for row, value in zip(report["curve"]["per_set"], expected):
        assert row[0] == 1.0 and row[1] == pytest.approx(value, rel=1e-9) and row[1] < 1.0
        assert all(v == v for v in row[:3]) and all(v != v for v in row[3:])  # measured: the first 2 grid points
    assert report["curve"]["relative_mean"][1] == pytest.approx(sum(expected) / 2, rel=1e-9)
    comparison.save(tmp_path / "report")
    assert (tmp_path / "report" / "curves.png").stat().st_size > 0
