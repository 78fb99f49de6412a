"""What FSDP does on this machine's setup (2 CPU processes, gloo), for ``tests/test_fsdp.py``.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_fsdp_worker.py OUT`` records,
per rank, in ``OUT/rank<r>/``:

* ``relevance.pt``: neuron, head and weight relevance of a tiny fp64 Llama wrapped in torch FSDP
  (FSDP1, ``FlatParameter`` shards), computed on the full parameters gathered by
  ``FullyShardedDataParallel.summon_full_params`` (the building block a callback under FSDP would use);
* ``record.json``: whether ``LRPSurgeryCallback`` refuses the FSDP1- and the FSDP2-sharded model (and
  its message), and what ``transformers.Trainer`` does when asked for FSDP on CPU processes: FSDP1
  raises in accelerate's plugin, FSDP2 trains with plain DDP (accelerate enables FSDP only for
  accelerator devices), so a Trainer run under FSDP cannot be had on a CPU-only machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))

from _ddp_worker import GENERAL, UNDESIRED, TokenDataset  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from hf_lrp_surgery.exceptions import TrainingSetupError  # noqa: E402
from hf_lrp_surgery.lrp import collect_relevance  # noqa: E402
from hf_lrp_surgery.training import LRPSurgeryCallback  # noqa: E402

#: Explained by every rank (the comparison is with one process on the same samples).
SAMPLES = [[1, 5, 7, 9, 11, 3, 8, 4], [1, 40, 33, 12, 61, 6]]
COMPONENTS = ("neurons", "heads", "weights")


def relevance_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Neuron, head and weight relevance of ``model`` on :data:`SAMPLES`, flat in one dict."""
    result = collect_relevance(model, SAMPLES, components=COMPONENTS, progress=False)
    assert result.neurons is not None and result.heads is not None
    return {"neurons": result.neurons, "heads": result.heads, **{f"w:{k}": v for k, v in result.weights.items()}}


def _refusal(model: torch.nn.Module) -> str | None:
    callback = LRPSurgeryCallback(undesired=UNDESIRED, general=GENERAL, granularity="neurons", budget=2)
    try:
        callback._check_setup(SimpleNamespace(fsdp="", deepspeed=None), model)  # type: ignore[arg-type]
    except TrainingSetupError as err:
        return str(err)
    return None


def _trainer_under_fsdp(out: Path, version: int, **config: Any) -> dict[str, Any]:
    """Try a 1-step ``Trainer`` run with ``fsdp="full_shard"`` on CPU processes (``config``: more of its
    ``fsdp_config``); what happened."""
    try:
        args = TrainingArguments(
            output_dir=str(out / f"trainer_fsdp{version}{'_'.join(['', *config])}"),
            use_cpu=True,
            report_to=[],
            max_steps=1,
            per_device_train_batch_size=2,
            save_strategy="no",
            disable_tqdm=True,
            fsdp="full_shard",
            fsdp_config={"version": version, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], **config},
        )
        trainer = Trainer(
            model=tiny_model("llama", dtype=torch.float32).train(), args=args, train_dataset=TokenDataset()
        )
        trainer.train()
    except Exception as err:  # recorded: this is the measurement
        return {"error": f"{type(err).__name__}: {err}"}
    assert trainer.model is not None
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapper": type(trainer.model_wrapped).__name__,
        "parameter_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    directory = out / f"rank{rank}"
    directory.mkdir(parents=True, exist_ok=True)

    wrapped = FullyShardedDataParallel(tiny_model("llama", dtype=torch.float64), device_id=torch.device("cpu"))
    refused_fsdp1 = _refusal(wrapped)
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        tensors = relevance_tensors(wrapped.module)
    torch.save(tensors, directory / "relevance.pt")

    sharded = tiny_model("llama", dtype=torch.float64)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    refused_fsdp2 = _refusal(sharded)

    record = {
        "world_size": dist.get_world_size(),
        # FSDP1's flat parameters are plain Parameters marked _is_flat_param (their class name does not show it).
        "flat_parameters": sorted({bool(getattr(p, "_is_flat_param", False)) for p in wrapped.parameters()}),
        "refused_fsdp1": refused_fsdp1,
        "refused_fsdp2": refused_fsdp2,
        "trainer_fsdp1": _trainer_under_fsdp(out, 1),
        # transformers asks FSDP1 for sync_module_states=True by default, which accelerate >= 1.16 refuses on CPU
        "trainer_fsdp1_no_sync": _trainer_under_fsdp(out, 1, sync_module_states=False),
        "trainer_fsdp2": _trainer_under_fsdp(out, 2),
    }
    (directory / "record.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
