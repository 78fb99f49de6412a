"""The file record of a saved corrected model: which parts it holds, so that a damaged or mixed directory is refused.

``surgery/check.json`` lists, by relative name, the tensor files and mask files the save wrote: the
size of each, and the SHA-256 of the mask files (the weights' content is proven after loading by the
probe logits, so hashing gigabytes is not needed). It is written last into the staging directory,
which :func:`~hf_lrp_surgery.io.atomic_directory` swaps in as a whole: a directory whose record
is complete and whose files match it holds the parts of one save.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hf_lrp_surgery.exceptions import SavedModelError
from hf_lrp_surgery.lrp.layout import GRANULARITIES

__all__ = [
    "REDO",
    "check_files",
    "damaged_weights_error",
    "inside",
    "mask_directories",
    "read_record",
    "record_files",
    "saved_dtype",
]

#: Suffixes of the tensor files a carrier writes (their sizes are recorded).
_TENSOR_SUFFIXES = (".safetensors", ".bin")
#: What the messages tell users to do about a damaged or mixed directory.
REDO = "save the corrected model again, or download it again"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_files(directory: Path, surgery_dir: str) -> dict[str, dict[str, Any]]:
    """The record of the tensor and mask files in a (staging) directory, by relative POSIX name.

    Args:
        directory: The directory just written.
        surgery_dir: Its sub-directory holding the masks (every file there is hashed).

    Returns:
        Relative name -> ``{"bytes": size}`` (plus ``"sha256"`` for the files in ``surgery_dir``).

    Example:
        >>> record_files(tmp, "surgery")  # doctest: +SKIP
        {'adapter_model.safetensors': {'bytes': 1208}, 'surgery/neurons/mask.json': {...}, ...}
    """
    record: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        in_surgery = name.startswith(f"{surgery_dir}/")
        if in_surgery or path.suffix in _TENSOR_SUFFIXES:
            record[name] = {"bytes": path.stat().st_size, **({"sha256": _sha256(path)} if in_surgery else {})}
    return record


def inside(directory: Path, name: str, *, what: str, record_path: Path) -> Path:
    """``directory / name`` for a relative name that stays inside ``directory``.

    The test is on the name, not on where links lead: the Hub's cache links every file of a snapshot
    to a blob outside it.

    Raises:
        SavedModelError: ``name`` is absolute or climbs out with ``..``.
    """
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or Path(name).is_absolute():
        raise SavedModelError(
            f"{record_path} names {what} {name!r} outside {directory}; a saved corrected model only refers to its "
            f"own files. The record was edited: {REDO}",
            path=record_path,
        )
    return directory / relative


def read_record(path: Path) -> dict[str, Any]:
    """Read ``check.json``, refusing anything but a JSON object with the keys every save writes.

    Raises:
        SavedModelError: Unreadable, not JSON, or lacking (or garbling) ``carrier``, ``granularities`` or ``probe``.
    """
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SavedModelError(f"{path} cannot be read as JSON ({err}); {REDO}", path=path) from err
    keys = record if isinstance(record, dict) else {}
    missing = [key for key in ("carrier", "granularities", "probe") if key not in keys]
    if missing:
        raise SavedModelError(f"{path} lacks {', '.join(missing)}; {REDO}", path=path)
    if not isinstance(record["carrier"], str) or not isinstance(record["probe"], dict):
        raise SavedModelError(f"{path}: carrier must be a name and probe a record; {REDO}", path=path)
    return record


def mask_directories(record: dict[str, Any], root: Path, record_path: Path) -> list[Path]:
    """The mask directories ``check.json`` lists: one per granularity, by its name, inside ``root``.

    Raises:
        SavedModelError: An entry is not a granularity name (e.g. ``"../../other/mask"``), repeats,
            or leads outside ``root``.
    """
    names = record["granularities"]
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise SavedModelError(
            f"{record_path}: granularities must list each mask directory once, got {names!r}; {REDO}",
            path=record_path,
        )
    for name in names:
        if name not in GRANULARITIES:
            raise SavedModelError(
                f"{record_path} names the mask directory {name!r}; mask directories are named by their "
                f"granularity ({', '.join(GRANULARITIES)}) inside {root}. The record was edited: {REDO}",
                path=record_path,
            )
    return [inside(root, name, what="the mask directory", record_path=record_path) for name in names]


def _unreadable_safetensors(path: Path) -> str | None:
    """Why the header of a safetensors file cannot be read (a truncated file fails here), or ``None``."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        return str(err)
    return None


def check_files(directory: Path, files: Any, record_path: Path) -> None:
    """Every recorded file is there, of its recorded size and hash, and its tensors' header readable.

    Args:
        directory: The saved corrected model.
        files: ``check.json``'s ``"files"`` (``None`` in directories saved before it was recorded:
            nothing to check).
        record_path: ``check.json``, for the messages.

    Raises:
        SavedModelError: A file is missing, truncated, damaged or replaced (the message names it).
    """
    if files is None:
        return
    if not isinstance(files, dict):
        raise SavedModelError(f"{record_path}: files must map names to sizes; {REDO}", path=record_path)
    for name, expected in files.items():
        path = inside(directory, name, what="the file", record_path=record_path)
        if not path.is_file():
            raise SavedModelError(f"{path} is missing from the saved corrected model; {REDO}", path=path)
        size = path.stat().st_size
        saved = expected.get("bytes") if isinstance(expected, dict) else None
        if saved != size:
            raise SavedModelError(
                f"{path} has {size} bytes, the save wrote {saved}: it is truncated or was replaced by another "
                f"save's; {REDO}",
                path=path,
            )
        if "sha256" in expected and _sha256(path) != expected["sha256"]:
            raise SavedModelError(
                f"{path} is not the file saved with this corrected model (its SHA-256 differs): the directory mixes "
                f"parts of different saves; {REDO}",
                path=path,
            )
        problem = _unreadable_safetensors(path) if path.suffix == ".safetensors" else None
        if problem is not None:
            raise SavedModelError(f"{path} cannot be read ({problem}): it is damaged; {REDO}", path=path)


def damaged_weights_error(directory: Path, patterns: Sequence[str], err: Exception) -> SavedModelError:
    """The error for model files that failed to load, naming the damaged or missing file where it can.

    Args:
        directory: The saved corrected model.
        patterns: The carrier's model-file glob patterns.
        err: What loading raised.

    Returns:
        A :class:`SavedModelError` that names the first unreadable tensor file, or the missing ones.
    """
    tensor_patterns = [p for p in patterns if p.endswith(_TENSOR_SUFFIXES)]
    present = sorted({f for pattern in tensor_patterns for f in directory.glob(pattern) if f.is_file()})
    for path in present:
        problem = _unreadable_safetensors(path) if path.suffix == ".safetensors" else None
        if problem is not None:
            return SavedModelError(f"{path} cannot be read ({problem}): it is truncated or damaged; {REDO}", path=path)
    if not present:
        return SavedModelError(
            f"{directory} holds none of its weight files ({', '.join(tensor_patterns)}): they were deleted; {REDO}",
            path=directory,
        )
    return SavedModelError(f"the model files in {directory} cannot be loaded ({err}); {REDO}", path=directory)


def saved_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a probe recorded (``"torch.float16"``), or ``None`` for an unknown name."""
    value = getattr(torch, name.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None
