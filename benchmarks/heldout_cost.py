"""Where the detox recipe's held-out time goes, and how far the RealToxicityPrompts figures move with the seed.

    python benchmarks/heldout_cost.py --prompts 32 --output benchmarks/results/heldout_cost_detox.json

The held-out stage of ``hf-lrp-surgery detox`` measures the original and the corrected model: greedy
continuations of the held-out provocative prompts, the RealToxicityPrompts protocol (``k`` sampled
continuations per prompt), and the general-behaviour cost (perplexity on every domain, next-token KL,
the induction probe). This script times each part once on the original model, side by side in one run,
times the protocol at several generation batch sizes, and repeats the protocol with several sampling
seeds: the spread of expected maximum toxicity and toxicity probability across seeds is the sampling
noise a single protocol figure carries on that many prompts.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from hf_lrp_surgery.correction import detox_behaviour
from hf_lrp_surgery.correction.search import GeneralBaseline
from hf_lrp_surgery.evaluation import generate, next_token_kl, sample_protocol_toxicity
from hf_lrp_surgery.models import load_model
from hf_lrp_surgery.references import general_texts, shipped_set

_T = TypeVar("_T")


def _timed(seconds: dict[str, float], part: str, call: Callable[[], _T]) -> _T:
    """Run ``call`` once, record its wall seconds under ``part``, return its value."""
    start = time.perf_counter()
    value = call()
    seconds[part] = round(time.perf_counter() - start, 2)
    return value


def main() -> None:
    """Parse the arguments, time every part, repeat the protocol over seeds, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32, help="held-out provocative prompts used (first N)")
    parser.add_argument("--samples", type=int, default=10, help="protocol continuations per prompt (k)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if args.prompts < 1 or args.samples < 1 or min(args.batch_sizes) < 1:
        parser.error("--prompts, --samples and --batch-sizes must be counts >= 1")
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    behaviour = detox_behaviour()
    scorer = behaviour.details["scorer"]
    prompts = list(behaviour.prompts_for("heldout"))[: args.prompts]
    neutral = shipped_set("neutral_prompts", "heldout")

    seconds: dict[str, float] = {}
    generations = _timed(
        seconds, "greedy", lambda: generate(model, tokenizer, prompts, behaviour.decoding, progress=False)
    )
    _timed(seconds, "greedy_scoring", lambda: behaviour.measure(generations))
    general = _timed(
        seconds,
        "general_baseline",
        lambda: GeneralBaseline.of(model, tokenizer, neutral, general_texts("heldout"), induction_sequences=16),
    )
    _timed(seconds, "next_token_kl", lambda: next_token_kl(model, model, tokenizer, neutral, progress=False))
    _timed(seconds, "induction_probe", lambda: general.probe(model, tokenizer))

    def protocol(batch_size: int, seed: int) -> dict[str, float]:
        result = sample_protocol_toxicity(
            model, tokenizer, prompts, scorer, samples=args.samples, batch_size=batch_size, seed=seed, progress=False
        )
        return {
            "expected_max_toxicity": result.expected_max_toxicity,
            "toxicity_probability": result.toxicity_probability,
        }

    by_batch: dict[int, dict[str, float]] = {}
    for batch_size in args.batch_sizes:
        part = f"protocol_batch{batch_size}"
        figures = _timed(seconds, part, functools.partial(protocol, batch_size, args.seeds[0]))
        by_batch[batch_size] = {"seconds": seconds[part], **figures}
    by_seed = {seed: protocol(args.batch_sizes[0], seed) for seed in args.seeds}
    spread = {
        key: {
            "mean": statistics.fmean(v[key] for v in by_seed.values()),
            "std": statistics.stdev(v[key] for v in by_seed.values()) if len(by_seed) > 1 else 0.0,
            "min": min(v[key] for v in by_seed.values()),
            "max": max(v[key] for v in by_seed.values()),
        }
        for key in ("expected_max_toxicity", "toxicity_probability")
    }
    report = {
        "model": args.model,
        "prompts": len(prompts),
        "samples": args.samples,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "protocol_by_batch_size": by_batch,
        "protocol_by_seed": by_seed,
        "protocol_seed_spread": spread,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
