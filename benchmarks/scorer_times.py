"""Where a trade-off search's relevance time goes: each scoring method's passes, timed side by side in one run.

    python benchmarks/scorer_times.py --behaviour repetition --prompts 40 \\
        --output benchmarks/results/scorer_times_repetition.json

The search of ``hf-lrp-surgery fix-repetition --search`` computes, once per method, the neuron and head
scores of both paired sets (the undesired and the desired continuations of the train prompts). This
script builds the paired sets of the first ``--prompts`` attribution prompts exactly as the recipe does
(sampled and greedy continuations, focus on the undesired ones) and times each method's passes as the
search runs them: a one-set method (``lrp``, ``gradient``, ``activation``, ``wanda``) scores each set on
its own, a paired method (``aura``, ``atp``, ``repetition_neurons``) reads both at once. The shares say
which passes a shared pass would save; the absolute seconds scale with the sets' size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from correction_bench import BEHAVIOUR_CHOICES, chosen_behaviour

from hf_lrp_surgery.correction import paired_contrast_sets, recipe_split
from hf_lrp_surgery.models import load_model
from hf_lrp_surgery.options import ScoringOptions
from hf_lrp_surgery.references import shipped_splits
from hf_lrp_surgery.scoring import get_scorer
from hf_lrp_surgery.surgeon import Surgeon

_METHODS = ("lrp", "gradient", "atp", "activation", "wanda", "aura", "repetition_neurons")


def main() -> None:
    """Parse the arguments, build the paired sets, time every method, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--behaviour", choices=sorted(BEHAVIOUR_CHOICES), default="repetition")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=40, help="attribution prompts used (first N)")
    parser.add_argument("--methods", nargs="+", default=list(_METHODS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    if args.prompts < 1:
        parser.error("--prompts must be a count >= 1")
    for method in args.methods:
        get_scorer(method)  # an unknown name fails here, before the model loads
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    behaviour = chosen_behaviour(args.behaviour)
    attribution, _ = recipe_split(shipped_splits(behaviour.prompt_set))
    start = time.perf_counter()
    undesired, desired = paired_contrast_sets(model, tokenizer, attribution[: args.prompts], behaviour)
    sets_seconds = time.perf_counter() - start
    surgeon = Surgeon(model, tokenizer, batch_size=args.batch_size)
    seconds: dict[str, float] = {}
    for method in args.methods:
        options = ScoringOptions(method=method, components=("neurons", "heads"), batch_size=args.batch_size)
        start = time.perf_counter()
        if get_scorer(method).paired:
            surgeon.contrast(undesired=undesired, general=desired, options=options)
        else:
            surgeon.attribute(desired, options)
            surgeon.attribute(undesired, options)
        seconds[method] = time.perf_counter() - start
        print(f"{method}: {seconds[method]:.1f} s", flush=True)
    total = sum(seconds.values())
    result = {
        "command": " ".join(["python", *sys.argv]),
        "model": args.model,
        "behaviour": args.behaviour,
        "prompts": args.prompts,
        "samples": {"undesired": len(undesired), "desired": len(desired)},
        "reference_sets_seconds": round(sets_seconds, 1),
        "seconds": {m: round(s, 1) for m, s in seconds.items()},
        "shares": {m: round(s / total, 3) for m, s in seconds.items()},
        "threads": torch.get_num_threads(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
