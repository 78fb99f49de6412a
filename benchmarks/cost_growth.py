"""How the relevance pass's cost grows with model size, sequence length and dtype, against the gradient floor.

Random-init models of real shapes are built from locally written configs (nothing is downloaded):
SmolLM2-135M, SmolLM2-360M, TinyLlama-1.1B and SmolLM2-1.7B (Llama architecture, sdpa attention).
For every grid point the passes run side by side, interleaved, in one process, on the same model, the
same random token batch and the same objective (each sample's last-token max logit):

* ``grad_all``: forward + ``backward()`` writing ``.grad`` of every parameter (a training step's floor);
* ``grad_prunable``: forward + ``torch.autograd.grad`` w.r.t. the prunable weights (the leanest floor
  that still computes every weight gradient, as weight relevance must);
* ``relevance``: ``collect_relevance(components=("neurons", "heads", "weights"))``;
* ``relevance_lean``: ``relevance`` with ``weight_buffers="model"`` (weight sums in the model's dtype:
  the same as ``relevance`` in fp32, half its weight-sized buffers in bf16);
* ``relevance_units``: the same without ``"weights"`` (neurons + heads: no weight-sized buffers).

**Reduced depth.** A full-depth 1.7B model at 2,048 tokens does not fit a 2-core machine's time, so by
default every model is measured at 1 and 3 decoder layers of its real width (real embedding, head and
vocabulary). Time and peak memory are linear in the number of layers (each block adds the same work and
the same saved activations), so ``per_layer = (x(3) - x(1)) / 2`` and ``fixed = x(1) - per_layer``
(embedding, final norm, head, logits), and the full-depth figure is ``fixed + layers * per_layer``. The
linearity is checked on one point by measuring SmolLM2-135M at its full 30 layers (``--check-depth``)
and comparing with the figure scaled from 1 and 3 layers.

**Time**: the median of ``--repeats`` interleaved runs after a warm-up run of every pass on a short input.

**Peak memory** (CPU): before each run the process's freed memory is returned to the OS (``gc.collect``,
``malloc_trim``) and the peak-RSS counter is reset (``/proc/self/clear_refs``, value 5); the run's peak
is ``VmHWM`` minus the RSS before it, i.e. what the pass adds on top of the loaded model. glibc's
``mmap`` threshold is pinned at 128 KiB (``mallopt``; this turns off its dynamic growth), so every
tensor buffer is its own mapping and freeing it lowers the RSS at once: without this, freed tensors
stay in the heap and a later pass reuses them without raising the RSS. A calibration run (one
256 MiB tensor) is recorded in the results. On CUDA: ``max_memory_allocated`` minus the allocation
before the run.

Usage:
    python benchmarks/cost_growth.py [--models smollm2-135m,...] [--dtypes float32,bfloat16]
        [--seq-lens 128,512,2048] [--layers 1,3] [--repeats 2] [--skip MODEL/DTYPE/SEQ,...]
        [--check-depth | --no-check-depth] [--device cpu] [--output benchmarks/results/cost_growth.json]
        [--reanalyse RESULTS.json]  (recompute the derived figures of a finished run, measuring nothing)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.collect import collect_relevance

PASSES = ("grad_all", "grad_prunable", "relevance", "relevance_lean", "relevance_units")
RELEVANCE_PASSES = ("relevance", "relevance_lean", "relevance_units")
FLOORS = ("grad_all", "grad_prunable")
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "cost_growth.json"

#: Real shapes (config.json of each checkpoint on the Hub, written out here).
MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    ),
    "smollm2-360m": dict(
        hidden_size=960,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        intermediate_size=2560,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    "smollm2-1.7b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=8192,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=130000.0,
        rms_norm_eps=1e-5,
    ),
}
#: Projection targets (their config.json values).
TARGETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "qwen3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
}
#: Grid points left out by default to keep the run near 25 minutes on a 2-core CPU shared with other jobs
#: (measured there: ~30 GFLOP/s in fp32, ~4x that in bf16). 2,048 tokens run in bf16 on the smallest
#: and the largest model.
DEFAULT_SKIP = ",".join(
    [
        *(f"{m}/float32/2048" for m in MODELS),
        "tinyllama-1.1b/float32/512",
        "smollm2-1.7b/float32/512",
        "smollm2-360m/bfloat16/2048",
        "tinyllama-1.1b/bfloat16/2048",
    ]
)
GPU_BYTES = 80 * 10**9


# -- shapes -----------------------------------------------------------------------------------
def layer_params(shape: dict[str, Any]) -> int:
    """Prunable parameters of one Llama block (q, k, v, o, gate, up, down; norms not counted)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim") or hidden // shape["num_attention_heads"]
    q = shape["num_attention_heads"] * head_dim
    kv = shape["num_key_value_heads"] * head_dim
    return hidden * q * 2 + hidden * kv * 2 + 3 * hidden * inter


def fixed_params(shape: dict[str, Any]) -> int:
    """Embedding and head parameters (one matrix when tied)."""
    matrix = shape["vocab_size"] * shape["hidden_size"]
    return matrix if shape["tie_word_embeddings"] else 2 * matrix


def total_params(shape: dict[str, Any], layers: int | None = None) -> int:
    depth = shape["num_hidden_layers"] if layers is None else layers
    return depth * (layer_params(shape) + 2 * shape["hidden_size"]) + fixed_params(shape) + shape["hidden_size"]


def build_model(name: str, layers: int, dtype: torch.dtype, device: str) -> PreTrainedModel:
    """A random-init model of ``name``'s real width with ``layers`` decoder blocks, in eval mode."""
    config = LlamaConfig(
        **{**MODELS[name], "num_hidden_layers": layers},
        max_position_embeddings=8192,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (a full-depth 1.7B takes minutes to init on a CPU)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# -- memory -----------------------------------------------------------------------------------
_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def pin_mmap_threshold() -> bool:
    """Make glibc serve every allocation above 128 KiB by its own ``mmap`` (freed at once). Returns success."""
    libc = _libc()
    m_mmap_threshold = -3
    return bool(libc) and bool(libc.mallopt(m_mmap_threshold, 128 * 1024))


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(run: Callable[[], Any], device: str) -> tuple[float, int]:
    """``(seconds, peak bytes over the memory before the run)`` of one call of ``run``."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        libc = _libc()
        if libc:
            libc.malloc_trim(0)
        base = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        peak = _proc_status_bytes("VmHWM") - base
    del result
    return seconds, peak


def calibrate(device: str) -> dict[str, float]:
    """Measure a run that holds exactly one 256 MiB tensor: the method's error on a known peak."""
    size = 256 * 2**20

    def run() -> torch.Tensor:
        return torch.ones(size // 4, dtype=torch.float32, device=device)

    measure(run, device)
    _, peak = measure(run, device)
    return {"allocated_mib": size / 2**20, "measured_mib": peak / 2**20}


# -- passes -----------------------------------------------------------------------------------
def make_passes(model: PreTrainedModel, ids: list[list[int]], device: str) -> dict[str, Callable[[], Any]]:
    """The four passes on one token batch; each returns what it produced (held until measured)."""
    tensor = torch.tensor(ids, device=device)
    mask = torch.ones_like(tensor)
    positions = torch.arange(tensor.shape[1], device=device).expand_as(tensor)
    prunable = [p.weight for p in resolve(model).prunable]

    def objective() -> torch.Tensor:
        logits = model(input_ids=tensor, attention_mask=mask, position_ids=positions, use_cache=False).logits
        return logits[:, -1].float().max(-1).values.sum()

    def grad_all() -> Any:
        model.zero_grad(set_to_none=True)
        objective().backward()
        grads = [p.grad for p in model.parameters()]
        model.zero_grad(set_to_none=True)  # freed after the measurement, with the rest of the result
        return grads

    def grad_prunable() -> Any:
        return torch.autograd.grad(objective(), prunable)

    def relevance(components: tuple[str, ...], weight_buffers: str = "float32") -> Callable[[], Any]:
        return lambda: collect_relevance(
            model,
            ids,
            components=components,
            batch_size=len(ids),
            weight_buffers=weight_buffers,  # type: ignore[arg-type]
            progress=False,
            description="relevance",
        )

    return {
        "grad_all": grad_all,
        "grad_prunable": grad_prunable,
        "relevance": relevance(("neurons", "heads", "weights")),
        "relevance_lean": relevance(("neurons", "heads", "weights"), "model"),
        "relevance_units": relevance(("neurons", "heads")),
    }


def tokens(vocab: int, batch: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(3, vocab, (batch, length), generator=generator).tolist()


# -- grid -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """One model build (model, dtype, depth) and the sequence lengths measured on it."""

    model: str
    dtype: str
    layers: int
    seq_lens: tuple[int, ...]


def plan(args: argparse.Namespace) -> list[Group]:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    groups = []
    for name in args.models:
        for dtype in args.dtypes:
            seqs = tuple(s for s in args.seq_lens if f"{name}/{dtype}/{s}" not in skip)
            if not seqs:
                continue
            groups += [Group(name, dtype, layers, seqs) for layers in args.layers]
    if args.check_depth:
        check = args.check_model
        full = MODELS[check]["num_hidden_layers"]
        for dtype in args.dtypes:
            groups.append(Group(check, dtype, full, (args.check_seq_len,)))
    return groups


def run_grid(
    args: argparse.Namespace, groups: Sequence[Group], checkpoint: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """Measure every group; ``checkpoint(points)`` is called after each (partial results survive a kill)."""
    points: list[dict[str, Any]] = []
    total = sum(len(g.seq_lens) for g in groups) * len(args.passes) * args.repeats
    with tqdm(total=total, desc="cost growth", unit="run") as bar:
        for group in groups:
            dtype = getattr(torch, group.dtype)
            bar.set_postfix_str(f"{group.model} {group.dtype} L={group.layers} (building)")
            model = build_model(group.model, group.layers, dtype, args.device)
            numel = sum(p.numel() for p in model.parameters())
            prunable = sum(p.weight.numel() for p in resolve(model).prunable)
            warm = make_passes(model, tokens(model.config.vocab_size, args.batch_size, 16), args.device)
            for name in args.passes:  # warm-up: thread pools, the cached fingerprint
                warm[name]()
            del warm
            for seq in group.seq_lens:
                bar.set_postfix_str(f"{group.model} {group.dtype} L={group.layers} T={seq}")
                runs = make_passes(model, tokens(model.config.vocab_size, args.batch_size, seq), args.device)
                times: dict[str, list[float]] = {p: [] for p in args.passes}
                peaks: dict[str, list[int]] = {p: [] for p in args.passes}
                for _ in range(args.repeats):  # interleaved: drifts in machine load hit every pass alike
                    for name in args.passes:
                        seconds, peak = measure(runs[name], args.device)
                        times[name].append(seconds)
                        peaks[name].append(peak)
                        bar.update(1)
                del runs
                points.append(
                    {
                        "model": group.model,
                        "dtype": group.dtype,
                        "layers": group.layers,
                        "seq_len": seq,
                        "batch_size": args.batch_size,
                        "parameters": numel,
                        "prunable_parameters": prunable,
                        "seconds": {p: statistics.median(v) for p, v in times.items()},
                        "peak_bytes": {p: int(statistics.median(v)) for p, v in peaks.items()},
                        "all_seconds": times,
                        "all_peak_bytes": peaks,
                    }
                )
            del model
            gc.collect()
            checkpoint(points)
    return points


# -- analysis ---------------------------------------------------------------------------------
def _point(points: Sequence[dict[str, Any]], model: str, dtype: str, layers: int, seq: int) -> dict[str, Any] | None:
    return next(
        (p for p in points if (p["model"], p["dtype"], p["layers"], p["seq_len"]) == (model, dtype, layers, seq)),
        None,
    )


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` (exact through two points)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def scale_to_depth(
    points: Sequence[dict[str, Any]], reduced: tuple[int, int], passes: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-layer and fixed costs from two reduced depths, and the full-depth figures they give."""
    low, high = reduced
    derived = []
    keys = sorted({(p["model"], p["dtype"], p["seq_len"]) for p in points})
    for model, dtype, seq in keys:
        a, b = _point(points, model, dtype, low, seq), _point(points, model, dtype, high, seq)
        if a is None or b is None:
            continue
        full = MODELS[model]["num_hidden_layers"]
        entry: dict[str, Any] = {"model": model, "dtype": dtype, "seq_len": seq, "layers": full}
        for metric, unit in (("seconds", "seconds"), ("peak_bytes", "peak_bytes")):
            per_layer = {p: (b[metric][p] - a[metric][p]) / (high - low) for p in passes}
            fixed = {p: a[metric][p] - low * per_layer[p] for p in passes}
            entry[f"{unit}_per_layer"] = per_layer
            entry[f"{unit}_fixed"] = fixed
            entry[f"{unit}_full_depth"] = {p: fixed[p] + full * per_layer[p] for p in passes}
        shape = MODELS[model]
        matmul_params = full * layer_params(shape) + shape["vocab_size"] * shape["hidden_size"]
        tokens_ = seq * a["batch_size"]
        entry["matmul_parameters"] = matmul_params
        entry["ns_per_token_parameter"] = {
            p: 1e9 * entry["seconds_full_depth"][p] / (tokens_ * matmul_params) for p in passes
        }
        entry["layer_peak_bytes_per_token"] = {p: entry["peak_bytes_per_layer"][p] / tokens_ for p in passes}
        for floor in FLOORS:
            if floor not in passes:
                continue
            for pass_ in RELEVANCE_PASSES:
                if pass_ not in passes:
                    continue
                entry[f"time_ratio_{pass_}_vs_{floor}"] = (
                    entry["seconds_full_depth"][pass_] / entry["seconds_full_depth"][floor]
                )
                entry[f"memory_ratio_{pass_}_vs_{floor}"] = (
                    entry["peak_bytes_full_depth"][pass_] / entry["peak_bytes_full_depth"][floor]
                )
        derived.append(entry)
    return derived


def depth_check(
    points: Sequence[dict[str, Any]], derived: Sequence[dict[str, Any]], model: str, seq: int, passes: Sequence[str]
) -> list[dict[str, Any]]:
    """Measured full depth vs the figure scaled from the reduced depths (the linearity check)."""
    checks = []
    full = MODELS[model]["num_hidden_layers"]
    for entry in derived:
        if (entry["model"], entry["seq_len"]) != (model, seq):
            continue
        measured = _point(points, model, entry["dtype"], full, seq)
        if measured is None:
            continue
        check: dict[str, Any] = {"model": model, "dtype": entry["dtype"], "seq_len": seq, "layers": full}
        for metric in ("seconds", "peak_bytes"):
            check[f"{metric}_measured"] = measured[metric]
            check[f"{metric}_scaled"] = entry[f"{metric}_full_depth"]
            check[f"{metric}_scaled_over_measured"] = {
                p: entry[f"{metric}_full_depth"][p] / measured[metric][p] for p in passes
            }
        for floor in FLOORS:
            if "relevance" in passes and floor in passes:
                check[f"time_ratio_relevance_vs_{floor}_measured"] = (
                    measured["seconds"]["relevance"] / measured["seconds"][floor]
                )
                check[f"memory_ratio_relevance_vs_{floor}_measured"] = (
                    measured["peak_bytes"]["relevance"] / measured["peak_bytes"][floor]
                )
        checks.append(check)
    return checks


def memory_model(
    points: Sequence[dict[str, Any]], reduced: tuple[int, int], passes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per dtype and pass: peak bytes as a function of shape, fitted on the measured models.

    Per layer: ``peak = bytes_per_param * layer_params + T * (alpha * hidden + beta * intermediate)``;
    fixed part: ``peak = T * gamma * vocab`` (logits and their gradient; the embedding's and head's
    parameter-sized buffers go into ``fixed_bytes_per_param``).
    """
    low, high = reduced
    fits: dict[str, dict[str, Any]] = {}
    for dtype in sorted({p["dtype"] for p in points}):
        fits[dtype] = {}
        for pass_ in passes:
            per_param: list[float] = []
            per_token_rows: list[tuple[float, float, float]] = []
            fixed_token: list[float] = []
            fixed_param: list[float] = []
            for model in sorted({p["model"] for p in points if p["dtype"] == dtype}):
                shape = MODELS[model]
                seqs = sorted({p["seq_len"] for p in points if (p["model"], p["dtype"]) == (model, dtype)})
                layer_rows, fixed_rows = [], []
                for seq in seqs:
                    a, b = _point(points, model, dtype, low, seq), _point(points, model, dtype, high, seq)
                    if a is None or b is None:
                        continue
                    layer = (b["peak_bytes"][pass_] - a["peak_bytes"][pass_]) / (high - low)
                    layer_rows.append((seq * a["batch_size"], layer))
                    fixed_rows.append((seq * a["batch_size"], a["peak_bytes"][pass_] - low * layer))
                if len(layer_rows) < 2:
                    continue
                intercept, slope = _fit_line([t for t, _ in layer_rows], [v for _, v in layer_rows])
                per_param.append(intercept / layer_params(shape))
                per_token_rows.append((shape["hidden_size"], shape["intermediate_size"], slope))
                f_intercept, f_slope = _fit_line([t for t, _ in fixed_rows], [v for _, v in fixed_rows])
                fixed_token.append(f_slope / shape["vocab_size"])
                fixed_param.append(f_intercept / fixed_params(shape))
            if not per_token_rows:
                continue
            alpha, beta = _two_term_fit(per_token_rows)
            fits[dtype][pass_] = {
                "layer_bytes_per_param": statistics.median(per_param),
                "layer_bytes_per_param_all": per_param,
                "layer_bytes_per_token_alpha_hidden": alpha,
                "layer_bytes_per_token_beta_intermediate": beta,
                "layer_bytes_per_token_rows": per_token_rows,
                "fixed_bytes_per_token_per_vocab": statistics.median(fixed_token),
                "fixed_bytes_per_param": statistics.median(fixed_param),
            }
    return fits


def _two_term_fit(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares ``y = alpha * h + beta * i`` (no intercept) over ``(h, i, y)`` rows."""
    shh = sum(h * h for h, _, _ in rows)
    sii = sum(i * i for _, i, _ in rows)
    shi = sum(h * i for h, i, _ in rows)
    shy = sum(h * y for h, _, y in rows)
    siy = sum(i * y for _, i, y in rows)
    det = shh * sii - shi * shi
    if abs(det) < 1e-9 * shh * sii:  # one shape only: put it all on the intermediate size
        return 0.0, siy / sii
    return (shy * sii - siy * shi) / det, (siy * shh - shy * shi) / det


def project(
    derived: Sequence[dict[str, Any]], fits: dict[str, dict[str, Any]], seq: int, batches: Sequence[int]
) -> dict[str, Any]:
    """Projected peak memory of the 8B targets (weights + what each pass adds), anchored on one measured shape.

    The anchor is the largest model measured in bf16 at the longest sequence (SmolLM2-1.7B at 2,048 tokens
    by default). Per layer, the pass adds ``bytes_per_param * layer_params`` (the parameter-sized buffers:
    ``.grad``, returned gradients, fp32 weight relevance; the median over the measured models) plus
    activations; the activations per token are the anchor's per-layer peak minus its parameter part, scaled
    by ``hidden + intermediate`` of the target. The fixed part (logits, their gradient) per token is the
    anchor's, scaled by the vocabulary. float32: activations and fixed part twice bf16's, gradient buffers
    4 bytes per parameter (also the weight relevance of ``relevance_lean``, held in the model's dtype), fp32
    weight relevance of ``relevance`` unchanged (it is fp32 in both).
    """
    anchors = [e for e in derived if e["dtype"] == "bfloat16"]
    if not anchors or "bfloat16" not in fits:
        return {"anchor": None, "rows": []}
    anchor = max(anchors, key=lambda e: (layer_params(MODELS[e["model"]]), e["seq_len"]))
    a_shape = MODELS[anchor["model"]]
    a_tokens = anchor["seq_len"]  # batch 1
    a_width = a_shape["hidden_size"] + a_shape["intermediate_size"]
    rows = []
    for pass_, fit in fits["bfloat16"].items():
        bf16_param = max(fit["layer_bytes_per_param"], 0.0)
        activation = max(anchor["peak_bytes_per_layer"][pass_] - bf16_param * layer_params(a_shape), 0.0) / a_tokens
        fixed = max(anchor["peak_bytes_fixed"][pass_], 0.0) / a_tokens / a_shape["vocab_size"]
        for dtype in ("bfloat16", "float32"):
            wide = 2.0 if dtype == "float32" else 1.0
            # Buffers in the model's dtype (the gradients, weight_buffers="model") double in fp32.
            model_dtype_buffers = pass_.startswith("grad") or pass_ == "relevance_lean"
            per_param = bf16_param * (2.0 if dtype == "float32" and model_dtype_buffers else 1.0)
            for target, shape in TARGETS.items():
                layers = shape["num_hidden_layers"]
                width = shape["hidden_size"] + shape["intermediate_size"]
                weight_bytes = total_params(shape) * (4 if dtype == "float32" else 2)
                param_part = layers * per_param * layer_params(shape)
                for batch in batches:
                    tokens_ = seq * batch
                    token_part = wide * tokens_ * (layers * activation * width / a_width + fixed * shape["vocab_size"])
                    total = weight_bytes + param_part + token_part
                    rows.append(
                        {
                            "target": target,
                            "dtype": dtype,
                            "pass": pass_,
                            "batch_size": batch,
                            "seq_len": seq,
                            "parameters": total_params(shape),
                            "weights_gb": weight_bytes / 1e9,
                            "parameter_sized_gb": param_part / 1e9,
                            "activations_gb": token_part / 1e9,
                            "total_gb": total / 1e9,
                            "fits_80gb": total <= GPU_BYTES,
                        }
                    )
    return {
        "anchor": {"model": anchor["model"], "dtype": "bfloat16", "seq_len": a_tokens},
        "bytes_per_param_bf16": {k: v["layer_bytes_per_param"] for k, v in fits["bfloat16"].items()},
        "rows": rows,
    }


def analyse(points: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Everything derived from the measured points (also run alone by ``--reanalyse``)."""
    reduced = (args.layers[0], args.layers[1])
    passes = [p for p in args.passes if all(p in point["seconds"] for point in points)]
    derived = scale_to_depth(points, reduced, passes)
    checks = depth_check(points, derived, args.check_model, args.check_seq_len, passes) if args.check_depth else []
    fits = memory_model(points, reduced, passes)
    return {
        "reduced_layers": list(reduced),
        "full_depth": derived,
        "depth_check": checks,
        "memory_model": fits,
        "projection": project(derived, fits, args.project_seq_len, args.project_batches),
    }


# -- main -------------------------------------------------------------------------------------
def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values

    return parse


def _model_name(text: str) -> str:
    if text not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; known: {', '.join(MODELS)}")
    return text


def _dtype_name(text: str) -> str:
    if text not in ("float32", "bfloat16"):
        raise argparse.ArgumentTypeError(f"dtype must be float32 or bfloat16, got {text!r}")
    return text


def _pass_name(text: str) -> str:
    if text not in PASSES:
        raise argparse.ArgumentTypeError(f"unknown pass {text!r}; known: {', '.join(PASSES)}")
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_csv(_model_name), default=list(MODELS))
    parser.add_argument("--dtypes", type=_csv(_dtype_name), default=["float32", "bfloat16"])
    parser.add_argument("--seq-lens", type=_csv(int), default=[128, 512, 2048])
    parser.add_argument(
        "--layers",
        type=_csv(int),
        default=[1, 3],
        help="two reduced depths of real width to measure (default 1,3); full depth is scaled from them",
    )
    parser.add_argument("--passes", type=_csv(_pass_name), default=list(PASSES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--skip", default=DEFAULT_SKIP, help="MODEL/DTYPE/SEQ points to leave out (comma-separated)")
    parser.add_argument("--check-depth", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--check-model", type=_model_name, default="smollm2-135m")
    parser.add_argument("--check-seq-len", type=int, default=128)
    parser.add_argument("--project-seq-len", type=int, default=2048)
    parser.add_argument("--project-batches", type=_csv(int), default=[1, 2, 4, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--reanalyse", type=Path, help="recompute the derived figures of this results JSON (no runs)")
    args = parser.parse_args(argv)
    if len(args.layers) != 2 or args.layers[0] >= args.layers[1] or args.layers[0] < 1:
        parser.error("--layers takes two increasing depths >= 1, e.g. 1,3")
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be >= 1")
    if args.check_depth and args.check_seq_len not in args.seq_lens:
        parser.error("--check-seq-len must be one of --seq-lens (the check compares with the scaled figure there)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reanalyse:  # recompute the derived figures of a finished run, measuring nothing
        result = json.loads(args.reanalyse.read_text())
        result.update(analyse(result["points"], args))
        args.output.write_text(json.dumps(result, indent=1))
        print_summary(result)
        return
    pinned = pin_mmap_threshold() if args.device == "cpu" else False
    calibration = calibrate(args.device)
    groups = plan(args)
    started = time.time()
    load_before = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(points: list[dict[str, Any]]) -> None:
        args.output.write_text(json.dumps({"partial": True, "points": points}, indent=1))

    points = run_grid(args, groups, checkpoint)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mmap_threshold_pinned": pinned,
        "memory_calibration": calibration,
        "wall_minutes": (time.time() - started) / 60,
        # Load average (1, 5, 15 min) before and after: other jobs on the cores make single timings noisy.
        "load_average": {"before": list(load_before), "after": list(os.getloadavg()), "cores": os.cpu_count()},
        "repeats": args.repeats,
        "points": points,
        **analyse(points, args),
    }
    args.output.write_text(json.dumps(result, indent=1))
    print_summary(result)


def print_summary(result: dict[str, Any]) -> None:
    print(f"calibration: {result['memory_calibration']}; wall {result['wall_minutes']:.1f} min")
    header = f"{'model':<16}{'dtype':<10}{'T':>6}{'t rel/all':>11}{'t rel/prun':>12}{'m rel/all':>11}{'m rel/prun':>12}"
    print(header)
    for e in result["full_depth"]:
        print(
            f"{e['model']:<16}{e['dtype']:<10}{e['seq_len']:>6}"
            f"{e.get('time_ratio_relevance_vs_grad_all', float('nan')):>11.2f}"
            f"{e.get('time_ratio_relevance_vs_grad_prunable', float('nan')):>12.2f}"
            f"{e.get('memory_ratio_relevance_vs_grad_all', float('nan')):>11.2f}"
            f"{e.get('memory_ratio_relevance_vs_grad_prunable', float('nan')):>12.2f}"
        )
    print("measured (no scaling), over grad_prunable:")
    for p in result["points"]:
        floor_s, floor_m = p["seconds"].get("grad_prunable"), p["peak_bytes"].get("grad_prunable")
        if not floor_s:
            continue
        ratios = "  ".join(
            f"{name} t {p['seconds'][name] / floor_s:.2f} m {p['peak_bytes'][name] / max(floor_m, 1):.2f}"
            for name in RELEVANCE_PASSES
            if name in p["seconds"]
        )
        print(f"  {p['model']:<16}{p['dtype']:<10}L={p['layers']:<3}T={p['seq_len']:<6}{ratios}")
    for c in result["depth_check"]:
        print(f"depth check {c['model']} {c['dtype']}: scaled/measured time {c['seconds_scaled_over_measured']}")
        print(f"  memory {c['peak_bytes_scaled_over_measured']}")


if __name__ == "__main__":
    main()
