"""Family-specific layouts of the registry (issue 19): fused projections, soft-capping, eager-only families.

The identity suite of tests/test_attach.py and tests/test_collect.py runs on every family; this module
adds what one family needs beyond it: the collector identities of the eager-only families (whose
sdpa-based tests cannot run), that the fused layouts match how transformers splits them, and the
refusals of what the engine cannot explain.
"""

from __future__ import annotations

import copy
import functools

import pytest
import test_collect
import torch
from tiny_models import EAGER_ONLY_FAMILIES, model_from_config, tiny_config, tiny_model

from hf_lrp_surgery.exceptions import UnsupportedArchitectureError
from hf_lrp_surgery.lrp import LRPRules, RelevanceResult, collect_relevance, resolve

pytestmark = pytest.mark.usefixtures("single_thread")


# -- collector identities of the eager-only families -------------------------------------------------


@pytest.mark.parametrize("family", EAGER_ONLY_FAMILIES)
def test_eager_only_weight_neuron_head_consistency(family: str) -> None:
    test_collect.test_weight_relevance_sums_to_neuron_relevance(family)


@pytest.mark.parametrize("family", EAGER_ONLY_FAMILIES)
def test_eager_only_bf16_ranks_match_fp64(family: str) -> None:
    test_collect.test_bf16_ranks_match_fp64(family)


@pytest.mark.parametrize("family", EAGER_ONLY_FAMILIES)
def test_eager_only_fp16_no_nan_after_zeroing_neurons(family: str) -> None:
    test_collect.test_fp16_no_nan_after_zeroing_neurons(family)


@pytest.mark.parametrize("family", EAGER_ONLY_FAMILIES)
@pytest.mark.parametrize("padding_side,dtype", [("right", torch.float64), ("left", torch.float32)])
def test_eager_only_batch_equals_per_sample_sum(family: str, padding_side: str, dtype: torch.dtype) -> None:
    """Batched relevance is the sum of per-sample relevance, with pads on either side.

    Left padding in float32: transformers' eager attention turns a fully masked (left-)pad query row
    into NaN in float64 (its fp32 softmax sees -inf), not in float32. Right padding with the sliding
    window leaves such rows too where a sample has more pads than the window, so the samples here are
    at most 3 shorter than the longest.
    """
    samples = [[1, 5, 7, 9, 11, 3], [3, 4, 8, 6], [2, 3, 4, 7, 8], [9, 9, 9, 10, 12, 13]]
    model = tiny_model(family, dtype=dtype)
    collect = functools.partial(collect_relevance, model, components=test_collect.ALL, progress=False)
    batched = collect(samples, batch_size=len(samples), padding_side=padding_side)
    merged = functools.reduce(RelevanceResult.merge, [collect([s]) for s in samples])
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    scale = float(batched.explained.abs().max())
    test_collect._assert_results_close(batched, merged, rtol=rtol, atol=rtol * 1e-3 * scale)


# -- fused layouts -----------------------------------------------------------------------------------


def _split_by_transformers(family: str, qkv: torch.Tensor, arch) -> tuple[torch.Tensor, ...]:
    """q, k, v as transformers' attention forward slices them from the fused output (its own code path)."""
    if family == "gpt_neox":  # GPTNeoXAttention: view(..., -1, 3 * head_dim).chunk(3, dim=-1)
        return qkv.view(*qkv.shape[:-1], -1, 3 * arch.head_dim).chunk(3, dim=-1)
    q, kv, _ = arch.qkv_split()  # Phi3Attention / GPT-2: [q | k | v]
    return qkv[..., :q], qkv[..., q : q + kv], qkv[..., q + kv :]


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gpt_neox"])
def test_qkv_roles_follow_the_fused_layout(family: str) -> None:
    arch = resolve(tiny_model(family))
    roles = arch.qkv_roles()
    width = sum(arch.qkv_split())
    assert roles.shape == (width,)
    marker = torch.arange(width, dtype=torch.float64)
    for role, part in enumerate(_split_by_transformers(family, marker, arch)):
        assert torch.equal(part.flatten().long(), torch.nonzero(roles == role).flatten())


def test_phi3_neuron_writers_are_the_gate_and_up_rows() -> None:
    """Zeroing the writer rows of a neuron (and nothing else) silences it: its down_proj input is 0."""
    model = copy.deepcopy(tiny_model("phi3"))
    arch = resolve(model)
    neurons = torch.tensor([0, 5, arch.num_neurons - 1])
    writers = arch.neuron_writers(1, neurons)
    assert [name for name, _ in writers] == ["model.layers.1.mlp.gate_up_proj"]
    assert writers[0][1].tolist() == [0, 5, arch.num_neurons - 1, arch.num_neurons, arch.num_neurons + 5, 95]
    with torch.no_grad():
        for name, rows in writers:
            model.get_submodule(name).weight[rows] = 0
    seen = {}
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        model(torch.tensor([[1, 5, 7, 9, 11, 3]]))
    finally:
        handle.remove()
    hidden = seen["x"]
    assert torch.equal(hidden[..., neurons], torch.zeros_like(hidden[..., neurons]))
    others = torch.ones(arch.num_neurons, dtype=torch.bool)
    others[neurons] = False
    assert (hidden[..., others] != 0).all()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_neuron_writers_of_unfused_mlps(family: str) -> None:
    arch = resolve(tiny_model(family))
    neurons = torch.tensor([2, 7])
    writers = arch.neuron_writers(0, neurons)
    assert [name for name, _ in writers] == [f"{arch.spec.decoder_layers}.0.{role}" for role in arch.spec.mlp_in]
    assert all(torch.equal(rows, neurons) for _, rows in writers)


# -- soft-capping and refusals ---------------------------------------------------------------------


def test_gemma2_softcapping_is_explained_and_matters(ids) -> None:
    """Both soft-cappings are on in the tiny Gemma 2, and the tanh rule is what makes CP conserve."""
    model = tiny_model("gemma2")
    assert resolve(model).softcaps == ("attn_logit_softcapping", "final_logit_softcapping")
    with torch.no_grad():
        capped = model(ids).logits
    assert capped.abs().max() < model.config.final_logit_softcapping
    uncapped = copy.deepcopy(model)
    uncapped.config.final_logit_softcapping = None
    uncapped.config.attn_logit_softcapping = None
    with torch.no_grad():
        assert not torch.allclose(uncapped(ids).logits, capped, rtol=1e-2)
    # CP conserves only with the final cap's tanh rule (the attention cap: tests/test_attach.py bookkeeping).
    with LRPRules(model, variant="cp") as rules:
        explained = model(ids).logits[:, -1].max(-1).values.sum()
        tokens = rules.inputs["tokens"]
        (grad,) = torch.autograd.grad(explained, tokens)
    torch.testing.assert_close((tokens.detach() * grad).sum(), explained.detach(), rtol=1e-9, atol=0)
    with LRPRules(model, variant="gradient") as rules:  # no rules: the plain gradient of the capped model
        explained = model(ids).logits[:, -1].max(-1).values.sum()
        (rule_free,) = torch.autograd.grad(explained, rules.inputs["tokens"])
    embedded = model.model.embed_tokens(ids).detach().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(inputs_embeds=embedded).logits[:, -1].max(-1).values.sum(), embedded)
    torch.testing.assert_close(rule_free, plain, rtol=1e-12, atol=0)


def test_gemma2_attention_softcapping_needs_eager() -> None:
    model = tiny_model("gemma2")
    model.config._attn_implementation = "sdpa"
    with pytest.raises(UnsupportedArchitectureError, match="attn_logit_softcapping.*eager"):
        LRPRules(model)
    config = tiny_config("gemma2")
    config.attn_logit_softcapping = None  # final-logit capping alone is explained on any kernel
    model = model_from_config(config)
    model.config._attn_implementation = "sdpa"  # transformers builds Gemma 2 on eager only
    assert resolve(model).softcaps == ("final_logit_softcapping",)


def test_tanh_rule_is_scoped_to_the_attached_model(ids) -> None:
    """Outside the attached model's forward, tanh is plain autograd (the mode is on no stack)."""
    model = tiny_model("gemma2")
    x = torch.linspace(-3, 3, 7, dtype=torch.float64, requires_grad=True)
    with LRPRules(model):
        model(ids)
        (grad,) = torch.autograd.grad(torch.tanh(x).sum(), x)
    torch.testing.assert_close(grad, 1 - torch.tanh(x.detach()) ** 2)
    assert "forward" not in model.__dict__
