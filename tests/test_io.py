"""Safe outputs: nothing a user had is replaced unasked, staging leftovers are swept, modes follow the umask."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_lrp_surgery.exceptions import OutputExistsError
from hf_lrp_surgery.io import atomic_directory, check_output, write_text_atomic


def _build(path: Path, **kwargs: object) -> None:
    with atomic_directory(path, **kwargs) as tmp:  # type: ignore[arg-type]
        (tmp / "new.txt").write_text("new")


def test_refuses_what_would_lose_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file, a non-empty directory (without overwrite), the working directory and its parents are never replaced."""
    existing = tmp_path / "results"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="exists and is not empty; pass --overwrite"):
        _build(existing, overwrite=False)
    assert (existing / "mine.txt").read_text() == "keep me"

    a_file = tmp_path / "prompts.jsonl"
    a_file.write_text("{}\n")
    with pytest.raises(OutputExistsError, match="is a file"):
        _build(a_file, overwrite=True)
    assert a_file.read_text() == "{}\n"

    monkeypatch.chdir(existing)
    for target in (".", str(existing), str(tmp_path)):
        with pytest.raises(OutputExistsError, match="working directory"):
            _build(Path(target), overwrite=True)
    assert (existing / "mine.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory is left behind"


def test_inputs_and_empty_directories(tmp_path: Path) -> None:
    """An output that holds an input is refused; an existing empty directory is free; overwrite replaces."""
    inputs = tmp_path / "data" / "prompts.txt"
    inputs.parent.mkdir()
    inputs.write_text("a\n")
    with pytest.raises(OutputExistsError, match="holds the input"):
        check_output(tmp_path / "data", overwrite=True, inputs=[inputs])
    empty = tmp_path / "empty"
    empty.mkdir()
    _build(empty, overwrite=False)
    assert (empty / "new.txt").read_text() == "new"
    (empty / "old.txt").write_text("old")
    _build(empty, overwrite=True)
    assert sorted(p.name for p in empty.iterdir()) == ["new.txt"]


def test_failed_build_leaves_the_old_output(tmp_path: Path) -> None:
    """An error inside the block removes the staging directory and leaves the existing output as it was."""
    out = tmp_path / "out"
    _build(out)
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed midway")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_staging_of_a_killed_process_is_swept(tmp_path: Path) -> None:
    """A process killed (SIGKILL) while building leaves a staging directory; the next write removes it."""
    code = (
        "import os, sys, signal\n"
        "from hf_lrp_surgery.io import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as tmp:\n"
        "    (tmp / 'big.bin').write_bytes(b'0' * 1024)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True)
    assert result.returncode == -9
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.tmp-"), leftovers
    _build(tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_live_staging_is_kept(tmp_path: Path) -> None:
    """A staging directory of a process that still runs (here: this one) is not swept."""
    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    live.mkdir()
    _build(tmp_path / "out")
    assert live.is_dir()


def test_modes_follow_the_umask(tmp_path: Path) -> None:
    """Outputs get the umask's modes (0755 / 0644 under umask 022), not tempfile's private 0700 / 0600."""
    previous = os.umask(0o022)
    try:
        _build(tmp_path / "out")
        write_text_atomic(tmp_path / "report.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "new.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
