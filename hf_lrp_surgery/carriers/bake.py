"""The bake carrier: zero exactly what the mask says in the weights; the result is an ordinary checkpoint.

For a neuron: the column of the MLP output projection that reads it (``down_proj`` / ``fc2`` /
``c_proj``) and the rows (and biases) of the input projections that write it, so the weights show
the pruning; for a head: the columns of the attention output projection that read it; for weights:
the elements (see :func:`~hf_lrp_surgery.masks.geometry.zeroed_entries`). A soft mask's dampened unit
has its carried entries (the reader column, a head's columns, the weight element, an expert's ``down``
column) multiplied by its scale and its writers left as they are: exactly the adapter's scaling of the
carrier's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from hf_lrp_surgery.carriers._check import mask_list, validate_masks
from hf_lrp_surgery.carriers.registry import Carrier, CarrierCard, LoadOptions
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.offload import refuse_offloaded
from hf_lrp_surgery.masks.geometry import zeroed_entries
from hf_lrp_surgery.masks.mask import Mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["BakeCarrier", "bake"]


def bake(model: nn.Module, masks: Mask | Sequence[Mask]) -> nn.Module:
    """Zero the masked units in the weights of ``model`` (scale a soft mask's dampened units), in place.

    Args:
        model: The base model the masks were built for.
        masks: One mask or one per granularity.

    Returns:
        ``model`` (same object), now carrying the masks in its weights.

    Raises:
        FingerprintMismatchError: A mask was built for another model (the check runs before any
            weight is touched).
        MaskManifestError: A mask does not fit the model's layout or matrices (checked first too).

    Example:
        >>> bake(model, mask).save_pretrained("runs/baked")  # doctest: +SKIP
    """
    masks = mask_list(masks)
    for mask in masks:
        mask.check_model(model)
    validate_masks(model, masks)
    return _bake(model, masks)


@torch.no_grad()
def _bake(model: nn.Module, masks: Sequence[Mask]) -> nn.Module:
    """:func:`bake` without the fingerprint check (done by the caller on the original model)."""
    refuse_offloaded(model, "baking a mask")  # a write into a meta (offloaded) parameter is silently lost
    arch = resolve(model)
    for mask in masks:
        for entry in zeroed_entries(mask, arch):
            param, index = entry.locate(model)
            param[index] = entry.target(param[index])
    return model


class BakeCarrier(Carrier):
    """Masks as zeros in the weights: a plain checkpoint that any ``from_pretrained`` loads."""

    name = "bake"
    model_files = (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model-*.safetensors",
        "model.safetensors.index.json",
        "pytorch_model*.bin",
        "pytorch_model.bin.index.json",
    )
    card = CarrierCard(
        kind="baked checkpoint",
        form="baked into the weights",
        pruned="The pruned units are zeros in the weights (for a neuron: its column of the MLP output projection "
        "and its rows of the input projections; for a head: its columns of the attention output "
        "projection), so this is an ordinary checkpoint.",
        library_name="transformers",
        relation="finetune",
        tags=(),
        usage=(
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            'tokenizer = AutoTokenizer.from_pretrained("{repo}")  # if the tokenizer was saved here, else from the '
            "base model",
        ),
    )

    def apply(self, model: nn.Module, masks: Sequence[Mask], *, adapter_name: str) -> nn.Module:
        """Zero the masked entries of ``model``'s weights in place."""
        return _bake(model, masks)

    def save(self, model: nn.Module, directory: Path, *, base_model_name_or_path: str | None) -> None:
        """``save_pretrained`` into ``directory``."""
        cast("PreTrainedModel", model).save_pretrained(str(directory))

    def load(self, directory: Path, options: LoadOptions) -> nn.Module:
        """``AutoModelForCausalLM.from_pretrained(directory)``."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(directory), **options.from_pretrained_kwargs())
