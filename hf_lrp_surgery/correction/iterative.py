"""Iterative re-attribution: prune a correction budget in rounds, scoring the pruned model again before each.

One-shot correction ranks every unit once, on the unpruned model. Once some units are pruned, the
rest of the model computes something else, and the units that carry the undesired behaviour now may
not be those the first ranking put next. :func:`iterative_masks` prunes the budget in ``steps``
rounds: round 1 scores the unpruned model (exactly as
:meth:`Surgeon.contrast <hf_lrp_surgery.surgeon.Surgeon.contrast>` does) and selects its share; each
later round bakes the units pruned so far into a copy of the model, scores that copy, makes the units
already pruned ineligible (:meth:`Scores.excluding <hf_lrp_surgery.scoring.Scores.excluding>`) and
selects the next share. Circuit discovery re-attributes the same way (``reattribute=True`` of
:func:`~hf_lrp_surgery.circuits.discover_circuit`).

The pruned model of a round is the one the user gets: the masks so far applied with the bake carrier
(:func:`~hf_lrp_surgery.carriers.apply_masks`, verified), on a deep copy that is dropped after its
scores are taken, so the caller's model is never written (one extra copy in memory at a time, about
0.5 GB for a 135M model in fp32). Each round costs one attribution of both reference sets, so
``steps`` rounds cost ``steps`` times a one-shot correction.
"""

from __future__ import annotations

import numbers
from dataclasses import replace
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery.carriers import apply_masks, get_carrier
from hf_lrp_surgery.exceptions import BudgetError, ReferenceSetError
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.masks.selection import budget_count, plain_budget
from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions, reject_unknown
from hf_lrp_surgery.references import ReferenceSource, load_reference_set
from hf_lrp_surgery.scoring import Layout, Scores, get_scorer
from hf_lrp_surgery.surgeon import Surgeon

__all__ = ["iterative_masks"]


def iterative_masks(
    model: nn.Module,
    tokenizer: Any,
    *,
    undesired: ReferenceSource,
    general: ReferenceSource,
    budget: int | float,
    steps: int,
    scoring: ScoringOptions | None = None,
    contrast: ContrastOptions | None = None,
    selection: SelectionOptions | None = None,
    limit: int | None = None,
    progress: bool = True,
    **keywords: Any,
) -> Mask:
    """Prune ``budget`` units in ``steps`` rounds of score → select → prune, re-attributing each round.

    Round 1 scores the unpruned model and selects ``budget // steps`` units (the first
    ``budget % steps`` rounds take one more, so the rounds add up to the budget exactly). Every later
    round scores the model with the units so far baked in (a copy; see the module docstring), excludes
    those units and selects its share of the lowest new scores. With ``steps=1`` the result is exactly
    ``select(surgeon.contrast(...), granularity, budget)``.

    Args:
        model: A supported causal LM; never modified.
        tokenizer: Its tokenizer (needed for text reference sets).
        undesired: The behaviour to remove, as :meth:`~hf_lrp_surgery.surgeon.Surgeon.contrast` takes it
            (strings, pairs, samples, a file, a ``datasets`` object), but not precomputed ``Scores``:
            every round scores it again.
        general: The behaviour to keep (for the recipes: the desired continuations of the same prompts).
        budget: Units to prune in all: a count (``int``, at least ``steps``) or a fraction (``float`` in
            (0, 1]) of the units eligible in round 1, resolved as :func:`~hf_lrp_surgery.masks.select`
            resolves it.
        steps: Rounds (>= 1); 1 is one-shot selection.
        scoring: How to score (any registered method: one-set methods are contrasted with ``contrast``,
            paired methods are their own contrast, sample-free ones are used as they are); its
            components are replaced by the selection's granularity.
        contrast: The :class:`~hf_lrp_surgery.options.ContrastOptions` (default: theirs; paired methods
            take only the defaults).
        selection: The :class:`~hf_lrp_surgery.options.SelectionOptions`: granularity (default
            ``"neurons"``), scope, modules, layers, dampening; applied to every round's share.
        limit: Use only the first ``limit`` samples of each set.
        progress: Show progress bars (the rounds and each attribution).
        **keywords: Fields of the three options classes (``method``, ``granularity``, ``scope``,
            ``normalize``, ``protect_top``, ``aggregation``, ``batch_size``, ...), replacing theirs.

    Returns:
        The :class:`~hf_lrp_surgery.masks.Mask` of all rounds, of the same granularity, layout and model
        fingerprint as :func:`~hf_lrp_surgery.masks.select` gives (so every carrier takes it). Its
        provenance is round 1's, with ``selection`` giving the whole ``budget`` and ``count``, and
        ``reattribution``: ``steps``, ``counts`` (units selected per round) and ``rescored`` (the scores'
        method, settings and sample count of rounds 2 to ``steps``).

    Raises:
        ValueError: ``steps`` is not a whole number >= 1; the method is not registered or cannot score
            the granularity; an unknown granularity or another option out of range (all before any
            attribution).
        BudgetError: The budget is not a count or fraction, exceeds the model's units, is smaller than
            ``steps`` (a fraction: once round 1 has resolved it), or exceeds the units left eligible in
            a round.
        ReferenceSetError: A set is given as ``Scores``, or is empty.
        TypeError: A keyword is not an option.
        UnsupportedArchitectureError: The model type is not supported.

    Example:
        >>> mask = iterative_masks(model, tokenizer, undesired=looping, general=varied, budget=7000,
        ...                        steps=4, method="lrp", granularity="weights")  # doctest: +SKIP
        >>> mask.provenance["reattribution"]["counts"]  # doctest: +SKIP
        [1750, 1750, 1750, 1750]
        >>> corrected = apply_masks(model, mask, "bake")  # doctest: +SKIP
    """
    selection = SelectionOptions.take(selection, keywords)
    granularity = selection.granularity
    scoring = ScoringOptions.take(scoring, keywords, components=(granularity,))
    scoring = replace(scoring, components=(granularity,))
    contrasting = ContrastOptions.take(contrast, keywords)
    reject_unknown(keywords, "iterative_masks")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a whole number of rounds >= 1, got {steps!r}")
    steps = int(steps)
    budget = plain_budget(budget)
    arch = resolve(model)
    budget_count(budget, Layout.of(arch).units(granularity, arch), f"{granularity} of the model")
    if isinstance(budget, int) and budget < steps:
        raise BudgetError(f"a budget of {budget} cannot be split into {steps} rounds of at least one unit each")
    for name, source in (("undesired", undesired), ("general", general)):
        if isinstance(source, Scores):
            raise ReferenceSetError(
                f"iterative re-attribution scores the pruned model again every round: pass the {name} "
                "reference set, not Scores"
            )
    if steps > 1:
        get_carrier("bake").check(model, [])  # a model the rounds cannot bake is refused before any pass
    if get_scorer(scoring.method).needs_samples:  # read once, scored every round
        undesired = load_reference_set(undesired, limit=limit)
        general = load_reference_set(general, limit=limit)

    def contrast_scores(current: nn.Module) -> Scores:
        return Surgeon(current, tokenizer, progress=progress).contrast(
            undesired=undesired, general=general, options=scoring, contrast_options=contrasting
        )

    scores = contrast_scores(model)
    if steps == 1:
        mask = selection.select(scores, budget)
        return _recorded(mask, mask, budget, [mask.count], [])
    total = budget if isinstance(budget, int) else selection.select(scores, budget).count
    if total < steps:
        raise BudgetError(
            f"a budget of {budget} is {total} {granularity}, which cannot be split into {steps} rounds of at "
            "least one unit each; give a larger budget or fewer steps"
        )
    counts = [total // steps + (1 if r < total % steps else 0) for r in range(steps)]
    first = mask = selection.select(scores, counts[0])
    rescored: list[dict[str, Any]] = []
    for count in tqdm(counts[1:], desc=f"{scoring.method} re-attribution", disable=not progress, leave=False):
        # The pruned model is a verified baked copy, dropped once scored.
        scores = contrast_scores(apply_masks(model, mask, "bake").model)
        more = selection.select(scores.excluding(mask), count)
        rescored.append(more.provenance["scores"])
        # The copy's scores carry its fingerprint; the mask is for the unpruned model.
        mask = replace(mask.union(more), fingerprint=first.fingerprint)
    return _recorded(mask, first, budget, counts, rescored)


def _recorded(mask: Mask, first: Mask, budget: int | float, counts: list[int], rescored: list[dict[str, Any]]) -> Mask:
    """``mask`` with round 1's provenance, the whole budget, and how the rounds went."""
    provenance = {
        **first.provenance,
        "selection": {**first.provenance["selection"], "budget": budget, "count": mask.count},
        "reattribution": {"steps": len(counts), "counts": counts, "rescored": rescored},
    }
    return replace(mask, provenance=provenance)
