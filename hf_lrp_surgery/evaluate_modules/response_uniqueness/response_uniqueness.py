"""Response Uniqueness Ratio (RUR) as an ``evaluate`` metric.

Load it offline with ``evaluate.load(hf_lrp_surgery.evaluation.evaluate_module_path("response_uniqueness"))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate

from hf_lrp_surgery.evaluation import response_uniqueness_ratio

_DESCRIPTION = """\
The Response Uniqueness Ratio of a response is the number of distinct tokens divided by the number of tokens
(Hatefi et al., 2025, Eq. 11): 1.0 when no token repeats, low for a response that loops. The metric reports the
mean over non-empty responses; an empty response has no ratio (None) and is left out of the mean.
"""

_CITATION = """\
@article{hatefi2025attribution,
  title   = {Attribution-guided Pruning for Compression, Circuit Discovery, and Targeted Correction in LLMs},
  author  = {Hatefi, Sayed Mohammad Vakilzadeh and Dreyer, Maximilian and Achtibat, Reduan and
             Kahardipraja, Patrick and Wiegand, Thomas and Samek, Wojciech and Lapuschkin, Sebastian},
  journal = {arXiv preprint arXiv:2506.13727},
  year    = {2025}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: The responses: lists of generated token ids (the paper's definition), or strings, which are
        split on whitespace into words.
Returns:
    rur: The mean ratio over non-empty responses.
    rur_per_prediction: The ratio of each response (None for an empty one).
Raises:
    ValueError: Every response is empty.
Examples:
    >>> import evaluate
    >>> from hf_lrp_surgery.evaluation import evaluate_module_path
    >>> rur = evaluate.load(evaluate_module_path("response_uniqueness"))
    >>> rur.compute(predictions=[[1, 1, 2, 3], [4, 5]])
    {'rur': 0.875, 'rur_per_prediction': [0.75, 1.0]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ResponseUniqueness(evaluate.Metric):
    """Response Uniqueness Ratio of generated responses (Hatefi et al., 2025)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
                datasets.Features({"predictions": datasets.Value("string")}),
            ],
            reference_urls=["https://arxiv.org/abs/2506.13727"],
        )

    def _compute(self, predictions: Sequence[Sequence[int] | str]) -> dict[str, Any]:
        tokens = [p.split() if isinstance(p, str) else list(p) for p in predictions]
        ratios = [response_uniqueness_ratio(t) if t else None for t in tokens]
        defined = [r for r in ratios if r is not None]
        if not defined:
            raise ValueError(f"all {len(ratios)} responses are empty; the Response Uniqueness Ratio is undefined")
        return {"rur": sum(defined) / len(defined), "rur_per_prediction": ratios}
