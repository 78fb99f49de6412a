"""The command line with bad paths and bad input: nothing a user had is lost, every error is one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hf_lrp_surgery.cli import main
from hf_lrp_surgery.surgeon import Surgeon

PAIRS = [("the cat sat on the", " mat mat mat mat"), ("hello world", " bad bad bad bad"), ("one two", " three")]
KEEP = [("the capital of france is", " paris"), ("the sun and the", " moon"), ("a big red", " house")]


def _jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "continuation": c}) + "\n" for p, c in pairs))
    return path


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _correct(checkpoint: Path, tmp_path: Path, output: str, *extra: str) -> list[str]:
    return [
        "correct",
        "--model",
        str(checkpoint),
        "--no-progress",
        "--undesired",
        str(_jsonl(tmp_path / "undesired.jsonl", PAIRS)),
        "--general",
        str(_jsonl(tmp_path / "general.jsonl", KEEP)),
        "--budget",
        "2",
        "--output",
        output,
        *extra,
    ]


def _one_line_error(capsys: pytest.CaptureFixture, status: int, expected: str) -> None:
    """Exit status 2 and one ``error:`` line that says ``expected`` (progress bars of earlier runs aside)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and expected in errors[0], errors


def test_outputs_that_would_lose_data_are_refused_before_loading(
    text_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing directory, the working directory, '.', a parent and a file are refused; nothing changes."""
    work = tmp_path / "work"
    (work / "results").mkdir(parents=True)
    (work / "results" / "mine.txt").write_text("keep me")
    (work / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    monkeypatch.chdir(work)
    # Loading the model would be the first expensive step: it must never be reached.
    monkeypatch.setattr("hf_lrp_surgery.cli.surgery.load", lambda args: pytest.fail("loaded before the output check"))
    before = _tree(tmp_path)
    cases = [
        ("results", "exists and is not empty; pass --overwrite"),
        (str(work), "working directory"),
        (".", "working directory"),
        (str(tmp_path), "working directory"),
        ("prompts.jsonl", "is a file"),
    ]
    for output, message in cases:
        status = main(["attribute", "--samples", "prompts.jsonl", "--output", output])
        _one_line_error(capsys, status, message)
    assert _tree(tmp_path) == before, "a refused output changed files"


def test_overwrite_replaces_and_an_output_holding_the_input_is_refused(
    text_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--overwrite replaces a results directory, but never one that holds the command's own input."""
    (tmp_path / "inputs").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = _correct(text_checkpoint, tmp_path / "inputs", str(out))
    _one_line_error(capsys, main(args), "pass --overwrite")
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "baked", "mask", "mask_per_layer.png", "scores"]
    status = main(_correct(text_checkpoint, tmp_path / "inputs", str(tmp_path / "inputs"), "--overwrite"))
    _one_line_error(capsys, status, "holds the input")


def test_a_correction_that_fails_midway_leaves_the_previous_output_whole(
    text_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`correct --budget 2`, then `--budget 3 --overwrite` failing after the adapter is written: still budget 2."""
    (tmp_path / "inputs").mkdir()
    out = tmp_path / "out"
    assert main(_correct(text_checkpoint, tmp_path / "inputs", str(out))) == 0
    before = _tree(out)
    saved = Surgeon.save
    calls: list[Path] = []

    def save_then_fail(self: Surgeon, directory: Path, **kwargs: object) -> Path:
        calls.append(Path(directory))
        if len(calls) == 2:  # the baked model, after the adapter
            raise OSError("disk full (simulated)")
        return saved(self, directory, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Surgeon, "save", save_then_fail)
    args = _correct(text_checkpoint, tmp_path / "inputs", str(out), "--overwrite")
    args[args.index("--budget") + 1] = "3"
    with pytest.raises(OSError, match="disk full"):
        main(args)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "the staging directory was left"


def test_report_and_inspect_arguments(text_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--top-k -5 is an argparse error; .jsonl prompts are read as prompts; inspect writes only where --plot says."""
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--top-k", "-5"])
    assert exit_info.value.code == 2
    assert "expected a whole number >= 1, got -5" in capsys.readouterr().err

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat sat on the"}\n{"prompt": "hello world"}\n')
    out = tmp_path / "report"
    common = ["--model", str(text_checkpoint), "--no-progress", "--max-new-tokens", "2"]
    assert main(["report", *common, "--prompts", str(prompts), "--output", str(out)]) == 0
    explained = [s["prompt"] for s in json.loads((out / "report.json").read_text())["samples"]]
    assert explained == ["the cat sat on the", "hello world"]

    (tmp_path / "inputs").mkdir()
    assert main(_correct(text_checkpoint, tmp_path / "inputs", str(tmp_path / "fixed"))) == 0
    mask = tmp_path / "fixed" / "mask"
    before = _tree(mask)
    _one_line_error(capsys, main(["inspect", str(mask), "--plot", str(tmp_path / "refs")]), "must name a .png")
    assert main(["inspect", str(mask)]) == 0
    assert _tree(mask) == before, "inspect wrote into the directory it inspects"
    plot = tmp_path / "plot.png"
    assert main(["inspect", str(mask), "--plot", str(plot)]) == 0 and plot.is_file()
    _one_line_error(capsys, main(["inspect", str(mask), "--plot", str(plot)]), "pass --overwrite")


def test_token_ids_beyond_the_vocabulary_are_one_clear_error(text_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """A reference set of token ids the model does not have is refused by name, not an IndexError traceback."""
    samples = tmp_path / "ids.json"
    samples.write_text(json.dumps([[1, 5, 99999]]))
    status = main(
        ["attribute", "--model", str(text_checkpoint), "--samples", str(samples), "--output", str(tmp_path / "s")]
    )
    _one_line_error(capsys, status, "token id 99999, outside the model's vocabulary")
