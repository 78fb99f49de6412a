"""The carrier registry, the hooks carrier, and the mask geometry every carrier reads.

A toy carrier registered here (bake under another name, counting its calls) must be what
``apply_masks``, ``save_corrected``, ``load_corrected``, ``verify`` and the Hub's file list use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
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
