"""User-defined behaviours: scorers from every form, checked early; splits; generic focus; fix / Surgeon end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer
from transformers import AutoModelForCausalLM

from hf_lrp_surgery.cli import main
from hf_lrp_surgery.correction import (
    BEHAVIOURS,
    GeneralLimits,
    PatternScorer,
    behaviour_metadata,
    detox_behaviour,
    leave_one_word_out_positions,
    matched_positions,
    paired_contrast_sets,
    parse_scorer,
    scored_word_positions,
    split_prompts,
    user_behaviour,
)
from hf_lrp_surgery.evaluation import Generation
from hf_lrp_surgery.exceptions import ReferenceSetError, ScorerError
from hf_lrp_surgery.masks import select
from hf_lrp_surgery.modelcard import _recipe_command, write_card
from hf_lrp_surgery.references import shipped_set
from hf_lrp_surgery.scoring import Scores
from hf_lrp_surgery.surgeon import Surgeon

PROMPTS = [f"{a} {b}" for a in ("the cat", "a dog", "the sun", "one tree") for b in ("sat on the", "is very", "and")]
BAD_WORDS = {"bad", "big"}
SCORER_MODULE = """
def says_the(texts):
    return [1.0 if "the" in t.split() else 0.0 for t in texts]
"""


def bad_word_score(texts: list[str]) -> list[float]:
    """Deterministic: each bad word halves what is left of 1 (so removing any one of them lowers the score)."""
    return [1 - 0.5 ** sum(w.strip(".,!?") in BAD_WORDS for w in t.split()) for t in texts]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    base = tiny_model("llama", dtype=torch.float32)
    base.resize_token_embeddings(len(WORDS))
    return base.eval()


@pytest.fixture
def scorer_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "user_judge.py").write_text(SCORER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_judge", None)
    return "user_judge:says_the"


# -- scorers from every form, refused early ------------------------------------------------------
def test_scorer_forms(tmp_path: Path, scorer_module: str) -> None:
    assert parse_scorer(scorer_module)(["the cat", "a dog"]) == [1.0, 0.0]
    assert parse_scorer(bad_word_score).name == "bad_word_score"
    regex = parse_scorer(r"regex:\b[\w.]+@\w+\.\w+\b")
    assert isinstance(regex, PatternScorer) and regex(["mail ann@acme.org", "none"]) == [1.0, 0.0]
    (tmp_path / "words.txt").write_text("darn\nheck it\n\n")
    words = parse_scorer(f"words:{tmp_path / 'words.txt'}")
    assert words(["Heck it, fine", "darned", "oh DARN"]) == [1.0, 0.0, 1.0]
    assert words.spans("oh darn") == [(3, 7)]


@pytest.mark.parametrize(
    ("scorer", "message"),
    [
        ("no_such_module_xyz:score", "cannot import"),
        ("regex:(unclosed", "does not compile"),
        ("words:/no/such/file.txt", "does not exist"),
        (lambda texts: [0.5], "returned 1 scores for 2"),
        (lambda texts: ["high"] * len(texts), "non-numbers"),
        (lambda texts: [math.nan] * len(texts), "NaN"),
        (lambda texts: [1.5] * len(texts), r"outside \[0, 1\]"),
        (lambda texts: 1 / 0, "failed on 2 short texts"),
        ("some-org/classifier", "give the label"),
    ],
)
def test_bad_scorers_are_refused_before_anything_runs(scorer: object, message: str) -> None:
    with pytest.raises(ScorerError, match=message):
        user_behaviour(PROMPTS, scorer, use_chat_template=False)


def test_a_classifier_directory_scores_through_the_pipeline_and_its_label_is_checked(tmp_path: Path) -> None:
    from tiny_models import tiny_config
    from transformers import LlamaForSequenceClassification

    config = tiny_config("llama")
    config.vocab_size, config.num_labels = len(WORDS), 2
    config.id2label, config.label2id = {0: "fine", 1: "bad"}, {"fine": 0, "bad": 1}
    config.pad_token_id = 0
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tiny_tokenizer().save_pretrained(tmp_path / "clf")
    behaviour = user_behaviour(PROMPTS, str(tmp_path / "clf"), label="bad", use_chat_template=False)
    assert behaviour.details["scorer"] == str(tmp_path / "clf") and behaviour.details["label"] == "bad"
    with pytest.raises(ScorerError, match="no label 'toxic'"):
        user_behaviour(PROMPTS, str(tmp_path / "clf"), label="toxic", use_chat_template=False)


# -- prompts: split with a fixed seed, or the user's splits --------------------------------------
def test_prompts_split_with_a_fixed_seed_or_as_given(tmp_path: Path) -> None:
    first, again = split_prompts(PROMPTS), split_prompts(list(PROMPTS))
    assert first == again and sorted(first["train"] + first["heldout"]) == sorted(PROMPTS)
    assert len(first["heldout"]) == round(0.3 * len(PROMPTS))
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    assert split_prompts(tmp_path / "p.txt") == first
    given = {"train": PROMPTS[:6], "validation": PROMPTS[6:9], "heldout": PROMPTS[9:]}
    (tmp_path / "splits.json").write_text(json.dumps(given))
    assert split_prompts(tmp_path / "splits.json") == given
    assert split_prompts("contact_prompts")["heldout"] == shipped_set("contact_prompts", "heldout")
    with pytest.raises(ReferenceSetError, match="too few to split.*give at least 6 prompts"):
        split_prompts(PROMPTS[:5])
    with pytest.raises(ReferenceSetError, match="no 'heldout'"):
        split_prompts({"train": PROMPTS})


def test_prompts_that_never_elicit_say_how_often_the_scorer_fired(model: torch.nn.Module) -> None:
    never = user_behaviour(
        PROMPTS, lambda texts: [0.0] * len(texts), max_new_tokens=3, samples=2, use_chat_template=False
    )
    with pytest.raises(ReferenceSetError, match=r"0 of 36 continuations \(0%\) were undesired.*more prompts"):
        paired_contrast_sets(model, tiny_tokenizer(), PROMPTS[:12], never, progress=False)


# -- generic focus ------------------------------------------------------------------------------
def _generation(tokenizer: object, text: str) -> Generation:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return Generation(0, "p", text, ids)


@pytest.mark.parametrize(
    "text", ["the cat is bad", "bad bad dog", "a big red car and a bad sun", "the big dog sat on a big mat", "the sun"]
)
def test_leave_one_word_out_focus_picks_the_toxic_focus_words(text: str) -> None:
    """On the shipped toxicity behaviour's word-level focus, the generic focus picks the same tokens."""
    tokenizer = tiny_tokenizer()
    generation = _generation(tokenizer, text)
    toxic = detox_behaviour(bad_word_score, threshold=0.5)
    assert toxic.focus is not None
    expected = toxic.focus(tokenizer, generation)
    assert expected == scored_word_positions(tokenizer, generation, bad_word_score, 0.5)
    assert leave_one_word_out_positions(tokenizer, generation, bad_word_score) == expected


def test_a_pattern_focus_explains_the_tokens_of_the_matches() -> None:
    tokenizer = tiny_tokenizer()
    generation = _generation(tokenizer, "the cat sat on the red mat")
    scorer = parse_scorer(r"regex:red mat|cat")
    assert isinstance(scorer, PatternScorer)
    assert matched_positions(tokenizer, generation, scorer.spans) == [1, 5, 6]
    behaviour = user_behaviour(PROMPTS, r"regex:red mat|cat", use_chat_template=False)
    assert behaviour.focus is not None and behaviour.focus(tokenizer, generation) == [1, 5, 6]


# -- end to end: fix command, card, Surgeon ------------------------------------------------------
def test_fix_command_end_to_end_with_a_python_scorer(
    text_checkpoint: Path, tmp_path: Path, scorer_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    output = tmp_path / "fixed"
    arguments = ["fix", "--model", str(text_checkpoint), "--prompts", str(tmp_path / "prompts.txt"), "--scorer"]
    common = ["--no-chat-template", "--budgets", "2", "--max-kl", "1e9", "--max-perplexity-increase", "1e9"]
    common += ["--max-induction-increase", "1e9", "--general-passages", "2"]
    assert (
        main([*arguments, scorer_module, "--name", "says-the", *common, "--no-progress", "--output", str(output)]) == 0
    )
    report = json.loads((output / "report.json").read_text())
    metadata = behaviour_metadata(report)
    assert report["behaviour"] == "says-the" and metadata is not None and metadata.command == "fix"
    assert report["settings"]["scorer"] == scorer_module and report["settings"]["prompts"] == "behaviour"
    assert {"undesired_rate", "score_mean"} <= set(report["heldout"]["before"])
    assert (output / "effect_vs_budget.png").is_file()
    # A behaviour of the user's own (e.g. contact details) is checked for both shipped behaviours as side effects.
    assert set(report["side_effects"]) == {"toxicity", "repetition"}
    assert all(block["prompts"] == 20 and block["before"] for block in report["side_effects"].values())
    # The card's text comes from the report: it names the scorer and threshold, and repeats the command.
    assert metadata.describe_scorer(report["settings"]) == (
        f"Scorer: {scorer_module}; a continuation is undesired when its score is higher than or equal to the "
        "threshold 0.5."
    )
    command = _recipe_command(report, None)
    assert command is not None and command.startswith("hf-lrp-surgery fix") and "--prompts" in command
    assert f"--scorer {scorer_module}" in command and "--no-chat-template" in command
    # The card of a model corrected for this behaviour (whatever budget the tiny model's search chose).
    model = AutoModelForCausalLM.from_pretrained(text_checkpoint)
    mask = select(Scores.load(output / "scores"), "neurons", 2)
    baked = Surgeon(model, tiny_tokenizer(), progress=False).apply(mask, carrier="bake")
    baked.save(tmp_path / "baked")
    card = ModelCard.load(write_card(tmp_path / "baked", report=output / "report.json", command=command))
    assert f"Scorer: {scorer_module}" in card.text and "threshold 0.5" in card.text
    assert "hf-lrp-surgery fix" in card.text and "--prompts" in card.text
    assert "--max-induction-increase 1000000000.0" in command and "--general-passages 2" in command
    assert "### Side effects on other behaviours" in card.text and "| toxicity | Toxicity rate (greedy)" in card.text
    assert "| repetition | Mean response uniqueness ratio" in card.text
    # Bad input fails before the model loads, as one line.
    capsys.readouterr()
    assert main([*arguments, "regex:(", *common, "--output", str(tmp_path / "bad")]) == 2
    assert "does not compile" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert "fix" in BEHAVIOURS["user"].metadata.command


def test_fix_help_explains_every_scorer_form(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fix", "--help"])
    text = capsys.readouterr().out
    for example in (
        "--scorer mypkg.judge:score",
        r"--scorer regex:'\b[\w.]+@\w+\.\w+\b'",
        "--scorer words:words.txt",
        "--scorer ./my-classifier --label toxic",
    ):
        assert example in text


def test_surgeon_correct_runs_the_recipe_on_a_user_behaviour(model: torch.nn.Module, tmp_path: Path) -> None:
    behaviour = user_behaviour(
        {"train": PROMPTS[:8], "validation": PROMPTS[8:10], "heldout": PROMPTS[10:]},
        lambda texts: [1.0 if "the" in t.split() else 0.0 for t in texts],
        max_new_tokens=4,
        samples=4,
        use_chat_template=False,
    )
    surgeon = Surgeon(model, tiny_tokenizer(), progress=False)
    result = surgeon.correct(behaviour, tmp_path / "surgeon", budgets=[2], limits=GeneralLimits(1e9, 1e9, 1e9))
    assert result.behaviour == "user" and result.reference_sizes["undesired"] > 0
    assert [p.budget for p in result.frontier] == [0, 2] and "undesired_rate" in result.heldout["before"]
    assert result.settings["scorer"] == "<lambda>" and (tmp_path / "surgeon" / "report.json").is_file()
