"""AurA: units that tell the undesired samples from the general ones, by the AUROC of their activations.

Suau, Delobelle, Metcalf, Apostolopoulos, Rodríguez, "Whispering Experts: Neural Interventions for
Toxicity Mitigation in Language Models", ICML 2024 (arXiv 2407.12824). Written for this project from
the paper's description.

For each unit, every sample's activation is max-pooled over the sample's tokens, and the AUROC of that
value as a detector of the undesired set (positives) against the general set (negatives) is computed
(ties count one half). AurA dampens every unit with AUROC > 0.5 by ``alpha = 1 - 2 (AUROC - 0.5)``
(an expert that separates perfectly is silenced, a chance-level one is left alone).

Here:

* **Which activation.** A neuron is an input feature of the MLP output projection (this project's
  neuron: what a neuron mask zeroes; for gated MLPs the product ``act(gate) * up``). AurA's original
  reads the MLP activations of every layer (the output of the non-linearity). A head is scored by the
  L2 norm of its output (its slice of the attention output projection's input). Weights are refused:
  a single weight has no activation to pool.
* **Which tokens.** The sample's explained positions (see :func:`._units.explained_positions`): the
  continuation's tokens (only the focused ones where the recipe focused the undesired set), or every
  token of a sample without continuation, as in the original.
* **The score** is ``0.5 - AUROC`` (higher = keep, like every score): pruning the lowest takes the
  strongest experts first. A hard mask of the top-K is not AurA's intervention, which scales *every*
  expert; :func:`aura_scales` gives those scales per unit for a mask that carries a scale.
"""

from __future__ import annotations

import torch

from hf_lrp_surgery.lrp.layout import Granularity
from hf_lrp_surgery.references.samples import ReferenceSample
from hf_lrp_surgery.scoring._units import UNIT_KINDS, encode_all, explained_positions, unit_batches
from hf_lrp_surgery.scoring.registry import ScoringRequest, register_scorer
from hf_lrp_surgery.scoring.scores import Scores

__all__ = ["aura", "aura_scales", "auroc"]


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """AUROC of every column as a detector of the positives: ``P(p > n) + P(p == n) / 2``.

    Args:
        positive: ``[n_pos, *units]`` values of the positive samples.
        negative: ``[n_neg, *units]`` values of the negative samples.

    Returns:
        ``[*units]`` in ``[0, 1]`` (float64); 0.5 = chance, 1 = every positive above every negative.

    Raises:
        ValueError: A side is empty or the unit shapes differ.

    Example:
        >>> auroc(torch.tensor([[3.0], [2.0]]), torch.tensor([[1.0], [2.0]]))
        tensor([0.8750], dtype=torch.float64)
    """
    if not len(positive) or not len(negative) or positive.shape[1:] != negative.shape[1:]:
        raise ValueError(
            f"auroc needs non-empty positives and negatives of one unit shape, got {tuple(positive.shape)} and "
            f"{tuple(negative.shape)}"
        )
    units = positive.shape[1:]
    p = positive.double().reshape(len(positive), -1).T.contiguous()  # [U, n_pos]
    n = negative.double().reshape(len(negative), -1).T.sort(-1).values.contiguous()  # [U, n_neg]
    below = torch.searchsorted(n, p, side="left")  # negatives strictly below each positive
    up_to = torch.searchsorted(n, p, side="right")  # ... and those equal to it
    wins = (below + up_to).double().sum(-1) / 2
    return (wins / (len(positive) * len(negative))).reshape(units)


def _max_pooled(request: ScoringRequest, samples: list[ReferenceSample], which: str) -> dict[str, torch.Tensor]:
    """Kind -> ``[samples, layers, units]``: each sample's largest activation (heads: output norm)."""
    components = [c for c in UNIT_KINDS if c in request.options.components]
    encoded = encode_all(request, samples)
    positions = [explained_positions(s, e) for s, e in zip(samples, encoded)]
    pooled: dict[str, list[torch.Tensor]] = {kind: [] for kind in components}
    for batch in unit_batches(request, encoded, components, description=f"{request.description} ({which})"):
        for b in range(batch.size):
            where = torch.tensor(positions[batch.start + b], device=batch.values[components[0]][0].device)
            for kind in components:
                rows = []
                for layer in batch.values[kind]:
                    picked = layer[b, where].double()
                    rows.append((picked.norm(dim=-1) if kind == "heads" else picked).amax(0).cpu())
                pooled[kind].append(torch.stack(rows))
    return {kind: torch.stack(v) for kind, v in pooled.items()}


@register_scorer(
    "aura",
    description="0.5 - AUROC of max-pooled activations, undesired vs general (AurA; Suau et al., ICML 2024)",
    paired=True,
    components=UNIT_KINDS,
)
def aura(request: ScoringRequest) -> Scores:
    """``0.5 - AUROC`` per neuron and/or head, the undesired set being the positives.

    Args:
        request: A paired request (``samples``: the undesired set; ``general_samples``: the general set).

    Returns:
        Scores of the asked neurons and/or heads in ``[-0.5, 0.5]`` (higher = keep).

    Example:
        >>> scores = score_pair(model, toxic, neutral, tokenizer, method="aura")  # doctest: +SKIP
    """
    undesired = _max_pooled(request, request.samples, "undesired")
    general = _max_pooled(request, request.general_samples, "general")
    scores = request.new_scores(
        {
            "method": "aura",
            "components": list(request.options.components),
            "undesired_samples": len(request.samples),
            "general_samples": len(request.general_samples),
            "activation": "neurons: input of the MLP output projection; heads: L2 norm of the head's output",
            "pooling": "max over the explained positions (every token of a sample without continuation)",
            "score": "0.5 - AUROC",
            "scale": "alpha = 1 - 2 * max(0, AUROC - 0.5) = min(1, 1 + 2 * score) (aura_scales)",
        }
    )
    for kind in undesired:
        setattr(scores, kind, (0.5 - auroc(undesired[kind], general[kind])).float())
    return scores


def aura_scales(scores: Scores) -> dict[str, torch.Tensor]:
    """AurA's dampening factor of every unit, per carrier module: ``alpha = 1 - 2 * max(0, AUROC - 0.5)``.

    Units with AUROC <= 0.5 keep 1; a perfect detector of the undesired set gets 0. This is what a
    mask carrying one scale per unit (rather than zeroing) would apply.

    Args:
        scores: Scores made by the ``aura`` method.

    Returns:
        Carrier module (the MLP output projection for neurons, the attention output projection for
        heads; as in :class:`~hf_lrp_surgery.masks.Mask` indices) -> ``[units]`` float32 scales in ``[0, 1]``.

    Raises:
        ValueError: The scores were not made by ``aura``.

    Example:
        >>> scores = surgeon.contrast(undesired=toxic, general=neutral, method="aura")  # doctest: +SKIP
        >>> scales = aura_scales(scores)  # doctest: +SKIP
        >>> scales["model.layers.0.mlp.down_proj"]  # one scale per neuron of block 0  # doctest: +SKIP
        tensor([1.0000, 0.6200, ...])
    """
    if scores.method != "aura":
        raise ValueError(f"aura_scales reads scores of the aura method, got {scores.method} scores")
    out: dict[str, torch.Tensor] = {}
    kinds: tuple[Granularity, ...] = UNIT_KINDS
    for kind in kinds:
        values = getattr(scores, kind)
        if values is None:
            continue
        for module, row in zip(scores.layout.carriers(kind), values):
            out[module] = (1 + 2 * row.double()).clamp(max=1.0).float()
    return out
