"""Where a model's prunable components live, as a plain value that scores and masks carry.

The three component kinds (:data:`GRANULARITIES`) are the units the engine attributes and the masks
prune: MLP ``neurons`` (inputs of the block's MLP output projection), attention ``heads`` (slices of
the input of the attention output projection) and individual ``weights`` of the prunable matrices.
A :class:`Layout` records, per kind, which modules hold them, so that saved scores and masks can be
read, counted and checked without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hf_lrp_surgery.lrp.architectures import Orientation, ResolvedArchitecture

__all__ = ["GRANULARITIES", "Granularity", "Layout"]

#: A component kind: what a relevance pass collects and a mask prunes.
Granularity = Literal["neurons", "heads", "weights"]
#: Every component kind, in the order reports list them.
GRANULARITIES: tuple[Granularity, ...] = ("neurons", "heads", "weights")


@dataclass(frozen=True)
class Layout:
    """Where a model's scored components live, so that scores and masks need no model to be read.

    Attributes:
        num_layers: Number of decoder blocks.
        num_neurons: MLP neurons per block (mixture of experts: ``E * I``, unit ``e * I + i`` being neuron
            ``i`` of expert ``e``).
        num_heads: Attention heads per block.
        neuron_modules: Per block, the name of the MLP output projection (its input holds the neurons;
            mixture of experts: the experts module holding the fused expert parameters).
        head_modules: Per block, the name of the attention output projection.
        weight_modules: Prunable module name -> ``(layer, role)``, in block order.
        weight_orientation: How the prunable matrices are stored: ``"linear"`` (``nn.Linear``,
            ``[out, in]``: an output feature is a row) or ``"conv1d"`` (GPT-2's ``Conv1D``, ``[in, out]``: an
            output feature is a column); ``None`` when read from a layout saved before it was recorded.
            It follows from the architecture (which the fingerprint names), so it takes no part in
            comparing layouts: an older saved layout still equals the model's.

    Example:
        >>> layout = Layout(2, 8, 2, ("m.0.down", "m.1.down"), ("m.0.o", "m.1.o"), {"m.0.o": (0, "o")})
        >>> layout.units("neurons"), layout.carriers("heads")
        (16, ('m.0.o', 'm.1.o'))
    """

    num_layers: int
    num_neurons: int
    num_heads: int
    neuron_modules: tuple[str, ...]
    head_modules: tuple[str, ...]
    weight_modules: dict[str, tuple[int, str]]
    weight_orientation: Orientation | None = field(default="linear", compare=False)

    @classmethod
    def of(cls, arch: ResolvedArchitecture) -> Layout:
        """The layout of a resolved model."""
        spec = arch.spec
        return cls(
            num_layers=arch.num_layers,
            num_neurons=arch.num_neurons,
            num_heads=arch.num_heads,
            neuron_modules=tuple(f"{spec.decoder_layers}.{i}.{spec.mlp_out}" for i in range(arch.num_layers)),
            head_modules=tuple(f"{spec.decoder_layers}.{i}.{spec.o_proj}" for i in range(arch.num_layers)),
            weight_modules={p.name: (p.layer, p.role) for p in arch.prunable},
            weight_orientation=spec.orientation,
        )

    def carriers(self, granularity: Granularity) -> tuple[str, ...]:
        """Every module that holds components of one kind, in block order.

        Raises:
            ValueError: ``granularity`` is not a component kind.
        """
        if granularity == "neurons":
            return self.neuron_modules
        if granularity == "heads":
            return self.head_modules
        if granularity == "weights":
            return tuple(self.weight_modules)
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")

    def layer_of(self, granularity: Granularity, module: str) -> int:
        """The decoder block of a module that holds components of one kind."""
        if granularity == "weights":
            return self.weight_modules[module][0]
        return self.carriers(granularity).index(module)

    def units_per_module(self, granularity: Granularity) -> int | None:
        """Units each carrier holds: neurons or heads per block; ``None`` for weights (sizes differ)."""
        return {"neurons": self.num_neurons, "heads": self.num_heads}.get(granularity)

    def units(self, granularity: Granularity, arch: ResolvedArchitecture | None = None) -> int:
        """Number of prunable units of one kind in the whole model.

        Args:
            granularity: The component kind.
            arch: The resolved model; needed for weights (the layout holds no matrix sizes).

        Raises:
            ValueError: Weights were asked for without ``arch``.
        """
        per_module = self.units_per_module(granularity)
        if per_module is not None:
            return self.num_layers * per_module
        if arch is None:
            raise ValueError("counting weights needs the resolved model")
        return sum(p.weight.numel() for p in arch.prunable)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return {
            "num_layers": self.num_layers,
            "num_neurons": self.num_neurons,
            "num_heads": self.num_heads,
            "neuron_modules": list(self.neuron_modules),
            "head_modules": list(self.head_modules),
            "weight_modules": {name: list(where) for name, where in self.weight_modules.items()},
            "weight_orientation": self.weight_orientation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        """Rebuild a layout saved with :meth:`to_dict` (one saved before ``weight_orientation`` was recorded: ``None``).

        Raises:
            ValueError: An unknown weight orientation.
        """
        orientation = data.get("weight_orientation")
        if orientation not in (None, "linear", "conv1d"):
            raise ValueError(f"weight_orientation must be 'linear' or 'conv1d', got {orientation!r}")
        return cls(
            num_layers=int(data["num_layers"]),
            num_neurons=int(data["num_neurons"]),
            num_heads=int(data["num_heads"]),
            neuron_modules=tuple(data["neuron_modules"]),
            head_modules=tuple(data["head_modules"]),
            weight_modules={name: (int(w[0]), str(w[1])) for name, w in data["weight_modules"].items()},
            weight_orientation=orientation,
        )
