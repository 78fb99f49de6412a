"""Reading the callback's checkpoint state: a missing or damaged file is a ``TrainingStateError`` naming it.

A resumed run must keep the state of the interrupted one or refuse to start; it never starts over
quietly. Every reader here turns what a deleted, truncated or hand-edited file raises (a missing
file, JSON that does not parse, a safetensors header cut short, an entry of the wrong type) into one
error that names the file and says how to go on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.exceptions import SurgeryError, TrainingStateError

__all__ = ["UNREADABLE", "check_format", "damaged", "entry", "read_json_object", "read_tensors"]

#: What loading a damaged artefact raises (JSON and Unicode errors are ValueErrors).
UNREADABLE: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    SafetensorError,
    SurgeryError,
)
_WHAT_TO_DO = "resume from another checkpoint, or start the run again without resume_from_checkpoint"


def damaged(path: Path, problem: str) -> TrainingStateError:
    """The error for a state file that is missing or cannot be trusted.

    Args:
        path: The file (or directory) at fault.
        problem: What is wrong with it, as a clause (``"is missing"``).

    Returns:
        A :class:`~hf_lrp_surgery.exceptions.TrainingStateError` naming ``path`` and what to do.

    Example:
        >>> raise damaged(Path("checkpoint-2/lrp_surgery/state.json"), "is missing")  # doctest: +SKIP
    """
    return TrainingStateError(f"{path} {problem}: the checkpoint's LRPSurgeryCallback state is damaged; {_WHAT_TO_DO}")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object stored in ``path``.

    Args:
        path: A JSON file written by the callback.

    Returns:
        The parsed object.

    Raises:
        TrainingStateError: The file is missing, unreadable, not JSON, or not a JSON object.

    Example:
        >>> record = read_json_object(checkpoint / "lrp_surgery" / "state.json")  # doctest: +SKIP
    """
    if not path.is_file():
        raise damaged(path, "is missing")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise damaged(path, f"is not readable JSON ({err})") from err
    if not isinstance(record, dict):
        raise damaged(path, f"holds a JSON {type(record).__name__}, not an object")
    return record


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors stored in the safetensors file ``path``.

    Args:
        path: A safetensors file written by the callback.

    Returns:
        Tensor name -> tensor.

    Raises:
        TrainingStateError: The file is missing, unreadable or truncated.

    Example:
        >>> sums = read_tensors(checkpoint / "lrp_surgery" / "relevance" / "accumulated.safetensors")  # doctest: +SKIP
    """
    if not path.is_file():
        raise damaged(path, "is missing")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise damaged(path, f"is not a readable safetensors file ({err})") from err


def _is(value: object, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def entry(
    record: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    path: Path,
    *,
    items: type | None = None,
) -> Any:
    """``record[key]``, checked to be a ``kind`` (whose elements, or values for a dict, are ``items``).

    Args:
        record: An object read with :func:`read_json_object`.
        key: The entry.
        kind: Its type(s); ``int`` does not admit ``bool``.
        path: The file ``record`` was read from (for the message).
        items: The type of a list's elements or a dict's values, if checked.

    Returns:
        The entry.

    Raises:
        TrainingStateError: The entry is missing or of another type.

    Example:
        >>> steps = entry(record, "surgery_steps", list, path, items=int)  # doctest: +SKIP
    """
    if key not in record:
        raise damaged(path, f"has no {key!r} entry")
    value = record[key]
    elements = value.values() if isinstance(value, dict) else value
    if not _is(value, kind) or (items is not None and not all(_is(v, items) for v in elements)):
        raise damaged(path, f"has a {key!r} entry of the wrong type ({type(value).__name__} {value!r:.80})")
    return value


def check_format(record: Mapping[str, Any], path: Path, expected: int, what: str) -> None:
    """Refuse a state file written in a format this release does not read.

    Args:
        record: The file's parsed JSON object.
        path: The file.
        expected: The format version this release writes and reads.
        what: What the file holds, for the message (``"callback-state"``).

    Raises:
        TrainingStateError: ``format_version`` is missing, not an int, or not ``expected``.
    """
    version = entry(record, "format_version", int, path)
    if version != expected:
        raise TrainingStateError(
            f"{path} is {what} format {version}, which hf_lrp_surgery {__version__} does not read; resume with the "
            "release that wrote it, or start the run again without resume_from_checkpoint"
        )
