"""Component scores: LRP relevance and the baselines it is compared with, behind one interface.

A :class:`Scores` value holds, for MLP neurons, attention heads and/or individual weights, one
number per component that says how much the model needs it: **higher means keep, the lowest are
pruned**. Every method produces the same value, so every mask can be compared with baselines:

========== ==================================================================================
lrp        AttnLRP relevance (Achtibat et al., 2024) of the reference set (Hatefi et al., 2025)
gradient   gradient x activation (neurons, heads) / gradient x weight (weights), no LRP rules
activation mean |a| of a neuron, mean L2 norm of a head's output, mean |x_j| of a weight's input
wanda      |W_ij| * RMS(x_j) (Sun et al., "A Simple and Effective Pruning Approach for LLMs",
           2023); neurons: RMS(a_i) * ||W_out[:, i]||, heads: RMS(head output) * ||W_o[:, head]||
magnitude  |W_ij|; neurons ||W_out[:, i]||; heads ||W_o[:, head]|| (no samples)
random     uniform(0, 1) from a seeded generator (no samples)
========== ==================================================================================

Paired methods read the undesired and the general set together and are their own contrast
(:func:`score_pair`, ``Surgeon.contrast``; neurons and heads only):

================== ==========================================================================
aura               0.5 - AUROC of max-pooled activations, undesired vs general (Suau et al.,
                   ICML 2024); :func:`aura_scales` gives AurA's dampening factor per unit
repetition_neurons -(mean activation after the onset of a repetition - before it), over the
                   looping samples (Hiraoka & Inui, NAACL 2025)
atp                attribution patching, -gradient . (mean undesired - mean general activation)
                   (Nanda 2023; Syed et al., 2023)
================== ==========================================================================

Each method is one function in one module (:mod:`.relevance`, :mod:`.statistics`,
:mod:`.weights_only`, :mod:`.aura`, :mod:`.repetition_neurons`, :mod:`.patching`) registered with
:func:`register_scorer`; :func:`score` and :func:`score_pair` dispatch through the registry, and the
method lists below are read from it.

:func:`contrast` turns the scores of a general and an undesired reference set into the paper's
differential score ``R_general - R_undesired`` (low = responsible for the undesired behaviour and
unimportant in general), with per-set normalisation and protection of components the general
behaviour needs most.
"""

from __future__ import annotations

from hf_lrp_surgery.lrp.layout import Layout
from hf_lrp_surgery.options import Aggregation, ContrastOptions, Normalization, ScoringOptions

# The scorer modules register the built-in methods on import, in the order METHODS lists them.
from hf_lrp_surgery.scoring import relevance, statistics, weights_only  # noqa: F401

# isort: split
# The paired methods, after the one-set ones.
from hf_lrp_surgery.scoring import aura, patching, repetition_neurons  # noqa: F401
from hf_lrp_surgery.scoring.aura import aura_scales, auroc
from hf_lrp_surgery.scoring.differential import contrast
from hf_lrp_surgery.scoring.registry import (
    Method,
    ScorerEntry,
    ScoringRequest,
    get_scorer,
    register_scorer,
    registered_methods,
    score,
    score_pair,
    unregister_scorer,
)
from hf_lrp_surgery.scoring.scores import Scores

__all__ = [
    "Aggregation",
    "CIRCUIT_METHODS",
    "ContrastOptions",
    "Layout",
    "METHODS",
    "Method",
    "Normalization",
    "PAIRED_METHODS",
    "SAMPLE_FREE_METHODS",
    "ScorerEntry",
    "Scores",
    "ScoringOptions",
    "ScoringRequest",
    "aura_scales",
    "auroc",
    "contrast",
    "get_scorer",
    "register_scorer",
    "registered_methods",
    "score",
    "score_pair",
    "unregister_scorer",
]

# Read from the registry on every access, so that methods registered later are listed too.
_METHOD_LISTS = {
    #: Every registered scoring method.
    "METHODS": {},
    #: Methods that read only the weights (or nothing): they take no reference samples.
    "SAMPLE_FREE_METHODS": {"needs_samples": False},
    #: The default set compared in circuit discovery and the recipes: LRP and its baselines.
    "CIRCUIT_METHODS": {"in_comparison": True},
    #: Methods that read the undesired and the general set together (score_pair, Surgeon.contrast).
    "PAIRED_METHODS": {"paired": True},
}


def __getattr__(name: str) -> tuple[str, ...]:
    """``METHODS``, ``SAMPLE_FREE_METHODS``, ``CIRCUIT_METHODS``, ``PAIRED_METHODS``, as the registry holds them."""
    if name in _METHOD_LISTS:
        return registered_methods(**_METHOD_LISTS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
