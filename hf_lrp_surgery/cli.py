"""The ``hf-lrp-surgery`` command line.

Subcommands:
    report     Explain the model's own continuations of a few prompts: top MLP neurons, attention
               heads and input tokens, saved as JSON, text and a plot.
    attribute  Score components on one reference set (LRP or a baseline) and save the scores.
    correct    Contrast an undesired with a general reference set, select a mask, apply it (adapter
               and/or baked) and save everything: scores, mask, corrected model(s), plot.
    apply      Apply a saved mask to a model and save the corrected model.
    inspect    Print a mask's statistics per layer and save a plot.
    detox, fix-repetition
               The correction recipes: paired reference sets from the model's own continuations,
               contrastive attribution, a budget search under a general-behaviour limit, the
               corrected model (adapter and baked), and before/after numbers on held-out prompts.
    push       Push a saved corrected model (adapter/ or baked/, with surgery/) to a Hub repo with its
               model card; a failed push keeps the local copy and prints the command that retries it.
    card       Write model cards (README.md) into a recipe's baked/ and adapter/, or into one saved model.
    circuit    Find the smallest circuit that keeps a next-token task (IOI or your prompts) working, with
               LRP and the baselines, and compare their performance-vs-sparsity curves.

Errors on bad input are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the commands import their modules when they run
    from hf_lrp_surgery.correction import RegisteredBehaviour

__all__ = ["main", "build_parser"]

_DTYPES = ("float32", "bfloat16", "float16")
# How a behaviour option's value is parsed from the command line (see ``CommandOption.kind``).
_OPTION_TYPES = {"str": str, "float": float}


def _read_prompts(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".json"):
        data = json.loads(text)
        return list(data["prompts"] if isinstance(data, dict) else data)
    return [line for line in text.splitlines() if line.strip()]


def _report(args: argparse.Namespace) -> int:
    import torch

    from hf_lrp_surgery.models import load_model
    from hf_lrp_surgery.report import relevance_report

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    prompts = _read_prompts(args.prompts) if args.prompts else None
    report = relevance_report(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(report.to_text())
    directory = report.save(args.output)
    print(f"\nSaved {directory}/report.json, report.txt, relevance_per_layer.png and relevance/")
    return 0


def _budget(text: str) -> int | float:
    """A count ("50") or a fraction ("0.01")."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"budget must be a count such as 50 or a fraction such as 0.01, got {text!r}"
            ) from None


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from hf_lrp_surgery.models import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)


def _attribute(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.surgeon import Surgeon

    model, tokenizer = _load(args)
    surgeon = Surgeon(model, tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    scores = surgeon.attribute(
        args.samples,
        method=args.method,
        components=args.components,
        aggregation=args.aggregation,
        seed=args.seed,
        limit=args.limit,
    )
    scores.save(args.output)
    print(
        f"{args.method} scores of {scores.num_samples} samples ({', '.join(scores.components)}) saved to {args.output}"
    )
    return 0


def _save_masks_and_models(surgeon: Any, masks: list[Any], args: argparse.Namespace, output: Path) -> None:
    from hf_lrp_surgery.plots import plot_mask_per_layer

    carrier = args.carrier or ("bake" if any(m.granularity == "weights" for m in masks) else "both")
    carriers = ["adapter", "bake"] if carrier == "both" else [carrier]
    for carrier in carriers:
        corrected = surgeon.apply(masks, carrier=carrier)
        target = output / ("adapter" if carrier == "adapter" else "baked")
        surgeon.save(target, corrected=corrected, base_model_name_or_path=args.base_model_id)
        print(f"{carrier}: corrected model saved to {target} (verified: the mask is carried, probe logits match)")
    plot = plot_mask_per_layer(masks, output / "mask_per_layer.png")
    print(f"plot: {plot}")


def _correct(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.surgeon import Surgeon

    model, tokenizer = _load(args)
    surgeon = Surgeon(model, tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    if args.carrier in ("adapter", "both") and args.granularity == "weights":
        raise ValueError("weight masks are baked: use --carrier bake (the default) with --granularity weights")
    scores = surgeon.contrast(
        undesired=args.undesired,
        general=args.general,
        method=args.method,
        components=[args.granularity],
        normalize=args.normalize,
        protect_top=args.protect_top,
        aggregation=args.aggregation,
        seed=args.seed,
        limit=args.limit,
    )
    mask = surgeon.select(scores, args.granularity, args.budget, scope=args.scope, modules=args.modules)
    output = Path(args.output)
    scores.save(output / "scores")
    mask.save(output / "mask")
    print(mask.summary())
    _save_masks_and_models(surgeon, [mask], args, output)
    return 0


def _apply(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.masks import Mask
    from hf_lrp_surgery.surgeon import Surgeon

    model, tokenizer = _load(args)
    masks = [Mask.load(path) for path in args.mask]
    surgeon = Surgeon(model, tokenizer, progress=not args.no_progress)
    _save_masks_and_models(surgeon, masks, args, Path(args.output))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.carriers import SURGERY_DIR, read_surgery
    from hf_lrp_surgery.masks import Mask
    from hf_lrp_surgery.plots import plot_mask_per_layer

    path = Path(args.path)
    if (path / SURGERY_DIR).is_dir():
        masks, carrier, _, base = read_surgery(path)
        print(f"corrected model ({carrier}), base model: {base}")
    else:
        masks = [Mask.load(path)]
    for mask in masks:
        print(mask.summary())
    plot = plot_mask_per_layer(masks, args.plot or path / "mask_per_layer.png")
    print(f"plot: {plot}")
    return 0


def _recipe(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.correction import GeneralLimits, run_recipe

    model, tokenizer = _load(args)
    entry = args.behaviour
    options = entry.metadata.options
    behaviour = entry.factory(**{o.parameter: o.from_command_line(getattr(args, o.dest)) for o in options})
    result = run_recipe(
        model,
        tokenizer,
        behaviour,
        args.output,
        budgets=args.budgets,
        granularity=args.granularity,
        method=args.method,
        normalize=args.normalize,
        protect_top=args.protect_top,
        seed=args.seed,
        focus=not args.no_focus,
        limits=GeneralLimits(args.max_kl, args.max_perplexity_increase),
        scope=args.scope,
        modules=args.modules,
        base_model_name_or_path=args.base_model_id,
        model_name=args.model,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(
        f"{result.behaviour}: {result.reference_sizes['undesired']} undesired / {result.reference_sizes['desired']} "
        "desired reference continuations"
    )
    print(f"{'budget':>7} {behaviour.primary:>14} {'KL':>8} {'ppl +%':>8}  within limits")
    for point in result.frontier:
        print(
            f"{point.budget:>7} {point.effect[behaviour.primary]:>14.4f} {point.kl:>8.4f} "
            f"{100 * point.perplexity_increase:>8.2f}  {point.within_limits}"
        )
    print(f"chosen budget: {result.chosen_budget}")
    print("held-out:", json.dumps(result.heldout))
    print(
        f"saved to {args.output} (report.json, effect_vs_budget.png, scores/, and mask/, adapter/, baked/ when a "
        "budget was chosen)"
    )
    return 0


def _recipe_parser(sub: Any, entry: RegisteredBehaviour, default_model: str, models: str) -> argparse.ArgumentParser:
    """The recipe command of a registered behaviour, with the behaviour's own options."""
    from hf_lrp_surgery.scoring import METHODS

    metadata = entry.metadata
    name = metadata.command
    defaults = f"{' '.join(map(str, metadata.budgets))} {metadata.granularity}"
    parser = sub.add_parser(name, help=metadata.summary, description=metadata.description)
    _common(parser, default_model, models)
    parser.add_argument(
        "--budgets", nargs="+", type=int, help=f"budgets to search, in units of --granularity (default: {defaults})"
    )
    parser.add_argument(
        "--granularity",
        choices=("neurons", "heads", "weights"),
        help=f"what to prune (default: {defaults.split()[-1]})",
    )
    parser.add_argument("--method", choices=METHODS, default="lrp", help="scoring method (lrp)")
    parser.add_argument(
        "--normalize",
        choices=("none", "total", "max", "layer"),
        default="total",
        help="per-set normalisation before the difference (total)",
    )
    parser.add_argument(
        "--protect-top",
        type=float,
        default=0.05,
        help="fraction most relevant to the general set that is never pruned (0.05)",
    )
    parser.add_argument("--seed", choices=("logit", "logprob"), default="logit", help="relevance seed (logit)")
    parser.add_argument(
        "--no-focus",
        action="store_true",
        help="explain whole undesired continuations, not only their toxic / repeated tokens",
    )
    parser.add_argument("--scope", choices=("global", "per_layer"), default="global", help="selection scope (global)")
    parser.add_argument("--modules", nargs="+", help="weights: module groups, e.g. 'mlp.*' (all)")
    parser.add_argument("--max-kl", type=float, default=0.02, help="general-behaviour limit on KL (0.02)")
    parser.add_argument(
        "--max-perplexity-increase",
        type=float,
        default=0.03,
        help="general-behaviour limit on the relative perplexity increase (0.03)",
    )
    parser.add_argument("--base-model-id", help="Hub id written into the adapter's config (default: --model's path)")
    parser.add_argument("--output", default=f"runs/{name}", help=f"output directory (runs/{name})")
    for option in metadata.options:
        if option.kind == "switch":
            parser.add_argument(option.flag, action="store_true", help=option.help)
        else:
            parser.add_argument(option.flag, type=_OPTION_TYPES[option.kind], default=option.default, help=option.help)
    parser.set_defaults(handler=_recipe, behaviour=entry)
    return parser


def _common(parser: argparse.ArgumentParser, default_model: str, models: str) -> None:
    parser.add_argument(
        "--model",
        default=default_model,
        help=f"embedded model ({models}), local checkpoint directory or Hub id (default: {default_model})",
    )
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="model dtype (float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per relevance pass (8)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _scoring_options(parser: argparse.ArgumentParser) -> None:
    from hf_lrp_surgery.scoring import METHODS

    parser.add_argument("--method", choices=METHODS, default="lrp", help="scoring method (lrp)")
    parser.add_argument(
        "--aggregation",
        choices=("signed", "abs"),
        default="signed",
        help="lrp/gradient: mean relevance or mean per-sample |R| (signed)",
    )
    parser.add_argument(
        "--seed",
        choices=("logit", "logprob"),
        default="logit",
        help="lrp/gradient: explain the target logits or log-probabilities (logit)",
    )
    parser.add_argument("--limit", type=int, help="use only the first N samples of each reference set")


def _carrier_options(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-lrp-surgery``."""
    from hf_lrp_surgery.models import DEFAULT_MODEL, list_embedded_models

    parser = argparse.ArgumentParser(
        prog="hf-lrp-surgery",
        description="Attribution-guided model surgery (AttnLRP relevance, contrastive pruning) for Hugging Face LMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser(
        "report",
        help="relevance report: top neurons, heads and input tokens for the model's own continuations",
        description="Continue each prompt greedily, explain prompt + continuation with AttnLRP, print the most "
        "relevant MLP neurons, attention heads and input tokens, and save JSON, text and a plot.",
    )
    report.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded model ({', '.join(list_embedded_models())}), local checkpoint directory "
        f"or Hub id (default: {DEFAULT_MODEL})",
    )
    report.add_argument(
        "--prompts",
        help="file with one prompt per line, or a JSON list / {'prompts': [...]} (default: the shipped report prompts)",
    )
    report.add_argument("--max-new-tokens", type=int, default=8, help="length of the explained continuation (8)")
    report.add_argument("--top-k", type=int, default=10, help="neurons and heads to list (10)")
    report.add_argument("--batch-size", type=int, default=8, help="samples per relevance pass (8)")
    report.add_argument("--dtype", choices=_DTYPES, default="float32", help="model dtype (float32)")
    report.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    report.add_argument("--output", default="runs/report", help="output directory (runs/report)")
    report.add_argument("--no-progress", action="store_true", help="hide progress bars")
    report.set_defaults(handler=_report)

    models = ", ".join(list_embedded_models())
    samples_help = (
        "reference set: .txt (one prompt per line), .jsonl ({'prompt': ..., 'continuation': ...} per "
        "line) or .json (a list or {'samples': [...]})"
    )
    attribute = sub.add_parser(
        "attribute",
        help="score components on one reference set and save the scores",
        description="Score MLP neurons, attention heads and/or weights on one reference set "
        "with LRP or a baseline; save scores.safetensors + scores.json.",
    )
    _common(attribute, DEFAULT_MODEL, models)
    attribute.add_argument("--samples", required=True, help=samples_help)
    attribute.add_argument(
        "--components",
        nargs="+",
        choices=("neurons", "heads", "weights"),
        default=["neurons"],
        help="component kinds to score (neurons)",
    )
    _scoring_options(attribute)
    attribute.add_argument("--output", default="runs/scores", help="output directory (runs/scores)")
    attribute.set_defaults(handler=_attribute)

    correct = sub.add_parser(
        "correct",
        help="contrast undesired vs general behaviour, prune, apply and save",
        description="Score both reference sets, take the contrast general - undesired, prune the lowest-scoring "
        "components, apply the mask as an IA3 adapter and/or baked weights, and save OUTPUT/scores, "
        "OUTPUT/mask, OUTPUT/adapter, OUTPUT/baked and OUTPUT/mask_per_layer.png.",
    )
    _common(correct, DEFAULT_MODEL, models)
    correct.add_argument("--undesired", required=True, help="the behaviour to remove; " + samples_help)
    correct.add_argument("--general", required=True, help="the behaviour to keep; " + samples_help)
    _scoring_options(correct)
    correct.add_argument(
        "--granularity", choices=("neurons", "heads", "weights"), default="neurons", help="what to prune (neurons)"
    )
    correct.add_argument(
        "--budget", type=_budget, default=50, help="a count (50) or a fraction of the eligible components (0.001) (50)"
    )
    correct.add_argument(
        "--scope",
        choices=("global", "per_layer"),
        default="global",
        help="rank all components together or spread the budget over layers (global)",
    )
    correct.add_argument("--modules", nargs="+", help="weights: module groups, e.g. 'mlp.*' or fc1 (all)")
    correct.add_argument(
        "--normalize",
        choices=("none", "total", "max", "layer"),
        default="total",
        help="per-set normalisation before the difference (total)",
    )
    correct.add_argument(
        "--protect-top",
        type=float,
        default=0.05,
        help="fraction of components most relevant to the general set that are never pruned (0.05)",
    )
    _carrier_options(correct)
    correct.add_argument("--output", default="runs/correct", help="output directory (runs/correct)")
    correct.set_defaults(handler=_correct)

    apply = sub.add_parser(
        "apply",
        help="apply saved masks to a model and save the corrected model",
        description="Apply one or more saved masks (one per granularity) and save OUTPUT/adapter "
        "and/or OUTPUT/baked. The masks must have been built on this model.",
    )
    _common(apply, DEFAULT_MODEL, models)
    apply.add_argument("--mask", nargs="+", required=True, help="mask directories (mask.json + mask.safetensors)")
    _carrier_options(apply)
    apply.add_argument("--output", default="runs/apply", help="output directory (runs/apply)")
    apply.set_defaults(handler=_apply)

    inspect = sub.add_parser(
        "inspect",
        help="print a mask's statistics per layer and save a plot",
        description="Print the pruned units per layer of a mask directory or of a corrected "
        "model saved by hf-lrp-surgery, and save a bar chart.",
    )
    inspect.add_argument("path", help="a mask directory or a saved corrected model")
    inspect.add_argument("--plot", help="where to save the plot (default: PATH/mask_per_layer.png)")
    inspect.set_defaults(handler=_inspect)

    from hf_lrp_surgery.correction import BEHAVIOURS

    for entry in BEHAVIOURS.values():
        _recipe_parser(sub, entry, DEFAULT_MODEL, models)
    from hf_lrp_surgery.circuits.cli import register as register_circuit
    from hf_lrp_surgery.hub import register as register_hub

    register_hub(sub)
    register_circuit(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Example:
        >>> main(["report", "--max-new-tokens", "4"])  # doctest: +SKIP
    """
    from hf_lrp_surgery.exceptions import SurgeryError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (SurgeryError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
