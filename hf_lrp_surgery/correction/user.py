"""A behaviour from user parts: prompts that elicit it and a scorer that judges it.

:func:`user_behaviour` turns prompts (a file, a ``datasets`` object, a list, a shipped set's name, or
given splits) and a scorer (see :func:`~hf_lrp_surgery.correction.scorers.parse_scorer`) into a
:class:`~hf_lrp_surgery.correction.behaviours.Behaviour` that the recipe, ``Surgeon.correct``, the
``fix`` command and the Trainer callback correct like the shipped ones. The scorer is probed and the
prompts are split before anything expensive runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from hf_lrp_surgery.correction.behaviours import (
    CHAT_TEMPLATE_OPTION,
    Behaviour,
    BehaviourMetadata,
    CommandOption,
    Metric,
    register_behaviour,
    sampled,
)
from hf_lrp_surgery.correction.paired import leave_one_word_out_positions, matched_positions
from hf_lrp_surgery.correction.scorers import PatternScorer, ScorerSource, parse_scorer, probe_scorer
from hf_lrp_surgery.evaluation import DecodingSettings, Generation
from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.references import SHIPPED_SETS, ReferenceSource, load_reference_set, shipped_splits

__all__ = ["MIN_SPLIT_SIZE", "split_prompts", "user_behaviour"]

#: The fewest prompts each of the attribution, validation and held-out parts needs.
MIN_SPLIT_SIZE = 2
_DIRECTIONS = ("higher", "lower")

_USER = BehaviourMetadata(
    name="user",
    command="fix",
    tags=("behaviour-correction",),
    goal="reduce the continuations a user-defined scorer rates undesired",
    prompt_set="user prompts",
    metrics=(
        Metric("undesired_rate", "Undesired rate (the scorer's verdict at the threshold)", True, share=True),
        Metric("score_mean", "Mean score", True),
    ),
    primary="undesired_rate",
    summary="correct any behaviour you can score: your prompts and your scorer (callable, classifier, regex, words)",
    description="Sample continuations of your prompts (train split), judge them with your scorer, keep undesired and "
    "desired continuations of the same prompts, contrast their relevance at the tokens that make the scorer fire, "
    "search the budget on validation prompts under the KL and perplexity limits, save the corrected model, and "
    "report the behaviour before/after on the held-out prompts.",
    scorer="Scorer: {scorer}; a continuation is undesired when its score is {direction} than or equal to the "
    "threshold {threshold}.",
    options=(
        CommandOption("--prompts", "prompts", "prompts_source", None, "the prompts (see below)"),
        CommandOption("--scorer", "scorer", "scorer", None, "the scorer (see below)"),
        CommandOption("--name", "name", "name", "user", "the behaviour's name in the report and on the card (user)"),
        CommandOption("--label", "label", "label", None, "a classifier's label whose probability is the score"),
        CommandOption(
            "--threshold",
            "threshold",
            "threshold",
            0.5,
            "the score at which a continuation is undesired (0.5)",
            kind="float",
        ),
        CommandOption(
            "--direction",
            "direction",
            "direction",
            "higher",
            "higher (default): a high score is undesired; lower: a low score is",
        ),
        CHAT_TEMPLATE_OPTION,
    ),
)


def _texts(source: ReferenceSource) -> list[str]:
    samples = load_reference_set(source)
    texts = [s.prompt for s in samples]
    if not all(isinstance(t, str) for t in texts):
        raise ReferenceSetError("the prompts of a user behaviour are text; got token ids")
    return [str(t) for t in texts]


def _given_splits(source: Any) -> Mapping[str, Any] | None:
    """Splits the user gave: a mapping with ``train``/``heldout``, a shipped set's name, or such a JSON file."""
    if isinstance(source, Mapping) and "train" in source:
        return source
    if isinstance(source, str) and source in SHIPPED_SETS:
        return shipped_splits(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".json" and Path(source).is_file():
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None  # load_reference_set names the error
        if isinstance(data, dict) and "train" in data:
            return data
    return None


def split_prompts(
    source: ReferenceSource, *, heldout_share: float = 0.3, seed: int = 0, validation_share: float = 0.4
) -> dict[str, list[str]]:
    """The train and held-out prompts of a user behaviour.

    The recipe later splits ``train`` into its attribution and validation parts (``validation_share``),
    unless a ``"validation"`` split is given.

    Args:
        source: Prompts in any form :func:`~hf_lrp_surgery.references.load_reference_set` takes, split here
            (shuffled with ``random.Random(seed)``, the first ``heldout_share`` held out); or given splits:
            a mapping (or a ``.json`` file holding an object) with ``"train"`` and ``"heldout"`` (and
            optionally ``"validation"``) lists, or the name of a shipped set.
        heldout_share: Share of the prompts held out, in (0, 1).
        seed: The shuffle's seed.
        validation_share: The recipe's validation share of ``train`` (to check every part gets prompts).

    Returns:
        ``{"train": [...], "heldout": [...]}`` (plus ``"validation"`` when given).

    Raises:
        ReferenceSetError: The prompts cannot be read, a given split lacks ``heldout``, or there are too
            few prompts for :data:`MIN_SPLIT_SIZE` in every part.
        ValueError: ``heldout_share`` is not in (0, 1).

    Example:
        >>> splits = split_prompts([f"prompt {i}" for i in range(10)])
        >>> len(splits["train"]), len(splits["heldout"])
        (7, 3)
    """
    if not 0 < heldout_share < 1:
        raise ValueError(f"heldout_share must be in (0, 1), got {heldout_share!r}")
    given = _given_splits(source)
    if given is not None:
        if "heldout" not in given:
            raise ReferenceSetError(f"the given splits {sorted(given)} have no 'heldout' split; give train and heldout")
        splits = {name: _texts(given[name]) for name in ("train", "heldout", "validation") if name in given}
    else:
        texts = _texts(source)
        random.Random(seed).shuffle(texts)
        cut = round(len(texts) * heldout_share)
        splits = {"train": texts[cut:], "heldout": texts[:cut]}
    train = len(splits["train"])
    parts = {
        "held-out": len(splits["heldout"]),
        **(
            {"attribution": train, "validation": len(splits["validation"])}
            if "validation" in splits
            else {
                "attribution": round(train * (1 - validation_share)),
                "validation": train - round(train * (1 - validation_share)),
            }
        ),
    }
    short = {name: size for name, size in parts.items() if size < MIN_SPLIT_SIZE}
    if short:
        total = sum(len(v) for v in splits.values())
        raise ReferenceSetError(
            f"{total} prompts are too few to split: the {', '.join(f'{n} part gets {s}' for n, s in short.items())} "
            f"(at least {MIN_SPLIT_SIZE} each); give at least {_fewest(heldout_share, validation_share)} prompts"
        )
    return splits


def _fewest(heldout_share: float, validation_share: float) -> int:
    """The fewest prompts whose automatic split gives every part :data:`MIN_SPLIT_SIZE`."""
    n = 3 * MIN_SPLIT_SIZE
    while True:
        cut = round(n * heldout_share)
        train = n - cut
        attribution = round(train * (1 - validation_share))
        if min(cut, attribution, train - attribution) >= MIN_SPLIT_SIZE:
            return n
        n += 1


@register_behaviour(_USER)
def user_behaviour(
    prompts: ReferenceSource,
    scorer: ScorerSource,
    threshold: float = 0.5,
    direction: Literal["higher", "lower"] = "higher",
    label: str | None = None,
    name: str = "user",
    *,
    max_new_tokens: int = 48,
    samples: int = 8,
    use_chat_template: bool = True,
    heldout_share: float = 0.3,
    split_seed: int = 0,
) -> Behaviour:
    """A behaviour from your prompts and your scorer, correctable like the shipped ones.

    The scorer is probed on two short texts and the prompts are split before anything else runs.
    Continuations are judged at ``threshold``: with ``direction="higher"`` a continuation is undesired
    if its score is ``>= threshold`` and a desired reference if it is below half of it; with
    ``"lower"``, undesired if ``<= threshold`` and desired above the midpoint of ``threshold`` and 1.
    The undesired continuations are explained at the tokens of the matches (regex, word list) or at
    the words whose removal moves the score most (any other scorer; leave-one-word-out, one scorer
    call per continuation).

    Args:
        prompts: The prompts (see :func:`split_prompts`: a file, a ``datasets`` object, a list, given
            splits or a shipped set's name).
        scorer: Texts -> scores in [0, 1] (see :func:`~hf_lrp_surgery.correction.scorers.parse_scorer`:
            a callable, ``"module:function"``, ``"regex:PATTERN"``, ``"words:FILE"``, a word list, or a
            text-classification model directory with ``label``).
        threshold: Where the verdict changes, in [0, 1].
        direction: ``"higher"``: a high score is undesired; ``"lower"``: a low one is.
        label: A classifier's label whose probability is the score.
        name: The behaviour's name in reports and on the card (e.g. ``"contact-details"``).
        max_new_tokens: Tokens generated per continuation.
        samples: Continuations sampled per attribution prompt (top-p 0.95), besides the greedy one.
        use_chat_template: Wrap prompts in the tokenizer's chat template.
        heldout_share: Share of the prompts held out when they are split here.
        split_seed: Seed of that split.

    Returns:
        The behaviour (neurons, budgets 10-200 by default), with its prompts by split.

    Raises:
        ScorerError: The scorer cannot be built, or fails its probe.
        ReferenceSetError: The prompts cannot be read or are too few to split.
        ValueError: ``threshold`` is outside [0, 1] or ``direction`` is neither ``"higher"`` nor ``"lower"``.

    Example:
        >>> behaviour = user_behaviour([f"Who runs shop {i}?" for i in range(12)], r"regex:\\w+@\\w+\\.\\w+",
        ...                            name="contact-details", use_chat_template=False)
        >>> behaviour.name, behaviour.judge(1.0), behaviour.judge(0.0), len(behaviour.prompts_for("heldout"))
        ('contact-details', 'undesired', 'desired', 4)
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'higher' or 'lower', got {direction!r}")
    judged = parse_scorer(scorer, label=label)
    probe_scorer(judged)
    splits = split_prompts(prompts, heldout_share=heldout_share, seed=split_seed)
    higher = direction == "higher"

    def score(generations: Sequence[Generation]) -> list[float]:
        return [float(v) for v in judged([g.text for g in generations])]

    def undesired(value: float) -> bool:
        return value >= threshold if higher else value <= threshold

    def judge(value: float) -> str | None:
        if undesired(value):
            return "undesired"
        return "desired" if (value < threshold / 2 if higher else value > (1 + threshold) / 2) else None

    def measure(generations: Sequence[Generation]) -> dict[str, float]:
        values = score(generations)
        return {"undesired_rate": sum(map(undesired, values)) / len(values), "score_mean": sum(values) / len(values)}

    def focus(tokenizer: Any, generation: Generation) -> list[int]:
        if isinstance(judged, PatternScorer):
            return matched_positions(tokenizer, generation, judged.spans)
        return leave_one_word_out_positions(tokenizer, generation, judged, higher_is_undesired=higher)

    source = prompts if isinstance(prompts, (str, os.PathLike)) else f"{type(prompts).__name__} of prompts"
    metrics = (_USER.metrics[0], dataclasses.replace(_USER.metrics[1], lower_is_better=higher))
    metadata = dataclasses.replace(_USER, name=name, prompt_set=os.fspath(source), metrics=metrics)
    scorer_spec = os.fspath(scorer) if isinstance(scorer, (str, os.PathLike)) else judged.name
    decoding = DecodingSettings(max_new_tokens=max_new_tokens, use_chat_template=use_chat_template)
    return Behaviour(
        metadata=metadata,
        decoding=decoding,
        sampling=sampled(decoding, samples),
        score=score,
        judge=judge,
        measure=measure,
        focus=focus,
        details={
            "name": name,
            "scorer": scorer_spec,
            "label": label,
            "threshold": threshold,
            "direction": direction,
            # What --prompts repeats the run with (None where the prompts were given as objects).
            "prompts_source": os.fspath(prompts) if isinstance(prompts, (str, os.PathLike)) else None,
        },
        prompts=splits,
    )
