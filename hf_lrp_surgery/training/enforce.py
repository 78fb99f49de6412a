"""Keeping pruned units dead while a model trains.

* Neuron and head masks act on activations: a forward pre-hook on the carrier module (the MLP or
  attention output projection) zeroes the masked input channels. The forward is then exactly the
  pruned model's, and every weight that only reads or writes a masked channel gets an exactly zero
  gradient. When a mask starts to act, the optimizer's state (Adam's moments, or any state tensor
  shaped like the parameter) is cleared at those weights, so stale momentum cannot move them either.
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

from hf_lrp_surgery.apply import input_units
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, resolve, unwrap_model
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.scoring import Layout

__all__ = ["MaskEnforcer", "merge_masks"]

# A parameter and the index that selects the frozen entries of it (and of optimizer state shaped like it).
_Entries = tuple[nn.Parameter, tuple[Any, ...]]


def merge_masks(old: Mask, new: Mask) -> Mask:
    """The union of two masks of one granularity on one model layout.

    Args:
        old: The mask already in force.
        new: The mask to add.

    Returns:
        A mask with every unit of both; the fingerprint and creation time are ``new``'s and the
        provenance lists both.

    Raises:
        ValueError: Different granularities or layouts.
    """
    if old.granularity != new.granularity or old.layout != new.layout:
        raise ValueError(f"cannot merge a {new.granularity} mask into a {old.granularity} mask of another layout")
    indices = dict(old.indices)
    for name, index in new.indices.items():
        indices[name] = torch.cat([indices[name], index]).unique() if name in indices else index
    provenance = {"merged": [old.provenance, new.provenance]}
    return replace(new, indices=indices, provenance=provenance)


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
        self._dropped: dict[str, torch.Tensor] = {}  # carrier module name -> bool [in_features]
        self._handles: dict[str, Any] = {}
        self._weight_entries: list[_Entries] = []
        self._suspended = False

    # -- adding masks -------------------------------------------------------------------------
    def add(self, mask: Mask, optimizer: Any = None) -> Mask:
        """Start enforcing ``mask`` (merged with a mask of the same granularity already in force).

        Args:
            mask: A mask for this model's layout.
            optimizer: The optimizer whose state is cleared at the pruned weights (optional).

        Returns:
            The mask now in force for that granularity.

        Raises:
            ValueError: The mask was built for another layout.
        """
        if mask.layout != self.layout:
            raise ValueError(
                f"this {mask.granularity} mask was built for a model with another layout "
                f"({mask.layout.num_layers} layers, {mask.layout.num_neurons} neurons) than the one "
                f"being trained ({self.layout.num_layers} layers, {self.layout.num_neurons} neurons)"
            )
        current = self.masks.get(mask.granularity)
        merged = mask if current is None else merge_masks(current, mask)
        self.masks[mask.granularity] = merged
        entries = self._frozen_entries(mask)
        if mask.granularity == "weights":
            self._weight_entries += entries
        else:
            for name in mask.indices:
                self._install(name, mask)
        self._zero(entries, optimizer, weights=mask.granularity == "weights")
        return merged

    def _install(self, name: str, mask: Mask) -> None:
        module = self._module(name)
        width = self._weight(module).shape[0 if self.arch.spec.orientation == "conv1d" else 1]
        dropped = self._dropped.get(name, torch.zeros(width, dtype=torch.bool))
        dropped = dropped.clone()
        dropped[input_units(mask, name, self.arch)] = True
        self._dropped[name] = dropped
        if name not in self._handles:
            self._handles[name] = module.register_forward_pre_hook(self._pre_hook(name))

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self._suspended or not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            dropped = self._dropped[name]
            if dropped.device != x.device:
                dropped = self._dropped[name] = dropped.to(x.device)
            return (x.masked_fill(dropped, 0), *args[1:])

        return hook

    def _module(self, name: str) -> nn.Module:
        return unwrap_model(self.model).get_submodule(name)

    @staticmethod
    def _weight(module: nn.Module) -> torch.Tensor:
        return getattr(module, "base_layer", module).weight

    def _frozen_entries(self, mask: Mask) -> list[_Entries]:
        """Every weight entry a mask takes out of training, as ``(parameter, index)`` pairs."""
        conv1d = self.arch.spec.orientation == "conv1d"
        entries: list[_Entries] = []
        for name, index in mask.indices.items():
            weight = self._weight(self._module(name))
            if mask.granularity == "weights":
                entries.append((weight, torch.unravel_index(index.to(weight.device), weight.shape)))
                continue
            units = input_units(mask, name, self.arch).to(weight.device)
            entries.append((weight, (units,) if conv1d else (slice(None), units)))
            if mask.granularity == "neurons":
                spec = self.arch.spec
                layer = mask.layer_of(name)
                for role in spec.mlp_in:
                    writer = self._module(f"{spec.decoder_layers}.{layer}.{role}")
                    writer_weight = self._weight(writer)
                    entries.append((writer_weight, (slice(None), units) if conv1d else (units,)))
                    bias = getattr(getattr(writer, "base_layer", writer), "bias", None)
                    if bias is not None:
                        entries.append((bias, (units,)))
        return entries

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
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    def remove(self) -> None:
        """Remove the hooks (the weights of weight masks stay zero)."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    def masks_for(self, fingerprint: Any) -> list[Mask]:
        """The masks in force, re-stamped with the current model's fingerprint (weights moved in training)."""
        return [replace(mask, fingerprint=fingerprint) for mask in self.masks.values()]
