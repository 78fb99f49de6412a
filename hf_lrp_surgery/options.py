"""The options of scoring, contrast and selection, as frozen values validated when they are made.

:class:`ScoringOptions`, :class:`ContrastOptions` and :class:`SelectionOptions` are what
:class:`~hf_lrp_surgery.surgeon.Surgeon`, :func:`~hf_lrp_surgery.scoring.score`,
:func:`~hf_lrp_surgery.scoring.contrast`, the circuit search and the training callback take instead
of repeating the same keyword lists; each records itself with ``to_dict()``. Those functions still
accept the fields as keyword arguments: :meth:`ScoringOptions.take` (and its siblings) turns them
into options.

Example:
    >>> ContrastOptions(normalize="max").to_dict()
    {'normalize': 'max', 'protect_top': 0.05}
    >>> SelectionOptions.take(None, {"granularity": "heads", "scope": "per_layer"}).scope
    'per_layer'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

from hf_lrp_surgery.lrp.attach import VARIANT_FACTORS, Variant
from hf_lrp_surgery.lrp.collect import OBJECTIVES, WEIGHT_BUFFERS, Objective, WeightBuffers, renamed_seed
from hf_lrp_surgery.lrp.layout import GRANULARITIES, Granularity

if TYPE_CHECKING:  # a layer up: only for annotations
    from hf_lrp_surgery.masks.mask import Mask
    from hf_lrp_surgery.scoring.scores import Scores

__all__ = [
    "AGGREGATIONS",
    "NORMALIZATIONS",
    "SCOPES",
    "Aggregation",
    "ContrastOptions",
    "Normalization",
    "Scope",
    "ScoringOptions",
    "SelectionOptions",
    "check_aggregation",
    "reject_unknown",
]

Aggregation = Literal["signed", "abs"]
Normalization = Literal["none", "total", "max", "layer"]
#: How a budget is ranked: over the whole model, spread over layers (matrices for weights), or spread over
#: the output rows of every weight matrix (weights only).
Scope = Literal["global", "per_layer", "per_row"]
#: The values of :data:`Aggregation`, :data:`Normalization` and :data:`Scope` (for checks and CLI choices).
AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
NORMALIZATIONS: tuple[Normalization, ...] = get_args(Normalization)
SCOPES: tuple[Scope, ...] = get_args(Scope)

_Self = TypeVar("_Self", bound="_Options")


def check_aggregation(aggregation: str) -> None:
    """Raise ``ValueError`` unless ``aggregation`` is ``"signed"`` or ``"abs"``."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be 'signed' or 'abs', got {aggregation!r}")


def reject_unknown(keywords: dict[str, Any], where: str) -> None:
    """Raise ``TypeError`` naming the keywords that no options class took.

    Args:
        keywords: What is left of a function's ``**keywords`` after every ``take``.
        where: The function's name, for the message.

    Raises:
        TypeError: ``keywords`` is not empty.
    """
    if keywords:
        raise TypeError(f"{where}() got unexpected keyword arguments: {', '.join(sorted(keywords))}")


class _Options:
    """What the three options classes share: recording and building from keyword arguments."""

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-serialisable settings (tuples become lists)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def take(cls: type[_Self], options: _Self | None, keywords: dict[str, Any], **defaults: Any) -> _Self:
        """``options`` (or new options with ``defaults``) with the fields named in ``keywords`` replaced.

        The keys used are removed from ``keywords``, so that a function taking several options
        classes can hand the rest on and finally :func:`reject_unknown` what is left.

        Args:
            options: Options given by the caller, or ``None``.
            keywords: Keyword arguments given by the caller (changed in place).
            **defaults: Field values used when ``options`` is ``None``.

        Returns:
            The options (validated).

        Raises:
            ValueError: A value is out of range.
        """
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        chosen = {name: keywords.pop(name) for name in list(keywords) if name in names}
        base = options if options is not None else cls(**defaults)
        return replace(base, **chosen) if chosen else base  # type: ignore[type-var]


@dataclass(frozen=True)
class ScoringOptions(_Options):
    """How components are scored (see :func:`~hf_lrp_surgery.scoring.score`).

    Raises:
        ValueError: The method is not registered or cannot score one of the components, or another
            option is out of range.

    Example:
        >>> ScoringOptions(method="wanda", components=["heads", "heads"]).components
        ('heads',)
    """

    method: str = field(default="lrp", metadata={"help": "A registered scoring method (scoring.METHODS)."})
    components: tuple[Granularity, ...] = field(
        default=("neurons",), metadata={"help": "Component kinds to score: 'neurons', 'heads', 'weights'."}
    )
    aggregation: Aggregation = field(
        default="signed",
        metadata={"help": "Relevance methods: 'signed' mean relevance or 'abs' mean of per-sample |R|."},
    )
    objective: Objective = field(
        default="logit", metadata={"help": "Relevance methods: explain the target 'logit' or its 'logprob'."}
    )
    variant: Variant = field(default="attnlrp", metadata={"help": "lrp: 'attnlrp' or 'cp' rules."})
    epsilon: float = field(default=0.0, metadata={"help": "lrp: LRP-epsilon on the prunable linear layers."})
    batch_size: int = field(default=8, metadata={"help": "Samples per pass."})
    weight_buffers: WeightBuffers = field(
        default="float32",
        metadata={
            "help": "Relevance methods, weights: sum weight relevance in 'float32' or in the 'model' dtype "
            "(half the memory of a bf16 pass, bf16 rounding)."
        },
    )
    random_seed: int = field(default=0, metadata={"help": "random: seed of the generator."})

    def __post_init__(self) -> None:
        # The registry lives with the scorers, a layer up; imported here, when options are made, so
        # that every layer can import this module.
        from hf_lrp_surgery.scoring.registry import get_scorer

        entry = get_scorer(self.method)
        check_aggregation(self.aggregation)
        wanted = tuple(dict.fromkeys(self.components))
        if not wanted or set(wanted) - set(GRANULARITIES):
            raise ValueError(f"components must be a non-empty subset of {GRANULARITIES}, got {list(self.components)}")
        refused = [c for c in wanted if c not in entry.components]
        if refused:
            raise ValueError(
                f"the {self.method} method scores only {', '.join(entry.components)}, not {', '.join(refused)}; "
                f"choose components from {entry.components} or another method"
            )
        object.__setattr__(self, "components", wanted)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be 'logit' or 'logprob', got {self.objective!r}")
        if self.variant not in VARIANT_FACTORS:
            raise ValueError(f"variant must be one of {sorted(VARIANT_FACTORS)}, got {self.variant!r}")
        if not self.epsilon >= 0:  # NaN too
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_buffers not in WEIGHT_BUFFERS:
            raise ValueError(f"weight_buffers must be one of {WEIGHT_BUFFERS}, got {self.weight_buffers!r}")

    @classmethod
    def take(cls, options: ScoringOptions | None, keywords: dict[str, Any], **defaults: Any) -> ScoringOptions:
        """As :meth:`_Options.take`; a deprecated ``seed=`` keyword is taken as ``objective``."""
        if "seed" in keywords:
            keywords["objective"] = renamed_seed(keywords.pop("seed"), stacklevel=4)
        return super().take(options, keywords, **defaults)


@dataclass(frozen=True)
class ContrastOptions(_Options):
    """How two sets' scores are contrasted (see :func:`~hf_lrp_surgery.scoring.contrast`).

    Raises:
        ValueError: An option is out of range.
    """

    normalize: Normalization = field(
        default="total", metadata={"help": "Per-set scaling before the difference: 'none', 'total', 'max', 'layer'."}
    )
    protect_top: float = field(
        default=0.05,
        metadata={"help": "Fraction in [0, 1) of components with the largest general |score| never pruned."},
    )

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be 'none', 'total', 'max' or 'layer', got {self.normalize!r}")
        if not 0.0 <= self.protect_top < 1.0:
            raise ValueError(f"protect_top is a fraction in [0, 1), got {self.protect_top}")


@dataclass(frozen=True)
class SelectionOptions(_Options):
    """Which components a mask may take (see :func:`~hf_lrp_surgery.masks.select`); the budget is apart.

    Raises:
        ValueError: An option is out of range, or ``modules`` is given for neurons or heads.
    """

    granularity: Granularity = field(default="neurons", metadata={"help": "'neurons', 'heads' or 'weights'."})
    scope: Scope = field(
        default="global",
        metadata={
            "help": "'global' ranking, 'per_layer' budget shares, or 'per_row' shares (weights: each output row)."
        },
    )
    modules: tuple[str, ...] | str | None = field(
        default=None, metadata={"help": "Weights: module groups to restrict to ('mlp.*', 'fc1', ...)."}
    )
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "Decoder blocks to restrict to."})
    dampen: float | str | None = field(
        default=None,
        metadata={"help": "None: prune. A soft mask: 'relevance', 'constant:<alpha>' or alpha in [0, 1) (masks.soft)."},
    )

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be 'neurons', 'heads' or 'weights', got {self.granularity!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {self.scope!r}")
        if self.scope == "per_row" and self.granularity != "weights":
            raise ValueError("scope='per_row' spreads a weight budget over matrix rows; neurons and heads have none")
        if self.modules is not None and self.granularity != "weights":
            raise ValueError("modules= restricts weight masks; neuron and head masks live on fixed modules")
        if isinstance(self.modules, Sequence) and not isinstance(self.modules, str):
            object.__setattr__(self, "modules", tuple(self.modules))
        if self.layers is not None:
            if not isinstance(self.layers, Sequence) or isinstance(self.layers, str):
                raise ValueError(f"layers must be a sequence of decoder block indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.dampen is not None:
            # The rules live with the masks, a layer up: imported when options are made, as above.
            from hf_lrp_surgery.masks.soft import check_dampening

            check_dampening(self.dampen)

    def select(self, scores: Scores, budget: int | float) -> Mask:
        """The mask of the ``budget`` lowest-scoring components these options allow.

        Args:
            scores: What to select from (higher = keep).
            budget: A count, or a fraction of the eligible components.

        Returns:
            The :class:`~hf_lrp_surgery.masks.Mask` (see :func:`hf_lrp_surgery.masks.select`).

        Raises:
            BudgetError: The budget is not positive or exceeds the eligible components.
        """
        # Selection sits a layer up (masks import these options): imported when a mask is selected.
        from hf_lrp_surgery.masks.selection import select

        return select(
            scores,
            self.granularity,
            budget,
            scope=self.scope,
            modules=self.modules,
            layers=self.layers,
            dampen=self.dampen,
        )
