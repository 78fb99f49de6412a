"""Batched generation with explicit, recorded decoding settings.

Every decoding parameter that shapes the next-token distribution is passed explicitly, so that a
model's own ``generation_config`` (a ``top_k`` of 50, a repetition penalty, ...) never leaks into a
measurement: the harness measures the model's behaviour, and repetition is one of the behaviours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from hf_lrp_surgery.evaluation._runtime import context_length, encode, eval_mode, filler_id, input_device, pad
from hf_lrp_surgery.exceptions import EvaluationError, MissingChatTemplateError, SequenceTooLongError

__all__ = ["DecodingSettings", "Generation", "generate", "prompt_ids"]


#: Prompts per ``model.generate`` call unless given: greedy decoding, sampling (see :class:`DecodingSettings`).
_GREEDY_BATCH, _SAMPLED_BATCH = 64, 16


@dataclass(frozen=True)
class DecodingSettings:
    """How continuations are generated; recorded with every measurement (see :meth:`to_dict`).

    Attributes:
        max_new_tokens: Tokens to generate per continuation (fewer when an end-of-sequence token comes).
        do_sample: Sample (``True``) or decode greedily (``False``, deterministic; the evaluation default).
        temperature: Sampling temperature (> 0); only used when sampling.
        top_p: Nucleus sampling mass in (0, 1]; only used when sampling. No top-k filter is applied.
        num_return_sequences: Continuations per prompt; more than one needs ``do_sample=True``.
        seed: Seed of the random generator when sampling (the global generator state is restored after).
        batch_size: Prompts per ``model.generate`` call (default: 64 when decoding greedily — on 2 CPU cores
            SmolLM2-135M generates 64 prompts in 20 s at 64 against 32-40 s at 16, with the same continuations —
            and 16 when sampling, whose rows are 16 x ``num_return_sequences`` and whose random draws follow
            the batches).
        use_chat_template: Wrap each prompt as a user message with the tokenizer's chat template (and
            a generation prompt) before tokenising.

    Raises:
        ValueError: A count is below 1, ``temperature`` is not positive, ``top_p`` is outside (0, 1], or
            several sequences per prompt are asked of greedy decoding.

    Example:
        >>> DecodingSettings(max_new_tokens=50, do_sample=True, top_p=0.95, num_return_sequences=4).to_dict()["top_p"]
        0.95
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0
    batch_size: int | None = None
    use_chat_template: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", _SAMPLED_BATCH if self.do_sample else _GREEDY_BATCH)
        for name in ("max_new_tokens", "num_return_sequences", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs do_sample=True: greedy decoding gives "
                "one continuation per prompt"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict.

        Returns:
            One entry per field.

        Example:
            >>> DecodingSettings().to_dict()["max_new_tokens"]
            32
        """
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    """One continuation of one prompt.

    Attributes:
        prompt_index: Index of the prompt in the list given to :func:`generate`.
        prompt: The prompt as given (before any chat template).
        text: The decoded continuation, special tokens removed.
        token_ids: The generated tokens only: no prompt, no padding, up to and excluding the first
            end-of-sequence token.
    """

    prompt_index: int
    prompt: str
    text: str
    token_ids: list[int]


def prompt_ids(tokenizer: Any, prompt: str, use_chat_template: bool) -> list[int]:
    """The token ids :func:`generate` feeds the model for one prompt (before any padding).

    Args:
        tokenizer: The tokenizer.
        prompt: The prompt text.
        use_chat_template: Wrap the prompt as a user turn of the tokenizer's chat template, with the
            generation prompt (the templated text holds the special tokens; none are added again).

    Returns:
        The prompt's token ids.

    Example:
        >>> ids = prompt_ids(tokenizer, "Name three colours.", use_chat_template=True)  # doctest: +SKIP
    """
    if not use_chat_template:
        return encode(tokenizer, prompt)
    # The templated text already holds the special tokens the model expects (e.g. BOS).
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer (chat models may differ)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = configured if isinstance(configured, (list, tuple)) else [configured]
    candidates = [*candidates, getattr(tokenizer, "eos_token_id", None)]
    return list(dict.fromkeys(int(i) for i in candidates if i is not None))


def _generation_config(settings: DecodingSettings, pad_id: int, stop_ids: list[int]) -> GenerationConfig:
    # Values left unset would be filled from the model's own generation config.
    explicit: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=0,
        do_sample=settings.do_sample,
        num_beams=1,
        num_return_sequences=settings.num_return_sequences,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad_id,
        eos_token_id=stop_ids or None,
        return_dict_in_generate=False,
        use_cache=True,
    )
    if settings.do_sample:
        # Sampling filters act only when sampling (greedy decoding warns about them); no top-k filter.
        explicit.update(
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
    return GenerationConfig(**explicit)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:position]
    return tokens


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: DecodingSettings = DecodingSettings(),
    *,
    progress: bool = True,
) -> list[Generation]:
    """Continue every prompt, in batches padded on the left.

    Prompts are batched by length (less padding) and put back in order. The tokenizer is not
    modified: batches are padded here, with the pad token (else EOS) under a zero attention mask.
    Generation stops at any end-of-sequence id of the model's generation config or the tokenizer.
    The model is in eval mode during generation and left in its original mode.

    Args:
        model: A causal LM (plain or PEFT-wrapped).
        tokenizer: Its tokenizer.
        prompts: The prompts (text).
        settings: Decoding settings; greedy by default.
        progress: Show a progress bar over batches.

    Returns:
        ``num_return_sequences`` generations per prompt, prompt-major: all continuations of prompt 0,
        then of prompt 1, ...

    Raises:
        EvaluationError: ``prompts`` is empty.
        MissingChatTemplateError: ``settings.use_chat_template`` is set but the tokenizer has no chat template.
        SequenceTooLongError: A prompt plus ``max_new_tokens`` exceeds the model's context window.
        TypeError: ``prompts`` is a single string.

    Example:
        >>> from hf_lrp_surgery.models import load_model
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> settings = DecodingSettings(max_new_tokens=4)
        >>> generate(model, tokenizer, ["The capital of France is"], settings)[0].text.strip()  # doctest: +SKIP
        'Paris.'
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string; wrap it in a list")
    if len(prompts) == 0:
        raise EvaluationError("no prompts to generate from")
    if settings.use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise MissingChatTemplateError(
            "use_chat_template=True but the tokenizer has no chat template; set tokenizer.chat_template or "
            "generate from plain prompts (use_chat_template=False)"
        )
    encoded = [prompt_ids(tokenizer, prompt, settings.use_chat_template) for prompt in prompts]
    context = context_length(model)
    for index, ids in enumerate(encoded):
        if not ids:
            raise EvaluationError(f"prompt {index} ({prompts[index]!r}) has no tokens")
        if context is not None and len(ids) + settings.max_new_tokens > context:
            raise SequenceTooLongError(
                f"prompt {index} is {len(ids)} tokens; with max_new_tokens={settings.max_new_tokens} it exceeds the "
                f"model's context of {context}; shorten the prompt or lower max_new_tokens"
            )

    pad_id = filler_id(tokenizer)
    stop_ids = _stop_ids(model, tokenizer)
    config = _generation_config(settings, pad_id, stop_ids)
    stops = set(stop_ids)
    device = input_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    per_prompt: list[list[Generation]] = [[] for _ in prompts]
    seeded = _seeded(settings.seed, device) if settings.do_sample else contextlib.nullcontext()
    batch = cast(int, settings.batch_size)  # resolved when the settings were made
    with torch.no_grad(), eval_mode(model), seeded:
        batches = range(0, len(order), batch)
        for start in tqdm(batches, desc="generate", unit="batch", disable=not progress, leave=False):
            indices = order[start : start + batch]
            input_ids, attention_mask = pad([encoded[i] for i in indices], pad_id, "left", device)
            # ``generate`` comes from transformers' GenerationMixin, which nn.Module's type does not know.
            output = cast(Any, model).generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config
            )
            for row, tokens in enumerate(output[:, input_ids.shape[1] :].tolist()):
                index = indices[row // settings.num_return_sequences]
                ids = _until_stop(tokens, stops)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                per_prompt[index].append(Generation(index, prompts[index], text, ids))
    return [generation for generations in per_prompt for generation in generations]
