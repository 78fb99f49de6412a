"""Attribution fidelity on IOI: how well does each neuron score predict the real effect of ablating that neuron?

Why this is measured. On SmolLM2-135M-Instruct, gradient x activation finds IOI circuits of MLP
neurons half the size of AttnLRP's (docs/circuits.md, zero ablation, 90% of the logit difference
kept). The hypothesis tested here (design/method.md, "Why a baseline can win"):

* **The Taylor argument.** Zero-ablating neuron ``i`` sets its activations ``a_{i,t}`` to 0 at every
  position ``t``. To first order the metric ``m`` changes by ``Δm ≈ -Σ_t (∂m/∂a_{i,t}) a_{i,t}``,
  which is exactly gradient x activation (``gradient``, signed) with ``m`` as the objective. LRP's
  modified backward (identity rule on SiLU, 1/2 on the gate product, frozen norms and softmax) aims
  at a conservative decomposition of ``m`` instead, not at this derivative, so its scores should
  predict the real effect of zero-ablating a neuron worse, most where ablation triggers
  renormalisation (norms) or moves a SwiGLU gate.
* **Patching is another question.** Mean ablation and activation patching replace ``a`` by ``ā`` or
  by the corrupted run's ``a'``; to first order ``Δm ≈ -Σ_t g_t (a_t - a'_t)`` (attribution patching),
  which none of the zero-baseline scores computes. RelP (Jafari, Eberle, Khakzar, Nanda 2025, "RelP:
  Faithful and Efficient Circuit Discovery via Relevance Patching") found that LRP-style propagation
  rules predict activation *patching* far better than plain gradients on GPT-2 MLPs, so the zero,
  mean and corrupted (ABC patching) effects are all measured. (The ``lrp`` score is RelP's attribution
  with a zero baseline, ``a`` times LRP's modified gradient; RelP's patching estimate uses ``a - a'``,
  which no scorer here computes.)

What it does (everything through the library: ``task_scores`` for the scores, ``PreparedTask`` and
``ablated`` with ``Ablation.record`` for the ablations, ``pruning_curve`` for the cumulative check):

1. IOI reference prompts (seed S) to score on and evaluation prompts (seed 100 + S) to measure on,
   as ``compare_methods`` builds set S.
2. Scores of every MLP neuron on the reference prompts: ``lrp`` (AttnLRP), ``lrp_cp`` (CP-LRP),
   ``gradient`` (gradient x activation), each with ``abs`` (mean per-prompt |R|) and ``signed`` (mean
   R) aggregation and the ``--objective`` the circuit search used (default: the correct token's
   logit); ``activation`` (mean |a|, unsigned: abs only); and ``taylor``, gradient x activation of the
   logit difference, signed: the first-order estimate of the change of the search's metric.
3. A seeded sample of neurons, stratified by layer (the same number from every layer, ``--neurons``
   in all), plus the ``--top`` highest-|score| neurons of each scorer.
4. For each sampled neuron alone and each ablation kind (zero, mean over the reference tokens, the
   ABC-corrupted prompt's activation), the real per-prompt change of the logit difference and of the
   correct token's logit on the evaluation prompts (one batched forward per neuron and kind; the
   prompts are encoded once, the clean logits and the mean/corrupted values recorded once).
5. Per scorer x aggregation x ablation kind x target: Spearman and Pearson correlation between score
   and effect (signed score vs the loss ``-mean Δ``; abs score vs the per-prompt mean ``|Δ|``), over all
   sampled neurons, over the uniform stratum only, and per third of the layers.
6. Cumulative check: for each scorer, zero-ablate its lowest-abs-score 10%, 25% and 50% of all
   neurons together and compare the real change of the mean logit difference with the first-order
   prediction ``-Σ taylor`` over those neurons (and with ``-Σ`` of the scorer's own signed scores).

Writes ``report.json`` (settings with the command, seeds, sizes and seconds per stage; every figure)
and ``fidelity.png`` (scatter plots under zero ablation and a bar chart of the Spearman correlations)
to ``--output`` and prints a short table.

    HF_HUB_OFFLINE=1 python benchmarks/attribution_fidelity.py --output docs/results/ioi_attribution_fidelity
    HF_HUB_OFFLINE=1 python benchmarks/attribution_fidelity.py --model gemma3-270m --output runs/fidelity-gemma
    HF_HUB_OFFLINE=1 python benchmarks/attribution_fidelity.py --neurons 10 --size 8 --top 0 --output runs/smoke

Runtime (measured on 2 idle CPU cores, SmolLM2-135M-Instruct, float32). The single-neuron ablations
dominate: 3 forward passes of the ``--size`` evaluation prompts per sampled neuron (``--neurons`` plus at
most 4 x ``--top``), 0.80 s each at 32 prompts (0.24 s at 8). The rest is about 45 s at 32 prompts:
start-up and loading 7 s, the scores 23 s, the cumulative check 12 s, the recorded mean/corrupted values
2 s. The default run (``--size 32 --neurons 120 --top 3``: 120 to 132 neurons) therefore takes
45 + 2.4 x 132 s, at most about 6 minutes. Smoke runs: ``--neurons 10 --size 8 --top 0`` 25 s wall,
``--neurons 10 --size 32 --top 0`` 68 s wall.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery.circuits import (
    ABLATIONS,
    Ablation,
    AblationKind,
    NextTokenTask,
    PreparedTask,
    ablated,
    ioi_task,
    pruning_curve,
    task_scores,
)
from hf_lrp_surgery.circuits.tasks import TaskObjective, metrics_from_logits
from hf_lrp_surgery.exceptions import SurgeryError
from hf_lrp_surgery.fingerprint import ModelFingerprint
from hf_lrp_surgery.io import write_json_atomic
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.masks import Mask, select
from hf_lrp_surgery.plots import pyplot, save_figure
from hf_lrp_surgery.scoring import Layout, Scores

#: Scorer name -> the ``task_scores`` options it is (objective and aggregation are set per run).
SCORERS: dict[str, dict[str, str]] = {
    "lrp": {"method": "lrp", "variant": "attnlrp"},
    "lrp_cp": {"method": "lrp", "variant": "cp"},
    "gradient": {"method": "gradient"},
    "activation": {"method": "activation"},
}
#: The scorers that read a relevance objective (and so have a signed aggregation).
RELEVANCE_SCORERS = ("lrp", "lrp_cp", "gradient")
#: Gradient x activation of the logit difference, signed: the first-order estimate of the metric's change.
TAYLOR = "taylor"
#: What each ablation changes: the logit difference (the search's metric) and the correct token's logit.
TARGETS = ("logit_diff", "correct_logit")
#: How many groups of consecutive layers the correlations are also reported for.
LAYER_GROUPS = 3
DEFAULT_OUTPUT = Path("docs/results/ioi_attribution_fidelity")


# -- the sample -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeuronSample:
    """The neurons whose single-neuron ablation is measured.

    Attributes:
        layers: ``[n]`` decoder block of each neuron.
        units: ``[n]`` neuron index within its block.
        strata: ``"uniform"`` (the layer-stratified random draw) or ``"top:<scorer>"`` per neuron.
    """

    layers: torch.Tensor
    units: torch.Tensor
    strata: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.strata)

    def values(self, scores: torch.Tensor) -> torch.Tensor:
        """The ``[n]`` entries of a ``[num_layers, num_neurons]`` score tensor at the sampled neurons."""
        return scores[self.layers, self.units].double()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"layers": self.layers.tolist(), "units": self.units.tolist(), "strata": list(self.strata)}


def sample_neurons(
    num_layers: int,
    width: int,
    count: int,
    *,
    seed: int = 0,
    top: int = 0,
    ranked_by: dict[str, torch.Tensor] | None = None,
) -> NeuronSample:
    """``count`` neurons drawn at random, the same number from every layer (the rest from random layers),
    plus the ``top`` highest-scoring neurons of each score in ``ranked_by`` that are not drawn yet.

    Args:
        num_layers: Decoder blocks.
        width: Neurons per block.
        count: Neurons in the uniform stratum.
        seed: Seed of the draw.
        top: Extra neurons per score.
        ranked_by: Scorer name -> ``[num_layers, width]`` scores (higher first).

    Returns:
        The :class:`NeuronSample`.

    Raises:
        ValueError: ``count`` is not in ``[1, num_layers * width]`` or ``top`` is negative.

    Example:
        >>> sample = sample_neurons(2, 8, 5, seed=0)
        >>> len(sample), sorted(sample.layers.tolist()).count(0) in (2, 3)
        (5, True)
    """
    if not 1 <= count <= num_layers * width:
        raise ValueError(f"the sample needs 1 to {num_layers * width} neurons, got {count}")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    generator = torch.Generator().manual_seed(seed)
    per_layer = [count // num_layers] * num_layers
    for layer in torch.randperm(num_layers, generator=generator)[: count % num_layers].tolist():
        per_layer[layer] += 1
    chosen: list[tuple[int, int]] = []
    for layer, k in enumerate(per_layer):
        chosen += [(layer, int(u)) for u in torch.randperm(width, generator=generator)[:k].sort().values]
    strata = ["uniform"] * len(chosen)
    taken = set(chosen)
    for name, scores in (ranked_by or {}).items():
        added = 0
        for flat in torch.argsort(scores.flatten(), descending=True, stable=True).tolist():
            if added == top:
                break
            neuron = (flat // width, flat % width)
            if neuron not in taken:
                taken.add(neuron)
                chosen.append(neuron)
                strata.append(f"top:{name}")
                added += 1
    layers, units = zip(*chosen)
    return NeuronSample(torch.tensor(layers), torch.tensor(units), tuple(strata))


# -- the real effects -------------------------------------------------------------------------
@dataclass
class Effects:
    """Per sampled neuron and evaluation prompt, the change of each target when only that neuron is ablated.

    Attributes:
        kind: The ablation kind.
        changes: Target (``"logit_diff"``, ``"correct_logit"``) -> ``[n, num_prompts]`` float64 changes
            (ablated minus clean).
    """

    kind: str
    changes: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean(self, target: str) -> torch.Tensor:
        """``[n]`` change of the target's mean over the prompts."""
        return self.changes[target].mean(1)

    def mean_abs(self, target: str) -> torch.Tensor:
        """``[n]`` per-prompt ``|change|``, averaged over the prompts."""
        return self.changes[target].abs().mean(1)


def prompt_targets(logits: torch.Tensor, prepared: PreparedTask) -> dict[str, torch.Tensor]:
    """Per prompt, the logit difference and the correct token's logit (float64) from ``[N, V]`` logits."""
    rows = torch.arange(logits.shape[0])
    correct = logits[rows, prepared.correct].double()
    if prepared.wrong is None:
        raise ValueError("the evaluation task needs a wrong token per prompt (the logit difference)")
    return {"logit_diff": correct - logits[rows, prepared.wrong].double(), "correct_logit": correct}


def single_neuron_mask(layout: Layout, fingerprint: ModelFingerprint, layer: int, unit: int) -> Mask:
    """The mask that prunes one neuron (``unit`` of block ``layer``)."""
    carrier = layout.carriers("neurons")[layer]
    return Mask(
        "neurons",
        fingerprint,
        layout,
        {carrier: torch.tensor([unit], dtype=torch.long)},
        {"attribution_fidelity": {"layer": layer, "unit": unit}},
    )


def single_neuron_effects(
    model: nn.Module,
    prepared: PreparedTask,
    ablation: Ablation,
    sample: NeuronSample,
    *,
    fingerprint: ModelFingerprint,
    clean: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> Effects:
    """Ablate each sampled neuron alone (``ablation``'s kind) and record the per-prompt change of each target.

    Args:
        model: The model.
        prepared: The evaluation prompts (for corrupted patching: the ones ``ablation`` was recorded on).
        ablation: How the neuron is replaced (:meth:`Ablation.record`; ``Ablation()`` is zero ablation).
        sample: The neurons.
        fingerprint: The model's fingerprint (the masks carry it; ``Scores.fingerprint``).
        clean: The unablated :func:`prompt_targets`, if already measured.
        progress: Show a progress bar.

    Returns:
        The :class:`Effects`.

    Example:
        >>> effects = single_neuron_effects(model, prepared, Ablation(), sample, fingerprint=fp)  # doctest: +SKIP
    """
    layout = Layout.of(resolve(model))
    clean = clean if clean is not None else prompt_targets(prepared.logits(model), prepared)
    rows: dict[str, list[torch.Tensor]] = {t: [] for t in TARGETS}
    neurons = zip(sample.layers.tolist(), sample.units.tolist())
    for layer, unit in tqdm(neurons, total=len(sample), desc=f"{ablation.kind} ablation", disable=not progress):
        with ablated(model, single_neuron_mask(layout, fingerprint, layer, unit), ablation):
            logits = prepared.logits(model, on_batch=ablation.at_batch)
        for target, value in prompt_targets(logits, prepared).items():
            rows[target].append(value - clean[target])
    return Effects(ablation.kind, {t: torch.stack(v) for t, v in rows.items()})


# -- statistics -------------------------------------------------------------------------------
def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, ties sharing their mean rank."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    before = torch.cumsum(counts, 0) - counts
    return (before + (counts + 1) / 2).double()[inverse]


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    scale = float(x.norm() * y.norm())
    return float((x * y).sum()) / scale if scale > 0 else float("nan")


def correlation(score: torch.Tensor, effect: torch.Tensor) -> dict[str, float | int]:
    """Spearman and Pearson correlation of two ``[n]`` vectors (``nan`` when one is constant or ``n < 3``).

    Example:
        >>> correlation(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 4.0, 9.0, 16.0]))["spearman"]
        1.0
    """
    n = int(score.numel())
    if n < 3:
        return {"spearman": float("nan"), "pearson": float("nan"), "n": n}
    return {"spearman": _pearson(_ranks(score), _ranks(effect)), "pearson": _pearson(score, effect), "n": n}


def layer_groups(num_layers: int, groups: int = LAYER_GROUPS) -> list[tuple[int, int]]:
    """``groups`` runs of consecutive layers, first and last layer each (inclusive).

    Example:
        >>> layer_groups(30)
        [(0, 9), (10, 19), (20, 29)]
    """
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(groups) if bounds[i + 1] > bounds[i]]


def _subsets(sample: NeuronSample, num_layers: int) -> dict[str, torch.Tensor]:
    """Boolean ``[n]`` selections the correlations are reported over."""
    subsets = {"all": torch.ones(len(sample), dtype=torch.bool)}
    subsets["uniform"] = torch.tensor([s == "uniform" for s in sample.strata])
    for first, last in layer_groups(num_layers):
        subsets[f"layers {first}-{last}"] = (sample.layers >= first) & (sample.layers <= last)
    return subsets


# -- the measurement --------------------------------------------------------------------------
@dataclass
class FidelityReport:
    """Everything :func:`measure_fidelity` measured.

    Attributes:
        settings: Options, sizes and seconds per stage.
        baseline: The unablated model on the evaluation prompts (mean logit difference, mean correct
            logit, accuracy).
        sample: The sampled neurons.
        scores: Scorer -> aggregation -> ``[n]`` scores at the sampled neurons.
        effects: Ablation kind -> its :class:`Effects`.
        correlations: Scorer -> aggregation -> kind -> target -> subset -> ``{"spearman", "pearson", "n"}``.
        cumulative: Scorer -> one record per pruned fraction (zero ablation).
    """

    settings: dict[str, Any]
    baseline: dict[str, float]
    sample: NeuronSample
    scores: dict[str, dict[str, torch.Tensor]]
    effects: dict[str, Effects]
    correlations: dict[str, Any]
    cumulative: dict[str, list[dict[str, Any]]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON report."""
        return {
            "settings": self.settings,
            "baseline": self.baseline,
            "sample": self.sample.to_dict(),
            "scores": {s: {a: v.tolist() for a, v in per.items()} for s, per in self.scores.items()},
            "effects": {
                kind: {
                    target: {"mean": e.mean(target).tolist(), "mean_abs": e.mean_abs(target).tolist()}
                    for target in TARGETS
                }
                for kind, e in self.effects.items()
            },
            "correlations": self.correlations,
            "cumulative": self.cumulative,
        }

    def table(self) -> str:
        """Spearman (Pearson) over all sampled neurons, per scorer x aggregation (rows) and ablation kind."""
        kinds = list(self.effects)
        lines = []
        for target in TARGETS:
            lines.append(f"-- vs the change of the {target} (signed: score vs -mean Δ; abs: score vs mean |Δ|)")
            lines.append(f"{'scorer':<11} {'agg':<7}" + "".join(f"{k:>20}" for k in kinds))
            for scorer, per in self.correlations.items():
                for aggregation, by_kind in per.items():
                    cells = []
                    for kind in kinds:
                        c = by_kind[kind][target]["all"]
                        cells.append(f"{c['spearman']:>+10.3f} ({c['pearson']:+.2f})")
                    lines.append(f"{scorer:<11} {aggregation:<7}" + "".join(f"{c:>20}" for c in cells))
        lines.append("-- cumulative (zero ablation of the lowest-abs-score neurons): real Δ logit diff / -Σ taylor")
        for scorer, records in self.cumulative.items():
            cells = [
                f"{100 * r['fraction']:.0f}%: {r['real_change']:+.3f} / {r['predicted_taylor']:+.3f}" for r in records
            ]
            lines.append(f"{scorer:<11} " + "   ".join(cells))
        return "\n".join(lines)


def _score_all(
    model: nn.Module,
    tokenizer: Any,
    reference: NextTokenTask,
    objective: TaskObjective,
    batch_size: int,
    seconds: dict[str, float],
    progress: bool,
) -> dict[str, dict[str, Scores]]:
    """Every scorer's scores of all MLP neurons on the reference prompts (and the Taylor reference)."""
    scores: dict[str, dict[str, Scores]] = {}
    runs = [(s, a) for s in RELEVANCE_SCORERS for a in ("abs", "signed")] + [("activation", "abs")]
    for scorer, aggregation in tqdm(runs, desc="scores", disable=not progress):
        clock = time.perf_counter()
        scores.setdefault(scorer, {})[aggregation] = task_scores(
            model,
            tokenizer,
            reference,
            objective=objective,
            granularity="neurons",
            aggregation=aggregation,
            batch_size=batch_size,
            progress=False,
            method=SCORERS[scorer]["method"],
            variant=SCORERS[scorer].get("variant", "attnlrp"),
        )
        seconds[f"scores {scorer} {aggregation}"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if objective == "logit_diff":
        scores[TAYLOR] = {"signed": scores["gradient"]["signed"]}
    else:
        taylor = task_scores(
            model,
            tokenizer,
            reference,
            method="gradient",
            objective="logit_diff",
            granularity="neurons",
            aggregation="signed",
            batch_size=batch_size,
            progress=False,
        )
        scores[TAYLOR] = {"signed": taylor}
    seconds[f"scores {TAYLOR} signed"] = time.perf_counter() - clock
    return scores


def _correlations(
    values: dict[str, dict[str, torch.Tensor]],
    effects: dict[str, Effects],
    subsets: dict[str, torch.Tensor],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scorer, per in values.items():
        for aggregation, score in per.items():
            cell = out.setdefault(scorer, {}).setdefault(aggregation, {})
            for kind, e in effects.items():
                for target in TARGETS:
                    # High score = keep: a neuron that supports the target loses it when ablated (-Δ > 0).
                    effect = -e.mean(target) if aggregation == "signed" else e.mean_abs(target)
                    cell.setdefault(kind, {})[target] = {
                        name: correlation(score[chosen], effect[chosen]) for name, chosen in subsets.items()
                    }
    return out


def _cumulative(
    model: nn.Module,
    tokenizer: Any,
    evaluation: NextTokenTask,
    scores: dict[str, dict[str, Scores]],
    fractions: Sequence[float],
    total: int,
    batch_size: int,
    progress: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Zero-ablate each scorer's lowest-abs-score neurons together, against the first-order predictions."""
    out: dict[str, list[dict[str, Any]]] = {}
    taylor = scores[TAYLOR]["signed"].neurons
    assert taylor is not None
    counts = [min(total - 1, max(1, round(f * total))) for f in fractions]
    for scorer in tqdm([s for s in scores if s != TAYLOR], desc="cumulative", disable=not progress):
        ranking = scores[scorer]["abs"]
        curve = pruning_curve(
            model, tokenizer, evaluation, ranking, counts=[0, *counts], batch_size=batch_size, progress=False
        )
        base = curve.baseline.get("logit_diff")
        by_count = {p.pruned: p for p in curve.points}
        own = scores[scorer].get("signed")
        records = []
        for fraction, count in zip(fractions, counts):
            pruned = _dense(select(ranking, "neurons", count, scope="global"), taylor.shape)
            own_sum = None if own is None or own.neurons is None else -float(own.neurons[pruned].double().sum())
            records.append(
                {
                    "fraction": fraction,
                    "pruned": count,
                    "logit_diff": by_count[count].metrics.get("logit_diff"),
                    "real_change": by_count[count].metrics.get("logit_diff") - base,
                    "relative": by_count[count].metrics.get("logit_diff") / base,
                    "predicted_taylor": -float(taylor[pruned].double().sum()),
                    "predicted_own_signed": own_sum,
                }
            )
        out[scorer] = records
    return out


def _dense(mask: Mask, shape: torch.Size) -> torch.Tensor:
    """A ``[num_layers, num_neurons]`` boolean of the neurons ``mask`` prunes."""
    dense = torch.zeros(shape, dtype=torch.bool)
    for layer, carrier in enumerate(mask.layout.carriers("neurons")):
        if carrier in mask.indices:
            dense[layer, mask.indices[carrier]] = True
    return dense


def measure_fidelity(
    model: nn.Module,
    tokenizer: Any,
    reference: NextTokenTask,
    evaluation: NextTokenTask,
    *,
    neurons: int = 120,
    top: int = 3,
    sample_seed: int = 0,
    kinds: Sequence[AblationKind] = ABLATIONS,
    objective: TaskObjective = "logit",
    fractions: Sequence[float] = (0.1, 0.25, 0.5),
    batch_size: int = 8,
    eval_batch_size: int = 64,
    progress: bool = True,
) -> FidelityReport:
    """Score every MLP neuron, ablate a sample of them one at a time, and correlate scores with real effects.

    Args:
        model: A supported causal LM.
        tokenizer: Its tokenizer (``None`` for token-id tasks).
        reference: Prompts to score on (and to take the means of mean ablation over).
        evaluation: Prompts to measure on, with wrong tokens (and corrupted prompts for ``"corrupted"``).
        neurons: Neurons in the layer-stratified uniform sample.
        top: Extra neurons per scorer: its highest abs scores not sampled yet.
        sample_seed: Seed of the sample.
        kinds: Ablation kinds to measure.
        objective: The relevance objective of ``lrp``, ``lrp_cp`` and ``gradient`` (``"logit"``: what the
            circuit search explains; ``"logit_diff"``: the search's metric, with ``abs`` one prompt per pass).
        fractions: Shares of all neurons zero-ablated together in the cumulative check.
        batch_size: Prompts per relevance pass.
        eval_batch_size: Prompts per evaluation forward pass.
        progress: Show progress bars.

    Returns:
        The :class:`FidelityReport` (``settings["seconds"]`` holds the seconds per stage).

    Raises:
        ValueError: ``neurons`` or ``top`` out of range, an unknown kind, or a fraction outside ``(0, 1)``.
        AblationError: ``"corrupted"`` and the evaluation prompts have no corrupted counterparts.

    Example:
        >>> sets = ioi_task(tok, 32, seed=0), ioi_task(tok, 32, seed=100)  # doctest: +SKIP
        >>> report = measure_fidelity(model, tok, *sets)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    unknown = [k for k in kinds if k not in ABLATIONS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {ABLATIONS}, got {list(kinds)}")
    if not fractions or not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), got {list(fractions)}")
    seconds: dict[str, float] = {}
    arch = resolve(model)
    num_layers, width = arch.num_layers, arch.num_neurons
    total = num_layers * width
    if not 1 <= neurons <= total:
        raise ValueError(f"neurons must be in [1, {total}] for this model, got {neurons}")

    all_scores = _score_all(model, tokenizer, reference, objective, batch_size, seconds, progress)
    clock = time.perf_counter()
    ranked_by = {s: per["abs"].neurons for s, per in all_scores.items() if "abs" in per}
    sample = sample_neurons(
        num_layers,
        width,
        neurons,
        seed=sample_seed,
        top=top,
        ranked_by={s: v for s, v in ranked_by.items() if v is not None},
    )
    values = {
        s: {a: sample.values(sc.neurons) for a, sc in per.items() if sc.neurons is not None}
        for s, per in all_scores.items()
    }
    fingerprint = all_scores["gradient"]["abs"].fingerprint

    prepared = PreparedTask(model, tokenizer, evaluation, batch_size=eval_batch_size)
    clean_logits = prepared.logits(model)
    clean = prompt_targets(clean_logits, prepared)
    baseline = {
        "logit_diff": float(clean["logit_diff"].mean()),
        "correct_logit": float(clean["correct_logit"].mean()),
        "accuracy": metrics_from_logits(clean_logits, prepared.correct, prepared.wrong).accuracy,
    }
    seconds["sample and clean run"] = time.perf_counter() - clock

    effects: dict[str, Effects] = {}
    for kind in kinds:
        clock = time.perf_counter()
        ablation = Ablation.record(
            kind, model, tokenizer, "neurons", reference=reference, evaluation=prepared, batch_size=eval_batch_size
        )
        seconds[f"record {kind}"] = time.perf_counter() - clock
        clock = time.perf_counter()
        effects[kind] = single_neuron_effects(
            model, prepared, ablation, sample, fingerprint=fingerprint, clean=clean, progress=progress
        )
        seconds[f"effects {kind}"] = time.perf_counter() - clock

    correlations = _correlations(values, effects, _subsets(sample, num_layers))
    clock = time.perf_counter()
    cumulative = _cumulative(model, tokenizer, evaluation, all_scores, fractions, total, eval_batch_size, progress)
    seconds["cumulative"] = time.perf_counter() - clock

    settings = {
        "model_type": getattr(getattr(arch.model, "config", None), "model_type", None),
        "num_layers": num_layers,
        "neurons_per_layer": width,
        "total_neurons": total,
        "reference": {"name": reference.name, "size": len(reference), **dict(reference.settings)},
        "evaluation": {"name": evaluation.name, "size": len(evaluation), **dict(evaluation.settings)},
        "sample": {"uniform": neurons, "top_per_scorer": top, "seed": sample_seed, "size": len(sample)},
        "scorers": {**SCORERS, TAYLOR: {"method": "gradient", "objective": "logit_diff", "aggregation": "signed"}},
        "objective": objective,
        "kinds": list(kinds),
        "targets": list(TARGETS),
        "layer_groups": layer_groups(num_layers),
        "fractions": list(fractions),
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "conventions": {
            "change": "ablated minus clean, per evaluation prompt",
            "signed": "signed score vs the loss -mean(change) (positive: the neuron supports the target)",
            "abs": "abs score vs the per-prompt mean |change|",
            "cumulative": "zero ablation of the lowest abs scores; predicted_taylor = -sum(taylor) over them",
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    return FidelityReport(settings, baseline, sample, values, effects, correlations, cumulative)


# -- the plot ---------------------------------------------------------------------------------
def plot(report: FidelityReport, path: Path) -> Path:
    """Scatter plots under zero (or the first measured) ablation and a bar chart of the Spearman correlations."""
    plt = pyplot()
    kind = "zero" if "zero" in report.effects else next(iter(report.effects))
    effects = report.effects[kind]
    scorers = list(report.scores)
    fig = plt.figure(figsize=(3.4 * len(scorers), 10))
    grid = fig.add_gridspec(3, len(scorers))
    groups = layer_groups(int(report.settings["num_layers"]))
    colours = torch.zeros(len(report.sample), dtype=torch.long)
    for i, (first, last) in enumerate(groups):
        colours[(report.sample.layers >= first) & (report.sample.layers <= last)] = i
    for row, aggregation in enumerate(("signed", "abs")):
        effect = -effects.mean("logit_diff") if aggregation == "signed" else effects.mean_abs("logit_diff")
        for col, scorer in enumerate(scorers):
            ax = fig.add_subplot(grid[row, col])
            score = report.scores[scorer].get(aggregation)
            if score is None:
                ax.axis("off")
                ax.set_title(f"{scorer}: no {aggregation} score", fontsize=9)
                continue
            for i, (first, last) in enumerate(groups):
                chosen = colours == i
                ax.scatter(
                    score[chosen].numpy(), effect[chosen].numpy(), s=8, color=f"C{i}", label=f"layers {first}-{last}"
                )
            for axis, data in (("x", score), ("y", effect)):
                scale = float(data.abs().max()) if data.numel() else 0.0
                if scale > 0:
                    getattr(ax, f"set_{axis}scale")("symlog", linthresh=max(scale * 1e-3, 1e-12))
            c = report.correlations[scorer][aggregation][kind]["logit_diff"]["all"]
            ax.set_title(f"{scorer} {aggregation}: ρ {c['spearman']:+.2f}, r {c['pearson']:+.2f}", fontsize=9)
            ax.set_xlabel("score", fontsize=8)
            ax.set_ylabel("-mean Δ logit diff" if aggregation == "signed" else "mean |Δ logit diff|", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[2, :])
    labels = [(s, a) for s in scorers for a in report.correlations[s]]
    width = 0.8 / len(report.effects)
    for i, k in enumerate(report.effects):
        heights = [report.correlations[s][a][k]["logit_diff"]["all"]["spearman"] for s, a in labels]
        ax.bar([j + i * width for j in range(len(labels))], heights, width=width, color=f"C{i}", label=f"{k} ablation")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], [f"{s}\n{a}" for s, a in labels], fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("Spearman ρ with the real Δ logit diff")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"single-neuron ablation vs score ({report.settings['model_type']}, {len(report.sample)} neurons, "
        f"{report.settings['evaluation']['size']} prompts; scatter: {kind} ablation)"
    )
    return save_figure(fig, path)


# -- the command ------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1), got {value}")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _even_size(text: str) -> int:
    value = _at_least(2)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"IOI sets are ABBA/BABA pairs: the size must be even, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    from hf_lrp_surgery.cli._common import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="attribution_fidelity.py",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--task-seed", type=_at_least(0), default=0, help="IOI seed S: reference seed S, evaluation 100+S (0)"
    )
    parser.add_argument("--size", type=_even_size, default=32, help="IOI prompts per reference and evaluation set (32)")
    parser.add_argument("--neurons", type=_at_least(1), default=120, help="layer-stratified random neurons (120)")
    parser.add_argument("--top", type=_at_least(0), default=3, help="extra highest-abs-score neurons per scorer (3)")
    parser.add_argument("--sample-seed", type=_at_least(0), default=0, help="seed of the neuron sample (0)")
    parser.add_argument(
        "--kinds", nargs="+", choices=ABLATIONS, default=list(ABLATIONS), help="ablation kinds (zero mean corrupted)"
    )
    parser.add_argument(
        "--objective",
        choices=("logit", "logit_diff"),
        default="logit",
        help="relevance objective of lrp/lrp_cp/gradient: the correct token's logit (what the circuit search "
        "explains) or the logit difference (abs: one prompt per pass, slower) (logit)",
    )
    parser.add_argument(
        "--fractions",
        nargs="+",
        type=_fraction,
        default=[0.1, 0.25, 0.5],
        help="cumulative check: shares of all neurons zero-ablated together (0.1 0.25 0.5)",
    )
    parser.add_argument("--eval-batch-size", type=_at_least(1), default=64, help="prompts per evaluation pass (64)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"output directory ({DEFAULT_OUTPUT})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report.json in --output")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output} is a file; give a directory")
    if (args.output / "report.json").exists() and not args.overwrite:
        parser.error(f"{args.output}/report.json exists; pass --overwrite to replace it")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement, print the table, write ``report.json`` and ``fidelity.png``."""
    from hf_lrp_surgery.cli._common import load

    args = parse_args(argv)
    started = time.perf_counter()
    try:
        clock = time.perf_counter()
        model, tokenizer = load(args)
        loaded = time.perf_counter() - clock
        clock = time.perf_counter()
        reference = ioi_task(tokenizer, args.size, seed=args.task_seed)
        evaluation = ioi_task(tokenizer, args.size, seed=100 + args.task_seed)
        tasks = time.perf_counter() - clock
        report = measure_fidelity(
            model,
            tokenizer,
            reference,
            evaluation,
            neurons=args.neurons,
            top=args.top,
            sample_seed=args.sample_seed,
            kinds=args.kinds,
            objective=args.objective,
            fractions=args.fractions,
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
            progress=not args.no_progress,
        )
    except (SurgeryError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report.settings.update(
        command="python " + shlex.join(sys.argv if argv is None else ["benchmarks/attribution_fidelity.py", *argv]),
        model=str(args.model),
        dtype=args.dtype,
        device=args.device,
        task_seed=args.task_seed,
        reference_seed=args.task_seed,
        evaluation_seed=100 + args.task_seed,
        torch_threads=torch.get_num_threads(),
    )
    report.settings["seconds"] = {"load": round(loaded, 2), "tasks": round(tasks, 2), **report.settings["seconds"]}
    report.settings["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(
        f"IOI on {args.model}: {len(report.sample)} neurons ablated one at a time on {args.size} prompts; "
        f"baseline logit diff {report.baseline['logit_diff']:.3f}, accuracy {report.baseline['accuracy']:.3f}"
    )
    print(report.table())
    args.output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output / "report.json", report.to_dict())
    plot(report, args.output / "fidelity.png")
    print(f"{report.settings['wall_seconds']:.0f} s; wrote {args.output}/report.json and fidelity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
