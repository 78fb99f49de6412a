"""Component scores: LRP relevance and the baselines it is compared with, behind one interface.

A :class:`Scores` value holds, for MLP neurons, attention heads and/or individual weights, one
number per component that says how much the model needs it: **higher means keep, the lowest are
pruned**. Every method produces the same value, so every mask can be compared with baselines:

========== ==================================================================================
lrp        AttnLRP relevance (Achtibat et al., 2024) of the reference set (Hatefi et al., 2025)
gradient   gradient x activation (neurons, heads) / gradient x weight (weights), no LRP rules
activation mean |a| of a neuron, mean L2 norm of a head's output, mean |x_j| of a weight's input
wanda      |W_ij| * RMS(x_j) (Sun et al., "A Simple and Effective Pruning Approach for LLMs",
           2023); neurons: RMS(a_i) * ||W_out[:, i]||, heads: RMS(head output) * ||W_o[:, head]||
magnitude  |W_ij|; neurons ||W_out[:, i]||; heads ||W_o[:, head]|| (no samples)
random     uniform(0, 1) from a seeded generator (no samples)
========== ==================================================================================

:func:`contrast` turns the scores of a general and an undesired reference set into the paper's
differential score ``R_general - R_undesired`` (low = responsible for the undesired behaviour and
unimportant in general), with per-set normalisation and protection of components the general
behaviour needs most.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.exceptions import FingerprintMismatchError, NonFiniteScoreError, ReferenceSetError
from hf_lrp_surgery.fingerprint import ModelFingerprint, fingerprint
from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, resolve
from hf_lrp_surgery.lrp.attach import Variant
from hf_lrp_surgery.lrp.collect import SeedMode, collect_relevance
from hf_lrp_surgery.lrp.layout import GRANULARITIES, Granularity, Layout
from hf_lrp_surgery.lrp.result import RelevanceResult
from hf_lrp_surgery.references.samples import SampleLike, as_samples, encode_sample, make_batch, pad_token_id

__all__ = [
    "Aggregation",
    "Layout",
    "METHODS",
    "Method",
    "Normalization",
    "SAMPLE_FREE_METHODS",
    "Scores",
    "contrast",
    "score",
]

Method = Literal["lrp", "gradient", "activation", "wanda", "magnitude", "random"]
Aggregation = Literal["signed", "abs"]
Normalization = Literal["none", "total", "max", "layer"]
#: Every scoring method.
METHODS: tuple[str, ...] = ("lrp", "gradient", "activation", "wanda", "magnitude", "random")
#: Methods that read only the weights (or nothing): they take no reference samples.
SAMPLE_FREE_METHODS: tuple[str, ...] = ("magnitude", "random")
_TENSORS_FILE = "scores.safetensors"
_META_FILE = "scores.json"
_FORMAT_VERSION = 1


@dataclass
class Scores:
    """One score per component (higher = keep); what masks are selected from.

    Attributes:
        method: The scoring method (one of :data:`METHODS`, or ``"contrast"``).
        settings: How the scores were computed (enough to reproduce them).
        fingerprint: The model they were computed on.
        layout: Where the components live in that model.
        num_samples: Reference samples behind the scores (0 for sample-free methods).
        neurons: ``[num_layers, num_neurons]`` or ``None``.
        heads: ``[num_layers, num_heads]`` or ``None``.
        weights: Prunable module name -> a tensor of the weight's shape (empty if not scored).
    """

    method: str
    settings: dict[str, Any]
    fingerprint: ModelFingerprint
    layout: Layout
    num_samples: int = 0
    neurons: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def components(self) -> tuple[str, ...]:
        """The component kinds that were scored."""
        return tuple(c for c in GRANULARITIES if self._has(c))

    def _has(self, component: str) -> bool:
        return bool(self.weights) if component == "weights" else getattr(self, component) is not None

    def get(self, component: Granularity) -> torch.Tensor | dict[str, torch.Tensor]:
        """The scores of one component kind.

        Raises:
            KeyError: That kind was not scored (the message says how to score it).
        """
        if component not in GRANULARITIES:
            raise KeyError(f"component must be one of {GRANULARITIES}, got {component!r}")
        if not self._has(component):
            raise KeyError(
                f"these {self.method} scores hold no {component}; score with components including "
                f"{component!r} (scored: {list(self.components) or 'nothing'})"
            )
        return self.weights if component == "weights" else getattr(self, component)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteScoreError` if a score is NaN (``+inf`` marks protected components)."""
        tensors = [(c, getattr(self, c)) for c in ("neurons", "heads") if getattr(self, c) is not None]
        tensors += [(f"weights[{k}]", v) for k, v in self.weights.items()]
        bad = [name for name, t in tensors if bool(torch.isnan(t).any()) or bool(torch.isneginf(t).any())]
        if bad:
            raise NonFiniteScoreError(
                f"{self.method} scores are NaN or -inf in {', '.join(bad[:5])}; recompute them in float32 (the "
                "model or its activations overflowed) and check the model's weights with torch.isfinite"
            )

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Save as ``scores.safetensors`` + ``scores.json``, atomically.

        Args:
            directory: Destination directory (replaced if it exists).

        Returns:
            The directory.

        Example:
            >>> scores.save("runs/scores")  # doctest: +SKIP
            >>> Scores.load("runs/scores").method  # doctest: +SKIP
            'lrp'
        """
        tensors = {c: getattr(self, c) for c in ("neurons", "heads") if getattr(self, c) is not None}
        tensors.update({f"weights/{name}": value for name, value in self.weights.items()})
        meta = {
            "format_version": _FORMAT_VERSION,
            "hf_lrp_surgery_version": __version__,
            "method": self.method,
            "settings": self.settings,
            "fingerprint": self.fingerprint.to_dict(),
            "layout": self.layout.to_dict(),
            "num_samples": self.num_samples,
        }
        with atomic_directory(directory) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                str(tmp / _TENSORS_FILE),
                metadata={"format": "pt"},
            )
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Scores:
        """Load scores saved with :meth:`save`.

        Raises:
            FileNotFoundError: The directory does not hold saved scores.
        """
        directory = Path(directory)
        if not (directory / _META_FILE).is_file() or not (directory / _TENSORS_FILE).is_file():
            raise FileNotFoundError(f"{directory} does not hold saved scores ({_META_FILE} + {_TENSORS_FILE})")
        meta = json.loads((directory / _META_FILE).read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: unknown scores format version {meta.get('format_version')!r}")
        tensors = load_file(str(directory / _TENSORS_FILE))
        return cls(
            method=meta["method"],
            settings=meta["settings"],
            fingerprint=ModelFingerprint.from_dict(meta["fingerprint"]),
            layout=Layout.from_dict(meta["layout"]),
            num_samples=int(meta["num_samples"]),
            neurons=tensors.get("neurons"),
            heads=tensors.get("heads"),
            weights={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("weights/")},
        )

    @classmethod
    def from_relevance(cls, result: RelevanceResult, layout: Layout, *, aggregation: Aggregation = "signed") -> Scores:
        """Mean relevance per sample as scores.

        Args:
            result: LRP (or gradient) relevance of a reference set.
            layout: The model's layout (``Layout.of(resolve(model))``).
            aggregation: ``"signed"`` (mean relevance) or ``"abs"`` (mean of per-sample ``|R|``; for
                weights this needs ``per_sample_abs_weights=True`` at collection).

        Returns:
            The scores of every component kind the result holds.
        """
        _check_aggregation(aggregation)
        absolute = aggregation == "abs"
        scores = cls(
            method=str(result.settings.get("method", "lrp")),
            settings={**result.settings, "aggregation": aggregation},
            fingerprint=result.fingerprint,
            layout=layout,
            num_samples=result.num_samples,
        )
        for component in ("neurons", "heads"):
            if getattr(result, component) is not None:
                setattr(scores, component, result.mean(component, absolute=absolute))  # type: ignore[arg-type]
        if result.weights:
            scores.weights = result.mean("weights", absolute=absolute)  # type: ignore[assignment]
        return scores


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in ("signed", "abs"):
        raise ValueError(f"aggregation must be 'signed' or 'abs', got {aggregation!r}")


# -- scorers ----------------------------------------------------------------------------------
def score(
    model: nn.Module,
    samples: Iterable[SampleLike] | None = None,
    tokenizer: Any = None,
    *,
    method: Method = "lrp",
    components: Sequence[Granularity] = ("neurons",),
    aggregation: Aggregation = "signed",
    seed: SeedMode = "logit",
    variant: Variant = "attnlrp",
    epsilon: float = 0.0,
    batch_size: int = 8,
    random_seed: int = 0,
    progress: bool = True,
    description: str | None = None,
) -> Scores:
    """Score the components of ``model`` with one method.

    Args:
        model: A supported causal LM (optionally PEFT-wrapped), without active dropout.
        samples: The reference set (see :func:`~hf_lrp_surgery.references.samples.as_samples`); not used by
            ``magnitude`` and ``random``.
        tokenizer: Needed when samples are text.
        method: One of :data:`METHODS`.
        components: Any of ``"neurons"``, ``"heads"``, ``"weights"``.
        aggregation: For ``lrp`` and ``gradient``: ``"signed"`` mean relevance or ``"abs"`` mean of
            per-sample ``|R|``. The other methods are non-negative and ignore it.
        seed: For ``lrp`` and ``gradient``: explain the target ``"logit"`` or its ``"logprob"``.
        variant: For ``lrp``: ``"attnlrp"`` or ``"cp"``.
        epsilon: For ``lrp``: LRP-epsilon on the prunable linear layers.
        batch_size: Samples per pass.
        random_seed: For ``random``.
        progress: Show a progress bar.
        description: The progress bar's label.

    Returns:
        The :class:`Scores`.

    Raises:
        ReferenceSetError: A method that needs samples got none, or a sample has nothing to explain.
        NonFiniteScoreError: A score came out NaN.
        UnsupportedArchitectureError: The model type is not supported.

    Example:
        >>> prompts = ["The capital of France is"]
        >>> lrp = score(model, prompts, tokenizer, components=("neurons", "heads"))  # doctest: +SKIP
        >>> wanda = score(model, ["The capital of France is"], tokenizer, method="wanda")  # doctest: +SKIP
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_aggregation(aggregation)
    wanted = tuple(dict.fromkeys(components))
    if not wanted or set(wanted) - set(GRANULARITIES):
        raise ValueError(f"components must be a non-empty subset of {GRANULARITIES}, got {list(components)}")
    arch = resolve(model)
    layout = Layout.of(arch)
    label = description or f"{method} scores"
    if method in SAMPLE_FREE_METHODS:
        return _sample_free(
            arch,
            method,
            wanted,
            random_seed,
            Scores(
                method=method,
                settings={"method": method, "components": list(wanted)},
                fingerprint=fingerprint(model),
                layout=layout,
            ),
        )
    sample_list = as_samples(samples if samples is not None else [])
    if not sample_list:
        raise ReferenceSetError(f"the {method} method needs reference samples; the reference set is empty")
    if method in ("lrp", "gradient"):
        relevance = collect_relevance(
            model,
            sample_list,
            tokenizer,
            components=wanted,
            variant="gradient" if method == "gradient" else variant,
            epsilon=0.0 if method == "gradient" else epsilon,
            seed=seed,
            batch_size=batch_size,
            per_sample_abs_weights=aggregation == "abs" and "weights" in wanted,
            progress=progress,
            description=label,
        )
        result = Scores.from_relevance(relevance, layout, aggregation=aggregation)
    else:
        stats = _activation_statistics(model, arch, sample_list, tokenizer, wanted, batch_size, progress, label)
        result = _from_statistics(
            arch,
            stats,
            wanted,
            Scores(
                method=method,
                settings={"method": method, "components": list(wanted), "tokens": stats.tokens},
                fingerprint=fingerprint(model),
                layout=layout,
                num_samples=len(sample_list),
            ),
        )
    result.check_finite()
    return result


def _sample_free(
    arch: ResolvedArchitecture, method: str, components: tuple[str, ...], random_seed: int, scores: Scores
) -> Scores:
    """Fill ``scores`` with magnitude or seeded random scores."""
    if method == "random":
        generator = torch.Generator().manual_seed(random_seed)
        scores.settings["random_seed"] = random_seed
        if "neurons" in components:
            scores.neurons = torch.rand(arch.num_layers, arch.num_neurons, generator=generator)
        if "heads" in components:
            scores.heads = torch.rand(arch.num_layers, arch.num_heads, generator=generator)
        if "weights" in components:
            scores.weights = {p.name: torch.rand(p.weight.shape, generator=generator) for p in arch.prunable}
        return scores
    if "neurons" in components:
        scores.neurons = torch.stack([_unit_weight_norms(layer.mlp_out, arch, 1) for layer in arch.layers])
    if "heads" in components:
        scores.heads = torch.stack([_unit_weight_norms(layer.o_proj, arch, arch.num_heads) for layer in arch.layers])
    if "weights" in components:
        scores.weights = {p.name: p.weight.detach().float().abs().cpu() for p in arch.prunable}
    return scores


def _unit_weight_norms(module: nn.Module, arch: ResolvedArchitecture, groups: int) -> torch.Tensor:
    """L2 norm of the weights that read each input unit of ``module`` (one unit or one head per group)."""
    weight = getattr(module, "base_layer", module).weight.detach().float().cpu()
    per_input = weight if arch.spec.orientation == "conv1d" else weight.T  # [in, out]
    squares = per_input.pow(2).sum(1)
    if groups > 1:
        squares = squares.unflatten(0, (groups, -1)).sum(1)
    return squares.sqrt()


@dataclass
class _Statistics:
    tokens: int = 0
    neurons_abs: torch.Tensor | None = None  # [L, I] sum |a|
    neurons_sq: torch.Tensor | None = None  # [L, I] sum a^2
    heads_norm: torch.Tensor | None = None  # [L, H] sum ||head output||
    heads_sq: torch.Tensor | None = None  # [L, H] sum ||head output||^2
    inputs_abs: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [in] sum |x_j|
    inputs_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [in] sum x_j^2


def _activation_statistics(
    model: nn.Module,
    arch: ResolvedArchitecture,
    samples: list[Any],
    tokenizer: Any,
    components: tuple[str, ...],
    batch_size: int,
    progress: bool,
    description: str,
) -> _Statistics:
    """One forward pass over the reference set, summing |a| and a^2 of every scored input over real tokens."""
    encoded = [encode_sample(s, i, tokenizer, arch.max_positions) for i, s in enumerate(samples)]
    device = arch.token_embedding.weight.device
    L, heads = arch.num_layers, arch.num_heads
    stats = _Statistics()
    real: list[torch.Tensor] = []  # the current batch's flat mask of real tokens

    def accumulate(kind: str, key: Any, groups: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])[real[0]].double()
            if kind == "neurons":
                stats.neurons_abs[key] += x.abs().sum(0).cpu()  # type: ignore[index]
                stats.neurons_sq[key] += x.pow(2).sum(0).cpu()  # type: ignore[index]
            elif kind == "heads":
                norms_sq = x.unflatten(-1, (groups, -1)).pow(2).sum(-1)  # [tokens, H]
                stats.heads_norm[key] += norms_sq.sqrt().sum(0).cpu()  # type: ignore[index]
                stats.heads_sq[key] += norms_sq.sum(0).cpu()  # type: ignore[index]
            else:
                stats.inputs_abs[key] = stats.inputs_abs.get(key, 0) + x.abs().sum(0).cpu()
                stats.inputs_sq[key] = stats.inputs_sq.get(key, 0) + x.pow(2).sum(0).cpu()

        return hook

    handles = []
    if "neurons" in components:
        stats.neurons_abs = torch.zeros(L, arch.num_neurons, dtype=torch.float64)
        stats.neurons_sq = torch.zeros_like(stats.neurons_abs)
        handles += [
            layer.mlp_out.register_forward_pre_hook(accumulate("neurons", layer.index, 1)) for layer in arch.layers
        ]
    if "heads" in components:
        stats.heads_norm = torch.zeros(L, heads, dtype=torch.float64)
        stats.heads_sq = torch.zeros_like(stats.heads_norm)
        handles += [
            layer.o_proj.register_forward_pre_hook(accumulate("heads", layer.index, heads)) for layer in arch.layers
        ]
    if "weights" in components:
        handles += [p.module.register_forward_pre_hook(accumulate("weights", p.name, 1)) for p in arch.prunable]
    pad_id = pad_token_id(tokenizer, arch.model)
    try:
        with (
            torch.no_grad(),
            tqdm(total=len(encoded), desc=description, unit="sample", disable=not progress, leave=False) as bar,
        ):
            for start in range(0, len(encoded), batch_size):
                batch = make_batch(encoded[start : start + batch_size], pad_id, "right", device)
                real[:] = [batch.attention_mask.reshape(-1).bool()]
                stats.tokens += int(batch.attention_mask.sum())
                model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
                bar.update(batch.input_ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _from_statistics(
    arch: ResolvedArchitecture, stats: _Statistics, components: tuple[str, ...], scores: Scores
) -> Scores:
    """Fill ``scores`` with activation or Wanda-style scores from the summed statistics."""
    n = stats.tokens
    wanda = scores.method == "wanda"
    if "neurons" in components:
        if wanda:
            norms = torch.stack([_unit_weight_norms(layer.mlp_out, arch, 1) for layer in arch.layers]).double()
            scores.neurons = ((stats.neurons_sq / n).sqrt() * norms).float()  # type: ignore[operator]
        else:
            scores.neurons = (stats.neurons_abs / n).float()  # type: ignore[operator]
    if "heads" in components:
        if wanda:
            norms = torch.stack(
                [_unit_weight_norms(layer.o_proj, arch, arch.num_heads) for layer in arch.layers]
            ).double()
            scores.heads = ((stats.heads_sq / n).sqrt() * norms).float()  # type: ignore[operator]
        else:
            scores.heads = (stats.heads_norm / n).float()  # type: ignore[operator]
    if "weights" in components:
        for p in arch.prunable:
            rms = (stats.inputs_sq[p.name] / n).sqrt().float() if wanda else (stats.inputs_abs[p.name] / n).float()
            # Broadcast the per-input statistic over the weight's input axis.
            per_input = rms[:, None] if p.orientation == "conv1d" else rms[None, :]
            if wanda:
                scores.weights[p.name] = p.weight.detach().float().abs().cpu() * per_input
            else:
                scores.weights[p.name] = per_input.expand(p.weight.shape).clone()
    return scores


# -- contrast ---------------------------------------------------------------------------------
def _normalise(values: dict[str, torch.Tensor], how: Normalization) -> dict[str, torch.Tensor]:
    """Scale one set's scores of one component kind; ``values`` maps a row name to a tensor."""
    if how == "none":
        return values
    if how == "layer":
        return {k: v / v.abs().sum().clamp_min(torch.finfo(v.dtype).tiny) for k, v in values.items()}
    flat = torch.cat([v.flatten() for v in values.values()]).abs()
    scale = flat.sum() if how == "total" else flat.max()
    return {k: v / scale.clamp_min(torch.finfo(v.dtype).tiny) for k, v in values.items()}


def _rows(scores: Scores, component: str) -> dict[str, torch.Tensor]:
    value = scores.get(component)  # type: ignore[arg-type]
    if isinstance(value, dict):
        return {k: v.double() for k, v in value.items()}
    return {str(i): row.double() for i, row in enumerate(value)}


def contrast(
    general: Scores,
    undesired: Scores,
    *,
    normalize: Normalization = "total",
    protect_top: float = 0.05,
) -> Scores:
    """Differential scores ``R_general - R_undesired`` (Hatefi et al., 2025, Eq. for R_diff).

    Low scores mark components that the undesired behaviour uses and the general behaviour does
    not: :func:`~hf_lrp_surgery.masks.select` prunes the lowest.

    Args:
        general: Scores of the general (keep) reference set.
        undesired: Scores of the undesired reference set, same method, model and components.
        normalize: Per-set scaling before the difference, per component kind: ``"none"``,
            ``"total"`` (divide by the set's total ``|score|``; the default, because the two sets
            differ in size and length), ``"max"`` (by the largest ``|score|``) or ``"layer"`` (each
            layer, or each weight matrix, by its own total ``|score|``).
        protect_top: Fraction in ``[0, 1)`` of components with the largest general ``|score|`` that
            may never be pruned; they score ``+inf``. Default 0.05: on SmolLM2 an unprotected
            contrast picked neurons whose removal broke the model (see docs/correction.md).

    Returns:
        Scores with ``method="contrast"``; settings record both inputs and the options.

    Raises:
        FingerprintMismatchError: The inputs come from different models.
        ValueError: The inputs come from different methods, or hold different components; or an
            option is out of range.
        NonFiniteScoreError: An input holds NaN.
    """
    if normalize not in ("none", "total", "max", "layer"):
        raise ValueError(f"normalize must be 'none', 'total', 'max' or 'layer', got {normalize!r}")
    if not 0.0 <= protect_top < 1.0:
        raise ValueError(f"protect_top is a fraction in [0, 1), got {protect_top}")
    if general.fingerprint != undesired.fingerprint:
        raise FingerprintMismatchError(
            f"cannot contrast scores of different models ({general.fingerprint.short()} vs "
            f"{undesired.fingerprint.short()})"
        )
    if general.method != undesired.method:
        raise ValueError(
            f"cannot contrast {general.method} scores with {undesired.method} scores; score both "
            "sets with the same method"
        )
    if general.components != undesired.components:
        raise ValueError(
            f"the general set scored {list(general.components)} but the undesired set scored "
            f"{list(undesired.components)}; score both with the same components"
        )
    general.check_finite()
    undesired.check_finite()
    out = Scores(
        method="contrast",
        settings={
            "method": "contrast",
            "of": general.method,
            "normalize": normalize,
            "protect_top": protect_top,
            "general": general.settings,
            "undesired": undesired.settings,
            "general_samples": general.num_samples,
            "undesired_samples": undesired.num_samples,
        },
        fingerprint=general.fingerprint,
        layout=general.layout,
        num_samples=general.num_samples + undesired.num_samples,
    )
    for component in general.components:
        g, u = _normalise(_rows(general, component), normalize), _normalise(_rows(undesired, component), normalize)
        diff = {k: (g[k] - u[k]) for k in g}
        if protect_top > 0:
            flat = torch.cat([v.flatten() for v in g.values()]).abs()
            count = int(protect_top * flat.numel())
            # Exactly ``count`` components, ties broken by position (a threshold would also protect
            # every tie, e.g. all dead neurons at 0).
            protected = torch.zeros(flat.numel(), dtype=torch.bool)
            protected[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
            pieces = protected.split([v.numel() for v in g.values()])
            diff = {k: torch.where(piece.view_as(v), torch.inf, v) for (k, v), piece in zip(diff.items(), pieces)}
        if component == "weights":
            out.weights = {k: v.float() for k, v in diff.items()}
        else:
            setattr(out, component, torch.stack([diff[str(i)] for i in range(len(diff))]).float())
    return out
