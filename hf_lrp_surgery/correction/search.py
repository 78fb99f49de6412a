"""The budget search: effect and general-behaviour cost per budget, under limits on that cost.

General behaviour is the original model's next-token distribution on neutral prompts (KL to it) and
its perplexity on general text, measured once (:class:`GeneralBaseline`); every corrected copy is
costed against that measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery.carriers import apply_masks
from hf_lrp_surgery.correction.behaviours import Behaviour, Metric
from hf_lrp_surgery.evaluation import generate, next_token_kl, perplexity
from hf_lrp_surgery.options import SelectionOptions, reject_unknown
from hf_lrp_surgery.scoring import Scores

__all__ = ["GENERAL_METRICS", "FrontierPoint", "GeneralBaseline", "GeneralLimits", "budget_search"]

#: The general-behaviour metrics every recipe reports next to the behaviour's own, with the sets they use.
GENERAL_METRICS = (
    Metric("perplexity", "Perplexity", True, dataset="general_text"),
    Metric("kl", "Next-token KL divergence from the base model", True, dataset="neutral_prompts"),
)


@dataclass(frozen=True)
class GeneralLimits:
    """How much general behaviour a correction may cost.

    Attributes:
        max_kl: Largest mean KL(original || corrected) of next-token distributions on neutral prompts.
        max_perplexity_increase: Largest relative perplexity increase on general text (0.03 = +3%).

    Raises:
        ValueError: A limit is negative.

    Example:
        >>> GeneralLimits(max_kl=0.01).max_perplexity_increase
        0.03
    """

    max_kl: float = 0.02
    max_perplexity_increase: float = 0.03

    def __post_init__(self) -> None:
        if self.max_kl < 0 or self.max_perplexity_increase < 0:
            raise ValueError("general-behaviour limits must be >= 0")


@dataclass(frozen=True)
class FrontierPoint:
    """One budget of the search: the effect and the general-behaviour cost.

    Attributes:
        budget: Components pruned.
        effect: The behaviour metrics on the validation prompts.
        kl: Mean KL(original || corrected) on neutral prompts.
        perplexity: Perplexity on general text.
        perplexity_increase: Relative to the original model.
        within_limits: Whether both costs are within the limits.
    """

    budget: int
    effect: dict[str, float]
    kl: float
    perplexity: float
    perplexity_increase: float
    within_limits: bool


@dataclass
class GeneralBaseline:
    """The original model's general behaviour, measured once, against which corrected copies are costed.

    Attributes:
        prompts: Neutral prompts for the next-token KL.
        texts: General text for perplexity.
        perplexity: The original model's perplexity on ``texts``.
    """

    prompts: list[str]
    texts: list[str]
    perplexity: float

    @classmethod
    def of(cls, model: nn.Module, tokenizer: Any, prompts: Sequence[str], texts: Sequence[str]) -> GeneralBaseline:
        """Measure the original ``model``'s perplexity on ``texts`` once.

        Args:
            model: The original model.
            tokenizer: Its tokenizer.
            prompts: Neutral prompts for the KL of later candidates.
            texts: General text for perplexity.

        Returns:
            The baseline.

        Example:
            >>> general = GeneralBaseline.of(model, tokenizer, neutral, texts)  # doctest: +SKIP
            >>> kl, ppl, increase, ok = general.cost(model, corrected, tokenizer, GeneralLimits())  # doctest: +SKIP
        """
        return cls(list(prompts), list(texts), perplexity(model, tokenizer, list(texts), progress=False))

    def cost(
        self, original: nn.Module, candidate: nn.Module, tokenizer: Any, limits: GeneralLimits
    ) -> tuple[float, float, float, bool]:
        """What ``candidate`` costs in general behaviour.

        Args:
            original: The model this baseline measured.
            candidate: A corrected copy.
            tokenizer: Their tokenizer.
            limits: The limits to check.

        Returns:
            ``(KL, perplexity, relative perplexity increase, within limits)``.
        """
        kl = next_token_kl(original, candidate, tokenizer, self.prompts, progress=False)
        ppl = perplexity(candidate, tokenizer, self.texts, progress=False)
        increase = ppl / self.perplexity - 1.0
        return kl, ppl, increase, kl <= limits.max_kl and increase <= limits.max_perplexity_increase


def budget_search(
    model: nn.Module,
    tokenizer: Any,
    scores: Scores,
    behaviour: Behaviour,
    *,
    validation_prompts: Sequence[str],
    general_prompts: Sequence[str],
    general_texts: Sequence[str],
    budgets: Sequence[int],
    selection: SelectionOptions | None = None,
    limits: GeneralLimits = GeneralLimits(),
    progress: bool = True,
    **keywords: Any,
) -> tuple[list[FrontierPoint], FrontierPoint]:
    """Measure effect and cost at each budget; the chosen point is the best effect within the limits.

    Args:
        model: The original model.
        tokenizer: Its tokenizer.
        scores: Scores to select masks from (lowest pruned).
        behaviour: What to measure.
        validation_prompts: Prompts the effect is measured on (never the held-out split).
        general_prompts: Neutral prompts for the KL.
        general_texts: General text for perplexity.
        budgets: Budgets to try, ascending.
        selection: What to prune (default: neurons, global).
        limits: The general-behaviour limits.
        progress: Show a progress bar.
        **keywords: Fields of :class:`~hf_lrp_surgery.options.SelectionOptions` (``granularity=``,
            ``scope=``, ``modules=``), replacing those of ``selection``.

    Returns:
        The frontier (one point per budget, plus budget 0 first) and the chosen point (budget 0 if no
        budget is within the limits).

    Raises:
        BudgetError: A budget exceeds the components that may be pruned.

    Example:
        >>> points, chosen = budget_search(model, tokenizer, scores, repetition_behaviour(),  # doctest: +SKIP
        ...     validation_prompts=prompts, general_prompts=neutral, general_texts=texts, budgets=[2, 5])
    """
    selection = SelectionOptions.take(selection, keywords)
    reject_unknown(keywords, "budget_search")
    general = GeneralBaseline.of(model, tokenizer, general_prompts, general_texts)
    base_effect = behaviour.measure(generate(model, tokenizer, validation_prompts, behaviour.decoding, progress=False))
    points = [FrontierPoint(0, base_effect, 0.0, general.perplexity, 0.0, True)]
    for budget in tqdm(sorted(budgets), desc="budget search", unit="budget", disable=not progress, leave=False):
        mask = selection.select(scores, int(budget))
        candidate = apply_masks(model, mask, "bake").model
        effect = behaviour.measure(
            generate(candidate, tokenizer, validation_prompts, behaviour.decoding, progress=False)
        )
        kl, ppl, increase, ok = general.cost(model, candidate, tokenizer, limits)
        points.append(FrontierPoint(int(budget), effect, kl, ppl, increase, ok))
        del candidate
    sign = 1.0 if behaviour.lower_is_better else -1.0
    feasible = [p for p in points if p.within_limits]
    chosen = min(feasible, key=lambda p: (sign * p.effect[behaviour.primary], p.budget))
    return points, chosen
