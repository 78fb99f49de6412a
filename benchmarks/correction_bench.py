"""Shared pieces of the correction benchmarks: cached paired reference sets and one measured point.

Used by ``compare_methods.py`` (held-out prompts) and ``correction_options.py`` (validation prompts).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hf_lrp_surgery.correction import (
    BEHAVIOURS,
    Behaviour,
    GeneralBaseline,
    GeneralLimits,
    paired_contrast_sets,
    recipe_split,
)
from hf_lrp_surgery.evaluation import generate
from hf_lrp_surgery.io import write_json_atomic
from hf_lrp_surgery.references import shipped_splits
from hf_lrp_surgery.references.samples import ReferenceSample

#: ``--behaviour`` choices: every registered behaviour by its name or by its recipe command ("detox").
BEHAVIOUR_CHOICES = {
    key: entry for entry in BEHAVIOURS.values() for key in (entry.metadata.name, entry.metadata.command)
}


def chosen_behaviour(choice: str) -> Behaviour:
    """The behaviour a benchmark's ``--behaviour`` names, with its recipe defaults."""
    return BEHAVIOUR_CHOICES[choice].factory()


def reference_sets(
    model: nn.Module, tokenizer: Any, behaviour: Behaviour, model_name: str, cache: Path
) -> tuple[list[ReferenceSample], list[ReferenceSample]]:
    """The recipe's paired sets (attribution part of the train prompts, with focus), cached as token ids.

    Raises:
        ValueError: The cache was made for another model or behaviour.
    """
    key = {"model": model_name, "behaviour": behaviour.name, "sampling": behaviour.sampling.to_dict()}
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") != key:
            raise ValueError(
                f"{cache} holds reference sets for {data.get('key')}, not {key}: remove it or choose another --output"
            )
    else:
        attribution, _ = recipe_split(shipped_splits(behaviour.prompt_set))
        undesired, desired = paired_contrast_sets(model, tokenizer, attribution, behaviour)
        data = {
            "key": key,
            **{
                name: [
                    [list(s.prompt), list(s.continuation), None if s.focus is None else list(s.focus)] for s in samples
                ]
                for name, samples in (("undesired", undesired), ("desired", desired))
            },
        }
        write_json_atomic(cache, data)
    return (
        [ReferenceSample(p, c, focus=f) for p, c, f in data["undesired"]],
        [ReferenceSample(p, c, focus=f) for p, c, f in data["desired"]],
    )


@dataclass
class Bench:
    """The original model measured once on one split; :meth:`point` measures a corrected copy against it."""

    model: nn.Module
    tokenizer: Any
    behaviour: Behaviour
    prompts: Sequence[str]
    neutral: Sequence[str]
    texts: Sequence[str]
    limits: GeneralLimits = GeneralLimits()

    def __post_init__(self) -> None:
        self.general = GeneralBaseline.of(self.model, self.tokenizer, self.neutral, self.texts)
        self.before = self.behaviour.measure(
            generate(self.model, self.tokenizer, self.prompts, self.behaviour.decoding, progress=False)
        )

    def point(self, candidate: nn.Module) -> dict[str, Any]:
        """Effect on the prompts, KL on the neutral prompts and relative perplexity change of ``candidate``."""
        effect = self.behaviour.measure(
            generate(candidate, self.tokenizer, self.prompts, self.behaviour.decoding, progress=False)
        )
        cost = self.general.cost(self.model, candidate, self.tokenizer, self.limits)
        kl, _, increase, ok = cost
        return {
            "effect": effect,
            "kl": kl,
            "perplexity_increase": increase,
            "within_limits": ok,
            "exceeded": list(cost.exceeded),
            "induction_increase": cost.induction_increase,
        }
