"""Soft masks: scales that dampen the selected units instead of pruning them.

A soft mask (:meth:`Mask.with_scales <hf_lrp_surgery.masks.Mask.with_scales>`) gives each unit it names a
scale ``0 <= alpha < 1``: the unit's contribution is multiplied by ``alpha`` (0 prunes it). The carriers
carry the scales exactly (the IA3 vector holds ``alpha``, baking scales the unit's reader column, the
hooks multiply the feature; see :mod:`~hf_lrp_surgery.masks.geometry`).

:func:`dampening_scales` makes the scales from a rule:

* ``"constant:<alpha>"`` (or a float ``alpha``): every selected unit gets ``alpha``.
* ``"aura"``: AurA's ``alpha = 1 - 2 (AUROC - 0.5)`` of each selected unit (Suau et al., 2024; the
  scores must be the ``aura`` method's).
* ``"relevance"``: linear in the units' scores (higher = keep, e.g. contrastive scores). With ``s_min``
  the lowest score among the selected units (the most undesired) and ``t`` the selection's threshold,
  the lowest score among the eligible units it did not select (the first kept unit) on the mask's
  modules, ``alpha_u = (s_u - s_min) / (t - s_min)``, clipped to ``[0, 1)`` (the clip matters only for
  ties with ``t``, or per-layer selections whose thresholds differ): the most undesired unit is pruned,
  the unit at the threshold is hardly touched. When no eligible unit was left out, ``t`` is the highest
  selected score.

AurA's scales (``alpha = 1 - 2 (AUROC - 0.5)``, Suau et al., 2024) come from
:func:`hf_lrp_surgery.scoring.aura.aura_scales`, one per unit of every carrier module (1 = untouched):
:func:`mask_from_scales` turns any such dense dict into the soft mask of the units below 1; scales
for a mask's own units go into :meth:`Mask.with_scales`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from hf_lrp_surgery.lrp.layout import Granularity
from hf_lrp_surgery.masks.mask import Mask

if TYPE_CHECKING:
    from hf_lrp_surgery.scoring.scores import Scores

__all__ = ["DAMPENINGS", "check_dampening", "dampening_scales", "hard_part", "mask_from_scales"]

#: The dampening rules :func:`dampening_scales` takes (``"constant"`` as ``"constant:<alpha>"`` or a float).
DAMPENINGS = ("constant", "relevance", "aura")
#: The largest float32 below 1: scales are clipped to it (a scale of 1 would keep the unit whole).
_BELOW_ONE = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))


def check_dampening(how: float | str) -> float | None:
    """The constant scale of a dampening rule, ``None`` for ``"relevance"`` and ``"aura"``.

    Args:
        how: ``"relevance"``, ``"aura"``, ``"constant:<alpha>"`` or a float ``alpha`` in ``[0, 1)``.

    Returns:
        ``alpha`` for a constant rule, ``None`` for ``"relevance"`` and ``"aura"``.

    Raises:
        ValueError: Another rule, or a constant outside ``[0, 1)``.

    Example:
        >>> check_dampening("constant:0.25"), check_dampening(0.5), check_dampening("relevance")
        (0.25, 0.5, None)
    """
    if how in ("relevance", "aura"):
        return None
    value: object = how
    if isinstance(how, str):
        kind, _, text = how.partition(":")
        try:
            value = float(text) if kind == "constant" else None
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"dampening must be 'relevance', 'aura', 'constant:<alpha>' or a float alpha, with 0 <= alpha < 1, "
            f"got {how!r}"
        )
    return float(value)


def dampening_scales(mask: Mask, scores: Scores, how: float | str) -> dict[str, torch.Tensor]:
    """Scales for the units of ``mask`` (for :meth:`Mask.with_scales`), by a dampening rule.

    Args:
        mask: The (hard) mask whose units are to be dampened.
        scores: The scores it was selected from (higher = keep); read for ``"relevance"`` only.
        how: ``"constant:<alpha>"`` or a float ``alpha`` (every unit gets ``alpha``), ``"relevance"``
            (linear in the scores, see the module docstring), or ``"aura"`` (AurA's
            ``alpha = 1 - 2 (AUROC - 0.5)`` of each selected unit; the scores must be ``aura``'s, whose
            value is ``0.5 - AUROC``).

    Returns:
        Carrier module name -> float32 scales, one per index of the mask on that module.

    Raises:
        ValueError: An unknown rule or constant outside ``[0, 1)``, or (``"relevance"``, ``"aura"``) scores of
            another model or layout, or without this granularity; ``"aura"`` on scores of another method.

    Example:
        >>> soft = mask.with_scales(dampening_scales(mask, scores, "relevance"), how="relevance")  # doctest: +SKIP
    """
    constant = check_dampening(how)
    if constant is not None:
        return {name: torch.full((index.numel(),), constant) for name, index in mask.indices.items()}
    if scores.layout != mask.layout or scores.fingerprint != mask.fingerprint:
        raise ValueError(f"{how} dampening needs the scores the mask was selected from (same model and layout)")
    if how == "aura" and scores.method != "aura":
        raise ValueError(f"aura dampening reads AUROCs: select from the aura method's scores, not {scores.method}'s")
    values = scores.get(mask.granularity)
    if isinstance(values, dict):
        sizes = mask.provenance.get("module_sizes") or {}
        modules = [n for n in values if n in sizes or n in mask.indices]
        per_module = {name: values[name].flatten().double() for name in modules}
    else:
        per_module = {name: values[i].double() for i, name in enumerate(mask.carriers())}
    selected = {name: per_module[name][index] for name, index in mask.indices.items()}
    if how == "aura":  # score = 0.5 - AUROC, so alpha = 1 - 2 max(0, AUROC - 0.5) = 1 + 2 min(0, score)
        return {name: (1.0 + 2.0 * s.clamp(max=0.0)).clamp(0.0, _BELOW_ONE).float() for name, s in selected.items()}
    if not selected or all(s.numel() == 0 for s in selected.values()):
        return {}
    chosen = torch.cat(list(selected.values()))
    low, high = float(chosen.min()), float(chosen.max())
    kept = []
    for name, row in per_module.items():
        left = torch.ones(row.numel(), dtype=torch.bool)
        if name in mask.indices:
            left[mask.indices[name]] = False
        kept.append(row[left & torch.isfinite(row)])
    rest = torch.cat(kept) if kept else torch.empty(0, dtype=torch.float64)
    threshold = float(rest.min()) if rest.numel() else high
    span = threshold - low
    if not span > 0:  # every selected unit ties with the threshold: nothing to grade by
        return {name: torch.zeros(s.numel()) for name, s in selected.items()}
    return {name: ((s - low) / span).clamp(0.0, _BELOW_ONE).float() for name, s in selected.items()}


def mask_from_scales(
    scores: Scores,
    granularity: Granularity,
    scales: Mapping[str, torch.Tensor],
    *,
    how: str | None = None,
) -> Mask:
    """The soft mask of every unit whose dense scale is below 1 (e.g. AurA's ``aura_scales``).

    Args:
        scores: The scores the scales come from (the mask's model and layout; recorded in its provenance).
        granularity: ``"neurons"`` or ``"heads"``.
        scales: Carrier module name -> one scale in ``[0, 1]`` per unit of the module (1: untouched);
            modules left out are untouched.
        how: What produced the scales (recorded as ``provenance["dampening"]``).

    Returns:
        The soft mask (units with scale 1 are not in it).

    Raises:
        ValueError: Weights, a module that does not carry this granularity, a vector of another length
            than the module's units, or a scale that is not finite or outside ``[0, 1]``.

    Example:
        >>> soft = mask_from_scales(scores, "neurons", aura_scales(scores), how="aura")  # doctest: +SKIP
    """
    width = scores.layout.units_per_module(granularity)
    if width is None:
        raise ValueError("mask_from_scales takes per-unit scales of neurons or heads, not weights")
    carriers = scores.layout.carriers(granularity)
    indices: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, value in scales.items():
        dense = torch.as_tensor(value).detach().to("cpu", torch.float32).flatten()
        if name not in carriers or dense.numel() != width:
            raise ValueError(
                f"scales of {name} must be one per {granularity[:-1]} ({width}) of a {granularity} carrier module, got "
                f"{dense.numel()} values{'' if name in carriers else ' for a module that carries none'}"
            )
        if not bool(torch.isfinite(dense).all()) or bool(((dense < 0) | (dense > 1)).any()):
            raise ValueError(f"scales of {name} must be finite and in [0, 1]")
        units = dense.lt(1).nonzero().flatten()
        if units.numel():
            indices[name], kept[name] = units, dense[units]
    provenance: dict[str, Any] = {
        "scores": {"method": scores.method, "settings": scores.settings, "num_samples": scores.num_samples},
        "selection": {"granularity": granularity, "from_scales": how, "count": sum(len(i) for i in indices.values())},
    }
    mask = Mask(granularity, scores.fingerprint, scores.layout, indices, provenance)
    return mask.with_scales(kept, how=how)


def hard_part(mask: Mask) -> Mask:
    """The hard mask of the units a mask prunes outright (scale 0); a hard mask itself.

    Args:
        mask: A soft or hard mask.

    Returns:
        The mask of its scale-0 units, without scales (modules left with none are dropped).

    Example:
        >>> hard_part(soft).count <= soft.count  # doctest: +SKIP
        True
    """
    if mask.scales is None:
        return mask
    indices = {name: index[mask.scales[name].eq(0)] for name, index in mask.indices.items()}
    provenance: dict[str, Any] = {"pruned_part_of": mask.provenance}
    if "module_sizes" in mask.provenance:  # weight masks: the matrix sizes validation reads
        provenance["module_sizes"] = mask.provenance["module_sizes"]
    return Mask(
        granularity=mask.granularity,
        fingerprint=mask.fingerprint,
        layout=mask.layout,
        indices={name: index for name, index in indices.items() if index.numel()},
        provenance=provenance,
        created=mask.created,
    )
