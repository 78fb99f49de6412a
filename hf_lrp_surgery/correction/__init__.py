"""Behaviour correction: behaviours, paired reference sets, budget search under a general-behaviour limit, recipes.

The paper (Hatefi et al., 2025) attributes and evaluates on the same prompts. Here every recipe
splits the shipped *train* prompts into an attribution part and a validation part; the budget is
chosen on the validation part, under a limit on general-behaviour drift (KL to the original on
neutral prompts, perplexity on general text, both from the train split); the chosen model is then
measured once on the *held-out* split, which nothing was tuned on.

The contrast is paired: the undesired set holds the model's own bad continuations (toxic, or
looping) and the general set its good continuations **of the same prompts**, both explained by
teacher forcing, so that the difference isolates the behaviour rather than the topic.

Modules: :mod:`~hf_lrp_surgery.correction.behaviours` (what to correct, and the registry),
:mod:`~hf_lrp_surgery.correction.user` (a behaviour from user prompts and a scorer, parsed and probed
by :mod:`~hf_lrp_surgery.correction.scorers`), :mod:`~hf_lrp_surgery.correction.paired` (the paired sets
and their focus),
:mod:`~hf_lrp_surgery.correction.search` (the budget search),
:mod:`~hf_lrp_surgery.correction.tradeoff` (the multi-objective trade-off search),
:mod:`~hf_lrp_surgery.correction.iterative` (prune in rounds, re-attributing the pruned model) and
:mod:`~hf_lrp_surgery.correction.recipe` (the whole recipe and its report).
"""

from __future__ import annotations

from hf_lrp_surgery._deprecation import moved_names
from hf_lrp_surgery.correction.behaviours import (
    BEHAVIOURS,
    Behaviour,
    BehaviourMetadata,
    CommandOption,
    Metric,
    RegisteredBehaviour,
    behaviour_metadata,
    detox_behaviour,
    register_behaviour,
    repetition_behaviour,
)
from hf_lrp_surgery.correction.iterative import iterative_masks
from hf_lrp_surgery.correction.paired import (
    leave_one_word_out_positions,
    matched_positions,
    paired_contrast_sets,
    repeated_positions,
    scored_word_positions,
    word_groups,
)
from hf_lrp_surgery.correction.recipe import (
    SIDE_EFFECT_BEHAVIOURS,
    RecipeResult,
    recipe_split,
    run_recipe,
    side_effect_behaviours,
)
from hf_lrp_surgery.correction.scorers import PatternScorer, parse_scorer, probe_scorer
from hf_lrp_surgery.correction.search import (
    GENERAL_METRICS,
    FrontierPoint,
    GeneralBaseline,
    GeneralCost,
    GeneralLimits,
    budget_search,
    perplexity_key,
)
from hf_lrp_surgery.correction.tradeoff import (
    TradeoffResult,
    TradeoffSpace,
    TrialChoice,
    TrialMeasure,
    default_space,
    tradeoff_search,
)
from hf_lrp_surgery.correction.user import split_prompts, user_behaviour

__all__ = [
    "BEHAVIOURS",
    "GENERAL_METRICS",
    "Behaviour",
    "BehaviourMetadata",
    "CommandOption",
    "FrontierPoint",
    "GeneralBaseline",
    "GeneralCost",
    "GeneralLimits",
    "Metric",
    "PatternScorer",
    "RecipeResult",
    "RegisteredBehaviour",
    "TradeoffResult",
    "TradeoffSpace",
    "TrialChoice",
    "TrialMeasure",
    "SIDE_EFFECT_BEHAVIOURS",
    "behaviour_metadata",
    "budget_search",
    "default_space",
    "detox_behaviour",
    "iterative_masks",
    "leave_one_word_out_positions",
    "matched_positions",
    "paired_contrast_sets",
    "parse_scorer",
    "perplexity_key",
    "probe_scorer",
    "recipe_split",
    "register_behaviour",
    "repeated_positions",
    "repetition_behaviour",
    "run_recipe",
    "scored_word_positions",
    "side_effect_behaviours",
    "split_prompts",
    "tradeoff_search",
    "user_behaviour",
    "word_groups",
]


__getattr__ = moved_names(__name__, {"GeneralReference": "hf_lrp_surgery.correction.search:GeneralBaseline"})
