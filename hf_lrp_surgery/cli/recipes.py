"""The correction recipes, one command per registered behaviour (``detox``, ``fix-repetition``, ...)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from hf_lrp_surgery.cli._common import (
    add_model_arguments,
    add_objective_argument,
    add_output_arguments,
    checked_output,
    load,
    options_from,
    positive_int,
)
from hf_lrp_surgery.lrp.layout import GRANULARITIES
from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions

if TYPE_CHECKING:  # the commands import their modules when they run
    from hf_lrp_surgery.correction import RegisteredBehaviour

__all__ = ["recipe_parser", "register"]

# How a behaviour option's value is parsed from the command line (see ``CommandOption.kind``).
_OPTION_TYPES = {"str": str, "int": int, "float": float}
_CHOICE_KEYS = ("method", "granularity", "budget", "normalize", "protect_top", "dampen")


def _dampening(text: str) -> float | str | None:
    """``--search-dampenings`` values: ``none`` (hard mask), ``relevance``, ``aura`` or a constant scale in [0, 1)."""
    from hf_lrp_surgery.masks.soft import check_dampening

    if text == "none":
        return None
    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    try:
        check_dampening(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give none, relevance, aura or a scale in [0, 1) such as 0.5"
        ) from error
    return value


def _recipe(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.correction import GeneralLimits, run_recipe

    entry = args.behaviour
    options = entry.metadata.options
    values = {o.parameter: o.from_command_line(getattr(args, o.dest)) for o in options}
    # Option values that name files (a prompt file) are inputs the output must not replace.
    output = checked_output(args, *(v for v in values.values() if isinstance(v, str) and os.path.exists(v)))
    behaviour = entry.factory(**values)  # checks its own parts (a user scorer is probed) before the model loads
    limits = GeneralLimits(args.max_kl, args.max_perplexity_increase, args.max_induction_increase)
    search = None
    if args.search:
        from hf_lrp_surgery.correction.tradeoff import DEFAULT_BUDGET_RANGES, default_space

        given = {g: getattr(args, f"{g.removesuffix('s')}_range") for g in DEFAULT_BUDGET_RANGES}
        ranges = {g: (r[0], r[1]) for g, r in given.items() if r}
        search = default_space(entry.metadata.name, args.search_granularities, args.search_methods, ranges)
        if args.search_dampenings:
            search = replace(search, dampenings=tuple(args.search_dampenings))
    model, tokenizer = load(args)
    result = run_recipe(
        model,
        tokenizer,
        behaviour,
        output,
        budgets=args.budgets,
        scoring=options_from(args, ScoringOptions),
        contrast=options_from(args, ContrastOptions),
        selection=options_from(args, SelectionOptions, granularity=args.granularity or behaviour.granularity),
        focus=not args.no_focus,
        limits=limits,
        base_model_name_or_path=args.base_model_id,
        model_name=args.model,
        general_passages=args.general_passages,
        search=search,
        trials=args.trials,
        search_seed=args.search_seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"{result.behaviour}: {result.reference_sizes['undesired']} undesired / {result.reference_sizes['desired']} "
        "desired reference continuations"
    )
    print(f"{'budget':>7} {behaviour.primary:>14} {'KL':>8} {'ppl +% (worst domain)':>22} {'copy +nats':>10}  limits")
    for point in result.frontier:
        worst = max(point.perplexity_increases, key=point.perplexity_increases.__getitem__, default="")
        copy = "-" if point.induction_increase is None else f"{point.induction_increase:+.3f}"
        verdict = "within" if point.within_limits else "exceeds " + ", ".join(point.exceeded)
        print(
            f"{point.budget:>7} {point.effect[behaviour.primary]:>14.4f} {point.kl:>8.4f} "
            f"{f'{100 * point.perplexity_increase:.2f} ({worst})':>22} {copy:>10}  {verdict}"
        )
    if result.tradeoff is not None:
        chosen, front = result.tradeoff["chosen"], result.tradeoff["front"]
        picked = "nothing within the limits" if chosen is None else json.dumps({k: chosen[k] for k in _CHOICE_KEYS})
        print(f"trade-off search: {result.tradeoff['trials']} trials, {len(front)} on the front; chosen: {picked}")
    print(f"chosen budget: {result.chosen_budget}")
    print("held-out:", json.dumps(result.heldout))
    print(
        f"saved to {output} (report.json, effect_vs_budget.png, scores/, and mask/, adapter/, baked/ when a "
        "budget was chosen)"
    )
    return 0


def recipe_parser(subparsers: Any, entry: RegisteredBehaviour, **parser_keywords: Any) -> argparse.ArgumentParser:
    """The recipe command of a registered behaviour: the recipe flags shared by every behaviour, and its own options.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.
        entry: The behaviour's registry entry (its metadata names the command and its options).
        **parser_keywords: Passed to ``add_parser`` (e.g. ``epilog=``, ``formatter_class=``).

    Returns:
        The command's parser, whose handler runs :func:`~hf_lrp_surgery.correction.run_recipe`.

    Example:
        >>> parser = recipe_parser(subparsers, BEHAVIOURS["toxicity"])  # doctest: +SKIP
    """
    from hf_lrp_surgery.correction.tradeoff import DEFAULT_BUDGET_RANGES, DEFAULT_METHODS
    from hf_lrp_surgery.options import NORMALIZATIONS, SCOPES
    from hf_lrp_surgery.scoring import METHODS

    metadata = entry.metadata
    name = metadata.command
    defaults = f"{' '.join(map(str, metadata.budgets))} {metadata.granularity}"
    parser = subparsers.add_parser(name, help=metadata.summary, description=metadata.description, **parser_keywords)
    add_model_arguments(parser)
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=positive_int,
        help=f"budgets to search, in units of --granularity (default: {defaults})",
    )
    parser.add_argument("--granularity", choices=GRANULARITIES, help=f"what to prune (default: {defaults.split()[-1]})")
    parser.add_argument("--method", choices=METHODS, default="lrp", help="scoring method (lrp)")
    parser.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="total",
        help="per-set normalisation before the difference (total)",
    )
    parser.add_argument(
        "--protect-top",
        type=float,
        default=0.05,
        help="fraction most relevant to the general set that is never pruned (0.05)",
    )
    add_objective_argument(
        parser, choices=("logit", "logprob"), default="logit", old="--seed", help="what the relevance pass explains"
    )
    parser.add_argument(
        "--no-focus",
        action="store_true",
        help="explain whole undesired continuations, not only the tokens that carry the behaviour",
    )
    parser.add_argument("--scope", choices=SCOPES, default="global", help="selection scope (global)")
    parser.add_argument("--modules", nargs="+", help="weights: module groups, e.g. 'mlp.*' (all)")
    parser.add_argument("--max-kl", type=float, default=0.02, help="general-behaviour limit on KL (0.02)")
    parser.add_argument(
        "--max-perplexity-increase",
        type=float,
        default=0.03,
        help="general-behaviour limit on the relative perplexity increase of each general-text domain (0.03)",
    )
    parser.add_argument(
        "--max-induction-increase",
        type=float,
        default=0.25,
        help="general-behaviour limit on the induction probe's second-copy loss increase, in nats (0.25)",
    )
    parser.add_argument(
        "--general-passages",
        type=positive_int,
        default=5,
        help="passages per general-text domain in the budget search (5; the held-out measurement uses all)",
    )
    search = parser.add_argument_group(
        "trade-off search (Optuna TPE over method x granularity x budget x contrast, on the validation prompts)"
    )
    search.add_argument(
        "--search",
        action="store_true",
        help="search the trade-off instead of the budgets of one --method; the held-out split measures the choice",
    )
    search.add_argument("--trials", type=positive_int, default=24, help="trials of the search (24)")
    search.add_argument("--search-seed", type=int, default=0, help="the sampler's seed (0)")
    search.add_argument(
        "--search-methods",
        nargs="+",
        choices=METHODS,
        help=f"methods to search ({' '.join(DEFAULT_METHODS)}, and repetition_neurons for repetition)",
    )
    search.add_argument(
        "--search-granularities", nargs="+", choices=GRANULARITIES, default=["neurons", "heads"], help="(neurons heads)"
    )
    search.add_argument(
        "--search-dampenings",
        nargs="+",
        type=_dampening,
        metavar="RULE",
        help="hard masks (none) and soft-mask rules to search: none, relevance, aura (the aura method only) or a "
        "constant scale such as 0.5 (default: none relevance aura)",
    )
    for granularity, (low, high) in DEFAULT_BUDGET_RANGES.items():
        kind = granularity.removesuffix("s")
        search.add_argument(
            f"--{kind}-range", nargs=2, type=positive_int, metavar=("LOW", "HIGH"), help=f"budget range ({low} {high})"
        )
    parser.add_argument("--base-model-id", help="Hub id written into the adapter's config (default: --model's path)")
    add_output_arguments(parser, f"runs/{name}")
    for option in metadata.options:
        if option.kind == "switch":
            parser.add_argument(option.flag, action="store_true", help=option.help)
        else:
            parser.add_argument(option.flag, type=_OPTION_TYPES[option.kind], default=option.default, help=option.help)
    parser.set_defaults(handler=_recipe, behaviour=entry)
    return parser


def register(subparsers: Any) -> None:
    """Add one recipe command per registered behaviour, except those a command group of their own registered
    before (``fix``: :mod:`.fix`).

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.
    """
    from hf_lrp_surgery.correction import BEHAVIOURS

    for entry in BEHAVIOURS.values():
        if entry.metadata.command not in subparsers.choices:
            recipe_parser(subparsers, entry)
