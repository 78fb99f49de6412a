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
from safetensors import SafetensorError
from torch import nn

from hf_lrp_surgery.carriers._check import check_zeros, mask_list, validate_masks
from hf_lrp_surgery.carriers._files import (
    REDO,
    check_files,
    damaged_weights_error,
    mask_directories,
    read_record,
    record_files,
    saved_dtype,
)
from hf_lrp_surgery.carriers.probe import LogitsProbe, probe_logits
from hf_lrp_surgery.carriers.registry import CARRIERS, LoadOptions, get_carrier
from hf_lrp_surgery.exceptions import SavedModelError, SurgeryError
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


def save_corrected(
    corrected: CorrectedModel,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a corrected model so that ``from_pretrained`` loads it, with its masks and check record.

    Baked: a normal checkpoint. Adapter: a PEFT adapter directory whose ``adapter_config.json``
    points at ``base_model_name_or_path``. Both get ``surgery/`` (the masks and ``check.json``, which
    records the saved files and is written last). The directory is built in one staging directory
    and appears complete or not at all.

    Args:
        corrected: The result of :func:`apply_masks`.
        directory: Destination (new, or empty).
        tokenizer: Saved alongside, so the directory is self-contained for generation.
        base_model_name_or_path: For adapters: the Hub id or path of the base model, as users will
            load it (default: where the base model was loaded from).
        overwrite: Replace an existing non-empty directory (once the new one is complete).

    Returns:
        The directory.

    Raises:
        ValueError: The carrier is not persistent (``"hooks"``), or an adapter has no base model path.
        OutputExistsError: ``directory`` is not empty and ``overwrite`` is false; or it is a file, the
            working directory or one of its parents, or holds the base model it names.

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
    local_base = [base_path] if base_path and Path(base_path).exists() else []
    with atomic_directory(directory, overwrite=overwrite, inputs=local_base) as tmp:
        carrier.save(corrected.model, tmp, base_model_name_or_path=base_path)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for mask in corrected.masks:
            (tmp / SURGERY_DIR / mask.granularity).mkdir(parents=True)
            mask.write_into(tmp / SURGERY_DIR / mask.granularity)
        record = {
            "carrier": corrected.carrier,
            "base_model_name_or_path": base_path,
            "granularities": [m.granularity for m in corrected.masks],
            "probe": asdict(corrected.probe),
            "files": record_files(tmp, SURGERY_DIR),
        }
        # Last: a check.json means the save is complete, and it lists the parts that belong to it.
        (tmp / SURGERY_DIR / CHECK_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(directory)


def read_surgery(directory: str | os.PathLike[str]) -> tuple[list[Mask], CarrierName, LogitsProbe, str | None]:
    """Read the masks, carrier, probe and base model path saved with a corrected model, checking its parts.

    The parts must belong to one save: every file ``check.json`` records is there with its size
    (and, for the masks, its hash), the masks agree with each other and with the carrier's files
    (an adapter's ``adapter_config.json`` targets exactly the masks' modules), and the mask
    directories it names lie inside ``surgery/``.

    Args:
        directory: A directory written by :func:`save_corrected`.

    Returns:
        The masks, the carrier's name, the probe, and the base model path (a Hub id, or a local path
        as given when saving; ``None`` for baked models saved without one).

    Raises:
        FileNotFoundError: ``directory`` holds no ``surgery/check.json``.
        SavedModelError: ``check.json`` is unreadable or names a mask directory outside ``surgery/``;
            a file is missing, truncated or from another save; the masks or the carrier's files
            disagree.
        MaskManifestError: A mask's own files disagree (see :meth:`Mask.load`).

    Example:
        >>> masks, carrier, probe, base = read_surgery("runs/detox-adapter")  # doctest: +SKIP
    """
    directory = Path(directory)
    root = directory / SURGERY_DIR
    record_path = root / CHECK_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{directory} holds no {SURGERY_DIR}/{CHECK_FILE}; it was not saved by hf_lrp_surgery")
    record = read_record(record_path)
    mask_dirs = mask_directories(record, root, record_path)
    check_files(directory, record.get("files"), record_path)
    masks = [_load_part(path) for path in mask_dirs]
    _check_masks_agree(masks, mask_dirs, record_path)
    carrier = CARRIERS.get(record["carrier"])
    if carrier is not None:  # an unregistered carrier is refused by load_corrected, not by reading
        carrier.check_saved(directory, masks)
    try:
        probe = LogitsProbe(**record["probe"])
    except TypeError as err:
        raise SavedModelError(f"{record_path}: the probe record is garbled ({err}); {REDO}", path=record_path) from err
    return masks, record["carrier"], probe, record.get("base_model_name_or_path")


def _load_part(path: Path) -> Mask:
    """The mask saved in ``path``; a missing one is a damaged save, not a missing mask."""
    try:
        return Mask.load(path)
    except FileNotFoundError as err:
        raise SavedModelError(f"{path} is missing its mask files ({err}); {REDO}", path=path) from err


def _check_masks_agree(masks: Sequence[Mask], paths: Sequence[Path], record_path: Path) -> None:
    """Each mask sits in its granularity's directory, and all were built for one model.

    Their layouts are compared with the model's when it is loaded (:meth:`Mask.validate`).
    """
    for mask, path in zip(masks, paths):
        if mask.granularity != path.name:
            raise SavedModelError(
                f"{path} holds a {mask.granularity} mask, not a {path.name} mask: the directory mixes parts of "
                f"different saves; {REDO}",
                path=path,
            )
    first = masks[0]
    for mask, path in zip(masks[1:], paths[1:]):
        if mask.fingerprint != first.fingerprint:
            raise SavedModelError(
                f"{path} holds a mask of another model than {paths[0]} ({mask.fingerprint.short()} vs "
                f"{first.fingerprint.short()}): the directory mixes parts of different saves; {REDO}",
                path=record_path,
            )


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
        dtype: Load in this dtype (default: the dtype the model was corrected in, recorded with its
            probe in ``check.json``, so that an fp16 correction loads as fp16).

    Returns:
        The model, in eval mode.

    Raises:
        SavedModelError: The directory is damaged or mixed (see :func:`read_surgery`), or its model
            files cannot be loaded (a deleted or truncated ``model.safetensors`` /
            ``adapter_model.safetensors``; the message names it).
        MaskManifestError: A saved mask is inconsistent or does not fit the model.
        MaskVerificationError: The loaded model does not carry the masks (e.g. the adapter was
            silently dropped).
        FingerprintMismatchError: The adapter's base model is not the one the masks were built for.
        ModelLoadError: The base model could not be loaded.
        ValueError: The saved carrier is not registered, or an unknown ``via``.

    Example:
        >>> model = load_corrected("runs/detox-adapter")  # doctest: +SKIP
    """
    if via not in ("peft", "transformers"):
        raise ValueError(f"via must be 'peft' or 'transformers', got {via!r}")
    masks, name, probe, saved_base = read_surgery(directory)
    carrier = get_carrier(name)
    options = LoadOptions(
        masks=masks,
        base_model=base_model or saved_base,
        via=via,
        dtype=dtype if dtype is not None else saved_dtype(probe.dtype),
    )
    try:
        model = carrier.load(Path(directory), options)
    except SurgeryError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise damaged_weights_error(Path(directory), carrier.model_files, err) from err
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
