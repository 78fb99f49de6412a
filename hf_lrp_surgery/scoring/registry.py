"""The scorer registry and :func:`score`, the one entry point that dispatches through it.

A scoring method is a function from a :class:`ScoringRequest` to :class:`~hf_lrp_surgery.scoring.scores.Scores`
plus one :func:`register_scorer` entry; the method lists (``METHODS``, ``SAMPLE_FREE_METHODS``,
``CIRCUIT_METHODS``) are read from this table.

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
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, resolve
from hf_lrp_surgery.lrp.layout import Layout
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
        samples: The reference samples (empty for methods that need none).
        tokenizer: Encodes text samples.
        options: The validated options (``options.components`` is what to fill).
        progress: Show progress bars.
        description: The progress bar's label.
    """

    model: nn.Module
    arch: ResolvedArchitecture
    layout: Layout
    samples: list[ReferenceSample]
    tokenizer: Any
    options: ScoringOptions
    progress: bool
    description: str

    def new_scores(self, settings: dict[str, Any]) -> Scores:
        """Empty scores of this model and method, to be filled by the scorer."""
        return Scores(
            method=self.options.method,
            settings=settings,
            fingerprint=fingerprint(self.model),
            layout=self.layout,
            num_samples=len(self.samples),
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
    """

    name: str
    fn: Scorer
    description: str
    needs_samples: bool = True
    relevance_options: bool = False
    in_comparison: bool = False


_REGISTRY: dict[str, ScorerEntry] = {}


def register_scorer(
    name: str,
    fn: _ScorerT | None = None,
    *,
    description: str,
    needs_samples: bool = True,
    relevance_options: bool = False,
    in_comparison: bool = False,
) -> Any:
    """Register a scoring method; usable as ``register_scorer(name, fn, ...)`` or as a decorator.

    Args:
        name: The method name.
        fn: The scorer; omitted when used as a decorator.
        description: One line saying what the score is.
        needs_samples: Whether the scorer reads reference samples.
        relevance_options: Whether it reads the relevance options.
        in_comparison: Whether it belongs to the default comparison set.

    Returns:
        ``fn`` (or, as a decorator, a function that registers and returns it).

    Raises:
        ValueError: ``name`` is already registered.

    Example:
        >>> zeros = register_scorer("zeros", lambda request: request.new_scores({}), description="nothing")
        >>> get_scorer("zeros").needs_samples
        True
        >>> unregister_scorer("zeros")
    """

    def add(function: _ScorerT) -> _ScorerT:
        if name in _REGISTRY:
            raise ValueError(f"a scorer named {name!r} is already registered; unregister_scorer({name!r}) first")
        _REGISTRY[name] = ScorerEntry(name, function, description, needs_samples, relevance_options, in_comparison)
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


def registered_methods(*, needs_samples: bool | None = None, in_comparison: bool | None = None) -> tuple[str, ...]:
    """Registered method names in registration order, optionally filtered by their metadata."""
    return tuple(
        e.name
        for e in _REGISTRY.values()
        if (needs_samples is None or e.needs_samples == needs_samples)
        and (in_comparison is None or e.in_comparison == in_comparison)
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
        ReferenceSetError: A method that needs samples got none, or a sample has nothing to explain.
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
    arch = resolve(model)
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
