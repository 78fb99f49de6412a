"""The hooks carrier: neuron and head masks as forward pre-hooks that zero the carrier modules' inputs.

A pre-hook on the MLP / attention output projection that zeroes the masked input features computes
exactly the baked model, without touching a weight: a pruning sweep costs forward passes only
(:func:`~hf_lrp_surgery.circuits.ablated`), and in training every weight that only reads or writes
a masked feature gets an exactly zero gradient (:class:`~hf_lrp_surgery.training.MaskEnforcer`).
The hooks can be suspended (to see the unmasked model) and removed. They live on a model in memory
only: ``apply_masks(model, mask, "hooks")`` works, saving it is refused.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from hf_lrp_surgery.carriers.registry import Carrier
from hf_lrp_surgery.exceptions import MaskVerificationError
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, parameter, resolve, unwrap_model
from hf_lrp_surgery.masks.geometry import input_units
from hf_lrp_surgery.masks.mask import Mask

__all__ = ["HooksCarrier", "MaskHooks"]

# The hook sets that apply_masks(..., "hooks") left on a model, so that verify can find them.
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, MaskHooks] = weakref.WeakKeyDictionary()


class MaskHooks:
    """Forward pre-hooks that zero the masked input features of a model's carrier modules.

    Args:
        model: The model (optionally PEFT-wrapped).
        arch: Its resolved architecture, if already at hand.

    Raises:
        UnsupportedArchitectureError: The model type is not supported.

    Example:
        >>> with MaskHooks(model) as hooks:  # doctest: +SKIP
        ...     hooks.add(mask)
        ...     pruned_logits = model(input_ids).logits
    """

    def __init__(self, model: nn.Module, arch: ResolvedArchitecture | None = None) -> None:
        self.model = model
        self.arch = arch if arch is not None else resolve(model)
        self._dropped: dict[str, torch.Tensor] = {}  # carrier module name -> bool [in_features]
        self._handles: dict[str, Any] = {}
        self._suspended = False

    def add(self, mask: Mask) -> None:
        """Also zero the input features that ``mask`` prunes (a union with what is already hooked).

        Raises:
            ValueError: A weight mask (weights are not a carrier's inputs).
            MaskManifestError: The mask does not fit the model's layout.
        """
        if mask.granularity == "weights":
            raise ValueError("forward pre-hooks carry neuron and head masks; zero weight masks in the weights")
        mask.validate(self.arch)
        conv1d = self.arch.spec.orientation == "conv1d"
        for name in mask.indices:
            module = unwrap_model(self.model).get_submodule(name)
            width = parameter(module).shape[0 if conv1d else 1]
            dropped = self._dropped.get(name, torch.zeros(width, dtype=torch.bool)).clone()
            dropped[input_units(mask, name, self.arch)] = True
            self._dropped[name] = dropped
            if name not in self._handles:
                self._handles[name] = module.register_forward_pre_hook(self._hook(name))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], tuple | None]:
        # A closure, not a bound method: a deep copy of the model then shares this hook set
        # (and its suspension) instead of copying it.
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self._suspended or not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            dropped = self._dropped[name]
            if dropped.device != x.device:
                dropped = self._dropped[name] = dropped.to(x.device)
            return (x.masked_fill(dropped, 0), *args[1:])

        return hook

    def dropped(self, name: str) -> torch.Tensor | None:
        """The boolean input features of carrier module ``name`` that are zeroed, or ``None`` if it has no hook."""
        return self._dropped.get(name) if name in self._handles else None

    @property
    def active(self) -> bool:
        """Whether the hooks are installed and not suspended."""
        return bool(self._handles) and not self._suspended

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Let activations through unmasked inside the block (e.g. to record the original model's logits)."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        _INSTALLED.pop(self.model, None)

    @classmethod
    def of(cls, model: nn.Module) -> MaskHooks | None:
        """The hook set that ``apply_masks(..., "hooks")`` installed on ``model`` (to suspend or remove it)."""
        return _INSTALLED.get(model)

    def __enter__(self) -> MaskHooks:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()


class HooksCarrier(Carrier):
    """Neuron and head masks as forward pre-hooks on a model in memory (not persistent)."""

    name = "hooks"
    granularities = frozenset({"neurons", "heads"})
    persistent = False

    def apply(self, model: nn.Module, masks: Sequence[Mask], *, adapter_name: str) -> nn.Module:
        """Install the hooks on ``model``; :meth:`MaskHooks.of` finds them again."""
        # A second application adds to the hooks already there, so that one set can still be found and removed.
        hooks = MaskHooks.of(model) or MaskHooks(model)
        for mask in masks:
            hooks.add(mask)
        _INSTALLED[model] = hooks
        return model

    def verify(self, model: nn.Module, masks: Sequence[Mask]) -> None:
        """The model's active hook set zeroes every masked input feature.

        Raises:
            MaskVerificationError: No active hook set, or one that lets a masked feature through.
        """
        hooks = MaskHooks.of(model)
        if hooks is None or not hooks.active:
            raise MaskVerificationError("the model carries no active mask hooks (removed, suspended, or a copy)")
        for mask in masks:
            for name in mask.indices:
                dropped = hooks.dropped(name)
                units = input_units(mask, name, hooks.arch)
                if dropped is None or not bool(dropped[units.to(dropped.device)].all()):
                    raise MaskVerificationError(f"{name}: the hooks let some of the {mask.granularity} mask through")
