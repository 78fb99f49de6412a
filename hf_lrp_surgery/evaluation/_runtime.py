"""Helpers shared by the evaluation functions: eval mode, devices, context length, padding."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from hf_lrp_surgery.lrp.architectures import text_config_of
from hf_lrp_surgery.references.samples import pad_rows


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode (no dropout) and restore every submodule's own mode afterwards."""
    # Per submodule, not ``model.train(was_training)``: a model in training mode may hold frozen parts
    # in eval mode on purpose.
    modes = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def input_device(model: nn.Module) -> torch.device:
    """The device of the input embeddings (where token ids must go, also under a device map)."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def context_length(model: nn.Module) -> int | None:
    """The model's context window as its config states it, or ``None``."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = text_config_of(config)
    return getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)


def filler_id(tokenizer: Any) -> int:
    """A token id to put in padded positions (always masked out): the pad token, else EOS, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens (e.g. BOS), as the model sees a prompt."""
    # Not verbose: texts longer than ``model_max_length`` are split into windows or refused by the caller.
    return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])


def pad(
    rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id rows to one ``[B, T]`` batch; returns ``(input_ids, attention_mask)``."""
    input_ids, attention_mask, _ = pad_rows(rows, pad_id, side, device)
    return input_ids, attention_mask
