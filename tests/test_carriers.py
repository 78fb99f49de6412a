"""The carrier registry, the hooks carrier, and the mask geometry every carrier reads.

A toy carrier registered here (bake under another name, counting its calls) must be what
``apply_masks``, ``save_corrected``, ``load_corrected``, ``verify`` and the Hub's file list use.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from tiny_models import MOE_FAMILIES, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_lrp_surgery.carriers import (
    CARRIERS,
    BakeCarrier,
    LoadOptions,
    MaskHooks,
    apply_masks,
    get_carrier,
    load_corrected,
    model_files,
    read_surgery,
    register_carrier,
    unregister_carrier,
    verify,
)
from hf_lrp_surgery.exceptions import MaskVerificationError
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp import resolve
from hf_lrp_surgery.lrp.layout import Layout
from hf_lrp_surgery.masks import Mask, zeroed_entries

PROBE = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 30, 31, 32]])


def _base(family: str, directory: Path) -> PreTrainedModel:
    tiny_model(family, dtype=torch.float32).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def _mask(model: nn.Module, granularity: str, picks: dict[int, list[int]]) -> Mask:
    """A mask pruning ``picks`` (block -> unit indices) of ``granularity`` on ``model``."""
    layout = Layout.of(resolve(model))
    carriers = layout.carriers(granularity)  # type: ignore[arg-type]
    indices = {carriers[block]: torch.tensor(units, dtype=torch.int64) for block, units in picks.items()}
    return Mask(granularity=granularity, fingerprint=fingerprint(model), layout=layout, indices=indices)  # type: ignore[arg-type]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


class ToyCarrier(BakeCarrier):
    """Bake under another name, recording which of its methods ran."""

    name = "toy"
    model_files = ("toy.json",)

    def __init__(self) -> None:
        self.calls: list[str] = []

    def apply(self, model: nn.Module, masks: Sequence[Mask], *, adapter_name: str) -> nn.Module:
        self.calls.append("apply")
        return super().apply(model, masks, adapter_name=adapter_name)

    def verify(self, model: nn.Module, masks: Sequence[Mask]) -> None:
        self.calls.append("verify")
        super().verify(model, masks)

    def save(self, model: nn.Module, directory: Path, *, base_model_name_or_path: str | None) -> None:
        self.calls.append("save")
        super().save(model, directory, base_model_name_or_path=base_model_name_or_path)
        (directory / "toy.json").write_text("{}")

    def load(self, directory: Path, options: LoadOptions) -> nn.Module:
        self.calls.append("load")
        return super().load(directory, options)


@pytest.fixture
def toy() -> Iterator[ToyCarrier]:
    carrier = register_carrier(ToyCarrier())
    try:
        yield carrier  # type: ignore[misc]
    finally:
        unregister_carrier("toy")


# -- registry ---------------------------------------------------------------------------------
def test_builtin_carriers_and_unknown_names() -> None:
    assert list(CARRIERS)[:3] == ["bake", "adapter", "hooks"]
    assert get_carrier("adapter").granularities == {"neurons", "heads"}
    assert not get_carrier("hooks").persistent
    assert {"model.safetensors", "adapter_config.json"} <= set(model_files())
    with pytest.raises(ValueError, match=r"one of \['bake', 'adapter', 'hooks'"):
        get_carrier("lora")
    with pytest.raises(ValueError, match="already registered"):
        register_carrier(BakeCarrier())


def test_a_registered_toy_carrier_is_used_end_to_end(toy: ToyCarrier, tmp_path: Path) -> None:
    """apply_masks, save, load and verify dispatch to the toy; the Hub push replaces its files."""
    from hf_lrp_surgery.hub import _model_files

    model = _base("llama", tmp_path / "base")
    mask = _mask(model, "neurons", {0: [1, 3], 1: [2]})
    corrected = apply_masks(model, mask, "toy")
    assert toy.calls == ["apply", "verify"]
    assert torch.equal(_logits(corrected.model), _logits(apply_masks(model, mask, "bake").model))
    corrected.save(tmp_path / "toy")
    assert (tmp_path / "toy" / "toy.json").is_file() and read_surgery(tmp_path / "toy")[1] == "toy"
    loaded = load_corrected(tmp_path / "toy")
    assert toy.calls == ["apply", "verify", "save", "load", "verify"]
    assert torch.equal(_logits(loaded), _logits(corrected.model))
    verify(loaded, [mask], carrier="toy")
    assert toy.calls[-1] == "verify"
    assert "toy.json" in _model_files()
    unregister_carrier("toy")
    with pytest.raises(ValueError, match="carrier must be one of"):
        load_corrected(tmp_path / "toy")
    register_carrier(toy)


# -- hooks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["neurons", "heads"])
def test_hooks_carrier_equals_bake_in_memory_and_refuses_saving(granularity: str, tmp_path: Path) -> None:
    model = _base("gpt2", tmp_path / "base")
    mask = _mask(model, granularity, {0: [1], 1: [0]})
    hooked = apply_masks(model, mask, "hooks")
    baked = apply_masks(model, mask, "bake")
    torch.testing.assert_close(_logits(hooked.model), _logits(baked.model), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="in memory only"):
        hooked.save(tmp_path / "hooked")
    assert not (tmp_path / "hooked").exists()
    hooks = MaskHooks.of(hooked.model)
    assert hooks is not None
    with hooks.suspended(), pytest.raises(MaskVerificationError, match="no active mask hooks"):
        verify(hooked.model, mask, carrier="hooks")
    hooks.remove()
    assert torch.equal(_logits(hooked.model), _logits(model))
    with pytest.raises(MaskVerificationError):
        hooked.verify()
    with pytest.raises(ValueError, match="does not carry weights"):
        apply_masks(model, _mask(model, "weights", {}), "hooks")


def test_a_temporary_hook_set_leaves_the_installed_one_registered(tmp_path: Path) -> None:
    """An ablation's own MaskHooks (a context manager) must not unregister the carrier's set when removed."""
    model = _base("gpt2", tmp_path / "base")
    mask = _mask(model, "neurons", {0: [1]})
    hooked = apply_masks(model, mask, "hooks")
    installed = MaskHooks.of(hooked.model)
    with MaskHooks(hooked.model) as temporary:
        temporary.add(_mask(model, "neurons", {1: [0]}))
    assert MaskHooks.of(hooked.model) is installed
    hooked.verify()


# -- geometry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zeroed_entries_of_a_neuron_mask(family: str) -> None:
    """Carrier input side first, then the writer rows (and biases) of each MLP input projection."""
    model = tiny_model(family, dtype=torch.float32)
    mask = _mask(model, "neurons", {1: [0, 2]})
    entries = zeroed_entries(mask, resolve(model))
    described = [(e.module.rsplit(".", 2)[-2:], e.parameter, e.carried) for e in entries]
    if family == "llama":
        assert described == [
            (["mlp", "down_proj"], "weight", True),
            (["mlp", "gate_proj"], "weight", False),
            (["mlp", "up_proj"], "weight", False),
        ]
        assert entries[0].index[0] == slice(None) and entries[1].index[0].tolist() == [0, 2]
    else:
        assert described == [
            (["mlp", "c_proj"], "weight", True),
            (["mlp", "c_fc"], "weight", False),
            (["mlp", "c_fc"], "bias", False),
        ]
        assert entries[0].index[0].tolist() == [0, 2] and entries[1].index[0] == slice(None)
    heads = zeroed_entries(_mask(model, "heads", {0: [1]}), resolve(model))
    head_dim = resolve(model).head_dim
    assert len(heads) == 1 and heads[0].carried
    assert heads[0].index[-1].tolist() == list(range(head_dim, 2 * head_dim))


def test_bake_zeroes_both_halves_of_a_fused_gate_up_projection() -> None:
    """phi3's gate_up_proj writes neuron i with rows i (gate) and I + i (up): baking zeroes both, nothing else."""
    model = tiny_model("phi3", dtype=torch.float32)
    arch = resolve(model)
    mask = _mask(model, "neurons", {0: [1, 3]})
    baked = apply_masks(model, mask, "bake").model
    name = f"{arch.spec.decoder_layers}.0.{arch.spec.mlp_in[0]}"
    fused = baked.get_submodule(name).weight
    rows = [1, 3, arch.num_neurons + 1, arch.num_neurons + 3]
    assert fused[rows].eq(0).all()
    untouched = [r for r in range(fused.shape[0]) if r not in rows]
    original = model.get_submodule(name).weight
    assert torch.equal(fused[untouched], original[untouched])


# -- mixture of experts (qwen3_moe, mixtral, olmoe) -------------------------------------------------
def _moe_base(family: str, directory: Path) -> PreTrainedModel:
    """The tiny MoE of ``family``, saved and loaded back on the eager experts loop (the one mask hooks reach into)."""
    tiny_model(family, dtype=torch.float32).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, experts_implementation="eager").eval()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_expert_neurons_bake_equals_hooks_and_loads_with_from_pretrained(family: str, tmp_path: Path) -> None:
    model = _moe_base(family, tmp_path / "base")
    original = _logits(model)
    width = resolve(model).expert_width
    mask = _mask(model, "neurons", {0: [1, width + 3], 1: [3 * width + 2]})
    baked = apply_masks(model, mask, "bake")
    hooked = apply_masks(model, mask, "hooks")
    assert not torch.allclose(_logits(baked.model), original, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(hooked.model), _logits(baked.model), rtol=1e-6, atol=1e-6)
    baked.save(tmp_path / "baked")
    # An ordinary checkpoint: plain from_pretrained (transformers' default experts kernel) reads it.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "baked").eval()
    torch.testing.assert_close(_logits(plain), _logits(baked.model), rtol=1e-5, atol=1e-5)
    verify(plain, [mask], carrier="bake")
    loaded = load_corrected(tmp_path / "baked")
    torch.testing.assert_close(_logits(loaded), _logits(baked.model), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a damaged bake is caught on the carried entries of the fused down parameter
        plain.model.layers[1].mlp.experts.down_proj[3, 0, 2] = 1.0
    with pytest.raises(MaskVerificationError, match="down_proj|experts"):
        verify(plain, [mask], carrier="bake")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_adapter_refuses_expert_neurons_and_carries_heads(family: str, tmp_path: Path) -> None:
    model = _moe_base(family, tmp_path / "base")
    neurons = _mask(model, "neurons", {0: [1]})
    with pytest.raises(ValueError, match=rf"{family}: an expert-neuron mask has no exact IA3 form.*carrier='bake'"):
        apply_masks(model, neurons, "adapter")
    heads = _mask(model, "heads", {0: [1], 1: [0, 3]})
    adapter = apply_masks(model, heads, "adapter")
    baked = apply_masks(model, heads, "bake")
    torch.testing.assert_close(_logits(adapter.model), _logits(baked.model), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_logits(baked.model), _logits(model), rtol=1e-4, atol=1e-4)


# -- soft masks ------------------------------------------------------------------------------------
def _soft(mask: Mask) -> Mask:
    """``mask`` with scales 0, 0.25, 0.5, ... over each module's units (the first pruned, the rest dampened)."""
    return mask.with_scales({n: (torch.arange(i.numel()) * 0.25).clamp(max=0.75) for n, i in mask.indices.items()})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("granularity", ["neurons", "heads"])
def test_soft_hooks_equal_soft_bake_and_verify_their_scales(family: str, granularity: str, tmp_path: Path) -> None:
    model = _base(family, tmp_path / "base")
    mask = _soft(_mask(model, granularity, {0: [1, 2, 3], 1: [0]}))
    hooked = apply_masks(model, mask, "hooks")
    baked = apply_masks(model, mask, "bake")
    hard = apply_masks(model, mask.with_scales(None), "bake")
    torch.testing.assert_close(_logits(hooked.model), _logits(baked.model), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_logits(baked.model), _logits(hard.model), rtol=1e-4, atol=1e-4)
    hooks = MaskHooks.of(hooked.model)
    assert hooks is not None
    name = next(iter(mask.indices))
    scales = hooks.scales(name)
    assert scales is not None
    with torch.no_grad():  # a hook that scales a dampened feature by another factor is caught
        scales[int(mask.indices[name][1]) * (resolve(model).head_dim if granularity == "heads" else 1)] = 0.9
    with pytest.raises(MaskVerificationError, match="other factors"):
        hooked.verify()


def test_zeroed_entries_of_a_soft_neuron_mask_scale_the_reader_and_zero_only_pruned_writers() -> None:
    model = tiny_model("llama", dtype=torch.float32)
    arch = resolve(model)
    mask = _mask(model, "neurons", {1: [0, 2, 5]}).with_scales({"model.layers.1.mlp.down_proj": [0.0, 0.5, 0.0]})
    entries = zeroed_entries(mask, arch)
    carried, *writers = entries
    assert carried.carried and carried.scale is not None and carried.scale.tolist() == [0.0, 0.5, 0.0]
    assert carried.zero is not None and carried.zero.tolist() == [True, False, True]
    assert [w.index[0].tolist() for w in writers] == [[0, 5], [0, 5]] and all(w.scale is None for w in writers)
    param, index = carried.locate(model)
    assert torch.equal(carried.target(param[index]), param[index] * torch.tensor([0.0, 0.5, 0.0]))
    dampened_only = mask.with_scales({"model.layers.1.mlp.down_proj": [0.25, 0.5, 0.75]})
    assert len(zeroed_entries(dampened_only, arch)) == 1  # no writer is touched


def test_soft_weight_masks_bake_scaled_entries_and_the_enforcer_refuses_them() -> None:
    from hf_lrp_surgery.training import MaskEnforcer

    model = tiny_model("llama", dtype=torch.float32)
    layout = Layout.of(resolve(model))
    name = next(iter(layout.weight_modules))
    weights = Mask(
        "weights",
        fingerprint(model),
        layout,
        {name: torch.tensor([0, 7, 9])},
        scales={name: torch.tensor([0.0, 0.5, 0.25])},
    )
    baked = apply_masks(model, weights, "bake").model
    before, after = model.get_submodule(name).weight.flatten(), baked.get_submodule(name).weight.flatten()
    assert torch.equal(after[[0, 7, 9]], before[[0, 7, 9]] * torch.tensor([0.0, 0.5, 0.25]))
    assert torch.equal(after[1:7], before[1:7])
    with pytest.raises(ValueError, match="soft weight mask cannot be enforced"):
        MaskEnforcer(model).add(weights)


def test_the_enforcer_dampens_soft_neurons_and_freezes_only_pruned_ones() -> None:
    from hf_lrp_surgery.training import MaskEnforcer

    model = tiny_model("llama", dtype=torch.float32)
    mask = _soft(_mask(model, "neurons", {0: [1, 3, 5]}))  # scales 0, 0.25, 0.5
    expected = _logits(apply_masks(model, mask, "bake").model)
    trained = copy.deepcopy(model)
    enforcer = MaskEnforcer(trained)
    enforcer.add(mask)
    torch.testing.assert_close(_logits(trained), expected, rtol=1e-6, atol=1e-6)
    loss = trained(input_ids=PROBE).logits.square().mean()
    loss.backward()
    down = trained.model.layers[0].mlp.down_proj.weight.grad
    assert down is not None and not down[:, 1].any() and down[:, 3].any() and down[:, 5].any()
    assert enforcer.masks["neurons"].soft


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_soft_expert_neurons_bake_equals_hooks(family: str, tmp_path: Path) -> None:
    """down[e, :, i] scaled by alpha (gate_up rows zeroed for alpha == 0 only) == the hooks' scaled product."""
    model = _moe_base(family, tmp_path / "base")
    width = resolve(model).expert_width
    name = Layout.of(resolve(model)).neuron_modules[0]
    mask = _mask(model, "neurons", {0: [1, width + 3, 2 * width]}).with_scales({name: [0.0, 0.5, 0.25]})
    baked = apply_masks(model, mask, "bake")
    hooked = apply_masks(model, mask, "hooks")
    torch.testing.assert_close(_logits(hooked.model), _logits(baked.model), rtol=1e-6, atol=1e-6)
    experts = baked.model.model.layers[0].mlp.experts
    original = model.model.layers[0].mlp.experts
    assert torch.equal(experts.down_proj[1, :, 3], original.down_proj[1, :, 3] * 0.5)
    assert not experts.gate_up_proj[0, 1].any() and torch.equal(experts.gate_up_proj[1, 3], original.gate_up_proj[1, 3])
    baked.save(tmp_path / "baked")
    loaded = load_corrected(tmp_path / "baked")
    assert read_surgery(tmp_path / "baked")[0][0].soft
    torch.testing.assert_close(_logits(loaded), _logits(baked.model), rtol=1e-5, atol=1e-5)
