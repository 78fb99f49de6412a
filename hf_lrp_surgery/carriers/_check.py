"""Checks shared by the carriers: the mask list, wrapped models, and zeros (or scales) where the masks should be."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_lrp_surgery.exceptions import AblationError, MaskVerificationError
from hf_lrp_surgery.lrp.architectures import resolve, unwrap_model
from hf_lrp_surgery.masks.geometry import input_scales, input_units, zeroed_entries
from hf_lrp_surgery.masks.mask import Mask


def mask_list(masks: Mask | Sequence[Mask]) -> list[Mask]:
    """One mask or several as a list, refusing none, two of one granularity, and masks of non-zero ablation."""
    out = [masks] if isinstance(masks, Mask) else list(masks)
    if not out:
        raise ValueError("give at least one mask")
    granularities = [m.granularity for m in out]
    if len(set(granularities)) != len(granularities):
        raise ValueError(f"give at most one mask per granularity, got {granularities}")
    for mask in out:
        ablation = (mask.provenance.get("circuit") or {}).get("ablation") or {}
        ablation = ablation.get("kind", "zero") if isinstance(ablation, dict) else ablation
        if ablation != "zero":
            raise AblationError(
                f"this {mask.granularity} mask comes from a circuit found with {ablation} ablation, which the "
                "carriers (zeros in the weights, 0/1 IA3 vectors, hooks) cannot express; find the circuit with "
                "ablation='zero' to carry it"
            )
    return out


def validate_masks(model: nn.Module, masks: Sequence[Mask]) -> None:
    """Refuse masks that do not fit ``model`` (layout, index ranges) before anything reads or changes it.

    Raises:
        MaskManifestError: See :meth:`~hf_lrp_surgery.masks.Mask.validate`.
    """
    arch = resolve(model)
    for mask in masks:
        mask.validate(arch)


def refuse_wrapped(model: nn.Module) -> None:
    """Refuse a model that already carries a PEFT adapter (masks are computed on plain weights)."""
    if unwrap_model(model) is not model or any(hasattr(m, "ia3_l") or hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError(
            "the model already carries a PEFT adapter; merge it first (peft_model.merge_and_unload()) "
            "and compute the mask on the merged model"
        )


def active_scaling(module: nn.Module) -> torch.Tensor | None:
    """The product of the active IA3 vectors of an IA3 layer, or ``None`` when it scales nothing."""
    layer: Any = module  # a peft IA3 layer: its attributes are not typed
    if not hasattr(layer, "ia3_l") or getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None
    vectors = [layer.ia3_l[a].detach().flatten() for a in layer.active_adapters if a in layer.ia3_l]
    if not vectors:
        return None
    return torch.stack(vectors).prod(0)


def check_zeros(model: nn.Module, masks: Sequence[Mask]) -> None:
    """Every masked unit is zero (a soft mask's dampened unit: its scale) where the model keeps it.

    In an active IA3 vector the value of every masked unit must be its scale exactly (0 for a pruned
    unit; a soft scale as the vector's dtype stores it). In the weights (baked or merged) the entries
    of every pruned unit must be zero; a dampened unit's baked entries (the original weights times its
    scale) cannot be read off the weights without the original model: the probe logits prove them.

    Only the carried entries are read (the carrier's input side, or weight elements): a merged
    adapter zeroes those alone, so the writer rows of a baked neuron prove nothing more.

    Raises:
        MaskVerificationError: Some masked unit is not zero, or an adapter's scale is not the mask's.
    """
    arch = resolve(model)
    for mask in masks:
        for entry in zeroed_entries(mask, arch):
            if not entry.carried:
                continue
            # IA3 vectors scale a carrier's inputs; weight elements are only ever in the weights.
            module = unwrap_model(model).get_submodule(entry.module)
            scaling = active_scaling(module) if mask.granularity != "weights" else None
            if scaling is not None:
                values = scaling[input_units(mask, entry.module, arch).to(scaling.device)]
                expected = input_scales(mask, entry.module, arch).to(values.device, values.dtype)
                wrong, where = values.ne(expected), "the IA3 vector"
            else:
                param, index = entry.locate(model)
                values, where = param.detach()[index], "weights"
                zero = entry.zero
                wrong = values.ne(0) if zero is None else values.ne(0) & zero.to(values.device)
            if not bool(wrong.any()):
                continue
            if mask.soft and scaling is not None:
                raise MaskVerificationError(
                    f"{entry.module}: {int(wrong.sum())} of the values in {where} are not the soft {mask.granularity} "
                    "mask's scales (0 where pruned, alpha where dampened): the model does not carry the mask"
                )
            raise MaskVerificationError(
                f"{entry.module}: {int(wrong.sum())} of the values in {where} that the {mask.granularity} mask sets "
                "to zero are not zero: the model does not carry the mask"
            )
