"""Which weight entries a mask zeroes: the one place that knows how a neuron or a head sits in the weights.

* A **neuron** is an input feature of the MLP output projection (its column; a row of GPT-2's Conv1D,
  which stores ``[in, out]``) and an output feature of every MLP input projection (its row, and its
  bias entry), so that the pruned neuron neither reads nor writes anything.
* An **expert neuron** of a mixture-of-experts block (unit ``e * I + i``: neuron ``i`` of expert ``e``) is
  the entries ``down[e, :, i]`` of the experts' fused ``[E, H, I]`` down parameter (carried) and the rows
  ``gate_up[e, i, :]`` (gate) and ``gate_up[e, I + i, :]`` (up) of the fused ``[E, 2 I, H]`` gate|up
  parameter (the writers).
* A **head** is a block of ``head_dim`` input features of the attention output projection.
* A **weight** is one element of a prunable matrix, by flat index in the order the module stores it.

A **soft** mask (:attr:`Mask.scales <hf_lrp_surgery.masks.Mask.scales>`) scales the carried entries of a
unit by its ``alpha`` instead of zeroing them (:attr:`ZeroedEntry.scale`); the writers of a neuron (the
rows of the MLP input projections, and the expert ``gate_up`` rows) are zeroed only for the units with
``alpha == 0``: scaling a writer row by ``alpha`` is not scaling the neuron by ``alpha`` in a gated MLP
(``act(alpha g) * alpha u != alpha act(g) u``), scaling the reader column is, in every MLP.

Every carrier reads this: bake zeroes (or scales) the entries, verification checks the carrier's input side,
the training enforcer freezes them, circuit ablation zeroes and restores weight elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, parameter, unwrap_model
from hf_lrp_surgery.lrp.moe import expert_units
from hf_lrp_surgery.masks.mask import Mask

__all__ = ["ZeroedEntry", "input_scales", "input_units", "zeroed_entries"]


@dataclass(frozen=True)
class ZeroedEntry:
    """Entries of one parameter that a mask sets to zero.

    Attributes:
        module: Full name of the module that owns the parameter.
        parameter: The parameter's name in that module: ``"weight"`` or ``"bias"``, or for the experts module
            of a mixture-of-experts block its fused 3-D parameters (``"down_proj"``, ``"gate_up_proj"``).
        index: The index into the parameter (tensors on the CPU; ``slice(None)`` for a whole axis). For the
            3-D expert parameters, ``(experts, slice(None), neurons)`` of ``down`` or ``(experts, rows)`` of
            ``gate_up``: paired index tensors of equal length, one entry per pruned neuron (row).
        carried: ``True`` for the carrier's own entries, the ones an adapter or a hook acts on and
            verification reads (the carrier's input side, or weight elements); ``False`` for the rows
            and biases of the MLP input projections that write a pruned neuron.
        scale: ``None``: the entries become 0 (a hard mask, and every writer entry). For the carried
            entries of a soft mask: float32 factors broadcastable to ``param[index]`` (one per unit,
            repeated over a head's columns), 0 for a pruned unit: the entries become
            ``param[index] * scale``.
    """

    module: str
    parameter: Literal["weight", "bias"] | str
    index: tuple[Any, ...]
    carried: bool
    scale: torch.Tensor | None = None

    def target(self, values: torch.Tensor) -> torch.Tensor:
        """What the entries ``values = param[index]`` of the unmasked model become under the mask.

        Example:
            >>> param.data[index] = entry.target(param.data[index])  # doctest: +SKIP
        """
        if self.scale is None:
            return torch.zeros_like(values)
        return values * self.scale.to(device=values.device, dtype=values.dtype)

    @property
    def zero(self) -> torch.Tensor | None:
        """Where the entries must be exactly zero: ``None`` for all, else a boolean broadcastable like :attr:`scale`."""
        return None if self.scale is None else self.scale.eq(0)

    def locate(self, model: nn.Module) -> tuple[torch.Tensor, tuple[Any, ...]]:
        """The parameter in ``model`` (through PEFT wrappers) and the index, on the parameter's device.

        Example:
            >>> param, index = entry.locate(model)  # doctest: +SKIP
            >>> param.data[index] = 0  # doctest: +SKIP
        """
        module = unwrap_model(model).get_submodule(self.module)
        param = getattr(getattr(module, "base_layer", module), self.parameter)
        return param, tuple(i.to(param.device) if isinstance(i, torch.Tensor) else i for i in self.index)


def input_units(mask: Mask, name: str, arch: ResolvedArchitecture) -> torch.Tensor:
    """Input features of the carrier module that the mask zeroes (neurons, or every column of a head).

    Args:
        mask: A neuron or head mask.
        name: One of its carrier modules.
        arch: The resolved architecture of the model it was built for.

    Returns:
        The int64 indices of the carrier's input features.

    Example:
        >>> input_units(head_mask, "model.layers.0.self_attn.o_proj", resolve(model))  # doctest: +SKIP
        tensor([ 8,  9, 10, 11])
    """
    index = mask.indices[name]
    if mask.granularity == "heads":
        return (index[:, None] * arch.head_dim + torch.arange(arch.head_dim)).flatten()
    return index


def input_scales(mask: Mask, name: str, arch: ResolvedArchitecture) -> torch.Tensor:
    """The float32 scale of each input feature :func:`input_units` returns (0 for a hard mask).

    A head's scale is repeated over its ``head_dim`` columns.

    Example:
        >>> input_scales(soft_head_mask, "model.layers.0.self_attn.o_proj", resolve(model))  # doctest: +SKIP
        tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    scale = mask.scale_of(name)
    if mask.granularity == "heads":
        return scale.repeat_interleave(arch.head_dim)
    return scale


def _owner(arch: ResolvedArchitecture, name: str) -> nn.Module:
    module = arch.model.get_submodule(name)
    return getattr(module, "base_layer", module)


def zeroed_entries(mask: Mask, arch: ResolvedArchitecture) -> list[ZeroedEntry]:
    """Every weight and bias entry that ``mask`` sets to zero in a model of architecture ``arch``.

    Args:
        mask: A mask of any granularity.
        arch: The resolved architecture of the model it was built for.

    Returns:
        Per carrier module in the mask, its carried entry first (with the unit scales of a soft mask),
        then (neurons) the writer rows and biases of that block's MLP input projections (of the
        neurons with scale 0 only, for a soft mask).

    Raises:
        MaskManifestError: The mask does not fit the model (see :meth:`Mask.validate`).
        UnsupportedArchitectureError: A weight mask on a mixture-of-experts model.

    Example:
        >>> for entry in zeroed_entries(mask, resolve(model)):  # doctest: +SKIP
        ...     param, index = entry.locate(model)
    """
    arch.check_granularity(mask.granularity)
    mask.validate(arch)
    if arch.spec.moe is not None and mask.granularity == "neurons":
        return _expert_neuron_entries(mask, arch)
    # Linear stores [out, in]; GPT-2's Conv1D [in, out]: the input axis is the second or the first.
    conv1d = arch.spec.orientation == "conv1d"
    entries: list[ZeroedEntry] = []
    for name, index in mask.indices.items():
        if mask.granularity == "weights":
            shape = parameter(arch.model.get_submodule(name)).shape
            scale = mask.scale_of(name) if mask.soft else None
            entries.append(ZeroedEntry(name, "weight", torch.unravel_index(index, shape), carried=True, scale=scale))
            continue
        units = input_units(mask, name, arch)
        # param[index] is [out, units] for Linear, [units, out] for Conv1D: the scale runs along the units.
        scale = input_scales(mask, name, arch)[:, None] if conv1d else input_scales(mask, name, arch)
        entries.append(
            ZeroedEntry(
                name,
                "weight",
                (units,) if conv1d else (slice(None), units),
                carried=True,
                scale=scale if mask.soft else None,
            )
        )
        if mask.granularity != "neurons":
            continue
        # The writers' output features: the neuron's row of each input projection (rows i and I + i of
        # a fused gate|up projection), of the pruned (alpha == 0) neurons only.
        pruned = units[mask.scale_of(name).eq(0)]
        if not pruned.numel():
            continue
        for writer, outputs in arch.neuron_writers(mask.layer_of(name), pruned):
            entries.append(
                ZeroedEntry(writer, "weight", (slice(None), outputs) if conv1d else (outputs,), carried=False)
            )
            if getattr(_owner(arch, writer), "bias", None) is not None:
                entries.append(ZeroedEntry(writer, "bias", (outputs,), carried=False))
    return entries


def _expert_neuron_entries(mask: Mask, arch: ResolvedArchitecture) -> list[ZeroedEntry]:
    """A mixture-of-experts neuron mask: unit ``e * I + i`` is ``down[e, :, i]`` and ``gate_up[e, i | I + i, :]``."""
    moe = arch.spec.moe
    assert moe is not None  # called for moe entries only
    entries: list[ZeroedEntry] = []
    for name, index in mask.indices.items():
        experts, neurons = expert_units(index, arch.expert_width)
        scale = mask.scale_of(name)
        # down[experts, :, neurons] is [n, H]: one scale per row.
        soft_scale = scale[:, None] if mask.soft else None
        entries.append(ZeroedEntry(name, moe.down, (experts, slice(None), neurons), carried=True, scale=soft_scale))
        pruned = scale.eq(0)
        experts, neurons = experts[pruned], neurons[pruned]
        if not neurons.numel():
            continue
        rows = torch.cat([neurons, neurons + arch.expert_width])  # gate row i, up row I + i
        entries.append(ZeroedEntry(name, moe.gate_up, (torch.cat([experts, experts]), rows), carried=False))
    return entries
