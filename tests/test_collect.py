"""Collectors, seeds and aggregation (lrp.md tests 5-7) on tiny random models of every family."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import pytest
import torch
from tiny_models import FAMILIES, MOE_FAMILIES, tiny_model
from tiny_tokenizer import tiny_tokenizer

from hf_lrp_surgery.exceptions import (
    NonFiniteRelevanceError,
    ReferenceSetError,
    SequenceTooLongError,
    UnsupportedArchitectureError,
)
from hf_lrp_surgery.lrp import LRPRules, ReferenceSample, RelevanceResult, collect_relevance, resolve

ALL = ("neurons", "heads", "weights", "inputs")
SAMPLES = [
    [1, 5, 7, 9, 11, 3],
    [3, 4],
    ReferenceSample([2, 3, 4], continuation=[7, 8, 9]),
    ReferenceSample([9, 9, 9, 10], target=5),
    [6],
]


@functools.cache
def _model(family: str, dtype: torch.dtype = torch.float64, attn: str = "eager") -> torch.nn.Module:
    # Cached across tests: tests that modify a model work on a deepcopy.
    return tiny_model(family, dtype=dtype, attn_implementation=attn)


def _components(model: torch.nn.Module) -> tuple[str, ...]:
    """Everything collectable on ``model``: the weights granularity is refused on mixture-of-experts models."""
    return tuple(c for c in ALL if c != "weights") if resolve(model).spec.moe is not None else ALL


def _collect(model: torch.nn.Module, samples: list, **kwargs) -> RelevanceResult:
    kwargs.setdefault("components", ALL)
    return collect_relevance(model, samples, progress=False, **kwargs)


def _assert_results_close(a: RelevanceResult, b: RelevanceResult, rtol: float, atol: float) -> None:
    for key in ("neurons", "neurons_abs", "heads", "heads_abs", "explained"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=rtol, atol=atol, msg=key)
    assert a.weights.keys() == b.weights.keys()
    for name in a.weights:
        torch.testing.assert_close(a.weights[name], b.weights[name], rtol=rtol, atol=atol, msg=name)
    for x, y in zip(a.input_relevance, b.input_relevance):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _scale(result: RelevanceResult) -> float:
    return float(result.explained.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_per_sample_sum(family: str, padding_side: str) -> None:
    # sdpa: transformers' eager attention itself turns fully masked pad rows into NaN in float64
    # (left padding; with Gemma's sliding window, right padding too).
    model = _model(family, attn="sdpa")
    collect = functools.partial(_collect, model, components=_components(model), per_sample_abs_weights=True)
    batched = collect(SAMPLES, batch_size=len(SAMPLES), padding_side=padding_side)
    singles = [collect([s]) for s in SAMPLES]
    merged = functools.reduce(RelevanceResult.merge, singles)
    _assert_results_close(batched, merged, rtol=1e-9, atol=1e-12 * _scale(batched))
    for name in batched.weights_abs:
        torch.testing.assert_close(batched.weights_abs[name], merged.weights_abs[name], rtol=1e-9, atol=1e-14)
    # Pads carry no relevance: only real tokens are reported, and they match the unpadded runs.
    assert [len(ids) for ids in batched.input_ids] == [len(ids) for ids in merged.input_ids]
    assert all(torch.equal(a, b) for a, b in zip(batched.input_ids, merged.input_ids))


def _capture_linear_relevance(model: torch.nn.Module, sample: list[int]) -> dict[str, tuple]:
    """Relevance at every prunable layer's input and output, from a manual pass with the rules."""
    arch = resolve(model)
    seen: dict[str, list] = {}
    handles = []
    with LRPRules(model) as rules:
        for p in arch.prunable:

            def hook(module, args, output, name=p.name):
                record = seen.setdefault(name, [args[0], output, None])
                output.register_hook(lambda g: record.__setitem__(2, g))

            handles.append(p.module.register_forward_hook(hook))
        try:
            logits = model(torch.tensor([sample])).logits
            torch.autograd.grad(logits[0, -1].max(), rules.inputs["tokens"])
        finally:
            for handle in handles:
                handle.remove()
    out = {}
    for p in arch.prunable:
        x, z, g = (t.reshape(1, -1, t.shape[-1]) for t in seen[p.name])  # OPT's MLP sees [B*T, D]
        weight = p.weight.detach()
        g_in = g @ (weight.T if p.orientation == "conv1d" else weight)
        bias = getattr(p.module, "bias", None)
        bias_relevance = (bias.detach() * g.sum((0, 1))) if bias is not None else torch.zeros_like(g[0, 0])
        out[p.name] = ((x * g_in).sum((0, 1)), (z * g).sum((0, 1)), bias_relevance)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_relevance_sums_to_neuron_relevance(family: str) -> None:
    """Row/column sums of every prunable layer's weight relevance equal its input/output relevance."""
    model = _model(family)
    sample = SAMPLES[0]
    if resolve(model).spec.moe is not None:
        _moe_weight_neuron_head_consistency(model, sample)
        return
    result = _collect(model, [sample])
    manual = _capture_linear_relevance(model, sample)
    arch = resolve(model)
    scale = _scale(result)
    for p in arch.prunable:
        rel_w = result.weights[p.name]
        in_dim, out_dim = (1, 0) if p.orientation == "conv1d" else (0, 1)
        r_in, r_out, r_bias = manual[p.name]
        torch.testing.assert_close(rel_w.sum(in_dim), r_in, rtol=1e-9, atol=1e-12 * scale, msg=p.name)
        torch.testing.assert_close(rel_w.sum(out_dim) + r_bias, r_out, rtol=1e-9, atol=1e-12 * scale, msg=p.name)
    for layer in arch.layers:
        down = result.weights[f"{arch.spec.decoder_layers}.{layer.index}.{arch.spec.mlp_out}"]
        o_proj = result.weights[f"{arch.spec.decoder_layers}.{layer.index}.{arch.spec.o_proj}"]
        in_dim = 1 if arch.spec.orientation == "conv1d" else 0
        torch.testing.assert_close(down.sum(in_dim), result.neurons[layer.index], rtol=1e-9, atol=1e-12 * scale)
        per_head = o_proj.sum(in_dim).unflatten(0, (arch.num_heads, -1)).sum(-1)
        torch.testing.assert_close(per_head, result.heads[layer.index], rtol=1e-9, atol=1e-12 * scale)


def _moe_weight_neuron_head_consistency(model: torch.nn.Module, sample: list[int]) -> None:
    """A MoE model: weights are refused by name, and ``W * dW/dW`` of the fused expert matrices (autograd,
    with the rules) sums to the expert neurons: over ``H`` for ``down[e]`` (its input neurons), over ``H``
    for each half of ``gate_up[e]`` (gate + up outputs = the neuron under the uniform rule); the o_proj's
    weight relevance sums per head to the heads."""
    arch = resolve(model)
    with pytest.raises(UnsupportedArchitectureError, match="weights granularity"):
        _collect(model, [sample])
    result = _collect(model, [sample], components=("neurons", "heads"))
    downs = [layer.mlp_out.down_proj for layer in arch.layers]
    gate_ups = [layer.mlp_out.gate_up_proj for layer in arch.layers]
    o_projs = [layer.o_proj.weight for layer in arch.layers]
    with LRPRules(model):
        logits = model(torch.tensor([sample])).logits
        grads = torch.autograd.grad(logits[0, -1].max(), [*downs, *gate_ups, *o_projs])
    n = arch.num_layers
    close = dict(rtol=1e-9, atol=1e-12 * _scale(result))
    for layer in range(n):
        neurons = result.neurons[layer]
        assert neurons.abs().max() > 0
        down = (downs[layer].detach() * grads[layer]).sum(1)  # [E, I]
        torch.testing.assert_close(down.flatten(), neurons, **close)
        gate, up = (gate_ups[layer].detach() * grads[n + layer]).sum(-1).chunk(2, dim=-1)  # [E, I] each
        torch.testing.assert_close((gate + up).flatten(), neurons, **close)
        per_head = (o_projs[layer].detach() * grads[2 * n + layer]).sum(0).unflatten(0, (arch.num_heads, -1)).sum(-1)
        torch.testing.assert_close(per_head, result.heads[layer], **close)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_objectives(family: str) -> None:
    model = _model(family)
    with torch.no_grad():
        logits = model(torch.tensor([[2, 3, 4, 7, 8, 9]])).logits[0]
    continuation = _collect(model, [ReferenceSample([2, 3, 4], continuation=[7, 8, 9])])
    torch.testing.assert_close(continuation.explained[0], logits[2, 7] + logits[3, 8] + logits[4, 9])
    argmax = _collect(model, [[2, 3, 4]])
    torch.testing.assert_close(argmax.explained[0], logits[2].max())
    logprob = _collect(model, [ReferenceSample([2, 3, 4], target=7)], objective="logprob")
    torch.testing.assert_close(logprob.explained[0], logits[2, 7] - (logits[2].softmax(-1) * logits[2]).sum())
    # Teacher forcing is the sum of single-token targets over the continuation (the objective is linear).
    parts = [_collect(model, [ReferenceSample([2, 3, 4, 7, 8][: 3 + j], target=t)]) for j, t in enumerate([7, 8, 9])]
    summed = functools.reduce(RelevanceResult.merge, parts)
    for key in ("neurons", "heads"):
        torch.testing.assert_close(getattr(continuation, key), getattr(summed, key), rtol=1e-9, atol=1e-13)
    # A focus explains only those continuation tokens: the sum of their single-token targets.
    focused = _collect(model, [ReferenceSample([2, 3, 4], continuation=[7, 8, 9], focus=[2, 0])])
    torch.testing.assert_close(focused.explained[0], logits[2, 7] + logits[4, 9])
    summed = RelevanceResult.merge(parts[0], parts[2])
    for key in ("neurons", "heads"):
        torch.testing.assert_close(getattr(focused, key), getattr(summed, key), rtol=1e-9, atol=1e-13)
    everything = _collect(model, [ReferenceSample([2, 3, 4], continuation=[7, 8, 9], focus=[0, 1, 2])])
    torch.testing.assert_close(everything.neurons, continuation.neurons, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_agree(family: str) -> None:
    components = _components(_model(family))
    eager = _collect(_model(family), SAMPLES, batch_size=1, components=components)
    sdpa = _collect(_model(family, attn="sdpa"), SAMPLES, batch_size=1, components=components)
    _assert_results_close(eager, sdpa, rtol=1e-5, atol=1e-5 * _scale(eager))


def test_deterministic_and_leaves_model_untouched() -> None:
    model = copy.deepcopy(_model("qwen2", torch.float32))
    model.train()  # no dropout configured: allowed, and the mode must survive
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = _collect(model, SAMPLES, batch_size=2)
    second = _collect(model, SAMPLES, batch_size=2)
    for key in ("neurons", "heads"):
        assert torch.equal(getattr(first, key), getattr(second, key))
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_frozen_and_peft_models() -> None:
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(_model("llama"))
    plain = _collect(base, SAMPLES[:2])
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=True))
    wrapped = _collect(peft_model.eval(), SAMPLES[:2])  # LoRA B = 0: same function, base weights frozen
    torch.testing.assert_close(wrapped.neurons, plain.neurons, rtol=1e-9, atol=1e-13)
    assert wrapped.weights.keys() == plain.weights.keys()
    for name in plain.weights:
        torch.testing.assert_close(wrapped.weights[name], plain.weights[name], rtol=1e-9, atol=1e-13)


def test_save_load_round_trip(tmp_path) -> None:
    result = _collect(_model("opt"), SAMPLES, per_sample_abs_weights=True)
    result.save(tmp_path / "rel")
    loaded = RelevanceResult.load(tmp_path / "rel")
    assert loaded.fingerprint == result.fingerprint and loaded.settings == result.settings
    _assert_results_close(loaded, result, rtol=0, atol=0)
    assert loaded.weights_abs.keys() == result.weights_abs.keys()
    assert [t.tolist() for t in loaded.input_ids] == [t.tolist() for t in result.input_ids]
    assert loaded.top("heads", 3) == result.top("heads", 3)
    assert not list(tmp_path.glob(".rel*")), "no temporary directory may be left behind"
    with pytest.raises(FileNotFoundError, match="relevance"):
        RelevanceResult.load(tmp_path)


def test_seed_is_a_deprecated_name_of_objective() -> None:
    """``seed=`` and ``SeedMode`` still work for one release, with a DeprecationWarning."""
    import hf_lrp_surgery.lrp.collect as collect_module

    model = _model("llama")
    with pytest.warns(DeprecationWarning, match="objective="):
        old = _collect(model, SAMPLES[:1], seed="logprob")
    new = _collect(model, SAMPLES[:1], objective="logprob")
    assert torch.equal(old.neurons, new.neurons) and old.settings == new.settings
    with pytest.warns(DeprecationWarning, match="Objective"):
        assert collect_module.SeedMode is collect_module.Objective
    with pytest.raises(ValueError, match="objective"):
        _collect(model, SAMPLES[:1], objective="logit_diff")


def test_merge_refuses_other_model_or_settings() -> None:
    a = _collect(_model("llama"), SAMPLES[:1])
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(_collect(_model("qwen2"), SAMPLES[:1]))
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(_collect(_model("llama"), SAMPLES[:1], objective="logprob"))


def test_text_samples_and_token_ids_agree() -> None:
    tokenizer = tiny_tokenizer()
    model = _model("llama")
    text = _collect(model, [("the cat sat", "on the mat"), "a red car"], tokenizer=tokenizer)
    ids = [tokenizer("the cat sat")["input_ids"], tokenizer("on the mat", add_special_tokens=False)["input_ids"]]
    tokens = _collect(model, [ReferenceSample(ids[0], ids[1]), tokenizer("a red car")["input_ids"]])
    _assert_results_close(text, tokens, rtol=0, atol=0)
    assert text.input_ids[0].tolist() == ids[0] + ids[1]


def test_bad_input_errors() -> None:
    model = _model("llama")
    tokenizer = tiny_tokenizer()
    with pytest.raises(ReferenceSetError, match="empty"):
        _collect(model, [])
    with pytest.raises(ReferenceSetError, match="nothing to explain"):
        _collect(model, [ReferenceSample([1, 2], continuation=[])])
    with pytest.raises(ReferenceSetError, match="focus indices"):
        _collect(model, [ReferenceSample([1, 2], continuation=[3, 4], focus=[2])])
    with pytest.raises(ReferenceSetError, match="focus needs a continuation"):
        ReferenceSample([1, 2], target=3, focus=[0])
    with pytest.raises(ReferenceSetError, match="exactly one token"):
        _collect(model, [ReferenceSample("the cat", target="red car")], tokenizer=tokenizer)
    with pytest.raises(ReferenceSetError, match="tokenizer"):
        _collect(model, ["the cat"])
    with pytest.raises(ReferenceSetError, match="not a prompt"):
        _collect(model, [3.5])
    with pytest.raises(SequenceTooLongError, match="context"):
        _collect(model, [[1] * (model.config.max_position_embeddings + 1)])
    with pytest.raises(ValueError, match="components"):
        _collect(model, SAMPLES, components=("neurons", "attention"))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteRelevanceError, match="float32 or bfloat16"):
        _collect(broken, SAMPLES[:1])


def test_the_finiteness_check_is_exact() -> None:
    """One sum decides for finite buffers; an overflowing sum of finite values is not refused."""
    from hf_lrp_surgery.lrp.collect import _all_finite

    huge = torch.full((4,), torch.finfo(torch.float32).max)
    assert not torch.isfinite(huge.sum()) and _all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensor = torch.ones(3, 5, dtype=torch.bfloat16)
        tensor[1, 2] = bad
        assert not _all_finite(tensor)
    assert _all_finite(torch.zeros(0))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


@contextlib.contextmanager
def _recorded_routing(model: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The routing weights and top-k experts of every router call of a MoE model, in call order (dense: none)."""
    routing: list[tuple[torch.Tensor, torch.Tensor]] = []
    routers = [layer.router for layer in resolve(model).layers if layer.router is not None]
    handles = [r.register_forward_hook(lambda m, args, out: routing.append((out[1], out[2]))) for r in routers]
    try:
        yield routing
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _replayed_routing(model: torch.nn.Module, routing: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Each router call of ``model`` returns the next recorded routing instead of its own (constants)."""
    replay = iter(routing)

    def hook(module: torch.nn.Module, args: tuple, out: tuple) -> tuple:
        weights, experts = next(replay)
        return out[0], weights.detach().to(out[1].dtype), experts

    routers = [layer.router for layer in resolve(model).layers if layer.router is not None]
    handles = [r.register_forward_hook(hook) for r in routers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    assert next(replay, None) is None, "the replayed pass made fewer router calls than the recorded one"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_ranks_match_fp64(family: str) -> None:
    """bf16 relevance ranks neurons like fp64 does.

    Same bf16-rounded weights in both, so only the arithmetic differs, and teacher-forced targets:
    a max-logit seed could pick a different token when the top two logits are within bf16 noise.
    For the same reason a mixture of experts runs the fp64 pass on the bf16 pass's routing (its top-k
    experts and routing weights, constants of the relevance pass): a near-tie of two router logits
    within bf16 noise sends a token to another expert (the tiny mixtral: 2 of 384 choices).
    """
    rows = torch.randint(4, 60, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    samples = [ReferenceSample(row[:9], continuation=row[9:]) for row in rows]
    low = copy.deepcopy(_model(family, torch.bfloat16))
    exact = copy.deepcopy(low).double()
    with _recorded_routing(low) as routing:
        low_result = _collect(low, samples, components=("neurons", "heads"), batch_size=8)
    with _replayed_routing(exact, routing):
        exact_result = _collect(exact, samples, components=("neurons", "heads"), batch_size=8)
    assert low_result.neurons.dtype == torch.float32
    assert _spearman(exact_result.neurons, low_result.neurons) > 0.99
    assert _spearman(exact_result.neurons_abs, low_result.neurons_abs) > 0.99


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MOE_FAMILIES])
@pytest.mark.parametrize("weight_buffers", ["float32", "model"])
def test_bf16_weight_ranks_match_fp64(family: str, weight_buffers: str) -> None:
    """bf16 weight relevance (bf16 products, buffers in fp32 or bf16) ranks weights like fp64 does."""
    rows = torch.randint(4, 60, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    samples = [ReferenceSample(row[:9], continuation=row[9:]) for row in rows]
    low = copy.deepcopy(_model(family, torch.bfloat16))
    exact = copy.deepcopy(low).double()
    kwargs = {"components": ("weights",), "batch_size": 4, "per_sample_abs_weights": True}
    low_result = _collect(low, samples, weight_buffers=weight_buffers, **kwargs)
    exact_result = _collect(exact, samples, weight_buffers=weight_buffers, **kwargs)
    expected = torch.bfloat16 if weight_buffers == "model" else torch.float32
    assert {w.dtype for w in low_result.weights.values()} == {expected}
    assert {w.dtype for w in exact_result.weights.values()} == {torch.float64}  # "model" is fp64 here
    assert low_result.settings["weight_buffers"] == weight_buffers
    for name, value in exact_result.weights.items():
        assert _spearman(value, low_result.weights[name].double()) > 0.98, name
        assert _spearman(exact_result.weights_abs[name], low_result.weights_abs[name].double()) > 0.98, name
    with pytest.raises(ValueError, match="weight_buffers"):
        _collect(low, samples[:1], components=("weights",), weight_buffers="bfloat16")


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_no_nan_after_zeroing_neurons(family: str) -> None:
    model = copy.deepcopy(_model(family, torch.float16))
    arch = resolve(model)
    with torch.no_grad():
        for layer in arch.layers:  # prune half the neurons: their down-projection columns become 0
            if arch.spec.moe is not None:  # units e * I + i: the first half of the experts, entirely
                layer.mlp_out.down_proj[: arch.num_experts // 2] = 0
                continue
            weight = layer.mlp_out.weight
            if arch.spec.orientation == "conv1d":
                weight[: weight.shape[0] // 2] = 0
            else:
                weight[:, : weight.shape[1] // 2] = 0
    result = _collect(model, SAMPLES, batch_size=len(SAMPLES), components=_components(model))
    assert torch.isfinite(result.neurons).all() and torch.isfinite(result.heads).all()
    half = arch.num_neurons // 2
    assert torch.equal(result.neurons[:, :half], torch.zeros_like(result.neurons[:, :half]))


def test_no_tensor_outlives_the_pass() -> None:
    """Hooks must not form reference cycles through autograd (they would keep every activation alive)."""
    import gc

    model = _model("llama")
    _collect(model, SAMPLES)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))

    before = live_tensors()
    result = _collect(model, SAMPLES, per_sample_abs_weights=True)
    del result
    assert live_tensors() == before


def test_results_are_detached_cpu_tensors() -> None:
    result = _collect(_model("gpt2"), SAMPLES[:2], per_sample_abs_weights=True)
    tensors = [
        result.neurons,
        result.neurons_abs,
        result.heads,
        result.heads_abs,
        result.explained,
        *result.weights.values(),
        *result.weights_abs.values(),
        *result.input_relevance,
    ]
    assert all(not t.requires_grad and t.device.type == "cpu" for t in tensors)
