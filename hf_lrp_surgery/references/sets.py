"""Reference sets from the forms users have them in: lists, pairs, files and ``datasets`` objects."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.references.samples import ReferenceSample, SampleLike, as_samples

__all__ = [
    "GENERAL_DOMAINS",
    "HUB_SETS",
    "ReferenceSource",
    "SHIPPED_SETS",
    "general_texts",
    "hub_set",
    "load_reference_set",
    "shipped_set",
    "shipped_splits",
]

#: Everything :func:`load_reference_set` accepts.
ReferenceSource = Any

_TEXT_COLUMNS = ("prompt", "text")
_SUFFIXES = (".txt", ".json", ".jsonl")


def _as_sample_like(record: Any, i: int, origin: str) -> SampleLike:
    if isinstance(record, dict):
        column = next((c for c in _TEXT_COLUMNS if c in record), None)
        if column is None:
            raise ReferenceSetError(
                f"{origin}: record {i} has none of the columns {_TEXT_COLUMNS} (it has "
                f"{sorted(record)}); rename the prompt column to 'prompt'"
            )
        if record[column] is None:
            raise ReferenceSetError(f"{origin}: record {i} has an empty (null) {column!r}; give its text")
        return {"prompt": record[column], "continuation": record.get("continuation"), "target": record.get("target")}
    if isinstance(record, list) and len(record) == 2 and all(isinstance(x, str) for x in record):
        return (record[0], record[1])  # a JSON (prompt, continuation) pair
    return record


def _from_records(records: Iterable[Any], origin: str) -> list[ReferenceSample]:
    samples: list[ReferenceSample] = []
    for i, record in enumerate(records):
        try:
            samples += as_samples([_as_sample_like(record, i, origin)])
        except ReferenceSetError as err:
            message = str(err)
            raise ReferenceSetError(
                message if message.startswith(origin) else f"{origin}: record {i}: {message}"
            ) from err
    return samples


def _from_columns(columns: Mapping[str, Any]) -> list[ReferenceSample]:
    """Rows of a column mapping such as ``{"prompt": [...], "continuation": [...]}``."""
    prompt_column = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if prompt_column is None:
        raise ReferenceSetError(
            f"a mapping with keys {sorted(columns)} is neither columns with a 'prompt'/'text' key nor a list of "
            "samples; for a datasets.DatasetDict pick a split, e.g. dataset['train']"
        )
    length = len(columns[prompt_column])
    if any(len(values) != length for values in columns.values()):
        raise ReferenceSetError(f"the columns {sorted(columns)} have different lengths")
    return _from_records([{key: columns[key][i] for key in columns} for i in range(length)], "the column mapping")


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise ReferenceSetError(f"{path} is a directory; give a .txt, .json or .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"reference set file {path} does not exist")
    if path.suffix not in _SUFFIXES:
        raise ReferenceSetError(
            f"{path}: unsupported file type {path.suffix or '(none)'}; give a .txt (one prompt per line), .json or "
            ".jsonl file, or load it with datasets and pass the Dataset"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ReferenceSetError(f"{path} is not UTF-8 text (byte {err.start}); re-encode it as UTF-8") from err
    if not text.strip():
        raise ReferenceSetError(f"{path} is empty; give at least one sample")
    return text


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ReferenceSetError(f"{where} is not valid JSON: {err.msg} (column {err.colno})") from err


def _from_file(path: Path) -> list[ReferenceSample]:
    text = _read_text(path)
    if path.suffix == ".jsonl":
        records = [
            _json(line, f"{path}, line {number}")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    elif path.suffix == ".json":
        data = _json(text, str(path))
        found = data.get("samples", data.get("prompts")) if isinstance(data, dict) else data
        if not isinstance(found, list):
            raise ReferenceSetError(f"{path}: expected a JSON list, or an object with a 'samples' or 'prompts' list")
        records = found
    else:
        records = [line for line in text.splitlines() if line.strip()]
    return _from_records(records, str(path))


def _looks_like_path(text: str) -> bool:
    """A string names a file if it exists or ends like one (``x.csv`` is a path, not a prompt)."""
    return "\n" not in text and (Path(text).suffix in _SUFFIXES or Path(text).exists() or bool(_FILE_LIKE.match(text)))


_FILE_LIKE = re.compile(r"^\S+\.[A-Za-z0-9]{1,8}$")


def load_reference_set(
    source: ReferenceSource, *, limit: int | None = None, min_samples: int = 1
) -> list[ReferenceSample]:
    """Turn a reference set in any supported form into :class:`ReferenceSample` objects.

    Args:
        source: One of

            * a list of prompt strings, ``(prompt, continuation)`` pairs, token-id lists, mappings
              with ``prompt``/``text`` and optional ``continuation``/``target`` keys, or samples;
            * a path to a ``.txt`` file (one prompt per line), a ``.jsonl`` file (one mapping per
              line) or a ``.json`` file (a list, or an object with a ``samples`` / ``prompts`` list);
            * a ``datasets.Dataset`` (or any iterable of mappings), or a column mapping such as
              ``{"prompt": [...], "continuation": [...]}``, with a ``prompt`` or ``text`` column and
              optional ``continuation`` / ``target`` columns (a ``DatasetDict``: pick a split).
        limit: Keep only the first ``limit`` samples (a count >= 0).
        min_samples: Fewest samples the caller needs.

    Returns:
        The samples.

    Raises:
        ReferenceSetError: The set is empty, smaller than ``min_samples``, or a record has no prompt;
            a file is not UTF-8, not valid JSON (the message names the file and line), of an
            unsupported type, or a directory; ``limit`` is negative.
        FileNotFoundError: A path does not exist.

    Example:
        >>> load_reference_set(["You are", ("Hello", " world")])  # doctest: +SKIP
        >>> load_reference_set("toxic.jsonl", limit=64)  # doctest: +SKIP
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        # A negative limit would silently drop samples from the end (Python slicing).
        raise ReferenceSetError(f"limit must be a number of samples >= 0, got {limit!r}")
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        samples = _from_file(Path(source))
        origin = str(source)
    elif isinstance(source, str):
        raise ReferenceSetError(f"{source!r} is a single string; give a list of prompts or a .txt/.json/.jsonl path")
    elif isinstance(source, Mapping):
        samples = _from_columns(source)
        origin = "the column mapping"
    else:
        samples = _from_records(source, type(source).__name__)
        origin = f"the {type(source).__name__} reference set"
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ReferenceSetError(f"{origin} is empty; give at least {max(1, min_samples)} samples")
    if len(samples) < min_samples:
        raise ReferenceSetError(f"{origin} has {len(samples)} samples; at least {min_samples} are needed")
    return samples


#: General-behaviour domains -> the shipped text set measured for each (perplexity per domain). Every
#: set was written for this project: ``general_text`` is plain prose; the others are technical
#: documentation, source code in a dozen languages, dialogues and chats, and lists / tables / CSV.
GENERAL_DOMAINS: dict[str, str] = {
    "prose": "general_text",
    "technical": "general_technical",
    "code": "general_code",
    "dialogue": "general_dialogue",
    "lists": "general_lists",
}

#: The reference and evaluation sets that ship with the package (``hf_lrp_surgery/data/sets``).
SHIPPED_SETS = (
    "provocative_prompts",
    "neutral_prompts",
    "repetition_prompts",
    "general_text",
    "contact_prompts",
    *(name for name in GENERAL_DOMAINS.values() if name != "general_text"),
)


def shipped_splits(name: str) -> dict[str, list[str]]:
    """Every fixed split of a shipped set: ``train`` and ``heldout``, and ``validation`` where the set has one.

    Args:
        name: One of :data:`SHIPPED_SETS`.

    Returns:
        ``{"train": [...], "validation": [...], "heldout": [...]}``; a set without a ``validation`` split
        (the recipe then cuts its validation part from ``train``) has only the other two.

    Raises:
        KeyError: Unknown set.

    Example:
        >>> sorted(shipped_splits("repetition_prompts"))
        ['heldout', 'train', 'validation']
    """
    if name not in SHIPPED_SETS:
        raise KeyError(f"unknown shipped set {name!r}; available: {', '.join(SHIPPED_SETS)}")
    path = Path(__file__).parent.parent / "data" / "sets" / f"{name}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return {split: list(data[split]) for split in ("train", "validation", "heldout") if split in data}


def shipped_set(name: str, split: str = "train") -> list[str]:
    """A shipped prompt or text set, by fixed split.

    Args:
        name: One of :data:`SHIPPED_SETS`.
        split: ``"train"`` (for attribution and tuning), ``"validation"`` (the budget search; only sets
            that have one, see :func:`shipped_splits`) or ``"heldout"`` (for evaluation only).

    Returns:
        The prompts or texts.

    Raises:
        KeyError: Unknown set or split, or a ``"validation"`` split the set does not have.

    Example:
        >>> shipped_set("provocative_prompts", "heldout")[:2]  # doctest: +SKIP
    """
    if split not in ("train", "validation", "heldout"):
        raise KeyError(f"split must be 'train', 'validation' or 'heldout', got {split!r}")
    splits = shipped_splits(name)
    if split not in splits:
        raise KeyError(f"shipped set {name!r} has no {split!r} split; it has {', '.join(splits)}")
    return splits[split]


def general_texts(split: str = "train", per_domain: int | None = None) -> dict[str, list[str]]:
    """The shipped general text of every domain of :data:`GENERAL_DOMAINS`, by fixed split.

    Args:
        split: ``"train"`` (the budget search) or ``"heldout"`` (the final measurement).
        per_domain: Keep only the first ``per_domain`` passages of each domain (a cheaper measurement,
            e.g. during the budget search); ``None`` keeps all.

    Returns:
        Domain name -> its passages, in the order of :data:`GENERAL_DOMAINS`.

    Raises:
        KeyError: Unknown split.
        ValueError: ``per_domain`` is not a count >= 1.

    Example:
        >>> sorted(general_texts("heldout", per_domain=2))
        ['code', 'dialogue', 'lists', 'prose', 'technical']
    """
    if per_domain is not None and (isinstance(per_domain, bool) or not isinstance(per_domain, int) or per_domain < 1):
        raise ValueError(f"per_domain must be a count >= 1 or None, got {per_domain!r}")
    return {domain: shipped_set(name, split)[:per_domain] for domain, name in GENERAL_DOMAINS.items()}


@dataclass(frozen=True)
class _HubSource:
    path: str
    config: str | None
    split: str
    text: Callable[[Mapping[str, Any]], str]
    for_set: str


#: Public datasets that stand in for the shipped sets where the Hub is reachable
#: (name -> dataset, configuration, split, text field, and the shipped set it replaces).
HUB_SETS: dict[str, _HubSource] = {
    "real_toxicity_prompts": _HubSource(
        "allenai/real-toxicity-prompts", None, "train", lambda row: row["prompt"]["text"], "provocative_prompts"
    ),
    "c4": _HubSource("allenai/c4", "en", "validation", lambda row: row["text"], "general_text"),
    "wikitext": _HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test", lambda row: row["text"], "general_text"),
}


def hub_set(
    name: str, split: str = "train", size: int = 100, *, heldout_share: float = 0.5, min_chars: int = 20
) -> list[str]:
    """Prompts or texts from a public dataset on the Hub, with a fixed train/held-out split.

    The dataset is streamed (nothing but the rows read is downloaded). A row belongs to the
    held-out split when the SHA-256 of its text falls below ``heldout_share``, so the split is the
    same on every machine, for every ``size``, and never depends on the order rows arrive in.

    Args:
        name: One of :data:`HUB_SETS` (``real_toxicity_prompts``, ``c4``, ``wikitext``).
        split: ``"train"`` or ``"heldout"``.
        size: How many texts to return (the first ones of the split, in the dataset's order).
        heldout_share: Fraction of rows in the held-out split.
        min_chars: Shorter texts (empty lines, WikiText headings) are skipped.

    Returns:
        ``size`` texts (fewer if the dataset has fewer).

    Raises:
        KeyError: Unknown set or split.
        ReferenceSetError: The dataset cannot be read (no network, ``HF_HUB_OFFLINE``, missing
            ``datasets``); use :func:`shipped_set` offline.

    Example:
        >>> prompts = hub_set("real_toxicity_prompts", "train", 200)  # doctest: +SKIP
        >>> result = run_recipe(model, tokenizer, detox_behaviour(), "runs/detox-rtp",  # doctest: +SKIP
        ...                     prompts={"train": prompts, "heldout": hub_set("real_toxicity_prompts", "heldout", 200)})
    """
    if name not in HUB_SETS:
        raise KeyError(f"unknown Hub set {name!r}; available: {', '.join(HUB_SETS)}")
    if split not in ("train", "heldout"):
        raise KeyError(f"split must be 'train' or 'heldout', got {split!r}")
    source = HUB_SETS[name]
    try:
        import datasets

        rows = datasets.load_dataset(source.path, source.config, split=source.split, streaming=True)
        texts: list[str] = []
        for row in rows:
            text = source.text(row).strip()
            if len(text) < min_chars or text.startswith("="):
                continue
            digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
            if (digest < heldout_share) == (split == "heldout"):
                texts.append(text)
                if len(texts) >= size:
                    break
    except Exception as err:  # network, offline mode, missing package: one clear message
        raise ReferenceSetError(
            f"cannot read {source.path} from the Hub ({type(err).__name__}: {err}); offline, use "
            f"shipped_set({source.for_set!r}, {split!r}) instead"
        ) from err
    return texts
