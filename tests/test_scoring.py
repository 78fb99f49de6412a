"""Scores: every method against a hand computation on tiny fp64 models, contrast, and persistence.

The expected values are computed here without the library's scorers: weight norms read straight
from the modules, activations read with forward pre-hooks on unpadded single-sample passes (so the
library's padded batches must leave pads out), and gradients from ``torch.autograd.grad`` on the
seeded logit.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

import hf_lrp_surgery.scoring.registry as scoring_module_registry
import hf_lrp_surgery.scoring.scores as scoring_module
from hf_lrp_surgery.exceptions import NonFiniteScoreError, ReferenceSetError
from hf_lrp_surgery.fingerprint import ModelFingerprint, fingerprint
from hf_lrp_surgery.lrp import ReferenceSample, collect_relevance, resolve
from hf_lrp_surgery.scoring import METHODS, Layout, Scores, contrast, score

pytestmark = pytest.mark.usefixtures("single_thread")

#: Token-id prompts of different lengths (3, 6, 2 tokens): batches of them are padded.
SAMPLES: list[list[int]] = [[1, 5, 7], [1, 40, 33, 12, 61, 6], [9, 20]]
ALL = ("neurons", "heads", "weights")
HEADS = 4

#: Per family: (decoder block prefix, MLP output projection, attention output projection, prunable roles,
#: Conv1D orientation).
FAMILY_INFO: dict[str, tuple[str, str, str, tuple[str, ...], bool]] = {
    "llama": (
        "model.layers",
        "mlp.down_proj",
        "self_attn.o_proj",
        (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ),
        False,
    ),
    "opt": (
        "model.decoder.layers",
        "fc2",
        "self_attn.out_proj",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        False,
    ),
    "gpt2": (
        "transformer.h",
        "mlp.c_proj",
        "attn.c_proj",
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        True,
    ),
}
FAMILIES3 = list(FAMILY_INFO)


@functools.cache
def _model(family: str, seed: int = 0) -> nn.Module:
    """A cached tiny fp64 model (tests never modify it)."""
    return tiny_model(family, dtype=torch.float64, seed=seed)


def _names(family: str, role: str) -> list[str]:
    """Full names of ``role`` in each of the 2 decoder blocks."""
    prefix = FAMILY_INFO[family][0]
    return [f"{prefix}.{i}.{role}" for i in range(2)]


def _neuron_norms(model: nn.Module, family: str) -> torch.Tensor:
    """``[layers, neurons]``: L2 norm of the MLP output projection's weights reading each neuron."""
    conv1d = FAMILY_INFO[family][4]
    rows = []
    for name in _names(family, FAMILY_INFO[family][1]):
        weight = model.get_submodule(name).weight.detach()
        # llama/opt: down_proj.weight[:, i]; gpt2 Conv1D: c_proj.weight[i, :]
        count = weight.shape[0] if conv1d else weight.shape[1]
        rows.append(torch.stack([(weight[i] if conv1d else weight[:, i]).norm() for i in range(count)]))
    return torch.stack(rows)


def _head_norms(model: nn.Module, family: str) -> torch.Tensor:
    """``[layers, heads]``: Frobenius norm of the o_proj weights reading each head's slice."""
    conv1d = FAMILY_INFO[family][4]
    rows = []
    for name in _names(family, FAMILY_INFO[family][2]):
        weight = model.get_submodule(name).weight.detach()
        width = (weight.shape[0] if conv1d else weight.shape[1]) // HEADS
        rows.append(
            torch.stack(
                [
                    (
                        weight[h * width : (h + 1) * width, :] if conv1d else weight[:, h * width : (h + 1) * width]
                    ).norm()
                    for h in range(HEADS)
                ]
            )
        )
    return torch.stack(rows)


def _prunable(family: str) -> list[str]:
    """Every prunable module's full name, in block order."""
    return [
        name for i in range(2) for name in (f"{FAMILY_INFO[family][0]}.{i}.{role}" for role in FAMILY_INFO[family][3])
    ]


def _module_inputs(model: nn.Module, names: list[str], samples: list[list[int]]) -> dict[str, torch.Tensor]:
    """``name -> [tokens, in]``: every module's input over every token, each sample run alone (no pads)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(module: nn.Module, args: tuple, name: str) -> None:
        seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [
        model.get_submodule(name).register_forward_pre_hook(functools.partial(hook, name=name)) for name in names
    ]
    try:
        with torch.no_grad():
            for sample in samples:
                model(torch.tensor([sample]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in seen.items()}


def _head_output_norms(x: torch.Tensor) -> torch.Tensor:
    """``[tokens, heads]``: L2 norm of each head's slice of an o_proj input ``[tokens, heads * dim]``."""
    return x.unflatten(-1, (HEADS, -1)).norm(dim=-1)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """fp32 scores against an fp64 expectation."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=1e-9)


# -- sample-free methods ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES3)
def test_magnitude_is_weight_norms(family: str) -> None:
    """Neurons: ||W_out column||, heads: ||W_o head columns||_F, weights: |W| (llama, opt, gpt2 Conv1D)."""
    model = _model(family)
    result = score(model, method="magnitude", components=ALL, progress=False)
    assert result.method == "magnitude" and result.num_samples == 0 and result.components == ALL
    assert result.neurons.shape == (2, 48) and result.heads.shape == (2, HEADS)
    _close(result.neurons, _neuron_norms(model, family))
    _close(result.heads, _head_norms(model, family))
    assert list(result.weights) == _prunable(family)
    for name, value in result.weights.items():
        _close(value, model.get_submodule(name).weight.detach().abs())


def test_random_scores_are_seeded_uniform() -> None:
    """Same seed -> same scores; another seed -> other scores; all in [0, 1); no samples needed."""
    model = _model("llama")
    a = score(model, None, method="random", components=ALL, random_seed=3, progress=False)
    b = score(model, method="random", components=ALL, random_seed=3, progress=False)
    c = score(model, method="random", components=ALL, random_seed=4, progress=False)
    assert a.settings["random_seed"] == 3 and a.num_samples == 0
    tensors = [a.neurons, a.heads, *a.weights.values()]
    assert all(bool(((t >= 0) & (t < 1)).all()) for t in tensors)
    assert torch.equal(a.neurons, b.neurons) and torch.equal(a.heads, b.heads)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not torch.equal(a.neurons, c.neurons) and not torch.equal(a.heads, c.heads)
    assert all(not torch.equal(a.weights[k], c.weights[k]) for k in a.weights)
    assert {k: v.shape for k, v in a.weights.items()} == {
        k: model.get_submodule(k).weight.shape for k in _prunable("llama")
    }


# -- activation statistics --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES3)
def test_activation_scores_match_hooks(family: str) -> None:
    """activation = mean |a_i| (neurons), mean head-output L2 norm (heads), mean |x_j| (weights), real tokens only."""
    model = _model(family)
    neuron_names, head_names = _names(family, FAMILY_INFO[family][1]), _names(family, FAMILY_INFO[family][2])
    inputs = _module_inputs(model, sorted({*neuron_names, *head_names, *_prunable(family)}), SAMPLES)
    result = score(model, SAMPLES, method="activation", components=ALL, batch_size=3, progress=False)
    assert result.settings["tokens"] == sum(len(s) for s in SAMPLES)  # pads do not count
    assert result.num_samples == len(SAMPLES)
    _close(result.neurons, torch.stack([inputs[n].abs().mean(0) for n in neuron_names]))
    _close(result.heads, torch.stack([_head_output_norms(inputs[n]).mean(0) for n in head_names]))
    conv1d = FAMILY_INFO[family][4]
    for name in _prunable(family):
        weight = model.get_submodule(name).weight
        mean_abs = inputs[name].abs().mean(0)
        expected = mean_abs[:, None].expand(weight.shape) if conv1d else mean_abs[None, :].expand(weight.shape)
        _close(result.weights[name], expected)


@pytest.mark.parametrize("family", FAMILIES3)
def test_wanda_scores_match_hooks(family: str) -> None:
    """wanda = |W_ij| * RMS(x_j); neurons RMS(a_i) * ||W_out[:, i]||; heads RMS(head norm) * ||W_o[:, head]||_F."""
    model = _model(family)
    neuron_names, head_names = _names(family, FAMILY_INFO[family][1]), _names(family, FAMILY_INFO[family][2])
    inputs = _module_inputs(model, sorted({*neuron_names, *head_names, *_prunable(family)}), SAMPLES)
    # batch_size=2: two batches, the first padded, so statistics are summed across batches
    result = score(model, SAMPLES, method="wanda", components=ALL, batch_size=2, progress=False)
    rms = torch.stack([inputs[n].pow(2).mean(0).sqrt() for n in neuron_names])
    _close(result.neurons, rms * _neuron_norms(model, family))
    head_rms = torch.stack([_head_output_norms(inputs[n]).pow(2).mean(0).sqrt() for n in head_names])
    _close(result.heads, head_rms * _head_norms(model, family))
    conv1d = FAMILY_INFO[family][4]
    for name in _prunable(family):
        weight = model.get_submodule(name).weight.detach()
        x_rms = inputs[name].pow(2).mean(0).sqrt()
        # Conv1D (gpt2) weights are [in, out]: input j is row j; nn.Linear weights are [out, in]: column j.
        expected = weight.abs() * (x_rms[:, None] if conv1d else x_rms[None, :])
        _close(result.weights[name], expected)
    if family == "gpt2":  # one element spelled out: W[j, k] reads input j
        w = model.get_submodule("transformer.h.0.mlp.c_fc").weight.detach()
        x = inputs["transformer.h.0.mlp.c_fc"]
        j, k = 5, 17
        expected_jk = w[j, k].abs() * x[:, j].pow(2).mean().sqrt()
        actual_jk = float(result.weights["transformer.h.0.mlp.c_fc"][j, k])
        assert abs(actual_jk - float(expected_jk)) < 1e-6 * float(expected_jk)


# -- gradient x activation / weight -----------------------------------------------------------------
GRAD_SAMPLES: list[Any] = [[1, 5, 7, 9, 11, 3], ReferenceSample([3, 4, 8], target=5), [9, 20]]


def _hand_gradient(
    model: nn.Module, family: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Per sample: neuron and head ``a * dL/da`` summed over tokens, and ``W * dL/dW``, by plain autograd."""
    neuron_names, head_names = _names(family, FAMILY_INFO[family][1]), _names(family, FAMILY_INFO[family][2])
    weight_names = _prunable(family)
    neurons, heads, weights = [], [], []
    for sample in GRAD_SAMPLES:
        ids = sample.prompt if isinstance(sample, ReferenceSample) else sample
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple, name: str) -> None:
            captured[name] = args[0]

        handles = [
            model.get_submodule(n).register_forward_pre_hook(functools.partial(hook, name=n))
            for n in neuron_names + head_names
        ]
        try:
            last = model(torch.tensor([ids])).logits[0, -1]
        finally:
            for handle in handles:
                handle.remove()
        target = sample.target if isinstance(sample, ReferenceSample) else int(last.argmax())
        params = [model.get_submodule(n).weight for n in weight_names]
        acts = [captured[n] for n in neuron_names + head_names]
        grads = torch.autograd.grad(last[target], acts + params)
        products = [(a * g).detach().reshape(-1, a.shape[-1]).sum(0) for a, g in zip(acts, grads[: len(acts)])]
        neurons.append(torch.stack(products[:2]))
        heads.append(torch.stack([p.unflatten(0, (HEADS, -1)).sum(-1) for p in products[2:]]))
        weights.append({n: (w.detach() * g) for n, w, g in zip(weight_names, params, grads[len(acts) :])})
    return neurons, heads, weights


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_scores_match_autograd(family: str) -> None:
    """gradient method: mean over samples of a * dL/da (neurons, heads) and W * dL/dW (weights), no LRP rules."""
    model = _model(family)
    neurons, heads, weights = _hand_gradient(model, family)
    n = len(GRAD_SAMPLES)
    signed = score(
        model, GRAD_SAMPLES, method="gradient", components=ALL, aggregation="signed", batch_size=3, progress=False
    )
    assert signed.method == "gradient" and signed.settings["variant"] == "gradient"
    assert signed.num_samples == n and signed.settings["aggregation"] == "signed"
    tol = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(signed.neurons, sum(neurons) / n, **tol)
    torch.testing.assert_close(signed.heads, sum(heads) / n, **tol)
    assert list(signed.weights) == _prunable(family)
    for name in signed.weights:
        torch.testing.assert_close(signed.weights[name], sum(w[name] for w in weights) / n, **tol)
    # abs: mean of per-sample |R|, which differs from |mean R|
    absolute = score(
        model, GRAD_SAMPLES, method="gradient", components=ALL, aggregation="abs", batch_size=2, progress=False
    )
    torch.testing.assert_close(absolute.neurons, sum(t.abs() for t in neurons) / n, **tol)
    torch.testing.assert_close(absolute.heads, sum(t.abs() for t in heads) / n, **tol)
    for name in absolute.weights:
        torch.testing.assert_close(absolute.weights[name], sum(w[name].abs() for w in weights) / n, **tol)
    assert bool((absolute.neurons > signed.neurons.abs() + 1e-12).any())


# -- lrp ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["signed", "abs"])
def test_lrp_scores_are_mean_relevance(aggregation: str) -> None:
    """score(method='lrp') == Scores.from_relevance(collect_relevance(...)), signed and abs."""
    model = _model("opt")
    result = score(model, GRAD_SAMPLES, method="lrp", components=ALL, aggregation=aggregation, progress=False)
    relevance = collect_relevance(
        model, GRAD_SAMPLES, components=ALL, per_sample_abs_weights=aggregation == "abs", progress=False
    )
    expected = Scores.from_relevance(relevance, Layout.of(resolve(model)), aggregation=aggregation)
    assert result.method == expected.method == "lrp"
    assert result.settings["aggregation"] == aggregation and result.num_samples == len(GRAD_SAMPLES)
    assert result.fingerprint == fingerprint(model) and result.layout == expected.layout
    torch.testing.assert_close(result.neurons, expected.neurons, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.heads, expected.heads, rtol=1e-12, atol=0)
    assert result.weights.keys() == expected.weights.keys()
    for name in result.weights:
        torch.testing.assert_close(result.weights[name], expected.weights[name], rtol=1e-12, atol=0)
    mean = relevance.mean("neurons", absolute=aggregation == "abs")
    torch.testing.assert_close(result.neurons, mean, rtol=1e-12, atol=0)


def test_lrp_abs_weights_are_mean_per_sample_abs() -> None:
    """aggregation='abs' for weights is the mean over samples of each sample's |R| (not |mean R|)."""
    model = _model("llama")
    result = score(model, GRAD_SAMPLES, method="lrp", components=("weights",), aggregation="abs", progress=False)
    singles = [collect_relevance(model, [s], components=("weights",), progress=False) for s in GRAD_SAMPLES]
    signed = score(model, GRAD_SAMPLES, method="lrp", components=("weights",), progress=False)
    strictly_larger = False
    for name, value in result.weights.items():
        expected = sum(r.weights[name].abs() for r in singles) / len(singles)
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-13)
        strictly_larger |= bool((value > signed.weights[name].abs() + 1e-12).any())
    assert strictly_larger
    assert result.neurons is None and result.heads is None and result.components == ("weights",)


def test_bf16_weight_buffers_in_the_model_dtype_are_scored_in_fp32() -> None:
    """weight_buffers='model' keeps a bf16 model's sums in bf16; the scores it ranks come out fp32."""
    model = _model("llama").to(torch.bfloat16)
    kwargs = {"method": "lrp", "components": ("weights",), "progress": False}
    lean = score(model, GRAD_SAMPLES, weight_buffers="model", **kwargs)
    full = score(model, GRAD_SAMPLES, **kwargs)
    relevance = collect_relevance(model, GRAD_SAMPLES, components=("weights",), weight_buffers="model", progress=False)
    assert {w.dtype for w in relevance.weights.values()} == {torch.bfloat16}
    assert lean.settings["weight_buffers"] == "model" and full.settings["weight_buffers"] == "float32"
    for name, value in lean.weights.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, (relevance.weights[name] / len(GRAD_SAMPLES)).float(), rtol=0, atol=0)
        torch.testing.assert_close(
            value, full.weights[name], rtol=0.05, atol=1e-3 * float(full.weights[name].abs().max())
        )


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("magnitude", "random")])
def test_methods_with_samples_refuse_an_empty_set(method: str) -> None:
    """lrp, gradient, activation and wanda need reference samples."""
    with pytest.raises(ReferenceSetError, match="needs reference samples"):
        score(_model("llama"), [], method=method, progress=False)
    with pytest.raises(ReferenceSetError):
        score(_model("llama"), None, method=method, progress=False)


def test_unknown_method_component_or_aggregation() -> None:
    """Unknown method, component, empty components or aggregation -> ValueError."""
    model = _model("llama")
    with pytest.raises(ValueError, match="method"):
        score(model, SAMPLES, method="taylor", progress=False)
    with pytest.raises(ValueError, match="components"):
        score(model, SAMPLES, components=("neurons", "layers"), progress=False)
    with pytest.raises(ValueError, match="components"):
        score(model, SAMPLES, components=(), progress=False)
    with pytest.raises(ValueError, match="aggregation"):
        score(model, SAMPLES, aggregation="max", progress=False)


def test_get_unscored_component() -> None:
    """Scores.get of a kind that was not scored -> KeyError naming it."""
    result = score(_model("llama"), method="magnitude", components=("heads",), progress=False)
    assert torch.equal(result.get("heads"), result.heads)
    with pytest.raises(KeyError, match="neurons"):
        result.get("neurons")
    with pytest.raises(KeyError, match="component must be"):
        result.get("layers")


# -- contrast on constructed scores -----------------------------------------------------------------
LAYOUT = Layout(
    num_layers=2,
    num_neurons=4,
    num_heads=2,
    neuron_modules=("blocks.0.mlp.out", "blocks.1.mlp.out"),
    head_modules=("blocks.0.attn.o", "blocks.1.attn.o"),
    weight_modules={"blocks.0.mlp.out": (0, "mlp.out"), "blocks.1.mlp.out": (1, "mlp.out")},
)
FP = ModelFingerprint("llama", "c" * 64, "w" * 64, 123)


def _scores(
    neurons: list[list[float]] | None = None,
    heads: list[list[float]] | None = None,
    weights: dict[str, list[list[float]]] | None = None,
    *,
    method: str = "lrp",
    fp: ModelFingerprint = FP,
    num_samples: int = 3,
) -> Scores:
    """A Scores value on :data:`LAYOUT` with the given values."""
    return Scores(
        method=method,
        settings={"method": method},
        fingerprint=fp,
        layout=LAYOUT,
        num_samples=num_samples,
        neurons=None if neurons is None else torch.tensor(neurons),
        heads=None if heads is None else torch.tensor(heads),
        weights={k: torch.tensor(v) for k, v in (weights or {}).items()},
    )


G_NEURONS = [[0.5, -4.0, 1.0, 2.0], [3.0, -0.25, 6.0, -7.0]]
U_NEURONS = [[1.0, 1.0, -2.0, 0.0], [0.5, 4.0, 1.5, -1.0]]
G_HEADS = [[1.0, -2.0], [3.0, 10.0]]
U_HEADS = [[2.0, 2.0], [-1.0, 0.5]]
G_WEIGHTS = {"blocks.0.mlp.out": [[1.0, -2.0], [0.5, 8.0]], "blocks.1.mlp.out": [[-3.0, 0.75], [4.0, 1.5]]}
U_WEIGHTS = {"blocks.0.mlp.out": [[0.0, 1.0], [2.0, -1.0]], "blocks.1.mlp.out": [[1.0, 1.0], [-6.0, 0.25]]}


def _pair() -> tuple[Scores, Scores]:
    """General and undesired scores of every kind with distinct general |score|."""
    return (
        _scores(G_NEURONS, G_HEADS, G_WEIGHTS, num_samples=3),
        _scores(U_NEURONS, U_HEADS, U_WEIGHTS, num_samples=5),
    )


def _t(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_contrast_without_normalisation_is_the_difference() -> None:
    """normalize='none', protect_top=0: exactly general - undesired, with provenance."""
    general, undesired = _pair()
    out = contrast(general, undesired, normalize="none", protect_top=0.0)
    assert torch.equal(out.neurons, torch.tensor(G_NEURONS) - torch.tensor(U_NEURONS))
    assert torch.equal(out.heads, torch.tensor(G_HEADS) - torch.tensor(U_HEADS))
    for name in G_WEIGHTS:
        assert torch.equal(out.weights[name], torch.tensor(G_WEIGHTS[name]) - torch.tensor(U_WEIGHTS[name]))
    assert out.method == "contrast" and out.num_samples == 8
    assert out.settings["of"] == "lrp" and out.settings["normalize"] == "none"
    assert out.settings["general_samples"] == 3 and out.settings["undesired_samples"] == 5
    assert out.fingerprint == FP and out.layout == LAYOUT


def _normalised(values: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """Expected per-set scaling, written out for each mode."""
    every = torch.cat([v.flatten() for v in values.values()]).abs()
    if how == "total":
        return {k: v / every.sum() for k, v in values.items()}
    if how == "max":
        return {k: v / every.max() for k, v in values.items()}
    return {k: v / v.abs().sum() for k, v in values.items()}  # layer: each row / matrix by its own total


@pytest.mark.parametrize("how", ["total", "max", "layer"])
def test_contrast_normalisation(how: str) -> None:
    """total: / set total |score| per kind; max: / largest |score|; layer: each row or matrix / its own total."""
    general, undesired = _pair()
    out = contrast(general, undesired, normalize=how, protect_top=0.0)
    for component, g_values, u_values in (("neurons", G_NEURONS, U_NEURONS), ("heads", G_HEADS, U_HEADS)):
        g = _normalised({str(i): row for i, row in enumerate(_t(g_values))}, how)
        u = _normalised({str(i): row for i, row in enumerate(_t(u_values))}, how)
        expected = torch.stack([g[str(i)] - u[str(i)] for i in range(2)])
        _close(getattr(out, component), expected)
    g = _normalised({k: _t(v) for k, v in G_WEIGHTS.items()}, how)
    u = _normalised({k: _t(v) for k, v in U_WEIGHTS.items()}, how)
    for name in G_WEIGHTS:
        _close(out.weights[name], g[name] - u[name])
    # spot checks by hand: total |general neurons| = 23.75, max = 7, row 1 total = 16.25
    scale = {"total": 23.75, "max": 7.0, "layer": 16.25}[how]
    u_scale = {"total": 11.0, "max": 4.0, "layer": 7.0}[how]
    assert abs(float(out.neurons[1, 3]) - (-7.0 / scale + 1.0 / u_scale)) < 1e-6


@pytest.mark.parametrize("normalize", ["none", "total"])
def test_contrast_protects_the_top_general_components(normalize: str) -> None:
    """protect_top=q: exactly int(q * n) components with the largest general |score| become +inf."""
    general, undesired = _pair()
    out = contrast(general, undesired, normalize=normalize, protect_top=0.3)
    # neurons: n = 8 -> 2 protected: |-7| at (1, 3) and 6 at (1, 2)
    assert torch.isinf(out.neurons).nonzero().tolist() == [[1, 2], [1, 3]]
    assert bool((out.neurons[torch.isinf(out.neurons)] > 0).all())
    plain = contrast(general, undesired, normalize=normalize, protect_top=0.0)
    keep = ~torch.isinf(out.neurons)
    assert torch.equal(out.neurons[keep], plain.neurons[keep])
    # heads: n = 4 -> int(1.2) = 1 protected: 10 at (1, 1)
    assert torch.isinf(out.heads).nonzero().tolist() == [[1, 1]]
    # weights: n = 8 over both matrices -> 2 protected: 8 in matrix 0, 4 in matrix 1
    assert torch.isinf(out.weights["blocks.0.mlp.out"]).nonzero().tolist() == [[1, 1]]
    assert torch.isinf(out.weights["blocks.1.mlp.out"]).nonzero().tolist() == [[1, 0]]
    # q = 0.1: int(0.8) = 0, nothing protected
    none = contrast(general, undesired, normalize=normalize, protect_top=0.1)
    assert not any(bool(torch.isinf(t).any()) for t in [none.neurons, none.heads, *none.weights.values()])


def test_contrast_refuses_mismatched_inputs() -> None:
    """Different methods, components or models, bad options -> ValueError; NaN -> NonFiniteScoreError."""
    general, undesired = _pair()
    with pytest.raises(ValueError, match="same method"):
        contrast(general, _scores(U_NEURONS, U_HEADS, U_WEIGHTS, method="wanda"))
    with pytest.raises(ValueError, match="same components"):
        contrast(general, _scores(U_NEURONS, U_HEADS))
    other = ModelFingerprint("llama", "c" * 64, "x" * 64, 123)
    with pytest.raises(ValueError, match="different models"):
        contrast(general, _scores(U_NEURONS, U_HEADS, U_WEIGHTS, fp=other))
    with pytest.raises(ValueError, match="normalize"):
        contrast(general, undesired, normalize="zscore")
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="protect_top"):
            contrast(general, undesired, protect_top=bad)
    nan = [row[:] for row in U_NEURONS]
    nan[0][1] = float("nan")
    with pytest.raises(NonFiniteScoreError, match="NaN"):
        contrast(general, _scores(nan, U_HEADS, U_WEIGHTS))
    with pytest.raises(NonFiniteScoreError):
        _scores([[float("-inf"), 0.0, 0.0, 0.0], [0.0] * 4]).check_finite()
    _scores([[float("inf"), 0.0, 0.0, 0.0], [0.0] * 4]).check_finite()  # +inf marks protection: allowed


# -- persistence -------------------------------------------------------------------------------------
def test_scores_save_load_round_trip(tmp_path: Path) -> None:
    """Tensors (with +inf), method, settings, layout, fingerprint and sample count survive save/load."""
    general, undesired = _pair()
    out = contrast(general, undesired, normalize="total", protect_top=0.3)
    assert bool(torch.isinf(out.neurons).any())
    out.save(tmp_path / "scores")
    loaded = Scores.load(tmp_path / "scores")
    assert loaded.method == out.method and loaded.settings == out.settings
    assert loaded.layout == out.layout and loaded.fingerprint == out.fingerprint
    assert loaded.num_samples == out.num_samples
    assert torch.equal(loaded.neurons, out.neurons) and torch.equal(loaded.heads, out.heads)
    assert loaded.weights.keys() == out.weights.keys()
    assert all(torch.equal(loaded.weights[k], out.weights[k]) for k in out.weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]
    # a real model's layout and fingerprint too
    model = _model("gpt2")
    magnitude = score(model, method="magnitude", components=("heads", "weights"), progress=False)
    magnitude.save(tmp_path / "magnitude")
    again = Scores.load(tmp_path / "magnitude")
    assert again.layout == Layout.of(resolve(model)) and again.fingerprint == fingerprint(model)
    assert again.neurons is None and torch.equal(again.heads, magnitude.heads)
    with pytest.raises(FileNotFoundError, match="saved scores"):
        Scores.load(tmp_path)


def test_failing_save_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails half way leaves neither the directory nor a temporary one behind."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(scoring_module, "save_file", broken)
    general, _ = _pair()
    with pytest.raises(OSError, match="disk full"):
        general.save(tmp_path / "scores")
    assert list(tmp_path.iterdir()) == []


def test_protection_counts_ties_once() -> None:
    """Ties at the cut-off (e.g. dead neurons at 0) do not all become protected: exactly int(q * n) are."""
    general = _scores([[0.0, 0.0, 0.0, 1.0], [2.0, 3.0, 0.0, 0.0]])
    undesired = _scores([[0.0] * 4, [0.0] * 4])
    protected = torch.isinf(contrast(general, undesired, normalize="none", protect_top=0.5).neurons)
    assert protected.tolist() == [[True, False, False, True], [True, True, False, False]]


def test_token_id_tensors_are_samples() -> None:
    """A 2-D tensor of token ids is a reference set for every method, as for collect_relevance."""
    model = _model("llama")
    ids = torch.tensor([[1, 5, 7], [1, 8, 9]])
    for method in ("activation", "lrp"):
        assert score(model, ids, method=method, progress=False).num_samples == 2


# -- registry, options, exclusion --------------------------------------------------------------------
def test_a_registered_toy_scorer_works_through_score_surgeon_and_select() -> None:
    """A new method is one function plus one entry: score(), Surgeon and select() use it; it lists and unlists."""
    from hf_lrp_surgery import Surgeon
    from hf_lrp_surgery.masks import select
    from hf_lrp_surgery.scoring import register_scorer, unregister_scorer

    def layer_index(request: scoring_module_registry.ScoringRequest) -> Scores:
        """Neurons of later layers score higher: pruning takes layer 0 first."""
        scores = request.new_scores({"method": "layer_index"})
        layout = request.layout
        scores.neurons = torch.arange(layout.num_layers, dtype=torch.float32)[:, None].expand(
            layout.num_layers, layout.num_neurons
        )
        return scores

    register_scorer("layer_index", layer_index, description="the block index", needs_samples=False)
    try:
        assert "layer_index" in scoring_module_registry.registered_methods()
        import hf_lrp_surgery.scoring as scoring

        assert "layer_index" in scoring.METHODS and "layer_index" in scoring.SAMPLE_FREE_METHODS
        assert "layer_index" not in scoring.CIRCUIT_METHODS
        model = _model("llama")
        direct = score(model, method="layer_index", progress=False)
        via_surgeon = Surgeon(model, progress=False).attribute(None, method="layer_index")
        assert direct.method == via_surgeon.method == "layer_index" and torch.equal(direct.neurons, via_surgeon.neurons)
        mask = select(direct, "neurons", 3)
        assert mask.count == 3 and mask.per_layer()[0] == 3
        with pytest.raises(ValueError, match="already registered"):
            register_scorer("layer_index", layer_index, description="again")
    finally:
        unregister_scorer("layer_index")
    with pytest.raises(ValueError, match="method must be one of .*'lrp'"):
        score(_model("llama"), method="layer_index", progress=False)


def test_excluding_makes_selected_units_ineligible() -> None:
    """Scores.excluding(mask) is a copy whose masked units score +inf; the next selection takes others."""
    from hf_lrp_surgery.masks import select

    general, _ = _pair()
    for granularity in ("neurons", "heads", "weights"):
        first = select(general, granularity, 2)
        excluded = general.excluding(first)
        assert excluded.get(granularity) is not general.get(granularity)
        second = select(excluded, granularity, 2)
        for name, index in first.indices.items():
            assert not set(index.tolist()) & set(second.indices.get(name, torch.tensor([], dtype=torch.long)).tolist())
        assert torch.isinf(_flat(excluded, granularity)).sum() == torch.isinf(_flat(general, granularity)).sum() + 2
    assert not torch.isinf(general.neurons).any(), "the original is untouched"


def _flat(scores: Scores, granularity: str) -> torch.Tensor:
    value = scores.get(granularity)  # type: ignore[arg-type]
    return torch.cat([v.flatten() for v in value.values()]) if isinstance(value, dict) else value.flatten()


def test_options_are_frozen_validated_and_recorded() -> None:
    """Options validate as the functions did, record themselves, and old keywords (seed=) still work."""
    import dataclasses

    from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions

    options = ScoringOptions(method="magnitude", components=["heads", "heads"])
    assert options.components == ("heads",) and options.to_dict()["components"] == ["heads"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.method = "lrp"  # type: ignore[misc]
    for bad in ({"method": "taylor"}, {"components": ()}, {"aggregation": "max"}, {"objective": "logit_diff"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ScoringOptions(**bad)
    with pytest.raises(ValueError, match="protect_top"):
        ContrastOptions(protect_top=1.0)
    with pytest.raises(ValueError, match="scope"):
        SelectionOptions(scope="local")  # type: ignore[arg-type]
    assert {f.name for f in dataclasses.fields(ScoringOptions) if "help" in f.metadata} == set(options.to_dict())

    model = _model("llama")
    new = score(model, SAMPLES, options=ScoringOptions(objective="logprob"), progress=False)
    with pytest.warns(DeprecationWarning, match="objective="):
        old = score(model, SAMPLES, seed="logprob", progress=False)
    assert torch.equal(new.neurons, old.neurons) and new.settings == old.settings
    with pytest.raises(TypeError, match="normalise"):
        score(model, SAMPLES, normalise="total", progress=False)
    general, undesired = _pair()
    assert contrast(general, undesired, ContrastOptions(normalize="none")).settings["normalize"] == "none"


def test_a_registered_toy_paired_scorer_gets_both_sets_through_score_pair_and_surgeon() -> None:
    """A paired method is one function plus register_scorer(..., paired=True): score_pair and Surgeon.contrast
    hand it both sets (request.samples undesired, request.general_samples general); score() refuses it."""
    from hf_lrp_surgery import Surgeon
    from hf_lrp_surgery.scoring import register_scorer, score_pair, unregister_scorer

    def set_sizes(request: scoring_module_registry.ScoringRequest) -> Scores:
        """Every neuron scores len(general) - len(undesired)."""
        scores = request.new_scores({"method": "set_sizes"})
        layout = request.layout
        difference = float(len(request.general_samples) - len(request.samples))
        scores.neurons = torch.full((layout.num_layers, layout.num_neurons), difference)
        return scores

    register_scorer("set_sizes", set_sizes, description="set sizes", paired=True, components=("neurons",))
    try:
        import hf_lrp_surgery.scoring as scoring

        assert "set_sizes" in scoring.PAIRED_METHODS and "set_sizes" not in scoring.CIRCUIT_METHODS
        model = _model("llama")
        direct = score_pair(model, SAMPLES[:1], SAMPLES, method="set_sizes", progress=False)
        assert direct.num_samples == 4 and bool((direct.neurons == 2).all())
        via_surgeon = Surgeon(model, progress=False).contrast(
            undesired=SAMPLES[:1], general=SAMPLES, method="set_sizes"
        )
        assert torch.equal(direct.neurons, via_surgeon.neurons) and via_surgeon.method == "set_sizes"
        with pytest.raises(ReferenceSetError, match="score_pair"):
            score(model, SAMPLES, method="set_sizes", progress=False)
        with pytest.raises(ValueError, match="scores only neurons, not heads"):
            score_pair(model, SAMPLES, SAMPLES, method="set_sizes", components=("heads",), progress=False)
    finally:
        unregister_scorer("set_sizes")
