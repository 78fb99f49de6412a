"""The mask value object: what is pruned, on which model, and why, with its manifest and files.

A :class:`Mask` names what is pruned, per carrier module: for MLP neurons the indices of the
neurons at the input of the block's MLP output projection, for attention heads the head indices at
the input of the attention output projection, for weights the flat indices into a weight matrix
(in the order the module stores it). It records the model it was built for (a fingerprint of config
and weights), the method and options that produced it, and counts per layer. It saves as
``mask.safetensors`` + ``mask.json`` and refuses to be applied to another model.

A mask is validated when built (indices unique, sorted, non-negative and within the layout's units),
when loaded (``mask.json`` agrees with the tensors) and when it meets a model (:meth:`Mask.validate`:
the layout is the model's, weight indices lie inside their matrices), so that an edited or damaged
mask raises :class:`~hf_lrp_surgery.exceptions.MaskManifestError` instead of pruning other units.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.exceptions import MaskManifestError
from hf_lrp_surgery.fingerprint import ModelFingerprint, check_fingerprint
from hf_lrp_surgery.io import atomic_directory, read_artefact
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture
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

    Raises:
        MaskManifestError: An unknown granularity, a module the layout lacks, indices that are not
            1-D int64, or indices that are negative, repeated, unsorted or beyond the module's units
            (neurons and heads: the layout's counts; weights: ``provenance["module_sizes"]`` when
            recorded).

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
            raise MaskManifestError(f"granularity must be 'neurons', 'heads' or 'weights', got {self.granularity!r}")
        known = set(self.carriers())
        unknown = sorted(set(self.indices) - known)
        if unknown:
            raise MaskManifestError(
                f"mask names modules the layout does not have for {self.granularity}: {unknown[:3]}; build the "
                "mask on the layout of the model it prunes"
            )
        sizes = self.provenance.get("module_sizes") if self.granularity == "weights" else None
        per_module = self.layout.units_per_module(self.granularity)
        for name, idx in self.indices.items():
            if idx.dtype != torch.int64 or idx.dim() != 1:
                raise MaskManifestError(
                    f"mask indices of {name} must be a 1-D int64 tensor, got {idx.dtype} {tuple(idx.shape)}"
                )
            limit = per_module if per_module is not None else _recorded_size(sizes, name)
            _check_index_values(self.granularity, name, idx, limit)

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
        if self.granularity != other.granularity:
            raise ValueError(f"cannot merge a {other.granularity} mask into a {self.granularity} mask")
        if self.layout != other.layout:
            raise ValueError(f"cannot merge a {other.granularity} mask of another model layout into this one")
        indices = dict(self.indices)
        for name, index in other.indices.items():
            indices[name] = torch.cat([indices[name], index]).unique() if name in indices else index
        provenance: dict[str, Any] = {"merged": [self.provenance, other.provenance]}
        sizes = {**self.provenance.get("module_sizes", {}), **other.provenance.get("module_sizes", {})}
        if sizes:  # weight masks: the matrix sizes that per-layer totals and validation read
            provenance["module_sizes"] = sizes
        return replace(other, indices=indices, provenance=provenance)

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
        if total is not None:
            sizes = total
        elif per_module is not None:
            sizes = dict.fromkeys(self.carriers(), per_module)
        else:
            raise ValueError("the complement of a weight mask needs total= (module name -> number of elements)")
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
        """Refuse a model other than the one this mask was built for (its fingerprint).

        The fingerprint identifies the config and the weights; where the mask's units sit in that
        model (its :class:`~hf_lrp_surgery.lrp.layout.Layout`) is compared by :meth:`validate`,
        which every carrier runs next to this check.

        Args:
            model: The model the mask is about to be used with.

        Raises:
            FingerprintMismatchError: Different architecture or weights.

        Example:
            >>> mask.check_model(model)  # doctest: +SKIP
        """
        check_fingerprint(self.fingerprint, model, what=f"this {self.granularity} mask")

    def validate(self, arch: ResolvedArchitecture) -> None:
        """Refuse a mask that does not fit a model: its layout must be the model's, its weight indices in range.

        Runs wherever a mask meets a model (applying, baking, hooks, verification, loading), so that a
        ``mask.json`` whose layout was edited (e.g. a reversed ``neuron_modules``) is never applied.

        Args:
            arch: The resolved architecture of the model (plain or PEFT-wrapped).

        Raises:
            MaskManifestError: The layouts differ, a weight index is beyond its matrix, or the matrix
                sizes recorded by the selection are not the model's.

        Example:
            >>> mask.validate(resolve(model))  # doctest: +SKIP
        """
        model_layout = Layout.of(arch)
        if model_layout != self.layout:
            differ = [f.name for f in fields(Layout) if getattr(model_layout, f.name) != getattr(self.layout, f.name)]
            raise MaskManifestError(
                f"this {self.granularity} mask's layout is not the model's (different {', '.join(differ)}): the "
                "mask's units would land on other modules. The mask.json was edited or made for another model or "
                "library version; select the mask again on this model"
            )
        if self.granularity != "weights":
            return
        sizes = {p.name: p.weight.numel() for p in arch.prunable}
        recorded = self.provenance.get("module_sizes")
        for name, idx in self.indices.items():
            expected = _recorded_size(recorded, name)
            if expected is not None and expected != sizes[name]:
                raise MaskManifestError(
                    f"the weights mask was selected on a {name} of {expected} elements, this model's has "
                    f"{sizes[name]}; select the mask again on this model"
                )
            _check_index_values(self.granularity, name, idx, sizes[name])

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
    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save as ``mask.safetensors`` + ``mask.json``, atomically (a directory appears complete or not at all).

        Args:
            directory: Destination directory (new, or empty).
            overwrite: Replace an existing non-empty directory.

        Returns:
            The directory.

        Raises:
            OutputExistsError: ``directory`` is not empty and ``overwrite`` is false, or is a file,
                the working directory or one of its parents.

        Example:
            >>> mask.save("runs/mask")  # doctest: +SKIP
            PosixPath('runs/mask')
        """
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.write_into(tmp)
        return Path(directory)

    def write_into(self, directory: Path) -> None:
        """Write the two mask files into an existing (staging) directory."""
        tensors = {name: idx.contiguous() for name, idx in self.indices.items()}
        save_file(tensors, str(directory / _TENSORS_FILE), metadata={"format": "pt"})
        (directory / _META_FILE).write_text(json.dumps(self.manifest(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Mask:
        """Load a mask saved with :meth:`save`, checking that its two files agree.

        Args:
            directory: A directory written by :meth:`save` (or :meth:`write_into`).

        Returns:
            The mask (its indices validated as in the constructor).

        Raises:
            FileNotFoundError: The directory holds no mask.
            MaskManifestError: A file is unreadable, the format version unknown, or ``mask.json``
                (granularity, count, per-layer or per-module counts) disagrees with the tensors.

        Example:
            >>> mask = Mask.load("runs/mask")  # doctest: +SKIP
        """
        directory = Path(directory)
        meta_path = directory / _META_FILE
        meta, indices = read_artefact(
            directory, _META_FILE, _TENSORS_FILE, what="mask", version=_FORMAT_VERSION, error=MaskManifestError
        )
        try:
            mask = cls(
                granularity=meta["granularity"],
                fingerprint=ModelFingerprint.from_dict(meta["fingerprint"]),
                layout=Layout.from_dict(meta["layout"]),
                indices=indices,
                provenance=meta.get("provenance", {}),
                created=meta.get("created", ""),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise MaskManifestError(f"{meta_path} lacks or garbles {err}; save the mask again") from err
        except MaskManifestError as err:
            raise MaskManifestError(f"{directory}: {err}") from err
        _check_counts(mask, meta, directory)
        return mask


def _check_counts(mask: Mask, meta: dict[str, Any], directory: Path) -> None:
    """Refuse a manifest whose counts disagree with the tensors (keys older manifests lack are skipped)."""
    if mask.count != meta.get("count"):
        raise MaskManifestError(
            f"{directory}: the manifest says {meta.get('count')} pruned units, the tensors hold {mask.count}; "
            "the files were edited or come from different saves: save the mask again"
        )
    actual: dict[str, Any] = {
        "per_layer": mask.per_layer(),
        "per_module": {k: v for k, v in mask.per_module().items() if v},
        "units_per_module": mask.layout.units_per_module(mask.granularity),
    }
    for key, value in actual.items():
        if key in meta and meta[key] != value:
            raise MaskManifestError(
                f"{directory}: the manifest's {key} ({meta[key]}) disagrees with the tensors ({value}); the files "
                "were edited or come from different saves: save the mask again"
            )


def _recorded_size(sizes: Any, name: str) -> int | None:
    """The element count the selection recorded for a weight matrix (``provenance["module_sizes"]``), if any."""
    if isinstance(sizes, dict) and isinstance(sizes.get(name), int):
        return int(sizes[name])
    return None


def _check_index_values(granularity: str, name: str, idx: torch.Tensor, limit: int | None) -> None:
    """Refuse negative, repeated, unsorted, or (given the module's ``limit``) out-of-range indices."""
    if idx.numel() == 0:
        return
    problem = None
    if int(idx.min()) < 0:
        problem = f"negative indices ({idx[idx < 0][:3].tolist()})"
    elif idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        unique = int(idx.unique().numel())
        problem = f"repeated indices ({idx.numel() - unique} repeats)" if unique < idx.numel() else "unsorted indices"
    elif limit is not None and int(idx.max()) >= limit:
        problem = f"indices beyond its {limit} {granularity} ({idx[idx >= limit][:3].tolist()})"
    if problem is not None:
        bound = "" if limit is None else f" below {limit}"
        raise MaskManifestError(
            f"the {granularity} mask of {name} has {problem}; indices must be unique, sorted, non-negative and{bound}"
            " (no unit twice). The mask was edited or damaged: select it again, or load an intact copy"
        )
