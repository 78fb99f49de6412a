"""Next-token tasks as data: the IOI generator, user-given tasks, and their metrics.

A :class:`NextTokenTask` is a list of prompts, each with the token the model should predict next
(``correct``) and optionally a competitor (``wrong``). Two metrics read the logits at each prompt's
last token:

* **accuracy**: the share of prompts whose correct token gets the largest logit;
* **logit difference**: the mean of ``logit(correct) - logit(wrong)`` (needs ``wrong``).

:func:`ioi_task` generates indirect object identification prompts (Wang et al., "Interpretability in
the Wild", 2022) the way ACDC does (Conmy et al., "Towards Automated Circuit Discovery", 2023): from
templates and name lists, here the ones shipped in ``hf_lrp_surgery/data/ioi`` (written for this
package). Every draw makes a minimal pair: the same names, place and object in the ABBA order (``When
Mary and John ..., John gave ... to`` -> `` Mary``) and the BABA order (``When John and Mary ...,
John gave ... to`` -> `` Mary``), so both orders are exactly balanced and templates are balanced to
within one pair. Names are kept only if they are a single token with a leading space for the
tokenizer in use.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.offload import execution_device
from hf_lrp_surgery.references.samples import ReferenceSample, encode_sample, make_batch, pad_token_id

__all__ = [
    "IOI_DATA",
    "Metric",
    "NextTokenExample",
    "NextTokenTask",
    "TASK_OBJECTIVES",
    "TaskMetrics",
    "TaskObjective",
    "evaluate_task",
    "ioi_sets",
    "ioi_task",
    "last_token_logits",
    "load_ioi_data",
    "load_task",
    "metrics_from_logits",
    "next_token_task",
    "single_token_names",
]

Metric = Literal["logit_diff", "accuracy"]
#: What task relevance explains: the correct token's ``"logit"`` or ``"logprob"``, or the logit difference
#: ``"logit_diff"`` (correct minus wrong).
TaskObjective = Literal["logit", "logit_diff", "logprob"]
#: Every task objective.
TASK_OBJECTIVES: tuple[TaskObjective, ...] = ("logit", "logit_diff", "logprob")
#: Directory of the shipped IOI templates and names.
IOI_DATA = Path(__file__).resolve().parent.parent / "data" / "ioi"


@dataclass(frozen=True)
class NextTokenExample:
    """One prompt and the token the model should predict after it.

    Attributes:
        prompt: The text (tokenised with the model's special tokens) or token ids.
        correct: The expected next token: a token id, or text that is exactly one token (mind the
            leading space: ``" Mary"``).
        wrong: A competing token (same forms), for the logit difference; ``None`` if there is none.
        info: Free metadata (for IOI: template index, order, names).
    """

    prompt: str | Sequence[int]
    correct: str | int
    wrong: str | int | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NextTokenTask:
    """A named list of next-token examples.

    Attributes:
        name: What the task is (used in reports and manifests).
        examples: The examples.
        settings: How the task was made (enough to make it again).
    """

    name: str
    examples: tuple[NextTokenExample, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.examples:
            raise ReferenceSetError(f"task {self.name!r} has no examples; give at least one (prompt, correct) pair")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_wrong(self) -> bool:
        """Whether every example names a wrong token (the logit difference needs it)."""
        return all(e.wrong is not None for e in self.examples)

    @property
    def has_corrupted(self) -> bool:
        """Whether every example has a corrupted counterpart (``info["corrupted"]``) for activation patching."""
        return all(e.info.get("corrupted") is not None for e in self.examples)

    def corrupted(self) -> NextTokenTask:
        """The task on the corrupted prompts (``info["corrupted"]``; same correct and wrong tokens).

        For IOI these are the ABC prompts: the same template with three other names, so that the
        answer is not in the prompt (Wang et al. 2022; ACDC). Corrupted activation patching runs the
        model on them and patches each ablated unit's activations into the clean run.

        Returns:
            The corrupted task (named ``"<name>-corrupted"``).

        Raises:
            ReferenceSetError: An example has no corrupted prompt.

        Example:
            >>> ioi_task(tokenizer, 8).corrupted().examples[0].prompt  # doctest: +SKIP
            'When Anna and Paul went to the park, Lucy gave a ball to'
        """
        missing = [i for i, e in enumerate(self.examples) if e.info.get("corrupted") is None]
        if missing:
            raise ReferenceSetError(
                f"task {self.name!r}: example {missing[0]} has no corrupted prompt (info['corrupted']); "
                "corrupted ablation needs one per example (IOI makes them; task files take a 'corrupted' field)"
            )
        examples = tuple(NextTokenExample(e.info["corrupted"], e.correct, e.wrong, dict(e.info)) for e in self.examples)
        return NextTokenTask(f"{self.name}-corrupted", examples, {**dict(self.settings), "corrupted": True})

    def samples(self, target: Literal["correct", "wrong"] = "correct") -> list[ReferenceSample]:
        """The examples as reference samples whose target is the ``correct`` (or ``wrong``) token.

        Raises:
            ReferenceSetError: ``target="wrong"`` and an example has no wrong token.
        """
        if target == "wrong" and not self.has_wrong:
            raise ReferenceSetError(
                f"task {self.name!r} has examples without a wrong token; the logit-difference "
                "objective needs one per example"
            )
        return [ReferenceSample(e.prompt, target=e.correct if target == "correct" else e.wrong) for e in self.examples]

    def token_ids(self, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The correct and (if every example has one) wrong token ids, ``[N]`` each.

        Raises:
            ReferenceSetError: A token is text that is not exactly one token.
        """
        correct = torch.tensor([_single_token(e.correct, tokenizer, i) for i, e in enumerate(self.examples)])
        if not self.has_wrong:
            return correct, None
        wrong = torch.tensor(
            [
                _single_token(e.wrong, tokenizer, i)  # type: ignore[arg-type]
                for i, e in enumerate(self.examples)
            ]
        )
        return correct, wrong


def _single_token(token: str | int, tokenizer: Any, index: int) -> int:
    if isinstance(token, int):
        return token
    if tokenizer is None:
        raise ReferenceSetError(f"example {index}: the token {token!r} is text but no tokenizer was given")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ReferenceSetError(
            f"example {index}: {token!r} is {len(ids)} tokens for this tokenizer; a task token "
            "must be exactly one (give a token id, or a word with its leading space such as "
            "' Mary')"
        )
    return int(ids[0])


# -- user-given tasks -------------------------------------------------------------------------
def next_token_task(items: Iterable[Any], *, name: str = "next-token") -> NextTokenTask:
    """A task from user-given ``(prompt, correct[, wrong])`` tuples or mappings.

    Args:
        items: Tuples ``(prompt, correct)`` or ``(prompt, correct, wrong)`` (prompt: text or a list
            of token ids; tokens: text or ids), mappings with keys
            ``prompt``, ``correct`` and optionally ``wrong``, or :class:`NextTokenExample` objects.
        name: The task's name.

    Returns:
        The task.

    Raises:
        ReferenceSetError: An item has none of these forms, or there are none.

    Example:
        >>> task = next_token_task([("The capital of France is", " Paris", " London")])
    """
    examples: list[NextTokenExample] = []
    for i, item in enumerate(items):
        if isinstance(item, NextTokenExample):
            examples.append(item)
        elif isinstance(item, Mapping):
            if "prompt" not in item or "correct" not in item:
                raise ReferenceSetError(f"item {i} needs 'prompt' and 'correct' keys, it has {sorted(item)}")
            info = dict(item.get("info", {}))
            if item.get("corrupted") is not None:
                info["corrupted"] = item["corrupted"]
            examples.append(NextTokenExample(item["prompt"], item["correct"], item.get("wrong"), info))
        elif (
            isinstance(item, (tuple, list))
            and len(item) in (2, 3)
            and (isinstance(item[0], str) or (isinstance(item[0], list) and all(isinstance(x, int) for x in item[0])))
        ):
            examples.append(NextTokenExample(item[0], item[1], item[2] if len(item) == 3 else None))
        else:
            raise ReferenceSetError(
                f"item {i} ({type(item).__name__}) is not a (prompt, correct[, wrong]) tuple, a "
                "mapping with 'prompt' and 'correct' keys, or a NextTokenExample"
            )
    if not examples:
        raise ReferenceSetError(f"task {name!r} is empty; give at least one (prompt, correct[, wrong]) item")
    return NextTokenTask(name, tuple(examples), {"source": "user"})


def load_task(path: str | os.PathLike[str]) -> NextTokenTask:
    """Load a task from a ``.jsonl`` file (one mapping per line) or a ``.json`` list / ``{"examples": [...]}``.

    Each record has ``prompt``, ``correct`` and optionally ``wrong`` and ``corrupted`` (a prompt of the same
    token length for corrupted activation patching).

    Raises:
        FileNotFoundError: The file does not exist.
        ReferenceSetError: A record lacks ``prompt`` or ``correct``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        found = data.get("examples") if isinstance(data, dict) else data
        if not isinstance(found, list):
            raise ReferenceSetError(f"{path}: expected a JSON list or an object with an 'examples' list")
        records = found
    task = next_token_task(records, name=path.stem)
    return NextTokenTask(task.name, task.examples, {"source": str(path)})


# -- IOI --------------------------------------------------------------------------------------
def load_ioi_data(directory: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """The IOI templates, places, objects and names (``templates.json`` and ``names.json``).

    Args:
        directory: Where the two files are; default the shipped :data:`IOI_DATA`.

    Returns:
        ``{"templates": [...], "places": [...], "objects": [...], "names": [...]}``.
    """
    directory = Path(directory) if directory is not None else IOI_DATA
    templates = json.loads((directory / "templates.json").read_text(encoding="utf-8"))
    names = json.loads((directory / "names.json").read_text(encoding="utf-8"))
    return {
        "templates": list(templates["templates"]),
        "places": list(templates["places"]),
        "objects": list(templates["objects"]),
        "names": list(names["names"]),
    }


def single_token_names(tokenizer: Any, names: Sequence[str]) -> list[str]:
    """The names that are exactly one token with a leading space (``" Mary"``), not the unknown token.

    Example:
        >>> single_token_names(tokenizer, ["Mary", "Bartholomew"])  # doctest: +SKIP
        ['Mary']
    """
    unknown = getattr(tokenizer, "unk_token_id", None)
    kept = []
    for name in dict.fromkeys(names):
        ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and (unknown is None or ids[0] != unknown):  # a word-level vocabulary maps unknowns to UNK
            kept.append(name)
    return kept


def _fill(template: str, first: str, second: str, subject: str, place: str, obj: str) -> str:
    return (
        template.replace("[A]", first)
        .replace("[B]", second)
        .replace("[S]", subject)
        .replace("[PLACE]", place)
        .replace("[OBJECT]", obj)
    )


def ioi_task(
    tokenizer: Any,
    size: int = 64,
    *,
    seed: int = 0,
    templates: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    places: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
) -> NextTokenTask:
    """Indirect object identification prompts, half ABBA and half BABA, from seeded draws.

    Each draw picks a template (cycling through a seeded permutation), two different names (the
    indirect object ``IO`` and the subject ``S``), a place and an object, and yields the ABBA prompt
    (``IO`` mentioned first) and the BABA prompt (``S`` first). The correct token is ``" IO"``, the
    wrong one ``" S"``.

    Args:
        tokenizer: The tokenizer of the model to be studied; names that are not one token with a
            leading space are dropped.
        size: Number of prompts (even: every draw makes a pair).
        seed: Seed of the draws; the same seed and data give the same task.
        templates: Templates with ``[A]``, ``[B]``, ``[S]``, ``[PLACE]``, ``[OBJECT]`` (default: shipped).
        names: Candidate names without a leading space (default: shipped).
        places: Places (default: shipped).
        objects: Objects (default: shipped).

    Returns:
        The task; ``info`` of each example holds ``template``, ``order``, ``io``, ``s`` and
        ``corrupted``: the ABC prompt (the same template, place and object with three other distinct
        names in the places of ``[A]``, ``[B]`` and ``[S]``, drawn from a generator of their own so that
        the clean prompts do not depend on it, and of the same token length as the clean prompt).

    Raises:
        ReferenceSetError: ``size`` is not a positive even number, fewer than two names are one
            token, or a template lacks a placeholder.

    Example:
        >>> task = ioi_task(tokenizer, 64, seed=1)  # doctest: +SKIP
        >>> task.examples[0].prompt, task.examples[0].correct  # doctest: +SKIP
        ('When Mary and John went to the park, John gave a ball to', ' Mary')
    """
    if size < 2 or size % 2:
        raise ReferenceSetError(f"size must be a positive even number (ABBA/BABA pairs), got {size}")
    shipped = load_ioi_data()
    templates = list(templates if templates is not None else shipped["templates"])
    places = list(places if places is not None else shipped["places"])
    objects = list(objects if objects is not None else shipped["objects"])
    candidates = list(names if names is not None else shipped["names"])
    for i, template in enumerate(templates):
        missing = [p for p in ("[A]", "[B]", "[S]") if p not in template]
        if missing or not template.strip():
            raise ReferenceSetError(f"template {i} ({template!r}) lacks {missing}; IOI templates need [A], [B] and [S]")
    usable = single_token_names(tokenizer, candidates)
    if len(usable) < 2:
        raise ReferenceSetError(
            f"only {len(usable)} of {len(candidates)} names are one token with a leading space "
            "for this tokenizer; give names= with at least two that are"
        )
    rng = random.Random(seed)
    abc_rng = random.Random(f"ioi-abc-{seed}")  # separate: the clean draws stay what they were
    order: list[int] = []
    examples: list[NextTokenExample] = []
    for pair in range(size // 2):
        if not order:
            order = rng.sample(range(len(templates)), len(templates))
        t = order.pop()
        io, s = rng.sample(usable, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        for kind, (first, second) in (("ABBA", (io, s)), ("BABA", (s, io))):
            prompt = _fill(templates[t], first, second, s, place, obj)
            corrupted = _abc_prompt(tokenizer, abc_rng, templates[t], prompt, usable, (io, s), place, obj)
            info = {"template": t, "order": kind, "io": io, "s": s, "pair": pair, "corrupted": corrupted}
            examples.append(NextTokenExample(prompt, " " + io, " " + s, info))
    settings = {
        "source": "ioi",
        "size": size,
        "seed": seed,
        "num_templates": len(templates),
        "num_names": len(usable),
        "num_candidate_names": len(candidates),
    }
    return NextTokenTask("ioi", tuple(examples), settings)


def _abc_prompt(
    tokenizer: Any,
    rng: random.Random,
    template: str,
    prompt: str,
    names: Sequence[str],
    avoid: tuple[str, str],
    place: str,
    obj: str,
    tries: int = 50,
) -> str | None:
    """The ABC corruption of ``prompt``: three distinct names other than ``avoid``, the same token length.

    Returns ``None`` when fewer than three other names exist or no draw keeps the length (a task with
    such an example refuses corrupted ablation by name).
    """
    others = [n for n in names if n not in avoid]
    if len(others) < 3:
        return None
    length = len(tokenizer(prompt)["input_ids"])
    for _ in range(tries):
        a, b, c = rng.sample(others, 3)
        candidate = _fill(template, a, b, c, place, obj)
        if len(tokenizer(candidate)["input_ids"]) == length:
            return candidate
    return None


def ioi_sets(tokenizer: Any, num_sets: int = 3, size: int = 64, *, seed: int = 0) -> list[NextTokenTask]:
    """``num_sets`` independent IOI tasks (seeds ``seed``, ``seed + 1``, ...), for mean ± std figures.

    Raises:
        ReferenceSetError: ``num_sets < 1`` or see :func:`ioi_task`.
    """
    if num_sets < 1:
        raise ReferenceSetError(f"num_sets must be >= 1, got {num_sets}")
    return [ioi_task(tokenizer, size, seed=seed + i) for i in range(num_sets)]


# -- metrics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskMetrics:
    """A model's performance on a task.

    Attributes:
        accuracy: Share of prompts whose correct token has the largest logit.
        logit_diff: Mean ``logit(correct) - logit(wrong)``; ``None`` without wrong tokens.
        num_examples: Prompts measured.
    """

    accuracy: float
    logit_diff: float | None
    num_examples: int

    def get(self, metric: Metric) -> float:
        """The value of one metric.

        Raises:
            ReferenceSetError: ``logit_diff`` was asked of a task without wrong tokens.
        """
        if metric == "accuracy":
            return self.accuracy
        if metric != "logit_diff":
            raise ValueError(f"metric must be 'logit_diff' or 'accuracy', got {metric!r}")
        if self.logit_diff is None:
            raise ReferenceSetError(
                "the logit difference needs a wrong token per example; use metric='accuracy' or "
                "give (prompt, correct, wrong) items"
            )
        return self.logit_diff

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"accuracy": self.accuracy, "logit_diff": self.logit_diff, "num_examples": self.num_examples}


def metrics_from_logits(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor | None = None) -> TaskMetrics:
    """Accuracy and logit difference from the last-token logits.

    Args:
        logits: ``[N, V]`` logits at each prompt's last token.
        correct: ``[N]`` correct token ids.
        wrong: ``[N]`` wrong token ids, or ``None``.

    Returns:
        The metrics. A tie for the largest logit counts as correct only if no other token is larger
        (``logit(correct) >= max``).

    Example:
        >>> metrics_from_logits(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([0]), torch.tensor([2]))
        TaskMetrics(accuracy=1.0, logit_diff=1.0, num_examples=1)
    """
    if logits.dim() != 2 or correct.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and correct [N], got {tuple(logits.shape)} and {tuple(correct.shape)}")
    logits = logits.double()
    rows = torch.arange(logits.shape[0])
    correct_logit = logits[rows, correct]
    accuracy = float((correct_logit >= logits.max(-1).values).double().mean())
    diff = None if wrong is None else float((correct_logit - logits[rows, wrong]).mean())
    return TaskMetrics(accuracy, diff, int(logits.shape[0]))


@torch.no_grad()
def last_token_logits(model: nn.Module, tokenizer: Any, task: NextTokenTask, *, batch_size: int = 32) -> torch.Tensor:
    """``[N, V]`` logits (fp32, CPU) at the last token of every prompt of ``task``, right-padded batches.

    Prompts are tokenised exactly as the relevance engine tokenises them (special tokens added). Only
    the positions read are projected onto the vocabulary (``logits_to_keep``), which matters for
    models with a large vocabulary such as Gemma 3 (262k tokens).
    """
    arch = resolve(model)
    samples = task.samples()
    encoded = [encode_sample(s, i, tokenizer, arch.max_positions, arch.vocab_size) for i, s in enumerate(samples)]
    device = execution_device(arch.token_embedding)
    pad = pad_token_id(tokenizer, arch.model)
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = make_batch(encoded[start : start + batch_size], pad, "right", device)
        positions = torch.unique(batch.seed_positions)  # sorted
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=positions,
        ).logits
        columns = torch.searchsorted(positions, batch.seed_positions)
        out.append(logits[batch.seed_rows, columns].float().cpu())
    return torch.cat(out)


def evaluate_task(model: nn.Module, tokenizer: Any, task: NextTokenTask, *, batch_size: int = 32) -> TaskMetrics:
    """Accuracy and logit difference of ``model`` on ``task``.

    Args:
        model: A supported causal LM (any masks or hooks active on it apply).
        tokenizer: Its tokenizer.
        task: The task.
        batch_size: Prompts per forward pass.

    Returns:
        The :class:`TaskMetrics`.

    Raises:
        ReferenceSetError: A task token is not exactly one token.

    Example:
        >>> evaluate_task(model, tokenizer, ioi_task(tokenizer)).logit_diff  # doctest: +SKIP
    """
    correct, wrong = task.token_ids(tokenizer)
    return metrics_from_logits(last_token_logits(model, tokenizer, task, batch_size=batch_size), correct, wrong)
