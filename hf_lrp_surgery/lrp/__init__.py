"""The relevance engine: AttnLRP rules, architecture registry, collectors (no knowledge of pruning).

References: Achtibat et al., "AttnLRP: Attention-Aware Layer-wise Relevance Propagation for
Transformers", ICML 2024 (arXiv 2402.05602); Arras et al., arXiv 2502.15886 (LRP as modified
gradient x input).
"""

from hf_lrp_surgery._deprecation import moved_names
from hf_lrp_surgery.lrp.architectures import REGISTRY, resolve, supported_model_types
from hf_lrp_surgery.lrp.attach import LRPRules
from hf_lrp_surgery.lrp.collect import COLLECTABLE, collect_relevance
from hf_lrp_surgery.lrp.result import RelevanceResult
from hf_lrp_surgery.references.samples import ReferenceSample, as_samples

__all__ = [
    "COLLECTABLE",
    "LRPRules",
    "REGISTRY",
    "ReferenceSample",
    "RelevanceResult",
    "as_samples",
    "collect_relevance",
    "resolve",
    "supported_model_types",
]

__getattr__ = moved_names(__name__, {"COMPONENTS": "hf_lrp_surgery.lrp.collect:COLLECTABLE"})
