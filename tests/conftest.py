"""Shared fixtures: tiny models and tokenizers, fixed prompts, and a guard against process-wide module hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.modules.module as module_globals
from tiny_models import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer
from transformers import PreTrainedTokenizerFast

_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


@pytest.fixture(autouse=True)
def _no_global_module_hooks():
    """The engine must never install process-wide hooks (LXT-style patching); fail any test that does."""
    yield
    for name in _GLOBAL_HOOK_DICTS:
        assert not getattr(module_globals, name), f"torch.nn.modules.module.{name} is not empty"


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny-model tests on one intra-op thread (2-3x faster than the default for ops this
    small), restoring the thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ids() -> torch.Tensor:
    """Two unpadded prompts of 8 tokens (ids < 64, no pads)."""
    return torch.tensor([[1, 5, 7, 9, 11, 3, 8, 4], [1, 40, 33, 12, 61, 6, 6, 20]])


@pytest.fixture
def padded():
    """``padded(side) -> (input_ids, attention_mask)``: a batch of 2; row 1 has 3 pads (id 0) on ``side``."""

    def make(side: str) -> tuple[torch.Tensor, torch.Tensor]:
        real = [1, 40, 33, 12, 61]
        row = [0, 0, 0] + real if side == "left" else real + [0, 0, 0]
        input_ids = torch.tensor([[1, 5, 7, 9, 11, 3, 8, 4], row])
        return input_ids, (input_ids != 0).long()

    return make


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    """The whitespace word-level tokenizer of ``tests/tiny_tokenizer.py`` (built locally)."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose vocabulary is the word tokenizer's, saved with it: a directory that
    ``load_model``, ``from_pretrained`` and the CLI's ``--model`` read like a real checkpoint."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", dtype=torch.float32)
    model.resize_token_embeddings(len(WORDS))
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
