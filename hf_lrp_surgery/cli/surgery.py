"""``attribute``, ``correct``, ``apply`` and ``inspect``: the surgery steps one at a time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hf_lrp_surgery.cli._common import (
    OBJECTIVE_HELP,
    add_model_arguments,
    add_objective_argument,
    add_output_arguments,
    budget,
    checked_output,
    load,
    options_from,
)
from hf_lrp_surgery.lrp.layout import GRANULARITIES
from hf_lrp_surgery.masks.selection import budget_count
from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions

__all__ = ["register"]

_SAMPLES_HELP = (
    "reference set: .txt (one prompt per line), .jsonl ({'prompt': ..., 'continuation': ...} per "
    "line) or .json (a list or {'samples': [...]})"
)


def _attribute(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.surgeon import Surgeon

    output = checked_output(args, args.samples)
    options = options_from(args, ScoringOptions)  # validated before anything loads
    model, tokenizer = load(args)
    surgeon = Surgeon(model, tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    scores = surgeon.attribute(args.samples, options, limit=args.limit)
    scores.save(output, overwrite=args.overwrite)
    print(f"{args.method} scores of {scores.num_samples} samples ({', '.join(scores.components)}) saved to {output}")
    return 0


def _save_corrected_models(surgeon: Any, masks: list[Any], args: argparse.Namespace, staging: Path) -> None:
    """The adapter and/or baked model of ``masks`` and the per-layer plot, into the output's staging directory."""
    from hf_lrp_surgery.plots import plot_mask_per_layer

    carrier = args.carrier or ("bake" if any(m.granularity == "weights" for m in masks) else "both")
    for name in ["adapter", "bake"] if carrier == "both" else [carrier]:
        corrected = surgeon.apply(masks, carrier=name)
        subdirectory = "adapter" if name == "adapter" else "baked"
        surgeon.save(staging / subdirectory, corrected=corrected, base_model_name_or_path=args.base_model_id)
        print(f"{name}: corrected model saved to {args.output}/{subdirectory} (verified: the mask is carried)")
    plot_mask_per_layer(masks, staging / "mask_per_layer.png")
    print(f"plot: {args.output}/mask_per_layer.png")


def _correct(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.io import atomic_directory
    from hf_lrp_surgery.surgeon import Surgeon

    if args.carrier in ("adapter", "both") and args.granularity == "weights":
        raise ValueError("weight masks are baked: use --carrier bake (the default) with --granularity weights")
    output = checked_output(args, args.undesired, args.general)
    # Every option is validated before anything loads (the budget against the model comes with the selection).
    scoring = options_from(args, ScoringOptions, components=(args.granularity,))
    contrasting, selection = options_from(args, ContrastOptions), options_from(args, SelectionOptions)
    budget_count(args.budget, sys.maxsize, args.granularity)
    model, tokenizer = load(args)
    surgeon = Surgeon(model, tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    scores = surgeon.contrast(
        undesired=args.undesired, general=args.general, options=scoring, contrast_options=contrasting, limit=args.limit
    )
    mask = surgeon.select(scores, budget=args.budget, options=selection)
    print(mask.summary())
    # Scores, mask and corrected models appear together or not at all.
    with atomic_directory(output, overwrite=args.overwrite) as staging:
        scores.save(staging / "scores")
        mask.save(staging / "mask")
        _save_corrected_models(surgeon, [mask], args, staging)
    return 0


def _apply(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.io import atomic_directory
    from hf_lrp_surgery.masks import Mask
    from hf_lrp_surgery.surgeon import Surgeon

    output = checked_output(args, *args.mask)
    masks = [Mask.load(path) for path in args.mask]
    model, tokenizer = load(args)
    surgeon = Surgeon(model, tokenizer, progress=not args.no_progress)
    with atomic_directory(output, overwrite=args.overwrite, inputs=args.mask) as staging:
        _save_corrected_models(surgeon, masks, args, staging)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.carriers import SURGERY_DIR, read_surgery
    from hf_lrp_surgery.exceptions import OutputExistsError
    from hf_lrp_surgery.masks import Mask
    from hf_lrp_surgery.plots import plot_mask_per_layer

    path = Path(args.path)
    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise ValueError(f"--plot must name a .png file, got {args.plot!r}")
        if plot.exists() and not args.overwrite:
            raise OutputExistsError(f"{plot} exists; pass --overwrite to replace it")
    if (path / SURGERY_DIR).is_dir():
        masks, carrier, _, base = read_surgery(path)
        print(f"corrected model ({carrier}), base model: {base}")
    else:
        masks = [Mask.load(path)]
    for mask in masks:
        print(mask.summary())
    if plot is not None:
        print(f"plot: {plot_mask_per_layer(masks, plot)}")
    return 0


def _scoring_arguments(parser: argparse.ArgumentParser) -> None:
    from hf_lrp_surgery.lrp.collect import OBJECTIVES
    from hf_lrp_surgery.options import AGGREGATIONS
    from hf_lrp_surgery.scoring import METHODS

    parser.add_argument("--method", choices=METHODS, default="lrp", help="scoring method (lrp)")
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="signed",
        help="lrp/gradient: mean relevance or mean per-sample |R| (signed)",
    )
    add_objective_argument(parser, choices=OBJECTIVES, default="logit", old="--seed", help=OBJECTIVE_HELP)
    parser.add_argument("--limit", type=int, help="use only the first N samples of each reference set")


def _carrier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--carrier",
        choices=("adapter", "bake", "both"),
        help="IA3 adapter (neurons/heads, switchable off), baked weights, or both (default: both "
        "for neuron/head masks, bake for weight masks)",
    )
    parser.add_argument(
        "--base-model-id",
        help="Hub id (or path) the adapter's base model loads from, written "
        "into adapter_config.json (default: where --model loaded from)",
    )


def register(subparsers: Any) -> None:
    """Add the ``attribute``, ``correct``, ``apply`` and ``inspect`` commands.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.
    """
    from hf_lrp_surgery.options import NORMALIZATIONS, SCOPES

    attribute = subparsers.add_parser(
        "attribute",
        help="score components on one reference set and save the scores",
        description="Score MLP neurons, attention heads and/or weights on one reference set "
        "with LRP or a baseline; save scores.safetensors + scores.json.",
    )
    add_model_arguments(attribute)
    attribute.add_argument("--samples", required=True, help=_SAMPLES_HELP)
    attribute.add_argument(
        "--components", nargs="+", choices=GRANULARITIES, default=["neurons"], help="component kinds to score (neurons)"
    )
    _scoring_arguments(attribute)
    add_output_arguments(attribute, "runs/scores")
    attribute.set_defaults(handler=_attribute)

    correct = subparsers.add_parser(
        "correct",
        help="contrast undesired vs general behaviour, prune, apply and save",
        description="Score both reference sets, take the contrast general - undesired, prune the lowest-scoring "
        "components, apply the mask as an IA3 adapter and/or baked weights, and save OUTPUT/scores, "
        "OUTPUT/mask, OUTPUT/adapter, OUTPUT/baked and OUTPUT/mask_per_layer.png (all or nothing).",
    )
    add_model_arguments(correct)
    correct.add_argument("--undesired", required=True, help="the behaviour to remove; " + _SAMPLES_HELP)
    correct.add_argument("--general", required=True, help="the behaviour to keep; " + _SAMPLES_HELP)
    _scoring_arguments(correct)
    correct.add_argument("--granularity", choices=GRANULARITIES, default="neurons", help="what to prune (neurons)")
    correct.add_argument(
        "--budget", type=budget, default=50, help="a count (50) or a fraction of the eligible components (0.001) (50)"
    )
    correct.add_argument(
        "--scope",
        choices=SCOPES,
        default="global",
        help="rank all components together or spread the budget over layers (global)",
    )
    correct.add_argument("--modules", nargs="+", help="weights: module groups, e.g. 'mlp.*' or fc1 (all)")
    correct.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="total",
        help="per-set normalisation before the difference (total)",
    )
    correct.add_argument(
        "--protect-top",
        type=float,
        default=0.05,
        help="fraction of components most relevant to the general set that are never pruned (0.05)",
    )
    _carrier_arguments(correct)
    add_output_arguments(correct, "runs/correct")
    correct.set_defaults(handler=_correct)

    apply = subparsers.add_parser(
        "apply",
        help="apply saved masks to a model and save the corrected model",
        description="Apply one or more saved masks (one per granularity) and save OUTPUT/adapter "
        "and/or OUTPUT/baked. The masks must have been built on this model.",
    )
    add_model_arguments(apply, batch_size=False)
    apply.add_argument("--mask", nargs="+", required=True, help="mask directories (mask.json + mask.safetensors)")
    _carrier_arguments(apply)
    add_output_arguments(apply, "runs/apply")
    apply.set_defaults(handler=_apply)

    inspect = subparsers.add_parser(
        "inspect",
        help="print a mask's statistics per layer (and save a plot with --plot)",
        description="Print the pruned units per layer of a mask directory or of a corrected "
        "model saved by hf-lrp-surgery; with --plot, save a bar chart there. Nothing is written into PATH.",
    )
    inspect.add_argument("path", help="a mask directory or a saved corrected model")
    inspect.add_argument("--plot", help="a .png file to save the per-layer bar chart to")
    inspect.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    inspect.set_defaults(handler=_inspect)
