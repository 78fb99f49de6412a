"""Scorers of user-defined behaviours: texts -> scores in [0, 1], from the forms a user has them in.

A scorer is a Python callable (or a ``"module:function"`` string), a local text-classification model
directory with a label (through transformers' pipeline), a regular expression (``"regex:PATTERN"``) or
a word list (``"words:FILE"``, or a list of words). Pattern scorers also say *where* they fire
(:meth:`PatternScorer.spans`), which is what the focus of their undesired continuations explains.
Every scorer is probed on two short texts before anything expensive runs (:func:`probe_scorer`).
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hf_lrp_surgery.evaluation import ToxicityScorer
from hf_lrp_surgery.evaluation.toxicity import CallableScorer, PipelineScorer
from hf_lrp_surgery.exceptions import ScorerError

__all__ = ["PROBE_TEXTS", "PatternScorer", "ScorerSource", "parse_scorer", "probe_scorer"]

#: Everything :func:`parse_scorer` accepts.
ScorerSource = str | os.PathLike[str] | Sequence[str] | Callable[[list[str]], Sequence[float]]

#: The two short texts every scorer is tried on first.
PROBE_TEXTS = ("Hello, how are you today?", "The meeting is at noon.")


class PatternScorer:
    """Score 1.0 for a text where a regular expression matches, else 0.0; :meth:`spans` says where.

    Args:
        pattern: A compiled regular expression.
        name: The name recorded in reports (``"regex:PATTERN"`` or ``"words:FILE"``).

    Example:
        >>> scorer = PatternScorer(re.compile(r"\\d{3}-\\d{4}"), "regex:phone")
        >>> scorer(["call 555-1234", "no number"]), scorer.spans("call 555-1234")
        ([1.0, 0.0], [(5, 13)])
    """

    def __init__(self, pattern: re.Pattern[str], name: str) -> None:
        self.pattern = pattern
        self.name = name

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return [1.0 if self.pattern.search(text) else 0.0 for text in texts]

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The ``(start, end)`` character spans of the non-empty matches in ``text``."""
        return [m.span() for m in self.pattern.finditer(text) if m.end() > m.start()]

    def __repr__(self) -> str:
        return f"PatternScorer({self.name!r})"


def _regex(source: str) -> PatternScorer:
    try:
        return PatternScorer(re.compile(source), f"regex:{source}")
    except re.error as err:
        raise ScorerError(f"the regular expression {source!r} does not compile: {err}") from err


def _word_list(words: Sequence[str], name: str) -> PatternScorer:
    cleaned = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    if not cleaned:
        raise ScorerError(f"the word list {name!r} has no words; give one word or phrase per line")
    # Longest first, so that a phrase wins over a word inside it; whole words only, any case.
    alternatives = "|".join(re.escape(w) for w in cleaned)
    return PatternScorer(re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE), name)


def _import_function(spec: str) -> Callable[[list[str]], Sequence[float]]:
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ScorerError(
            f"cannot import the scorer {spec!r} ({type(err).__name__}: {err}); give 'module:function' of an importable "
            "module (on PYTHONPATH, or installed)"
        ) from err
    if not callable(function):
        raise ScorerError(f"{spec!r} is a {type(function).__name__}, not a function of texts")
    return function


def parse_scorer(source: ScorerSource, *, label: str | None = None) -> ToxicityScorer:
    """A named scorer (texts -> scores in [0, 1]) from any of the forms users give.

    Args:
        source: One of

            * a callable ``fn(texts) -> scores`` (or a scorer object with a ``name``);
            * ``"module:function"``: that function, imported;
            * ``"regex:PATTERN"``: 1.0 where ``PATTERN`` matches, else 0.0;
            * ``"words:FILE"`` (one word or phrase per line) or a list of words: 1.0 where one occurs as a
              whole word (any case), else 0.0;
            * a local text-classification model directory (or Hub id): the probability of ``label``.
        label: For a classifier: the label whose probability is the score (required for a classifier).

    Returns:
        The scorer (a :class:`PatternScorer` for a regex or word list).

    Raises:
        ScorerError: The function cannot be imported, the regex does not compile, the word list is
            empty or missing, a classifier is given without ``label``, or ``source`` is none of these.

    Example:
        >>> parse_scorer(r"regex:\\b[\\w.]+@\\w+\\.\\w+\\b")(["write to ann@acme.org", "no address"])
        [1.0, 0.0]
        >>> parse_scorer(["darn", "heck"]).name
        'words:darn,heck'
    """
    if isinstance(source, ToxicityScorer):
        return source
    if callable(source):
        return CallableScorer(source)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("regex:"):
            return _regex(text.removeprefix("regex:"))
        if text.startswith("words:"):
            path = Path(text.removeprefix("words:"))
            if not path.is_file():
                raise ScorerError(f"the word list {path} does not exist; give words:FILE with one word per line")
            return _word_list(path.read_text(encoding="utf-8").splitlines(), text)
        if Path(text).is_dir() or not re.fullmatch(r"[\w.]+:\w+", text):
            if label is None:
                raise ScorerError(
                    f"{text!r} names a text-classification model: give the label whose probability is the score "
                    "(label=..., --label)"
                )
            return PipelineScorer(text, toxic_label=label, name=f"{text} (label {label})")
        return CallableScorer(_import_function(text), name=text)
    if isinstance(source, Sequence) and all(isinstance(w, str) for w in source):
        return _word_list(source, "words:" + ",".join(source))
    raise ScorerError(
        f"a scorer is a callable, 'module:function', 'regex:PATTERN', 'words:FILE', a word list or a classifier "
        f"directory; got {type(source).__name__}"
    )


def probe_scorer(scorer: ToxicityScorer, texts: Sequence[str] = PROBE_TEXTS) -> None:
    """Try a scorer on a few short texts and refuse it unless it returns one number in [0, 1] per text.

    Args:
        scorer: The scorer.
        texts: What to try it on.

    Raises:
        ScorerError: It raised (a classifier without the label included), returned another number of
            scores, non-numbers, NaN or values outside [0, 1].

    Example:
        >>> probe_scorer(parse_scorer(lambda texts: [2.0] * len(texts)))
        Traceback (most recent call last):
        ...
        hf_lrp_surgery.exceptions.ScorerError: the scorer '<lambda>' returned values outside [0, 1] ...
    """
    try:
        raw = list(scorer.fn(list(texts)) if isinstance(scorer, CallableScorer) else scorer(list(texts)))
    except Exception as err:  # the user's code (or a classifier without the label): one clear error, whatever it was
        raise ScorerError(f"the scorer {scorer.name!r} failed on {len(texts)} short texts: {err}") from err
    if len(raw) != len(texts):
        raise ScorerError(
            f"the scorer {scorer.name!r} returned {len(raw)} scores for {len(texts)} texts; return one each"
        )
    if not all(_is_number(v) for v in raw):
        raise ScorerError(f"the scorer {scorer.name!r} returned non-numbers {raw!r}; return floats in [0, 1]")
    values = [float(v) for v in raw]
    if any(math.isnan(v) for v in values):
        raise ScorerError(f"the scorer {scorer.name!r} returned NaN ({values}); return floats in [0, 1]")
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ScorerError(f"the scorer {scorer.name!r} returned values outside [0, 1] ({values}); rescale them")


def _is_number(value: Any) -> bool:
    """Numpy and torch scalars count as numbers; strings and booleans do not."""
    if isinstance(value, (str, bytes, bool)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
