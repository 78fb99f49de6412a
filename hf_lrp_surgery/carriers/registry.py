"""The carrier registry: how a mask is carried by a model, one :class:`Carrier` per way.

A carrier is one module with a :class:`Carrier` subclass, plus one :func:`register_carrier` line in
:mod:`hf_lrp_surgery.carriers`. :func:`~hf_lrp_surgery.carriers.apply_masks`,
:func:`~hf_lrp_surgery.carriers.save_corrected`, :func:`~hf_lrp_surgery.carriers.load_corrected` and
:func:`~hf_lrp_surgery.carriers.verify` find it here by the name saved in ``surgery/check.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from hf_lrp_surgery.carriers._check import check_zeros, refuse_wrapped, validate_masks
from hf_lrp_surgery.lrp.layout import GRANULARITIES, Granularity
from hf_lrp_surgery.masks.mask import Mask

__all__ = [
    "CARRIERS",
    "Carrier",
    "CarrierCard",
    "LoadOptions",
    "get_carrier",
    "model_files",
    "register_carrier",
    "unregister_carrier",
]


@dataclass(frozen=True)
class LoadOptions:
    """What :func:`~hf_lrp_surgery.carriers.load_corrected` asks of a carrier's :meth:`Carrier.load`.

    Attributes:
        masks: The masks saved with the model.
        base_model: Where the base model loads from (carriers saved on top of one), if known.
        via: ``"peft"`` or ``"transformers"``, for carriers that both can load.
        dtype: Load in this dtype (``None``: as ``from_pretrained`` decides;
            :func:`~hf_lrp_surgery.carriers.load_corrected` passes the dtype the model was corrected in).
    """

    masks: Sequence[Mask]
    base_model: str | None = None
    via: Literal["peft", "transformers"] = "peft"
    dtype: torch.dtype | None = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained`` (the dtype, when one was asked for)."""
        return {} if self.dtype is None else {"dtype": self.dtype}


@dataclass(frozen=True)
class CarrierCard:
    """What a model card says about a model saved with one carrier.

    Attributes:
        kind: What the saved model is, in a few words (``"baked checkpoint"``; commit messages use it).
        form: How the masks are carried, completing "pruned ..., carried as ..." (``"baked into the weights"``).
        pruned: The "What was pruned" paragraph.
        library_name: The card's ``library_name`` (``"transformers"``, ``"peft"``).
        relation: The card's ``base_model_relation`` (``"finetune"``, ``"adapter"``).
        tags: Extra Hub tags.
        usage: Lines of the "How to use" code block; ``{repo}`` and ``{base}`` are filled in.
        switchable: Whether ``load_from_hub(..., adapter_enabled=False)`` gives the original model.
    """

    kind: str
    form: str
    pruned: str
    library_name: str
    relation: str
    tags: tuple[str, ...]
    usage: tuple[str, ...]
    switchable: bool = False


class Carrier:
    """One way of carrying masks: applying them, proving they are carried, saving and loading them.

    Attributes:
        name: The name users pass (``carrier="bake"``) and ``check.json`` records.
        granularities: The mask granularities it carries exactly; others are refused by :meth:`check`.
        persistent: Whether a model carrying masks this way can be saved and loaded back.
        model_files: Glob patterns of the model files :meth:`save` writes (a Hub push replaces them).
        card: What the model card says about a model saved this way (persistent carriers).
        base_config: The file of a saved model that names the base model it loads on (an adapter's
            ``adapter_config.json``); ``None`` when the saved model stands alone.

    Example:
        >>> class Scaled(Carrier):  # doctest: +SKIP
        ...     name = "scaled"
        ...     def apply(self, model, masks, *, adapter_name): ...
        >>> register_carrier(Scaled())  # doctest: +SKIP
    """

    name: ClassVar[str]
    granularities: ClassVar[frozenset[Granularity]] = frozenset(GRANULARITIES)
    persistent: ClassVar[bool] = True
    model_files: ClassVar[tuple[str, ...]] = ()
    card: ClassVar[CarrierCard | None] = None
    base_config: ClassVar[str | None] = None

    def check(self, model: nn.Module, masks: Sequence[Mask]) -> None:
        """Refuse masks this carrier cannot carry on ``model``, before anything is copied or changed.

        Raises:
            ValueError: A granularity it does not carry, or a model that already carries a PEFT adapter.
            FingerprintMismatchError: A mask was built for another model.
            MaskManifestError: A mask does not fit the model's layout or matrices.
        """
        refused = sorted({m.granularity for m in masks} - self.granularities)
        if refused:
            raise ValueError(
                f"the {self.name!r} carrier does not carry {', '.join(refused)} masks; it carries "
                f"{', '.join(sorted(self.granularities))}"
            )
        refuse_wrapped(model)
        for mask in masks:
            mask.check_model(model)
        validate_masks(model, masks)

    def apply(self, model: nn.Module, masks: Sequence[Mask], *, adapter_name: str) -> nn.Module:
        """Make ``model`` (already a copy, or the caller's own with ``inplace=True``) carry ``masks``.

        Returns:
            The corrected model (``model`` itself, or a wrapper around it).
        """
        raise NotImplementedError

    def verify(self, model: nn.Module, masks: Sequence[Mask]) -> None:
        """Prove ``model`` carries ``masks`` (default: zeros in active IA3 vectors or in the weights).

        Raises:
            MaskVerificationError: Some masked unit is not zero where the carrier keeps it.
        """
        check_zeros(model, masks)

    def save(self, model: nn.Module, directory: Path, *, base_model_name_or_path: str | None) -> None:
        """Write the corrected model's files into an existing (staging) directory (persistent carriers).

        Raises:
            ValueError: The model lacks what it needs to be loaded back.
        """
        raise NotImplementedError

    def check_saved(self, directory: Path, masks: Sequence[Mask]) -> None:
        """Refuse a saved directory whose carrier files disagree with its masks (default: nothing to compare).

        Runs in :func:`~hf_lrp_surgery.carriers.read_surgery`, before any weight is loaded.

        Raises:
            SavedModelError: The carrier's files describe other masks (parts of different saves).
        """

    def load(self, directory: Path, options: LoadOptions) -> nn.Module:
        """Load a model saved by :meth:`save` (not yet verified; :func:`load_corrected` does that).

        Raises:
            ModelLoadError: A model it needs could not be loaded.
        """
        raise NotImplementedError

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Switch the carried masks on or off; carriers that live in the weights leave the model as it is."""


#: Registered carriers by name, in registration order.
CARRIERS: dict[str, Carrier] = {}


def register_carrier(carrier: Carrier) -> Carrier:
    """Add a carrier to the registry.

    Args:
        carrier: An instance of a :class:`Carrier` subclass.

    Returns:
        ``carrier``.

    Raises:
        ValueError: A carrier of that name is already registered.

    Example:
        >>> register_carrier(Scaled())  # doctest: +SKIP
    """
    if carrier.name in CARRIERS:
        raise ValueError(f"a carrier named {carrier.name!r} is already registered")
    CARRIERS[carrier.name] = carrier
    return carrier


def unregister_carrier(name: str) -> Carrier:
    """Remove a carrier from the registry (e.g. a test's toy carrier).

    Returns:
        The removed carrier.

    Raises:
        ValueError: No carrier of that name is registered.
    """
    return CARRIERS.pop(get_carrier(name).name)


def get_carrier(name: str) -> Carrier:
    """The registered carrier called ``name``.

    Raises:
        ValueError: No carrier of that name is registered (the message lists those that are).

    Example:
        >>> get_carrier("bake").persistent
        True
    """
    try:
        return CARRIERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"carrier must be one of {list(CARRIERS)}, got {name!r}") from None


def model_files() -> list[str]:
    """Glob patterns of every model file a registered carrier writes, in registration order."""
    return [pattern for carrier in CARRIERS.values() for pattern in carrier.model_files]
