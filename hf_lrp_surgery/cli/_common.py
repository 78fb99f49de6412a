"""Arguments and steps shared by the command groups: the model, relevance options, outputs, errors.

Every command that loads a model takes the same ``--model``/``--dtype``/``--device`` flags; every
command that writes takes ``--output`` and ``--overwrite`` and checks the output before it loads
anything, so that a bad path fails at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

_Options = TypeVar("_Options")

__all__ = [
    "DTYPES",
    "OBJECTIVE_HELP",
    "add_model_arguments",
    "add_objective_argument",
    "add_output_arguments",
    "budget",
    "checked_output",
    "load",
    "options_from",
    "positive_int",
]

#: The dtypes a model may be loaded in from the command line.
DTYPES = ("float32", "bfloat16", "float16")
#: The help of ``--objective`` for the relevance-based methods.
OBJECTIVE_HELP = "lrp/gradient: explain the target logits or their log-probabilities"


def _models_help() -> tuple[str, str]:
    from hf_lrp_surgery.models import DEFAULT_MODEL, list_embedded_models

    return DEFAULT_MODEL, ", ".join(list_embedded_models())


def add_model_arguments(parser: argparse.ArgumentParser, *, batch_size: bool = True) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--no-progress`` (and ``--batch-size``)."""
    default, models = _models_help()
    parser.add_argument(
        "--model",
        default=default,
        help=f"embedded model ({models}), local checkpoint directory or Hub id (default: {default})",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    if batch_size:
        parser.add_argument("--batch-size", type=positive_int, default=8, help="samples per relevance pass (8)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


class _DeprecatedAlias(argparse.Action):
    """Store the value like the new flag, and tell the user the flag they typed is deprecated."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        print(f"warning: {option} is deprecated; use {self.metavar}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_objective_argument(
    parser: argparse.ArgumentParser, *, choices: Sequence[str], default: str, old: str, help: str
) -> None:
    """``--objective`` (what the relevance pass explains), with the old flag name as a deprecated alias.

    Args:
        parser: The command's parser.
        choices: The objectives the command accepts.
        default: The default objective.
        old: The deprecated flag that meant the same (``--seed``, ``--relevance-seed``).
        help: The help text (the default is appended).
    """
    parser.add_argument("--objective", choices=choices, default=default, help=f"{help} ({default})")
    parser.add_argument(
        old, dest="objective", choices=choices, action=_DeprecatedAlias, metavar="--objective", help=argparse.SUPPRESS
    )


def add_output_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """``--output`` and ``--overwrite``."""
    parser.add_argument("--output", default=default, help=f"output directory ({default})")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output directory if it exists and is not empty (never the working directory, a parent "
        "of it, or a directory holding an input)",
    )


def checked_output(args: argparse.Namespace, *inputs: str | None) -> Path:
    """The output path, refused before any expensive step if writing it would lose something.

    Raises:
        OutputExistsError: See :func:`hf_lrp_surgery.io.check_output`.
    """
    from hf_lrp_surgery.io import check_output

    return check_output(args.output, overwrite=args.overwrite, inputs=[i for i in inputs if i])


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def budget(text: str) -> int | float:
    """An argparse type: a count ("50") or a fraction ("0.01")."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"budget must be a count such as 50 or a fraction such as 0.01, got {text!r}"
            ) from None


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer the ``--model``/``--dtype``/``--device`` flags name."""
    import torch

    from hf_lrp_surgery.models import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)


def options_from(args: argparse.Namespace, cls: type[_Options], **values: Any) -> _Options:
    """Options of a frozen options dataclass from the flags of the same names (``values`` win; unset flags are skipped).

    Example:
        >>> from hf_lrp_surgery.options import ContrastOptions
        >>> options_from(argparse.Namespace(normalize="max", protect_top=None, budget=5), ContrastOptions)
        ContrastOptions(normalize='max', protect_top=0.05)
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    flags = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return cls(**{**flags, **values})
