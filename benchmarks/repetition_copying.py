"""Is there a repetition correction that keeps in-context copying? Hard, dampened and copy-guarded masks, probed.

    python benchmarks/repetition_copying.py --output docs/results/repetition_copying/dampened.json \\
        --points lrp:heads:5:0.5 gradient:heads:10:0.75 aura:heads:5:0.5
    python benchmarks/repetition_copying.py --output docs/results/repetition_copying/guarded.json \\
        --points lrp:heads:2 lrp:heads:5 --copy-guards 0 0.1 0.3 --all-effects

On SmolLM2 every repetition correction the trade-off search found that raises the validation RUR past
0.62 is refused by the induction probe (random token sequences shown twice: the second copy's loss may
rise by at most 0.25 nats): the heads that sustain a loop are the heads that copy. This benchmark
measures, on the repetition recipe's paired sets (version 2) and validation prompts, what two ways out
do:

* **dampening** instead of pruning (``METHOD:GRANULARITY:BUDGET:ALPHA``: every selected unit scaled by
  ``ALPHA``, or ``relevance`` / ``aura`` for those rules): a loop is a self-reinforcing copy, so a
  weaker copy might break it while copying a random sequence still works;
* **a copy guard** (``--copy-guards Q ...``, contrast methods only): the units in the top ``Q`` fraction
  of ``|score|`` on a third reference set, 32 random sequences of 50 tokens shown twice with the second
  copy explained (seed 7, not one of the probe's seeds 0 and 1), are never pruned.

Each point is baked and measured first on the cheap limits (KL on the train neutral prompts and the
induction probe with the search's seed 0); the validation RUR (93 prompts, 50 greedy tokens) is measured
only when both hold, or always with ``--all-effects`` (then the perplexity of every general-text domain
too). The held-out split is never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from correction_bench import chosen_behaviour, reference_sets

from hf_lrp_surgery.carriers import apply_masks
from hf_lrp_surgery.correction import GeneralBaseline, GeneralLimits, recipe_split
from hf_lrp_surgery.evaluation import generate, induction_sequences
from hf_lrp_surgery.io import write_json_atomic
from hf_lrp_surgery.masks import select
from hf_lrp_surgery.models import DEFAULT_MODEL, load_model
from hf_lrp_surgery.references import general_texts, shipped_set, shipped_splits
from hf_lrp_surgery.references.samples import ReferenceSample
from hf_lrp_surgery.scoring import PAIRED_METHODS, Scores
from hf_lrp_surgery.surgeon import Surgeon

#: Seed of the copy guard's random sequences (the induction probe uses 0 in the search, 1 held out).
GUARD_SEED = 7


def _point(text: str) -> tuple[str, str, int, float | str | None]:
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"{text!r}: write METHOD:GRANULARITY:BUDGET[:ALPHA|relevance|aura]")
    damp: float | str | None = None
    if len(parts) == 4:
        try:
            damp = float(parts[3])
        except ValueError:
            damp = parts[3]
    return parts[0], parts[1], int(parts[2]), damp


def _guarded(scores: Scores, copy: Scores, granularity: str, share: float) -> Scores:
    """``scores`` with the top ``share`` of ``copy``'s ``|score|`` set to ``+inf`` (never pruned)."""
    values = getattr(scores, granularity)
    order = torch.sort(getattr(copy, granularity).abs().flatten(), descending=True, stable=True).indices
    flat = values.flatten().clone()
    flat[order[: int(share * flat.numel())]] = torch.inf
    return dataclasses.replace(scores, **{granularity: flat.view_as(values)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", type=_point, required=True)
    parser.add_argument("--copy-guards", nargs="+", type=float, default=[0.0])
    parser.add_argument("--all-effects", action="store_true", help="measure RUR and every domain at every point")
    parser.add_argument("--cache", default="runs/repetition_copying/reference_sets.json")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL)
    behaviour = chosen_behaviour("repetition")
    undesired, desired = reference_sets(model, tokenizer, behaviour, DEFAULT_MODEL, Path(args.cache))
    _, validation = recipe_split(shipped_splits(behaviour.prompt_set))
    vocabulary = min(len(tokenizer), int(model.config.vocab_size))
    rows = induction_sequences(tokenizer, vocabulary, sequences=32, seed=GUARD_SEED)
    copy_set = [ReferenceSample(r, r, focus=list(range(1, len(r)))) for r in rows]
    surgeon = Surgeon(model, tokenizer, progress=False)
    limits = GeneralLimits()
    general = GeneralBaseline.of(model, tokenizer, shipped_set("neutral_prompts", "train"), general_texts("train", 5))
    before = behaviour.measure(generate(model, tokenizer, validation, behaviour.decoding, progress=False))
    print("before:", json.dumps(before), flush=True)
    scores: dict[tuple[str, str], Scores] = {}
    copies: dict[tuple[str, str], Scores] = {}
    results: list[dict[str, Any]] = []
    for method, granularity, budget, damp in args.points:
        key = (method, granularity)
        if key not in scores:
            if method in PAIRED_METHODS:
                scores[key] = surgeon.contrast(
                    undesired=undesired, general=desired, method=method, components=(granularity,)
                )
            else:
                scores[key] = surgeon.contrast(
                    undesired=undesired, general=desired, method=method, components=(granularity,), protect_top=0.05
                )
                if any(args.copy_guards):
                    copies[key] = surgeon.attribute(copy_set, method=method, components=(granularity,))
        for share in args.copy_guards if key in copies else [0.0]:
            chosen = _guarded(scores[key], copies[key], granularity, share) if share else scores[key]
            candidate = apply_masks(model, select(chosen, granularity, budget, dampen=damp), "bake").model
            row: dict[str, Any] = {
                "method": method,
                "granularity": granularity,
                "budget": budget,
                "dampen": damp,
                "copy_guard": share,
            }
            if args.all_effects:
                cost = general.cost(model, candidate, tokenizer, limits)
                row.update(kl=cost.kl, induction_increase=cost.induction_increase, exceeded=list(cost.exceeded))
                row["perplexity_increases"] = dict(cost.perplexity_increases)
                cheap = [e for e in cost.exceeded if e in ("kl", "induction")]
            else:
                row["kl"], row["induction_increase"], cheap = general.screen(model, candidate, tokenizer, limits)
            cheap_ok = row["within_cheap_limits"] = not cheap
            if cheap_ok or args.all_effects:
                effect = behaviour.measure(
                    generate(candidate, tokenizer, validation, behaviour.decoding, progress=False)
                )
                row["rur_mean"] = effect[behaviour.primary]
            results.append(row)
            print(json.dumps(row), f"({time.perf_counter() - started:.0f} s)", flush=True)
            del candidate
    write_json_atomic(
        Path(args.output),
        {
            "model": DEFAULT_MODEL,
            "split": "validation",
            "limits": vars(limits),
            "reference_sizes": {"undesired": len(undesired), "desired": len(desired), "copy_guard": len(copy_set)},
            "before": before,
            "rows": results,
            "seconds": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    main()
