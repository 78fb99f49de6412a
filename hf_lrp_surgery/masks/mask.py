"""The mask value object: what is pruned, on which model, and why, with its manifest and files.

A :class:`Mask` names what is pruned, per carrier module: for MLP neurons the indices of the
neurons at the input of the block's MLP output projection, for attention heads the head indices at
the input of the attention output projection, for weights the flat indices into a weight matrix
(in the order the module stores it). A **soft** mask also gives each of those units a scale ``0 <= alpha < 1``
(:attr:`Mask.scales`: 0 prunes it, ``0 < alpha < 1`` dampens it); a hard mask (``scales=None``) prunes every
unit it names. It records the model it was built for (a fingerprint of config
and weights), the method and options that produced it, and counts per layer. It saves as
``mask.safetensors`` + ``mask.json`` and refuses to be applied to another model.

A mask is validated when built (indices unique, sorted, non-negative and within the layout's units),
when loaded (``mask.json`` agrees with the tensors) and when it meets a model (:meth:`Mask.validate`:
the layout is the model's, weight indices lie inside their matrices), so that an edited or damaged
mask raises :class:`~hf_lrp_surgery.exceptions.MaskManifestError` instead of pruning other units.
The scales of a soft mask are checked at the same points: one finite float32 value in ``[0, 1)`` per
index, saved next to the indices in ``mask.safetensors`` (as ``scale:<module>``) and counted in
``mask.json`` (``soft``, ``dampened``); a mask saved before scales existed loads as a hard mask.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
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
#: Prefix of a soft mask's scale tensors in ``mask.safetensors`` (the indices are keyed by the bare module name).
_SCALE_PREFIX = "scale:"


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
        scales: ``None`` for a hard mask (every indexed unit pruned). For a soft mask: carrier module name
            -> float32 scales, one per index of that module, each finite and in ``[0, 1)``: 0 prunes the
            unit, ``0 < alpha < 1`` multiplies its contribution by ``alpha`` (see
            :mod:`~hf_lrp_surgery.masks.soft`). Every module in ``indices`` has its scales.

    Raises:
        MaskManifestError: An unknown granularity, a module the layout lacks, indices that are not
            1-D int64, or indices that are negative, repeated, unsorted or beyond the module's units
            (neurons and heads: the layout's counts; weights: ``provenance["module_sizes"]`` when
            recorded); scales for other modules than the indices, not 1-D float32 of the indices'
            length, or not finite and in ``[0, 1)``.

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
    scales: dict[str, torch.Tensor] | None = None

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
        if self.scales is not None:
            _check_scales(self.granularity, self.indices, self.scales)

    @property
    def soft(self) -> bool:
        """Whether the mask carries scales (some units may be dampened rather than pruned)."""
        return self.scales is not None

    def scale_of(self, name: str) -> torch.Tensor:
        """The float32 scale of each indexed unit of carrier module ``name`` (zeros for a hard mask).

        Raises:
            KeyError: The mask prunes nothing on ``name``.

        Example:
            >>> mask.scale_of("model.layers.0.mlp.down_proj")  # doctest: +SKIP
            tensor([0.0000, 0.5000])
        """
        index = self.indices[name]
        if self.scales is None:
            return torch.zeros(index.numel(), dtype=torch.float32)
        return self.scales[name]

    def with_scales(
        self, scales: Mapping[str, torch.Tensor | Sequence[float]] | None, *, how: str | None = None
    ) -> Mask:
        """The same units with these scales: a soft mask (or, with ``None``, the hard mask of the same units).

        Args:
            scales: Carrier module name -> one scale in ``[0, 1)`` per index of that module (any float
                tensor or sequence; stored as float32), for every module the mask names; ``None`` drops
                the scales.
            how: What produced the scales (e.g. ``"relevance"``, ``"aura"``), recorded in
                ``provenance["dampening"]``.

        Returns:
            A new mask (this one is unchanged).

        Raises:
            MaskManifestError: A scale is missing, of the wrong length, not finite or outside ``[0, 1)``.

        Example:
            >>> soft = mask.with_scales(dampening_scales(mask, scores, 0.5))  # doctest: +SKIP
            >>> soft.scale_of(next(iter(soft.indices)))  # doctest: +SKIP
            tensor([0.5000, 0.5000])
        """
        provenance = dict(self.provenance)
        provenance.pop("dampening", None)
        if scales is None:
            return replace(self, scales=None, provenance=provenance)
        if not isinstance(scales, Mapping):
            raise MaskManifestError(f"scales must map carrier module names to scales, got {type(scales).__name__}")
        converted = {
            name: torch.as_tensor(value).detach().to("cpu", torch.float32).flatten() for name, value in scales.items()
        }
        if how is not None:
            provenance["dampening"] = how
        return replace(self, scales=converted, provenance=provenance)

    # -- reading ------------------------------------------------------------------------------
    def carriers(self) -> tuple[str, ...]:
        """Every module that could carry this granularity's pruning, in block order."""
        return self.layout.carriers(self.granularity)

    def layer_of(self, module: str) -> int:
        """The decoder block of a carrier module."""
        return self.layout.layer_of(self.granularity, module)

    @property
    def count(self) -> int:
        """Total number of masked units (a soft mask's: pruned and dampened)."""
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
            A unit both masks name gets the smaller of its two scales (a hard mask's units count as 0):
            the union takes out at least as much as each mask. The union is soft when either mask is.

        Raises:
            ValueError: Different granularities or layouts.

        Example:
            >>> in_force = in_force.union(new_mask)  # doctest: +SKIP
        """
        if self.granularity != other.granularity:
            raise ValueError(f"cannot merge a {other.granularity} mask into a {self.granularity} mask")
        if self.layout != other.layout:
            raise ValueError(f"cannot merge a {other.granularity} mask of another model layout into this one")
        indices: dict[str, torch.Tensor] = {}
        scales: dict[str, torch.Tensor] = {}
        soft = self.soft or other.soft
        for name in dict.fromkeys([*self.indices, *other.indices]):
            owners = [m for m in (self, other) if name in m.indices]
            index = torch.cat([m.indices[name] for m in owners])
            if not soft:
                indices[name] = index.unique() if len(owners) > 1 else index
                continue
            scale = torch.cat([m.scale_of(name) for m in owners])
            indices[name], where = index.unique(return_inverse=True)
            # The smaller scale of a unit both masks name (scatter_reduce "amin" over its occurrences).
            scales[name] = torch.ones(indices[name].numel()).scatter_reduce(0, where, scale, "amin")
        provenance: dict[str, Any] = {"merged": [self.provenance, other.provenance]}
        sizes = {**self.provenance.get("module_sizes", {}), **other.provenance.get("module_sizes", {})}
        if sizes:  # weight masks: the matrix sizes that per-layer totals and validation read
            provenance["module_sizes"] = sizes
        return replace(other, indices=indices, provenance=provenance, scales=scales if soft else None)

    def complement(self, *, provenance: dict[str, Any] | None = None, total: dict[str, int] | None = None) -> Mask:
        """The mask of every unit this mask does not prune (of neurons or heads; weights need ``total``).

        Args:
            provenance: The new mask's provenance (default: ``{"complement_of": self.provenance}``).
            total: For weights: module name -> number of elements.

        Returns:
            The complementary mask: ablating it removes exactly what this mask keeps.

        Raises:
            ValueError: A weight mask without ``total``, or a soft mask (a dampened unit is partly kept
                and partly removed: no mask removes exactly what it keeps; take the complement of
                ``mask.with_scales(None)``, its hard units).

        Example:
            >>> circuit = mask.complement()  # doctest: +SKIP
        """
        if self.soft:
            raise ValueError(
                "a soft mask has no complement (its dampened units are partly kept); take the complement of "
                "mask.with_scales(None), the hard mask of the same units"
            )
        per_module = self.layout.units_per_module(self.granularity)
        if total is not None:
            sizes = total
        elif per_module is not None:
            sizes = dict.fromkeys(self.carriers(), per_module)
        else:
            raise ValueError("the complement of a weight mask needs total= (module name -> number of elements)")
        indices = {}
        # With total=, the complement is taken within the modules it names (e.g. only the MLP matrices).
        for name in self.carriers() if total is None else [n for n in self.carriers() if n in total]:
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
        done = f"masked (soft: {self.dampened} dampened)" if self.soft else "pruned"
        lines = [
            f"{self.count} {self.granularity} {done}, model {self.fingerprint.short()}, "
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
            "soft": self.soft,
            "dampened": self.dampened,
        }

    @property
    def dampened(self) -> int:
        """Units with a scale above 0 (dampened, not pruned); 0 for a hard mask."""
        if self.scales is None:
            return 0
        return sum(int(scale.gt(0).sum()) for scale in self.scales.values())

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
        for name, scale in (self.scales or {}).items():
            tensors[_SCALE_PREFIX + name] = scale.contiguous()
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
            MaskManifestError: A file is unreadable, the format version unknown, ``mask.json``
                (granularity, count, per-layer or per-module counts, ``soft``, ``dampened``) disagrees with
                the tensors, or a scale is damaged (missing, of the wrong length, not finite, outside ``[0, 1)``).

        Example:
            >>> mask = Mask.load("runs/mask")  # doctest: +SKIP
        """
        directory = Path(directory)
        meta_path = directory / _META_FILE
        meta, tensors = read_artefact(
            directory, _META_FILE, _TENSORS_FILE, what="mask", version=_FORMAT_VERSION, error=MaskManifestError
        )
        indices = {name: t for name, t in tensors.items() if not name.startswith(_SCALE_PREFIX)}
        scales = {n.removeprefix(_SCALE_PREFIX): t for n, t in tensors.items() if n.startswith(_SCALE_PREFIX)}
        if bool(scales) != bool(meta.get("soft", False)):
            raise MaskManifestError(
                f"{directory}: the manifest says the mask is {'soft' if meta.get('soft') else 'hard'}, the tensors "
                f"{'hold' if scales else 'lack'} scales; the files were edited or come from different saves: save "
                "the mask again"
            )
        try:
            mask = cls(
                granularity=meta["granularity"],
                fingerprint=ModelFingerprint.from_dict(meta["fingerprint"]),
                layout=Layout.from_dict(meta["layout"]),
                indices=indices,
                provenance=meta.get("provenance", {}),
                created=meta.get("created", ""),
                scales=scales or None,
            )
        except MaskManifestError as err:
            raise MaskManifestError(f"{directory}: {err}") from err
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise MaskManifestError(f"{meta_path} lacks or garbles {err}; save the mask again") from err
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
        "dampened": mask.dampened,
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


def _check_scales(granularity: str, indices: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> None:
    """Refuse scales that are not one finite float32 in ``[0, 1)`` per index of exactly the indexed modules."""
    if not isinstance(scales, dict):
        raise MaskManifestError(f"scales must map carrier module names to scales, got {type(scales).__name__}")
    if set(scales) != set(indices):
        odd = sorted(set(scales) ^ set(indices))
        raise MaskManifestError(
            f"a soft {granularity} mask needs scales for exactly the modules it indexes; these differ: {odd[:3]}. "
            "The mask was edited or damaged: build it again (Mask.with_scales), or load an intact copy"
        )
    for name, scale in scales.items():
        problem = None
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.dim() != 1:
            kind = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
            problem = f"must be a 1-D float32 tensor, got {kind}"
        elif scale.numel() != indices[name].numel():
            problem = f"has {scale.numel()} values for {indices[name].numel()} indices"
        elif not bool(torch.isfinite(scale).all()) or bool(((scale < 0) | (scale >= 1)).any()):
            bad = scale[~torch.isfinite(scale) | (scale < 0) | (scale >= 1)]
            problem = f"has values outside [0, 1) ({bad[:3].tolist()})"
        if problem is not None:
            raise MaskManifestError(
                f"the scales of the soft {granularity} mask of {name} {problem}; a scale is 0 (pruned) or in (0, 1) "
                "(dampened), one per index. The mask was edited or damaged: build it again, or load an intact copy"
            )
