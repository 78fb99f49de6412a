"""Mask carriers: the IA3 adapter is exactly the baked model, in memory and after both loading paths.

Every family's tiny model (fp32) gets a neuron and a head mask. The adapter's logits must equal the
baked model's (max |delta| <= 1e-5), switching the adapter off must give the original logits
bit for bit, and both survive ``save_pretrained`` -> ``PeftModel.from_pretrained`` and
``AutoModelForCausalLM.from_pretrained(adapter_dir)``. Verification must catch a dropped, disabled or
tampered adapter, a baked model with the mask missing, and another model's mask.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from tiny_models import EXTRA_FAMILIES, FAMILIES, MOE_FAMILIES, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_lrp_surgery.carriers import (
    CorrectedModel,
    apply_masks,
    bake,
    load_corrected,
    read_surgery,
    set_adapter_enabled,
    to_adapter,
    verify,
)
from hf_lrp_surgery.exceptions import FingerprintMismatchError, MaskVerificationError
from hf_lrp_surgery.masks import Mask, select
from hf_lrp_surgery.scoring import score

SAMPLES = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12], [1, 20, 21, 22, 23]]
PROBE = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 30, 31, 32]])
TOLERANCE = 1e-5


def _load_kwargs(family: str) -> dict[str, Any]:
    """``from_pretrained`` keywords: mixture-of-experts models run the eager expert loop (what relevance reads).

    Their neurons are expert neurons, whose masks have no IA3 form (refused, see test_carriers).
    """
    return {"experts_implementation": "eager"} if family in MOE_FAMILIES else {}


def _base(family: str, directory: Path, *, seed: int = 0) -> PreTrainedModel:
    """A tiny fp32 model saved to and reloaded from ``directory`` (so it knows where it loads from)."""
    tiny_model(family, dtype=torch.float32, seed=seed).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, **_load_kwargs(family)).eval()


def _masks(model: PreTrainedModel, *, neurons: bool = True, dampen: str | None = None) -> list[Mask]:
    """A neuron mask of 10 (unless ``neurons`` is false) and a head mask of 2, selected on relevance.

    With ``dampen`` the masks are soft (e.g. ``"relevance"``: the lowest unit pruned, the others dampened).
    """
    scores = score(model, SAMPLES, components=("neurons", "heads") if neurons else ("heads",), progress=False)
    picked = ([select(scores, "neurons", 10, dampen=dampen)] if neurons else []) + [
        select(scores, "heads", 2, dampen=dampen)
    ]
    if dampen is not None:  # the proofs below mean something only if some unit is dampened, not pruned
        assert all(m.soft and m.dampened > 0 for m in picked)
    return picked


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.fixture(params=FAMILIES + EXTRA_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("dampen", [None, "relevance"], ids=["hard", "soft"])
def test_adapter_equals_baked_in_memory_and_after_both_loading_paths(
    family: str, dampen: str | None, tmp_path: Path
) -> None:
    """Adapter == baked (<= 1e-5) in memory, after PeftModel and after AutoModel loading; off == original.

    Hard and soft masks alike (a soft mask's dampened unit: its scale in the IA3 vector, its scaled column
    in the baked weights). Mixture-of-experts families carry head masks only (expert neurons have no IA3 form).
    """
    model = _base(family, tmp_path / "base")
    load = _load_kwargs(family)
    original = _logits(model)
    masks = _masks(model, neurons=family not in MOE_FAMILIES, dampen=dampen)
    baked = apply_masks(model, masks, "bake")
    adapter = apply_masks(model, masks, "adapter")
    assert torch.equal(_logits(model), original), "apply_masks must not touch the model it was given"
    expected = _logits(baked.model)
    assert (expected - original).abs().max() > 1e-3, "the masks must change the output for the test to mean anything"
    assert (_logits(adapter.model) - expected).abs().max() <= TOLERANCE
    with adapter.model.disable_adapter():
        assert torch.equal(_logits(adapter.model), original)

    baked.save(tmp_path / "baked")
    adapter.save(tmp_path / "adapter")
    reloaded_baked = AutoModelForCausalLM.from_pretrained(tmp_path / "baked", **load).eval()
    assert torch.equal(_logits(reloaded_baked), expected)
    verify(reloaded_baked, masks, carrier="bake", probe=baked.probe)

    # Path (a): stock PeftModel on a fresh base.
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base", **load).eval()
    via_peft = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert (_logits(via_peft) - expected).abs().max() <= TOLERANCE
    verify(via_peft, masks, carrier="adapter", probe=adapter.probe)
    with via_peft.disable_adapter():
        assert torch.equal(_logits(via_peft), original)

    # Path (b): stock transformers on the adapter directory.
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", **load).eval()
    assert (_logits(via_transformers) - expected).abs().max() <= TOLERANCE
    verify(via_transformers, masks, carrier="adapter", probe=adapter.probe)
    # transformers' own disable_adapters() needs peft >= 0.22; the library's switch works on both forms.
    set_adapter_enabled(via_transformers, False)
    assert torch.equal(_logits(via_transformers), original)
    set_adapter_enabled(via_transformers, True)
    assert (_logits(via_transformers) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("dampen", [None, "relevance"], ids=["hard", "soft"])
@pytest.mark.parametrize("via", ["peft", "transformers"])
def test_load_corrected_verifies_and_switches_off(via: str, dampen: str | None, tmp_path: Path) -> None:
    model = _base("llama", tmp_path / "base")
    original = _logits(model)
    adapter = apply_masks(model, _masks(model, dampen=dampen), "adapter")
    adapter.save(tmp_path / "adapter")
    loaded = load_corrected(tmp_path / "adapter", via=via)
    assert (_logits(loaded) - _logits(adapter.model)).abs().max() <= TOLERANCE
    off = load_corrected(tmp_path / "adapter", via=via, adapter_enabled=False)
    assert torch.equal(_logits(off), original)
    masks, carrier, _, base = read_surgery(tmp_path / "adapter")
    assert carrier == "adapter" and base == str(tmp_path / "base")
    assert [m.indices.keys() for m in masks] == [m.indices.keys() for m in adapter.masks]
    assert [m.soft for m in masks] == [dampen is not None] * 2
    baked = apply_masks(model, adapter.masks, "bake")
    baked.save(tmp_path / "baked")
    assert (_logits(load_corrected(tmp_path / "baked")) - _logits(adapter.model)).abs().max() <= TOLERANCE


def test_soft_masks_with_all_scales_zero_are_the_hard_masks(tmp_path: Path) -> None:
    """alpha -> 0 everywhere: the soft adapter and bake give exactly the hard masks' logits."""
    model = _base("llama", tmp_path / "base")
    hard = _masks(model)
    zero = [m.with_scales({n: torch.zeros(i.numel()) for n, i in m.indices.items()}) for m in hard]
    for carrier in ("bake", "adapter", "hooks"):
        assert torch.equal(
            _logits(apply_masks(model, zero, carrier).model), _logits(apply_masks(model, hard, carrier).model)
        )
    small = [m.with_scales({n: torch.full((i.numel(),), 1e-7) for n, i in m.indices.items()}) for m in hard]
    assert (
        _logits(apply_masks(model, small, "bake").model) - _logits(apply_masks(model, hard, "bake").model)
    ).abs().max() <= 1e-5


def test_verification_catches_a_tampered_soft_adapter_and_a_wrong_baked_scale(tmp_path: Path) -> None:
    """An IA3 value that is not the mask's scale is caught; so is a baked pruned unit left non-zero."""
    model = _base("llama", tmp_path / "base")
    masks = _masks(model, dampen="relevance")
    adapter = apply_masks(model, masks, "adapter")
    adapter.save(tmp_path / "adapter")
    tampered = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    neurons = masks[0]
    assert neurons.scales is not None
    name = next(n for n, s in neurons.scales.items() if bool(s.gt(0).any()))
    unit = int(neurons.indices[name][neurons.scales[name].gt(0)][0])
    with torch.no_grad():
        tampered.get_base_model().get_submodule(name).ia3_l["default"].view(-1)[unit] += 0.01
    with pytest.raises(MaskVerificationError, match="not the soft neurons mask's scales"):
        verify(tampered, masks, carrier="adapter")
    # The hard adapter of the same units is not the soft adapter either (its dampened units are 0).
    hard = apply_masks(model, [m.with_scales(None) for m in masks], "adapter")
    with pytest.raises(MaskVerificationError, match="scales"):
        verify(hard.model, masks, carrier="adapter")
    baked = apply_masks(model, masks, "bake")
    verify(baked.model, masks, carrier="bake", probe=baked.probe)
    pruned = next(n for n, s in neurons.scales.items() if bool(s.eq(0).any()))
    column = int(neurons.indices[pruned][neurons.scales[pruned].eq(0)][0])
    with torch.no_grad():
        baked.model.get_submodule(pruned).weight[0, column] = 1.0
    with pytest.raises(MaskVerificationError, match="not zero"):
        verify(baked.model, masks, carrier="bake")


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_bake_zeroes_exactly_the_masked_weights(family: str, tmp_path: Path) -> None:
    model = _base(family, tmp_path / "base")
    scores = score(model, SAMPLES, components=("weights",), progress=False)
    mask = select(scores, "weights", 40, modules=["fc1", "fc2"] if family == "opt" else ["mlp.*"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    baked = bake(copy.deepcopy(model), mask)
    after = baked.state_dict()
    changed = 0
    for name, tensor in before.items():
        diff = after[name] != tensor
        module = name.rsplit(".", 1)[0]
        if module in mask.indices and name.endswith("weight"):
            expected = torch.zeros(tensor.numel(), dtype=torch.bool)
            expected[mask.indices[module]] = True
            flat_before = tensor.flatten()
            assert torch.equal(after[name].flatten()[expected], torch.zeros(int(expected.sum())))
            assert torch.equal(diff.flatten(), expected & (flat_before != 0))
            changed += int(diff.sum())
        else:
            assert not bool(diff.any()), f"{name} must not change"
    assert changed == mask.count
    with pytest.raises(ValueError, match="carrier='bake'"):
        apply_masks(model, mask, "adapter")
    corrected = apply_masks(model, mask, "bake")
    corrected.save(tmp_path / "baked")
    assert torch.equal(_logits(load_corrected(tmp_path / "baked")), _logits(corrected.model))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_baked_neurons_show_in_every_mlp_weight(family: str, tmp_path: Path) -> None:
    """A baked neuron is a zero column of the output projection and zero rows (and biases) of the inputs."""
    model = _base(family, tmp_path / "base")
    mask = _masks(model)[0]
    baked = bake(copy.deepcopy(model), mask)
    for name, neurons in mask.indices.items():
        block = baked.get_submodule(name.rsplit(".", 2)[0])
        if family == "llama":
            assert not block.mlp.down_proj.weight[:, neurons].any()
            assert not block.mlp.gate_proj.weight[neurons].any()
            assert not block.mlp.up_proj.weight[neurons].any()
        else:  # Conv1D stores [in, out]
            assert not block.mlp.c_proj.weight[neurons].any()
            assert not block.mlp.c_fc.weight[:, neurons].any()
            assert not block.mlp.c_fc.bias[neurons].any()


def test_verification_catches_dropped_disabled_and_tampered_adapters(tmp_path: Path) -> None:
    model = _base("llama", tmp_path / "base")
    masks = _masks(model)
    adapter = apply_masks(model, masks, "adapter")
    adapter.save(tmp_path / "adapter")

    without = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with pytest.raises(MaskVerificationError, match="has none"):
        verify(without, masks, carrier="adapter")
    with pytest.raises(MaskVerificationError, match="not zero"):
        verify(without, masks)  # nothing says adapter, and the weights are not zeroed either

    disabled = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    disabled.base_model.disable_adapter_layers()
    with pytest.raises(MaskVerificationError, match="disabled"):
        verify(disabled, masks, carrier="adapter")

    tampered = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    name = next(iter(masks[0].indices))
    with torch.no_grad():
        tampered.get_base_model().get_submodule(name).ia3_l["default"].fill_(1.0)
    with pytest.raises(MaskVerificationError, match="not zero"):
        verify(tampered, masks, carrier="adapter")


def test_probe_recognises_a_different_model(tmp_path: Path) -> None:
    """Zeros in place but another weight changed: the probe logits say it is not the corrected model."""
    model = _base("llama", tmp_path / "base")
    corrected = apply_masks(model, _masks(model), "bake")
    corrected.verify()
    with torch.no_grad():
        corrected.model.lm_head.weight.add_(0.5)
    with pytest.raises(MaskVerificationError, match="probe logits"):
        corrected.verify()


def test_masks_of_another_model_are_refused(tmp_path: Path) -> None:
    model = _base("llama", tmp_path / "base")
    other = _base("llama", tmp_path / "other", seed=1)
    masks = _masks(model)
    for apply in (
        lambda: bake(other, masks),
        lambda: to_adapter(other, masks),
        lambda: apply_masks(other, masks, "adapter"),
    ):
        with pytest.raises(FingerprintMismatchError, match="different weights"):
            apply()
    apply_masks(model, masks, "adapter").save(tmp_path / "adapter")
    with pytest.raises(FingerprintMismatchError):
        load_corrected(tmp_path / "adapter", base_model=str(tmp_path / "other"))


def test_saving_is_atomic_and_adapters_need_a_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _base("llama", tmp_path / "base")
    adapter = apply_masks(model, _masks(model), "adapter")
    target = tmp_path / "adapter"
    adapter.save(target)
    first = sorted(p.name for p in target.iterdir())

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(type(adapter.model), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        adapter.save(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    orphan = CorrectedModel(adapter.model, adapter.masks, "adapter", adapter.probe, None)
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        orphan.save(tmp_path / "orphan")


def test_bfloat16_adapter_is_exact_zero_and_verifies(tmp_path: Path) -> None:
    _base("llama", tmp_path / "base")
    # Loaded in bf16 (not .to(bf16), which would also cast the rotary buffers and change the model).
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).eval()
    masks = _masks(model)
    adapter = apply_masks(model, masks, "adapter")
    adapter.verify()
    assert adapter.probe.dtype == "torch.bfloat16"
    adapter.save(tmp_path / "adapter")
    loaded = load_corrected(tmp_path / "adapter", dtype=torch.bfloat16)
    assert (_logits(loaded).float() - _logits(adapter.model).float()).abs().max() == 0


def test_an_already_wrapped_model_is_refused(tmp_path: Path) -> None:
    model = _base("llama", tmp_path / "base")
    masks = _masks(model)
    wrapped = to_adapter(copy.deepcopy(model), masks)
    with pytest.raises(ValueError, match="already carries a PEFT adapter"):
        apply_masks(wrapped, masks, "bake")
