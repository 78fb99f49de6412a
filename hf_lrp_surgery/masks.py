"""Pruning masks: selection from scores, and the mask value object with its manifest.

A :class:`Mask` names what is pruned, per carrier module: for MLP neurons the indices of the
neurons at the input of the block's MLP output projection, for attention heads the head indices at
the input of the attention output projection, for weights the flat indices into a weight matrix
(in the order the module stores it). It records the model it was built for (a fingerprint of config
and weights), the method and options that produced it, and counts per layer. It saves as
``mask.safetensors`` + ``mask.json`` and refuses to be applied to another model.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.exceptions import BudgetError, ModuleGroupError
from hf_lrp_surgery.fingerprint import ModelFingerprint, check_fingerprint
from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.lrp.layout import Granularity, Layout
from hf_lrp_surgery.scoring import Scores

__all__ = ["Granularity", "Mask", "Scope", "select"]

Scope = Literal["global", "per_layer"]
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
        if self.granularity not in ("neurons", "heads", "weights"):
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
        if self.granularity == "neurons":
            return self.layout.neuron_modules
        if self.granularity == "heads":
            return self.layout.head_modules
        return tuple(self.layout.weight_modules)

    def layer_of(self, module: str) -> int:
        """The decoder block of a carrier module."""
        if self.granularity == "weights":
            return self.layout.weight_modules[module][0]
        return self.carriers().index(module)

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

    def dense(self, name: str, size: int) -> torch.Tensor:
        """A boolean vector of ``size`` units of module ``name``, ``True`` where pruned."""
        out = torch.zeros(size, dtype=torch.bool)
        if name in self.indices:
            out[self.indices[name]] = True
        return out

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one this mask was built for.

        Raises:
            FingerprintMismatchError: Different architecture or weights.
        """
        check_fingerprint(self.fingerprint, model, what=f"this {self.granularity} mask")

    def summary(self) -> str:
        """A per-layer table of pruned units, with the method that chose them."""
        units = {"neurons": self.layout.num_neurons, "heads": self.layout.num_heads}.get(self.granularity)
        per_layer_total = [0] * self.layout.num_layers
        if units is None:
            sizes = self.provenance.get("module_sizes", {})
            for name, (layer, _) in self.layout.weight_modules.items():
                per_layer_total[layer] += int(sizes.get(name, 0))
        else:
            per_layer_total = [units] * self.layout.num_layers
        scores = self.provenance.get("scores", {})
        lines = [
            f"{self.count} {self.granularity} pruned, model {self.fingerprint.short()}, "
            f"scores: {scores.get('method', '?')}, selection: {self.provenance.get('selection', {})}",
            f"{'layer':>5} {'pruned':>8} {'of':>10} {'share':>8}",
        ]
        for layer, (count, total) in enumerate(zip(self.per_layer(), per_layer_total)):
            share = f"{100 * count / total:.2f}%" if total else "-"
            lines.append(f"{layer:>5} {count:>8} {total or '-':>10} {share:>8}")
        return "\n".join(lines)

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest: granularity, counts per layer and module, fingerprint, provenance."""
        units = {"neurons": self.layout.num_neurons, "heads": self.layout.num_heads}.get(self.granularity)
        return {
            "format_version": _FORMAT_VERSION,
            "hf_lrp_surgery_version": __version__,
            "granularity": self.granularity,
            "count": self.count,
            "units_per_module": units,
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


# -- selection --------------------------------------------------------------------------------
def _budget_count(budget: int | float, eligible: int, what: str) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"budget must be a count (int >= 1) or a fraction (float in (0, 1]), got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise BudgetError(f"a fractional budget must be in (0, 1], got {budget}; give an int for a count")
        count = round(budget * eligible)
        if count == 0:
            raise BudgetError(f"a budget of {budget} of {eligible} {what} rounds to 0; give a larger fraction")
        return count
    if budget <= 0:
        raise BudgetError(f"budget must be >= 1, got {budget}")
    if budget > eligible:
        raise BudgetError(
            f"budget {budget} exceeds the {eligible} {what} that may be pruned (protected components "
            "and modules outside the chosen groups do not count); lower it"
        )
    return int(budget)


def _match_groups(layout: Layout, modules: Sequence[str] | None) -> list[str]:
    """Weight modules whose role (``mlp.down_proj``), last name (``down_proj``) or full name matches a group."""
    names = list(layout.weight_modules)
    if modules is None:
        return names
    if isinstance(modules, str):
        modules = [modules]
    roles = sorted({role for _, role in layout.weight_modules.values()})
    chosen: list[str] = []
    for pattern in modules:
        hits = [
            n
            for n in names
            if any(
                fnmatch.fnmatchcase(key, pattern)
                for key in (layout.weight_modules[n][1], layout.weight_modules[n][1].rsplit(".", 1)[-1], n)
            )
        ]
        if not hits:
            raise ModuleGroupError(
                f"module group {pattern!r} matches no prunable module; the model's groups are "
                f"{roles} (glob patterns such as 'mlp.*' work)"
            )
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]


def _lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` lowest finite values (ties broken by position)."""
    order = torch.sort(values.flatten().double(), stable=True).indices
    return order[:count]


def _spread(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over groups in proportion to their sizes (largest remainders first)."""
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def select(
    scores: Scores,
    granularity: Granularity,
    budget: int | float,
    *,
    scope: Scope = "global",
    modules: Sequence[str] | str | None = None,
    layers: Sequence[int] | None = None,
) -> Mask:
    """Select the lowest-scoring components into a mask.

    Args:
        scores: Scores of the components (higher = keep); ``+inf`` marks protected components.
        granularity: ``"neurons"``, ``"heads"`` or ``"weights"``.
        budget: How many to prune: a count (``int``) or a fraction (``float`` in (0, 1]) of the
            eligible components.
        scope: ``"global"`` ranks all eligible components together; ``"per_layer"`` spreads the
            budget over layers in proportion to their eligible components (each decoder block for
            neurons and heads, each weight matrix for weights) and ranks within each.
        modules: For weights: module groups to restrict to, as glob patterns on the block-relative
            path or its last part (``"mlp.*"``, ``"fc1"``, ``"down_proj"``). Default: every prunable
            weight.
        layers: Decoder blocks to restrict to (default: all).

    Returns:
        The :class:`Mask`.

    Raises:
        BudgetError: The budget is not positive or exceeds the eligible components.
        ModuleGroupError: A module group matches nothing.
        NonFiniteScoreError: A score is NaN.
        KeyError: The scores hold no components of this granularity.

    Example:
        >>> mask = select(scores, "weights", 7000, modules=["fc1"])  # doctest: +SKIP
    """
    if scope not in ("global", "per_layer"):
        raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    if modules is not None and granularity != "weights":
        raise ValueError("modules= restricts weight masks; neuron and head masks live on fixed modules")
    scores.check_finite()
    layout = scores.layout
    chosen_layers = set(range(layout.num_layers)) if layers is None else set(layers)
    if not chosen_layers or not chosen_layers <= set(range(layout.num_layers)):
        raise ValueError(f"layers must be a non-empty subset of 0..{layout.num_layers - 1}, got {layers}")
    value = scores.get(granularity)
    if isinstance(value, dict):
        groups = {n: value[n] for n in _match_groups(layout, modules) if layout.weight_modules[n][0] in chosen_layers}
    else:
        carriers = layout.neuron_modules if granularity == "neurons" else layout.head_modules
        groups = {carriers[i]: value[i] for i in sorted(chosen_layers)}
    finite = {n: torch.isfinite(v.flatten()) for n, v in groups.items()}
    eligible = sum(int(f.sum()) for f in finite.values())
    what = f"{granularity} in {len(groups)} {'modules' if granularity == 'weights' else 'layers'}"
    count = _budget_count(budget, eligible, what)

    indices: dict[str, torch.Tensor] = {}
    if scope == "global":
        names = list(groups)
        flat = torch.cat([groups[n].flatten().double() for n in names])
        offsets = torch.tensor([0] + [groups[n].numel() for n in names]).cumsum(0)
        picked = _lowest(flat, count)  # protected (+inf) sort last and count <= eligible
        for i, name in enumerate(names):
            local = picked[(picked >= offsets[i]) & (picked < offsets[i + 1])] - offsets[i]
            if local.numel():
                indices[name] = local.sort().values
    else:
        names = list(groups)
        for name, share in zip(names, _spread(count, [int(finite[n].sum()) for n in names])):
            if share:
                indices[name] = _lowest(groups[name], share).sort().values
    provenance: dict[str, Any] = {
        "scores": {"method": scores.method, "settings": scores.settings, "num_samples": scores.num_samples},
        "selection": {
            "granularity": granularity,
            "budget": budget,
            "count": count,
            "scope": scope,
            "modules": list(modules) if isinstance(modules, (list, tuple)) else modules,
            "layers": sorted(chosen_layers) if layers is not None else None,
        },
    }
    if granularity == "weights":
        provenance["module_sizes"] = {name: int(groups[name].numel()) for name in groups}
    return Mask(
        granularity=granularity, fingerprint=scores.fingerprint, layout=layout, indices=indices, provenance=provenance
    )
