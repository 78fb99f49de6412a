"""Selecting a mask from scores: the lowest-scoring components within a budget, scope and module groups."""

from __future__ import annotations

import fnmatch
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import torch

from hf_lrp_surgery.exceptions import BudgetError, ModuleGroupError
from hf_lrp_surgery.lrp.layout import Granularity, Layout
from hf_lrp_surgery.masks.mask import Mask
from hf_lrp_surgery.masks.soft import check_dampening, dampening_scales
from hf_lrp_surgery.options import SCOPES, Scope
from hf_lrp_surgery.scoring import Scores

__all__ = ["Scope", "budget_count", "match_groups", "plain_budget", "select"]


def plain_budget(budget: object) -> int | float:
    """A budget as a plain ``int`` (a count) or ``float`` (a fraction); numpy numbers are accepted.

    Raises:
        BudgetError: ``budget`` is a bool or not a number.

    Example:
        >>> import numpy as np
        >>> plain_budget(np.int64(5)), plain_budget(np.float32(0.25))
        (5, 0.25)
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(f"budget must be a count (int >= 1) or a fraction (float in (0, 1]), got {budget!r}")
    return operator.index(budget) if isinstance(budget, numbers.Integral) else float(budget)


def budget_count(budget: object, eligible: int, what: str) -> int:
    """The number of components a budget prunes among ``eligible`` ones.

    Args:
        budget: A count (``int`` >= 1) or a fraction (``float`` in (0, 1]); numpy numbers too.
        eligible: How many components may be pruned.
        what: How to name them in messages (``"neurons in 30 layers"``).

    Returns:
        The count.

    Raises:
        BudgetError: Not a number, not positive, a fraction outside (0, 1] or rounding to 0, or more
            than ``eligible``.

    Example:
        >>> budget_count(0.5, 10, "neurons")
        5
    """
    budget = plain_budget(budget)
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


def match_groups(layout: Layout, modules: Sequence[str] | None) -> list[str]:
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


def _row_shares(total: int, eligible: torch.Tensor) -> torch.Tensor:
    """Split ``total`` over rows in proportion to their eligible counts (int64), by largest remainders.

    Integer arithmetic throughout (``total * e // E`` and its remainder), so the shares sum to ``total``
    exactly and no row gets more than its eligible entries; ties in the remainder go to the earlier row.
    """
    whole = int(eligible.sum())
    scaled = eligible * total
    shares = scaled // whole
    extra = total - int(shares.sum())
    if extra:
        order = torch.sort(-(scaled % whole), stable=True).indices  # largest remainder first
        shares[order[:extra]] += 1
    return shares


def _per_row(groups: dict[str, torch.Tensor], count: int, orientation: str) -> dict[str, torch.Tensor]:
    """Flat stored indices of the lowest entries of each output row, ``count`` in all spread over the rows."""
    # Output features are rows of a Linear weight ([out, in]) and columns of a Conv1D weight ([in, out]).
    rows = {n: (v.t() if orientation == "conv1d" else v).double() for n, v in groups.items()}
    eligible = torch.cat([torch.isfinite(r).sum(1) for r in rows.values()])
    shares = _row_shares(count, eligible).split([r.shape[0] for r in rows.values()])
    indices: dict[str, torch.Tensor] = {}
    for (name, row), share in zip(rows.items(), shares):
        out_features, in_features = row.shape
        order = torch.sort(row, dim=1, stable=True).indices  # protected (+inf) last; share <= eligible
        taken = torch.arange(in_features)[None, :] < share[:, None]
        out, inp = taken.nonzero(as_tuple=True)
        inp = order[out, inp]
        flat = inp * out_features + out if orientation == "conv1d" else out * in_features + inp
        if flat.numel():
            indices[name] = flat.sort().values
    return indices


def select(
    scores: Scores,
    granularity: Granularity,
    budget: int | float,
    *,
    scope: Scope = "global",
    modules: Sequence[str] | str | None = None,
    layers: Sequence[int] | None = None,
    dampen: float | str | None = None,
) -> Mask:
    """Select the lowest-scoring components into a mask.

    Args:
        scores: Scores of the components (higher = keep); ``+inf`` marks protected components.
        granularity: ``"neurons"``, ``"heads"`` or ``"weights"``.
        budget: How many to prune: a count (``int``) or a fraction (``float`` in (0, 1]) of the
            eligible components.
        scope: ``"global"`` ranks all eligible components together; ``"per_layer"`` spreads the
            budget over layers in proportion to their eligible components (each decoder block for
            neurons and heads, each weight matrix for weights) and ranks within each; ``"per_row"``
            (weights only; Wanda's protocol) spreads it over the output features of every matrix (a
            row of an ``nn.Linear`` weight, a column of GPT-2's ``Conv1D``) so that each prunes the same
            fraction of its eligible entries (to one entry: largest remainders), ranked within the row.
        modules: For weights: module groups to restrict to, as glob patterns on the block-relative
            path or its last part (``"mlp.*"``, ``"fc1"``, ``"down_proj"``). Default: every prunable
            weight.
        layers: Decoder blocks to restrict to (default: all).
        dampen: ``None`` for a hard mask (every selected unit pruned); else a soft mask whose selected
            units are dampened by the rule of :func:`~hf_lrp_surgery.masks.soft.dampening_scales`
            (``"relevance"``, ``"constant:<alpha>"`` or a float ``alpha``).

    Returns:
        The :class:`Mask`.

    Raises:
        BudgetError: The budget is not positive or exceeds the eligible components.
        ValueError: An unknown scope, ``"per_row"`` for neurons or heads or on scores whose layout does
            not record how the weights are stored (saved by an earlier release), or ``modules`` for
            neurons or heads.
        ModuleGroupError: A module group matches nothing.
        NonFiniteScoreError: A score is NaN.
        KeyError: The scores hold no components of this granularity.

    Example:
        >>> mask = select(scores, "weights", 7000, modules=["fc1"])  # doctest: +SKIP
    """
    if dampen is not None:
        check_dampening(dampen)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    if scope == "per_row" and granularity != "weights":
        raise ValueError(
            f"scope='per_row' spreads a weight budget over the output rows of each matrix; {granularity} have no "
            "rows: use scope='global' or 'per_layer'"
        )
    if modules is not None and granularity != "weights":
        raise ValueError("modules= restricts weight masks; neuron and head masks live on fixed modules")
    scores.check_finite()
    layout = scores.layout
    chosen_layers = set(range(layout.num_layers)) if layers is None else set(layers)
    if not chosen_layers or not chosen_layers <= set(range(layout.num_layers)):
        raise ValueError(f"layers must be a non-empty subset of 0..{layout.num_layers - 1}, got {layers}")
    value = scores.get(granularity)
    if isinstance(value, dict):
        groups = {n: value[n] for n in match_groups(layout, modules) if layout.weight_modules[n][0] in chosen_layers}
    else:
        carriers = layout.carriers(granularity)
        groups = {carriers[i]: value[i] for i in sorted(chosen_layers)}
    finite = {n: torch.isfinite(v.flatten()) for n, v in groups.items()}
    eligible = sum(int(f.sum()) for f in finite.values())
    what = f"{granularity} in {len(groups)} {'modules' if granularity == 'weights' else 'layers'}"
    count = budget_count(budget, eligible, what)

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
    elif scope == "per_row":
        if layout.weight_orientation is None:
            raise ValueError(
                "these scores' layout does not record how the weight matrices are stored (saved by an earlier "
                "release), which scope='per_row' needs to find the output rows; score the model again"
            )
        indices = _per_row(groups, count, layout.weight_orientation)
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
    if dampen is not None:
        provenance["selection"]["dampen"] = dampen
    if granularity == "weights":
        provenance["module_sizes"] = {name: int(groups[name].numel()) for name in groups}
    mask = Mask(
        granularity=granularity, fingerprint=scores.fingerprint, layout=layout, indices=indices, provenance=provenance
    )
    if dampen is None:
        return mask
    return mask.with_scales(dampening_scales(mask, scores, dampen), how=str(dampen))
