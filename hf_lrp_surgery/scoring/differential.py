"""Differential scores of two reference sets: :func:`contrast` (Hatefi et al., 2025)."""

from __future__ import annotations

from typing import Any

import torch

from hf_lrp_surgery.exceptions import FingerprintMismatchError
from hf_lrp_surgery.options import ContrastOptions, Normalization, reject_unknown
from hf_lrp_surgery.scoring.scores import Scores

__all__ = ["contrast"]


# -- contrast ---------------------------------------------------------------------------------
def _normalise(values: dict[str, torch.Tensor], how: Normalization) -> dict[str, torch.Tensor]:
    """Scale one set's scores of one component kind; ``values`` maps a row name to a tensor."""
    if how == "none":
        return values
    if how == "layer":
        return {k: v / v.abs().sum().clamp_min(torch.finfo(v.dtype).tiny) for k, v in values.items()}
    flat = torch.cat([v.flatten() for v in values.values()]).abs()
    scale = flat.sum() if how == "total" else flat.max()
    return {k: v / scale.clamp_min(torch.finfo(v.dtype).tiny) for k, v in values.items()}


def _rows(scores: Scores, component: str) -> dict[str, torch.Tensor]:
    value = scores.get(component)  # type: ignore[arg-type]
    if isinstance(value, dict):
        return {k: v.double() for k, v in value.items()}
    return {str(i): row.double() for i, row in enumerate(value)}


def contrast(general: Scores, undesired: Scores, options: ContrastOptions | None = None, **keywords: Any) -> Scores:
    """Differential scores ``R_general - R_undesired`` (Hatefi et al., 2025, Eq. for R_diff).

    Low scores mark components that the undesired behaviour uses and the general behaviour does
    not: :func:`~hf_lrp_surgery.masks.select` prunes the lowest.

    Args:
        general: Scores of the general (keep) reference set.
        undesired: Scores of the undesired reference set, same method, model and components.
        options: The :class:`~hf_lrp_surgery.options.ContrastOptions` (default: their defaults).
        **keywords: Their fields, replacing those of ``options``:

            * ``normalize``: per-set scaling before the difference, per component kind: ``"none"``,
              ``"total"`` (divide by the set's total ``|score|``; the default, because the two sets
              differ in size and length), ``"max"`` (by the largest ``|score|``) or ``"layer"``
              (each layer, or each weight matrix, by its own total ``|score|``);
            * ``protect_top``: fraction in ``[0, 1)`` of components with the largest general
              ``|score|`` that may never be pruned; they score ``+inf``. Default 0.05: on SmolLM2 an
              unprotected contrast picked neurons whose removal broke the model (see docs/correction.md).

    Returns:
        Scores with ``method="contrast"``; settings record both inputs and the options.

    Raises:
        FingerprintMismatchError: The inputs come from different models.
        ValueError: The inputs come from different methods, or hold different components; or an
            option is out of range.
        TypeError: A keyword is not a contrast option.
        NonFiniteScoreError: An input holds NaN.

    Example:
        >>> scores = contrast(general_scores, undesired_scores, protect_top=0.1)  # doctest: +SKIP
    """
    options = ContrastOptions.take(options, keywords)
    reject_unknown(keywords, "contrast")
    normalize, protect_top = options.normalize, options.protect_top
    if general.fingerprint != undesired.fingerprint:
        raise FingerprintMismatchError(
            f"cannot contrast scores of different models ({general.fingerprint.short()} vs "
            f"{undesired.fingerprint.short()})"
        )
    if general.method != undesired.method:
        raise ValueError(
            f"cannot contrast {general.method} scores with {undesired.method} scores; score both "
            "sets with the same method"
        )
    if general.components != undesired.components:
        raise ValueError(
            f"the general set scored {list(general.components)} but the undesired set scored "
            f"{list(undesired.components)}; score both with the same components"
        )
    general.check_finite()
    undesired.check_finite()
    out = Scores(
        method="contrast",
        settings={
            "method": "contrast",
            "of": general.method,
            **options.to_dict(),
            "general": general.settings,
            "undesired": undesired.settings,
            "general_samples": general.num_samples,
            "undesired_samples": undesired.num_samples,
        },
        fingerprint=general.fingerprint,
        layout=general.layout,
        num_samples=general.num_samples + undesired.num_samples,
    )
    for component in general.components:
        g, u = _normalise(_rows(general, component), normalize), _normalise(_rows(undesired, component), normalize)
        diff = {k: (g[k] - u[k]) for k in g}
        if protect_top > 0:
            flat = torch.cat([v.flatten() for v in g.values()]).abs()
            count = int(protect_top * flat.numel())
            # Exactly ``count`` components, ties broken by position (a threshold would also protect
            # every tie, e.g. all dead neurons at 0).
            protected = torch.zeros(flat.numel(), dtype=torch.bool)
            protected[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
            pieces = protected.split([v.numel() for v in g.values()])
            diff = {k: torch.where(piece.view_as(v), torch.inf, v) for (k, v), piece in zip(diff.items(), pieces)}
        if component == "weights":
            out.weights = {k: v.float() for k, v in diff.items()}
        else:
            setattr(out, component, torch.stack([diff[str(i)] for i in range(len(diff))]).float())
    return out
