"""Shared fixtures: fixed prompts, and a guard that no test leaves a process-wide module hook behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.modules.module as module_globals

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
