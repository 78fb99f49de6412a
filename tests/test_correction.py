"""The correction pipeline on a tiny model: paired sets, budget search under limits, the full recipe."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer

from hf_lrp_surgery.correction import (
    BEHAVIOURS,
    Behaviour,
    BehaviourMetadata,
    CommandOption,
    FrontierPoint,
    GeneralBaseline,
    GeneralLimits,
    Metric,
    behaviour_metadata,
    budget_search,
    detox_behaviour,
    paired_contrast_sets,
    register_behaviour,
    repeated_positions,
    repetition_behaviour,
    run_recipe,
    word_groups,
)
from hf_lrp_surgery.evaluation import CallableScorer, Generation
from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.references import SHIPPED_SETS, shipped_set
from hf_lrp_surgery.surgeon import Surgeon

PROMPTS = ["the cat sat on the", "hello world", "the dog was very", "one two three", "a big red", "the sun and"]
BAD = CallableScorer(lambda texts: [1.0 if "bad" in t.split() else 0.0 for t in texts], "keyword")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tiny")
    base = tiny_model("llama", dtype=torch.float32, attn_implementation="sdpa")
    base.resize_token_embeddings(len(WORDS))
    base.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()


def test_shipped_sets_have_fixed_disjoint_splits() -> None:
    for name in SHIPPED_SETS:
        train, heldout = shipped_set(name, "train"), shipped_set(name, "heldout")
        assert len(train) >= 24 and len(heldout) >= 24 and not set(train) & set(heldout)
    assert len(shipped_set("provocative_prompts")) >= 80
    with pytest.raises(KeyError):
        shipped_set("provocative_prompts", "test")


def test_paired_sets_come_from_the_same_prompts(model: torch.nn.Module) -> None:
    behaviour = detox_behaviour(BAD, max_new_tokens=4)
    tokenizer = tiny_tokenizer()
    undesired, desired = paired_contrast_sets(model, tokenizer, PROMPTS * 3, behaviour, progress=False)
    bad = WORDS.index("bad")
    assert all(bad in s.continuation for s in undesired) and not any(bad in s.continuation for s in desired)
    # The undesired samples explain exactly their "bad" tokens; the desired ones are explained whole.
    for sample in undesired:
        assert sorted(sample.focus) == [j for j, t in enumerate(sample.continuation) if t == bad]
    assert all(s.focus is None for s in desired)
    whole, _ = paired_contrast_sets(model, tokenizer, PROMPTS * 3, behaviour, focus=False, progress=False)
    assert [s.continuation for s in whole] == [s.continuation for s in undesired]
    assert all(s.focus is None for s in whole)
    assert {tuple(s.prompt) for s in undesired} == {tuple(s.prompt) for s in desired}
    assert all(s.prompt[0] == 1 and s.prompt[1] != 1 for s in undesired + desired), "one BOS, as generated"
    never = detox_behaviour(CallableScorer(lambda texts: [0.0] * len(texts), "never"), max_new_tokens=4)
    with pytest.raises(ReferenceSetError, match="both"):
        paired_contrast_sets(model, tiny_tokenizer(), PROMPTS, never, progress=False)


def test_focus_positions() -> None:
    assert repeated_positions([5, 6, 5, 5, 7, 6]) == [2, 3, 5] and repeated_positions([]) == []
    tokenizer = tiny_tokenizer()
    ids = tokenizer("the cat was very bad", add_special_tokens=False)["input_ids"]
    assert word_groups(tokenizer, ids) == [[0], [1], [2], [3], [4]]
    loops = repetition_behaviour(use_chat_template=False)
    assert loops.focus(tokenizer, Generation(0, "p", "a a b a", [7, 7, 8, 7])) == [1, 3]
    # An empty response does not loop, for the judge and for the metric alike.
    empty = [Generation(0, "p", "", []), Generation(1, "q", "a a", [7, 7])]
    assert loops.score(empty) == [1.0, 0.5] and loops.measure(empty) == {"rur_mean": 0.75, "loop_rate": 0.0}
    toxic = detox_behaviour(BAD)
    assert toxic.focus(tokenizer, Generation(0, "p", "the cat was very bad", ids)) == [4]
    assert toxic.details == {"scorer": "keyword", "threshold": 0.5}


def test_budget_search_reports_every_budget_and_respects_the_limits(model: torch.nn.Module) -> None:
    tokenizer = tiny_tokenizer()
    behaviour = repetition_behaviour(max_new_tokens=6, use_chat_template=False)
    scores = Surgeon(model, tokenizer, progress=False).attribute(PROMPTS)
    common = dict(
        validation_prompts=PROMPTS, general_prompts=PROMPTS, general_texts=PROMPTS, budgets=[4, 1, 8], progress=False
    )
    points, chosen = budget_search(model, tokenizer, scores, behaviour, **common)
    assert [p.budget for p in points] == [0, 1, 4, 8] and points[0].kl == 0.0 and points[0].within_limits
    assert all(p.kl > 0 for p in points[1:])
    strict, chosen = budget_search(model, tokenizer, scores, behaviour, limits=GeneralLimits(0.0, 0.0), **common)
    assert chosen.budget == 0 and not any(p.within_limits for p in strict[1:])
    loose, chosen = budget_search(model, tokenizer, scores, behaviour, limits=GeneralLimits(1e9, 1e9), **common)
    best = max(loose, key=lambda p: (p.effect["rur_mean"], -p.budget))
    assert chosen == best and isinstance(chosen, FrontierPoint)


def test_detox_recipe_end_to_end_on_a_tiny_model(model: torch.nn.Module, tmp_path: Path) -> None:
    behaviour = detox_behaviour(BAD, max_new_tokens=4)
    result = run_recipe(
        model,
        tiny_tokenizer(),
        behaviour,
        tmp_path / "detox",
        budgets=[2, 6],
        limits=GeneralLimits(1e9, 1e9),
        progress=False,
    )
    report = json.loads((tmp_path / "detox" / "report.json").read_text())
    assert report["behaviour"] == "toxicity" and [p["budget"] for p in report["frontier"]] == [0, 2, 6]
    assert report["chosen_budget"] == result.chosen_budget
    assert "before" in report["heldout"] and report["reference_sizes"]["undesired"] > 0
    assert (tmp_path / "detox" / "effect_vs_budget.png").is_file()
    if result.chosen_budget:
        assert {"after"} <= set(report["heldout"]) and (tmp_path / "detox" / "adapter").is_dir()
        assert (tmp_path / "detox" / "baked" / "surgery" / "check.json").is_file()


def test_recipe_runs_on_given_prompts(model: torch.nn.Module, tmp_path: Path) -> None:
    """``prompts=`` replaces the shipped behaviour prompts, and the report and card say so."""
    from hf_lrp_surgery.modelcard import _recipe_command

    behaviour = detox_behaviour(BAD, max_new_tokens=4)
    given = {"train": PROMPTS * 2, "heldout": PROMPTS[:3]}
    run_recipe(
        model,
        tiny_tokenizer(),
        behaviour,
        tmp_path / "given",
        budgets=[2],
        limits=GeneralLimits(1e9, 1e9),
        prompts=given,
        progress=False,
    )
    report = json.loads((tmp_path / "given" / "report.json").read_text())
    assert report["settings"]["prompts"] == "given" and report["settings"]["granularity"] == "neurons"
    assert _recipe_command(report, None) is None  # the CLI could not repeat a run on other prompts


# -- a new behaviour is one factory: its metadata travels into report.json ----------------------
TOY = BehaviourMetadata(
    name="toy-keyword",
    command="fix-toy",
    tags=("toy-fix",),
    goal="say bad less often",
    prompt_set="toy_prompts",
    metrics=(Metric("bad_rate", "Share of continuations saying bad", True),),
    primary="bad_rate",
    scorer="Keyword scorer, threshold {threshold}.",
    options=(CommandOption("--threshold", "threshold", "threshold", 0.5, "bad from this score", kind="float"),),
    budgets=(2,),
)


def toy_behaviour(threshold: float = 0.5) -> Behaviour:
    detox = detox_behaviour(BAD, threshold=threshold, max_new_tokens=4)

    def measure(generations: list[Generation]) -> dict[str, float]:
        return {"bad_rate": detox.measure(generations)["toxicity_rate"]}

    return dataclasses.replace(detox, metadata=TOY, measure=measure)


def test_a_new_behaviour_writes_its_metadata_into_the_report(model: torch.nn.Module, tmp_path: Path) -> None:
    given = {"train": PROMPTS * 2, "heldout": PROMPTS[:3]}
    result = run_recipe(
        model,
        tiny_tokenizer(),
        toy_behaviour(),
        tmp_path / "toy",
        limits=GeneralLimits(1e9, 1e9),
        prompts=given,
        progress=False,
    )
    report = json.loads((tmp_path / "toy" / "report.json").read_text())
    assert report["behaviour"] == "toy-keyword" and report["settings"]["budgets"] == [2]
    assert "bad_rate" in report["heldout"]["before"] and result.behaviour_metadata == TOY
    assert behaviour_metadata(report) == TOY and report["behaviour_metadata"]["tags"] == ["toy-fix"]
    # Reports without the block (written before it existed) fall back to the registry by name.
    assert behaviour_metadata({"behaviour": "repetition"}) == repetition_behaviour().metadata
    assert behaviour_metadata({"behaviour": "toy-keyword"}) is None


def test_registry_and_renamed_names() -> None:
    assert [e.metadata.command for e in BEHAVIOURS.values()] == ["detox", "fix-repetition", "fix"]
    assert BEHAVIOURS["repetition"].factory is repetition_behaviour
    with pytest.raises(ValueError, match="exists"):
        register_behaviour(dataclasses.replace(TOY, name="toxicity"))(toy_behaviour)
    with pytest.raises(ValueError, match="primary"):
        dataclasses.replace(TOY, primary="nope")
    with pytest.warns(DeprecationWarning, match="GeneralBaseline"):
        from hf_lrp_surgery.correction import GeneralReference
    assert GeneralReference is GeneralBaseline
