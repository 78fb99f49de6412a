"""Repetition metrics: the Response Uniqueness Ratio (Hatefi et al., 2025, Eq. 11) and distinct-n."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from hf_lrp_surgery.evaluation.generation import Generation

__all__ = ["distinct_n", "mean_rur", "response_uniqueness_ratio", "rur_or_unique"]


def _plain(token_ids: Sequence[Hashable]) -> list[Hashable]:
    # Tensors and arrays hash their elements by identity: compare values.
    return token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)


def response_uniqueness_ratio(token_ids: Sequence[Hashable]) -> float:
    """The Response Uniqueness Ratio of one response: ``|unique tokens| / |tokens|``.

    1.0 means no token repeats; a response looping over ``k`` tokens tends to ``k / length``.
    Hatefi et al., 2025, *Attribution-guided Pruning for Compression, Circuit Discovery, and Targeted
    Correction in LLMs*, arXiv 2506.13727, Eq. 11.

    Args:
        token_ids: The response's tokens (the generated tokens only, not the prompt); a list, tensor or
            array of ids, or a list of words.

    Returns:
        The ratio, in (0, 1].

    Raises:
        ValueError: The response is empty (the ratio is undefined).

    Example:
        >>> response_uniqueness_ratio([1, 1, 2, 3])
        0.75
    """
    tokens = _plain(token_ids)
    if len(tokens) == 0:
        raise ValueError("the Response Uniqueness Ratio of an empty response is undefined")
    return len(set(tokens)) / len(tokens)


def rur_or_unique(token_ids: Sequence[int]) -> float:
    """The Response Uniqueness Ratio of one response, where an empty response counts as fully unique (1.0).

    The rule of the repetition correction, which needs a verdict for every response it judges or
    measures: a response that ends at once does not loop. (:func:`mean_rur`, a summary statistic,
    skips empty responses instead.)

    Args:
        token_ids: The response's tokens (the generated tokens only); a list, tensor or array.

    Returns:
        The ratio, in (0, 1]; 1.0 for an empty response.

    Example:
        >>> rur_or_unique([1, 1, 2, 3]), rur_or_unique([])
        (0.75, 1.0)
    """
    return response_uniqueness_ratio(token_ids) if len(token_ids) > 0 else 1.0


def mean_rur(generations: Sequence[Generation]) -> float:
    """The mean Response Uniqueness Ratio of generations, skipping empty ones.

    A continuation that ends at once (an immediate end-of-sequence token) has no tokens and no ratio;
    here it neither counts as repetitive nor as diverse (as in the ``response_uniqueness`` evaluate
    module). The repetition correction counts it as unique instead (:func:`rur_or_unique`).

    Args:
        generations: Output of :func:`~hf_lrp_surgery.evaluation.generate`.

    Returns:
        The mean ratio over generations with at least one token.

    Raises:
        ValueError: Every generation is empty (or there are none).

    Example:
        >>> mean_rur([Generation(0, "p", "a a b b", [5, 5, 6, 6]), Generation(1, "q", "", [])])
        0.5
    """
    ratios = [response_uniqueness_ratio(g.token_ids) for g in generations if len(g.token_ids) > 0]
    if not ratios:
        raise ValueError(f"all {len(generations)} generations are empty; the mean RUR is undefined")
    return sum(ratios) / len(ratios)


def distinct_n(sequences: Sequence[Sequence[int]] | Sequence[str], n: int) -> float:
    """Corpus-level distinct-n: distinct n-grams over all n-grams of all sequences (Li et al., 2016).

    Args:
        sequences: Token-id sequences, or strings (split on whitespace into words).
        n: The n-gram order (1 = unigrams).

    Returns:
        ``|distinct n-grams| / |n-grams|``; 0.0 when no sequence has ``n`` items.

    Raises:
        ValueError: ``n`` is below 1.

    Example:
        >>> distinct_n(["a b a b", "a b c"], 2)  # ab ba ab | ab bc: 3 distinct of 5
        0.6
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    total = 0
    distinct: set[tuple[Hashable, ...]] = set()
    for sequence in sequences:
        items = sequence.split() if isinstance(sequence, str) else _plain(sequence)
        grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else 0.0
