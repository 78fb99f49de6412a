"""Relevance pass vs. plain gradient pass: time and peak memory, side by side on the same inputs.

Passes measured (same model, same token batch, same seed: each sample's last-token max logit):

* ``grad_all``: forward + backward writing ``.grad`` of every parameter (a training step's floor);
* ``grad_prunable``: forward + ``torch.autograd.grad`` w.r.t. the prunable weights only;
* ``relevance``: ``collect_relevance`` with neurons + heads + weights (signed sums);
* ``relevance_abs``: the same plus per-sample ``|R|`` of the weights.

Time is the median of ``--repeats`` interleaved runs after a warm-up. Peak memory is measured in
fresh subprocesses, the median of three per pass (CPU: peak RSS, ``VmHWM``, over the RSS after
loading; CUDA: ``max_memory_allocated`` over the allocation after loading).

Usage:
    python benchmarks/relevance_speed.py [--model smollm2-135m-instruct] [--batch-size 4]
        [--seq-len 128] [--repeats 5] [--device cpu] [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.collect import collect_relevance
from hf_lrp_surgery.models import load_model

PASSES = ("grad_all", "grad_prunable", "relevance", "relevance_abs")


def _inputs(vocab: int, batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (batch, length), generator=generator).tolist()


def _make_pass(name: str, model: torch.nn.Module, ids: list[list[int]], device: str) -> Callable[[], None]:
    tensor = torch.tensor(ids, device=device)
    mask = torch.ones_like(tensor)
    positions = torch.arange(tensor.shape[1], device=device).expand_as(tensor)
    prunable = [p.weight for p in resolve(model).prunable]

    def seed() -> torch.Tensor:
        return (
            model(input_ids=tensor, attention_mask=mask, position_ids=positions, use_cache=False)
            .logits[:, -1]
            .max(-1)
            .values.sum()
        )

    if name == "grad_all":

        def run() -> None:
            model.zero_grad(set_to_none=True)
            seed().backward()
    elif name == "grad_prunable":

        def run() -> None:
            torch.autograd.grad(seed(), prunable)
    else:

        def run() -> None:
            collect_relevance(
                model,
                ids,
                components=("neurons", "heads", "weights"),
                batch_size=len(ids),
                per_sample_abs_weights=name == "relevance_abs",
                progress=False,
            )

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _proc_status_bytes(key: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak of this process image; unlike ru_maxrss, not inherited over exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _memory_child(args: argparse.Namespace) -> None:
    """Run one pass in this fresh process and print its peak memory over the loaded model."""
    model, _ = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    run = _make_pass(
        args.measure_memory, model, _inputs(model.config.vocab_size, args.batch_size, args.seq_len), args.device
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        _sync(args.device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status_bytes("VmRSS")
        if _proc_status_bytes("VmHWM") > base:  # loading peaked higher: drop that peak
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        run()
        peak = _proc_status_bytes("VmHWM") - base
    print(json.dumps({"peak_bytes": peak}))


def _measure_memory(args: argparse.Namespace, name: str) -> int:
    """Median over three fresh processes (allocator and thread-pool scratch make one reading noisy)."""
    return int(statistics.median(_memory_once(args, name) for _ in range(3)))


def _memory_once(args: argparse.Namespace, name: str) -> int:
    command = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--measure-memory",
        name,
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(json.loads(output.strip().splitlines()[-1])["peak_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--measure-memory", choices=PASSES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        _memory_child(args)
        return

    model, _ = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    ids = _inputs(model.config.vocab_size, args.batch_size, args.seq_len)
    prunable_numel = sum(p.weight.numel() for p in resolve(model).prunable)
    times: dict[str, list[float]] = {name: [] for name in PASSES}
    runs = {name: _make_pass(name, model, ids, args.device) for name in PASSES}
    for run in runs.values():  # warm-up (and the cached fingerprint)
        run()
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every pass alike
        for name, run in runs.items():
            _sync(args.device)
            start = time.perf_counter()
            run()
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: _measure_memory(args, name) for name in PASSES}

    fp32_copy = prunable_numel * 4
    result: dict[str, Any] = {
        "model": args.model,
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "median_seconds": medians,
        "peak_memory_mib": {k: v / 2**20 for k, v in memory.items()},
        "prunable_fp32_copy_mib": fp32_copy / 2**20,
        "time_ratio_vs_grad_all": {k: medians[k] / medians["grad_all"] for k in PASSES},
        "time_ratio_vs_grad_prunable": {k: medians[k] / medians["grad_prunable"] for k in PASSES},
        "extra_memory_vs_grad_all_in_fp32_copies": {k: (memory[k] - memory["grad_all"]) / fp32_copy for k in PASSES},
        "extra_memory_vs_grad_prunable_in_fp32_copies": {
            k: (memory[k] - memory["grad_prunable"]) / fp32_copy for k in PASSES
        },
    }
    print(
        f"model {args.model}, {args.dtype} on {result['device']} ({result['threads']} threads), batch "
        f"{args.batch_size} x {args.seq_len} tokens, median of {args.repeats}"
    )
    print(
        f"{'pass':<15}{'time s':>8}{'x grad_all':>12}{'x grad_prun':>13}{'peak MiB':>10}"
        f"{'extra vs grad_all':>19}{'extra vs grad_prun':>20}"
    )
    for name in PASSES:
        print(
            f"{name:<15}{medians[name]:>8.3f}{result['time_ratio_vs_grad_all'][name]:>12.2f}"
            f"{result['time_ratio_vs_grad_prunable'][name]:>13.2f}{memory[name] / 2**20:>10.0f}"
            f"{result['extra_memory_vs_grad_all_in_fp32_copies'][name]:>19.2f}"
            f"{result['extra_memory_vs_grad_prunable_in_fp32_copies'][name]:>20.2f}"
        )
    print(f"extra memory in units of one fp32 copy of the prunable weights ({fp32_copy / 2**20:.0f} MiB)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
