"""LRP against the baselines: circuit sizes, performance-sparsity curves, composition and specificity.

:func:`compare_methods` runs :func:`~hf_lrp_surgery.circuits.discovery.discover_circuit` for each
scoring method on each of several independent task sets (a reference set to attribute on and an
evaluation set to measure on), and gathers:

* the circuit size at the threshold per method and set, with mean ± std over the sets;
* the performance-sparsity curves on a shared log-spaced grid (mean ± std over the sets);
* each circuit's per-layer composition;
* faithfulness (the circuit alone keeps the metric) and a specificity check: ablating only the
  circuit's own components from the full model against ablating as many random components
  (several draws), with the same ablation kind. A circuit that is specific to the task costs the
  task far more than random components do;
* the seconds per stage (``setup``: encoding, baseline and recorded ablation values, once per set;
  ``relevance``: once per method and set; ``search``; ``specificity``).

:meth:`CircuitComparison.save` writes ``report.json``, the plots (``curves.png``,
``circuit_sizes.png``, ``composition.png``) and each circuit (``circuits/<method>/set<i>/``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery.circuits.ablation import Ablation, AblationKind, PreparedTask, ablated
from hf_lrp_surgery.circuits.discovery import (
    Circuit,
    CircuitDiscoveryError,
    CircuitScope,
    NoCircuitError,
    PruningCurve,
    _Ranking,
    _weight_groups,
    default_scope,
    discover_circuit,
    sparsity_grid,
    task_scores,
)
from hf_lrp_surgery.circuits.tasks import Metric, NextTokenTask, TaskMetrics, TaskObjective
from hf_lrp_surgery.io import atomic_directory, write_json_atomic
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.collect import renamed_seed
from hf_lrp_surgery.masks import Granularity
from hf_lrp_surgery.masks.selection import match_groups
from hf_lrp_surgery.options import ScoringOptions, reject_unknown
from hf_lrp_surgery.plots import pyplot, save_figure
from hf_lrp_surgery.scoring import CIRCUIT_METHODS, Layout, score

__all__ = ["CircuitComparison", "DEFAULT_METHODS", "MethodResult", "compare_methods", "specificity"]

#: LRP and the baselines it is compared with (the registry's comparison set when this module was imported).
DEFAULT_METHODS: tuple[str, ...] = CIRCUIT_METHODS


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def specificity(
    model: nn.Module,
    tokenizer: Any,
    circuit: Circuit,
    task: NextTokenTask | PreparedTask,
    *,
    random_draws: int = 3,
    seed: int = 0,
    batch_size: int = 32,
    ablation: Ablation | None = None,
    baseline: TaskMetrics | None = None,
) -> dict[str, Any]:
    """Ablate only the circuit's components from the full model, and as many random components.

    A circuit specific to the task costs the task far more when it is ablated than the same number
    of random components of the same kind (for weights: from the same matrices) do.

    Args:
        model: The full model.
        tokenizer: Its tokenizer.
        circuit: A discovered circuit (neurons, heads or weights).
        task: Evaluation prompts (or the same as a :class:`PreparedTask`; corrupted ablation needs
            the one it was recorded on).
        random_draws: Random component sets of the circuit's size (seeds ``seed``, ``seed + 1``, ...).
        seed: First random seed.
        batch_size: Prompts per forward pass.
        ablation: How to ablate (default zero; use the circuit's own).
        baseline: The full model's metrics on ``task``, if already measured.

    Returns:
        ``{"metric", "full", "circuit_ablated", "random_ablated": {"mean", "std", "values"},
        "relative_drop_circuit", "relative_drop_random", "relative_drop_random_std", "faithfulness"}``;
        values of ``circuit.metric``, drops as fractions of the full model's value (1 = the metric is
        gone, more than 1 = reversed), ``faithfulness`` the circuit alone as a fraction of the full
        model (measured in the search).

    Raises:
        CircuitDiscoveryError: ``random_draws < 1``.

    Example:
        >>> check = specificity(model, tokenizer, circuit, ioi_task(tokenizer, 64, seed=100))  # doctest: +SKIP
        >>> check["relative_drop_circuit"], check["relative_drop_random"]  # doctest: +SKIP
    """
    if random_draws < 1:
        raise CircuitDiscoveryError(f"random_draws must be >= 1, got {random_draws}")
    metric: Metric = circuit.metric  # type: ignore[assignment]
    prepared = task if isinstance(task, PreparedTask) else PreparedTask(model, tokenizer, task, batch_size=batch_size)
    full = (baseline if baseline is not None else prepared.metrics(model)).get(metric)
    with ablated(model, circuit.components(), ablation):
        knocked = prepared.metrics(model, ablation).get(metric)
    granularity: Granularity = circuit.granularity  # type: ignore[assignment]
    selection = circuit.mask.provenance.get("selection", {})
    modules = selection.get("modules") if granularity == "weights" else None
    randoms = []
    for draw in range(random_draws):
        scores = score(model, method="random", components=(granularity,), random_seed=seed + draw, progress=False)
        ranking = _Ranking(scores, granularity, "global", modules, sort_once=False)
        with ablated(model, ranking.mask(circuit.size), ablation):
            randoms.append(prepared.metrics(model, ablation).get(metric))
    drops = [(full - r) / full for r in randoms]
    return {
        "metric": metric,
        "full": full,
        "circuit_ablated": knocked,
        "random_ablated": {**_mean_std(randoms), "values": randoms},
        "relative_drop_circuit": (full - knocked) / full,
        "relative_drop_random": statistics.fmean(drops),
        "relative_drop_random_std": _mean_std(drops)["std"],
        "faithfulness": circuit.faithfulness(),
    }


@dataclass
class MethodResult:
    """One method's circuits on every task set.

    Attributes:
        method: The scoring method.
        circuits: One circuit per set (``None`` where no pruning kept the threshold).
        specificity: One :func:`specificity` record per set with a circuit.
        curves: One pruning curve per set: the circuit's, or, where there is no circuit, the grid
            points the search measured before it gave up (all below the threshold).
    """

    method: str
    circuits: list[Circuit | None] = field(default_factory=list)
    specificity: list[dict[str, Any]] = field(default_factory=list)
    curves: list[PruningCurve] = field(default_factory=list)

    def sizes(self) -> list[int]:
        """Circuit sizes (a set without a circuit counts as the whole model)."""
        return [c.size if c is not None else curve.total for c, curve in zip(self.circuits, self.curves)]

    def curve_on(self, grid: Sequence[int], metric: Metric) -> list[list[float]]:
        """Per set, the relative metric at each grid count (``nan`` where not measured)."""
        rows = []
        for curve in self.curves:
            by_count = dict(zip((p.pruned for p in curve.points), curve.relative(metric)))
            by_count[0] = 1.0
            rows.append([by_count.get(c, float("nan")) for c in grid])
        return rows


@dataclass
class CircuitComparison:
    """Everything :func:`compare_methods` measured.

    Attributes:
        results: Method -> its :class:`MethodResult`.
        grid: Pruned counts shared by every curve.
        total: Prunable units.
        layout: The model's layout.
        settings: The options of the comparison (task, threshold, metric, objective, ...).
    """

    results: dict[str, MethodResult]
    grid: list[int]
    total: int
    layout: Layout
    settings: dict[str, Any]

    def table(self) -> str:
        """Per method (mean ± std over the sets): circuit size and share, the metric kept by the circuit
        alone (faithfulness), and the relative drop when only the circuit, or as many random units, are ablated."""
        metric = self.settings["metric"]
        lines = [
            f"{'method':<11} {'scope':<9} {'circuit size (mean ± std)':>27} {'share':>8} {'per set':>24} "
            f"{metric + ' kept':>16} {'drop: circuit':>16} {'drop: random':>16}"
        ]
        for method, result in self.results.items():
            sizes = result.sizes()
            stats = _mean_std([float(s) for s in sizes])
            kept = _mean_std_or_nan([c.faithfulness() for c in result.circuits if c is not None])
            circuit_drop = _mean_std_or_nan([s["relative_drop_circuit"] for s in result.specificity])
            random_drop = _mean_std_or_nan([s["relative_drop_random"] for s in result.specificity])
            lines.append(
                f"{method:<11} {self.settings['scopes'].get(method, ''):<9} "
                f"{stats['mean']:>17.1f} ± {stats['std']:<7.1f} "
                f"{100 * stats['mean'] / self.total:>7.2f}% {str(sizes):>24} "
                f"{_percent(kept):>16} {_percent(circuit_drop):>16} {_percent(random_drop):>16}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report."""
        metric = self.settings["metric"]
        methods: dict[str, Any] = {}
        for method, result in self.results.items():
            sizes = [float(s) for s in result.sizes()]
            curves = result.curve_on(self.grid, metric)
            columns = list(zip(*curves))
            per_layer = [c.per_layer() for c in result.circuits if c is not None]
            timings = [c.timings for c in result.circuits if c is not None]
            methods[method] = {
                "scope": self.settings["scopes"].get(method),
                "circuit_size": {
                    **_mean_std(sizes),
                    "per_set": result.sizes(),
                    "share_mean": statistics.fmean(sizes) / self.total,
                },
                "circuit_metrics": [c.metrics.to_dict() if c is not None else None for c in result.circuits],
                "baseline_metrics": [c.baseline.to_dict() if c is not None else None for c in result.circuits],
                "faithfulness": _mean_std_or_nan([c.faithfulness() for c in result.circuits if c is not None]),
                "specificity_summary": {
                    "relative_drop_circuit": _mean_std_or_nan([s["relative_drop_circuit"] for s in result.specificity]),
                    "relative_drop_random": _mean_std_or_nan([s["relative_drop_random"] for s in result.specificity]),
                    "relative_drop_random_draw_std": _mean_std_or_nan(
                        [s["relative_drop_random_std"] for s in result.specificity]
                    ),
                },
                "per_layer_mean": [statistics.fmean(col) for col in zip(*per_layer)] if per_layer else [],
                "per_layer": per_layer,
                "curve": {
                    "pruned": self.grid,
                    "relative_mean": [_nanmean(col) for col in columns],
                    "relative_std": [_nanstd(col) for col in columns],
                    "per_set": curves,
                },
                "specificity": result.specificity,
                "timings": {
                    "per_set": timings,
                    "total": {k: sum(t.get(k, 0.0) for t in timings) for k in _STAGES},
                },
                "evaluations_per_set": [len(c.curve.points) if c is not None else None for c in result.circuits],
            }
        return {"settings": self.settings, "total": self.total, "grid": self.grid, "methods": methods}

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        save_circuits: bool = True,
        circuit_masks: bool | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write ``report.json``, ``report.txt``, ``curves.png``, ``circuit_sizes.png``, ``composition.png``
        and (with ``save_circuits``) ``circuits/<method>/set<i>/``, all at once (atomically).

        Args:
            directory: Destination (an existing non-empty one is replaced only with ``overwrite``).
            save_circuits: Also save every circuit (``circuit.json``, and the masks per ``circuit_masks``).
            circuit_masks: Write each circuit's masks (default: for neurons and heads, not for weights,
                whose masks hold tens of millions of indices each; see :meth:`Circuit.save`).
            overwrite: Replace an existing non-empty directory.

        Returns:
            The directory.
        """
        report = self.to_dict()
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            write_json_atomic(tmp / "report.json", report)
            (tmp / "report.txt").write_text(self.table() + "\n")
            _plot_curves(report, self.settings, tmp / "curves.png")
            _plot_sizes(report, self.settings, tmp / "circuit_sizes.png")
            _plot_composition(report, self.settings, tmp / "composition.png")
            if save_circuits:
                for method, result in self.results.items():
                    for i, circuit in enumerate(result.circuits):
                        if circuit is not None:
                            circuit.save(tmp / "circuits" / method / f"set{i}", masks=circuit_masks)
        return Path(directory)


#: The stages whose seconds the report records.
_STAGES = ("setup", "relevance", "search", "specificity")


def _mean_std_or_nan(values: Sequence[float]) -> dict[str, float]:
    return _mean_std(values) if values else {"mean": float("nan"), "std": float("nan")}


def _percent(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}%"


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.fmean(finite) if finite else float("nan")


def _nanstd(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def compare_methods(
    model: nn.Module,
    tokenizer: Any,
    sets: Sequence[tuple[NextTokenTask, NextTokenTask]],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    granularity: Granularity = "neurons",
    scope: CircuitScope | None = None,
    modules: Sequence[str] | str | None = None,
    ablation: AblationKind = "zero",
    threshold: float = 0.9,
    metric: Metric = "logit_diff",
    options: ScoringOptions | None = None,
    objective: TaskObjective | None = None,
    grid_points: int = 8,
    min_kept: float = 1e-3,
    refine_steps: int = 6,
    tolerance: float = 0.02,
    patience: int | None = 2,
    random_draws: int = 3,
    eval_batch_size: int = 32,
    progress: bool = True,
    **keywords: Any,
) -> CircuitComparison:
    """Discover a circuit with every method on every ``(reference, evaluation)`` set and compare.

    Per set, the evaluation prompts are encoded once, the unpruned metric is measured once and the
    ablation values (means over the reference prompts, or the corrupted runs of the evaluation
    prompts) are recorded once; per method and set, the components are scored once. Each circuit's
    faithfulness and specificity are measured with the same ablation.

    Args:
        model: A supported causal LM.
        tokenizer: Its tokenizer.
        sets: Independent ``(reference, evaluation)`` task pairs (e.g. IOI with different seeds).
        methods: Scoring methods (default: ``scoring.CIRCUIT_METHODS``, ``lrp`` and its baselines).
        granularity: ``"neurons"``, ``"heads"`` or ``"weights"``.
        scope: ``"global"``, ``"per_layer"`` or (weights) ``"per_row"`` for every method; default
            per method :func:`~hf_lrp_surgery.circuits.discovery.default_scope` (the paper's
            protocol: global, and row-wise for Wanda's weights).
        modules: Weights: the module groups (default ``("mlp.*",)``).
        ablation: ``"zero"``, ``"mean"`` or ``"corrupted"``.
        threshold: Fraction of the unpruned metric the circuit keeps.
        metric: ``"logit_diff"`` or ``"accuracy"``.
        options: How each method scores (:class:`~hf_lrp_surgery.options.ScoringOptions`; default:
            ``aggregation="abs"``); ``method``, ``components`` and ``random_seed`` are set per run.
        objective: Relevance objective (see :func:`~hf_lrp_surgery.circuits.discovery.task_scores`).
        grid_points: Log-spaced grid points (the shared curve grid too).
        min_kept: Smallest kept fraction on the grid.
        refine_steps: Bisection steps per circuit (at most).
        tolerance: Stop bisecting once the bracket is this fraction of the circuit size.
        patience: Stop each grid after this many failing points in a row (``None``: every point).
        random_draws: Random component sets per specificity check.
        eval_batch_size: Prompts per evaluation pass.
        progress: Show progress bars.
        **keywords: Fields of ``ScoringOptions`` (``aggregation``, ``batch_size``, ...), replacing
            those of ``options``; ``seed`` is a deprecated name of ``objective``.

    Returns:
        The :class:`CircuitComparison`; ``settings["seconds"]`` holds the seconds per stage.

    Raises:
        CircuitDiscoveryError: No sets, or the unpruned model fails the task.
        AblationError: Corrupted ablation on prompts without corrupted counterparts.
        ValueError: An option is out of range.
        TypeError: A keyword is not an option.

    Example:
        >>> sets = [(ioi_task(tok, 64, seed=i), ioi_task(tok, 64, seed=100 + i)) for i in range(3)]  # doctest: +SKIP
        >>> comparison = compare_methods(model, tok, sets, granularity="weights", ablation="mean")  # doctest: +SKIP
        >>> print(comparison.table())  # doctest: +SKIP
    """
    if "seed" in keywords:
        objective = renamed_seed(keywords.pop("seed"))
    options = ScoringOptions.take(options, keywords, aggregation="abs")
    reject_unknown(keywords, "compare_methods")
    objective = options.objective if objective is None else objective
    if not sets:
        raise CircuitDiscoveryError("give at least one (reference, evaluation) task set")
    groups = _weight_groups(granularity, modules)
    arch = resolve(model)
    layout = Layout.of(arch)
    names = match_groups(layout, groups) if granularity == "weights" else None
    total = (
        sum(p.weight.numel() for p in arch.prunable if p.name in set(names))
        if names is not None
        else layout.units(granularity, arch)
    )
    grid = sparsity_grid(total, grid_points, min_kept=min_kept)
    scopes: dict[str, CircuitScope] = {
        m: scope if scope is not None else default_scope(m, granularity) for m in methods
    }
    results = {m: MethodResult(m) for m in methods}
    seconds = dict.fromkeys(_STAGES, 0.0)
    bar = tqdm(total=len(sets) * len(methods), desc="circuits", disable=not progress)
    for i, (reference, evaluation) in enumerate(sets):
        clock = time.perf_counter()
        prepared = PreparedTask(model, tokenizer, evaluation, batch_size=eval_batch_size)
        baseline = prepared.metrics(model)
        values = Ablation.record(
            ablation,
            model,
            tokenizer,
            granularity,
            reference=reference,
            evaluation=prepared,
            modules=names,
            batch_size=eval_batch_size,
        )
        setup = time.perf_counter() - clock
        seconds["setup"] += setup
        for method in methods:
            bar.set_postfix_str(f"set {i} {method}")
            clock = time.perf_counter()
            run = replace(options, method=method, components=(granularity,), random_seed=i)
            scores = task_scores(model, tokenizer, reference, run, objective=objective, progress=False)
            relevance, clock = time.perf_counter() - clock, time.perf_counter()
            try:
                found = discover_circuit(
                    model,
                    tokenizer,
                    reference,
                    evaluation=prepared,
                    scores=scores,
                    baseline=baseline,
                    ablation=values,
                    granularity=granularity,
                    scope=scopes[method],
                    modules=groups,
                    threshold=threshold,
                    metric=metric,
                    grid_points=grid_points,
                    min_kept=min_kept,
                    refine_steps=refine_steps,
                    tolerance=tolerance,
                    patience=patience,
                    eval_batch_size=eval_batch_size,
                    progress=False,
                )
                circuit: Circuit | None = found
                curve = found.curve
            except NoCircuitError as failed:  # even the first grid point breaks the threshold
                circuit = None
                assert isinstance(failed.curve, PruningCurve)
                curve = failed.curve  # what the search measured before it gave up
                seconds["search"] += time.perf_counter() - clock
            seconds["relevance"] += relevance
            results[method].circuits.append(circuit)
            results[method].curves.append(curve)
            if circuit is not None:
                circuit.timings.update(setup=setup, relevance=relevance)
                seconds["search"] += circuit.timings["search"]
                clock = time.perf_counter()
                results[method].specificity.append(
                    specificity(
                        model,
                        tokenizer,
                        circuit,
                        prepared,
                        random_draws=random_draws,
                        seed=1000 * (i + 1),
                        ablation=values,
                        baseline=baseline,
                    )
                )
                circuit.timings["specificity"] = time.perf_counter() - clock
                seconds["specificity"] += circuit.timings["specificity"]
            bar.update()
    bar.close()
    settings = {
        "task": sets[0][0].name,
        "num_sets": len(sets),
        "reference_sizes": [len(r) for r, _ in sets],
        "evaluation_sizes": [len(e) for _, e in sets],
        "task_settings": [dict(r.settings) for r, _ in sets],
        "methods": list(methods),
        "granularity": granularity,
        "scope": scope if scope is not None else "per method (default_scope)",
        "scopes": scopes,
        "modules": list(groups) if groups is not None else None,
        "ablation": ablation,
        "threshold": threshold,
        "metric": metric,
        "objective": objective,
        "aggregation": options.aggregation,
        "variant": options.variant,
        "epsilon": options.epsilon,
        "grid_points": grid_points,
        "min_kept": min_kept,
        "refine_steps": refine_steps,
        "tolerance": tolerance,
        "patience": patience,
        "random_draws": random_draws,
        "eval_batch_size": eval_batch_size,
        "seconds_per_stage": {k: round(v, 2) for k, v in seconds.items()},
        "model_type": getattr(getattr(arch.model, "config", None), "model_type", None),
    }
    return CircuitComparison(results, grid, total, layout, settings)


# -- plots ------------------------------------------------------------------------------------
def _plot_curves(report: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    total = report["total"]
    for i, (method, data) in enumerate(report["methods"].items()):
        kept = [total - c for c in data["curve"]["pruned"]]
        mean, std = data["curve"]["relative_mean"], data["curve"]["relative_std"]
        ax.plot(kept, mean, "o-", color=f"C{i}", label=method, markersize=3)
        ax.fill_between(
            kept, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=f"C{i}", alpha=0.15
        )
    ax.axhline(settings["threshold"], color="grey", linestyle="--", label=f"threshold {settings['threshold']:.0%}")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel(f"{settings['granularity']} kept (of {total})")
    ax.set_ylabel(f"{settings['metric']} / unpruned")
    ax.set_title(
        f"{settings['task']}: performance vs sparsity ({settings.get('ablation', 'zero')} ablation, "
        f"mean ± std over {settings['num_sets']} sets)"
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _plot_sizes(report: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(report["methods"])
    means = [report["methods"][m]["circuit_size"]["mean"] for m in names]
    stds = [report["methods"][m]["circuit_size"]["std"] for m in names]
    ax.bar(names, means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(names))])
    ax.set_yscale("log")
    ax.set_ylabel(f"{settings['granularity']} in the circuit")
    ax.set_title(f"smallest circuit keeping {settings['threshold']:.0%} of {settings['metric']}")
    save_figure(fig, path)


def _plot_composition(report: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(report["methods"]))
    for i, (method, data) in enumerate(report["methods"].items()):
        counts = data["per_layer_mean"]
        ax.bar([layer + i * width for layer in range(len(counts))], counts, width=width, color=f"C{i}", label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"circuit {settings['granularity']} (mean over sets)")
    ax.set_title("circuit composition per layer")
    ax.legend(fontsize=8)
    save_figure(fig, path)
