"""Reference samples: what one relevance pass explains, and how samples become a padded batch.

A :class:`ReferenceSample` is a prompt with an optional continuation (teacher forcing) or target
token. :func:`as_samples` accepts the forms users have (strings, token ids, pairs, mappings);
:func:`encode_sample` tokenises one and locates the positions whose logits it explains;
:func:`make_batch` pads encoded samples into one batch. The relevance engine, the forward-only
baseline scorers and the circuit tasks all read samples through these functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hf_lrp_surgery.exceptions import ReferenceSetError, SequenceTooLongError

__all__ = [
    "ARGMAX",
    "Batch",
    "Encoded",
    "ReferenceSample",
    "SampleLike",
    "as_samples",
    "encode_sample",
    "make_batch",
    "pad_rows",
    "pad_token_id",
]

#: The seed token of a prompt-only sample: "the largest logit", resolved in the forward pass.
ARGMAX = -1


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pad token-id rows to one ``[B, T]`` batch.

    Args:
        rows: Token ids per row (at least one row).
        pad_id: The id written into padded positions (always masked out).
        side: Where the padding goes.
        device: Where the tensors go.

    Returns:
        ``(input_ids, attention_mask, offsets)``; ``offsets[b]`` is where row ``b`` starts.

    Example:
        >>> ids, mask, offsets = pad_rows([[5, 6, 7], [8]], 0, "left")
        >>> ids.tolist(), mask.tolist(), offsets
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]], [0, 2])
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for b, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        input_ids[b, start : start + len(row)] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[b, start : start + len(row)] = 1
        offsets.append(start)
    return input_ids.to(device), attention_mask.to(device), offsets


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text_or_ids(value: object, field: str, prompt: object) -> None:
    """Refuse a prompt or continuation that is neither text nor a sequence of token ids (e.g. ``5`` or ``None``)."""
    if isinstance(value, str):
        return
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() == 1:
        return
    if isinstance(value, Sequence) and all(_is_id(x) for x in value):
        return
    raise ReferenceSetError(
        f"sample {prompt!r}: the {field} must be text or a list of token ids, got {type(value).__name__} {value!r}"
    )


@dataclass(frozen=True)
class ReferenceSample:
    """One sample to explain.

    Exactly one of three seeds applies:

    * only ``prompt``: the largest logit at the prompt's last token (what the model predicts);
    * ``target``: the logit of that token at the prompt's last token;
    * ``continuation``: teacher forcing; the sum over the continuation's tokens of the logit each
      one gets at the position before it (``prompt + continuation`` is the behaviour explained).
      With ``focus``, only the continuation tokens at those indices are explained (e.g. the toxic
      words of a continuation, or the tokens of a loop), in the context of all the tokens before them.

    Text is tokenised with the tokenizer given to :func:`collect_relevance` (special tokens, such
    as a BOS, are added to the prompt only); token ids are used as they are.

    Attributes:
        prompt: Text or token ids.
        continuation: Text or token ids to teacher-force after the prompt.
        target: A token id, or text that is exactly one token.
        focus: Indices into the continuation's tokens to explain (default: all of them).
    """

    prompt: str | Sequence[int]
    continuation: str | Sequence[int] | None = None
    target: str | int | None = None
    focus: Sequence[int] | None = None

    def __post_init__(self) -> None:
        _check_text_or_ids(self.prompt, "prompt", self.prompt)
        if self.continuation is not None:
            _check_text_or_ids(self.continuation, "continuation", self.prompt)
        if self.target is not None and not isinstance(self.target, str) and not _is_id(self.target):
            raise ReferenceSetError(
                f"sample {self.prompt!r}: the target must be a token id or a one-token string, got "
                f"{type(self.target).__name__} {self.target!r}"
            )
        if _is_id(self.target) and int(self.target) < 0:  # type: ignore[arg-type]
            raise ReferenceSetError(f"sample {self.prompt!r}: the target token id must be >= 0, got {self.target}")
        if self.continuation is not None and self.target is not None:
            raise ReferenceSetError(f"sample {self.prompt!r}: give a continuation or a target, not both")
        if self.focus is not None and (self.continuation is None or not self.focus):
            raise ReferenceSetError(f"sample {self.prompt!r}: focus needs a continuation and at least one index")


SampleLike = ReferenceSample | str | Sequence[int] | tuple[str, str] | Mapping[str, Any]


def as_samples(items: Iterable[SampleLike]) -> list[ReferenceSample]:
    """Normalise user input into :class:`ReferenceSample` objects.

    Args:
        items: Samples, prompt strings, token-id lists, ``(prompt, continuation)`` pairs, or
            mappings with keys ``prompt`` and optionally ``continuation`` / ``target``.

    Returns:
        The samples.

    Raises:
        ReferenceSetError: An item has none of these forms.
    """
    samples: list[ReferenceSample] = []
    for i, item in enumerate(items):
        if isinstance(item, ReferenceSample):
            samples.append(item)
        elif isinstance(item, str):
            samples.append(ReferenceSample(item))
        elif isinstance(item, Mapping):
            if "prompt" not in item:
                raise ReferenceSetError(f"sample {i} is a mapping without a 'prompt' key: {sorted(item)}")
            samples.append(
                ReferenceSample(item["prompt"], item.get("continuation"), item.get("target"), item.get("focus"))
            )
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], str):
            samples.append(ReferenceSample(item[0], item[1]))
        elif isinstance(item, torch.Tensor) and not item.is_floating_point() and item.dim() == 1:
            samples.append(ReferenceSample(item.tolist()))
        elif isinstance(item, (list, tuple)) and all(isinstance(x, int) for x in item):
            samples.append(ReferenceSample(list(item)))
        else:
            raise ReferenceSetError(
                f"sample {i} ({type(item).__name__}) is not a prompt string, token-id list, (prompt, "
                "continuation) pair, mapping with a 'prompt' key, or ReferenceSample"
            )
    return samples


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    # (position whose logits are read, token id or ARGMAX)
    seeds: list[tuple[int, int]]


def _tokens(text_or_ids: str | Sequence[int], tokenizer: Any, *, special: bool, what: str) -> list[int]:
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ReferenceSetError(f"{what} is text but no tokenizer was given; pass tokenizer= or token ids")
        return list(tokenizer(text_or_ids, add_special_tokens=special)["input_ids"])
    return [int(x) for x in text_or_ids]


def encode_sample(
    sample: ReferenceSample, index: int, tokenizer: Any, max_positions: int | None, vocab_size: int | None = None
) -> Encoded:
    """Tokenise one sample and locate its seeds (shared with the forward-only baseline scorers).

    Args:
        sample: The sample.
        index: Its position in the set (for messages).
        tokenizer: Encodes text (``None`` when the sample is token ids).
        max_positions: The model's context length, if it has one.
        vocab_size: The model's embedding rows: ids outside ``[0, vocab_size)`` are refused.

    Returns:
        The token ids and the positions (and tokens) whose logits are explained.

    Raises:
        ReferenceSetError: An empty prompt or continuation, bad focus, a target that is not one
            token, or a token id outside the vocabulary.
        SequenceTooLongError: The sample is longer than the model's context.
    """
    prompt = _tokens(sample.prompt, tokenizer, special=True, what=f"sample {index}'s prompt")
    if not prompt:
        raise ReferenceSetError(f"sample {index} has an empty prompt; every sample needs at least one token")
    if sample.continuation is not None:
        continuation = _tokens(sample.continuation, tokenizer, special=False, what=f"sample {index}'s continuation")
        if not continuation:
            raise ReferenceSetError(
                f"sample {index}: the continuation {sample.continuation!r} has no tokens, so there is nothing "
                "to explain; drop the sample or give a non-empty continuation"
            )
        focus = sorted(set(sample.focus)) if sample.focus is not None else range(len(continuation))
        if focus[0] < 0 or focus[-1] >= len(continuation):
            raise ReferenceSetError(
                f"sample {index}: focus indices must lie in [0, {len(continuation)}) (the continuation's tokens), "
                f"got {list(sample.focus or [])}"
            )
        # Tokens after the last explained one cannot change it (causal model): leave them out.
        continuation = continuation[: focus[-1] + 1]
        ids = prompt + continuation
        seeds = [(len(prompt) - 1 + j, continuation[j]) for j in focus]
    elif sample.target is not None:
        target = _tokens(
            [sample.target] if isinstance(sample.target, int) else sample.target,
            tokenizer,
            special=False,
            what=f"sample {index}'s target",
        )
        if len(target) != 1:
            raise ReferenceSetError(
                f"sample {index}: the target {sample.target!r} is {len(target)} tokens; a target must be exactly "
                "one token (use a continuation to explain several)"
            )
        ids, seeds = prompt, [(len(prompt) - 1, target[0])]
    else:
        ids, seeds = prompt, [(len(prompt) - 1, ARGMAX)]
    explained = [token for _, token in seeds if token != ARGMAX]
    outside = [i for i in (*ids, *explained) if vocab_size is not None and not 0 <= i < vocab_size]
    if outside:
        raise ReferenceSetError(
            f"sample {index} holds token id {outside[0]}, outside the model's vocabulary of {vocab_size} (ids 0.."
            f"{vocab_size - 1 if vocab_size else 0}); encode it with the model's own tokenizer or resize the embeddings"
        )
    if max_positions is not None and len(ids) > max_positions:
        raise SequenceTooLongError(
            f"sample {index} is {len(ids)} tokens, beyond the model's context of {max_positions}; shorten the "
            "prompt/continuation"
        )
    return Encoded(ids, seeds)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 for real tokens
    position_ids: torch.Tensor  # [B, T]
    seed_rows: torch.Tensor  # [N] batch index of each seeded position
    seed_positions: torch.Tensor  # [N]
    seed_tokens: torch.Tensor  # [N], ARGMAX for "the largest logit"


def make_batch(
    encoded: Sequence[Encoded], pad_id: int, padding_side: Literal["left", "right"], device: torch.device
) -> Batch:
    """Pad encoded samples into one batch with attention mask, position ids and seed locations."""
    ids, mask, offsets = pad_rows([e.ids for e in encoded], pad_id, padding_side)
    rows, positions, tokens = [], [], []
    for b, (e, offset) in enumerate(zip(encoded, offsets)):
        for position, token in e.seeds:
            rows.append(b)
            positions.append(offset + position)
            tokens.append(token)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return Batch(
        ids.to(device), mask.to(device), position_ids.to(device), as_long(rows), as_long(positions), as_long(tokens)
    )


def pad_token_id(tokenizer: Any, model: nn.Module) -> int:
    """The tokenizer's (else the config's, else 0) pad token id."""
    for source in (tokenizer, getattr(model, "config", None)):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0
