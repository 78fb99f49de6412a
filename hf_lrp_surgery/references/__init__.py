"""Reference data: the samples a relevance pass explains, and the shipped, file and Hub sets they come from."""

from hf_lrp_surgery.references.samples import ReferenceSample, SampleLike, as_samples
from hf_lrp_surgery.references.sets import (
    GENERAL_DOMAINS,
    HUB_SETS,
    SHIPPED_SETS,
    ReferenceSource,
    general_texts,
    hub_set,
    load_reference_set,
    shipped_set,
    shipped_splits,
)

__all__ = [
    "GENERAL_DOMAINS",
    "HUB_SETS",
    "ReferenceSample",
    "ReferenceSource",
    "SHIPPED_SETS",
    "SampleLike",
    "as_samples",
    "general_texts",
    "hub_set",
    "load_reference_set",
    "shipped_set",
    "shipped_splits",
]
