"""Iterative re-attribution (correction.iterative) against one-shot selection and explicit re-scoring."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from hf_lrp_surgery.carriers import apply_masks, bake
from hf_lrp_surgery.correction import iterative_masks
from hf_lrp_surgery.exceptions import BudgetError, ReferenceSetError
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.masks import Mask, select
from hf_lrp_surgery.references import ReferenceSample
from hf_lrp_surgery.scoring import get_scorer, register_scorer, unregister_scorer
from hf_lrp_surgery.surgeon import Surgeon

pytestmark = pytest.mark.usefixtures("single_thread")

#: Token-id prompts with teacher-forced continuations: the same prompts, "looping" vs "varied".
PROMPTS = [[1, 5, 7], [1, 40, 33, 12], [1, 9, 20, 11, 3]]
UNDESIRED = [ReferenceSample(p, [14, 14, 14, 14]) for p in PROMPTS]
GENERAL = [ReferenceSample(p, [21, 30, 8, 52]) for p in PROMPTS]
#: (method, granularity): a relevance method, a one-set baseline on weights, and a paired method.
CASES = [("lrp", "neurons"), ("gradient", "weights"), ("aura", "heads")]
#: Budget and rounds per granularity in the round-by-round test (heads: 5 of the tiny model's 8).
ROUNDS = {"neurons": (7, [3, 2, 2]), "weights": (7, [3, 2, 2]), "heads": (5, [2, 2, 1])}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model("llama", dtype=torch.float64, seed=3)


def _one_shot_scores(model: nn.Module, method: str, granularity: str) -> Any:
    return Surgeon(model, progress=False).contrast(
        undesired=UNDESIRED, general=GENERAL, method=method, components=(granularity,)
    )


def _iterative(model: nn.Module, method: str, granularity: str, budget: int | float, steps: int, **kw: Any) -> Mask:
    return iterative_masks(
        model,
        None,
        undesired=UNDESIRED,
        general=GENERAL,
        budget=budget,
        steps=steps,
        method=method,
        granularity=granularity,
        progress=False,
        **kw,
    )


def _units(mask: Mask) -> set[tuple[str, int]]:
    return {(name, int(i)) for name, index in mask.indices.items() for i in index}


@pytest.mark.parametrize(("method", "granularity"), CASES)
@pytest.mark.parametrize("budget", [5, 0.1])
def test_one_step_is_the_one_shot_selection(model, method, granularity, budget) -> None:
    """steps=1: the same units and provenance as select(contrast(...)), plus a one-round record."""
    expected = select(_one_shot_scores(model, method, granularity), granularity, budget)
    mask = _iterative(model, method, granularity, budget, 1)
    assert mask.granularity == expected.granularity and mask.fingerprint == expected.fingerprint
    assert mask.indices.keys() == expected.indices.keys()
    assert all(torch.equal(mask.indices[n], expected.indices[n]) for n in expected.indices)
    provenance = dict(mask.provenance)
    assert provenance.pop("reattribution") == {"steps": 1, "counts": [expected.count], "rescored": []}
    assert provenance == expected.provenance


@pytest.mark.parametrize(("method", "granularity"), CASES)
def test_later_rounds_select_on_the_pruned_model(model, method, granularity) -> None:
    """Rounds add up to the budget, never repeat a unit, and each later round is what one-shot scoring of
    the model with the earlier rounds baked in (recomputed here on a baked copy) selects among the rest."""
    budget, counts = ROUNDS[granularity]
    steps = len(counts)
    mask = _iterative(model, method, granularity, budget, steps)
    assert mask.count == budget and len(_units(mask)) == budget
    assert mask.provenance["reattribution"]["steps"] == steps
    assert mask.provenance["reattribution"]["counts"] == counts
    assert len(mask.provenance["reattribution"]["rescored"]) == steps - 1
    assert mask.provenance["selection"]["budget"] == budget and mask.provenance["selection"]["count"] == budget
    assert mask.fingerprint == fingerprint(model)

    first_scores = _one_shot_scores(model, method, granularity)
    so_far = select(first_scores, granularity, counts[0])
    rounds = [_units(so_far)]
    pruned = bake(copy.deepcopy(model), so_far)  # one copy, each round's units baked in as they come
    for count in counts[1:]:
        more = select(_one_shot_scores(pruned, method, granularity).excluding(so_far), granularity, count)
        rounds.append(_units(more))
        so_far = so_far.union(more)
        bake(pruned, more)
    assert all(len(r) == c for r, c in zip(rounds, counts))
    assert not rounds[0] & rounds[1] and not (rounds[0] | rounds[1]) & rounds[2]
    assert _units(mask) == rounds[0] | rounds[1] | rounds[2]
    # Re-attribution changed the choice here, so the comparison above tells the two apart.
    assert _units(mask) != _units(select(first_scores, granularity, budget))


@pytest.mark.parametrize(("method", "granularity"), [("random", "neurons"), ("magnitude", "weights")])
def test_scores_that_pruning_leaves_alone_give_the_one_shot_units(model, method, granularity) -> None:
    """Seeded random scores and weight magnitudes of the units left do not change with pruning (a pruned
    weight's magnitude drops to 0): the rounds then take the one-shot ranking's next units, never a pruned one."""
    one_shot = select(_one_shot_scores(model, method, granularity), granularity, 9)
    mask = _iterative(model, method, granularity, 9, 3)
    assert mask.count == 9 and _units(mask) == _units(one_shot)


@pytest.mark.parametrize(("method", "granularity"), CASES)
def test_every_carrier_takes_the_mask(model, method, granularity) -> None:
    """The mask fits the unpruned model: bake (and, for neurons and heads, the adapter and hooks) carry it."""
    mask = _iterative(model, method, granularity, 4, 2)
    carriers = ["bake"] if granularity == "weights" else ["bake", "adapter", "hooks"]
    for carrier in carriers:
        corrected = apply_masks(model, mask, carrier)
        corrected.verify()


def test_fraction_budget_is_resolved_in_round_one(model) -> None:
    """A fractional budget prunes what select makes of it on round 1's scores, split over the rounds."""
    expected = select(_one_shot_scores(model, "lrp", "neurons"), "neurons", 0.1).count
    mask = _iterative(model, "lrp", "neurons", 0.1, 4)
    assert mask.count == expected
    counts = mask.provenance["reattribution"]["counts"]
    assert sum(counts) == expected and max(counts) - min(counts) <= 1 and len(counts) == 4


def test_soft_rounds_keep_their_scales(model) -> None:
    """With dampening every round's units are dampened, none twice, and the bake carrier scales them."""
    mask = _iterative(model, "lrp", "neurons", 6, 3, dampen=0.5)
    assert mask.scales is not None and mask.count == 6 and mask.dampened == 6
    assert all(torch.equal(s, torch.full_like(s, 0.5)) for s in mask.scales.values())
    assert mask.provenance["dampening"] == "0.5"
    apply_masks(model, mask, "bake").verify()


@pytest.mark.parametrize("granularity", ["neurons", "weights"])
def test_the_callers_model_is_left_as_it_was(granularity) -> None:
    """Rounds prune copies: the caller's weights, fingerprint and hooks are unchanged afterwards."""
    model = tiny_model("llama", dtype=torch.float64, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    print_before = fingerprint(model)
    mask = _iterative(model, "gradient", granularity, 9, 3)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert fingerprint(model) == print_before
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    # The mask really prunes: baked, the same weights change.
    baked = bake(copy.deepcopy(model), mask).state_dict()
    assert any(not torch.equal(baked[k], before[k]) for k in before)


@pytest.fixture
def scored() -> Iterator[list[str]]:
    """A registered method that records every scoring call (and scores as ``activation`` does)."""
    calls: list[str] = []
    activation = get_scorer("activation").fn

    def spy(request: Any) -> Any:
        calls.append(request.description)
        return activation(request)

    register_scorer("spy", spy, description="activation, counted")
    try:
        yield calls
    finally:
        unregister_scorer("spy")


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps must be a whole number of rounds >= 1"),
        ({"steps": 2.0}, ValueError, "steps must be a whole number"),
        ({"steps": True}, ValueError, "steps must be a whole number"),
        ({"budget": 2, "steps": 3}, BudgetError, "cannot be split into 3 rounds"),
        ({"budget": 10**6}, BudgetError, "exceeds"),
        ({"budget": 1.5}, BudgetError, "fractional budget"),
        ({"budget": "7"}, BudgetError, "budget must be a count"),
        ({"granularity": "layers"}, ValueError, "granularity must be"),
        ({"method": "no_such_method"}, ValueError, "method must be one of"),
        ({"method": "aura", "granularity": "weights"}, ValueError, "scores only"),
        ({"undesired": "scores"}, ReferenceSetError, "not Scores"),
        ({"general": []}, ReferenceSetError, "empty"),
        ({"scope": "per_row"}, ValueError, "per_row"),
        ({"colour": "red"}, TypeError, "colour"),
    ],
)
def test_bad_arguments_fail_before_any_scoring(model, scored, changes, error, match) -> None:
    """Each refusal is one clear error raised before a single attribution runs."""
    arguments: dict[str, Any] = {
        "undesired": UNDESIRED,
        "general": GENERAL,
        "budget": 6,
        "steps": 2,
        "method": "spy",
        "granularity": "neurons",
        "progress": False,
        **changes,
    }
    if arguments["undesired"] == "scores":
        arguments["undesired"] = _one_shot_scores(model, "activation", "neurons")
    with pytest.raises(error, match=match):
        iterative_masks(model, None, **arguments)
    assert scored == []


def test_the_spy_counts_scorings(model, scored) -> None:
    """The counter of the test above sees attributions: two sets in each of two rounds."""
    mask = iterative_masks(
        model, None, undesired=UNDESIRED, general=GENERAL, budget=6, steps=2, method="spy", progress=False
    )
    assert mask.count == 6 and len(scored) == 4
