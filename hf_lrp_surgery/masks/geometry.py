"""Which weight entries a mask zeroes: the one place that knows how a neuron or a head sits in the weights.

* A **neuron** is an input feature of the MLP output projection (its column; a row of GPT-2's Conv1D,
  which stores ``[in, out]``) and an output feature of every MLP input projection (its row, and its
  bias entry), so that the pruned neuron neither reads nor writes anything.
* A **head** is a block of ``head_dim`` input features of the attention output projection.
* A **weight** is one element of a prunable matrix, by flat index in the order the module stores it.

Every carrier reads this: bake zeroes the entries, verification checks the carrier's input side,
the training enforcer freezes them, circuit ablation zeroes and restores weight elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, parameter, unwrap_model
from hf_lrp_surgery.masks.mask import Mask

__all__ = ["ZeroedEntry", "input_units", "zeroed_entries"]


@dataclass(frozen=True)
class ZeroedEntry:
    """Entries of one parameter that a mask sets to zero.

    Attributes:
        module: Full name of the module that owns the parameter.
        parameter: ``"weight"`` or ``"bias"``.
        index: The index into the parameter (tensors on the CPU; ``slice(None)`` for a whole axis).
        carried: ``True`` for the carrier's own entries, the ones an adapter or a hook acts on and
            verification reads (the carrier's input side, or weight elements); ``False`` for the rows
            and biases of the MLP input projections that write a pruned neuron.
    """

    module: str
    parameter: Literal["weight", "bias"]
    index: tuple[Any, ...]
    carried: bool

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


def _owner(arch: ResolvedArchitecture, name: str) -> nn.Module:
    module = arch.model.get_submodule(name)
    return getattr(module, "base_layer", module)


def zeroed_entries(mask: Mask, arch: ResolvedArchitecture) -> list[ZeroedEntry]:
    """Every weight and bias entry that ``mask`` sets to zero in a model of architecture ``arch``.

    Args:
        mask: A mask of any granularity.
        arch: The resolved architecture of the model it was built for.

    Returns:
        Per carrier module in the mask, its carried entry first, then (neurons) the writer rows and
        biases of that block's MLP input projections.

    Raises:
        MaskManifestError: The mask does not fit the model (see :meth:`Mask.validate`).

    Example:
        >>> for entry in zeroed_entries(mask, resolve(model)):  # doctest: +SKIP
        ...     param, index = entry.locate(model)
    """
    mask.validate(arch)
    # Linear stores [out, in]; GPT-2's Conv1D [in, out]: the input axis is the second or the first.
    conv1d = arch.spec.orientation == "conv1d"
    entries: list[ZeroedEntry] = []
    for name, index in mask.indices.items():
        if mask.granularity == "weights":
            shape = parameter(arch.model.get_submodule(name)).shape
            entries.append(ZeroedEntry(name, "weight", torch.unravel_index(index, shape), carried=True))
            continue
        units = input_units(mask, name, arch)
        entries.append(ZeroedEntry(name, "weight", (units,) if conv1d else (slice(None), units), carried=True))
        if mask.granularity != "neurons":
            continue
        # The writers' output features: the neuron's row of each input projection (rows i and I + i of
        # a fused gate|up projection).
        for writer, outputs in arch.neuron_writers(mask.layer_of(name), units):
            entries.append(
                ZeroedEntry(writer, "weight", (slice(None), outputs) if conv1d else (outputs,), carried=False)
            )
            if getattr(_owner(arch, writer), "bias", None) is not None:
                entries.append(ZeroedEntry(writer, "bias", (outputs,), carried=False))
    return entries
