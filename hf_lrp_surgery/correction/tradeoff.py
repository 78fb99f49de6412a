"""The trade-off search: method x granularity x budget x options, searched for behaviour vs general cost.

Instead of one budget line for one method, a multi-objective search (Optuna's TPE sampler, Watanabe,
"Tree-structured Parzen Estimator: Understanding Its Algorithm Components and Their Roles", 2023;
the way the Heretic abliteration tool picks its trade-off) proposes corrections — which scoring
method, which granularity, how many components, which contrast normalisation and protection — and
measures each on the *validation* prompts only: the behaviour's primary metric and the KL to the
original model (both minimised; the behaviour's sign is flipped where higher is better), with the
general-behaviour limits as a constraint. The Pareto front is kept; the chosen point is the best
behaviour among the trials within the limits. The held-out split is never seen here.

Relevance is the expensive part: the caller's ``scores_for`` is called once per distinct
:class:`ScoreKey` (method x granularity) and its result reused by every trial that needs it;
a repeated proposal is not measured twice.

Example:
    >>> space = TradeoffSpace(methods=("m",), budgets={"neurons": (1, 4)}, normalizations=("total",),
    ...                       protect_tops=(0.0,))
    >>> space.trial_count_hint()
    4
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from tqdm.auto import tqdm

from hf_lrp_surgery.io import write_json_atomic
from hf_lrp_surgery.lrp.layout import GRANULARITIES, Granularity
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.masks.soft import check_dampening
from hf_lrp_surgery.options import NORMALIZATIONS, ContrastOptions, Normalization, SelectionOptions
from hf_lrp_surgery.scoring import Scores, get_scorer

__all__ = [
    "BEHAVIOUR_METHODS",
    "DEFAULT_BUDGET_RANGES",
    "DEFAULT_METHODS",
    "ScoreKey",
    "TradeoffPoint",
    "TradeoffResult",
    "TradeoffSpace",
    "TrialChoice",
    "TrialMeasure",
    "default_space",
    "spell_dampening",
    "plot_tradeoff",
    "tradeoff_search",
]


#: The budget range searched per granularity unless given (neurons of all layers, heads, weight elements).
DEFAULT_BUDGET_RANGES: dict[str, tuple[int, int]] = {"neurons": (5, 200), "heads": (1, 30), "weights": (500, 50_000)}
#: The methods searched unless given: LRP, the one-set baselines and the paired neighbours; plus methods that
#: only mean something for one behaviour.
DEFAULT_METHODS: tuple[str, ...] = ("lrp", "gradient", "activation", "wanda", "aura", "atp")
BEHAVIOUR_METHODS: dict[str, tuple[str, ...]] = {"repetition": ("repetition_neurons",)}


def default_space(
    behaviour: str,
    granularities: Sequence[str] = ("neurons", "heads"),
    methods: Sequence[str] | None = None,
    budgets: Mapping[str, tuple[int, int]] | None = None,
) -> TradeoffSpace:
    """The space the recipes search by default for a behaviour.

    Args:
        behaviour: The behaviour's name (``"toxicity"``, ``"repetition"``, ...).
        granularities: What may be pruned.
        methods: Scoring methods (default: :data:`DEFAULT_METHODS` plus the behaviour's own).
        budgets: Budget ranges replacing :data:`DEFAULT_BUDGET_RANGES`.

    Returns:
        The space (contrast normalisations ``total`` / ``max``, protection 5% / 0 / 20%; hard masks, relevance
        dampening, and AurA's own dampening for aura). The first of each is the recipes' default, which the
        starting trials use.

    Example:
        >>> default_space("repetition").methods[-1]
        'repetition_neurons'
    """
    chosen = tuple(methods) if methods else DEFAULT_METHODS + BEHAVIOUR_METHODS.get(behaviour, ())
    ranges = {**DEFAULT_BUDGET_RANGES, **dict(budgets or {})}
    # The first values are the recipes' defaults: each method's starting trial is its default recipe.
    return TradeoffSpace(
        methods=chosen,
        budgets={g: ranges[g] for g in granularities},
        normalizations=("total", "max"),
        protect_tops=(0.05, 0.0, 0.2),
        dampenings=(None, "relevance", "aura"),
    )


@dataclass(frozen=True)
class ScoreKey:
    """Which relevance a trial needs: computed once per key by the caller.

    Attributes:
        method: A registered scoring method.
        granularity: The components scored.
    """

    method: str
    granularity: Granularity


@dataclass(frozen=True)
class TrialChoice:
    """One proposed correction.

    Attributes:
        method: The scoring method.
        granularity: ``"neurons"``, ``"heads"`` or ``"weights"``.
        budget: Components pruned.
        contrast: How the undesired and the desired relevance were contrasted.
        dampen: ``None`` prunes the units (a hard mask); else the dampening rule of a soft mask
            (:func:`~hf_lrp_surgery.masks.soft.dampening_scales`: ``"relevance"``, ``"aura"``, a constant).
    """

    method: str
    granularity: Granularity
    budget: int
    contrast: ContrastOptions
    dampen: float | str | None = None

    @property
    def score_key(self) -> ScoreKey:
        """The relevance this choice selects from."""
        return ScoreKey(self.method, self.granularity)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``report.json``)."""
        return {
            "method": self.method,
            "granularity": self.granularity,
            "budget": self.budget,
            **self.contrast.to_dict(),
            "dampen": self.dampen,
        }


@dataclass(frozen=True)
class TradeoffSpace:
    """What the search may choose from.

    Attributes:
        methods: Scoring methods (a paired method, e.g. ``aura``, is its own contrast: the normalisation and
            protection are not searched for it).
        budgets: Granularity -> ``(lowest, highest)`` budget, searched on a log scale; its keys are the
            granularities searched.
        normalizations: Contrast normalisations.
        protect_tops: Fractions of the components most relevant to the desired set that are never pruned.
        dampenings: Hard masks (``None``) and/or soft-mask rules (``"relevance"``, ``"aura"`` — for the aura
            method only —, ``"constant:<alpha>"``); weights are only ever pruned.

    Raises:
        ValueError: An empty choice, an unknown granularity or normalisation, or a budget range that is
            not ``1 <= lowest <= highest``.

    Example:
        >>> TradeoffSpace(budgets={"heads": (1, 20)}).granularities
        ('heads',)
    """

    methods: tuple[str, ...] = ("lrp", "gradient", "activation", "wanda")
    budgets: Mapping[str, tuple[int, int]] = field(default_factory=lambda: {"neurons": (5, 200)})
    normalizations: tuple[Normalization, ...] = ("total", "max")
    protect_tops: tuple[float, ...] = (0.0, 0.05, 0.2)
    dampenings: tuple[float | str | None, ...] = (None,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "budgets", {g: (int(lo), int(hi)) for g, (lo, hi) in dict(self.budgets).items()})
        object.__setattr__(self, "normalizations", tuple(self.normalizations))
        object.__setattr__(self, "protect_tops", tuple(float(p) for p in self.protect_tops))
        object.__setattr__(self, "dampenings", tuple(self.dampenings))
        if not (self.methods and self.budgets and self.normalizations and self.protect_tops and self.dampenings):
            raise ValueError("every choice of the trade-off search needs at least one value")
        for granularity, (low, high) in self.budgets.items():
            if granularity not in GRANULARITIES:
                raise ValueError(f"budgets name an unknown granularity {granularity!r}; use {GRANULARITIES}")
            if not 1 <= low <= high:
                raise ValueError(f"budget range of {granularity} must satisfy 1 <= lowest <= highest, got {low, high}")
        for normalize in self.normalizations:
            if normalize not in NORMALIZATIONS:
                raise ValueError(f"unknown normalisation {normalize!r}; use one of {NORMALIZATIONS}")
        for protect in self.protect_tops:
            ContrastOptions(protect_top=protect)  # validates the range
        for dampen in self.dampenings:
            if dampen is not None:
                check_dampening(dampen)

    def dampenings_for(self, method: str, granularity: str) -> list[float | str | None]:
        """The dampening choices of one method and granularity (``"aura"`` only for aura; weights: hard only)."""
        if granularity == "weights":
            return [None]
        return [d for d in self.dampenings if d != "aura" or method == "aura"] or [None]

    @property
    def granularities(self) -> tuple[Granularity, ...]:
        """The granularities searched."""
        return tuple(self.budgets)  # type: ignore[arg-type]

    def trial_count_hint(self) -> int:
        """The number of distinct corrections in the space (a search needs far fewer trials)."""
        budgets = sum(high - low + 1 for low, high in self.budgets.values())
        return len(self.methods) * budgets * len(self.normalizations) * len(self.protect_tops) * len(self.dampenings)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``report.json``)."""
        data = asdict(self)
        data["budgets"] = {g: list(r) for g, r in self.budgets.items()}
        return data


@dataclass(frozen=True)
class TrialMeasure:
    """What an evaluation of one mask measured.

    Attributes:
        effect: The behaviour metrics on the validation prompts; empty when a cheap check of the limits already
            refused the mask and its behaviour was not measured (a search trial's ``within_limits`` is then
            ``False``), and in a confirmation, which measures only the limits.
        kl: KL(original || corrected) on the general prompts.
        within_limits: Whether the limits this evaluation checks hold.
        details: Its other figures (kept in the report).
    """

    effect: dict[str, float]
    kl: float
    within_limits: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TradeoffPoint:
    """One measured trial.

    Attributes:
        trial: Optuna's trial number.
        choice: The correction.
        budget: Components pruned (as measured; equals ``choice.budget``).
        effect: The behaviour metrics on the validation prompts (empty: refused before its behaviour was measured).
        kl: KL(original || corrected) on the general prompts.
        within_limits: Whether the general-behaviour limits held (the confirmed check where one ran:
            ``details["confirmed"]``).
        pareto: On the Pareto front of (behaviour, KL) among the trials whose behaviour was measured.
        details: The rest of the evaluation's general-behaviour figures.
    """

    trial: int
    choice: TrialChoice
    effect: dict[str, float]
    kl: float
    within_limits: bool
    pareto: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """Whether its behaviour was measured (``False``: the cheap limits refused it first)."""
        return bool(self.effect)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``report.json``, ``tradeoff.json``)."""
        return {
            "trial": self.trial,
            **self.choice.to_dict(),
            "effect": self.effect,
            "kl": self.kl,
            "within_limits": self.within_limits,
            "pareto": self.pareto,
            **({"details": self.details} if self.details else {}),
        }


@dataclass
class TradeoffResult:
    """The search's trials, its Pareto front and its chosen point.

    Attributes:
        space: What was searched.
        primary: The behaviour metric the search optimised.
        lower_is_better: Its direction.
        baseline: The behaviour metrics of the uncorrected model on the validation prompts.
        points: Every measured trial, in trial order.
        chosen: The best behaviour within the limits (``None``: no trial was within them).
        seed: The sampler's seed.
        seconds_per_trial: Mean wall time of a measured trial.
        confirmed: The choices the fuller check ran on, in the order it ran (the last one is chosen, if any is).
    """

    space: TradeoffSpace
    primary: str
    lower_is_better: bool
    baseline: dict[str, float]
    points: list[TradeoffPoint]
    chosen: TradeoffPoint | None
    seed: int
    seconds_per_trial: float = 0.0
    confirmed: list[TrialChoice] = field(default_factory=list)

    @property
    def front(self) -> list[TradeoffPoint]:
        """The Pareto-optimal points, by KL."""
        return sorted((p for p in self.points if p.pareto), key=lambda p: p.kl)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``report.json``'s ``tradeoff`` and ``tradeoff.json``)."""
        return {
            "space": self.space.to_dict(),
            "primary": self.primary,
            "lower_is_better": self.lower_is_better,
            "baseline": self.baseline,
            "seed": self.seed,
            "trials": len(self.points),
            "seconds_per_trial": self.seconds_per_trial,
            "confirmed": [c.to_dict() for c in self.confirmed],
            "chosen": None if self.chosen is None else self.chosen.to_dict(),
            "front": [p.to_dict() for p in self.front],
            "points": [p.to_dict() for p in self.points],
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tradeoff.json`` and ``tradeoff.png`` (behaviour vs KL, front and chosen point) into ``directory``.

        Returns:
            The JSON file's path.
        """
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        path = target / "tradeoff.json"
        write_json_atomic(path, self.to_dict())
        plot_tradeoff(self, target / "tradeoff.png")
        return path

    @classmethod
    def load_dict(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Read a saved ``tradeoff.json`` as plain data.

        Raises:
            ValueError: The file does not hold a trade-off search.
        """
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "points" not in data or "front" not in data:
            raise ValueError(f"{path} is not a trade-off search result (no 'points' / 'front')")
        return data


def spell_dampening(dampen: float | str | None) -> str:
    """A dampening choice as the command line and Optuna's categorical values write it (``None``: ``"none"``).

    Example:
        >>> spell_dampening(None), spell_dampening("relevance"), spell_dampening(0.5)
        ('none', 'relevance', '0.5')
    """
    return "none" if dampen is None else str(dampen)


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def _objectives(effect: float, kl: float, lower_is_better: bool) -> tuple[float, float]:
    return (effect if lower_is_better else -effect, kl)


def tradeoff_search(
    space: TradeoffSpace,
    scores_for: Callable[[ScoreKey, ContrastOptions], Scores],
    evaluate: Callable[[Mask], TrialMeasure],
    *,
    primary: str,
    lower_is_better: bool,
    baseline: Mapping[str, float],
    confirm: Callable[[Mask], TrialMeasure] | None = None,
    max_confirmations: int = 5,
    trials: int = 40,
    seed: int = 0,
    selection: SelectionOptions | None = None,
    start_budgets: Mapping[str, Sequence[int]] | None = None,
    progress: bool = True,
) -> TradeoffResult:
    """Search the space with a multi-objective TPE sampler; keep the front and choose within the limits.

    Args:
        space: What to search.
        scores_for: The contrasted scores of a method and granularity under some contrast options. It
            should cache the per-set relevance of each :class:`ScoreKey` (the expensive part); the search
            calls it once per distinct ``(key, contrast)`` pair.
        evaluate: Measures a mask on the validation prompts (every trial): the behaviour and the KL, with
            ``within_limits`` saying whether the limits it measured hold. It may check the cheap limits first
            and leave ``effect`` empty for a mask they refuse: the sampler then sees the baseline's behaviour
            at that KL (no gain) with the constraint broken, and the point stays off the front.
        primary: The behaviour metric to optimise (a key of ``effect``).
        lower_is_better: Its direction.
        baseline: The uncorrected model's metrics on the validation prompts.
        confirm: A fuller, dearer check of the limits (e.g. perplexity on every domain and the induction
            probe), run only on the best trials within ``evaluate``'s limits, best first, until one passes:
            that one is chosen. ``None``: ``evaluate``'s limits decide.
        max_confirmations: At most this many trials are confirmed; if none passes, nothing is chosen.
        trials: Trials to run (distinct proposals are measured; a repeated one is answered from the cache
            and still counts).
        seed: The sampler's seed (same seed and space: same proposals).
        selection: Scope / module groups / layers of the masks (its granularity is the trial's).
        start_budgets: Budgets to try first for every method (per granularity; clipped to the space's
            range), so that each method is measured at least at these points before the sampler takes over;
            with the first normalisation, protection and dampening of the space.
        progress: Show a progress bar.

    Returns:
        The :class:`TradeoffResult`.

    Raises:
        ValueError: ``trials`` < 1, a method scores none of the searched granularities, or ``primary`` is
            missing from the effect of an evaluation that measured one or found the mask within the limits, or
            from ``baseline`` when an evaluation left the effect unmeasured.

    Example:
        >>> result = tradeoff_search(space, scores_for, evaluate, primary="toxicity_rate",  # doctest: +SKIP
        ...                          lower_is_better=True, baseline={"toxicity_rate": 0.2}, trials=30)
    """
    import optuna

    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    for method in space.methods:
        if not set(get_scorer(method).components) & set(space.granularities):
            raise ValueError(
                f"the {method} method scores {list(get_scorer(method).components)}, none of the searched "
                f"granularities {list(space.granularities)}; leave it out or search one of its granularities"
            )
    base = selection or SelectionOptions()
    score_cache: dict[tuple[ScoreKey, ContrastOptions], Scores] = {}
    measured: dict[TrialChoice, TradeoffPoint] = {}
    order: list[tuple[int, TrialChoice]] = []
    spent: list[float] = []

    def mask_of(choice: TrialChoice) -> Mask:
        key = (choice.score_key, choice.contrast)
        if key not in score_cache:
            score_cache[key] = scores_for(*key)
        options = SelectionOptions(
            granularity=choice.granularity,
            scope=base.scope,
            modules=base.modules,
            layers=base.layers,
            dampen=choice.dampen,
        )
        return options.select(score_cache[key], choice.budget)

    def propose(trial: optuna.Trial) -> TrialChoice:
        method = trial.suggest_categorical("method", list(space.methods))
        allowed = [g for g in space.granularities if g in get_scorer(method).components]
        granularity = cast(Granularity, trial.suggest_categorical(f"granularity_{method}", allowed))
        low, high = space.budgets[granularity]
        budget = int(trial.suggest_int(f"budget_{granularity}", low, high, log=high > low))
        # Optuna's categorical choices are plain values: the rules by name, None as "none".
        spelled = {spell_dampening(d): d for d in space.dampenings_for(method, granularity)}
        dampen = spelled[str(trial.suggest_categorical(f"dampen_{method}_{granularity}", list(spelled)))]
        if get_scorer(method).paired:  # its own contrast: no normalisation or protection to choose
            return TrialChoice(method, granularity, budget, ContrastOptions(), dampen)
        normalize = cast(Normalization, trial.suggest_categorical("normalize", list(space.normalizations)))
        protect = trial.suggest_categorical("protect_top", list(space.protect_tops))
        return TrialChoice(
            method, granularity, budget, ContrastOptions(normalize=normalize, protect_top=protect), dampen
        )

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        choice = propose(trial)
        if choice not in measured:
            mask = mask_of(choice)
            started = time.perf_counter()
            result = evaluate(mask)
            spent.append(time.perf_counter() - started)
            if (result.effect or result.within_limits) and primary not in result.effect:
                raise ValueError(f"the evaluation measured {sorted(result.effect)}, not the primary metric {primary!r}")
            if not result.effect and primary not in baseline:
                raise ValueError(
                    f"an evaluation refused a mask unmeasured, and the baseline holds {sorted(baseline)}, not the "
                    f"primary metric {primary!r} that stands in for it; give the uncorrected model's {primary!r}"
                )
            measured[choice] = TradeoffPoint(
                trial.number, choice, dict(result.effect), result.kl, result.within_limits, details=dict(result.details)
            )
        order.append((trial.number, choice))
        point = measured[choice]
        trial.set_constraint("general_limits", -1.0 if point.within_limits else 1.0)
        effect = point.effect[primary] if point.measured else baseline[primary]  # refused: no gain, at its KL
        return _objectives(effect, point.kl, lower_is_better)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, trials))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for granularity, budgets in (start_budgets or {}).items():
        if granularity not in space.budgets:
            continue
        for method in space.methods:
            if granularity not in get_scorer(method).components:
                continue
            low, high = space.budgets[granularity]
            for budget in sorted({min(max(int(b), low), high) for b in budgets}):
                study.enqueue_trial(
                    {
                        "method": method,
                        f"granularity_{method}": granularity,
                        f"budget_{granularity}": budget,
                        "normalize": space.normalizations[0],
                        "protect_top": space.protect_tops[0],
                        f"dampen_{method}_{granularity}": spell_dampening(space.dampenings[0]),
                    }
                )
    with tqdm(total=trials, desc="trade-off search", unit="trial", disable=not progress, leave=False) as bar:
        study.optimize(objective, n_trials=trials, callbacks=[lambda _study, _trial: bar.update(1)])

    sign = 1.0 if lower_is_better else -1.0
    chosen: TrialChoice | None = None
    confirmed: list[TrialChoice] = []
    candidates = sorted(
        (p for p in measured.values() if p.within_limits),
        key=lambda p: (sign * p.effect[primary], p.kl, p.choice.budget),
    )
    if confirm is None:
        chosen = candidates[0].choice if candidates else None
    else:
        for point in candidates[:max_confirmations]:
            check = confirm(mask_of(point.choice))
            confirmed.append(point.choice)
            measured[point.choice] = replace(
                point,
                within_limits=check.within_limits,
                details={**point.details, "confirmed": {"within_limits": check.within_limits, **check.details}},
            )
            if check.within_limits:
                chosen = point.choice
                break
    objectives = {c: _objectives(p.effect[primary], p.kl, lower_is_better) for c, p in measured.items() if p.measured}
    front = {c for c, o in objectives.items() if not any(_dominates(other, o) for other in objectives.values())}
    points = [replace(measured[c], trial=number, pareto=c in front) for number, c in order]
    first: dict[TrialChoice, TradeoffPoint] = {}
    for point in points:
        first.setdefault(point.choice, point)
    return TradeoffResult(
        space,
        primary,
        lower_is_better,
        dict(baseline),
        points,
        None if chosen is None else first[chosen],
        seed,
        seconds_per_trial=sum(spent) / len(spent) if spent else 0.0,
        confirmed=confirmed,
    )


def plot_tradeoff(result: TradeoffResult, path: str | Path) -> Path:
    """Behaviour vs KL of every trial, one colour per method; the front as a line, the chosen point starred.

    Args:
        result: A finished search.
        path: The PNG to write.

    Returns:
        ``path``.
    """
    from hf_lrp_surgery.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    unique = list({p.choice: p for p in result.points}.values())
    measured = [p for p in unique if p.measured]
    for i, method in enumerate(sorted({p.choice.method for p in measured})):
        mine = [p for p in measured if p.choice.method == method]
        ax.scatter(
            [max(p.kl, 1e-6) for p in mine],
            [p.effect[result.primary] for p in mine],
            color=f"C{i}",
            label=method,
            alpha=0.7,
            marker="o",
        )
    front = result.front
    if front:
        ax.plot(
            [max(p.kl, 1e-6) for p in front],
            [p.effect[result.primary] for p in front],
            "k--",
            lw=1,
            label="Pareto front",
        )
    if result.chosen is not None:
        ax.scatter(
            [max(result.chosen.kl, 1e-6)],
            [result.chosen.effect[result.primary]],
            marker="*",
            s=250,
            color="gold",
            edgecolor="k",
            zorder=5,
            label="chosen",
        )
    refused = [p for p in unique if not p.measured]
    if refused:  # drawn at the uncorrected behaviour: nothing was measured but their KL
        ax.scatter(
            [max(p.kl, 1e-6) for p in refused],
            [result.baseline[result.primary]] * len(refused),
            marker="x",
            color="grey",
            label="refused by KL / probe (behaviour not measured)",
        )
    if result.primary in result.baseline:
        ax.axhline(result.baseline[result.primary], color="grey", lw=1, label="uncorrected")
    ax.set_xscale("log")
    ax.set_xlabel("KL(original || corrected), validation")
    ax.set_ylabel(result.primary)
    ax.set_title(f"trade-off search: {len(unique)} corrections, {len(measured)} within the cheap limits")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
