"""FSDP on 2 CPU processes (gloo): what works, and why ``LRPSurgeryCallback`` still refuses FSDP.

Measured by ``tests/_fsdp_worker.py`` under torchrun:

* torch FSDP itself runs here, and relevance computed on the parameters gathered by
  ``summon_full_params`` equals one process's on the unsharded model (the building block of a
  callback under FSDP);
* the callback refuses FSDP1- and FSDP2-sharded models by name;
* ``transformers.Trainer`` cannot run FSDP on CPU processes: with FSDP1 accelerate's plugin raises
  (``sync_module_states`` needs an accelerator device), with FSDP2 it silently trains with DDP. A
  callback under the Trainer's FSDP can therefore not be tested on a CPU-only machine, and it keeps
  its refusal. The last test is a canary: it fails when a Trainer starts running FSDP on CPU, which
  is the moment to add (and test) FSDP support.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _fsdp_worker import relevance_tensors
from tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's output directory after one 2-process run."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(REPO / "tests" / "_fsdp_worker.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _record(out: Path, rank: int) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((out / f"rank{rank}" / "record.json").read_text())
    return record


def test_relevance_on_summoned_full_params_equals_one_process(fsdp_run: Path) -> None:
    torch.set_num_threads(1)
    reference = relevance_tensors(tiny_model("llama", dtype=torch.float64))
    assert any(k.startswith("w:") for k in reference)
    for rank in (0, 1):
        record = _record(fsdp_run, rank)
        assert record["world_size"] == 2 and record["flat_parameters"] == [True]
        tensors = torch.load(fsdp_run / f"rank{rank}" / "relevance.pt")
        assert tensors.keys() == reference.keys()
        for key, value in reference.items():
            assert value.abs().sum() > 0, key
            torch.testing.assert_close(tensors[key], value, rtol=1e-10, atol=1e-12)


def test_callback_refuses_sharded_models(fsdp_run: Path) -> None:
    for rank in (0, 1):
        record = _record(fsdp_run, rank)
        for key in ("refused_fsdp1", "refused_fsdp2"):
            assert record[key] is not None and "does not support FSDP" in record[key], key
            assert "Train with DDP" in record[key]


def test_canary_trainer_runs_no_fsdp_on_cpu(fsdp_run: Path) -> None:
    """Fails when transformers/accelerate start running FSDP on CPU: then add FSDP support to the callback.

    Measured: with transformers' default ``sync_module_states=True`` FSDP1 is refused on CPU (accelerate < 1.16:
    "no available devices"; >= 1.16: "sync_module_states=True is not supported on cpu"); without it, and with
    FSDP2, the Trainer falls back to plain multi-CPU DDP with unsharded parameters.
    """
    record = _record(fsdp_run, 0)
    refusal = record["trainer_fsdp1"].get("error", "")
    assert "no available devices" in refusal or "not supported on cpu" in refusal, record["trainer_fsdp1"]
    for key in ("trainer_fsdp1_no_sync", "trainer_fsdp2"):
        run = record[key]
        assert "error" in run or ("FSDP" not in run["distributed_type"] and run["parameter_types"] == ["Parameter"]), (
            f"the Trainer now shards on CPU ({key}: {run}): FSDP support in LRPSurgeryCallback can be built here"
        )
