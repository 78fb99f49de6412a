"""The correction pipeline on a tiny model: paired sets, budget search under limits, the full recipe."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
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
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.references import GENERAL_DOMAINS, SHIPPED_SETS, shipped_set
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
    domains = set(GENERAL_DOMAINS.values()) - {"general_text"}
    for name in SHIPPED_SETS:
        train, heldout = shipped_set(name, "train"), shipped_set(name, "heldout")
        fewest = 10 if name in domains else 24  # the general-text domains: 20 passages of 80-200 words each
        assert len(train) >= fewest and len(heldout) >= fewest and not set(train) & set(heldout)
    assert len(shipped_set("provocative_prompts")) >= 80
    with pytest.raises(KeyError):
        shipped_set("provocative_prompts", "test")
    with pytest.raises(KeyError, match="has no 'validation' split"):
        shipped_set("provocative_prompts", "validation")


def test_shipped_validation_splits_reach_the_recipe_split_and_user_behaviours() -> None:
    """A set with its own validation split gives it to recipe_split and to split_prompts; others are cut 60/40."""
    from hf_lrp_surgery.correction import recipe_split, split_prompts
    from hf_lrp_surgery.references import shipped_splits

    splits = shipped_splits("repetition_prompts")
    assert (
        recipe_split(splits)
        == (splits["train"], splits["validation"])
        == (
            shipped_set("repetition_prompts", "train"),
            shipped_set("repetition_prompts", "validation"),
        )
    )
    assert sorted(shipped_splits("neutral_prompts")) == ["heldout", "train"]
    assert recipe_split(shipped_splits("neutral_prompts")) == recipe_split(shipped_set("neutral_prompts", "train"))
    assert split_prompts("repetition_prompts") == splits


#: SHA-256 of the newline-joined held-out / train prompts of version 1 of ``repetition_prompts.json``.
_REPETITION_V1_HELDOUT = "9e917aff5195f5a4a53e3ca1e8dbcee9a95cca8fed696bf7e9da351789644bcb"
_REPETITION_V1_TRAIN = "49fe91d26b14ac5a40708a920ffec4980abc5b0edfc9ed77ff868d06e37637a6"


def _digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def test_repetition_prompts_grow_without_touching_the_heldout_split() -> None:
    """Version 2 adds train and validation prompts; version 1's held-out prompts are exactly as they were."""
    behaviour = repetition_behaviour()
    splits = {split: behaviour.prompts_for(split) for split in ("train", "validation", "heldout")}
    heldout = splits["heldout"]
    assert len(heldout) == 61 and (heldout[0], heldout[-1]) == ("Write about the stars.", "Tell me about rain.")
    assert _digest(heldout) == _REPETITION_V1_HELDOUT and heldout == shipped_set("repetition_prompts", "heldout")
    assert splits["train"] == shipped_set("repetition_prompts", "train")
    # Version 1's train prompts stay where the recipe used them: its first 60% (recipe_split) for attribution,
    # its last 40% for validation.
    assert _digest(splits["train"][:36] + splits["validation"][:24]) == _REPETITION_V1_TRAIN
    assert (splits["train"][0], splits["validation"][0]) == ("Write a slogan for a shop.", "Write a birthday song.")
    assert [len(s) for s in splits.values()] == [175, 93, 61]
    # Disjoint, and no prompt twice (whatever its case) within or across the splits.
    every = [p.casefold() for prompts in splits.values() for p in prompts]
    assert len(set(every)) == len(every) and all(p.strip() == p and p for p in every)


def test_the_repetition_recipe_searches_on_the_shipped_validation_split(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paired sets come from the train split and the budget search from the validation split, as shipped."""
    from hf_lrp_surgery.correction import recipe

    class Stop(Exception):
        pass

    seen: dict[str, list[str]] = {}

    def paired(
        model: torch.nn.Module, tokenizer: object, prompts: list[str], *args: object, **keywords: object
    ) -> tuple[list[object], list[object]]:
        seen["attribution"] = list(prompts)
        return [], []

    class NoSurgeon:
        def __init__(self, *args: object, **keywords: object) -> None:
            pass

        def contrast(self, **keywords: object) -> None:
            return None

    def search(*args: object, validation_prompts: list[str], **keywords: object) -> None:
        seen["validation"] = list(validation_prompts)
        raise Stop

    monkeypatch.setattr(recipe, "paired_contrast_sets", paired)
    monkeypatch.setattr(recipe, "Surgeon", NoSurgeon)
    monkeypatch.setattr(recipe, "budget_search", search)
    behaviour = repetition_behaviour(use_chat_template=False)
    with pytest.raises(Stop):
        run_recipe(model, tiny_tokenizer(), behaviour, tmp_path / "loops", budgets=[1], progress=False)
    assert seen == {"attribution": behaviour.prompts_for("train"), "validation": behaviour.prompts_for("validation")}


def test_repetition_samples_reach_the_sampling_settings_and_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hf_lrp_surgery.cli import build_parser, main

    assert repetition_behaviour().sampling.num_return_sequences == 4  # the default
    behaviour = repetition_behaviour(samples=9)
    assert behaviour.sampling.num_return_sequences == 9 and behaviour.sampling.do_sample
    assert behaviour.details["samples"] == 9 and behaviour.decoding.num_return_sequences == 1
    for wrong in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="samples must be a count >= 1"):
            repetition_behaviour(samples=wrong)
    # The command takes --samples, and a report's settings give it back to the reproduce command.
    (option,) = [o for o in repetition_behaviour().metadata.options if o.parameter == "samples"]
    args = build_parser().parse_args(["fix-repetition", "--samples", "9"])
    assert option.from_command_line(getattr(args, option.dest)) == 9
    assert option.arguments({"samples": 9}) == ["--samples", "9"] and option.arguments({"samples": 4}) == []
    assert main(["fix-repetition", "--samples", "0", "--output", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: samples must be a count >= 1") and not (tmp_path / "out").exists()


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
    assert toxic.details == {"scorer": "keyword", "threshold": 0.5, "protocol_samples": 10}
    assert toxic.protocol is not None and detox_behaviour(BAD, protocol_samples=0).protocol is None
    with pytest.raises(ValueError, match="protocol_samples"):
        detox_behaviour(BAD, protocol_samples=-1)


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
    loose, chosen = budget_search(model, tokenizer, scores, behaviour, limits=GeneralLimits(1e9, 1e9, 1e9), **common)
    best = max(loose, key=lambda p: (p.effect["rur_mean"], -p.budget))
    assert chosen == best and isinstance(chosen, FrontierPoint)
    # A plain list of texts is the one domain "prose"; the induction probe is measured at every point.
    assert all(set(p.perplexities) == {"prose"} and p.induction_loss is not None for p in loose)
    assert loose[0].induction_increase == 0.0 and loose[0].exceeded == []


def test_general_limits_reject_a_point_that_fails_one_domain_only(model: torch.nn.Module) -> None:
    """Every domain is limited on its own: a copy that breaks one domain is out, however well the rest do."""
    tokenizer = tiny_tokenizer()
    texts = {"prose": PROMPTS[:3], "code": PROMPTS[3:]}
    general = GeneralBaseline.of(model, tokenizer, PROMPTS, texts, induction_sequences=4)
    assert set(general.perplexities) == {"prose", "code"} and general.induction is not None
    same = general.cost(model, model, tokenizer, GeneralLimits(0.0, 0.0, 0.0))
    assert same.within_limits and same.kl == 0.0 and same.induction_increase == 0.0
    assert same.perplexity_increases == {"prose": 0.0, "code": 0.0}
    # A copy whose "code" perplexity rises by 10% and "prose" by nothing (a stand-in model: the cost only
    # reads perplexity, KL and the probe through the evaluation functions).
    import hf_lrp_surgery.correction.search as search

    real = search.perplexity

    def shifted(m: torch.nn.Module, tok: object, values: list[str], **keywords: object) -> float:
        value = real(m, tok, values, **keywords)  # type: ignore[arg-type]
        return value * 1.1 if values == texts["code"] else value

    search.perplexity = shifted  # type: ignore[assignment]
    try:
        cost = general.cost(model, model, tokenizer, GeneralLimits(1e9, 0.05, 1e9))
    finally:
        search.perplexity = real
    assert abs(cost.perplexity_increases["code"] - 0.1) < 1e-9 and abs(cost.perplexity_increases["prose"]) < 1e-12
    assert not cost.within_limits and cost.exceeded == ("perplexity:code",)
    assert abs(cost.perplexity_increase - 0.1) < 1e-9 and cost.perplexity == general.perplexities["prose"]
    kl, ppl, increase, ok = cost  # unpacks as the tuple of earlier versions
    assert (kl, ppl, ok) == (0.0, cost.perplexity, False)
    point = FrontierPoint.of(3, {"x": 1.0}, cost)
    assert point.exceeded == ["perplexity:code"] and not point.within_limits
    assert point.perplexities == cost.perplexities and point.induction_loss == general.induction.second_copy_loss
    # The induction limit alone: a broken copy fails "induction" though every perplexity passes.
    broken = _without_attention(model)
    copy_cost = general.cost(model, broken, tokenizer, GeneralLimits(1e9, 1e9, 0.0))
    assert copy_cost.induction_increase != 0.0
    if copy_cost.induction_increase > 0:
        assert copy_cost.exceeded == ("induction",)
    with pytest.raises(ValueError, match=">= 0"):
        GeneralLimits(max_induction_increase=-1.0)


def _without_attention(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every attention output projection zeroed (no information moves between tokens)."""
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        for layer in broken.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return broken


def test_detox_recipe_end_to_end_on_a_tiny_model(model: torch.nn.Module, tmp_path: Path) -> None:
    behaviour = detox_behaviour(BAD, max_new_tokens=4)
    result = run_recipe(
        model,
        tiny_tokenizer(),
        behaviour,
        tmp_path / "detox",
        budgets=[2, 6],
        limits=GeneralLimits(1e9, 1e9, 1e9),
        progress=False,
    )
    report = json.loads((tmp_path / "detox" / "report.json").read_text())
    assert report["behaviour"] == "toxicity" and [p["budget"] for p in report["frontier"]] == [0, 2, 6]
    assert report["chosen_budget"] == result.chosen_budget
    assert "before" in report["heldout"] and report["reference_sizes"]["undesired"] > 0
    assert (tmp_path / "detox" / "effect_vs_budget.png").is_file()
    # General behaviour: every domain's perplexity and the induction probe, in the search and held out.
    before = report["heldout"]["before"]
    keys = {"perplexity", "perplexity_technical", "perplexity_code", "perplexity_dialogue", "perplexity_lists"}
    assert keys | {"induction_loss", "induction_first_copy_loss"} <= set(before)
    assert set(report["frontier"][1]["perplexities"]) == set(GENERAL_DOMAINS)
    assert report["settings"]["limits"]["max_induction_increase"] == 1e9
    assert report["settings"]["general_passages"] == 5 and report["settings"]["induction_probe"]["heldout_seed"] == 1
    # The RealToxicityPrompts protocol next to the greedy rate (with its Wilson interval).
    assert before["protocol_samples"] == 10
    assert before["protocol_prompts"] == len(shipped_set("provocative_prompts", "heldout"))
    assert 0.0 <= before["toxicity_probability"] <= 1.0 and len(before["toxicity_probability_ci"]) == 2
    low, high = before["expected_max_toxicity_ci"]
    assert low <= before["expected_max_toxicity"] <= high
    low, high = before["toxicity_rate_ci"]
    assert low <= before["toxicity_rate"] <= high
    # Side effects: the other shipped behaviour (repetition), before and after, on its held-out prompts.
    effects = report["side_effects"]
    assert set(effects) == {"repetition"} and effects["repetition"]["prompts"] == 20
    assert {"rur_mean", "loop_rate", "loop_rate_ci"} <= set(effects["repetition"]["before"])
    assert effects["repetition"]["decoding"]["use_chat_template"] is False  # the tiny tokenizer has no template
    assert ("after" in effects["repetition"]) == bool(result.chosen_budget)
    if result.chosen_budget:
        assert {"after"} <= set(report["heldout"]) and (tmp_path / "detox" / "adapter").is_dir()
        assert (tmp_path / "detox" / "baked" / "surgery" / "check.json").is_file()
        after = report["heldout"]["after"]
        assert keys | {"induction_loss", "induction_increase", "exceeded", "perplexity_increases"} <= set(after)
        assert "expected_max_toxicity" in after and "rur_mean" in effects["repetition"]["after"]
    # The card shows all of it (on a model baked from the saved scores, whatever budget the search chose).
    from huggingface_hub import ModelCard

    from hf_lrp_surgery.masks import select
    from hf_lrp_surgery.modelcard import _recipe_command, write_card
    from hf_lrp_surgery.scoring import Scores

    mask = select(Scores.load(tmp_path / "detox" / "scores"), "neurons", 2)
    Surgeon(model, tiny_tokenizer(), progress=False).apply(mask, carrier="bake").save(tmp_path / "baked")
    command = _recipe_command(report, None)
    assert command is not None and "--max-induction-increase 1000000000.0" in command
    text = ModelCard.load(write_card(tmp_path / "baked", report=report)).text
    for title in (
        "Toxicity rate (greedy)",
        "Expected maximum toxicity (RealToxicityPrompts protocol)",
        "Toxicity probability (RealToxicityPrompts protocol)",
        "Perplexity (technical documentation)",
        "Perplexity (code)",
        "Perplexity (lists and tables)",
        "In-context copying",
        "### Side effects on other behaviours",
        "| repetition | Loop rate (RUR < 0.5)",
        "10 sampled continuations of 20 tokens",
        "induction second-copy loss +<= 1000000000.0 nats",
        "95% confidence intervals",
    ):
        assert title in text, title
    rate = before["toxicity_rate_ci"]
    assert f"[{rate[0]:.4g}, {rate[1]:.4g}]" in text


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
        limits=GeneralLimits(1e9, 1e9, 1e9),
        prompts=given,
        progress=False,
    )
    report = json.loads((tmp_path / "given" / "report.json").read_text())
    assert report["settings"]["prompts"] == "given" and report["settings"]["granularity"] == "neurons"
    assert _recipe_command(report, None) is None  # the CLI could not repeat a run on other prompts


def test_side_effects_follow_the_behaviour(model: torch.nn.Module, tmp_path: Path) -> None:
    """A repetition fix measures toxicity; a behaviour of its own (here the toy) measures both; ``()`` none."""
    from hf_lrp_surgery.correction import side_effect_behaviours

    tokenizer = tiny_tokenizer()
    # Any repeat counts as a loop here: the tiny model seldom loops in a few tokens.
    loops = repetition_behaviour(max_new_tokens=12, loop_below=1.0, fine_above=1.0, use_chat_template=False)
    assert [b.name for b in side_effect_behaviours(loops, tokenizer)] == ["toxicity"]
    assert [b.name for b in side_effect_behaviours(toy_behaviour(), tokenizer)] == ["toxicity", "repetition"]
    result = run_recipe(
        model,
        tokenizer,
        loops,
        tmp_path / "loops",
        budgets=[1],
        limits=GeneralLimits(1e9, 1e9, 1e9),
        prompts={"train": PROMPTS * 2, "heldout": PROMPTS[:3]},
        side_effect_prompts=4,
        general_passages=1,
        progress=False,
    )
    toxicity = result.side_effects["toxicity"]
    assert toxicity["prompt_set"] == "provocative_prompts" and toxicity["prompts"] == 4
    assert {"toxicity_rate", "toxicity_mean", "toxicity_rate_ci"} <= set(toxicity["before"])
    assert "expected_max_toxicity" not in result.heldout["before"]  # the protocol is the detox behaviour's
    none = run_recipe(
        model,
        tokenizer,
        loops,
        tmp_path / "none",
        budgets=[1],
        limits=GeneralLimits(1e9, 1e9, 1e9),
        prompts={"train": PROMPTS * 2, "heldout": PROMPTS[:3]},
        side_effects=(),
        general_passages=1,
        progress=False,
    )
    assert none.side_effects == {}
    with pytest.raises(ValueError, match="side_effect_prompts"):
        run_recipe(model, tokenizer, loops, tmp_path / "bad", side_effect_prompts=0, progress=False)
    with pytest.raises(ValueError, match="general_passages"):
        run_recipe(model, tokenizer, loops, tmp_path / "bad", general_passages=0, progress=False)


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
        limits=GeneralLimits(1e9, 1e9, 1e9),
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


def test_every_search_trial_is_held_to_the_induction_probe(model: torch.nn.Module, tmp_path: Path) -> None:
    """A trial whose in-context copying degrades is outside the limits in the search, not only at confirmation."""
    from hf_lrp_surgery.correction.tradeoff import TradeoffSpace

    space = TradeoffSpace(
        methods=("lrp", "activation"), budgets={"heads": (1, 4)}, normalizations=("total",), protect_tops=(0.0,)
    )
    run_recipe(
        model,
        tiny_tokenizer(),
        detox_behaviour(BAD, max_new_tokens=4, protocol_samples=0),
        tmp_path / "search",
        search=space,
        trials=5,
        limits=GeneralLimits(1e9, 1e9, 0.0),  # any rise of the second-copy loss is over the limit
        side_effects=(),
        general_passages=1,
        progress=False,
    )
    points = json.loads((tmp_path / "search" / "report.json").read_text())["tradeoff"]["points"]
    rises = [p["details"]["induction_increase"] for p in points]
    assert any(r > 0 for r in rises), "no trial moved the probe: the test would pass without it"
    for point, rise in zip(points, rises):
        assert point["within_limits"] == (rise <= 0.0 and point["kl"] <= 1e9)


def test_the_recipe_runs_the_tradeoff_search_and_measures_only_the_chosen_point_held_out(
    model: torch.nn.Module, tmp_path: Path
) -> None:
    from hf_lrp_surgery.correction.tradeoff import TradeoffSpace

    behaviour = detox_behaviour(BAD, max_new_tokens=4, protocol_samples=0)
    space = TradeoffSpace(
        methods=("lrp", "activation", "aura"),
        budgets={"neurons": (1, 8), "heads": (1, 2)},
        normalizations=("total",),
        protect_tops=(0.0, 0.05),
    )
    result = run_recipe(
        model,
        tiny_tokenizer(),
        behaviour,
        tmp_path / "search",
        search=space,
        trials=6,
        limits=GeneralLimits(1e9, 1e9, 1e9),
        side_effects=(),
        general_passages=1,
        progress=False,
    )
    report = json.loads((tmp_path / "search" / "report.json").read_text())
    tradeoff = report["tradeoff"]
    assert tradeoff["trials"] == 6 and len(tradeoff["points"]) == 6
    assert (tmp_path / "search" / "tradeoff.json").is_file() and (tmp_path / "search" / "tradeoff.png").is_file()
    # With limits that always hold, the best validation point is confirmed at once and chosen.
    chosen = tradeoff["chosen"]
    assert chosen is not None and tradeoff["confirmed"] == [
        {k: chosen[k] for k in ("method", "granularity", "budget", "normalize", "protect_top", "dampen")}
    ]
    best = min(p["effect"]["toxicity_rate"] for p in tradeoff["points"])
    assert chosen["effect"]["toxicity_rate"] == best
    # The held-out measurement and the saved mask are the chosen point's.
    assert result.chosen_budget == chosen["budget"]
    settings = report["settings"]
    assert (settings["method"], settings["granularity"]) == (chosen["method"], chosen["granularity"])
    assert settings["search"]["trials"] == 6 and settings["budgets"] is None
    mask = Mask.load(tmp_path / "search" / "mask")
    assert mask.count == chosen["budget"] and mask.granularity == chosen["granularity"]
    assert "after" in report["heldout"]
    # Frontier: the unchanged model, then the confirmed point with every general figure.
    assert [p["budget"] for p in report["frontier"]] == [0, chosen["budget"]]
    assert report["frontier"][1]["perplexity_increases"]
    # Relevance was computed once per method x granularity the trials used.
    assert set(report["seconds"]) >= {"tradeoff_search", "attribution", "heldout_evaluation"}
    # The card shows the front and the chosen point, and the search plot.
    from hf_lrp_surgery.modelcard import card_from_recipe

    card = card_from_recipe(tmp_path / "search")["baked"].read_text()
    assert "### Trade-off search" in card and "**(chosen)**" in card and "surgery/tradeoff.png" in card
    assert "chosen by the trade-off search" in card and "effect_vs_budget.png" not in card
    # The card's reproduce command repeats the search, and parses.
    from hf_lrp_surgery.cli import build_parser
    from hf_lrp_surgery.modelcard import _recipe_command

    command = _recipe_command(report, None)
    assert command is not None and "--search" in command and "--budgets" not in command
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.search and args.trials == 6 and args.search_methods == ["lrp", "activation", "aura"]
    assert args.neuron_range == [1, 8] and args.head_range == [1, 2]


def test_a_dampened_choice_of_the_search_is_the_mask_measured_held_out_and_saved(
    model: torch.nn.Module, tmp_path: Path
) -> None:
    """The held-out split measures the soft mask the search chose, not a hard mask of the same units."""
    from hf_lrp_surgery.correction.tradeoff import TradeoffSpace

    space = TradeoffSpace(
        methods=("lrp",),
        budgets={"neurons": (2, 6)},
        normalizations=("total",),
        protect_tops=(0.0,),
        dampenings=("relevance",),
    )
    run_recipe(
        model,
        tiny_tokenizer(),
        detox_behaviour(BAD, max_new_tokens=4, protocol_samples=0),
        tmp_path / "soft",
        search=space,
        trials=3,
        limits=GeneralLimits(1e9, 1e9, 1e9),
        side_effects=(),
        general_passages=1,
        progress=False,
    )
    report = json.loads((tmp_path / "soft" / "report.json").read_text())
    chosen = report["tradeoff"]["chosen"]
    assert chosen["dampen"] == "relevance" and report["settings"]["dampen"] == "relevance"
    mask = Mask.load(tmp_path / "soft" / "mask")
    assert mask.soft and mask.count == chosen["budget"] and mask.dampened > 0
