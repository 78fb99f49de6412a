"""Attribution patching (AtP): the first-order estimate of patching each unit from undesired to general.

Nanda, "Attribution Patching: Activation Patching At Industrial Scale" (2023), and Syed, Rager and
Conmy, "Attribution Patching Outperforms Automated Circuit Discovery" (2023, arXiv 2310.10348).
Written for this project from their description: activation patching replaces a unit's activation on
a corrupted run by its activation on a clean run and measures the change of a metric; attribution
patching estimates that change for every unit at once as ``gradient x (a_clean - a_corrupt)``.

The paired sets are not aligned token by token (different samples, different lengths), so the
activations are pooled per set. For a unit with activation ``a_t`` at position ``t`` (a neuron: one
input feature of the MLP output projection; a head: its output vector, the slice of the attention
output projection's input), and a sample ``s`` with explained positions ``T(s)`` (its continuation's
tokens, or the focused ones; the positions whose logits are explained):

* ``J_s`` = the mean over ``T(s)`` of the explained token's logit (``objective="logprob"``: its
  log-probability): the undesired objective;
* ``mean_X`` = the mean over the samples ``s`` of set ``X`` of the mean of ``a_t`` over ``T(s)``;
* ``g`` = the mean over the undesired samples of ``sum over t in T(s) of dJ_s / da_t``: the gradient
  of the undesired objective with respect to one shift of the unit's activation at every explained
  position;
* ``AtP = g . (mean_undesired - mean_general)`` (a dot product over the head's features).

Shifting the unit's activation at the explained positions of every undesired sample by
``mean_general - mean_undesired`` changes the mean undesired objective by ``-AtP`` to first order:
a large ``AtP`` marks a unit whose undesired-vs-general difference drives the undesired tokens. The
score is ``-AtP`` (higher = keep), so pruning the lowest takes those units first. Weights are refused:
both sets run the same weights, so there is no weight difference to patch.
"""

from __future__ import annotations

import torch

from hf_lrp_surgery.references.samples import ReferenceSample
from hf_lrp_surgery.scoring._units import UNIT_KINDS, encode_all, explained_positions, unit_batches
from hf_lrp_surgery.scoring.registry import ScoringRequest, register_scorer
from hf_lrp_surgery.scoring.scores import Scores

__all__ = ["atp"]


def _pooled(
    request: ScoringRequest, samples: list[ReferenceSample], which: str, *, gradients: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Kind -> ``[layers, units(, head_dim)]``: the set's mean activation and (if asked) mean summed gradient."""
    components = [c for c in UNIT_KINDS if c in request.options.components]
    encoded = encode_all(request, samples)
    positions = [explained_positions(s, e) for s, e in zip(samples, encoded)]
    means: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def add(into: dict[str, torch.Tensor], kind: str, value: torch.Tensor) -> None:
        into[kind] = into[kind] + value if kind in into else value

    for batch in unit_batches(
        request, encoded, components, gradients=gradients, description=f"{request.description} ({which})"
    ):
        for b in range(batch.size):
            where = torch.tensor(positions[batch.start + b], device=batch.values[components[0]][0].device)
            for kind in components:
                add(means, kind, torch.stack([layer[b, where].double().mean(0).cpu() for layer in batch.values[kind]]))
                if batch.gradients is not None:
                    layers = batch.gradients[kind]
                    add(grads, kind, torch.stack([layer[b, where].double().sum(0).cpu() for layer in layers]))
    count = len(samples)
    return {k: v / count for k, v in means.items()}, {k: v / count for k, v in grads.items()}


@register_scorer(
    "atp",
    description="attribution patching: -gradient . (mean undesired - mean general activation), gradient of "
    "the undesired objective (Nanda 2023; Syed et al., 2023)",
    paired=True,
    components=UNIT_KINDS,
)
def atp(request: ScoringRequest) -> Scores:
    """``-g . (mean_undesired - mean_general)`` per neuron and/or head (see the module's definition).

    Args:
        request: A paired request (``samples``: the undesired set; ``general_samples``: the general
            set); ``options.objective`` is what the gradient differentiates.

    Returns:
        Scores of the asked neurons and/or heads (higher = keep).

    Example:
        >>> scores = score_pair(model, toxic, neutral, tokenizer, method="atp")  # doctest: +SKIP
    """
    undesired, gradient = _pooled(request, request.samples, "undesired", gradients=True)
    general, _ = _pooled(request, request.general_samples, "general", gradients=False)
    scores = request.new_scores(
        {
            "method": "atp",
            "components": list(request.options.components),
            "objective": request.options.objective,
            "undesired_samples": len(request.samples),
            "general_samples": len(request.general_samples),
            "activation": "neurons: input of the MLP output projection; heads: the head's output vector",
            "pooling": "mean over each sample's explained positions, then over the set's samples",
            "gradient": "of the undesired objective (mean over explained tokens), summed over the explained "
            "positions, averaged over the undesired samples",
            "score": "-gradient . (mean undesired - mean general)",
        }
    )
    for kind, g in gradient.items():
        effect = g * (undesired[kind] - general[kind])
        if kind == "heads":
            effect = effect.sum(-1)
        setattr(scores, kind, (-effect).float())
    return scores
