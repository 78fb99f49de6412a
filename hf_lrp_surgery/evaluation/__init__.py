"""The evaluation harness: generation, toxicity, repetition, perplexity and drift from the original model.

* :func:`generate`: batched continuations under explicit :class:`DecodingSettings`;
* :func:`toxicity` with pluggable scorers (:func:`get_scorer`; offline default: alt-profanity-check), and the
  RealToxicityPrompts protocol (:func:`sample_protocol_toxicity`: expected maximum toxicity, toxicity
  probability, with intervals);
* :func:`response_uniqueness_ratio` (Hatefi et al., 2025, Eq. 11), :func:`mean_rur`, :func:`distinct_n`;
* :func:`perplexity`, :func:`induction_loss` (in-context copying) and :func:`next_token_kl` (general behaviour
  kept by a correction);
* ``evaluate`` modules for the same metrics: ``evaluate.load(evaluate_module_path("toxicity"))``.
"""

from hf_lrp_surgery.evaluation.generation import DecodingSettings, Generation, generate, prompt_ids
from hf_lrp_surgery.evaluation.language import (
    InductionResult,
    induction_loss,
    induction_sequences,
    next_token_kl,
    perplexity,
)
from hf_lrp_surgery.evaluation.modules import EVALUATE_MODULES, evaluate_module_path
from hf_lrp_surgery.evaluation.repetition import distinct_n, mean_rur, response_uniqueness_ratio
from hf_lrp_surgery.evaluation.toxicity import (
    KNOWN_TOXIC_LABELS,
    CallableScorer,
    PipelineScorer,
    ProfanityCheckScorer,
    ProtocolToxicity,
    ScorerSpec,
    ToxicityResult,
    ToxicityScorer,
    bootstrap_interval,
    get_scorer,
    protocol_toxicity,
    sample_protocol_toxicity,
    toxicity,
    wilson_interval,
)

__all__ = [
    "EVALUATE_MODULES",
    "KNOWN_TOXIC_LABELS",
    "CallableScorer",
    "DecodingSettings",
    "Generation",
    "InductionResult",
    "PipelineScorer",
    "ProfanityCheckScorer",
    "ProtocolToxicity",
    "ScorerSpec",
    "ToxicityResult",
    "ToxicityScorer",
    "bootstrap_interval",
    "distinct_n",
    "evaluate_module_path",
    "generate",
    "prompt_ids",
    "get_scorer",
    "induction_loss",
    "induction_sequences",
    "mean_rur",
    "next_token_kl",
    "perplexity",
    "protocol_toxicity",
    "response_uniqueness_ratio",
    "sample_protocol_toxicity",
    "toxicity",
    "wilson_interval",
]
