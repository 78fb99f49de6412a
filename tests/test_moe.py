"""Mixture of experts (qwen3_moe, mixtral, olmoe): the router rule, the expert-neuron units, the taps, and the
refusals.

The identity suite of tests/test_attach.py and tests/test_collect.py runs on the tiny MoE models of
``FAMILIES``; this module checks what is specific to a MoE block, on each MoE family.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import EXPERT_WIDTH, EXPERTS, MOE_FAMILIES, TOP_K, model_from_config, tiny_config, tiny_model
from torch import nn

from hf_lrp_surgery.carriers import MaskHooks, apply_masks
from hf_lrp_surgery.exceptions import TrainingModeError, UnsupportedArchitectureError
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp import LRPRules, collect_relevance, resolve
from hf_lrp_surgery.lrp.layout import Layout
from hf_lrp_surgery.lrp.moe import add_product_tap, expert_units
from hf_lrp_surgery.masks import Mask, zeroed_entries

pytestmark = pytest.mark.usefixtures("single_thread")
SAMPLE = [1, 5, 7, 9, 11, 3, 8, 4]
#: The router class of each MoE family (the registry entry names it; any other class is refused).
ROUTERS = {"qwen3_moe": "Qwen3MoeTopKRouter", "mixtral": "MixtralTopKRouter", "olmoe": "OlmoeTopKRouter"}
#: Whether the family's tiny router renormalises its top-k weights to sum 1 (Mixtral always; OLMoE not, as
#: released): the router rule must hold either way.
RENORMALISED = {"qwen3_moe": True, "mixtral": True, "olmoe": False}


def _neuron_mask(model: nn.Module, picks: dict[int, list[int]]) -> Mask:
    layout = Layout.of(resolve(model))
    indices = {layout.neuron_modules[b]: torch.tensor(units, dtype=torch.int64) for b, units in picks.items()}
    return Mask(granularity="neurons", fingerprint=fingerprint(model), layout=layout, indices=indices)


def _explained(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits[:, -1].max(-1).values.sum()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_resolve_and_layout(family: str) -> None:
    arch = resolve(tiny_model(family))
    assert (arch.num_experts, arch.expert_width, arch.num_neurons) == (EXPERTS, EXPERT_WIDTH, EXPERTS * EXPERT_WIDTH)
    layout = Layout.of(arch)
    assert layout.neuron_modules == ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
    assert layout.head_modules[0] == "model.layers.0.self_attn.o_proj"
    assert all(type(layer.router).__name__ == ROUTERS[family] for layer in arch.layers)
    assert [p.role for p in arch.prunable[:4]] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] + [
        "self_attn.o_proj"
    ]
    experts, neurons = expert_units(
        torch.tensor([0, EXPERT_WIDTH - 1, EXPERT_WIDTH, 3 * EXPERT_WIDTH + 5]), EXPERT_WIDTH
    )
    assert experts.tolist() == [0, 0, 1, 3] and neurons.tolist() == [0, EXPERT_WIDTH - 1, 0, 5]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_neuron_relevance_is_input_times_gradient_at_its_expert(family: str) -> None:
    """Unit e * I + i = x * grad at expert e's down input, summed over the tokens routed to e (explicit taps)."""
    model = tiny_model(family)
    arch = resolve(model)
    result = collect_relevance(model, [SAMPLE], components=("neurons",), progress=False)
    seen: dict[tuple[int, int], list] = {}
    with LRPRules(model) as rules:
        handles = []
        for layer in arch.layers:

            def tap(expert, tokens, x, layer=layer.index):
                seen[(layer, expert)] = [x, tokens, None]
                x.register_hook(lambda g: seen[(layer, expert)].__setitem__(2, g))

            # prepended: the gradient before the rules' 1/2 on the product (what enters the down matrix)
            handles.append(add_product_tap(arch.layers[layer.index].mlp_out, tap, model_type=family, prepend=True))
        try:
            torch.autograd.grad(_explained(model, torch.tensor([SAMPLE])), rules.inputs["tokens"])
        finally:
            for handle in handles:
                handle.remove()
    expected = torch.zeros(arch.num_layers, arch.num_neurons, dtype=torch.float64)
    routed = torch.zeros(arch.num_layers, EXPERTS, dtype=torch.long)
    for (layer, expert), (x, tokens, grad) in seen.items():
        expected[layer, expert * EXPERT_WIDTH : (expert + 1) * EXPERT_WIDTH] = (x.detach() * grad).sum(0)
        routed[layer, expert] = len(tokens)
    torch.testing.assert_close(result.neurons, expected, rtol=1e-12, atol=0)
    # Top-2 of 4: every token reaches two experts, and the tiny model spreads them.
    assert routed.sum(1).tolist() == [2 * len(SAMPLE)] * arch.num_layers
    assert (routed > 0).sum() > arch.num_layers


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_rule_routing_weights_are_constants(family: str, ids) -> None:
    """The router gets no relevance; and the rule is what makes CP conserve (without it the routing leaks).

    Whether the routing weights are renormalised to sum 1 does not matter: they are constants either way.
    """
    model = tiny_model(family)
    routers = [layer.mlp.gate.weight for layer in model.model.layers]
    scores = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: scores.append(out[1]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    assert scores[0].shape == (ids.numel(), TOP_K)
    sums = scores[0].double().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=1e-6) == RENORMALISED[family]
    for variant in ("attnlrp", "cp"):
        with LRPRules(model, variant=variant):
            grads = torch.autograd.grad(_explained(model, ids), routers, allow_unused=True)
        assert all(g is None for g in grads), variant
    plain = torch.autograd.grad(_explained(model, ids), routers)
    assert all(g.abs().max() > 0 for g in plain)  # the routing weights do depend on the input

    with LRPRules(model, variant="cp") as rules:
        explained = _explained(model, ids)
        (grad,) = torch.autograd.grad(explained, rules.inputs["tokens"])
        torch.testing.assert_close(
            (rules.inputs["tokens"].detach() * grad).sum(), explained.detach(), rtol=1e-9, atol=0
        )
        for layer in model.model.layers:  # take the router rule off: the routing weights get gradient
            layer.mlp.gate.__dict__.pop("forward")
        explained = _explained(model, ids)
        (grad,) = torch.autograd.grad(explained, rules.inputs["tokens"])
        leaked = (rules.inputs["tokens"].detach() * grad).sum()
    assert not torch.allclose(leaked, explained.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_taps_come_off_with_the_last_handle(family: str, ids) -> None:
    model = tiny_model(family)
    experts = model.model.layers[0].mlp.experts
    reference = model(ids).logits
    calls = []
    first = add_product_tap(experts, lambda e, t, x: calls.append(e), model_type=family)
    second = add_product_tap(experts, lambda e, t, x: None, model_type=family)
    assert torch.equal(model(ids).logits, reference)  # the copy of the eager loop is bit-identical
    assert calls and calls == sorted(calls)
    first.remove()
    first.remove()  # idempotent
    assert "forward" in experts.__dict__
    second.remove()
    assert "forward" not in experts.__dict__
    with LRPRules(model, epsilon=0.1):
        assert "forward" in experts.__dict__
    assert "forward" not in experts.__dict__ and "forward" not in model.model.layers[0].mlp.gate.__dict__


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_other_experts_implementations_are_refused_by_name(family: str) -> None:
    config = tiny_config(family)
    config._experts_implementation = "grouped_mm"
    model = model_from_config(config, dtype=torch.float32)  # grouped_mm has no float64 kernel
    assert model.config._experts_implementation == "grouped_mm"
    with pytest.raises(UnsupportedArchitectureError, match=r"'grouped_mm'.*experts_implementation='eager'"):
        LRPRules(model)
    mask = _neuron_mask(model, {0: [1]})
    with pytest.raises(UnsupportedArchitectureError, match="grouped_mm"):
        MaskHooks(model).add(mask)
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__
    baked = apply_masks(model, mask, "bake").model  # baking does not run the loop: any implementation
    assert baked.model.layers[0].mlp.experts.down_proj[0, :, 1].eq(0).all()
    model.set_experts_implementation("eager")
    with LRPRules(model):
        pass


def test_dense_blocks_are_refused_by_name() -> None:
    config = tiny_config("qwen3_moe")
    config.mlp_only_layers = [1]
    with pytest.raises(UnsupportedArchitectureError, match="Qwen3MoeMLP"):
        resolve(model_from_config(config))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_shared_experts_and_other_routers_are_refused_by_name(family: str) -> None:
    model = tiny_model(family)
    model.model.layers[0].mlp.shared_expert = nn.Linear(4, 4)
    with pytest.raises(UnsupportedArchitectureError, match="shared_expert"):
        resolve(model)
    model = tiny_model(family)
    other = next(f for f in MOE_FAMILIES if f != family)  # another family's router, same interface
    model.model.layers[1].mlp.gate = tiny_model(other).model.layers[1].mlp.gate
    with pytest.raises(UnsupportedArchitectureError, match=f"block 1 has a {ROUTERS[other]}"):
        resolve(model)


def test_mixtral_router_jitter_is_inactive_in_eval_and_refused_in_training(ids) -> None:
    """Mixtral's router jitter multiplies the MoE input by noise in training mode only (never in eval)."""
    config = tiny_config("mixtral")
    config.router_jitter_noise = 0.5
    model, reference = model_from_config(config), tiny_model("mixtral")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # eval: the jitter does not run
    with LRPRules(model, variant="cp") as rules:  # and the relevance is the model's (CP conserves exactly)
        explained = _explained(model, ids)
        (grad,) = torch.autograd.grad(explained, rules.inputs["tokens"])
        torch.testing.assert_close(
            (rules.inputs["tokens"].detach() * grad).sum(), explained.detach(), rtol=1e-9, atol=0
        )
    model.train()
    with pytest.raises(TrainingModeError, match=r"router_jitter_noise=0\.5.*eval"):
        LRPRules(model).attach()
    assert all("forward" not in m.__dict__ for m in model.modules())
    config.router_jitter_noise = 0.0
    with LRPRules(model_from_config(config).train()):  # no jitter configured: training mode is deterministic
        pass


def test_olmoe_clip_qkv_is_refused_by_name() -> None:
    config = tiny_config("olmoe")
    config.clip_qkv = 8.0
    with pytest.raises(UnsupportedArchitectureError, match=r"'olmoe' with clip_qkv=8\.0: the clamp of the q/k/v"):
        LRPRules(model_from_config(config))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_weights_granularity_is_refused_by_name(family: str) -> None:
    model = tiny_model(family)
    arch = resolve(model)
    with pytest.raises(UnsupportedArchitectureError, match=f"{family}: the weights granularity"):
        collect_relevance(model, [SAMPLE], components=("weights",), progress=False)
    with pytest.raises(UnsupportedArchitectureError, match="weights granularity"):
        arch.check_granularity("weights")
    layout = Layout.of(arch)
    name = next(iter(layout.weight_modules))
    weight_mask = Mask(
        granularity="weights",
        fingerprint=fingerprint(model),
        layout=layout,
        indices={name: torch.tensor([0])},
    )
    with pytest.raises(UnsupportedArchitectureError, match="weights granularity"):
        zeroed_entries(weight_mask, arch)
    with pytest.raises(UnsupportedArchitectureError, match="zeroed_entries"):
        arch.neuron_writers(0, torch.tensor([1]))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_zeroed_entries_and_bake_of_expert_neurons(family: str, ids) -> None:
    """Unit e * I + i: down[e, :, i] (carried) and gate_up rows i and I + i of expert e; nothing else."""
    model = tiny_model(family, dtype=torch.float32)
    arch = resolve(model)
    units = [1, EXPERT_WIDTH + 3, 3 * EXPERT_WIDTH + EXPERT_WIDTH - 1]  # (0, 1), (1, 3), (3, I - 1)
    mask = _neuron_mask(model, {1: units})
    entries = zeroed_entries(mask, arch)
    assert [(e.module, e.parameter, e.carried) for e in entries] == [
        ("model.layers.1.mlp.experts", "down_proj", True),
        ("model.layers.1.mlp.experts", "gate_up_proj", False),
    ]
    assert entries[0].index[0].tolist() == [0, 1, 3] and entries[0].index[1] == slice(None)
    assert entries[0].index[2].tolist() == [1, 3, EXPERT_WIDTH - 1]
    assert entries[1].index[0].tolist() == [0, 1, 3, 0, 1, 3]
    assert entries[1].index[1].tolist() == [
        1,
        3,
        EXPERT_WIDTH - 1,
        EXPERT_WIDTH + 1,
        EXPERT_WIDTH + 3,
        2 * EXPERT_WIDTH - 1,
    ]

    baked = apply_masks(model, mask, "bake").model
    experts, original = baked.model.layers[1].mlp.experts, model.model.layers[1].mlp.experts
    zero_down = torch.zeros_like(experts.down_proj, dtype=torch.bool)
    zero_down[[0, 1, 3], :, [1, 3, EXPERT_WIDTH - 1]] = True
    assert experts.down_proj[zero_down].eq(0).all()
    assert torch.equal(experts.down_proj[~zero_down], original.down_proj[~zero_down])
    zero_gate_up = torch.zeros_like(experts.gate_up_proj, dtype=torch.bool)
    zero_gate_up[entries[1].index] = True
    assert int(zero_gate_up.sum()) == 6 * arch.embedding_weight.shape[1]  # six rows of H entries
    assert experts.gate_up_proj[zero_gate_up].eq(0).all()
    assert torch.equal(experts.gate_up_proj[~zero_gate_up], original.gate_up_proj[~zero_gate_up])
    assert torch.equal(baked.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj)
    # The baked neurons are silent: their expert's gated product is exactly 0 there, the others are not.
    seen = {}
    handle = add_product_tap(experts, lambda e, t, x: seen.__setitem__(e, x.detach()), model_type=family)
    try:
        with torch.no_grad():
            baked(ids)
    finally:
        handle.remove()
    for expert, neuron in [(0, 1), (1, 3), (3, EXPERT_WIDTH - 1)]:
        if expert in seen:
            assert seen[expert][:, neuron].eq(0).all()
    assert any(seen[e].ne(0).any() for e in seen)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_neuron_mask_hooks_equal_bake_and_relevance_sees_them(family: str, ids) -> None:
    model = tiny_model(family, dtype=torch.float32)
    mask = _neuron_mask(model, {0: [0, 5, 2 * EXPERT_WIDTH + 1], 1: list(range(EXPERT_WIDTH))})
    baked = apply_masks(model, mask, "bake").model
    hooked = apply_masks(copy.deepcopy(model), mask, "hooks").model
    with torch.no_grad():
        reference, pruned = hooked(ids).logits, baked(ids).logits
        assert not torch.allclose(reference, model(ids).logits)
    torch.testing.assert_close(reference, pruned, rtol=1e-6, atol=1e-6)
    result = collect_relevance(hooked, [SAMPLE], components=("neurons",), progress=False)
    assert result.neurons[1, :EXPERT_WIDTH].eq(0).all() and result.neurons[0, [0, 5, 2 * EXPERT_WIDTH + 1]].eq(0).all()
    hooks = MaskHooks.of(hooked)
    assert hooks is not None
    with hooks.suspended(), torch.no_grad():
        assert torch.equal(hooked(ids).logits, model(ids).logits)
    hooks.remove()
    assert "forward" not in hooked.model.layers[0].mlp.experts.__dict__


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["activation", "wanda", "magnitude"])
def test_a_scorer_that_cannot_read_expert_neurons_is_refused_before_any_pass(method: str, family: str) -> None:
    from hf_lrp_surgery.scoring import score

    model = tiny_model(family)
    with pytest.raises(UnsupportedArchitectureError, match=f"the {method} method does not score the expert neurons"):
        score(model, [[1, 2, 3, 4]], method=method, components=("neurons",), progress=False)
    # Heads are read as in a dense model.
    assert score(model, [[1, 2, 3, 4]], method=method, components=("heads",), progress=False).heads is not None


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_random_and_relevance_scores_cover_every_expert_neuron(family: str) -> None:
    from hf_lrp_surgery.scoring import score

    model = tiny_model(family)
    arch = resolve(model)
    for method in ("random", "gradient"):
        scores = score(model, [[1, 2, 3, 4]], method=method, components=("neurons",), progress=False)
        assert scores.neurons.shape == (arch.num_layers, arch.num_experts * arch.expert_width)
