"""The ``hf-lrp-surgery`` command line: one module per command group.

Commands:
    report     Explain the model's own continuations of a few prompts: top MLP neurons, attention
               heads and input tokens, saved as JSON, text and a plot (:mod:`.report`).
    attribute  Score components on one reference set (LRP or a baseline) and save the scores.
    correct    Contrast an undesired with a general reference set, select a mask, apply it (adapter
               and/or baked) and save everything: scores, mask, corrected model(s), plot.
    apply      Apply a saved mask to a model and save the corrected model.
    inspect    Print a mask's statistics per layer (and save a plot) (these four: :mod:`.surgery`).
    detox, fix-repetition, ...
               The correction recipes, one per registered behaviour: paired reference sets from the
               model's own continuations, contrastive attribution, a budget search under a
               general-behaviour limit, the corrected model (adapter and baked), and before/after
               numbers on held-out prompts (:mod:`.recipes`).
    push       Push a saved corrected model to a Hub repo with its model card; a failed push keeps the
               local copy and prints the command that retries it.
    card       Write model cards into a recipe's baked/ and adapter/, or into one saved model (:mod:`.hub`).
    circuit    Find the smallest circuit that keeps a next-token task (IOI or your prompts) working, with
               LRP and the baselines, and compare their performance-vs-sparsity curves (:mod:`.circuits`).

Every command that writes takes ``--output`` and ``--overwrite``: an existing non-empty output is
never replaced without ``--overwrite``. Errors on bad input are printed as one line (``error: ...``)
with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_lrp_surgery.cli import circuits, fix, hub, recipes, report, surgery

__all__ = ["COMMAND_GROUPS", "build_parser", "main"]

#: The command group modules, each with ``register(subparsers)``; a new group is one module and one entry.
COMMAND_GROUPS = (report, surgery, fix, recipes, hub, circuits)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-lrp-surgery``.

    Example:
        >>> build_parser().parse_args(["inspect", "runs/mask"]).path
        'runs/mask'
    """
    parser = argparse.ArgumentParser(
        prog="hf-lrp-surgery",
        description="Attribution-guided model surgery (AttnLRP relevance, contrastive pruning) for Hugging Face LMs.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(subparsers)
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
    except (SurgeryError, FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
