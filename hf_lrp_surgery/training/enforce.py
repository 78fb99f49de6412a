"""Keeping pruned units dead while a model trains.

* Neuron and head masks act on activations: a forward pre-hook on the carrier module (the MLP or
  attention output projection; :class:`~hf_lrp_surgery.carriers.hooks.MaskHooks`) zeroes the masked
  input channels. The forward is then exactly the
  pruned model's, and every weight that only reads or writes a masked channel gets an exactly zero
  gradient. When a mask starts to act, the optimizer's state (Adam's moments, or any state tensor
  shaped like the parameter) is cleared at those weights, so stale momentum cannot move them either.
* Soft neuron and head masks (:attr:`Mask.scales <hf_lrp_surgery.masks.Mask.scales>`) multiply the
  dampened channels by their scales in the same hooks; only the channels with scale 0 are dead, so the
  optimizer's state is cleared at the weights of those alone (a dampened channel keeps training).
  Soft weight masks are refused: re-scaling an entry after every step would shrink it step by step.
* Weight masks act on the weights: the entries are zeroed when the mask starts to act and again
  after every optimizer step, each time with the optimizer's state cleared at those entries
  (masking the gradient alone would let Adam's moments and weight decay move them).

Nothing is renamed or re-parametrised (``torch.nn.utils.prune`` would break ``save_pretrained``):
the hooks come off with :meth:`MaskEnforcer.remove` and the model saves as an ordinary checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from hf_lrp_surgery._deprecation import warn_deprecated
from hf_lrp_surgery.carriers.hooks import MaskHooks
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, resolve
from hf_lrp_surgery.lrp.layout import Layout
from hf_lrp_surgery.masks.geometry import zeroed_entries
from hf_lrp_surgery.masks.mask import Mask
from hf_lrp_surgery.masks.soft import hard_part

__all__ = ["MaskEnforcer", "merge_masks"]

# A parameter and the index that selects the frozen entries of it (and of optimizer state shaped like it).
_Entries = tuple[torch.Tensor, tuple[Any, ...]]


def merge_masks(old: Mask, new: Mask) -> Mask:
    """Deprecated: use ``old.union(new)`` (see :meth:`hf_lrp_surgery.masks.Mask.union`)."""
    warn_deprecated("merge_masks(old, new) is deprecated; use old.union(new)")
    return old.union(new)


class MaskEnforcer:
    """Holds masks in place on a model that is being trained.

    Args:
        model: The model being trained (optionally PEFT-wrapped; DDP users pass the inner module).

    Raises:
        UnsupportedArchitectureError: The model type is not supported.

    Example:
        >>> enforcer = MaskEnforcer(model)  # doctest: +SKIP
        >>> enforcer.add(mask, optimizer)  # doctest: +SKIP
        >>> optimizer.step(); enforcer.after_optimizer_step(optimizer)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.arch: ResolvedArchitecture = resolve(model)
        self.layout = Layout.of(self.arch)
        self.masks: dict[str, Mask] = {}
        self._hooks = MaskHooks(model, self.arch)
        self._weight_entries: list[_Entries] = []

    # -- adding masks -------------------------------------------------------------------------
    def add(self, mask: Mask, optimizer: Any = None) -> Mask:
        """Start enforcing ``mask`` (merged with a mask of the same granularity already in force).

        Args:
            mask: A mask for this model's layout.
            optimizer: The optimizer whose state is cleared at the pruned weights (optional).

        Returns:
            The mask now in force for that granularity.

        Raises:
            ValueError: The mask was built for another layout, or is a soft weight mask.
        """
        if mask.layout != self.layout:
            raise ValueError(
                f"this {mask.granularity} mask was built for a model with another layout "
                f"({mask.layout.num_layers} layers, {mask.layout.num_neurons} neurons) than the one "
                f"being trained ({self.layout.num_layers} layers, {self.layout.num_neurons} neurons)"
            )
        if mask.soft and mask.granularity == "weights":
            raise ValueError(
                "a soft weight mask cannot be enforced while training (scaling the entries after every step would "
                "compound); enforce mask.with_scales(None) or hard_part(mask), or apply the soft mask after training"
            )
        current = self.masks.get(mask.granularity)
        merged = mask if current is None else current.union(mask)
        self.masks[mask.granularity] = merged
        entries = self._frozen_entries(mask)
        if mask.granularity == "weights":
            self._weight_entries += entries
        else:
            self._hooks.add(mask)
        self._zero(entries, optimizer, weights=mask.granularity == "weights")
        return merged

    def _frozen_entries(self, mask: Mask) -> list[_Entries]:
        """Every weight entry a mask takes out of training (soft: its scale-0 units'), as ``(parameter, index)``."""
        return [entry.locate(self.model) for entry in zeroed_entries(hard_part(mask), self.arch)]

    @staticmethod
    @torch.no_grad()
    def _zero(entries: list[_Entries], optimizer: Any, *, weights: bool) -> None:
        """Clear the optimizer state at the entries, and zero the entries themselves for weight masks."""
        state = getattr(getattr(optimizer, "optimizer", optimizer), "state", None) if optimizer is not None else None
        for param, index in entries:
            if weights:
                param[index] = 0
            if state is None or param not in state:
                continue
            for value in state[param].values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value[index] = 0

    # -- training hooks -----------------------------------------------------------------------
    def after_optimizer_step(self, optimizer: Any = None) -> None:
        """Re-zero the masked weights and their optimizer state (call after every ``optimizer.step()``)."""
        if self._weight_entries:
            self._zero(self._weight_entries, optimizer, weights=True)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Let activations through unmasked inside the block (e.g. to record the original model's logits)."""
        with self._hooks.suspended():
            yield

    def remove(self) -> None:
        """Remove the hooks (the weights of weight masks stay zero)."""
        self._hooks.remove()

    def masks_for(self, fingerprint: Any) -> list[Mask]:
        """The masks in force, re-stamped with the current model's fingerprint (weights moved in training)."""
        return [replace(mask, fingerprint=fingerprint) for mask in self.masks.values()]
