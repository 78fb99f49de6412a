"""Reference sets from lists, pairs, mappings, .txt/.jsonl/.json files and ``datasets`` objects."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.lrp import ReferenceSample
from hf_lrp_surgery.references import load_reference_set

#: What every source in these tests holds.
EXPECTED = [
    ReferenceSample("the cat sat"),
    ReferenceSample("hello", " world"),
    ReferenceSample("the capital of france is", target=" paris"),
]


def _write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` and return the path."""
    path.write_text(text, encoding="utf-8")
    return path


def test_in_memory_forms() -> None:
    """Strings, (prompt, continuation) tuples, mappings and samples become the same ReferenceSamples."""
    mixed = ["the cat sat", ("hello", " world"), {"prompt": "the capital of france is", "target": " paris"}]
    assert load_reference_set(mixed) == EXPECTED
    mappings = [
        {"text": "the cat sat"},
        {"prompt": "hello", "continuation": " world"},
        {"prompt": "the capital of france is", "target": " paris", "source": "quiz"},
    ]
    assert load_reference_set(mappings) == EXPECTED
    assert load_reference_set(EXPECTED) == EXPECTED
    assert load_reference_set([[1, 5, 7], (2, 3)]) == [ReferenceSample([1, 5, 7]), ReferenceSample([2, 3])]
    assert load_reference_set(iter(["a", "b"])) == [ReferenceSample("a"), ReferenceSample("b")]


def test_prompt_column_wins_over_text() -> None:
    """A record with both 'prompt' and 'text' uses 'prompt'."""
    assert load_reference_set([{"text": "ignored", "prompt": "used"}]) == [ReferenceSample("used")]


def test_txt_file(tmp_path: Path) -> None:
    """A .txt file holds one prompt per line; blank lines are skipped."""
    path = _write(tmp_path / "set.txt", "the cat sat\n\n  \nhello world\n")
    expected = [ReferenceSample("the cat sat"), ReferenceSample("hello world")]
    assert load_reference_set(path) == expected
    assert load_reference_set(str(path)) == expected


def test_jsonl_file(tmp_path: Path) -> None:
    """A .jsonl file: one mapping (or a [prompt, continuation] pair, or a string) per line."""
    lines = [
        json.dumps({"prompt": "the cat sat"}),
        "",
        json.dumps(["hello", " world"]),
        json.dumps({"text": "the capital of france is", "target": " paris"}),
    ]
    path = _write(tmp_path / "set.jsonl", "\n".join(lines) + "\n")
    assert load_reference_set(path) == EXPECTED
    strings = _write(tmp_path / "strings.jsonl", '"a"\n"b"\n')
    assert load_reference_set(str(strings)) == [ReferenceSample("a"), ReferenceSample("b")]


def test_json_files(tmp_path: Path) -> None:
    """A .json file holds a list, or an object with a 'samples' (or 'prompts') list."""
    records = ["the cat sat", ["hello", " world"], {"prompt": "the capital of france is", "target": " paris"}]
    as_list = _write(tmp_path / "list.json", json.dumps(records))
    assert load_reference_set(as_list) == EXPECTED
    as_object = _write(tmp_path / "object.json", json.dumps({"name": "quiz", "samples": records}))
    assert load_reference_set(str(as_object)) == EXPECTED
    prompts = _write(tmp_path / "prompts.json", json.dumps({"prompts": ["a", "b"]}))
    assert load_reference_set(prompts) == [ReferenceSample("a"), ReferenceSample("b")]
    no_list = _write(tmp_path / "bad.json", json.dumps({"data": ["a"]}))
    with pytest.raises(ReferenceSetError, match="JSON list"):
        load_reference_set(no_list)


def test_datasets_dataset() -> None:
    """A datasets.Dataset with prompt + continuation columns, or with a text column."""
    pairs = datasets.Dataset.from_dict(
        {"prompt": ["hello", "the cat"], "continuation": [" world", " sat"], "label": [0, 1]}
    )
    assert load_reference_set(pairs) == [ReferenceSample("hello", " world"), ReferenceSample("the cat", " sat")]
    texts = datasets.Dataset.from_dict({"text": ["a red car", "the sun"]})
    assert load_reference_set(texts) == [ReferenceSample("a red car"), ReferenceSample("the sun")]
    targets = datasets.Dataset.from_dict({"prompt": ["the capital of france is"], "target": [" paris"]})
    assert load_reference_set(targets) == [EXPECTED[2]]
    with pytest.raises(ReferenceSetError, match="'prompt', 'text'"):
        load_reference_set(datasets.Dataset.from_dict({"question": ["why"]}))


def test_limit_and_min_samples(tmp_path: Path) -> None:
    """limit keeps the first samples; fewer than min_samples -> ReferenceSetError."""
    prompts = [f"prompt {i}" for i in range(5)]
    assert load_reference_set(prompts, limit=2) == [ReferenceSample("prompt 0"), ReferenceSample("prompt 1")]
    assert len(load_reference_set(prompts, limit=10)) == 5
    path = _write(tmp_path / "set.txt", "\n".join(prompts))
    assert [s.prompt for s in load_reference_set(path, limit=3)] == prompts[:3]
    assert len(load_reference_set(prompts, min_samples=5)) == 5
    with pytest.raises(ReferenceSetError, match="has 5 samples; at least 6"):
        load_reference_set(prompts, min_samples=6)
    with pytest.raises(ReferenceSetError, match="has 2 samples; at least 3"):
        load_reference_set(prompts, limit=2, min_samples=3)
    with pytest.raises(ReferenceSetError, match="empty"):
        load_reference_set(prompts, limit=0)


def test_empty_sources(tmp_path: Path) -> None:
    """An empty list, file or dataset -> ReferenceSetError."""
    with pytest.raises(ReferenceSetError, match="empty"):
        load_reference_set([])
    with pytest.raises(ReferenceSetError, match="empty"):
        load_reference_set(_write(tmp_path / "blank.txt", "\n \n"))
    with pytest.raises(ReferenceSetError, match="empty"):
        load_reference_set(_write(tmp_path / "none.json", "[]"))
    with pytest.raises(ReferenceSetError, match="empty"):
        load_reference_set(datasets.Dataset.from_dict({"prompt": []}))


def test_missing_file(tmp_path: Path) -> None:
    """A path that does not exist -> FileNotFoundError naming it (str with a known suffix or a Path)."""
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_reference_set(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_reference_set(tmp_path / "missing.txt")


def test_bad_records() -> None:
    """A record without a prompt, an unknown item type, or a bare string -> ReferenceSetError."""
    with pytest.raises(ReferenceSetError, match="record 1 has none of the columns"):
        load_reference_set([{"prompt": "fine"}, {"question": "no prompt", "answer": "x"}])
    with pytest.raises(ReferenceSetError, match="not a prompt string"):
        load_reference_set(["fine", 3.5])
    with pytest.raises(ReferenceSetError, match="single string"):
        load_reference_set("the cat sat on the mat")
    with pytest.raises(ReferenceSetError, match="not both"):
        load_reference_set([{"prompt": "p", "continuation": "c", "target": "t"}])


def test_column_mappings_are_rows_and_dataset_dicts_need_a_split() -> None:
    """{"prompt": [...], "continuation": [...]} gives one sample per row, not one per key."""
    samples = load_reference_set({"prompt": ["a", "b"], "continuation": ["c", "d"]})
    assert samples == [ReferenceSample("a", "c"), ReferenceSample("b", "d")]
    dataset = datasets.Dataset.from_dict({"prompt": ["a"]})
    with pytest.raises(ReferenceSetError, match="pick a split"):
        load_reference_set(datasets.DatasetDict({"train": dataset}))
    with pytest.raises(ReferenceSetError, match="different lengths"):
        load_reference_set({"prompt": ["a", "b"], "continuation": ["c"]})


def test_hub_sets_stream_a_fixed_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hub_set`` streams the dataset, skips short rows and splits by a hash of the text, not by order."""
    from hf_lrp_surgery.references import hub_set

    rows = [{"prompt": {"text": f"Sentence number {i} that is long enough to keep."}} for i in range(200)]
    rows.insert(3, {"prompt": {"text": "short"}})
    calls: list[tuple] = []

    def fake_load(path, config, split, streaming):
        calls.append((path, config, split, streaming))
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train = hub_set("real_toxicity_prompts", "train", 50)
    heldout = hub_set("real_toxicity_prompts", "heldout", 50)
    assert calls[0] == ("allenai/real-toxicity-prompts", None, "train", True)
    assert len(train) == len(heldout) == 50 and not set(train) & set(heldout) and "short" not in train
    assert hub_set("real_toxicity_prompts", "train", 10) == train[:10]  # the split does not depend on size
    rows.reverse()
    assert set(hub_set("real_toxicity_prompts", "train", 200)) >= set(train)  # nor on the order rows arrive in


def test_hub_sets_say_what_to_do_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_lrp_surgery.references import hub_set

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ReferenceSetError, match=r"shipped_set\('general_text', 'heldout'\)"):
        hub_set("wikitext", "heldout")
    with pytest.raises(KeyError, match="unknown Hub set"):
        hub_set("the_pile")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", r"empty.jsonl is empty"),
        ("blank.json", "  \n", r"blank.json is empty"),
        ("bad.json", '[{"prompt": "a"},', r"bad.json is not valid JSON"),
        ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": \n', r"bad.jsonl, line 3 is not valid JSON"),
        ("number.jsonl", '{"prompt": "a", "continuation": 5}\n', r"number.jsonl: record 0: .*continuation must"),
        ("null.jsonl", '{"prompt": null}\n', r"null.jsonl: record 0 has an empty \(null\) 'prompt'"),
        ("table.csv", "prompt\nhello\n", r"unsupported file type .csv"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    """Malformed, empty or unsupported files give one ReferenceSetError naming the file (and the line)."""
    path = _write(tmp_path / name, content)
    with pytest.raises(ReferenceSetError, match=message):
        load_reference_set(str(path))


def test_non_utf8_directory_and_negative_limit(tmp_path: Path) -> None:
    """Non-UTF-8 bytes, a directory and a negative limit are refused clearly, not as tracebacks or silent loss."""
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ReferenceSetError, match="latin.txt is not UTF-8"):
        load_reference_set(latin)
    with pytest.raises(ReferenceSetError, match="is a directory"):
        load_reference_set(tmp_path)
    with pytest.raises(ReferenceSetError, match="limit must be a number of samples >= 0, got -1"):
        load_reference_set(["a", "b", "c"], limit=-1)


def test_sample_fields_are_typed() -> None:
    """A prompt, continuation or target of the wrong type is refused when the sample is made."""
    with pytest.raises(ReferenceSetError, match="the prompt must be text"):
        ReferenceSample(None)  # type: ignore[arg-type]
    with pytest.raises(ReferenceSetError, match="the continuation must be text"):
        load_reference_set([{"prompt": "a", "continuation": 5}])
    with pytest.raises(ReferenceSetError, match="the target must be a token id"):
        ReferenceSample("a", target=2.5)  # type: ignore[arg-type]
    assert ReferenceSample([1, 2], [3]).continuation == [3]


# -- the shipped general-text domains ---------------------------------------------------------------
def test_general_domains_load_and_are_substantial_and_distinct() -> None:
    from hf_lrp_surgery.references import GENERAL_DOMAINS, SHIPPED_SETS, general_texts, shipped_set

    assert list(GENERAL_DOMAINS) == ["prose", "technical", "code", "dialogue", "lists"]
    assert set(GENERAL_DOMAINS.values()) <= set(SHIPPED_SETS)
    seen: set[str] = set()
    for domain, name in GENERAL_DOMAINS.items():
        train, heldout = shipped_set(name, "train"), shipped_set(name, "heldout")
        assert len(train) >= 10 and len(heldout) >= 10 and not set(train) & set(heldout), domain
        passages = train + heldout
        assert len(set(passages)) == len(passages) and not seen & set(passages), f"{domain} repeats a passage"
        seen |= set(passages)
        assert all(len(p) >= 300 for p in passages), f"{domain} has a passage under 300 characters"
    texts = general_texts("train")
    assert list(texts) == list(GENERAL_DOMAINS) and texts["prose"] == shipped_set("general_text", "train")
    # The domains differ in form, not only in topic.
    assert all(any(mark in p for mark in ("def ", "{", "SELECT", "<", "=")) for p in texts["code"])
    assert all(":" in p and "\n" in p for p in texts["dialogue"])
    assert all(p.count("\n") >= 5 for p in texts["lists"])
    assert not any("\n" in p for p in texts["technical"] + texts["prose"])
    assert {d: len(v) for d, v in general_texts("heldout", per_domain=3).items()} == dict.fromkeys(GENERAL_DOMAINS, 3)
    with pytest.raises(ValueError, match="per_domain"):
        general_texts("train", per_domain=0)
    with pytest.raises(KeyError):
        general_texts("test")
