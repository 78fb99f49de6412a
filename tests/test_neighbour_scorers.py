"""The paired neighbour methods (AurA, repetition neurons, attribution patching) against hand computations.

The expected values are computed here without the library's passes: activations read with forward
pre-hooks on unpadded single-sample runs (the library pads batches, so its pooling must leave pads
out), positions written out by hand, AUROC by comparing every pair, and gradients from
``torch.autograd.grad`` of the explained logits with respect to the hooked activations.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer
from torch import nn

import hf_lrp_surgery.scoring as scoring
from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.lrp import ReferenceSample
from hf_lrp_surgery.options import ContrastOptions, ScoringOptions
from hf_lrp_surgery.scoring import Scores, aura_scales, auroc, register_scorer, score, score_pair
from hf_lrp_surgery.scoring.repetition_neurons import repetition_onset
from hf_lrp_surgery.surgeon import Surgeon

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRED = ("aura", "atp", "repetition_neurons")
UNITS = ("neurons", "heads")
HEADS = 4
#: Per family: (decoder block prefix, MLP output projection, attention output projection).
MODULES = {
    "llama": ("model.layers", "mlp.down_proj", "self_attn.o_proj"),
    "gpt2": ("transformer.h", "mlp.c_proj", "attn.c_proj"),
}

#: Undesired samples: focused, unfocused, and a plain text (pooled over all its tokens).
UNDESIRED = [
    ReferenceSample([1, 5, 7], [8, 9, 8, 9, 8], focus=[2, 4]),
    ReferenceSample([1, 40], [3, 4, 5, 3]),
    ReferenceSample([1, 6, 12, 6, 12]),
]
#: General samples of other lengths.
GENERAL = [ReferenceSample([1, 5, 7], [10, 11, 12]), ReferenceSample([2, 3, 4, 6]), ReferenceSample([1, 9], [30])]


@functools.cache
def _model(family: str) -> nn.Module:
    """A cached tiny fp64 model (tests never modify it)."""
    return tiny_model(family, dtype=torch.float64)


def _modules(model: nn.Module, family: str, kind: str) -> list[nn.Module]:
    prefix, mlp_out, o_proj = MODULES[family]
    return [model.get_submodule(f"{prefix}.{i}.{mlp_out if kind == 'neurons' else o_proj}") for i in range(2)]


def _shaped(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``[1, T, features]`` -> neurons ``[T, I]``, heads ``[T, H, head_dim]``."""
    return x[0].unflatten(-1, (HEADS, -1)) if kind == "heads" else x[0]


def _run(model: nn.Module, family: str, ids: list[int], *, grad: bool = False) -> tuple[torch.Tensor, dict]:
    """One unpadded pass: the logits ``[T, V]`` and kind -> per block the module inputs ``[1, T, features]``
    (the tensors the model computed on, so that ``torch.autograd.grad`` can differentiate them when ``grad``)."""
    captured: dict[str, list[torch.Tensor]] = {kind: [] for kind in UNITS}
    handles = []
    for kind in UNITS:
        for module in _modules(model, family, kind):

            def hook(module: nn.Module, args: tuple, kind: str = kind) -> None:
                captured[kind].append(args[0])

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


def _ids_and_positions(sample: ReferenceSample) -> tuple[list[int], list[int], list[int]]:
    """Ids as explained, the explained positions, and the explained tokens (continuation or plain text)."""
    prompt = list(sample.prompt)  # type: ignore[arg-type]
    if sample.continuation is None:
        return prompt, list(range(len(prompt))), []
    continuation = list(sample.continuation)  # type: ignore[arg-type]
    focus = list(sample.focus) if sample.focus is not None else list(range(len(continuation)))
    ids = prompt + continuation[: focus[-1] + 1]
    return ids, [len(prompt) - 1 + j for j in focus], [continuation[j] for j in focus]


def _pairwise_auroc(positive: list[float], negative: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


# -- AUROC and AurA ---------------------------------------------------------------------------------
def test_auroc_counts_every_pair_with_ties_as_half() -> None:
    generator = torch.Generator().manual_seed(0)
    positive = torch.randint(0, 4, (7, 3, 5), generator=generator).double()  # many ties
    negative = torch.randint(0, 4, (4, 3, 5), generator=generator).double()
    out = auroc(positive, negative)
    assert out.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            expected = _pairwise_auroc(positive[:, i, j].tolist(), negative[:, i, j].tolist())
            assert out[i, j].item() == pytest.approx(expected, abs=1e-12)
    assert auroc(torch.ones(2, 1) * 3, torch.zeros(5, 1)).item() == 1.0
    assert auroc(torch.zeros(2, 1), torch.zeros(5, 1)).item() == 0.5
    with pytest.raises(ValueError, match="non-empty"):
        auroc(torch.zeros(0, 1), torch.zeros(2, 1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_aura_is_the_auroc_of_max_pooled_activations(family: str) -> None:
    """Neurons: max over the explained positions; heads: max of the output norm; score 0.5 - AUROC."""
    model = _model(family)
    pooled: dict[str, dict[str, list[torch.Tensor]]] = {"u": {k: [] for k in UNITS}, "g": {k: [] for k in UNITS}}
    for side, samples in (("u", UNDESIRED), ("g", GENERAL)):
        for sample in samples:
            ids, positions, _ = _ids_and_positions(sample)
            _, acts = _run(model, family, ids)
            neurons = [_shaped(a, "neurons") for a in acts["neurons"]]
            heads = [_shaped(a, "heads") for a in acts["heads"]]
            pooled[side]["neurons"].append(torch.stack([a[positions].amax(0) for a in neurons]))
            pooled[side]["heads"].append(torch.stack([a[positions].norm(dim=-1).amax(0) for a in heads]))
    result = score_pair(model, UNDESIRED, GENERAL, method="aura", components=UNITS, batch_size=2, progress=False)
    assert result.method == "aura" and result.num_samples == 6 and result.settings["score"] == "0.5 - AUROC"
    for kind in UNITS:
        u, g = torch.stack(pooled["u"][kind]), torch.stack(pooled["g"][kind])
        expected = torch.tensor(
            [
                [0.5 - _pairwise_auroc(u[:, i, j].tolist(), g[:, i, j].tolist()) for j in range(u.shape[2])]
                for i in range(u.shape[1])
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(getattr(result, kind).double(), expected, rtol=0, atol=1e-6)


def test_a_neuron_that_fires_only_on_undesired_samples_has_auroc_one_and_scale_zero() -> None:
    """Block 0's neuron 5 reads residual feature 0, which only token 50's embedding writes: it is 0 elsewhere."""
    model = tiny_model("llama", dtype=torch.float64)
    k, marker = 5, 50
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding[:, 0] = 0.0
        embedding[marker, 0] = 50.0
        block = model.model.layers[0]
        block.self_attn.o_proj.weight[0] = 0.0  # attention writes nothing into feature 0
        for projection in (block.mlp.gate_proj, block.mlp.up_proj):
            projection.weight[k] = 0.0
            projection.weight[k, 0] = 5.0
    undesired = [[1, 7, marker, 9], [1, marker, 3], [1, 4, 4, 6, marker]]
    general = [[1, 7, 8, 9], [1, 3], [1, 4, 4, 6, 11, 12], [2, 20]]
    result = score_pair(model, undesired, general, method="aura", progress=False)
    assert result.neurons[0, k].item() == -0.5  # AUROC 1
    scales = aura_scales(result)
    assert set(scales) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert scales["model.layers.0.mlp.down_proj"][k].item() == 0.0
    for module, row in zip(result.layout.neuron_modules, result.neurons):
        expected = torch.where(row >= 0, 1.0, 1 + 2 * row.double())  # 1 - 2 (AUROC - 0.5) above chance
        torch.testing.assert_close(scales[module].double(), expected, rtol=0, atol=1e-7)
        assert bool(((scales[module] >= 0) & (scales[module] <= 1)).all())
    both = score_pair(model, undesired, general, method="aura", components=UNITS, progress=False)
    assert set(aura_scales(both)) == set(result.layout.neuron_modules) | set(result.layout.head_modules)
    with pytest.raises(ValueError, match="aura method"):
        aura_scales(score(model, method="magnitude", progress=False))


# -- repetition neurons -----------------------------------------------------------------------------
def test_repetition_onset() -> None:
    assert repetition_onset([5, 6, 7, 6, 7]) == 3
    assert repetition_onset([1, 2, 3]) is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_repetition_neurons_are_mean_after_minus_before_the_onset(family: str) -> None:
    """Positions written out by hand: the position predicting token j of a continuation is len(prompt) - 1 + j."""
    model = _model(family)
    undesired = [
        # onset 3 (the 8 repeats): before predicts tokens 0..2 at positions 2..4, after tokens 3..5 at 5..7
        (ReferenceSample([1, 5, 7], [8, 9, 10, 8, 9, 10]), [2, 3, 4], [5, 6, 7]),
        # focus says the onset is token 4 (the whole continuation is read): before 1..4, after 5
        (ReferenceSample([1, 40], [3, 4, 5, 3, 4], focus=[4]), [1, 2, 3, 4], [5]),
        # a plain text: token 2 repeats token 1; position 0 predicts token 1, positions 1, 2 tokens 2, 3
        (ReferenceSample([1, 6, 6, 7]), [0], [1, 2]),
    ]
    no_onset = ReferenceSample([1, 2, 3], [4, 5])
    expected: dict[str, torch.Tensor] = {}
    for sample, before, after in undesired:
        ids = list(sample.prompt) + list(sample.continuation or [])  # type: ignore[arg-type]
        _, acts = _run(model, family, ids)
        for kind in UNITS:
            layers = [_shaped(a, kind).norm(dim=-1) if kind == "heads" else _shaped(a, kind) for a in acts[kind]]
            delta = torch.stack([a[after].mean(0) - a[before].mean(0) for a in layers])
            expected[kind] = expected.get(kind, 0) + delta / len(undesired)
    samples = [s for s, _, _ in undesired] + [no_onset]
    result = score_pair(model, samples, GENERAL, method="repetition_neurons", components=UNITS, progress=False)
    assert result.settings["samples_with_onset"] == 3 and result.settings["general_samples"] == 3
    for kind in UNITS:
        torch.testing.assert_close(getattr(result, kind).double(), -expected[kind], rtol=1e-5, atol=1e-6)
    with pytest.raises(ReferenceSetError, match="onset"):
        score_pair(model, [no_onset], GENERAL, method="repetition_neurons", progress=False)
    outside = ReferenceSample([1, 5], [8, 9, 8], focus=[3])  # valid only for the library's unfocused read
    with pytest.raises(ReferenceSetError, match="outside"):
        score_pair(model, [outside], GENERAL, method="repetition_neurons", progress=False)


# -- attribution patching ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("objective", ["logit", "logprob"])
def test_atp_is_the_gradient_times_the_activation_difference(family: str, objective: str) -> None:
    """-g . (mean_u - mean_g); g: the gradient of each undesired sample's mean explained logit, summed over
    its explained positions, averaged over the samples."""
    model = _model(family)
    undesired = UNDESIRED[:2] + [ReferenceSample([1, 6, 12], [9, 9])]
    means: dict[str, dict[str, torch.Tensor]] = {"u": {}, "g": {}}
    gradient: dict[str, torch.Tensor] = {}
    for side, samples in (("u", undesired), ("g", GENERAL)):
        for sample in samples:
            ids, positions, tokens = _ids_and_positions(sample)
            logits, acts = _run(model, family, ids, grad=side == "u")
            for kind in UNITS:
                mean = torch.stack([_shaped(a, kind)[positions].detach().mean(0) for a in acts[kind]])
                means[side][kind] = means[side].get(kind, 0) + mean / len(samples)
            if side == "g":
                continue
            rows = logits[positions].double()
            rows = rows.log_softmax(-1) if objective == "logprob" else rows
            objective_value = rows[torch.arange(len(tokens)), tokens].mean()
            flat = [a for kind in UNITS for a in acts[kind]]
            grads = torch.autograd.grad(objective_value, flat)
            for index, kind in enumerate(UNITS):
                layers = grads[2 * index : 2 * index + 2]
                summed = torch.stack([_shaped(g, kind)[positions].sum(0) for g in layers])
                gradient[kind] = gradient.get(kind, 0) + summed / len(samples)
    result = score_pair(
        model, undesired, GENERAL, method="atp", components=UNITS, objective=objective, batch_size=2, progress=False
    )
    assert result.settings["objective"] == objective
    for kind in UNITS:
        effect = gradient[kind] * (means["u"][kind] - means["g"][kind])
        expected = -(effect.sum(-1) if kind == "heads" else effect)
        # Batched with padding and held in float32 by the scorer, one sample at a time in float64 here: on some CPUs
        # one entry in 96 (a small one) differs by 2.6e-9, 3e-5 relatively; a wrong formula is off by O(1).
        torch.testing.assert_close(getattr(result, kind).double(), expected, rtol=1e-4, atol=1e-8)
    assert not any(p.grad is not None for p in model.parameters()), "the model's parameters get no gradients"


# -- dispatch: registry, score, Surgeon.contrast, the recipe ------------------------------------------
def test_paired_methods_are_listed_but_not_in_the_one_set_comparison() -> None:
    assert set(PAIRED) <= set(scoring.METHODS) and set(scoring.PAIRED_METHODS) == set(PAIRED)
    assert not set(PAIRED) & set(scoring.CIRCUIT_METHODS) and not set(PAIRED) & set(scoring.SAMPLE_FREE_METHODS)
    assert all(scoring.get_scorer(m).paired and scoring.get_scorer(m).components == UNITS for m in PAIRED)
    assert not scoring.get_scorer("lrp").paired and scoring.get_scorer("lrp").components == (*UNITS, "weights")


@pytest.mark.parametrize("method", PAIRED)
def test_paired_methods_refuse_one_set_weights_and_empty_sets(method: str) -> None:
    model = _model("llama")
    with pytest.raises(ReferenceSetError, match=r"two behaviours.*Surgeon\.contrast"):
        score(model, UNDESIRED, method=method, progress=False)
    with pytest.raises(ValueError, match=f"the {method} method scores only neurons, heads, not weights"):
        score_pair(model, UNDESIRED, GENERAL, method=method, components=("neurons", "weights"), progress=False)
    with pytest.raises(ValueError, match="not weights"):
        ScoringOptions(method=method, components=("weights",))  # refused when the options are made
    with pytest.raises(ReferenceSetError, match="general set is empty"):
        score_pair(model, UNDESIRED, [], method=method, progress=False)
    with pytest.raises(ValueError, match="scores one reference set"):
        score_pair(model, UNDESIRED, GENERAL, method="activation", progress=False)


def test_register_scorer_refuses_a_paired_method_in_the_comparison_or_without_samples() -> None:
    def nothing(request: scoring.ScoringRequest) -> Scores:
        return request.new_scores({})

    with pytest.raises(ValueError, match="paired"):
        register_scorer("paired_nothing", nothing, description="x", paired=True, in_comparison=True)
    with pytest.raises(ValueError, match="paired"):
        register_scorer("paired_nothing", nothing, description="x", paired=True, needs_samples=False)
    with pytest.raises(ValueError, match="components"):
        register_scorer("paired_nothing", nothing, description="x", components=("layers",))
    assert "paired_nothing" not in scoring.METHODS


def test_surgeon_contrast_dispatches_a_paired_method(text_checkpoint: Path, word_tokenizer) -> None:
    """Text sets through Surgeon.contrast: the paired method's own scores, no contrast; limit applies."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(text_checkpoint, torch_dtype=torch.float64).eval()
    undesired = [("the cat sat on", "bad bad bad"), ("hello world", "bad very bad"), ("one two", "bad")]
    general = [("the cat sat on", "the mat"), ("hello world", "good sun"), ("a big red", "car")]
    surgeon = Surgeon(model, word_tokenizer, batch_size=2, progress=False)
    for method in PAIRED:
        scores = surgeon.contrast(undesired=undesired, general=general, method=method, components=UNITS, limit=2)
        direct = score_pair(
            model, undesired[:2], general[:2], word_tokenizer, method=method, components=UNITS, progress=False
        )
        assert scores.method == method and scores.num_samples == 4
        torch.testing.assert_close(scores.neurons, direct.neurons)
        torch.testing.assert_close(scores.heads, direct.heads)
    mask = surgeon.select(scores, "neurons", 3)
    assert mask.count == 3
    with pytest.raises(ReferenceSetError, match="not as Scores"):
        surgeon.contrast(undesired=scores, general=general, method="aura")
    with pytest.raises(ValueError, match="its own contrast"):
        surgeon.contrast(undesired=undesired, general=general, method="aura", protect_top=0.1)
    with pytest.raises(ValueError, match="its own contrast"):
        surgeon.contrast(
            undesired=undesired, general=general, method="atp", contrast_options=ContrastOptions(normalize="max")
        )
    with pytest.raises(ReferenceSetError, match="Surgeon.contrast"):
        surgeon.attribute(undesired, method="aura")


def test_the_recipe_runs_unchanged_with_a_paired_method(tmp_path: Path) -> None:
    """run_recipe(..., scoring=ScoringOptions(method="aura")) scores the paired sets with AurA."""
    from transformers import AutoModelForCausalLM

    from hf_lrp_surgery.correction import GeneralLimits, detox_behaviour, run_recipe
    from hf_lrp_surgery.evaluation import CallableScorer

    directory = tmp_path / "tiny"
    base = tiny_model("llama", dtype=torch.float32, attn_implementation="sdpa")
    base.resize_token_embeddings(len(WORDS))
    base.save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    bad = CallableScorer(lambda texts: [1.0 if "bad" in t.split() else 0.0 for t in texts], "keyword")
    prompts = ["the cat sat on the", "hello world", "the dog was very", "one two three", "a big red", "the sun and"]
    result = run_recipe(
        model,
        tiny_tokenizer(),
        detox_behaviour(bad, max_new_tokens=4),
        tmp_path / "aura",
        budgets=[2],
        limits=GeneralLimits(1e9, 1e9),
        prompts={"train": prompts * 2, "heldout": prompts[:3]},
        scoring=ScoringOptions(method="aura"),
        progress=False,
    )
    report = json.loads((tmp_path / "aura" / "report.json").read_text())
    assert report["settings"]["method"] == "aura" and result.reference_sizes["undesired"] > 0
    saved = Scores.load(tmp_path / "aura" / "scores")
    assert (
        saved.method == "aura"
        and saved.neurons is not None
        and saved.num_samples == sum(result.reference_sizes.values())
    )


def test_the_cli_corrects_with_a_paired_method_and_refuses_it_on_one_set(
    text_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``correct --method aura`` runs; ``attribute --method aura`` and weights are one-line errors."""
    from hf_lrp_surgery.cli import main

    def jsonl(path: Path, pairs: list[tuple[str, str]]) -> str:
        path.write_text("".join(json.dumps({"prompt": p, "continuation": c}) + "\n" for p, c in pairs))
        return str(path)

    undesired = jsonl(tmp_path / "u.jsonl", [("the cat sat on", "bad bad"), ("hello world", "very bad")])
    general = jsonl(tmp_path / "g.jsonl", [("the cat sat on", "the mat"), ("hello world", "good sun")])
    common = ["--model", str(text_checkpoint), "--no-progress"]
    sets = ["--undesired", undesired, "--general", general]
    out = tmp_path / "correct"
    assert main(["correct", *common, *sets, "--method", "atp", "--budget", "3", "--output", str(out)]) == 0
    assert Scores.load(out / "scores").method == "atp" and (out / "mask").is_dir()
    capsys.readouterr()
    for command, message in (
        (["attribute", *common, "--samples", undesired, "--method", "aura"], "Surgeon.contrast"),
        (["correct", *common, *sets, "--method", "aura", "--granularity", "weights"], "not weights"),
    ):
        status = main([*command, "--output", str(tmp_path / "refused")])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert status == 2 and len(errors) == 1 and message in errors[0], errors
        assert not (tmp_path / "refused").exists()


def test_aura_dampening_gives_each_selected_unit_its_aura_scale() -> None:
    from hf_lrp_surgery.masks import select

    model = _model("llama")
    scores = score_pair(model, UNDESIRED, GENERAL, method="aura", components=("neurons",), batch_size=2, progress=False)
    mask = select(scores, "neurons", 6, dampen="aura")
    dense = aura_scales(scores)
    assert mask.soft and mask.provenance["dampening"] == "aura"
    for name, index in mask.indices.items():
        # AurA's scale of each selected unit (a unit it would leave whole, AUROC <= 0.5, is kept just below 1).
        torch.testing.assert_close(mask.scale_of(name), dense[name][index].clamp(max=1 - 1e-7), rtol=0, atol=1e-6)
        assert bool((mask.scale_of(name) < 1).all())
    lrp_scores = score(model, UNDESIRED, method="lrp", components=("neurons",), progress=False)
    with pytest.raises(ValueError, match="aura dampening reads AUROCs"):
        select(lrp_scores, "neurons", 6, dampen="aura")
