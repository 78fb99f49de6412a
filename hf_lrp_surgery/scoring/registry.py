"""The scorer registry and :func:`score`, the one entry point that dispatches through it.

A scoring method is a function from a :class:`ScoringRequest` to :class:`~hf_lrp_surgery.scoring.scores.Scores`
plus one :func:`register_scorer` entry; the method lists (``METHODS``, ``SAMPLE_FREE_METHODS``,
``CIRCUIT_METHODS``, ``PAIRED_METHODS``) are read from this table.

Most methods score one reference set (:func:`score`), and two sets are compared afterwards with
:func:`~hf_lrp_surgery.scoring.contrast`. A *paired* method (``register_scorer(..., paired=True)``:
AurA, repetition neurons, attribution patching) reads the undesired and the general set together and
is its own contrast: :func:`score_pair` (and ``Surgeon.contrast``, which dispatches to it) runs it,
and :func:`score` refuses it.

Example:
    >>> @register_scorer("nothing", description="scores no component", needs_samples=False)
    ... def nothing(request):
    ...     return request.new_scores({"method": "nothing"})
    >>> "nothing" in registered_methods(needs_samples=False)
    True
    >>> unregister_scorer("nothing")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from hf_lrp_surgery.exceptions import ReferenceSetError, UnsupportedArchitectureError
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, resolve
from hf_lrp_surgery.lrp.layout import GRANULARITIES, Granularity, Layout
from hf_lrp_surgery.options import ScoringOptions, reject_unknown
from hf_lrp_surgery.references.samples import ReferenceSample, SampleLike, as_samples
from hf_lrp_surgery.scoring.scores import Scores

__all__ = [
    "Method",
    "ScorerEntry",
    "ScoringRequest",
    "get_scorer",
    "register_scorer",
    "registered_methods",
    "score",
    "score_pair",
    "unregister_scorer",
]

#: The name of a registered scoring method (checked against the registry when options are made).
Method = str


@dataclass(frozen=True)
class ScoringRequest:
    """Everything a scorer reads: the model, the reference samples and the options.

    Attributes:
        model: The model to score.
        arch: Its resolved architecture.
        layout: Its layout.
        samples: The reference samples (empty for methods that need none); for a paired method, the
            undesired set.
        tokenizer: Encodes text samples.
        options: The validated options (``options.components`` is what to fill).
        progress: Show progress bars.
        description: The progress bar's label.
        general_samples: For a paired method, the general (desired) set; empty otherwise.
    """

    model: nn.Module
    arch: ResolvedArchitecture
    layout: Layout
    samples: list[ReferenceSample]
    tokenizer: Any
    options: ScoringOptions
    progress: bool
    description: str
    general_samples: list[ReferenceSample] = field(default_factory=list)

    def new_scores(self, settings: dict[str, Any]) -> Scores:
        """Empty scores of this model and method, to be filled by the scorer (samples of both sets counted)."""
        return Scores(
            method=self.options.method,
            settings=settings,
            fingerprint=fingerprint(self.model),
            layout=self.layout,
            num_samples=len(self.samples) + len(self.general_samples),
        )


Scorer = Callable[[ScoringRequest], Scores]
_ScorerT = TypeVar("_ScorerT", bound=Scorer)


@dataclass(frozen=True)
class ScorerEntry:
    """One registered scoring method.

    Attributes:
        name: The method name (``method=`` of :func:`score`).
        fn: Computes the scores.
        description: One line for listings and help texts.
        needs_samples: Reads reference samples (``False``: weights only, or nothing).
        relevance_options: Reads ``aggregation``, ``objective``, ``variant`` and ``epsilon``.
        in_comparison: In the default set of methods compared with each other (``CIRCUIT_METHODS``).
        paired: Reads an undesired and a general set together (``request.samples`` and
            ``request.general_samples``); run by :func:`score_pair`, refused by :func:`score`.
        components: The component kinds it can score (others are refused when options are made).
        moe_experts: Scores the expert neurons of a mixture-of-experts MLP (unit ``e * I + i``); a method
            without it is refused on a MoE model's neurons before any pass.
    """

    name: str
    fn: Scorer
    description: str
    needs_samples: bool = True
    relevance_options: bool = False
    in_comparison: bool = False
    paired: bool = False
    components: tuple[Granularity, ...] = GRANULARITIES
    moe_experts: bool = False


_REGISTRY: dict[str, ScorerEntry] = {}


def register_scorer(
    name: str,
    fn: _ScorerT | None = None,
    *,
    description: str,
    needs_samples: bool = True,
    relevance_options: bool = False,
    in_comparison: bool = False,
    paired: bool = False,
    components: Iterable[Granularity] = GRANULARITIES,
    moe_experts: bool = False,
) -> Any:
    """Register a scoring method; usable as ``register_scorer(name, fn, ...)`` or as a decorator.

    Args:
        name: The method name.
        fn: The scorer; omitted when used as a decorator.
        description: One line saying what the score is.
        needs_samples: Whether the scorer reads reference samples.
        relevance_options: Whether it reads the relevance options.
        in_comparison: Whether it belongs to the default comparison set (circuit discovery scores one
            set, so a paired method cannot).
        paired: Whether it reads an undesired and a general set together (see :func:`score_pair`).
        components: The component kinds it can score.
        moe_experts: Whether it scores the expert neurons of mixture-of-experts MLPs.

    Returns:
        ``fn`` (or, as a decorator, a function that registers and returns it).

    Raises:
        ValueError: ``name`` is already registered; a paired method is sample-free or in the
            comparison set; ``components`` is empty or names an unknown kind.

    Example:
        >>> zeros = register_scorer("zeros", lambda request: request.new_scores({}), description="nothing")
        >>> get_scorer("zeros").needs_samples
        True
        >>> unregister_scorer("zeros")
    """

    kinds = tuple(dict.fromkeys(components))
    if not kinds or set(kinds) - set(GRANULARITIES):
        raise ValueError(f"components must be a non-empty subset of {GRANULARITIES}, got {list(kinds)}")
    if paired and (not needs_samples or in_comparison):
        raise ValueError(
            f"the paired method {name!r} reads two reference sets: it needs samples and cannot be in the "
            "one-set comparison (CIRCUIT_METHODS)"
        )

    def add(function: _ScorerT) -> _ScorerT:
        if name in _REGISTRY:
            raise ValueError(f"a scorer named {name!r} is already registered; unregister_scorer({name!r}) first")
        _REGISTRY[name] = ScorerEntry(
            name, function, description, needs_samples, relevance_options, in_comparison, paired, kinds, moe_experts
        )
        return function

    return add if fn is None else add(fn)


def unregister_scorer(name: str) -> None:
    """Remove a registered method.

    Raises:
        ValueError: ``name`` is not registered.
    """
    get_scorer(name)
    del _REGISTRY[name]


def get_scorer(name: str) -> ScorerEntry:
    """The registry entry of a method.

    Raises:
        ValueError: ``name`` is not registered (the message lists the methods that are).
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"method must be one of {registered_methods()}, got {name!r}")
    return entry


def registered_methods(
    *, needs_samples: bool | None = None, in_comparison: bool | None = None, paired: bool | None = None
) -> tuple[str, ...]:
    """Registered method names in registration order, optionally filtered by their metadata.

    Example:
        >>> "aura" in registered_methods(paired=True), "aura" in registered_methods(paired=False)
        (True, False)
    """
    return tuple(
        e.name
        for e in _REGISTRY.values()
        if (needs_samples is None or e.needs_samples == needs_samples)
        and (in_comparison is None or e.in_comparison == in_comparison)
        and (paired is None or e.paired == paired)
    )


def score(
    model: nn.Module,
    samples: Iterable[SampleLike] | None = None,
    tokenizer: Any = None,
    options: ScoringOptions | None = None,
    *,
    progress: bool = True,
    description: str | None = None,
    **keywords: Any,
) -> Scores:
    """Score the components of ``model`` with one method.

    Args:
        model: A supported causal LM (optionally PEFT-wrapped), without active dropout.
        samples: The reference set (see :func:`~hf_lrp_surgery.references.samples.as_samples`); not used by
            sample-free methods (``magnitude``, ``random``).
        tokenizer: Needed when samples are text.
        options: The :class:`~hf_lrp_surgery.options.ScoringOptions` (default: their defaults).
        progress: Show a progress bar.
        description: The progress bar's label.
        **keywords: Fields of :class:`~hf_lrp_surgery.options.ScoringOptions` (``method``,
            ``components``, ``aggregation``, ``objective``, ``variant``, ``epsilon``, ``batch_size``,
            ``random_seed``), replacing those of ``options``; ``seed`` is a deprecated name of ``objective``.

    Returns:
        The :class:`~hf_lrp_surgery.scoring.scores.Scores`.

    Raises:
        ValueError: An option is out of range, or the method is not registered.
        TypeError: A keyword is not an option.
        ReferenceSetError: A method that needs samples got none, or a sample has nothing to explain; or
            the method is paired (it needs an undesired and a general set: use :func:`score_pair` or
            ``Surgeon.contrast``).
        NonFiniteScoreError: A score came out NaN.
        UnsupportedArchitectureError: The model type is not supported.

    Example:
        >>> prompts = ["The capital of France is"]
        >>> lrp = score(model, prompts, tokenizer, components=("neurons", "heads"))  # doctest: +SKIP
        >>> wanda = score(model, prompts, tokenizer, ScoringOptions(method="wanda"))  # doctest: +SKIP
    """
    options = ScoringOptions.take(options, keywords)
    reject_unknown(keywords, "score")
    entry = get_scorer(options.method)
    if entry.paired:
        raise ReferenceSetError(_paired_message(options.method))
    arch = resolve(model)
    _check_architecture(entry, arch, options)
    sample_list = as_samples(samples if samples is not None else []) if entry.needs_samples else []
    if entry.needs_samples and not sample_list:
        raise ReferenceSetError(f"the {options.method} method needs reference samples; the reference set is empty")
    request = ScoringRequest(
        model=model,
        arch=arch,
        layout=Layout.of(arch),
        samples=sample_list,
        tokenizer=tokenizer,
        options=options,
        progress=progress,
        description=description or f"{options.method} scores",
    )
    result = entry.fn(request)
    result.check_finite()
    return result


def _check_architecture(entry: ScorerEntry, arch: ResolvedArchitecture, options: ScoringOptions) -> None:
    """Refuse, before any pass, components this model has no exact form of, or this method cannot read."""
    for component in options.components:
        arch.check_granularity(component)
    if "neurons" in options.components and arch.num_experts and not entry.moe_experts:
        methods = [m for m, e in _REGISTRY.items() if e.moe_experts]
        raise UnsupportedArchitectureError(
            f"the {entry.name} method does not score the expert neurons of {arch.spec.model_type}'s "
            f"mixture-of-experts MLPs; use one of {methods} for neurons, or score heads"
        )


def _paired_message(method: str) -> str:
    return (
        f"the {method} method needs reference samples of two behaviours, undesired and general, scored together; "
        f"use Surgeon.contrast(undesired=..., general=..., method={method!r}) or "
        "scoring.score_pair(model, undesired, general, ...)"
    )


def score_pair(
    model: nn.Module,
    undesired: Iterable[SampleLike],
    general: Iterable[SampleLike],
    tokenizer: Any = None,
    options: ScoringOptions | None = None,
    *,
    progress: bool = True,
    description: str | None = None,
    **keywords: Any,
) -> Scores:
    """Score the components of ``model`` with a paired method, which reads both sets together.

    A paired method is its own contrast: its scores already say which components the undesired
    behaviour uses (low = prune), so no :func:`~hf_lrp_surgery.scoring.contrast` follows.

    Args:
        model: A supported causal LM (optionally PEFT-wrapped), without active dropout.
        undesired: The reference set of the behaviour to remove (see
            :func:`~hf_lrp_surgery.references.samples.as_samples`).
        general: The reference set of the behaviour to keep (for the recipes: the model's desired
            continuations of the same prompts).
        tokenizer: Needed when samples are text.
        options: The :class:`~hf_lrp_surgery.options.ScoringOptions`; ``method`` must be paired
            (``scoring.PAIRED_METHODS``).
        progress: Show a progress bar.
        description: The progress bar's label.
        **keywords: Fields of :class:`~hf_lrp_surgery.options.ScoringOptions`, replacing those of ``options``.

    Returns:
        The :class:`~hf_lrp_surgery.scoring.scores.Scores` (``num_samples`` counts both sets).

    Raises:
        ValueError: An option is out of range, the method is not registered, or it is not paired.
        TypeError: A keyword is not an option.
        ReferenceSetError: A set is empty, or a sample has nothing to explain.
        NonFiniteScoreError: A score came out NaN.
        UnsupportedArchitectureError: The model type is not supported.

    Example:
        >>> scores = score_pair(model, toxic, neutral, tokenizer, method="aura")  # doctest: +SKIP
        >>> mask = select(scores, "neurons", 50)  # the 50 neurons of highest AUROC  # doctest: +SKIP
    """
    options = ScoringOptions.take(options, keywords)
    reject_unknown(keywords, "score_pair")
    entry = get_scorer(options.method)
    if not entry.paired:
        raise ValueError(
            f"the {options.method} method scores one reference set; use score() on each set and contrast(), or "
            f"Surgeon.contrast (paired methods: {registered_methods(paired=True)})"
        )
    sets = {"undesired": as_samples(undesired), "general": as_samples(general)}
    for name, samples in sets.items():
        if not samples:
            raise ReferenceSetError(f"the {options.method} method needs reference samples; the {name} set is empty")
    arch = resolve(model)
    _check_architecture(entry, arch, options)
    request = ScoringRequest(
        model=model,
        arch=arch,
        layout=Layout.of(arch),
        samples=sets["undesired"],
        tokenizer=tokenizer,
        options=options,
        progress=progress,
        description=description or f"{options.method} scores",
        general_samples=sets["general"],
    )
    result = entry.fn(request)
    result.check_finite()
    return result
