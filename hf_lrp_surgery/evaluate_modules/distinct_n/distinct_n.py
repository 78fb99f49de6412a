"""Corpus-level distinct-n as an ``evaluate`` metric.

Load it offline with ``evaluate.load(hf_lrp_surgery.evaluation.evaluate_module_path("distinct_n"))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import datasets
import evaluate

from hf_lrp_surgery.evaluation import distinct_n

_DESCRIPTION = """\
Distinct-n is the number of distinct n-grams divided by the number of n-grams, over all responses together
(corpus level; Li et al., 2016). Low values mean repetitive responses, within or across responses.
"""

_CITATION = """\
@inproceedings{li2016diversity,
  title     = {A Diversity-Promoting Objective Function for Neural Conversation Models},
  author    = {Li, Jiwei and Galley, Michel and Brockett, Chris and Gao, Jianfeng and Dolan, Bill},
  booktitle = {Proceedings of NAACL-HLT},
  pages     = {110--119},
  year      = {2016}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: The responses: lists of token ids, or strings (split on whitespace into words).
    n: The n-gram order (default 2).
Returns:
    distinct_<n>: Distinct n-grams / n-grams (0.0 when no response has n items).
Examples:
    >>> import evaluate
    >>> from hf_lrp_surgery.evaluation import evaluate_module_path
    >>> metric = evaluate.load(evaluate_module_path("distinct_n"))
    >>> metric.compute(predictions=["a b a b", "a b c"], n=2)
    {'distinct_2': 0.6}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DistinctN(evaluate.Metric):
    """Corpus-level distinct-n of generated responses."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
            ],
            reference_urls=["https://aclanthology.org/N16-1014/"],
        )

    def _compute(self, predictions: Sequence[Sequence[int] | str], n: int = 2) -> dict[str, Any]:
        # One column type per call (the two feature sets above): all strings or all token-id lists.
        return {f"distinct_{n}": distinct_n(cast(Sequence[str], predictions), n)}
