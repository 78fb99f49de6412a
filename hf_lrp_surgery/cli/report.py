"""``hf-lrp-surgery report``: explain the model's own continuations of a few prompts."""

from __future__ import annotations

import argparse
from typing import Any

from hf_lrp_surgery.cli._common import add_model_arguments, add_output_arguments, checked_output, load, positive_int

__all__ = ["register"]


def _prompts(path: str) -> list[str]:
    """Prompt texts from a .txt / .json / .jsonl reference file (a .jsonl record's ``prompt``, not the raw line)."""
    from hf_lrp_surgery.exceptions import ReferenceSetError
    from hf_lrp_surgery.references import load_reference_set

    samples = load_reference_set(path)
    if not all(isinstance(s.prompt, str) for s in samples):
        raise ReferenceSetError(f"{path}: the report explains text prompts; give prompt strings, not token ids")
    return [str(s.prompt) for s in samples]


def _report(args: argparse.Namespace) -> int:
    from hf_lrp_surgery.report import relevance_report

    output = checked_output(args, args.prompts)
    prompts = _prompts(args.prompts) if args.prompts else None
    model, tokenizer = load(args)
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
    directory = report.save(output, overwrite=args.overwrite)
    print(f"\nSaved {directory}/report.json, report.txt, relevance_per_layer.png and relevance/")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``report`` command.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned.
    """
    report = subparsers.add_parser(
        "report",
        help="relevance report: top neurons, heads and input tokens for the model's own continuations",
        description="Continue each prompt greedily, explain prompt + continuation with AttnLRP, print the most "
        "relevant MLP neurons, attention heads and input tokens, and save JSON, text and a plot.",
    )
    add_model_arguments(report)
    report.add_argument(
        "--prompts",
        help="prompts: .txt (one per line), .jsonl ({'prompt': ...} per line) or .json (a list or "
        "{'prompts': [...]}) (default: the shipped report prompts)",
    )
    report.add_argument(
        "--max-new-tokens", type=positive_int, default=8, help="length of the explained continuation (8)"
    )
    report.add_argument("--top-k", type=positive_int, default=10, help="neurons and heads to list (10)")
    add_output_arguments(report, "runs/report")
    report.set_defaults(handler=_report)
