"""The hooks carrier: neuron and head masks as forward pre-hooks that zero the carrier modules' inputs.

A pre-hook on the MLP / attention output projection that zeroes the masked input features computes
exactly the baked model, without touching a weight: a pruning sweep costs forward passes only
(:func:`~hf_lrp_surgery.circuits.ablated`), and in training every weight that only reads or writes
a masked feature gets an exactly zero gradient (:class:`~hf_lrp_surgery.training.MaskEnforcer`).
A soft mask's dampened features are multiplied by their scale instead (exactly the baked model's scaled
columns and the adapter's IA3 vector); a feature two masks name keeps the smaller scale.
The hooks can be suspended (to see the unmasked model) and removed. They live on a model in memory
only: ``apply_masks(model, mask, "hooks")`` works, saving it is refused.

On a mixture-of-experts model a neuron mask zeroes each expert's gated product (the input of its down
matrix) at the masked units ``e * I + i``, through a tap inside the eager expert loop
(:mod:`hf_lrp_surgery.lrp.moe`); the experts must run ``experts_implementation="eager"``.
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
from hf_lrp_surgery.lrp.moe import add_product_tap
from hf_lrp_surgery.masks.geometry import input_scales, input_units
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
        self._dropped: dict[str, torch.Tensor] = {}  # carrier module name -> bool [in_features]: masked
        self._scales: dict[str, torch.Tensor] = {}  # carrier module name -> float32 [in_features]: 1 where kept
        self._soft: set[str] = set()  # modules with a dampened (0 < scale < 1) feature: multiplied, not filled
        self._handles: dict[str, Any] = {}
        self._suspended = False

    def add(self, mask: Mask) -> None:
        """Also zero the input features that ``mask`` prunes (a union with what is already hooked).

        A soft mask's features are multiplied by their scales; a feature already hooked keeps the
        smaller of its two scales (see :meth:`~hf_lrp_surgery.masks.Mask.union`).

        Raises:
            ValueError: A weight mask (weights are not a carrier's inputs).
            MaskManifestError: The mask does not fit the model's layout.
            UnsupportedArchitectureError: A neuron mask on a mixture-of-experts model whose experts do not
                run the eager loop.
        """
        if mask.granularity == "weights":
            raise ValueError("forward pre-hooks carry neuron and head masks; zero weight masks in the weights")
        mask.validate(self.arch)
        conv1d = self.arch.spec.orientation == "conv1d"
        experts = self.arch.spec.moe is not None and mask.granularity == "neurons"
        for name in mask.indices:
            module = unwrap_model(self.model).get_submodule(name)
            width = self.arch.num_neurons if experts else parameter(module).shape[0 if conv1d else 1]
            units = input_units(mask, name, self.arch)
            scales = self._scales.get(name, torch.ones(width)).cpu().clone()
            scales[units] = torch.minimum(scales[units], input_scales(mask, name, self.arch))
            self._scales[name] = scales
            self._dropped[name] = scales.lt(1)
            if bool((scales.gt(0) & scales.lt(1)).any()):
                self._soft.add(name)
            if name in self._handles:
                continue
            if experts:
                tap = self._expert_tap(name, self.arch.expert_width)
                self._handles[name] = add_product_tap(module, tap, model_type=self.arch.spec.model_type)
            else:
                self._handles[name] = module.register_forward_pre_hook(self._hook(name))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], tuple | None]:
        # A closure, not a bound method: a deep copy of the model then shares this hook set
        # (and its suspension) instead of copying it.
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self._suspended or not args or not isinstance(args[0], torch.Tensor):
                return None
            return (self._masked(name, args[0], slice(None)), *args[1:])

        return hook

    def _masked(self, name: str, x: torch.Tensor, features: slice) -> torch.Tensor:
        """``x`` with the masked features (its last axis; ``features`` of the module's) zeroed or scaled."""
        if name in self._soft:
            scales = self._scales[name]
            if scales.device != x.device:
                scales = self._scales[name] = scales.to(x.device)
            return x * scales[features].to(x.dtype)
        dropped = self._dropped[name]
        if dropped.device != x.device:
            dropped = self._dropped[name] = dropped.to(x.device)
        return x.masked_fill(dropped[features], 0)

    def _expert_tap(self, name: str, width: int) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]:
        # Zeroes expert e's gated product at its masked neurons (units e * I .. e * I + I - 1 of the block).
        def tap(expert: int, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
            if self._suspended:
                return None
            return self._masked(name, x, slice(expert * width, (expert + 1) * width))

        return tap

    def dropped(self, name: str) -> torch.Tensor | None:
        """The input features of carrier module ``name`` that are masked (zeroed or dampened); ``None``: no hook."""
        return self._dropped.get(name) if name in self._handles else None

    def scales(self, name: str) -> torch.Tensor | None:
        """The factor of each input feature of ``name`` (1 kept, 0 zeroed, else dampened); ``None``: no hook."""
        return self._scales.get(name) if name in self._handles else None

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
        # A temporary set (an ablation's) leaves the set apply_masks installed registered.
        if _INSTALLED.get(self.model) is self:
            del _INSTALLED[self.model]

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
        """The model's active hook set zeroes every masked input feature (a soft mask's: scales it by its scale).

        Raises:
            MaskVerificationError: No active hook set, or one that lets a masked feature through (or
                scales it by another factor than the mask's).
        """
        hooks = MaskHooks.of(model)
        if hooks is None or not hooks.active:
            raise MaskVerificationError("the model carries no active mask hooks (removed, suspended, or a copy)")
        for mask in masks:
            for name in mask.indices:
                scales = hooks.scales(name)
                units = input_units(mask, name, hooks.arch)
                if scales is None:
                    raise MaskVerificationError(f"{name}: the hooks let some of the {mask.granularity} mask through")
                expected = input_scales(mask, name, hooks.arch).to(scales.device)
                if not bool(scales[units.to(scales.device)].eq(expected).all()):
                    raise MaskVerificationError(
                        f"{name}: the hooks let some of the {mask.granularity} mask through (or scale it by other "
                        "factors than the mask's)"
                    )
