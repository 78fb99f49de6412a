"""Scorers that read no samples: weight ``magnitude`` and seeded ``random`` scores."""

from __future__ import annotations

import torch

from hf_lrp_surgery.scoring._weights import unit_weight_norms
from hf_lrp_surgery.scoring.registry import ScoringRequest, register_scorer
from hf_lrp_surgery.scoring.scores import Scores

__all__ = ["magnitude", "random"]


def _empty(request: ScoringRequest) -> Scores:
    return request.new_scores({"method": request.options.method, "components": list(request.options.components)})


@register_scorer(
    "magnitude", description="|W_ij|; neurons ||W_out[:, i]||; heads ||W_o[:, head]||", needs_samples=False
)
def magnitude(request: ScoringRequest) -> Scores:
    """The norm of the weights that read each unit (weights: their absolute value)."""
    arch, components, scores = request.arch, request.options.components, _empty(request)
    if "neurons" in components:
        scores.neurons = torch.stack([unit_weight_norms(layer.mlp_out, arch, 1) for layer in arch.layers])
    if "heads" in components:
        scores.heads = torch.stack([unit_weight_norms(layer.o_proj, arch, arch.num_heads) for layer in arch.layers])
    if "weights" in components:
        scores.weights = {p.name: p.weight.detach().float().abs().cpu() for p in arch.prunable}
    return scores


@register_scorer(
    "random",
    description="uniform(0, 1) from a seeded generator",
    needs_samples=False,
    in_comparison=True,
    moe_experts=True,
)
def random(request: ScoringRequest) -> Scores:
    """Uniform scores from a generator seeded with ``options.random_seed``."""
    arch, components, scores = request.arch, request.options.components, _empty(request)
    generator = torch.Generator().manual_seed(request.options.random_seed)
    scores.settings["random_seed"] = request.options.random_seed
    if "neurons" in components:
        scores.neurons = torch.rand(arch.num_layers, arch.num_neurons, generator=generator)
    if "heads" in components:
        scores.heads = torch.rand(arch.num_layers, arch.num_heads, generator=generator)
    if "weights" in components:
        scores.weights = {p.name: torch.rand(p.weight.shape, generator=generator) for p in arch.prunable}
    return scores
