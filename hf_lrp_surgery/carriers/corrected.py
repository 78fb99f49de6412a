"""The corrected model: masks applied by a registered carrier, saved with a check record, loaded and verified.

A saved corrected model carries ``surgery/``: the masks (``mask.json`` + ``mask.safetensors`` per
granularity) and ``check.json`` (the carrier's name, and the logits of the original and the
corrected model on a fixed probe). :func:`verify` proves a loaded model carries the masks: zeros
where the manifest says, an active adapter where there should be one, and probe logits that match
the corrected model. A silently dropped adapter is a
:class:`~hf_lrp_surgery.exceptions.MaskVerificationError`, not a no-op.
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
        ValueError: An unregistered carrier.

    Example:
        >>> verify(model, masks, carrier="adapter", probe=probe)  # doctest: +SKIP
    """
    masks = mask_list(masks)
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
        self, directory: str | os.PathLike[str], *, tokenizer: Any = None, base_model_name_or_path: str | None = None
    ) -> Path:
        """Save the corrected model, atomically; see :func:`save_corrected`."""
        return save_corrected(self, directory, tokenizer=tokenizer, base_model_name_or_path=base_model_name_or_path)


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
    dtype = str(resolve(model).token_embedding.weight.dtype)
    base_path = getattr(model, "name_or_path", None) or None
    target = model if inplace else copy.deepcopy(model)
    corrected_model = chosen.apply(target, masks, adapter_name=adapter_name)
    corrected = probe_logits(corrected_model, input_ids, vocab_ids)
    probe = LogitsProbe(input_ids, vocab_ids, original.tolist(), corrected.tolist(), dtype)
    result = CorrectedModel(corrected_model, masks, carrier, probe, base_path)
    result.verify()
    return result


def save_corrected(
    corrected: CorrectedModel,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Save a corrected model so that ``from_pretrained`` loads it, with its masks and check record.

    Baked: a normal checkpoint. Adapter: a PEFT adapter directory whose ``adapter_config.json``
    points at ``base_model_name_or_path``. Both get ``surgery/`` (the masks and ``check.json``).
    The directory appears complete or not at all.

    Args:
        corrected: The result of :func:`apply_masks`.
        directory: Destination (replaced if it exists).
        tokenizer: Saved alongside, so the directory is self-contained for generation.
        base_model_name_or_path: For adapters: the Hub id or path of the base model, as users will
            load it (default: where the base model was loaded from).

    Returns:
        The directory.

    Raises:
        ValueError: The carrier is not persistent (``"hooks"``), or an adapter has no base model path.

    Example:
        >>> save_corrected(corrected, "runs/detox-adapter", tokenizer=tokenizer)  # doctest: +SKIP
    """
    carrier = get_carrier(corrected.carrier)
    if not carrier.persistent:
        raise ValueError(
            f"the {carrier.name!r} carrier acts on a model in memory only and cannot be saved; apply the masks "
            f"with one of {[n for n, c in CARRIERS.items() if c.persistent]}"
        )
    base_path = base_model_name_or_path or corrected.base_model_name_or_path
    record = {
        "carrier": corrected.carrier,
        "base_model_name_or_path": base_path,
        "granularities": [m.granularity for m in corrected.masks],
        "probe": asdict(corrected.probe),
    }
    with atomic_directory(directory) as tmp:
        carrier.save(corrected.model, tmp, base_model_name_or_path=base_path)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for mask in corrected.masks:
            (tmp / SURGERY_DIR / mask.granularity).mkdir(parents=True)
            mask.write_into(tmp / SURGERY_DIR / mask.granularity)
        (tmp / SURGERY_DIR / CHECK_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(directory)


def read_surgery(directory: str | os.PathLike[str]) -> tuple[list[Mask], CarrierName, LogitsProbe, str | None]:
    """Read the masks, carrier, probe and base model path saved with a corrected model.

    Raises:
        FileNotFoundError: ``directory`` holds no ``surgery/check.json``.

    Example:
        >>> masks, carrier, probe, base = read_surgery("runs/detox-adapter")  # doctest: +SKIP
    """
    root = Path(directory) / SURGERY_DIR
    if not (root / CHECK_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no {SURGERY_DIR}/{CHECK_FILE}; it was not saved by hf_lrp_surgery")
    record = json.loads((root / CHECK_FILE).read_text())
    masks = [Mask.load(root / granularity) for granularity in record["granularities"]]
    return masks, record["carrier"], LogitsProbe(**record["probe"]), record.get("base_model_name_or_path")


def load_corrected(
    directory: str | os.PathLike[str],
    *,
    via: Literal["peft", "transformers"] = "peft",
    base_model: str | None = None,
    adapter_enabled: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a saved corrected model and verify that it carries its masks.

    Args:
        directory: A directory written by :func:`save_corrected`.
        via: For adapters: ``"peft"`` (``PeftModel.from_pretrained`` on the base model; returns a
            ``PeftModel``) or ``"transformers"`` (transformers' integrated adapter loading; returns
            the base model class with the adapter injected).
        base_model: For adapters: load the base from here instead of the saved
            ``base_model_name_or_path``.
        adapter_enabled: Return the adapter switched on (default) or off (the original model);
            carriers that live in the weights cannot be switched off and ignore it.
        dtype: Load in this dtype (default: as saved).

    Returns:
        The model, in eval mode.

    Raises:
        MaskVerificationError: The loaded model does not carry the masks (e.g. the adapter was
            silently dropped).
        FingerprintMismatchError: The adapter's base model is not the one the masks were built for.
        ModelLoadError: The base model could not be loaded.
        ValueError: The saved carrier is not registered.

    Example:
        >>> model = load_corrected("runs/detox-adapter")  # doctest: +SKIP
    """
    masks, name, probe, saved_base = read_surgery(directory)
    carrier = get_carrier(name)
    options = LoadOptions(masks=masks, base_model=base_model or saved_base, via=via, dtype=dtype)
    model = carrier.load(Path(directory), options)
    model.eval()
    verify(model, masks, carrier=name, probe=probe)
    if not adapter_enabled:
        carrier.set_enabled(model, False)
    return model


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
