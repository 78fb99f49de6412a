"""LRP against the baseline scores at equal budgets, on held-out prompts (the comparison table).

    python benchmarks/compare_methods.py --behaviour detox --output docs/results/compare_detox
    python benchmarks/compare_methods.py --behaviour repetition --output docs/results/compare_repetition

For one behaviour, the paired reference sets are built once from the attribution part of the shipped
train prompts (exactly as the recipe builds them, and cached in ``OUTPUT/reference_sets.json``), and
every method scores the same sets with the recipe's contrast (per-set total normalisation, top 5%
of general relevance protected; ``random`` has nothing to contrast). The paired neighbour methods
(``aura``: Suau et al., 2024; ``atp``: attribution patching; ``repetition_neurons``: Hiraoka & Inui,
2025, repetition only) read both sets together and are their own contrast (no normalisation or
protection); a method is skipped at a granularity it does not score. Each method's mask at each
budget is baked and measured on the **held-out** prompts (greedy), with KL on the held-out neutral
prompts and perplexity on the held-out general text. Nothing here chooses a budget: the table is the
effect-vs-cost curve of each method.

With ``--reattribute-steps N`` (N > 1) each mask is pruned in N rounds instead of selected once
(:func:`~hf_lrp_surgery.correction.iterative_masks`: each later round scores the model with the
earlier rounds baked in, N attributions per budget); N = 1, the default, is the one-shot table.

Writes ``OUTPUT/compare.json``, ``OUTPUT/compare.md`` (the table) and ``OUTPUT/compare.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from correction_bench import BEHAVIOUR_CHOICES, Bench, chosen_behaviour, reference_sets

from hf_lrp_surgery.carriers import apply_masks
from hf_lrp_surgery.correction import iterative_masks
from hf_lrp_surgery.masks import select
from hf_lrp_surgery.models import DEFAULT_MODEL, load_model
from hf_lrp_surgery.references import shipped_set
from hf_lrp_surgery.scoring import CIRCUIT_METHODS, PAIRED_METHODS, get_scorer
from hf_lrp_surgery.surgeon import Surgeon

METHODS = (*CIRCUIT_METHODS, *PAIRED_METHODS)
#: Methods that only make sense for one behaviour (the onset of a repetition has no detox analogue).
BEHAVIOUR_ONLY = {"repetition_neurons": "repetition"}


def _title(behaviour: str, steps: int) -> str:
    masks = "one-shot masks" if steps == 1 else f"masks pruned in {steps} rounds of re-attribution"
    return f"## {behaviour}: {masks}"


def _table(rows: list[dict[str, Any]], primary: str) -> str:
    lines = [
        f"| granularity | method | budget | {primary} | KL | perplexity change | within limits |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['granularity']} | {row['method']} | {row['budget']} | {row['effect'][primary]:.3f} | "
            f"{row['kl']:.4f} | {100 * row['perplexity_increase']:+.2f}% | "
            f"{'yes' if row['within_limits'] else 'no (' + ', '.join(row.get('exceeded', [])) + ')'} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], primary: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    granularities = sorted({r["granularity"] for r in rows})
    fig, axes = plt.subplots(1, len(granularities), figsize=(5.5 * len(granularities), 4), squeeze=False)
    for ax, granularity in zip(axes[0], granularities):
        for method in METHODS:
            points = [r for r in rows if r["granularity"] == granularity and r["method"] == method]
            if points:
                ax.plot([r["kl"] for r in points], [r["effect"][primary] for r in points], marker="o", label=method)
                for r in points:
                    ax.annotate(str(r["budget"]), (r["kl"], r["effect"][primary]), fontsize=7)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("KL(original || corrected), held-out neutral prompts")
        ax.set_ylabel(f"{primary}, held-out prompts")
        ax.set_title(granularity)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--behaviour", choices=sorted(BEHAVIOUR_CHOICES), required=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--granularities", nargs="+", choices=("neurons", "heads", "weights"), default=["neurons", "weights"]
    )
    parser.add_argument("--neuron-budgets", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--head-budgets", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--weight-budgets", nargs="+", type=int, default=[1000, 7000])
    parser.add_argument(
        "--reattribute-steps",
        type=int,
        default=1,
        metavar="N",
        help="prune each budget in N rounds, scoring the pruned model again before each (1: one-shot)",
    )
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    steps = args.reattribute_steps
    if steps < 1:
        parser.error(f"--reattribute-steps must be >= 1, got {steps}")

    output = Path(args.output)
    model, tokenizer = load_model(args.model)
    behaviour = chosen_behaviour(args.behaviour)
    undesired, desired = reference_sets(model, tokenizer, behaviour, args.model, output / "reference_sets.json")
    surgeon = Surgeon(model, tokenizer)
    bench = Bench(
        model,
        tokenizer,
        behaviour,
        shipped_set(behaviour.prompt_set, "heldout"),
        shipped_set("neutral_prompts", "heldout"),
        shipped_set("general_text", "heldout"),
    )
    print("before:", json.dumps(bench.before), flush=True)
    rows: list[dict[str, Any]] = []
    for granularity in args.granularities:
        budgets = {"neurons": args.neuron_budgets, "heads": args.head_budgets, "weights": args.weight_budgets}[
            granularity
        ]
        for method in args.methods:
            if granularity not in get_scorer(method).components:
                continue
            if BEHAVIOUR_ONLY.get(method, behaviour.name) != behaviour.name:
                continue
            start = time.perf_counter()
            if steps == 1:
                scores = surgeon.contrast(
                    undesired=undesired, general=desired, method=method, components=(granularity,)
                )
            for budget in budgets:
                if steps == 1:
                    mask = select(scores, granularity, budget)
                else:
                    mask = iterative_masks(
                        model,
                        tokenizer,
                        undesired=undesired,
                        general=desired,
                        budget=budget,
                        steps=steps,
                        method=method,
                        granularity=granularity,
                    )
                candidate = apply_masks(model, mask, "bake").model
                rows.append({"granularity": granularity, "method": method, "budget": budget, **bench.point(candidate)})
                print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)
                del candidate
    result = {
        "model": args.model,
        "behaviour": behaviour.name,
        "primary": behaviour.primary,
        "limits": vars(bench.limits),
        "reference_sizes": {"undesired": len(undesired), "desired": len(desired)},
        "settings": {"reattribute_steps": steps},
        "before": bench.before,
        "rows": rows,
    }
    (output / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    table = _table(rows, behaviour.primary)
    title = _title(behaviour.name, steps)
    before = f"Before: {behaviour.primary} = {bench.before[behaviour.primary]:.3f}\n\n"
    (output / "compare.md").write_text(f"{title}\n\n{before}{table}")
    _plot(rows, behaviour.primary, output / "compare.png")
    print(title, table, sep="\n\n")


if __name__ == "__main__":
    main()
