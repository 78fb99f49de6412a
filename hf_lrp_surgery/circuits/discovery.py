"""Circuit discovery: attribute a task, prune the least relevant components, keep the smallest circuit.

Following Hatefi et al. (2025, Sec. on circuit discovery), a circuit is what remains after pruning
the components the task needs least: components are scored on the task's reference prompts
(:func:`task_scores`), pruned lowest first on a log-spaced grid of sparsities, and the largest
pruning whose task metric stays at or above ``threshold`` times the unpruned model's is kept, refined
by bisection between the last grid point that holds and the first that does not
(:func:`discover_circuit`). The result, a :class:`Circuit`, holds the pruning
:class:`~hf_lrp_surgery.masks.Mask` (apply it and the circuit is what is left) with the discovery's
provenance in its manifest.

Pruning is evaluated with :func:`~hf_lrp_surgery.circuits.ablation.ablated`: by default (``"zero"``)
neurons and heads are switched off by a forward pre-hook that zeroes their inputs of the MLP /
attention output projection, which equals baking the mask (:func:`hf_lrp_surgery.carriers.bake`)
without copying or re-hashing the model, and weights are zeroed in place and restored on exit;
``"mean"`` and ``"corrupted"`` ablation replace them by their mean over the reference prompts or
their activations on the corrupted prompts (:mod:`hf_lrp_surgery.circuits.ablation`).

Weights are the MLP input and output projections by default (``modules=("mlp.*",)``), ranked in
the scope the paper uses per method (:func:`default_scope`): global for LRP, gradient and the other
scores, row-wise (``"per_row"``, each output row of each matrix prunes the same share) for Wanda.

Seeds: ``"logit"`` explains the correct token's logit, ``"logit_diff"`` the logit difference
``logit(correct) - logit(wrong)``. The engine seeds one token per sample; because every LRP rule
here is a modification of the gradient whose factors come from the forward pass, relevance is linear
in the seed, and the logit-difference relevance is the relevance of the correct token minus that of
the wrong token (two passes, signed aggregation).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery._deprecation import moved_names
from hf_lrp_surgery.circuits.ablation import ABLATIONS, Ablation, AblationKind, PreparedTask, ablated
from hf_lrp_surgery.circuits.tasks import (
    TASK_OBJECTIVES,
    Metric,
    NextTokenTask,
    TaskMetrics,
    TaskObjective,
    evaluate_task,
)
from hf_lrp_surgery.exceptions import AblationError, CircuitDiscoveryError, NoCircuitError
from hf_lrp_surgery.io import atomic_directory, write_json_atomic
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.collect import renamed_seed
from hf_lrp_surgery.masks import Granularity, Mask, Scope, select
from hf_lrp_surgery.masks.selection import budget_count, match_groups
from hf_lrp_surgery.options import SCOPES, ScoringOptions, reject_unknown
from hf_lrp_surgery.scoring import Aggregation, Layout, Method, Scores, get_scorer, score

__all__ = [
    "ABLATIONS",
    "CIRCUIT_SCOPES",
    "Circuit",
    "CircuitScope",
    "CircuitDiscoveryError",
    "CurvePoint",
    "NoCircuitError",
    "PruningCurve",
    "TaskObjective",
    "ablated",
    "default_scope",
    "discover_circuit",
    "pruning_curve",
    "sparsity_grid",
    "task_scores",
]

_CIRCUIT_FILE = "circuit.json"

#: How circuit discovery ranks units: the selection scopes (``"per_row"``, for weights, is Wanda's
#: protocol: every output row of every matrix prunes the same share of its weights).
CircuitScope = Scope
#: Every circuit scope.
CIRCUIT_SCOPES: tuple[CircuitScope, ...] = SCOPES
#: The weights a weight circuit is made of unless told otherwise: the MLP input and output projections.
DEFAULT_WEIGHT_MODULES: tuple[str, ...] = ("mlp.*",)


def default_scope(method: str, granularity: Granularity) -> CircuitScope:
    """The ranking scope of the paper's protocol: row-wise for Wanda's weights, global otherwise.

    Example:
        >>> default_scope("wanda", "weights"), default_scope("lrp", "weights"), default_scope("wanda", "neurons")
        ('per_row', 'global', 'global')
    """
    return "per_row" if granularity == "weights" and method == "wanda" else "global"


# -- scores -----------------------------------------------------------------------------------
def task_scores(
    model: nn.Module,
    tokenizer: Any,
    task: NextTokenTask,
    options: ScoringOptions | None = None,
    *,
    objective: TaskObjective | None = None,
    progress: bool = True,
    **keywords: Any,
) -> Scores:
    """Score components on a task's reference prompts (higher = the task needs it more).

    Args:
        model: A supported causal LM.
        tokenizer: Its tokenizer.
        task: The reference prompts with their correct (and wrong) tokens.
        options: How to score (:class:`~hf_lrp_surgery.options.ScoringOptions`, one component kind;
            default: their defaults with ``aggregation="abs"``).
        objective: For methods with relevance options (``lrp``, ``gradient``): ``"logit"`` of the
            correct token, ``"logit_diff"`` (correct minus wrong) or ``"logprob"`` of the correct
            token (default: ``options.objective``). ``logit_diff`` with ``abs`` aggregation runs one
            sample per pass (the engine sums a batch before the absolute value could be taken).
            The other methods do not read the target.
        progress: Show progress bars.
        **keywords: Fields of ``ScoringOptions`` (``method``, ``aggregation``, ``batch_size``,
            ``random_seed``, ...) and ``granularity`` (the component kind), replacing those of
            ``options``; ``seed`` is a deprecated name of ``objective``.

    Returns:
        The :class:`~hf_lrp_surgery.scoring.Scores`; ``settings["task_seed"]`` records the objective
        and ``settings["task"]`` the task.

    Raises:
        ValueError: An option is out of range.
        TypeError: A keyword is not an option.
        CircuitDiscoveryError: ``logit_diff`` for a task without wrong tokens, or more than one
            component kind.

    Example:
        >>> scores = task_scores(model, tokenizer, ioi_task(tokenizer), method="lrp")  # doctest: +SKIP
    """
    if "seed" in keywords:
        objective = renamed_seed(keywords.pop("seed"))
    if "granularity" in keywords:
        keywords["components"] = (keywords.pop("granularity"),)
    options = ScoringOptions.take(options, keywords, aggregation="abs")
    reject_unknown(keywords, "task_scores")
    objective = options.objective if objective is None else objective
    if objective not in TASK_OBJECTIVES:
        raise ValueError(f"objective must be 'logit', 'logit_diff' or 'logprob', got {objective!r}")
    if len(options.components) != 1:
        raise CircuitDiscoveryError(f"task scores are of one component kind, got {list(options.components)}")
    entry = get_scorer(options.method)
    task_info = {"name": task.name, "size": len(task), **dict(task.settings)}
    if not entry.relevance_options:
        scores = score(model, task.samples() if entry.needs_samples else None, tokenizer, options, progress=progress)
        scores.settings.update(task=task_info)
        return scores
    if objective != "logit_diff":
        scores = score(model, task.samples(), tokenizer, replace(options, objective=objective), progress=progress)
        scores.settings.update(task_seed=objective, task=task_info)
        return scores
    if not task.has_wrong:
        raise CircuitDiscoveryError(
            f"task {task.name!r} has examples without a wrong token; the logit-difference "
            "objective needs one per example (or use objective='logit')"
        )
    # Each logit is explained with signed relevance; "abs" applies to their difference.
    per_logit = replace(options, objective="logit", aggregation="signed")
    if options.aggregation == "signed":
        correct, wrong = (
            score(
                model, task.samples(t), tokenizer, per_logit, progress=progress, description=f"{options.method} ({t})"
            )
            for t in ("correct", "wrong")
        )
        difference = _difference(correct, wrong, options.components[0])
    else:
        difference = _mean_abs_difference(model, tokenizer, task, per_logit, progress)
    difference.settings.update(
        method=options.method,
        seed="logit_diff",
        task_seed="logit_diff",
        aggregation=options.aggregation,
        task=task_info,
    )
    difference.check_finite()
    return difference


def _difference(correct: Scores, wrong: Scores, granularity: Granularity) -> Scores:
    """Scores of the logit difference from those of its two logits (relevance is linear in the objective)."""
    out = Scores(
        method=correct.method,
        settings=dict(correct.settings),
        fingerprint=correct.fingerprint,
        layout=correct.layout,
        num_samples=correct.num_samples,
    )
    if granularity == "weights":
        out.weights = {k: v - wrong.weights[k] for k, v in correct.weights.items()}
    else:
        setattr(out, granularity, getattr(correct, granularity) - getattr(wrong, granularity))
    return out


def _mean_abs_difference(
    model: nn.Module, tokenizer: Any, task: NextTokenTask, options: ScoringOptions, progress: bool
) -> Scores:
    """Mean over samples of ``|R(correct) - R(wrong)|``: the engine aggregates over a batch, so one sample per pass."""
    granularity = options.components[0]
    total: Scores | None = None
    pairs = list(zip(task.samples("correct"), task.samples("wrong")))
    for correct_sample, wrong_sample in tqdm(
        pairs, desc=f"{options.method} |logit diff|", disable=not progress, leave=False
    ):
        one = _difference(
            score(model, [correct_sample], tokenizer, options, progress=False),
            score(model, [wrong_sample], tokenizer, options, progress=False),
            granularity,
        )
        if granularity == "weights":
            one.weights = {k: v.abs() for k, v in one.weights.items()}
            if total is not None:
                one.weights = {k: v + total.weights[k] for k, v in one.weights.items()}
        else:
            value = getattr(one, granularity).abs()
            setattr(one, granularity, value if total is None else value + getattr(total, granularity))
        total = one
    assert total is not None
    if granularity == "weights":
        total.weights = {k: v / len(pairs) for k, v in total.weights.items()}
    else:
        setattr(total, granularity, getattr(total, granularity) / len(pairs))
    total.num_samples = len(pairs)
    return total


# -- curves -----------------------------------------------------------------------------------
def sparsity_grid(total: int, points: int = 16, *, min_kept: float = 1e-3) -> list[int]:
    """Pruned counts on a grid that is log-spaced at both ends.

    Half of the points are log-spaced in the pruned fraction (from ``min_kept`` up to one half),
    half in the kept fraction (from one half down to ``min_kept``), so that both a circuit that needs
    most of the model and one that needs almost none of it fall between close grid points.

    Args:
        total: Number of prunable units.
        points: Grid points besides 0 (before duplicates are merged).
        min_kept: Smallest kept (and pruned) fraction; at least one unit is always kept.

    Returns:
        Ascending unique pruned counts, starting at 0.

    Example:
        >>> sparsity_grid(1000, 6, min_kept=0.001)
        [0, 1, 22, 500, 978, 999]
        >>> sparsity_grid(8, 4)
        [0, 1, 4, 7]
    """
    if total < 1 or points < 2 or not 0.0 < min_kept < 0.5:
        raise ValueError(f"need total >= 1, points >= 2 and 0 < min_kept < 0.5, got {total}, {points}, {min_kept}")
    low = max(min_kept, 1.0 / total)  # never below one unit
    half = points // 2
    fractions = [low * (0.5 / low) ** (i / max(1, half - 1)) for i in range(half)]
    fractions = fractions + [1.0 - f for f in reversed(fractions)]
    counts = {0} | {min(total - 1, max(1, round(total * f))) for f in fractions}
    return sorted(c for c in counts if c < total)


@dataclass(frozen=True)
class CurvePoint:
    """Task performance with ``pruned`` units pruned.

    Attributes:
        pruned: Units pruned.
        kept: Units left.
        metrics: The task metrics of the pruned model.
    """

    pruned: int
    kept: int
    metrics: TaskMetrics

    def sparsity(self) -> float:
        """Pruned share of the units."""
        return self.pruned / (self.pruned + self.kept)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"pruned": self.pruned, "kept": self.kept, "sparsity": self.sparsity(), **self.metrics.to_dict()}


@dataclass
class PruningCurve:
    """Task performance against the number of pruned units, for one scoring method.

    Attributes:
        method: The scoring method.
        granularity: What was pruned.
        scope: ``"global"`` or ``"per_layer"``.
        total: Prunable units.
        baseline: Metrics of the unpruned model.
        points: Measured points, ascending in ``pruned``.
    """

    method: str
    granularity: str
    scope: str
    total: int
    baseline: TaskMetrics
    points: list[CurvePoint] = field(default_factory=list)

    def relative(self, metric: Metric) -> list[float]:
        """Each point's metric divided by the unpruned model's."""
        base = self.baseline.get(metric)
        return [p.metrics.get(metric) / base for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "method": self.method,
            "granularity": self.granularity,
            "scope": self.scope,
            "total": self.total,
            "baseline": self.baseline.to_dict(),
            "points": [p.to_dict() for p in self.points],
        }


class _Ranking:
    """The masks of the ``count`` lowest-scoring units for any count, ranked once.

    Every scope gives exactly :func:`~hf_lrp_surgery.masks.select`'s masks (``per_layer`` and
    ``per_row`` are select's own; the test suite checks ``global``), but a global ranking sorts the
    score values once and finds each mask by a threshold, which matters for tens of millions of weights.
    """

    def __init__(
        self,
        scores: Scores,
        granularity: Granularity,
        scope: CircuitScope,
        modules: Sequence[str] | None,
        *,
        sort_once: bool = True,
    ) -> None:
        if scope not in CIRCUIT_SCOPES:
            raise ValueError(f"scope must be one of {CIRCUIT_SCOPES}, got {scope!r}")
        if scope == "per_row" and granularity != "weights":
            raise CircuitDiscoveryError("the per_row scope ranks weights within each output row; use it for weights")
        scores.check_finite()
        self.scores, self.granularity, self.scope = scores, granularity, scope
        self.modules = tuple(modules) if modules is not None and granularity == "weights" else None
        layout = scores.layout
        value = scores.get(granularity)
        if isinstance(value, dict):
            self.groups = {n: value[n] for n in match_groups(layout, self.modules)}
        else:
            carriers = layout.carriers(granularity)
            self.groups = {carriers[i]: value[i] for i in range(layout.num_layers)}
        self.sizes = {n: int(v.numel()) for n, v in self.groups.items()}
        self.eligible = sum(int(torch.isfinite(v).sum()) for v in self.groups.values())
        self.total = sum(self.sizes.values())
        self._flat = torch.cat([v.flatten() for v in self.groups.values()]) if scope == "global" else None
        self._sorted = torch.sort(self._flat).values if self._flat is not None and sort_once else None
        self._row_order: dict[str, torch.Tensor] = {}

    def mask(self, count: int) -> Mask:
        """The mask of the ``count`` lowest-scoring units in this ranking's scope.

        Raises:
            BudgetError: ``count`` is not positive or exceeds the eligible units.
        """
        what = f"{self.granularity} in {len(self.groups)} {'modules' if self.granularity == 'weights' else 'layers'}"
        count = budget_count(count, self.eligible, what)
        if self.scope != "global":
            return select(self.scores, self.granularity, count, scope=self.scope, modules=self.modules)
        indices = self._global(count)
        provenance: dict[str, Any] = {
            "scores": {
                "method": self.scores.method,
                "settings": self.scores.settings,
                "num_samples": self.scores.num_samples,
            },
            "selection": {
                "granularity": self.granularity,
                "budget": count,
                "count": count,
                "scope": self.scope,
                "modules": list(self.modules) if self.modules is not None else None,
                "layers": None,
            },
        }
        if self.granularity == "weights":
            provenance["module_sizes"] = dict(self.sizes)
        return Mask(self.granularity, self.scores.fingerprint, self.scores.layout, indices, provenance)

    def _global(self, count: int) -> dict[str, torch.Tensor]:
        assert self._flat is not None
        if self._sorted is not None:
            threshold = self._sorted[count - 1]
        else:
            threshold = torch.kthvalue(self._flat, count).values
        below = {n: (v.flatten() < threshold) for n, v in self.groups.items()}
        ties = count - sum(int(b.sum()) for b in below.values())
        indices: dict[str, torch.Tensor] = {}
        for name, value in self.groups.items():
            picked = below[name].nonzero().flatten()
            if ties > 0:  # ties at the threshold: the first ones in module order, as a stable sort takes them
                equal = (value.flatten() == threshold).nonzero().flatten()[:ties]
                ties -= int(equal.numel())
                picked = torch.cat([picked, equal]).sort().values
            if picked.numel():
                indices[name] = picked
        return indices


class _Pruner:
    """Masks of growing size from one set of scores (optionally re-scored as it grows)."""

    def __init__(
        self,
        ranking: _Ranking,
        rescore: Callable[[Mask], Scores] | None,
    ) -> None:
        self.ranking, self.rescore = ranking, rescore
        self.scores, self.granularity, self.scope = ranking.scores, ranking.granularity, ranking.scope
        self.base: Mask | None = None  # with re-scoring: the pruning the current scores were computed under

    def mask(self, count: int) -> Mask | None:
        if count == 0:
            return None
        if self.base is None or count <= self.base.count:
            return self.ranking.mask(count)
        return _extend(self.base, self.scores, count - self.base.count, self.scope, self.ranking.modules)

    def advance(self, mask: Mask | None) -> None:
        """With re-scoring: score again with ``mask`` pruned; later masks extend it."""
        if self.rescore is None or mask is None:
            return
        self.scores = self.rescore(mask)
        self.base = mask


def _extend(base: Mask, scores: Scores, extra: int, scope: Scope, modules: Sequence[str] | None = None) -> Mask:
    """``base`` plus the ``extra`` lowest-scoring units it does not prune yet."""
    more = select(scores.excluding(base), base.granularity, extra, scope=scope, modules=modules)
    selection = {
        **more.provenance["selection"],
        "budget": base.count + extra,
        "count": base.count + extra,
        "reattributed_after": base.count,
    }
    return replace(base.union(more), provenance={**more.provenance, "selection": selection})


def _evaluate(model: nn.Module, tokenizer: Any, task: NextTokenTask, mask: Mask | None, batch_size: int) -> TaskMetrics:
    if mask is None:
        return evaluate_task(model, tokenizer, task, batch_size=batch_size)
    with ablated(model, mask):
        return evaluate_task(model, tokenizer, task, batch_size=batch_size)


def pruning_curve(
    model: nn.Module,
    tokenizer: Any,
    task: NextTokenTask,
    scores: Scores,
    *,
    granularity: Granularity = "neurons",
    scope: Scope = "global",
    counts: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> PruningCurve:
    """Task metrics after pruning the lowest-scoring ``count`` units, for each count.

    Args:
        model: The model the scores were computed on.
        tokenizer: Its tokenizer.
        task: The evaluation prompts.
        scores: Component scores (higher = keep).
        granularity: What to prune.
        scope: Selection scope.
        counts: Pruned counts (default :func:`sparsity_grid` of the unit count).
        batch_size: Prompts per forward pass.
        progress: Show a progress bar.

    Returns:
        The :class:`PruningCurve`.

    Example:
        >>> curve = pruning_curve(model, tokenizer, task, scores)  # doctest: +SKIP
        >>> curve.relative("logit_diff")  # doctest: +SKIP
    """
    arch = resolve(model)
    total = scores.layout.units(granularity, arch)
    grid = sorted(set(counts)) if counts is not None else sparsity_grid(total)
    baseline = evaluate_task(model, tokenizer, task, batch_size=batch_size)
    curve = PruningCurve(scores.method, granularity, scope, total, baseline)
    for count in tqdm(grid, desc=f"{scores.method} curve", disable=not progress, leave=False):
        metrics = (
            baseline
            if count == 0
            else _evaluate(model, tokenizer, task, select(scores, granularity, count, scope=scope), batch_size)
        )
        curve.points.append(CurvePoint(count, total - count, metrics))
    return curve


# -- the circuit ------------------------------------------------------------------------------
@dataclass
class Circuit:
    """The smallest set of components found to keep the task above the threshold.

    Attributes:
        mask: What is pruned; applied (ablated, baked or as an adapter) it leaves only the circuit.
            Its provenance holds the scores, the selection and ``circuit`` (task, threshold, metric,
            baseline and circuit metrics, size).
        size: Units in the circuit (kept).
        total: Prunable units.
        baseline: Metrics of the unpruned model on the evaluation prompts.
        metrics: Metrics of the circuit alone (everything else pruned).
        curve: The pruning curve measured on the way (grid and bisection points).
        threshold: Required fraction of the baseline metric.
        metric: The metric the threshold applies to.
        ablation: How pruned units were replaced while searching and measuring (``{"kind": "zero"}``,
            ``"mean"`` or ``"corrupted"`` with how the values were recorded).
        timings: Seconds per stage (``baseline``, ``ablation``, ``relevance``, ``search``; the comparison
            adds ``specificity``).
    """

    mask: Mask
    size: int
    total: int
    baseline: TaskMetrics
    metrics: TaskMetrics
    curve: PruningCurve
    threshold: float
    metric: str
    ablation: dict[str, Any] = field(default_factory=lambda: {"kind": "zero"})
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def granularity(self) -> str:
        """What the circuit is made of."""
        return self.mask.granularity

    def components(self) -> Mask:
        """The circuit's own components as a mask (ablating it knocks the circuit out of the full model)."""
        provenance = {"circuit_components_of": self.mask.provenance.get("circuit", {})}
        if self.mask.granularity != "weights":
            return self.mask.complement(provenance=provenance)
        # Weights: the complement within the ranked matrices only (module_sizes), not every prunable one.
        sizes = dict(self.mask.provenance.get("module_sizes", {}))
        indices = {}
        for name, size in sizes.items():
            kept = (~self.mask.dense(name, int(size))).nonzero().flatten()
            if kept.numel():
                indices[name] = kept
        return Mask(
            "weights",
            self.mask.fingerprint,
            self.mask.layout,
            indices,
            {**provenance, "module_sizes": sizes},
        )

    def carrier_mask(self) -> Mask:
        """The pruning mask for a carrier (bake, IA3, hooks), which computes zero ablation only.

        Returns:
            :attr:`mask`, when the circuit was found with zero ablation.

        Raises:
            AblationError: The circuit was found with mean or corrupted ablation; carried, its
                pruned units would be zero, not what the search measured.

        Example:
            >>> corrected = bake(copy.deepcopy(model), circuit.carrier_mask())  # doctest: +SKIP
        """
        kind = self.ablation.get("kind", "zero")
        if kind != "zero":
            raise AblationError(
                f"this circuit was found with {kind} ablation; bake, IA3 and hooks carry zero ablation only, so "
                "search it again with ablation='zero' to carry it"
            )
        return self.mask

    def faithfulness(self) -> float:
        """The circuit's metric as a fraction of the unpruned model's (at least the threshold)."""
        return self.metrics.get(self.metric) / self.baseline.get(self.metric)  # type: ignore[arg-type]

    def per_layer(self) -> list[int]:
        """Circuit units per decoder block."""
        return self.components().per_layer()

    def summary(self) -> str:
        """One line: size, sparsity and the metric kept."""
        base, value = self.baseline.get(self.metric), self.metrics.get(self.metric)  # type: ignore[arg-type]
        return (
            f"{self.size} of {self.total} {self.granularity} ({100 * self.size / self.total:.2f}%) keep "
            f"{self.metric} {value:.3f} of {base:.3f} ({100 * value / base:.1f}%, threshold "
            f"{100 * self.threshold:.0f}%), accuracy {self.metrics.accuracy:.3f} (unpruned "
            f"{self.baseline.accuracy:.3f}); scores: {self.curve.method}, {self.ablation.get('kind', 'zero')} ablation"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (without the mask's indices)."""
        return {
            "size": self.size,
            "total": self.total,
            "granularity": self.granularity,
            "metric": self.metric,
            "threshold": self.threshold,
            "baseline": self.baseline.to_dict(),
            "metrics": self.metrics.to_dict(),
            "per_layer": self.per_layer(),
            "ablation": dict(self.ablation),
            "scope": self.curve.scope,
            "timings": dict(self.timings),
            "curve": self.curve.to_dict(),
        }

    def save(self, directory: str | os.PathLike[str], *, masks: bool | None = None, overwrite: bool = False) -> Path:
        """Save ``circuit.json`` and (with ``masks``) ``mask/`` (the pruning mask with its manifest) and
        ``components/``, atomically.

        Args:
            directory: Destination (an existing non-empty one is replaced only with ``overwrite``).
            masks: Also write the masks (default: for neurons and heads; a weight circuit's masks hold
                tens of millions of indices, ``masks=True`` writes them still).
            overwrite: Replace an existing non-empty directory.

        Returns:
            The directory.
        """
        masks = self.granularity != "weights" if masks is None else masks
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            if masks:
                (tmp / "mask").mkdir()
                self.mask.write_into(tmp / "mask")
                (tmp / "components").mkdir()
                self.components().write_into(tmp / "components")
            write_json_atomic(tmp / _CIRCUIT_FILE, self.to_dict())
        return Path(directory)


def discover_circuit(
    model: nn.Module,
    tokenizer: Any,
    task: NextTokenTask,
    *,
    evaluation: NextTokenTask | PreparedTask | None = None,
    method: Method = "gradient",
    granularity: Granularity = "neurons",
    scope: CircuitScope | None = None,
    modules: Sequence[str] | str | None = None,
    ablation: AblationKind | Ablation = "zero",
    threshold: float = 0.9,
    metric: Metric = "logit_diff",
    objective: TaskObjective = "logit",
    aggregation: Aggregation = "abs",
    scores: Scores | None = None,
    baseline: TaskMetrics | None = None,
    grid_points: int = 8,
    min_kept: float = 1e-3,
    refine_steps: int = 6,
    tolerance: float = 0.02,
    patience: int | None = 2,
    reattribute: bool = False,
    batch_size: int = 8,
    eval_batch_size: int = 32,
    random_seed: int = 0,
    progress: bool = True,
    **keywords: Any,
) -> Circuit:
    """Find the smallest circuit that keeps ``threshold`` of the task metric.

    Scores the components on ``task`` (unless ``scores`` are given), prunes the lowest-scoring ones
    on a coarse log-spaced grid of sparsities (:func:`sparsity_grid`), keeps the largest pruning whose
    metric on ``evaluation`` is at least ``threshold`` times the unpruned model's, then bisects
    between that grid point (or no pruning) and the next for up to ``refine_steps`` more evaluations.

    Args:
        model: A supported causal LM.
        tokenizer: Its tokenizer.
        task: Reference prompts to attribute on (and, for mean ablation, to take the means over).
        evaluation: Prompts to measure the metric on (default: ``task``), or the same already
            encoded as a :class:`~hf_lrp_surgery.circuits.ablation.PreparedTask`.
        method: Scoring method (default ``gradient``: gradient x activation gave the sparsest IOI circuits
            on SmolLM2 at neuron, head and weight granularity, see docs/circuits.md; ``lrp`` or any
            registered one-set method).
        granularity: ``"neurons"``, ``"heads"`` or ``"weights"``.
        scope: ``"global"``, ``"per_layer"`` or (weights) ``"per_row"``; default
            :func:`default_scope` (row-wise for Wanda's weights, global otherwise).
        modules: Weights: module groups to rank (default ``("mlp.*",)``, the MLP input and output projections).
        ablation: ``"zero"``, ``"mean"``, ``"corrupted"`` (see :mod:`~hf_lrp_surgery.circuits.ablation`), or
            an :class:`~hf_lrp_surgery.circuits.ablation.Ablation` already recorded (corrupted: on
            ``evaluation``'s prepared batches).
        threshold: Fraction of the unpruned metric the circuit must keep, in ``(0, 1]``.
        metric: ``"logit_diff"`` or ``"accuracy"``.
        objective: Relevance objective (``objective`` of :func:`task_scores`).
        aggregation: For ``lrp`` / ``gradient``.
        scores: Precomputed scores (skips attribution; not with ``reattribute``).
        baseline: The unpruned model's metrics on ``evaluation``, if already measured.
        grid_points: Grid points of the sweep (8: 7 distinct counts).
        min_kept: Smallest kept fraction on the grid.
        refine_steps: Bisection steps after the grid (at most).
        tolerance: Stop bisecting once the bracket is at most this fraction of the circuit size
            (``total - low``; 0 bisects all ``refine_steps``).
        patience: Stop the grid after this many failing points in a row (``None``: measure every point).
        reattribute: Score again on the pruned model after every grid step (one attribution per
            step); later pruning extends the current one by the new lowest scores.
        batch_size: Samples per attribution pass.
        eval_batch_size: Prompts per evaluation pass.
        random_seed: For ``method="random"``.
        progress: Show progress bars.
        **keywords: ``seed=``, the deprecated name of ``objective``.

    Returns:
        The :class:`Circuit` (at least one unit is pruned); its ``timings`` hold the seconds per stage.

    Raises:
        CircuitDiscoveryError: The unpruned metric is not positive (the model does not do the task),
            or the threshold is out of range.
        AblationError: Corrupted ablation on prompts without corrupted counterparts of the same length.
        NoCircuitError: No measured pruning (grid and bisection) keeps the threshold.

    Example:
        >>> circuit = discover_circuit(model, tokenizer, ioi_task(tokenizer, 64, seed=0),
        ...                            evaluation=ioi_task(tokenizer, 64, seed=100))  # doctest: +SKIP
        >>> print(circuit.summary())  # doctest: +SKIP
    """
    if "seed" in keywords:
        objective = renamed_seed(keywords.pop("seed"))
    reject_unknown(keywords, "discover_circuit")
    if not 0.0 < threshold <= 1.0:
        raise CircuitDiscoveryError(f"threshold is a fraction of the unpruned metric in (0, 1], got {threshold}")
    if reattribute and scores is not None:
        raise CircuitDiscoveryError("reattribute=True computes its own scores; do not pass scores=")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance is a fraction of the circuit size in [0, 1), got {tolerance}")
    scope = default_scope(method if scores is None else scores.method, granularity) if scope is None else scope
    groups = _weight_groups(granularity, modules)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    evaluation = evaluation if evaluation is not None else task
    prepared = (
        evaluation
        if isinstance(evaluation, PreparedTask)
        else PreparedTask(model, tokenizer, evaluation, batch_size=eval_batch_size)
    )
    evaluation_task = prepared.task
    if baseline is None:
        baseline = prepared.metrics(model)
    base_value = baseline.get(metric)
    if not base_value > 0:
        raise CircuitDiscoveryError(
            f"the unpruned model's {metric} is {base_value:.4f} on the evaluation prompts; a "
            "circuit keeps a fraction of a positive score, so the model must do the task first "
            "(check the prompts and the correct/wrong tokens)"
        )
    timings["baseline"], clock = time.perf_counter() - clock, time.perf_counter()
    arch = resolve(model)
    if isinstance(ablation, Ablation):
        values = ablation
    else:
        names = match_groups(Layout.of(arch), groups) if granularity == "weights" else None
        values = Ablation.record(
            ablation,
            model,
            tokenizer,
            granularity,
            reference=task,
            evaluation=prepared,
            modules=names,
            batch_size=eval_batch_size,
        )
    if values.kind == "corrupted" and values.prepared is not prepared:
        raise AblationError(
            "the corrupted activations were recorded on other evaluation batches; pass that PreparedTask"
        )
    timings["ablation"], clock = time.perf_counter() - clock, time.perf_counter()
    options = ScoringOptions(
        method=method,
        components=(granularity,),
        aggregation=aggregation,
        batch_size=batch_size,
        random_seed=random_seed,
    )
    if scores is None:
        scores = task_scores(model, tokenizer, task, options, objective=objective, progress=progress)
    timings["relevance"], clock = time.perf_counter() - clock, time.perf_counter()

    def rescore(mask: Mask) -> Scores:
        with ablated(model, mask, values):
            return task_scores(model, tokenizer, task, options, objective=objective, progress=progress)

    ranking = _Ranking(scores, granularity, scope, groups)
    total = ranking.total
    pruner = _Pruner(ranking, rescore if reattribute else None)
    curve = PruningCurve(scores.method, granularity, scope, total, baseline)
    target = threshold * base_value
    best: tuple[Mask, TaskMetrics] | None = None
    failed_at: int | None = None

    def measure(count: int) -> tuple[Mask, TaskMetrics]:
        mask = pruner.mask(count)
        assert mask is not None
        with ablated(model, mask, values):
            metrics = prepared.metrics(model, values)
        curve.points.append(CurvePoint(count, total - count, metrics))
        return mask, metrics

    grid = [c for c in sparsity_grid(total, grid_points, min_kept=min_kept) if c > 0]
    failures = 0
    for count in tqdm(grid, desc=f"{scores.method} sweep", disable=not progress, leave=False):
        mask, metrics = measure(count)
        if metrics.get(metric) >= target:
            best, failed_at, failures = (mask, metrics), None, 0
            pruner.advance(mask)
            continue
        failures += 1
        if failed_at is None:
            failed_at = count
            if reattribute:
                break  # later masks extend the last one that held
        if patience is not None and failures >= patience:
            break
    low = best[0].count if best is not None else 0
    high = failed_at if failed_at is not None and failed_at > low else None
    for _ in range(refine_steps):
        if high is None or high - low <= max(1.0, tolerance * (total - low)):
            break
        middle = (low + high) // 2
        mask, metrics = measure(middle)
        if metrics.get(metric) >= target:
            best, low = (mask, metrics), middle
        else:
            high = middle
    timings["search"] = time.perf_counter() - clock
    curve.points.sort(key=lambda p: p.pruned)
    if best is None:
        raise NoCircuitError(
            f"pruning {high} of {total} {granularity} already drops {metric} below {threshold:.0%} of the unpruned "
            f"{base_value:.4f}; lower the threshold, or give more refine_steps to search below {high}",
            curve=curve,
        )
    mask, metrics = best
    circuit_info = {
        "task": {"name": task.name, "size": len(task), **dict(task.settings)},
        "evaluation": {"name": evaluation_task.name, "size": len(evaluation_task), **dict(evaluation_task.settings)},
        "metric": metric,
        "threshold": threshold,
        "baseline": baseline.to_dict(),
        "circuit": metrics.to_dict(),
        "size": total - mask.count,
        "total": total,
        "scope": scope,
        "ablation": values.to_dict(),
        "reattribute": reattribute,
        "grid_points": grid_points,
        "min_kept": min_kept,
        "refine_steps": refine_steps,
        "tolerance": tolerance,
        "patience": patience,
    }
    final = Mask(
        mask.granularity, mask.fingerprint, mask.layout, mask.indices, {**mask.provenance, "circuit": circuit_info}
    )
    return Circuit(
        final, total - mask.count, total, baseline, metrics, curve, threshold, metric, values.to_dict(), timings
    )


def _weight_groups(granularity: Granularity, modules: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """The weight module groups a weight circuit ranks (default the MLP projections); ``None`` otherwise."""
    if granularity != "weights":
        if modules is not None:
            raise CircuitDiscoveryError("modules= restricts weight circuits; neurons and heads live on fixed modules")
        return None
    if modules is None:
        return DEFAULT_WEIGHT_MODULES
    return (modules,) if isinstance(modules, str) else tuple(modules)


__getattr__ = moved_names(
    __name__,
    {
        "TaskSeed": "hf_lrp_surgery.circuits.tasks:TaskObjective",
        "unit_count": lambda: lambda layout, granularity, arch=None: layout.units(granularity, arch),
        "complement": lambda: Mask.complement,
    },
)
