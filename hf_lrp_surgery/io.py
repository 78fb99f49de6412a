"""Atomic writes: an artefact directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "write_json_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place only on success.

    If the block raises, the temporary directory is removed and ``path`` is untouched. An existing
    ``path`` is replaced (after the new one is complete) when ``overwrite`` is true.

    Args:
        path: The final directory.
        overwrite: Replace an existing directory; if false, an existing one is an error.

    Yields:
        The temporary directory to write into.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.

    Example:
        >>> with atomic_directory("out/relevance") as tmp:  # doctest: +SKIP
        ...     (tmp / "meta.json").write_text("{}")
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True or choose another directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    Args:
        path: The destination file (its directory is created if needed).
        text: The content.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` via a temporary file and ``os.replace``.

    Args:
        path: The destination file.
        data: Anything ``json.dumps`` accepts.
    """
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
