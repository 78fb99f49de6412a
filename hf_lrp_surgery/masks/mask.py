"""The mask value object: what is pruned, on which model, and why, with its manifest and files.

A :class:`Mask` names what is pruned, per carrier module: for MLP neurons the indices of the
neurons at the input of the block's MLP output projection, for attention heads the head indices at
the input of the attention output projection, for weights the flat indices into a weight matrix
(in the order the module stores it). It records the model it was built for (a fingerprint of config
and weights), the method and options that produced it, and counts per layer. It saves as
``mask.safetensors`` + ``mask.json`` and refuses to be applied to another model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.fingerprint import ModelFingerprint, check_fingerprint
from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.lrp.layout import GRANULARITIES, Granularity, Layout

__all__ = ["Mask"]

_TENSORS_FILE = "mask.safetensors"
_META_FILE = "mask.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Mask:
    """What to prune, for which model, and why.

    Attributes:
        granularity: ``"neurons"``, ``"heads"`` or ``"weights"``.
        fingerprint: The base model the mask was selected on (config and weight hashes).
        layout: Where the components live in that model.
        indices: Carrier module name -> sorted unique ``int64`` indices of the pruned units (neurons,
            heads, or flat weight elements). Modules with nothing pruned are absent.
        provenance: The scores' method and settings and the selection options.
        created: UTC creation time (ISO 8601).

    Example:
        >>> mask = select(scores, "neurons", 100)  # doctest: +SKIP
        >>> mask.count, mask.per_layer()[:3]  # doctest: +SKIP
        (100, [12, 0, 3])
    """

    granularity: Granularity
    fingerprint: ModelFingerprint
    layout: Layout
    indices: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be 'neurons', 'heads' or 'weights', got {self.granularity!r}")
        known = set(self.carriers())
        unknown = sorted(set(self.indices) - known)
        if unknown:
            raise ValueError(f"mask names modules the layout does not have for {self.granularity}: {unknown[:3]}")
        for name, idx in self.indices.items():
            if idx.dtype != torch.int64 or idx.dim() != 1:
                raise ValueError(
                    f"mask indices of {name} must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}"
                )

    # -- reading ------------------------------------------------------------------------------
    def carriers(self) -> tuple[str, ...]:
        """Every module that could carry this granularity's pruning, in block order."""
        return self.layout.carriers(self.granularity)

    def layer_of(self, module: str) -> int:
        """The decoder block of a carrier module."""
        return self.layout.layer_of(self.granularity, module)

    @property
    def count(self) -> int:
        """Total number of pruned units."""
        return sum(int(idx.numel()) for idx in self.indices.values())

    def per_layer(self) -> list[int]:
        """Pruned units per decoder block."""
        counts = [0] * self.layout.num_layers
        for name, idx in self.indices.items():
            counts[self.layer_of(name)] += int(idx.numel())
        return counts

    def per_module(self) -> dict[str, int]:
        """Pruned units per carrier module (modules with none included)."""
        return {name: int(self.indices[name].numel()) if name in self.indices else 0 for name in self.carriers()}

    def units_per_layer(self) -> list[int]:
        """Prunable units per decoder block: the totals :meth:`per_layer` counts against.

        Neurons and heads: the same number in every block. Weights: the elements of the matrices the
        selection ranked (``provenance["module_sizes"]``; 0 for blocks it left out).
        """
        per_module = self.layout.units_per_module(self.granularity)
        if per_module is not None:
            return [per_module] * self.layout.num_layers
        totals = [0] * self.layout.num_layers
        for name, size in self.provenance.get("module_sizes", {}).items():
            totals[self.layout.layer_of("weights", name)] += int(size)
        return totals

    def dense(self, name: str, size: int) -> torch.Tensor:
        """A boolean vector of ``size`` units of module ``name``, ``True`` where pruned."""
        out = torch.zeros(size, dtype=torch.bool)
        if name in self.indices:
            out[self.indices[name]] = True
        return out

    # -- geometry -----------------------------------------------------------------------------
    def union(self, other: Mask) -> Mask:
        """Every unit of this mask and of ``other`` (one granularity, one layout).

        Args:
            other: The mask to add (e.g. a later surgery's).

        Returns:
            The union; its fingerprint and creation time are ``other``'s and its provenance lists both.

        Raises:
            ValueError: Different granularities or layouts.

        Example:
            >>> in_force = in_force.union(new_mask)  # doctest: +SKIP
        """
        if self.granularity != other.granularity or self.layout != other.layout:
            raise ValueError(
                f"cannot merge a {other.granularity} mask into a {self.granularity} mask of another layout"
            )
        indices = dict(self.indices)
        for name, index in other.indices.items():
            indices[name] = torch.cat([indices[name], index]).unique() if name in indices else index
        return replace(other, indices=indices, provenance={"merged": [self.provenance, other.provenance]})

    def complement(self, *, provenance: dict[str, Any] | None = None, total: dict[str, int] | None = None) -> Mask:
        """The mask of every unit this mask does not prune (of neurons or heads; weights need ``total``).

        Args:
            provenance: The new mask's provenance (default: ``{"complement_of": self.provenance}``).
            total: For weights: module name -> number of elements.

        Returns:
            The complementary mask: ablating it removes exactly what this mask keeps.

        Raises:
            ValueError: A weight mask without ``total``.

        Example:
            >>> circuit = mask.complement()  # doctest: +SKIP
        """
        per_module = self.layout.units_per_module(self.granularity)
        if per_module is None and total is None:
            raise ValueError("the complement of a weight mask needs total= (module name -> number of elements)")
        sizes = total if total is not None else dict.fromkeys(self.carriers(), per_module)
        indices = {}
        for name in self.carriers():
            kept = (~self.dense(name, sizes[name])).nonzero().flatten()
            if kept.numel():
                indices[name] = kept
        return Mask(
            granularity=self.granularity,
            fingerprint=self.fingerprint,
            layout=self.layout,
            indices=indices,
            provenance=provenance if provenance is not None else {"complement_of": self.provenance},
        )

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one this mask was built for.

        Raises:
            FingerprintMismatchError: Different architecture or weights.
        """
        check_fingerprint(self.fingerprint, model, what=f"this {self.granularity} mask")

    def summary(self) -> str:
        """A per-layer table of pruned units, with the method that chose them."""
        scores = self.provenance.get("scores", {})
        lines = [
            f"{self.count} {self.granularity} pruned, model {self.fingerprint.short()}, "
            f"scores: {scores.get('method', '?')}, selection: {self.provenance.get('selection', {})}",
            f"{'layer':>5} {'pruned':>8} {'of':>10} {'share':>8}",
        ]
        for layer, (count, total) in enumerate(zip(self.per_layer(), self.units_per_layer())):
            share = f"{100 * count / total:.2f}%" if total else "-"
            lines.append(f"{layer:>5} {count:>8} {total or '-':>10} {share:>8}")
        return "\n".join(lines)

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest: granularity, counts per layer and module, fingerprint, provenance."""
        return {
            "format_version": _FORMAT_VERSION,
            "hf_lrp_surgery_version": __version__,
            "granularity": self.granularity,
            "count": self.count,
            "units_per_module": self.layout.units_per_module(self.granularity),
            "per_layer": self.per_layer(),
            "per_module": {k: v for k, v in self.per_module().items() if v},
            "fingerprint": self.fingerprint.to_dict(),
            "layout": self.layout.to_dict(),
            "provenance": self.provenance,
            "created": self.created,
        }

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Save as ``mask.safetensors`` + ``mask.json``, atomically (a directory appears complete or not at all).

        Args:
            directory: Destination directory (replaced if it exists).

        Returns:
            The directory.
        """
        with atomic_directory(directory) as tmp:
            self.write_into(tmp)
        return Path(directory)

    def write_into(self, directory: Path) -> None:
        """Write the two mask files into an existing (staging) directory."""
        tensors = {name: idx.contiguous() for name, idx in self.indices.items()}
        save_file(tensors, str(directory / _TENSORS_FILE), metadata={"format": "pt"})
        (directory / _META_FILE).write_text(json.dumps(self.manifest(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Mask:
        """Load a mask saved with :meth:`save`.

        Raises:
            FileNotFoundError: The directory holds no mask.
            ValueError: The files are from an unknown format version or inconsistent.
        """
        directory = Path(directory)
        if not (directory / _META_FILE).is_file() or not (directory / _TENSORS_FILE).is_file():
            raise FileNotFoundError(f"{directory} does not hold a saved mask ({_META_FILE} + {_TENSORS_FILE})")
        meta = json.loads((directory / _META_FILE).read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: unknown mask format version {meta.get('format_version')!r}")
        mask = cls(
            granularity=meta["granularity"],
            fingerprint=ModelFingerprint.from_dict(meta["fingerprint"]),
            layout=Layout.from_dict(meta["layout"]),
            indices=load_file(str(directory / _TENSORS_FILE)),
            provenance=meta.get("provenance", {}),
            created=meta.get("created", ""),
        )
        if mask.count != meta["count"]:
            raise ValueError(
                f"{directory}: the manifest says {meta['count']} pruned units, the tensors hold {mask.count}"
            )
        return mask
