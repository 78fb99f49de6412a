"""The budget search: effect and general-behaviour cost per budget, under limits on that cost.

General behaviour is measured broadly, once, on the original model (:class:`GeneralBaseline`):

* the next-token KL to it on neutral prompts;
* perplexity on general text of several domains, each reported and limited on its own (prose,
  technical documentation, code, dialogue, lists and tables: :data:`~hf_lrp_surgery.references.GENERAL_DOMAINS`),
  because a correction can keep prose intact and still break another domain (pruning copying heads
  raised perplexity on technical text by 19% at +0.2% on prose);
* the induction probe (:func:`~hf_lrp_surgery.evaluation.induction_loss`): the loss on the second copy
  of random token sequences, which in-context copying drives far below the first copy's.

Every corrected copy is costed against that measurement (:meth:`GeneralBaseline.cost`); it is
within the limits only if the KL, every domain's perplexity and the induction probe are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery.carriers import apply_masks
from hf_lrp_surgery.correction.behaviours import Behaviour, Metric
from hf_lrp_surgery.evaluation import InductionResult, generate, induction_loss, next_token_kl, perplexity
from hf_lrp_surgery.exceptions import EvaluationError
from hf_lrp_surgery.options import SelectionOptions, reject_unknown
from hf_lrp_surgery.references import GENERAL_DOMAINS
from hf_lrp_surgery.scoring import Scores

__all__ = [
    "GENERAL_METRICS",
    "FrontierPoint",
    "GeneralBaseline",
    "GeneralCost",
    "GeneralLimits",
    "budget_search",
    "perplexity_key",
]

#: The domain whose perplexity is reported as plain ``perplexity`` (as before there were domains).
_FIRST_DOMAIN = "prose"
_DOMAIN_TITLES = {
    "prose": "prose",
    "technical": "technical documentation",
    "code": "code",
    "dialogue": "dialogue",
    "lists": "lists and tables",
}
#: Where the induction probe's figures are "measured on" in reports and cards (not a shipped text set).
INDUCTION_DATASET = "induction_probe"


def perplexity_key(domain: str) -> str:
    """The key of a domain's perplexity in held-out figures and ``report.json``.

    Args:
        domain: A general-text domain (a key of :data:`~hf_lrp_surgery.references.GENERAL_DOMAINS`, or any
            name given to :meth:`GeneralBaseline.of`).

    Returns:
        ``"perplexity"`` for prose (the key of reports from before the domains), else ``"perplexity_<domain>"``.

    Example:
        >>> perplexity_key("prose"), perplexity_key("code")
        ('perplexity', 'perplexity_code')
    """
    return "perplexity" if domain == _FIRST_DOMAIN else f"perplexity_{domain}"


#: The general-behaviour metrics every recipe reports next to the behaviour's own, with the sets they use.
GENERAL_METRICS = (
    *(
        Metric(perplexity_key(domain), f"Perplexity ({_DOMAIN_TITLES.get(domain, domain)})", True, dataset=name)
        for domain, name in GENERAL_DOMAINS.items()
    ),
    Metric(
        "induction_loss",
        "In-context copying: loss on the second copy of random tokens (nats)",
        True,
        dataset=INDUCTION_DATASET,
    ),
    Metric(
        "induction_first_copy_loss", "Loss on the first copy of random tokens (nats)", True, dataset=INDUCTION_DATASET
    ),
    Metric("kl", "Next-token KL divergence from the base model", True, dataset="neutral_prompts"),
)


@dataclass(frozen=True)
class GeneralLimits:
    """How much general behaviour a correction may cost; a correction is within them only if it is within every one.

    Attributes:
        max_kl: Largest mean KL(original || corrected) of next-token distributions on neutral prompts.
        max_perplexity_increase: Largest relative perplexity increase, applied to *each* general-text
            domain on its own (0.03 = +3%).
        max_induction_increase: Largest increase of the induction probe's second-copy loss, in nats
            (absolute: the loss of a good copier is small, so a relative limit would be loose where it
            matters least). Default 0.25 nats: the geometric-mean probability of each copied token may fall
            by at most 22% (e^-0.25). Measured on SmolLM2-135M (16 sequences of 50 tokens): copying lowers
            the loss from 14.3 nats on the first copy to 2.8 on the second, so 0.25 is about 2% of that
            advantage, the order of the 3% perplexity limit; zeroing the two heads that attend most to the
            token to copy costs +4.1 nats and the five most +9.0 (copying gone) while prose perplexity moves
            by -0.4%, and five random heads cost +0.4 to +2.1 nats.

    Raises:
        ValueError: A limit is negative or not a number.

    Example:
        >>> GeneralLimits(max_kl=0.01).max_perplexity_increase
        0.03
    """

    max_kl: float = 0.02
    max_perplexity_increase: float = 0.03
    max_induction_increase: float = 0.25

    def __post_init__(self) -> None:
        for value in (self.max_kl, self.max_perplexity_increase, self.max_induction_increase):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"general-behaviour limits must be numbers >= 0, got {value!r}")


@dataclass(frozen=True)
class GeneralCost:
    """What a corrected copy costs in general behaviour, against a :class:`GeneralBaseline`.

    Unpacks as ``(kl, perplexity, perplexity_increase, within_limits)``, the tuple
    :meth:`GeneralBaseline.cost` returned before the domains and the induction probe.

    Attributes:
        kl: Mean KL(original || corrected) on the neutral prompts.
        perplexities: Domain -> the corrected copy's perplexity.
        perplexity_increases: Domain -> its relative increase over the original's.
        induction: The corrected copy's induction probe (``None`` where the baseline has none).
        induction_increase: Its second-copy loss minus the original's, in nats (``None``: no probe).
        exceeded: The limits exceeded: ``"kl"``, ``"perplexity:<domain>"``, ``"induction"`` (empty: within).
    """

    kl: float
    perplexities: dict[str, float]
    perplexity_increases: dict[str, float]
    induction: InductionResult | None
    induction_increase: float | None
    exceeded: tuple[str, ...]

    @property
    def within_limits(self) -> bool:
        """Whether no limit is exceeded."""
        return not self.exceeded

    @property
    def perplexity(self) -> float:
        """The perplexity of the first domain (prose in the recipes)."""
        return next(iter(self.perplexities.values()))

    @property
    def perplexity_increase(self) -> float:
        """The largest relative perplexity increase over the domains (the one that binds)."""
        return max(self.perplexity_increases.values())

    def __iter__(self) -> Iterator[Any]:
        return iter((self.kl, self.perplexity, self.perplexity_increase, self.within_limits))

    def figures(self) -> dict[str, Any]:
        """The figures as held-out results hold them (flat keys, see :data:`GENERAL_METRICS`).

        Returns:
            ``perplexity`` / ``perplexity_<domain>``, ``induction_loss``, ``induction_first_copy_loss``,
            ``induction_increase``, ``kl``, ``perplexity_increase`` (largest), ``perplexity_increases``
            (per domain), ``exceeded`` and ``within_limits``.
        """
        out: dict[str, Any] = {perplexity_key(d): value for d, value in self.perplexities.items()}
        if self.induction is not None:
            out["induction_loss"] = self.induction.second_copy_loss
            out["induction_first_copy_loss"] = self.induction.first_copy_loss
            out["induction_increase"] = self.induction_increase
        return {
            **out,
            "kl": self.kl,
            "perplexity_increase": self.perplexity_increase,
            "perplexity_increases": dict(self.perplexity_increases),
            "exceeded": list(self.exceeded),
            "within_limits": self.within_limits,
        }


@dataclass(frozen=True)
class FrontierPoint:
    """One budget of the search: the effect and the general-behaviour cost.

    Attributes:
        budget: Components pruned.
        effect: The behaviour metrics on the validation prompts.
        kl: Mean KL(original || corrected) on neutral prompts.
        perplexity: Perplexity on prose (``general_text``, as in reports from before the domains).
        perplexity_increase: The largest relative perplexity increase over the domains.
        within_limits: Whether every cost is within the limits.
        perplexities: Domain -> perplexity.
        perplexity_increases: Domain -> relative increase.
        induction_loss: The induction probe's second-copy loss (``None``: not measured).
        induction_first_copy_loss: Its first-copy loss.
        induction_increase: Second-copy loss increase over the original's, in nats.
        exceeded: The limits exceeded (``"kl"``, ``"perplexity:<domain>"``, ``"induction"``).
    """

    budget: int
    effect: dict[str, float]
    kl: float
    perplexity: float
    perplexity_increase: float
    within_limits: bool
    perplexities: dict[str, float] = field(default_factory=dict)
    perplexity_increases: dict[str, float] = field(default_factory=dict)
    induction_loss: float | None = None
    induction_first_copy_loss: float | None = None
    induction_increase: float | None = None
    exceeded: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, budget: int, effect: dict[str, float], cost: GeneralCost) -> FrontierPoint:
        """A point from a budget, its effect and its :class:`GeneralCost`."""
        induction = cost.induction
        return cls(
            budget,
            effect,
            cost.kl,
            cost.perplexity,
            cost.perplexity_increase,
            cost.within_limits,
            dict(cost.perplexities),
            dict(cost.perplexity_increases),
            None if induction is None else induction.second_copy_loss,
            None if induction is None else induction.first_copy_loss,
            cost.induction_increase,
            list(cost.exceeded),
        )


def _domains(texts: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if isinstance(texts, str):
        raise TypeError("general texts must be a list of texts or a mapping of domain -> texts, not one string")
    found = {_FIRST_DOMAIN: list(texts)} if not isinstance(texts, Mapping) else {d: list(t) for d, t in texts.items()}
    empty = [domain for domain, values in found.items() if not values]
    if not found or empty:
        raise EvaluationError(f"no general text to measure perplexity on (empty domains: {empty or 'all'})")
    return found


@dataclass
class GeneralBaseline:
    """The original model's general behaviour, measured once, against which corrected copies are costed.

    Attributes:
        prompts: Neutral prompts for the next-token KL.
        texts: Domain -> general text for perplexity (a plain list given to :meth:`of` is domain ``"prose"``).
        perplexities: Domain -> the original model's perplexity.
        induction: The original model's induction probe (``None``: not measured, not limited).
    """

    prompts: list[str]
    texts: dict[str, list[str]]
    perplexities: dict[str, float]
    induction: InductionResult | None = None

    @property
    def perplexity(self) -> float:
        """The original model's perplexity on the first domain (prose in the recipes)."""
        return next(iter(self.perplexities.values()))

    @classmethod
    def of(
        cls,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[str],
        texts: Sequence[str] | Mapping[str, Sequence[str]],
        *,
        induction_sequences: int | None = 16,
        induction_seed: int = 0,
        progress: bool = False,
    ) -> GeneralBaseline:
        """Measure the original ``model`` once: perplexity on every domain's texts, and the induction probe.

        Args:
            model: The original model.
            tokenizer: Its tokenizer.
            prompts: Neutral prompts for the KL of later candidates.
            texts: General text for perplexity: domain -> texts (e.g.
                :func:`~hf_lrp_surgery.references.general_texts`), or one list (domain ``"prose"``).
            induction_sequences: Random sequences of the induction probe (``None``: no probe).
            induction_seed: Seed of its sequences (the candidates are probed with the same ones).
            progress: Show progress bars.

        Returns:
            The baseline.

        Raises:
            EvaluationError: A domain has no text.

        Example:
            >>> general = GeneralBaseline.of(model, tokenizer, neutral, general_texts("train"))  # doctest: +SKIP
            >>> cost = general.cost(model, corrected, tokenizer, GeneralLimits())  # doctest: +SKIP
            >>> cost.within_limits, cost.exceeded  # doctest: +SKIP
            (False, ('perplexity:code',))
        """
        domains = _domains(texts)
        perplexities = {
            domain: perplexity(model, tokenizer, values, progress=progress) for domain, values in domains.items()
        }
        probe = (
            None
            if induction_sequences is None
            else induction_loss(model, tokenizer, sequences=induction_sequences, seed=induction_seed, progress=progress)
        )
        return cls(list(prompts), domains, perplexities, probe)

    def unchanged(self) -> GeneralCost:
        """The cost of the original model itself (budget 0): its own figures, no increase, within every limit."""
        return GeneralCost(
            0.0,
            dict(self.perplexities),
            dict.fromkeys(self.perplexities, 0.0),
            self.induction,
            None if self.induction is None else 0.0,
            (),
        )

    def cost(
        self,
        original: nn.Module,
        candidate: nn.Module,
        tokenizer: Any,
        limits: GeneralLimits,
        *,
        progress: bool = False,
    ) -> GeneralCost:
        """What ``candidate`` costs in general behaviour.

        Args:
            original: The model this baseline measured.
            candidate: A corrected copy.
            tokenizer: Their tokenizer.
            limits: The limits to check.
            progress: Show progress bars.

        Returns:
            The cost (KL, perplexity per domain, induction probe, the limits exceeded).
        """
        kl = next_token_kl(original, candidate, tokenizer, self.prompts, progress=progress)
        perplexities = {
            domain: perplexity(candidate, tokenizer, values, progress=progress) for domain, values in self.texts.items()
        }
        increases = {domain: perplexities[domain] / self.perplexities[domain] - 1.0 for domain in perplexities}
        exceeded = ["kl"] if kl > limits.max_kl else []
        exceeded += [f"perplexity:{d}" for d, value in increases.items() if value > limits.max_perplexity_increase]
        probe, rise = self.probe(candidate, tokenizer, progress=progress)
        if rise is not None and rise > limits.max_induction_increase:
            exceeded.append("induction")
        return GeneralCost(kl, perplexities, increases, probe, rise, tuple(exceeded))

    def screen(
        self, original: nn.Module, candidate: nn.Module, tokenizer: Any, limits: GeneralLimits
    ) -> tuple[float, float | None, tuple[str, ...]]:
        """The cheap part of :meth:`cost`: KL and the induction probe only (no perplexity), against ``limits``.

        What the trade-off search holds every trial to; :meth:`cost` confirms the best ones on every domain.

        Args:
            original: The model this baseline measured.
            candidate: A corrected copy.
            tokenizer: Their tokenizer.
            limits: The limits to check (their perplexity limit is not).

        Returns:
            ``(kl, induction increase or None, limits exceeded among "kl" and "induction")``.

        Example:
            >>> kl, rise, exceeded = general.screen(model, corrected, tokenizer, GeneralLimits())  # doctest: +SKIP
        """
        kl = next_token_kl(original, candidate, tokenizer, self.prompts, progress=False)
        _, rise = self.probe(candidate, tokenizer)
        exceeded = ["kl"] if kl > limits.max_kl else []
        if rise is not None and rise > limits.max_induction_increase:
            exceeded.append("induction")
        return kl, rise, tuple(exceeded)

    def probe(
        self, candidate: nn.Module, tokenizer: Any, *, progress: bool = False
    ) -> tuple[InductionResult | None, float | None]:
        """The induction probe of ``candidate`` on the baseline's sequences, and its second-copy loss increase.

        Cheap (one forward pass over the probe's sequences), so the trade-off search runs it in every trial.

        Args:
            candidate: A corrected copy of the model this baseline measured.
            tokenizer: Its tokenizer.
            progress: Show a progress bar.

        Returns:
            ``(probe, increase in nats)``; ``(None, None)`` where the baseline has no probe.

        Example:
            >>> probe, rise = general.probe(corrected, tokenizer)  # doctest: +SKIP
        """
        if self.induction is None:
            return None, None
        probe = induction_loss(
            candidate,
            tokenizer,
            sequences=self.induction.sequences,
            length=self.induction.length,
            seed=self.induction.seed,
            progress=progress,
        )
        return probe, probe.second_copy_loss - self.induction.second_copy_loss


def budget_search(
    model: nn.Module,
    tokenizer: Any,
    scores: Scores,
    behaviour: Behaviour,
    *,
    validation_prompts: Sequence[str],
    general_prompts: Sequence[str],
    general_texts: Sequence[str] | Mapping[str, Sequence[str]],
    budgets: Sequence[int],
    selection: SelectionOptions | None = None,
    limits: GeneralLimits = GeneralLimits(),
    induction_sequences: int | None = 16,
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
        general_texts: General text for perplexity: domain -> texts (each domain limited on its own), or
            one list (domain ``"prose"``).
        budgets: Budgets to try, ascending.
        selection: What to prune (default: neurons, global).
        limits: The general-behaviour limits.
        induction_sequences: Random sequences of the induction probe (``None``: no probe, no induction limit).
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
        ...     validation_prompts=prompts, general_prompts=neutral, general_texts=general_texts("train", 5),
        ...     budgets=[2, 5])
    """
    selection = SelectionOptions.take(selection, keywords)
    reject_unknown(keywords, "budget_search")
    general = GeneralBaseline.of(
        model, tokenizer, general_prompts, general_texts, induction_sequences=induction_sequences
    )
    base_effect = behaviour.measure(generate(model, tokenizer, validation_prompts, behaviour.decoding, progress=False))
    points = [FrontierPoint.of(0, base_effect, general.unchanged())]
    for budget in tqdm(sorted(budgets), desc="budget search", unit="budget", disable=not progress, leave=False):
        mask = selection.select(scores, int(budget))
        candidate = apply_masks(model, mask, "bake").model
        effect = behaviour.measure(
            generate(candidate, tokenizer, validation_prompts, behaviour.decoding, progress=False)
        )
        points.append(FrontierPoint.of(int(budget), effect, general.cost(model, candidate, tokenizer, limits)))
        del candidate
    sign = 1.0 if behaviour.lower_is_better else -1.0
    feasible = [p for p in points if p.within_limits]
    chosen = min(feasible, key=lambda p: (sign * p.effect[behaviour.primary], p.budget))
    return points, chosen
