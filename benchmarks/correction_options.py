"""What each correction option does: the recipe's choices varied one at a time, on validation prompts.

    python benchmarks/correction_options.py --behaviour detox --output docs/results/options_detox

The paired reference sets are built once (as in the recipe; cached in ``OUTPUT/reference_sets.json``,
the same file format as ``compare_methods.py``). Each variant changes one option of the recipe's
default (LRP, logit seed, per-set total normalisation, top 5% of general relevance protected, focus
on the undesired tokens, global selection) for neurons and attention heads and is measured like the
recipe's budget search:
effect on the **validation** part of the train prompts, KL on the validation part of the train
neutral prompts (the variant that adds neutral prompts to the general set uses the other part),
perplexity on the train general text. The held-out split is never used here, so these runs may set defaults.

Writes ``OUTPUT/options.json`` and ``OUTPUT/options.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from correction_bench import BEHAVIOUR_CHOICES, Bench, chosen_behaviour, reference_sets

from hf_lrp_surgery.carriers import apply_masks
from hf_lrp_surgery.correction import recipe_split
from hf_lrp_surgery.masks import select
from hf_lrp_surgery.models import DEFAULT_MODEL, load_model
from hf_lrp_surgery.references import shipped_set, shipped_splits
from hf_lrp_surgery.surgeon import Surgeon

DEFAULT = {"method": "lrp", "seed": "logit", "normalize": "total", "protect_top": 0.05}
# label, contrast options changed, selection options changed, reference-set change, granularity
VARIANTS: list[tuple[str, dict[str, Any], dict[str, Any], str | None, str]] = [
    ("recipe options, neurons", {}, {}, None, "neurons"),
    ("whole undesired continuations (no focus)", {}, {}, "no_focus", "neurons"),
    ("half the attribution prompts", {}, {}, "half", "neurons"),
    ("seed: log-probability", {"seed": "logprob"}, {}, None, "neurons"),
    ("normalisation: none", {"normalize": "none"}, {}, None, "neurons"),
    ("no protection (protect_top 0)", {"protect_top": 0.0}, {}, None, "neurons"),
    ("per-layer scope", {}, {"scope": "per_layer"}, None, "neurons"),
    ("layer 0 excluded", {}, {"layers": "not_first"}, None, "neurons"),
    ("neutral prompts added to the general set", {}, {}, "neutral", "neurons"),
    ("attention heads", {}, {}, None, "heads"),
    ("attention heads, seed: log-probability", {"seed": "logprob"}, {}, None, "heads"),
]


def _variant_sets(undesired: list, desired: list, change: str | None) -> tuple[list, list]:
    if change == "no_focus":
        return [replace(s, focus=None) for s in undesired], desired
    if change == "neutral":  # the attribution part; the budget KL is measured on the other part
        return undesired, desired + recipe_split(shipped_set("neutral_prompts", "train"))[0]
    if change == "half":
        prompts = list(dict.fromkeys(tuple(s.prompt) for s in undesired))
        kept = set(prompts[: len(prompts) // 2])
        return [s for s in undesired if tuple(s.prompt) in kept], [s for s in desired if tuple(s.prompt) in kept]
    return undesired, desired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--behaviour", choices=sorted(BEHAVIOUR_CHOICES), required=True)
    parser.add_argument("--neuron-budgets", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--head-budgets", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    output = Path(args.output)
    model, tokenizer = load_model(args.model)
    behaviour = chosen_behaviour(args.behaviour)
    undesired, desired = reference_sets(model, tokenizer, behaviour, args.model, output / "reference_sets.json")
    _, validation = recipe_split(shipped_splits(behaviour.prompt_set))
    neutral_validation = recipe_split(shipped_set("neutral_prompts", "train"))[1]
    bench = Bench(model, tokenizer, behaviour, validation, neutral_validation, shipped_set("general_text", "train"))
    surgeon = Surgeon(model, tokenizer, progress=False)
    rows: list[dict[str, Any]] = []
    layers = model.config.num_hidden_layers
    for label, contrast, selection, change, granularity in VARIANTS:
        start = time.perf_counter()
        sets = _variant_sets(undesired, desired, change)
        scores = surgeon.contrast(
            undesired=sets[0], general=sets[1], components=(granularity,), **{**DEFAULT, **contrast}
        )
        if selection.get("layers") == "not_first":
            selection = {"layers": list(range(1, layers))}
        for budget in args.neuron_budgets if granularity == "neurons" else args.head_budgets:
            candidate = apply_masks(model, select(scores, granularity, budget, **selection), "bake").model
            rows.append(
                {
                    "variant": label,
                    "granularity": granularity,
                    "budget": budget,
                    "samples": [len(sets[0]), len(sets[1])],
                    **bench.point(candidate),
                }
            )
            del candidate
            print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)
    primary = behaviour.primary
    lines = [
        f"Validation before: {primary} = {bench.before[primary]:.3f}",
        "",
        f"| variant | undesired / general samples | budget | {primary} | KL | perplexity change | within limits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['samples'][0]} / {r['samples'][1]} | {r['budget']} {r['granularity']} | "
            f"{r['effect'][primary]:.3f} | {r['kl']:.4f} | {100 * r['perplexity_increase']:+.2f}% | "
            f"{'yes' if r['within_limits'] else 'no'} |"
        )
    (output / "options.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "behaviour": behaviour.name,
                "default": DEFAULT,
                "before": bench.before,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    (output / "options.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
