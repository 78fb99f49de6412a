"""Safe writes: an artefact directory appears complete or not at all, and never replaces what a user had unasked.

Every output directory is built in a staging sibling (``.NAME.tmp-PID-RANDOM``) and moved into place
with ``os.replace`` only when it is complete. An existing output is replaced only with
``overwrite=True`` (an empty directory counts as free); a file, the working directory, one of its
parents, or a parent of an input is never replaced. Staging directories left behind by a killed
process are removed by the next write next to them. Files and directories get the permissions the
process's umask gives (not the private ones ``tempfile`` creates).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hf_lrp_surgery.exceptions import ArtefactError, OutputExistsError, SurgeryError

__all__ = [
    "atomic_directory",
    "check_output",
    "read_artefact",
    "staging_directory",
    "write_json_atomic",
    "write_text_atomic",
]

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^.]*$")


def _umask() -> int:
    # Read where the kernel reports it: setting and restoring it would give other threads umask 0 meanwhile.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _sweep_stale(parent: Path, name: str) -> None:
    """Remove staging directories of ``name`` left in ``parent`` by processes that no longer run.

    A process killed between moving the old output aside and moving the new one in leaves the old
    output in its ``.old-`` directory and no output: that old output is moved back, not removed.
    """
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir(), key=lambda e: ".old-" not in e.name):
        match = _STAGING.match(entry.name)
        if not match or match["name"] != name or _pid_alive(int(match["pid"])):
            continue
        kept = entry / name
        if ".old-" in entry.name and kept.is_dir() and not (parent / name).exists():
            os.replace(kept, parent / name)
        shutil.rmtree(entry, ignore_errors=True)


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(
    path: str | os.PathLike[str], *, overwrite: bool = False, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Refuse an output path whose replacement would lose something; return it as an absolute path.

    Run it before any expensive step, so that a bad ``--output`` fails at once.

    Args:
        path: The output directory.
        overwrite: Allow replacing an existing non-empty directory.
        inputs: Paths the run reads; the output may not be one of them or contain one.

    Returns:
        The absolute output path (not resolved through symlinks).

    Raises:
        OutputExistsError: ``path`` is a file; or a non-empty directory and ``overwrite`` is false;
            or the working directory, one of its parents, or a directory holding an input.

    Example:
        >>> import tempfile
        >>> free = Path(tempfile.mkdtemp()) / "new"
        >>> check_output(free) == free
        True
        >>> check_output(".")
        Traceback (most recent call last):
        ...
        hf_lrp_surgery.exceptions.OutputExistsError: ...
    """
    final = Path(os.path.abspath(path))
    if final.is_file() or (final.exists() and not final.is_dir()):
        raise OutputExistsError(f"the output {path} is a file, not a directory; choose a directory path")
    # Compared through symlinks: a link to a parent of the working directory is that parent.
    real = Path(os.path.realpath(final))
    if _is_within(Path(os.path.realpath(os.getcwd())), real):
        raise OutputExistsError(
            f"the output {path} is the working directory or one of its parents; replacing it would delete it. "
            "Choose a new sub-directory"
        )
    for given in inputs:
        if _is_within(Path(os.path.realpath(given)), real):
            raise OutputExistsError(
                f"the output {path} holds the input {given}; replacing it would delete the input. Choose another output"
            )
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"the output {path} exists and is not empty; pass --overwrite (overwrite=True) to replace it, or choose "
            "another directory"
        )
    return final


def _make_staging(final: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-{os.getpid()}-", dir=final.parent))


def staging_directory(final: str | os.PathLike[str]) -> Path:
    """A new, empty staging directory beside ``final`` (stale ones of dead processes are removed first).

    For writers that build something from ``final`` without replacing it (e.g. an upload copy);
    :func:`atomic_directory` uses the same naming, so a leftover of either is swept by the next.

    Args:
        final: The directory the staging copy stands for (its parent must exist).

    Returns:
        The staging directory (``.NAME.tmp-PID-RANDOM``); the caller removes it.
    """
    target = Path(os.path.abspath(final))
    _sweep_stale(target.parent, target.name)
    return _make_staging(target, "tmp")


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would have given."""
    umask = _umask()
    root.chmod(0o777 & ~umask)
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            (Path(directory) / name).chmod(0o777 & ~umask)
        for name in files:
            target = Path(directory) / name
            if not target.is_symlink():
                target.chmod((target.stat().st_mode & 0o777 | 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str], *, overwrite: bool = False, inputs: Iterable[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Build a directory in a staging sibling and move it into place only on success.

    If the block raises, the staging directory is removed and ``path`` is untouched. An existing
    non-empty ``path`` is replaced (after the new one is complete) only when ``overwrite`` is true.

    Args:
        path: The final directory.
        overwrite: Replace an existing non-empty directory.
        inputs: Paths the write reads from (the output may not contain them).

    Yields:
        The staging directory to write into.

    Raises:
        OutputExistsError: See :func:`check_output`.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "relevance"
        >>> with atomic_directory(out) as tmp:
        ...     _ = (tmp / "meta.json").write_text("{}")
        >>> sorted(p.name for p in out.iterdir())
        ['meta.json']
    """
    final = check_output(path, overwrite=overwrite, inputs=inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_directory(final)
    try:
        yield tmp
        _apply_umask(tmp)
        if final.exists():
            old = _make_staging(final, "old")
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

    The file gets the permissions the umask gives a new file (an existing file's mode is kept).

    Args:
        path: The destination file (its directory is created if needed).
        text: The content.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    mode = final.stat().st_mode & 0o777 if final.is_file() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
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


def read_artefact(
    directory: str | os.PathLike[str],
    meta_file: str,
    tensors_file: str,
    *,
    what: str,
    version: int,
    error: type[SurgeryError] = ArtefactError,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON manifest and the tensors of an artefact saved as ``meta_file`` + ``tensors_file``.

    Args:
        directory: The artefact's directory.
        meta_file: Its JSON manifest's name (holding ``format_version``).
        tensors_file: Its safetensors file's name.
        what: How to name the artefact in messages (``"scores"``).
        version: The format version this release reads.
        error: The exception class raised for a damaged artefact (a subclass names the kind).

    Returns:
        ``(manifest, tensors)``.

    Raises:
        FileNotFoundError: The directory does not hold both files.
        ArtefactError: (or ``error``) A file is unreadable, not JSON or truncated, or the format version
            is unknown.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(directory)
    meta_path, tensors_path = root / meta_file, root / tensors_file
    if not meta_path.is_file() or not tensors_path.is_file():
        raise FileNotFoundError(f"{root} does not hold saved {what} ({meta_file} + {tensors_file})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise error(f"{meta_path} cannot be read as JSON ({err}); save the {what} again") from err
    if not isinstance(meta, dict):
        raise error(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; save the {what} again")
    if meta.get("format_version") != version:
        found = meta.get("format_version")
        raise error(f"{meta_path}: unknown {what} format version {found!r}; save the {what} again")
    try:
        tensors = load_file(str(tensors_path))
    except (OSError, SafetensorError) as err:
        raise error(
            f"{tensors_path} cannot be read ({err}); it is truncated or damaged: save the {what} again"
        ) from err
    return meta, tensors
