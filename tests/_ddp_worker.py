"""One training run with ``LRPSurgeryCallback`` on a tiny fp64 Llama, under torchrun or in one process.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT`` trains with
DDP on two CPU processes (gloo), 2 samples per rank and step; :func:`run` with ``per_device_batch=4``
is the single-process run on the same samples (sequential sampling, so both see the same 4 samples
per step). Each rank writes what the test compares into ``OUT/rank<r>/``: the accumulated relevance,
the masks in force, and whether the weight mask's entries are still zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_model  # noqa: E402

from hf_lrp_surgery.lrp import ReferenceSample  # noqa: E402
from hf_lrp_surgery.masks import select  # noqa: E402
from hf_lrp_surgery.scoring import score  # noqa: E402
from hf_lrp_surgery.training import LRPSurgeryCallback  # noqa: E402

#: 5 and 3 samples: the ranks' shares differ in size (3/2 and 2/1), as they do in real runs.
GENERAL = [ReferenceSample([1, 5 + i, 6, 7, 9], continuation=[8, 9 + i]) for i in range(5)]
UNDESIRED = [ReferenceSample([1, 30 + i, 31, 32], continuation=[33, 34 + i, 35]) for i in range(3)]
STEPS = 4


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences of 12 tokens (ids 3..63), labels = inputs."""

    def __init__(self, size: int = 16) -> None:
        self.rows = [torch.randint(3, 64, (12,), generator=torch.Generator().manual_seed(i)) for i in range(size)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.rows[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def run(out: Path, per_device_batch: int) -> dict:
    """Train ``STEPS`` steps: relevance every 2 steps, a weight mask from the start, neuron surgery at the end."""
    torch.set_num_threads(1)
    model = tiny_model("llama", dtype=torch.float64)
    weight_mask = select(score(model, method="magnitude", components=("weights",)), "weights", 40)
    callback = LRPSurgeryCallback(
        undesired=UNDESIRED,
        general=GENERAL,
        masks=[weight_mask],
        granularity="neurons",
        budget=4,
        every_n_steps=2,
        surgery="end",
        carrier="bake",
        output_dir=str(out / "corrected"),
    )
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        report_to=[],
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        learning_rate=5e-3,
        logging_steps=100,
        save_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
    )
    trainer = Trainer(model=model.train(), args=args, train_dataset=TokenDataset())
    callback.attach(trainer)
    trainer.train()
    rank = trainer.args.process_index
    directory = out / f"rank{rank}"
    callback.accumulator.save(directory / "relevance")
    weights = dict(model.named_parameters())
    zero = all(
        bool((weights[f"{name}.weight"].detach().flatten()[index] == 0).all())
        for name, index in weight_mask.indices.items()
    )
    record = {
        "world_size": trainer.args.world_size,
        "rank": rank,
        "weight_mask_zero": zero,
        "masks": {g: {n: i.tolist() for n, i in m.indices.items()} for g, m in callback.masks.items()},
        "saved": [str(p) for p in callback.saved],
        "steps": callback.accumulator.steps,
    }
    (directory / "record.json").write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    run(Path(sys.argv[1]), per_device_batch=2)
