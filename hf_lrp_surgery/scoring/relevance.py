"""Relevance scorers: AttnLRP (``lrp``) and its rule-free counterpart (``gradient``)."""

from __future__ import annotations

from hf_lrp_surgery.lrp.attach import Variant
from hf_lrp_surgery.lrp.collect import collect_relevance
from hf_lrp_surgery.scoring.registry import ScoringRequest, register_scorer
from hf_lrp_surgery.scoring.scores import Scores

__all__ = ["gradient", "lrp"]


def _relevance(request: ScoringRequest, variant: Variant, epsilon: float) -> Scores:
    """Mean relevance per sample of the reference set, with these rules."""
    options = request.options
    relevance = collect_relevance(
        request.model,
        request.samples,
        request.tokenizer,
        components=options.components,
        variant=variant,
        epsilon=epsilon,
        objective=options.objective,
        batch_size=options.batch_size,
        per_sample_abs_weights=options.aggregation == "abs" and "weights" in options.components,
        weight_buffers=options.weight_buffers,
        progress=request.progress,
        description=request.description,
    )
    return Scores.from_relevance(relevance, request.layout, aggregation=options.aggregation)


@register_scorer(
    "lrp",
    description="AttnLRP relevance (Achtibat et al., 2024) of the reference set (Hatefi et al., 2025)",
    relevance_options=True,
    in_comparison=True,
    moe_experts=True,
)
def lrp(request: ScoringRequest) -> Scores:
    """AttnLRP (or CP-LRP) relevance, with LRP-epsilon on the prunable layers if asked."""
    return _relevance(request, request.options.variant, request.options.epsilon)


@register_scorer(
    "gradient",
    description="gradient x activation (neurons, heads) / gradient x weight (weights), no LRP rules",
    relevance_options=True,
    in_comparison=True,
    moe_experts=True,
)
def gradient(request: ScoringRequest) -> Scores:
    """Gradient x input: the relevance pass without rules (``variant`` and ``epsilon`` do not apply)."""
    return _relevance(request, "gradient", 0.0)
