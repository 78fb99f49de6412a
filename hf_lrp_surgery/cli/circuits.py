"""``circuit``: circuit discovery with LRP and the baselines."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

from hf_lrp_surgery.cli._common import (
    add_model_arguments,
    add_objective_argument,
    add_output_arguments,
    checked_output,
    load,
    options_from,
    positive_int,
)
from hf_lrp_surgery.options import ScoringOptions

__all__ = ["register", "run_circuit"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``circuit`` subcommand to an ``argparse`` subparsers object.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new subparser (its handler is :func:`run_circuit`).

    Example:
        >>> sub = argparse.ArgumentParser().add_subparsers(dest="command")
        >>> _ = register(sub)
    """
    from hf_lrp_surgery.circuits.ablation import ABLATIONS
    from hf_lrp_surgery.circuits.discovery import CIRCUIT_SCOPES
    from hf_lrp_surgery.circuits.tasks import TASK_OBJECTIVES
    from hf_lrp_surgery.scoring import CIRCUIT_METHODS, registered_methods

    parser = subparsers.add_parser(
        "circuit",
        help="find the smallest circuit that keeps a task (IOI or your prompts), LRP vs baselines",
        description="Score components on a next-token task (IOI generated from the shipped templates, or a "
        ".json/.jsonl file of {prompt, correct, wrong}), prune the least relevant ones on a log-spaced "
        "sparsity grid, keep the largest pruning whose metric stays above the threshold, for every "
        "method on every set; print the circuit sizes and write OUTPUT/report.json, report.txt, "
        "curves.png, circuit_sizes.png, composition.png and circuits/.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--task",
        default="ioi",
        help="'ioi' (generated) or a .json/.jsonl file of {prompt, correct[, wrong]} records (ioi)",
    )
    parser.add_argument("--evaluation", help="with a task file: a second file to measure on (default: the task)")
    parser.add_argument("--sets", type=int, default=3, help="ioi: independent sets (3)")
    parser.add_argument("--size", type=int, default=64, help="ioi: prompts per reference and per evaluation set (64)")
    parser.add_argument(
        "--task-seed",
        type=int,
        default=0,
        help="ioi: set i uses seed S+i for reference and S+100+i for evaluation prompts (0)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=registered_methods(paired=False),
        default=list(CIRCUIT_METHODS),
        help=f"scoring methods ({' '.join(CIRCUIT_METHODS)})",
    )
    parser.add_argument(
        "--granularity",
        choices=("neurons", "heads", "weights"),
        default="neurons",
        help="what to prune: MLP neurons, attention heads, or weights of the --modules matrices (neurons)",
    )
    parser.add_argument(
        "--scope",
        choices=("auto", *CIRCUIT_SCOPES),
        default="auto",
        help="ranking scope; auto = the paper's protocol per method: global for every method, except Wanda's "
        "weights per_row (each output row prunes the same share); per_row is for weights (auto)",
    )
    parser.add_argument(
        "--modules",
        nargs="+",
        default=None,
        help="weights: module groups to rank, glob patterns on the block-relative path (mlp.*: the MLP input "
        "and output projections)",
    )
    parser.add_argument(
        "--ablation",
        choices=ABLATIONS,
        default="zero",
        help="what a pruned unit is replaced with: zero (what bake/IA3 carry), mean (its mean over the reference "
        "prompts' tokens; weights: W_ij * mean(x_j)), corrupted (its activation on the corrupted prompt: IOI's "
        "ABC prompts, or a 'corrupted' field in task files) (zero)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.9, help="fraction of the unpruned metric the circuit must keep (0.9)"
    )
    parser.add_argument(
        "--metric", choices=("logit_diff", "accuracy"), default="logit_diff", help="task metric (logit_diff)"
    )
    add_objective_argument(
        parser,
        choices=TASK_OBJECTIVES,
        default="logit",
        old="--relevance-seed",
        help="lrp/gradient: explain the correct token's logit, logit(correct) - logit(wrong) (with "
        "abs: one sample per pass), or the correct token's log-probability",
    )
    parser.add_argument(
        "--aggregation",
        choices=("abs", "signed"),
        default="abs",
        help="lrp/gradient: mean per-sample |R| or mean relevance (abs; signed ranks components that "
        "push against the answer first and breaks the model at the first grid point)",
    )
    parser.add_argument(
        "--variant",
        choices=("attnlrp", "cp"),
        default="attnlrp",
        help="lrp: AttnLRP rules or CP-LRP (no relevance through softmax and gates) (attnlrp)",
    )
    parser.add_argument("--epsilon", type=float, default=0.0, help="lrp: LRP-epsilon on the prunable linear layers (0)")
    parser.add_argument(
        "--grid-points", type=int, default=8, help="log-spaced sparsity grid points, the coarse search (8: 7 counts)"
    )
    parser.add_argument("--min-kept", type=float, default=1e-3, help="smallest kept fraction on the grid (0.001)")
    parser.add_argument("--refine-steps", type=int, default=6, help="bisection steps on the threshold crossing (6)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="stop bisecting once the bracket is this fraction of the circuit size; 0 bisects every step (0.02)",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=2,
        help="stop each grid after this many failing points in a row; 0 measures every point (2)",
    )
    parser.add_argument("--random-draws", type=int, default=3, help="random sets in the specificity check (3)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=32, help="prompts per evaluation pass (32)")
    parser.add_argument(
        "--circuit-masks",
        choices=("auto", "yes", "no"),
        default="auto",
        help="write each circuit's mask/ and components/ under circuits/ (auto: for neurons and heads; a weight "
        "circuit's masks hold tens of millions of indices) (auto)",
    )
    add_output_arguments(parser, "runs/circuit")
    parser.set_defaults(handler=run_circuit)
    return parser


def run_circuit(args: argparse.Namespace) -> int:
    """Handle ``hf-lrp-surgery circuit``: compare the methods, print the table, save the report.

    Returns:
        The exit status (0).
    """
    from hf_lrp_surgery.circuits.compare import compare_methods
    from hf_lrp_surgery.circuits.tasks import ioi_task, load_task

    started = time.time()
    output = checked_output(args, None if args.task == "ioi" else args.task, args.evaluation)
    model, tokenizer = load(args)
    if args.task == "ioi":
        sets = [
            (
                ioi_task(tokenizer, args.size, seed=args.task_seed + i),
                ioi_task(tokenizer, args.size, seed=args.task_seed + 100 + i),
            )
            for i in range(args.sets)
        ]
    else:
        task = load_task(args.task)
        sets = [(task, load_task(args.evaluation) if args.evaluation else task)]
    comparison = compare_methods(
        model,
        tokenizer,
        sets,
        methods=args.methods,
        granularity=args.granularity,
        scope=None if args.scope == "auto" else args.scope,
        modules=args.modules,
        ablation=args.ablation,
        threshold=args.threshold,
        metric=args.metric,
        # The task objective (logit_diff too) is its own argument; the options carry the rest.
        options=options_from(
            args, ScoringOptions, method=args.methods[0], components=(args.granularity,), objective="logit"
        ),
        objective=args.objective,
        grid_points=args.grid_points,
        min_kept=args.min_kept,
        refine_steps=args.refine_steps,
        tolerance=args.tolerance,
        patience=args.patience or None,
        random_draws=args.random_draws,
        eval_batch_size=args.eval_batch_size,
        progress=not args.no_progress,
    )
    comparison.settings.update(
        model=str(args.model), dtype=args.dtype, command=shlex.join(sys.argv), seconds=round(time.time() - started, 1)
    )
    scopes = comparison.settings["scopes"]
    scope_text = ", ".join(f"{m}: {sc}" for m, sc in scopes.items())
    print(
        f"{comparison.settings['task']} on {args.model}: smallest {args.granularity} circuit keeping "
        f"{args.threshold:.0%} of {args.metric} ({args.ablation} ablation; scope {scope_text}; {len(sets)} set(s))"
    )
    print(comparison.table())
    report = comparison.to_dict()
    for method, data in report["methods"].items():
        summary = data["specificity_summary"]
        if data["specificity"]:
            circuit, random = summary["relative_drop_circuit"], summary["relative_drop_random"]
            print(
                f"specificity {method:<11} ablating only the circuit: -{100 * circuit['mean']:.1f} ± "
                f"{100 * circuit['std']:.1f}% {args.metric}; as many random {args.granularity}: "
                f"-{100 * random['mean']:.1f} ± {100 * random['std']:.1f}% (over sets; "
                f"{args.random_draws} draws each)"
            )
    stages = comparison.settings["seconds_per_stage"]
    print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    masks = {"auto": None, "yes": True, "no": False}[args.circuit_masks]
    comparison.save(output, circuit_masks=masks, overwrite=args.overwrite)
    print(f"saved {args.output}/report.json, report.txt, curves.png, circuit_sizes.png, composition.png, circuits/")
    return 0
