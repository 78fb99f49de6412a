"""The corrected model: masks applied by a registered carrier, saved with a check record, loaded and verified.

A saved corrected model carries ``surgery/``: the masks (``mask.json`` + ``mask.safetensors`` per
granularity) and ``check.json`` (the carrier's name, and the logits of the original and the
corrected model on a fixed probe). :func:`verify` proves a loaded model carries the masks: zeros
where the manifest says, an active adapter where there should be one, and probe logits that match
the corrected model. A silently dropped adapter is a
:class:`~hf_lrp_surgery.exceptions.MaskVerificationError`, not a no-op.

The directory is built in one staging directory and swapped in whole; ``check.json`` is written
last and records the saved files (see :mod:`~hf_lrp_surgery.carriers._files`), so that loading
refuses a directory with a missing, truncated or foreign part
(:class:`~hf_lrp_surgery.exceptions.SavedModelError`) before any weight is read. Names in it are
relative to the directory; the one path kept as given is the adapter's base model (a Hub id, or a
local path that a push replaces by the Hub id).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from hf_lrp_surgery.carriers._check import check_zeros, mask_list
from hf_lrp_surgery.carriers.probe import LogitsProbe, probe_logits
from hf_lrp_surgery.carriers.registry import CARRIERS, LoadOptions, get_carrier
from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.masks.mask import Mask

__all__ = [
    "CHECK_FILE",
    "SURGERY_DIR",
    "CarrierName",
    "CorrectedModel",
    "apply_masks",
    "load_corrected",
    "read_surgery",
    "save_corrected",
    "set_adapter_enabled",
    "verify",
]

#: A carrier's registered name (see :data:`~hf_lrp_surgery.carriers.registry.CARRIERS`).
CarrierName = str
#: Sub-directory of a saved corrected model that holds the mask and the check record.
SURGERY_DIR = "surgery"
#: The file in ``surgery/`` that records the carrier and the probe logits of a saved corrected model.
CHECK_FILE = "check.json"


def verify(
    model: nn.Module,
    masks: Mask | Sequence[Mask],
    *,
    carrier: CarrierName | None = None,
    probe: LogitsProbe | None = None,
) -> None:
    """Prove that ``model`` carries ``masks``.

    Every masked unit must be exactly zero where its carrier keeps it: in an active IA3 vector on
    the carrier module (adapters), or in the weights (baked or merged). With a ``carrier``, that
    carrier's own check runs instead (``"adapter"``: a carrier module without an active IA3 vector
    is an error, the adapter was dropped or disabled). With a ``probe``, the model's logits must
    also be the corrected model's.

    Args:
        model: The loaded model (plain, with an integrated adapter, or a ``PeftModel``).
        masks: The masks it should carry.
        carrier: The carrier it was saved with, if known.
        probe: The probe logits recorded when it was corrected.

    Raises:
        MaskVerificationError: Some masked unit is not zero, an adapter is missing or disabled, or
            the probe logits differ.
        MaskManifestError: A mask does not fit the model (another layout, indices beyond a matrix);
            checked before anything else.
        ValueError: An unregistered carrier.

    Example:
        >>> verify(model, masks, carrier="adapter", probe=probe)  # doctest: +SKIP
    """
    masks = mask_list(masks)
    validate_masks(model, masks)
    if carrier is None:
        check_zeros(model, masks)
    else:
        get_carrier(carrier).verify(model, masks)
    if probe is not None:
        probe.check(model)


@dataclass
class CorrectedModel:
    """A model carrying masks, with what is needed to save it and to recognise it after loading.

    Attributes:
        model: The corrected model: a ``PreTrainedModel`` (baked) or a ``peft.PeftModel`` (adapter).
        masks: The masks it carries.
        carrier: The registered carrier's name (``"bake"``, ``"adapter"``, ...).
        probe: Probe logits of the original and the corrected model.
        base_model_name_or_path: Where the base model loads from (the adapter's base).
    """

    model: nn.Module
    masks: list[Mask]
    carrier: CarrierName
    probe: LogitsProbe
    base_model_name_or_path: str | None = None

    def verify(self) -> None:
        """Prove that :attr:`model` carries the masks (see :func:`verify`)."""
        verify(self.model, self.masks, carrier=self.carrier, probe=self.probe)

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        tokenizer: Any = None,
        base_model_name_or_path: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Save the corrected model, atomically; see :func:`save_corrected`.

        Example:
            >>> corrected.save("runs/detox-adapter", tokenizer=tokenizer)  # doctest: +SKIP
        """
        return save_corrected(
            self, directory, tokenizer=tokenizer, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite
        )


def apply_masks(
    model: nn.Module,
    masks: Mask | Sequence[Mask],
    carrier: CarrierName = "adapter",
    *,
    inplace: bool = False,
    adapter_name: str = "default",
) -> CorrectedModel:
    """Apply masks to a model with the chosen carrier and record the probe that recognises the result.

    Args:
        model: The base model the masks were built for.
        masks: One mask or one per granularity.
        carrier: A registered carrier: ``"adapter"`` (IA3, neuron and head masks; switchable off),
            ``"bake"``, or ``"hooks"`` (forward pre-hooks, in memory only: cannot be saved).
        inplace: Modify ``model`` itself instead of a deep copy (saves memory on large models; the
            original is then gone for baked masks and wrapped for adapters).
        adapter_name: Name of the IA3 adapter.

    Returns:
        The :class:`CorrectedModel`, already verified.

    Raises:
        FingerprintMismatchError: A mask was built for another model.
        MaskManifestError: A mask does not fit the model (another layout, indices beyond a matrix).
        ValueError: An unregistered carrier, or a granularity the carrier does not carry (a weight
            mask with ``carrier="adapter"``).

    Example:
        >>> corrected = apply_masks(model, mask, "adapter")  # doctest: +SKIP
        >>> corrected.save("runs/detox-adapter", tokenizer=tokenizer)  # doctest: +SKIP
    """
    chosen = get_carrier(carrier)
    masks = mask_list(masks)
    chosen.check(model, masks)
    input_ids, vocab_ids = LogitsProbe.positions(model)
    original = probe_logits(model, input_ids, vocab_ids)
    dtype = str(resolve(model).embedding_weight.dtype)
    base_path = getattr(model, "name_or_path", None) or None
    target = model if inplace else copy.deepcopy(model)
    corrected_model = chosen.apply(target, masks, adapter_name=adapter_name)
    corrected = probe_logits(corrected_model, input_ids, vocab_ids)
    probe = LogitsProbe(input_ids, vocab_ids, original.tolist(), corrected.tolist(), dtype)
    result = CorrectedModel(corrected_model, masks, carrier, probe, base_path)
    result.verify()
    return result


@@NEW@@


def set_adapter_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every PEFT adapter layer in ``model`` on or off.

    Works on a ``PeftModel`` and on a model with an adapter loaded by transformers
    (``from_pretrained(adapter_dir)`` / ``load_adapter``), whose own ``disable_adapters()`` refuses
    to run with peft < 0.22 under transformers 5.24.

    Args:
        model: The model.
        enabled: ``True`` to switch the adapters on, ``False`` for the original model's outputs.

    Returns:
        The number of adapter layers switched.

    Raises:
        ValueError: The model has no adapter layers.

    Example:
        >>> set_adapter_enabled(model, False)  # doctest: +SKIP
        48
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model has no PEFT adapter layers to switch")
    for layer in layers:
        layer.enable_adapters(enabled)
    return len(layers)
