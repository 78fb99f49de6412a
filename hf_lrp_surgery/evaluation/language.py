"""General language-modelling behaviour: perplexity on text, in-context copying, and the KL drift of a
corrected model.

All run without gradients, in eval mode (the models' modes are restored afterwards), on batches
padded on the right under an attention mask, so a padded position never enters a result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery.evaluation._runtime import context_length, encode, eval_mode, filler_id, input_device, pad
from hf_lrp_surgery.exceptions import EvaluationError, SequenceTooLongError

__all__ = ["InductionResult", "induction_loss", "induction_sequences", "next_token_kl", "perplexity"]

_IGNORE = -100


def _check_texts(texts: Sequence[str], what: str) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a sequence of strings, not one string; wrap it in a list")
    if len(texts) == 0:
        raise EvaluationError(f"no {what} to evaluate")


def _windows(ids: list[int], window: int | None, stride: int) -> list[tuple[list[int], int]]:
    """Split one text into ``(window ids, index of its first scored token)`` so that every token but the
    first is scored exactly once, each with as much preceding context as fits in ``window`` tokens."""
    if len(ids) < 2:
        return []
    if window is None or len(ids) <= window:
        return [(ids, 1)]
    windows = []
    first = 1  # the next token to score
    while first < len(ids):
        end = min(first + stride, len(ids))
        start = max(0, end - window)
        windows.append((ids[start:end], first - start))
        first = end
    return windows


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    progress: bool = True,
) -> float:
    """Token-weighted perplexity: ``exp`` of the mean negative log-likelihood of every predicted token.

    Each text is tokenised with the tokenizer's special tokens (e.g. BOS); every token but the first
    is predicted from the tokens before it, and all predicted tokens of all texts weigh the same
    (long texts count more than short ones). A text longer than ``max_length`` is split into windows
    of at most ``max_length`` tokens that together predict each of its tokens exactly once: a window
    scores ``stride`` new tokens, with the tokens before them (up to ``max_length`` in all) as context.

    Args:
        model: A causal LM (plain or PEFT-wrapped).
        tokenizer: Its tokenizer.
        texts: The texts.
        batch_size: Windows per forward pass.
        max_length: Window length in tokens (>= 2); default: the model's context window (whole texts if
            the config states none).
        stride: New tokens scored per window, 1 to ``max_length - 1``; default ``max_length - 1`` (the
            fastest: a window starts with the last token of the previous one, and the last window of a
            text is filled up with earlier tokens as context). Smaller strides give tokens more context
            at more compute.
        progress: Show a progress bar over batches.

    Returns:
        The perplexity (>= 1).

    Raises:
        EvaluationError: ``texts`` is empty, or no text has two tokens (nothing is predicted).
        ValueError: ``max_length``, ``stride`` or ``batch_size`` is out of range.

    Example:
        >>> texts = ["The capital of France is Paris."]
        >>> round(perplexity(model, tokenizer, texts, progress=False), 1)  # doctest: +SKIP
        13.0
    """
    _check_texts(texts, "texts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    window = max_length if max_length is not None else context_length(model)
    if window is not None and window < 2:
        raise ValueError(f"max_length must be >= 2 (one token of context and one to predict), got {window}")
    step = stride if stride is not None else (window - 1 if window is not None else 1)
    if window is not None and not 1 <= step <= window - 1:
        raise ValueError(f"stride must be between 1 and max_length - 1 = {window - 1}, got {step}")

    rows = [row for text in texts for row in _windows(encode(tokenizer, text), window, step)]
    if not rows:
        raise EvaluationError(f"none of the {len(texts)} texts has two or more tokens, so no token is predicted")
    rows.sort(key=lambda row: len(row[0]), reverse=True)  # less padding
    device, pad_id = input_device(model), filler_id(tokenizer)
    nll, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for start in tqdm(
            range(0, len(rows), batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False
        ):
            chunk = rows[start : start + batch_size]
            input_ids, attention_mask = pad([ids for ids, _ in chunk], pad_id, "right", device)
            labels = torch.full_like(input_ids, _IGNORE)
            for b, (ids, first) in enumerate(chunk):
                labels[b, first : len(ids)] = input_ids[b, first : len(ids)]
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
            logits = logits if logits.dtype == torch.float64 else logits.float()
            targets = labels[:, 1:].to(logits.device)
            nll += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=_IGNORE, reduction="sum"
                )
            )
            count += int((targets != _IGNORE).sum())
    return math.exp(nll / count)


def next_token_kl(
    original: nn.Module,
    corrected: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    positions: Literal["all", "last"] = "all",
    progress: bool = True,
) -> float:
    """Mean KL(p_original || p_corrected) of the next-token distributions on ``prompts``.

    How far a correction moved the model's predictions: 0 for the same model. The distributions are
    compared in float64 from ``log_softmax`` of each model's logits, at every real token position of
    every prompt (``"all"``, so longer prompts weigh more) or at the last position of each prompt
    (``"last"``: the distribution of the first token either model would generate).

    Args:
        original: The original model.
        corrected: The corrected model (same vocabulary and tokenizer).
        tokenizer: The tokenizer.
        prompts: The prompts (tokenised with special tokens, e.g. BOS).
        batch_size: Prompts per forward pass.
        positions: ``"all"`` or ``"last"``.
        progress: Show a progress bar over batches.

    Returns:
        The mean KL divergence in nats (>= 0 up to rounding).

    Raises:
        EvaluationError: ``prompts`` is empty, a prompt has no tokens, or the two models' logits differ in shape.
        SequenceTooLongError: A prompt exceeds the original model's context window.
        ValueError: ``positions`` or ``batch_size`` is invalid.

    Example:
        >>> next_token_kl(model, model, tokenizer, ["The capital of France is"], progress=False)  # doctest: +SKIP
        0.0
    """
    _check_texts(prompts, "prompts")
    if positions not in ("all", "last"):
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = [encode(tokenizer, prompt) for prompt in prompts]
    context = context_length(original)
    for index, ids in enumerate(rows):
        if not ids:
            raise EvaluationError(f"prompt {index} ({prompts[index]!r}) has no tokens")
        if context is not None and len(ids) > context:
            raise SequenceTooLongError(f"prompt {index} is {len(ids)} tokens, beyond the model's context of {context}")
    rows.sort(key=len, reverse=True)  # less padding; the mean does not depend on the order
    devices, pad_id = (input_device(original), input_device(corrected)), filler_id(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(original, corrected):
        for start in tqdm(
            range(0, len(rows), batch_size), desc="next-token KL", unit="batch", disable=not progress, leave=False
        ):
            input_ids, attention_mask = pad(rows[start : start + batch_size], pad_id, "right", devices[0])
            logits_p = original(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits_q = corrected(
                input_ids=input_ids.to(devices[1]), attention_mask=attention_mask.to(devices[1]), use_cache=False
            ).logits.to(logits_p.device)
            if logits_p.shape != logits_q.shape:
                raise EvaluationError(
                    f"the models' logits differ in shape: {tuple(logits_p.shape)} (original) vs "
                    f"{tuple(logits_q.shape)} (corrected); compare models with the same vocabulary"
                )
            real = attention_mask.to(logits_p.device).bool()
            if positions == "last":
                last = real.sum(1) - 1
                rows_p, rows_q = (logits[torch.arange(len(last)), last] for logits in (logits_p, logits_q))
            else:
                rows_p, rows_q = logits_p[real], logits_q[real]
            log_p, log_q = rows_p.double().log_softmax(-1), rows_q.double().log_softmax(-1)
            p = log_p.exp()
            # 0 * log(0 / q) = 0, also where a logit is -inf.
            kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
            total += float(kl.sum())
            count += kl.numel()
    return total / count


#: Random tokens per copy of the induction probe (the second copy follows the first at once).
INDUCTION_LENGTH = 50


@dataclass(frozen=True)
class InductionResult:
    """The induction (in-context copying) probe: random token sequences shown twice.

    A model that copies in context predicts the second copy far better than the first (which is random
    and unpredictable). Pruning the attention heads that copy (induction heads) raises the
    second-copy loss while the first-copy loss hardly moves.

    Attributes:
        first_copy_loss: Mean next-token loss (nats) on the first copy, tokens 2..length.
        second_copy_loss: Mean next-token loss (nats) on the second copy, tokens 2..length (each predicted
            with the whole first copy and the second copy so far in context).
        sequences: Number of random sequences.
        length: Tokens per copy.
        seed: Seed of the random sequences.
    """

    first_copy_loss: float
    second_copy_loss: float
    sequences: int
    length: int
    seed: int

    def to_dict(self) -> dict[str, float | int]:
        """The fields as a JSON-serialisable dict."""
        return asdict(self)


def _vocabulary_size(model: nn.Module, tokenizer: Any) -> int:
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    rows = getattr(embeddings, "num_embeddings", None)
    size = len(tokenizer)
    return min(size, int(rows)) if isinstance(rows, int) else size


def induction_sequences(
    tokenizer: Any, vocabulary_size: int, *, sequences: int = 16, length: int = INDUCTION_LENGTH, seed: int = 0
) -> list[list[int]]:
    """The random token sequences of the induction probe (one copy each), seeded.

    Tokens are drawn from ``0 .. vocabulary_size - 1`` without the tokenizer's special tokens (BOS,
    EOS, padding, ...), without replacement within a sequence where the vocabulary allows it (so that
    the first copy holds no repeat to copy from).

    Args:
        tokenizer: The tokenizer (for its special token ids).
        vocabulary_size: How many token ids the model has.
        sequences: How many sequences.
        length: Tokens per sequence.
        seed: Seed of a private generator (the global random state is untouched).

    Returns:
        ``sequences`` lists of ``length`` token ids.

    Raises:
        ValueError: A count is below 1 (``length`` below 2), or no ordinary token is left.

    Example:
        >>> rows = induction_sequences(tokenizer, 49152, sequences=2, length=5)  # doctest: +SKIP
    """
    if sequences < 1 or length < 2:
        raise ValueError(f"sequences must be >= 1 and length >= 2, got {sequences} and {length}")
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    allowed = torch.tensor([i for i in range(vocabulary_size) if i not in special], dtype=torch.long)
    if len(allowed) == 0:
        raise ValueError("the vocabulary has no token that is not a special token")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(sequences):
        if len(allowed) >= length:
            picks = torch.randperm(len(allowed), generator=generator)[:length]
        else:
            picks = torch.randint(len(allowed), (length,), generator=generator)
        rows.append(allowed[picks].tolist())
    return rows


def induction_loss(
    model: nn.Module,
    tokenizer: Any,
    *,
    sequences: int = 16,
    length: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> InductionResult:
    """The induction probe: mean loss on the first and on the second copy of random token sequences.

    Each row is the tokenizer's leading special tokens (e.g. BOS, as :func:`perplexity` sees them), a
    random sequence (:func:`induction_sequences`) and the same sequence again. Loss is the mean
    next-token cross-entropy over tokens 2..length of each copy (the first token of a copy has nothing
    to be copied from), over all rows. A correction must not raise the second-copy loss: that is the
    model's ability to continue what it has just read (names, code identifiers, quoted text).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        sequences: How many random sequences (16).
        length: Tokens per copy; default 50, or fewer where two copies would not fit the context window.
        seed: Seed of the sequences (the same seed gives the same probe for every model).
        batch_size: Rows per forward pass.
        progress: Show a progress bar over batches.

    Returns:
        The result, with the settings used.

    Raises:
        SequenceTooLongError: Two copies of ``length`` tokens exceed the model's context window.
        ValueError: A count is out of range.

    Example:
        >>> result = induction_loss(model, tokenizer, progress=False)  # doctest: +SKIP
        >>> result.first_copy_loss > 5 > result.second_copy_loss  # doctest: +SKIP
        True
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefix = encode(tokenizer, "")
    context = context_length(model)
    room = None if context is None else (context - len(prefix)) // 2
    if length is None:
        length = INDUCTION_LENGTH if room is None else min(INDUCTION_LENGTH, room)
    if room is not None and length > room:
        raise SequenceTooLongError(
            f"two copies of {length} tokens (and {len(prefix)} leading special tokens) exceed the model's context "
            f"of {context}; give length <= {room}"
        )
    rows = [
        prefix + row + row
        for row in induction_sequences(
            tokenizer, _vocabulary_size(model, tokenizer), sequences=sequences, length=length, seed=seed
        )
    ]
    start = len(prefix)
    first = torch.arange(start + 1, start + length)  # target positions scored in the first copy
    second = first + length
    device = input_device(model)
    totals = {"first": 0.0, "second": 0.0}
    with torch.no_grad(), eval_mode(model):
        for begin in tqdm(
            range(0, len(rows), batch_size), desc="induction probe", unit="batch", disable=not progress, leave=False
        ):
            input_ids = torch.tensor(rows[begin : begin + batch_size], device=device)
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
            logits = logits if logits.dtype == torch.float64 else logits.float()
            log_probs = logits.log_softmax(-1)
            for name, targets in (("first", first), ("second", second)):
                positions = targets.to(log_probs.device)
                picked = log_probs[:, positions - 1].gather(
                    -1, input_ids[:, positions].unsqueeze(-1).to(log_probs.device)
                )
                totals[name] -= float(picked.sum())
    count = len(rows) * (length - 1)
    return InductionResult(totals["first"] / count, totals["second"] / count, sequences, length, seed)
