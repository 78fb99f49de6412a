"""Paired reference sets: the model's own undesired and desired continuations of the same prompts.

Both sets are explained by teacher forcing, so that the contrast isolates the behaviour rather than
the topic; the undesired set can be focused on the tokens that carry the behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from hf_lrp_surgery.evaluation import Generation, generate, prompt_ids
from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.references.samples import ReferenceSample

if TYPE_CHECKING:  # behaviours.py imports the focus helpers from here
    from hf_lrp_surgery.correction.behaviours import Behaviour

__all__ = [
    "leave_one_word_out_positions",
    "matched_positions",
    "paired_contrast_sets",
    "repeated_positions",
    "scored_word_positions",
    "word_groups",
]

_WORD_EDGES = re.compile(r"^\W+|\W+$")


def word_groups(tokenizer: Any, token_ids: Sequence[int]) -> list[list[int]]:
    """Group generated tokens into words: a token whose text starts with whitespace starts a new word.

    Decoding growing prefixes works for byte-level BPE and SentencePiece alike (a lone SentencePiece
    token decodes without its leading space).

    Args:
        tokenizer: The tokenizer that produced ``token_ids``.
        token_ids: Generated token ids.

    Returns:
        Lists of indices into ``token_ids``, one per word, in order.

    Example:
        >>> word_groups(tokenizer, tokenizer("the cat", add_special_tokens=False)["input_ids"])  # doctest: +SKIP
        [[0], [1]]
    """
    groups: list[list[int]] = []
    previous = ""
    for j in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: j + 1]))
        added = text[len(previous) :] if text.startswith(previous) else text[-1:]
        previous = text
        if not groups or added[:1].isspace():
            groups.append([j])
        else:
            groups[-1].append(j)
    return groups


def scored_word_positions(tokenizer: Any, generation: Generation, scorer: Any, threshold: float) -> list[int]:
    """The first token of every generated word that ``scorer`` scores ``>= threshold`` on its own.

    The first token is where the model chose the word; punctuation around a word is not scored.

    Args:
        tokenizer: The tokenizer that produced the generation.
        generation: An undesired generation.
        scorer: Texts -> one score each (e.g. a toxicity scorer).
        threshold: The score from which a word carries the behaviour.

    Returns:
        Indices into ``generation.token_ids``.

    Example:
        >>> scored_word_positions(tokenizer, generation, get_scorer(None), 0.5)  # doctest: +SKIP
        [4]
    """
    groups = word_groups(tokenizer, generation.token_ids)
    words = [_WORD_EDGES.sub("", tokenizer.decode([generation.token_ids[j] for j in g])) for g in groups]
    scored = [(g, w) for g, w in zip(groups, words) if w]
    values = scorer([w for _, w in scored]) if scored else []
    return [g[0] for (g, _), v in zip(scored, values) if v >= threshold]


def repeated_positions(token_ids: Sequence[int]) -> list[int]:
    """Indices of tokens that already occurred earlier in the response (what lowers its RUR, Eq. 11).

    Args:
        token_ids: Generated token ids.

    Returns:
        The indices, ascending.

    Example:
        >>> repeated_positions([5, 6, 5, 5, 7])
        [2, 3]
    """
    seen: set[int] = set()
    out = []
    for j, token in enumerate(token_ids):
        if token in seen:
            out.append(j)
        seen.add(token)
    return out


def paired_contrast_sets(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    behaviour: Behaviour,
    *,
    focus: bool = True,
    progress: bool = True,
) -> tuple[list[ReferenceSample], list[ReferenceSample]]:
    """Sample continuations (and decode the greedy one) and keep the undesired and the desired ones of the
    same prompts.

    Args:
        model: The model whose own behaviour is explained.
        tokenizer: Its tokenizer.
        prompts: Prompts that elicit the behaviour.
        behaviour: How to sample and judge.
        focus: Explain only the tokens that carry the behaviour in the undesired continuations
            (``behaviour.focus``; a continuation where it finds none is explained whole). The desired
            continuations are always explained whole.
        progress: Show progress bars.

    Returns:
        ``(undesired, desired)`` teacher-forcing samples, as token ids exactly as the model saw and
        produced them (no re-tokenisation, so no second BOS), only from prompts that got at least
        one of each.

    Raises:
        ReferenceSetError: No prompt got both an undesired and a desired continuation.

    Example:
        >>> undesired, desired = paired_contrast_sets(model, tokenizer, prompts, detox_behaviour())  # doctest: +SKIP
    """
    # The sampled continuations plus the greedy one, which is what the evaluation decodes.
    generations = generate(model, tokenizer, prompts, behaviour.sampling, progress=progress) + generate(
        model, tokenizer, prompts, behaviour.decoding, progress=progress
    )
    by_prompt: dict[int, dict[str, list[Generation]]] = {}
    for generation, value in zip(generations, behaviour.score(generations)):
        verdict = behaviour.judge(value)
        if verdict is not None and generation.text.strip():
            by_prompt.setdefault(generation.prompt_index, {"undesired": [], "desired": []})[verdict].append(generation)
    undesired: list[ReferenceSample] = []
    desired: list[ReferenceSample] = []
    for groups in by_prompt.values():
        if groups["undesired"] and groups["desired"]:
            undesired += [_as_sample(g, tokenizer, behaviour, focus) for g in groups["undesired"]]
            desired += [_as_sample(g, tokenizer, behaviour) for g in groups["desired"]]
    if not undesired:
        fired = sum(len(g["undesired"]) for g in by_prompt.values())
        raise ReferenceSetError(
            f"none of the {len(prompts)} prompts got both an undesired and a desired {behaviour.name} continuation in "
            f"{behaviour.sampling.num_return_sequences} samples and the greedy one: {fired} of {len(generations)} "
            f"continuations ({fired / len(generations):.0%}) were undesired; give more prompts (or prompts that elicit "
            "the behaviour more often), sample more per prompt, or check the scorer's threshold and direction"
        )
    return undesired, desired


def _as_sample(generation: Generation, tokenizer: Any, behaviour: Behaviour, focus: bool = False) -> ReferenceSample:
    """Prompt ids as ``generate`` encoded them (chat template included), the generated ids, and the focus."""
    ids = prompt_ids(tokenizer, generation.prompt, behaviour.decoding.use_chat_template)
    positions = behaviour.focus(tokenizer, generation) if focus and behaviour.focus is not None else []
    return ReferenceSample(ids, list(generation.token_ids), focus=positions or None)


def _token_spans(tokenizer: Any, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``token_ids`` and each token's ``(start, end)`` characters in it (growing prefixes)."""
    spans: list[tuple[int, int]] = []
    previous = ""
    for j in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: j + 1]), skip_special_tokens=True)
        start = len(previous) if text.startswith(previous) else max(0, len(text) - 1)
        spans.append((start, len(text)))
        previous = text
    return previous, spans


def matched_positions(
    tokenizer: Any, generation: Generation, spans: Callable[[str], list[tuple[int, int]]]
) -> list[int]:
    """The generated tokens that overlap the character spans where a pattern matched.

    Args:
        tokenizer: The tokenizer that produced the generation.
        generation: An undesired generation.
        spans: Text -> ``(start, end)`` spans of the matches (e.g. :meth:`PatternScorer.spans`).

    Returns:
        Indices into ``generation.token_ids``, ascending.

    Example:
        >>> matched_positions(tokenizer, generation, parse_scorer("regex:@").spans)  # doctest: +SKIP
        [7]
    """
    text, token_spans = _token_spans(tokenizer, generation.token_ids)
    matches = spans(text)
    return [j for j, (a, b) in enumerate(token_spans) if b > a and any(a < end and start < b for start, end in matches)]


def leave_one_word_out_positions(
    tokenizer: Any,
    generation: Generation,
    scorer: Callable[[list[str]], Sequence[float]],
    *,
    higher_is_undesired: bool = True,
    share: float = 0.5,
) -> list[int]:
    """The first token of every word whose removal moves the score most towards desired, for any scorer.

    The continuation and each version of it without one word are scored in one call; a word is kept
    where its removal changes the score by at least ``share`` of the largest change (and by more than
    nothing). The first token is where the model chose the word.

    Args:
        tokenizer: The tokenizer that produced the generation.
        generation: An undesired generation.
        scorer: Texts -> one score each.
        higher_is_undesired: Whether a higher score is the undesired direction.
        share: Fraction of the largest drop a word's drop must reach.

    Returns:
        Indices into ``generation.token_ids`` (empty when no word's removal changes the score).

    Example:
        >>> leave_one_word_out_positions(tokenizer, generation, get_scorer(None))  # doctest: +SKIP
        [4]
    """
    ids = list(generation.token_ids)
    groups = word_groups(tokenizer, ids)
    if not groups:
        return []
    without = [
        tokenizer.decode([t for j, t in enumerate(ids) if j not in set(g)], skip_special_tokens=True) for g in groups
    ]
    full, *rest = (float(v) for v in scorer([tokenizer.decode(ids, skip_special_tokens=True), *without]))
    drops = [(full - v) if higher_is_undesired else (v - full) for v in rest]
    largest = max(drops)
    if largest <= 0:
        return []
    return [g[0] for g, drop in zip(groups, drops) if drop > 0 and drop >= share * largest]
