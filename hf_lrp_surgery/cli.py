"""The ``hf-lrp-surgery`` command line.

Subcommands:
    report   Explain the model's own continuations of a few prompts: top MLP neurons, attention
             heads and input tokens, saved as JSON, text and a plot.

Errors on bad input are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]

_DTYPES = ("float32", "bfloat16", "float16")


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
    report = relevance_report(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                              batch_size=args.batch_size, progress=not args.no_progress)
    print(report.to_text())
    directory = report.save(args.output)
    print(f"\nSaved {directory}/report.json, report.txt, relevance_per_layer.png and relevance/")
    return 0


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
    report.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"embedded model ({', '.join(list_embedded_models())}), local checkpoint directory "
                             f"or Hub id (default: {DEFAULT_MODEL})")
    report.add_argument("--prompts", help="file with one prompt per line, or a JSON list / {'prompts': [...]} "
                                          "(default: the shipped report prompts)")
    report.add_argument("--max-new-tokens", type=int, default=8, help="length of the explained continuation (8)")
    report.add_argument("--top-k", type=int, default=10, help="neurons and heads to list (10)")
    report.add_argument("--batch-size", type=int, default=8, help="samples per relevance pass (8)")
    report.add_argument("--dtype", choices=_DTYPES, default="float32", help="model dtype (float32)")
    report.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    report.add_argument("--output", default="runs/report", help="output directory (runs/report)")
    report.add_argument("--no-progress", action="store_true", help="hide progress bars")
    report.set_defaults(handler=_report)
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
