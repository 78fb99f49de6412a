"""The evaluation harness: generation, toxicity, repetition, perplexity and drift from the original model.

* :func:`generate`: batched continuations under explicit :class:`DecodingSettings`;
* :func:`toxicity` with pluggable scorers (:func:`get_scorer`; offline default: alt-profanity-check);
* :func:`response_uniqueness_ratio` (Hatefi et al., 2025, Eq. 11), :func:`mean_rur`, :func:`distinct_n`;
* :func:`perplexity` and :func:`next_token_kl` (general behaviour kept by a correction);
* ``evaluate`` modules for the same metrics: ``evaluate.load(evaluate_module_path("toxicity"))``.
"""

from hf_lrp_surgery.evaluation.generation import DecodingSettings, Generation, generate, prompt_ids
from hf_lrp_surgery.evaluation.language import next_token_kl, perplexity
from hf_lrp_surgery.evaluation.modules import EVALUATE_MODULES, evaluate_module_path
from hf_lrp_surgery.evaluation.repetition import distinct_n, mean_rur, response_uniqueness_ratio
from hf_lrp_surgery.evaluation.toxicity import (
    KNOWN_TOXIC_LABELS,
    CallableScorer,
    PipelineScorer,
    ProfanityCheckScorer,
    ScorerSpec,
    ToxicityResult,
    ToxicityScorer,
    get_scorer,
    toxicity,
)

__all__ = [
    "EVALUATE_MODULES",
    "KNOWN_TOXIC_LABELS",
    "CallableScorer",
    "DecodingSettings",
    "Generation",
    "PipelineScorer",
    "ProfanityCheckScorer",
    "ScorerSpec",
    "ToxicityResult",
    "ToxicityScorer",
    "distinct_n",
    "evaluate_module_path",
    "generate",
    "prompt_ids",
    "get_scorer",
    "mean_rur",
    "next_token_kl",
    "perplexity",
    "response_uniqueness_ratio",
    "toxicity",
]
