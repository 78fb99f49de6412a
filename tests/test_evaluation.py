"""The evaluation harness: known inputs give known values, batching and padding change no result, and the
``evaluate`` modules load from their directories offline."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from tiny_models import CONTEXT, tiny_config, tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer
from transformers import LlamaForSequenceClassification, pipeline

from hf_lrp_surgery.evaluation import (
    EVALUATE_MODULES,
    CallableScorer,
    DecodingSettings,
    Generation,
    PipelineScorer,
    ProfanityCheckScorer,
    bootstrap_interval,
    distinct_n,
    evaluate_module_path,
    generate,
    get_scorer,
    induction_loss,
    induction_sequences,
    mean_rur,
    next_token_kl,
    perplexity,
    protocol_toxicity,
    response_uniqueness_ratio,
    sample_protocol_toxicity,
    toxicity,
    wilson_interval,
)
from hf_lrp_surgery.evaluation.repetition import rur_or_unique
from hf_lrp_surgery.exceptions import EvaluationError, MissingChatTemplateError, SequenceTooLongError

TEXTS = ["the cat sat on the mat", "one two three", "hello world and the sun is very big", "a red house"]
CLEAN, PROFANE = "have a lovely day with your family", "you are a fucking idiot"


@pytest.fixture(scope="module")
def model(single_thread) -> torch.nn.Module:
    model = tiny_model("llama", dtype=torch.float32, attn_implementation="sdpa")
    model.resize_token_embeddings(len(WORDS))
    return model.eval()


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def _long_text(words: int, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(4, len(WORDS), (words,), generator=generator).tolist()
    return " ".join(WORDS[i] for i in picks)


def _single_greedy(model, tokenizer, prompt: str, max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """``model.generate`` on one unpadded prompt, cut before the first stop id."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        new = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=stop_ids,
        )[0, ids.shape[1] :].tolist()
    return next((new[:i] for i, t in enumerate(new) if t in stop_ids), new)


# --- repetition --------------------------------------------------------------------------------------------------


def test_response_uniqueness_ratio() -> None:
    assert response_uniqueness_ratio([1, 1, 2, 3]) == 0.75
    assert response_uniqueness_ratio([5] * 10) == 0.1
    assert response_uniqueness_ratio(torch.tensor([1, 1, 2, 3])) == 0.75  # values, not tensor identities
    with pytest.raises(ValueError, match="empty"):
        response_uniqueness_ratio([])
    generations = [Generation(0, "p", "", [1, 1, 2, 3]), Generation(1, "q", "", []), Generation(2, "r", "", [4, 5])]
    assert mean_rur(generations) == pytest.approx((0.75 + 1.0) / 2)  # the empty one is skipped
    with pytest.raises(ValueError, match="empty"):
        mean_rur(generations[1:2])
    assert rur_or_unique([1, 1, 2, 3]) == 0.75 and rur_or_unique([]) == 1.0  # the correction's rule


def test_distinct_n() -> None:
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert distinct_n([[1, 2, 1, 2], [1, 2, 3]], 2) == pytest.approx(3 / 5)
    assert distinct_n([[1, 2, 1, 2]], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b c d"], 3) == 1.0
    assert distinct_n(["a", ""], 2) == 0.0 and distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(["a b"], 0)


# --- toxicity ----------------------------------------------------------------------------------------------------


def test_toxicity_rate_and_mean_with_a_callable_scorer() -> None:
    scorer = CallableScorer(
        lambda texts: [0.9 if "bad" in t else (0.5 if "meh" in t else 0.1) for t in texts], name="keyword"
    )
    result = toxicity(["bad", "good", "bad bad", "meh"], scorer, threshold=0.5)
    assert result.scorer == "keyword" and result.threshold == 0.5
    assert result.scores == [0.9, 0.1, 0.9, 0.5]
    assert result.rate == 0.75  # a score equal to the threshold counts as toxic
    assert result.mean == pytest.approx(0.6)
    assert toxicity(["bad", "good"], lambda texts: [1.0, 0.0]).scorer == "<lambda>"
    with pytest.raises(EvaluationError, match="no texts"):
        toxicity([], scorer)
    with pytest.raises(EvaluationError, match="outside"):
        toxicity(["a"], lambda texts: [1.5])
    with pytest.raises(EvaluationError, match="2 scores for 1 texts"):
        toxicity(["a"], lambda texts: [0.1, 0.2])
    with pytest.raises(ValueError, match="threshold"):
        toxicity(["a"], scorer, threshold=2.0)


def test_get_scorer() -> None:
    assert isinstance(get_scorer(None), ProfanityCheckScorer)
    assert isinstance(get_scorer("profanity-check"), ProfanityCheckScorer)
    keyword = CallableScorer(lambda texts: [0.0] * len(texts), name="keyword")
    assert get_scorer(keyword) is keyword
    assert isinstance(get_scorer(lambda texts: [0.0] * len(texts)), CallableScorer)
    lazy = get_scorer("facebook/roberta-hate-speech-dynabench-r4-target")  # nothing is downloaded before a call
    assert isinstance(lazy, PipelineScorer) and lazy.name == "facebook/roberta-hate-speech-dynabench-r4-target"
    assert lazy.toxic_label == "hate"
    assert get_scorer("some/classifier", toxic_label="LABEL_1").toxic_label == "LABEL_1"
    with pytest.raises(TypeError, match="toxicity scorer"):
        get_scorer(3)


def test_profanity_check_scorer_separates_clean_from_profane() -> None:
    clean, profane = ProfanityCheckScorer()([CLEAN, PROFANE])
    assert clean < 0.5 < profane
    result = toxicity([CLEAN, PROFANE])
    assert result.scorer == "alt-profanity-check" and result.rate == 0.5


def test_pipeline_scorer_returns_the_toxic_label_probability(tmp_path, tokenizer, single_thread) -> None:
    config = tiny_config("llama")
    config.update(
        dict(
            vocab_size=len(WORDS),
            num_labels=2,
            id2label={0: "neutral", 1: "toxic"},
            label2id={"neutral": 0, "toxic": 1},
        )
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        classifier = LlamaForSequenceClassification(config).eval()
    texts = [CLEAN.replace("lovely ", "").replace("your ", ""), "the cat sat", "a"]
    expected = []
    for text in texts:
        with torch.no_grad():
            logits = classifier(**tokenizer(text, return_tensors="pt")).logits
        expected.append(float(logits.softmax(-1)[0, 1]))

    ready = PipelineScorer(pipeline("text-classification", model=classifier, tokenizer=tokenizer), batch_size=2)
    assert ready(texts) == pytest.approx(expected, abs=1e-5)

    classifier.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    by_path = get_scorer(str(tmp_path))  # created lazily, from a local directory
    assert by_path.name == str(tmp_path)
    assert toxicity(texts, by_path).scores == pytest.approx(expected, abs=1e-5)
    with pytest.raises(EvaluationError, match="no label 'LABEL_1'.*neutral"):
        PipelineScorer(str(tmp_path), toxic_label="LABEL_1")(texts)


# --- perplexity and KL -------------------------------------------------------------------------------------------


def _nll(model, ids: list[int], labels: list[int] | None = None) -> tuple[float, int]:
    """Summed NLL and count of predicted tokens, from the model's own loss on one unpadded row."""
    labels = ids if labels is None else labels
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    count = sum(label != -100 for label in labels[1:])
    return float(loss) * count, count


def _ppl(parts: list[tuple[float, int]]) -> float:
    return math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))


def test_perplexity_is_token_weighted_and_ignores_pads(model, tokenizer) -> None:
    expected = _ppl([_nll(model, tokenizer(t)["input_ids"]) for t in TEXTS])
    assert perplexity(model, tokenizer, TEXTS, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)
    # A text of one token (here only BOS) predicts nothing and changes nothing.
    assert perplexity(model, tokenizer, TEXTS + [""], progress=False) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(EvaluationError, match="two or more tokens"):
        perplexity(model, tokenizer, ["", ""], progress=False)
    with pytest.raises(EvaluationError, match="no texts"):
        perplexity(model, tokenizer, [], progress=False)


def test_perplexity_splits_long_texts_into_windows(model, tokenizer) -> None:
    ids = tokenizer(_long_text(150))["input_ids"]  # 151 tokens, beyond the context of 64
    assert len(ids) > CONTEXT
    # Default: windows of the model's context (64 tokens) that score 63 new tokens each, every window but the
    # first starting with the previous window's last token; the last window is filled up with more context.
    assert len(ids) == 151
    parts = [_nll(model, ids[0:64]), _nll(model, ids[63:127]), _nll(model, ids[87:151], [-100] * 40 + ids[127:151])]
    assert sum(c for _, c in parts) == len(ids) - 1  # every token but the first, once
    expected = _ppl(parts)
    step = CONTEXT - 1
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert perplexity(model, tokenizer, [text], progress=False) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tokenizer, [text], max_length=CONTEXT, stride=step, progress=False) == pytest.approx(
        expected, rel=1e-5
    )

    # A smaller stride: windows of 16 tokens, 5 new tokens each, the rest of the window as context (-100 labels).
    parts, first = [], 1
    while first < len(ids):
        end = min(first + 5, len(ids))
        start = max(0, end - 16)
        window = ids[start:end]
        parts.append(_nll(model, window, [-100] * (first - start) + window[first - start :]))
        first = end
    assert sum(c for _, c in parts) == len(ids) - 1
    assert perplexity(model, tokenizer, [text], max_length=16, stride=5, batch_size=7, progress=False) == pytest.approx(
        _ppl(parts), rel=1e-5
    )
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, [text], max_length=16, stride=16, progress=False)


def test_next_token_kl(model, tokenizer) -> None:
    assert next_token_kl(model, model, tokenizer, TEXTS, progress=False) == pytest.approx(0.0, abs=1e-12)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    every, last = [], []
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            log_p = model(input_ids=ids).logits[0].double().log_softmax(-1)
            log_q = perturbed(input_ids=ids).logits[0].double().log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        every += kl.tolist()
        last.append(float(kl[-1]))
    measured = next_token_kl(model, perturbed, tokenizer, TEXTS, batch_size=3, progress=False)
    assert measured > 1e-4
    assert measured == pytest.approx(sum(every) / len(every), rel=1e-5)
    assert next_token_kl(
        model, perturbed, tokenizer, TEXTS, batch_size=3, positions="last", progress=False
    ) == pytest.approx(sum(last) / len(last), rel=1e-5)
    with pytest.raises(ValueError, match="positions"):
        next_token_kl(model, perturbed, tokenizer, TEXTS, positions="first", progress=False)
    with pytest.raises(SequenceTooLongError):
        next_token_kl(model, perturbed, tokenizer, [_long_text(CONTEXT)], progress=False)


def test_models_are_left_in_their_mode(model, tokenizer) -> None:
    trained = copy.deepcopy(model).train()
    trained.model.layers[0].eval()  # a submodule kept in eval mode on purpose stays so
    modes = {name: m.training for name, m in trained.named_modules()}
    perplexity(trained, tokenizer, TEXTS[:2], progress=False)
    next_token_kl(model, trained, tokenizer, TEXTS[:2], progress=False)
    generate(trained, tokenizer, TEXTS[:2], DecodingSettings(max_new_tokens=2), progress=False)
    assert {name: m.training for name, m in trained.named_modules()} == modes
    assert model.training is False


# --- generation --------------------------------------------------------------------------------------------------


def test_decoding_settings_are_validated() -> None:
    settings = DecodingSettings(max_new_tokens=50, do_sample=True, top_p=0.95, num_return_sequences=4, seed=3)
    assert DecodingSettings(**settings.to_dict()) == settings
    for bad in (
        dict(max_new_tokens=0),
        dict(batch_size=0),
        dict(temperature=0.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(num_return_sequences=0),
        dict(num_return_sequences=2),
    ):
        with pytest.raises(ValueError):
            DecodingSettings(**bad)
    with pytest.raises(ValueError, match="do_sample"):
        DecodingSettings(num_return_sequences=2)
    # Unless given, greedy decoding batches 64 prompts and sampling 16 (its draws follow the batches).
    assert DecodingSettings().batch_size == 64 and settings.batch_size == 16
    assert DecodingSettings(batch_size=5).to_dict()["batch_size"] == 5


def test_greedy_generation_equals_single_unpadded_prompts(model, tokenizer) -> None:
    prompts = TEXTS + ["one"]  # lengths 2 to 9 tokens: left padding in both batches
    settings = DecodingSettings(max_new_tokens=10, batch_size=4)
    generations = generate(model, tokenizer, prompts, settings, progress=False)
    assert [(g.prompt_index, g.prompt) for g in generations] == list(enumerate(prompts))
    for g in generations:
        assert g.token_ids == _single_greedy(model, tokenizer, g.prompt, 10, [2])
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)
    assert generate(model, tokenizer, prompts, settings, progress=False) == generations  # deterministic
    one_by_one = generate(model, tokenizer, prompts, DecodingSettings(max_new_tokens=10, batch_size=1), progress=False)
    assert one_by_one == generations
    assert tokenizer.padding_side == "right"  # the tokenizer is not modified


def test_generation_stops_at_eos(model, tokenizer, monkeypatch) -> None:
    free = generate(model, tokenizer, TEXTS, DecodingSettings(max_new_tokens=12), progress=False)
    tokens = free[0].token_ids
    cut = next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k])
    stop = tokens[cut]
    # The model's generation config names an extra end-of-sequence id (as chat models do).
    monkeypatch.setattr(model.generation_config, "eos_token_id", [stop, 2])
    stopped = generate(model, tokenizer, TEXTS, DecodingSettings(max_new_tokens=12, batch_size=4), progress=False)
    assert stopped[0].token_ids == tokens[:cut]
    for g in stopped:
        assert g.token_ids == _single_greedy(model, tokenizer, g.prompt, 12, [stop, 2])
        assert stop not in g.token_ids

    forced = copy.deepcopy(model)  # eos (id 2) is every step's only choice: empty continuations
    with torch.no_grad():
        forced.lm_head.bias = torch.nn.Parameter(torch.full((len(WORDS),), -1e4))
        forced.lm_head.bias[2] = 1e4
    assert all(g.token_ids == [] and g.text == "" for g in generate(forced, tokenizer, TEXTS, progress=False))


def test_sampling_is_seeded_and_prompt_major(model, tokenizer) -> None:
    settings = DecodingSettings(max_new_tokens=8, do_sample=True, num_return_sequences=3, seed=7, batch_size=2)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, TEXTS[:3], settings, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert generate(model, tokenizer, TEXTS[:3], settings, progress=False) == first
    assert [g.prompt_index for g in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [g.prompt for g in first] == [p for p in TEXTS[:3] for _ in range(3)]
    other_seed = generate(
        model, tokenizer, TEXTS[:3], DecodingSettings(**{**settings.to_dict(), "seed": 8}), progress=False
    )
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in first]
    # With a vanishing nucleus every sample is the greedy continuation of its own prompt.
    nucleus = DecodingSettings(max_new_tokens=8, do_sample=True, top_p=1e-9, num_return_sequences=2, batch_size=2)
    greedy = generate(model, tokenizer, TEXTS[:3], DecodingSettings(max_new_tokens=8), progress=False)
    samples = generate(model, tokenizer, TEXTS[:3], nucleus, progress=False)
    assert [g.token_ids for g in samples] == [g.token_ids for g in greedy for _ in range(2)]


def test_chat_template(model, tokenizer) -> None:
    with pytest.raises(MissingChatTemplateError, match="no chat template"):
        generate(model, tokenizer, TEXTS[:1], DecodingSettings(use_chat_template=True), progress=False)
    tokenizer.chat_template = (
        "{% for m in messages %}<bos> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} hello{% endif %}"
    )
    templated = generate(
        model, tokenizer, ["the cat"], DecodingSettings(max_new_tokens=6, use_chat_template=True), progress=False
    )
    plain = generate(model, tokenizer, ["the cat hello"], DecodingSettings(max_new_tokens=6), progress=False)
    assert templated[0].prompt == "the cat" and templated[0].token_ids == plain[0].token_ids


def test_generation_input_errors(model, tokenizer) -> None:
    with pytest.raises(EvaluationError, match="no prompts"):
        generate(model, tokenizer, [], progress=False)
    with pytest.raises(TypeError, match="one string"):
        generate(model, tokenizer, "the cat", progress=False)
    with pytest.raises(SequenceTooLongError, match="context of 64"):
        generate(model, tokenizer, [_long_text(40)], DecodingSettings(max_new_tokens=32), progress=False)


# --- evaluate modules --------------------------------------------------------------------------------------------


def test_evaluate_modules_load_offline_from_their_directories(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    for name in EVALUATE_MODULES:
        assert os.path.isfile(os.path.join(evaluate_module_path(name), f"{name}.py"))
    with pytest.raises(ValueError, match="shipped modules"):
        evaluate_module_path("bleu")

    rur = evaluate.load(evaluate_module_path("response_uniqueness"), keep_in_memory=True)
    assert "2506.13727" in rur.citation and rur.description
    expected = {"rur": 0.875, "rur_per_prediction": [0.75, 1.0, None]}
    assert rur.compute(predictions=[[1, 1, 2, 3], [4, 5], []]) == expected
    assert rur.compute(predictions=["a a b b", "c"])["rur"] == 0.75

    distinct = evaluate.load(evaluate_module_path("distinct_n"), keep_in_memory=True)
    assert distinct.compute(predictions=["a b a b", "a b c"], n=2) == {"distinct_2": pytest.approx(0.6)}
    assert distinct.compute(predictions=[[1, 2, 1, 2]], n=1) == {"distinct_1": 0.5}

    tox = evaluate.load(evaluate_module_path("toxicity"), keep_in_memory=True)
    offline = tox.compute(predictions=[CLEAN, PROFANE])
    assert offline["scorer"] == "alt-profanity-check" and offline["toxicity_rate"] == 0.5
    assert offline["toxicity"][0] < 0.5 < offline["toxicity"][1]
    plugged = tox.compute(
        predictions=["bad", "good"], scorer=lambda texts: [0.9 if "bad" in t else 0.2 for t in texts], threshold=0.9
    )
    assert plugged["toxicity"] == [0.9, 0.2] and plugged["toxicity_rate"] == 0.5
    assert plugged["toxicity_mean"] == pytest.approx(0.55)


# --- the induction probe ------------------------------------------------------------------------------------------
def test_induction_sequences_are_seeded_ordinary_and_repeat_free(tokenizer) -> None:
    rows = induction_sequences(tokenizer, len(WORDS), sequences=5, length=20, seed=3)
    assert rows == induction_sequences(tokenizer, len(WORDS), sequences=5, length=20, seed=3)
    assert rows != induction_sequences(tokenizer, len(WORDS), sequences=5, length=20, seed=4)
    special = set(tokenizer.all_special_ids)
    assert all(len(row) == 20 == len(set(row)) and not special & set(row) for row in rows)
    assert all(0 <= i < len(WORDS) for row in rows for i in row)
    # A vocabulary smaller than the length: drawn with replacement, still no special token.
    small = induction_sequences(tokenizer, 10, sequences=2, length=20)
    assert all(len(row) == 20 and set(row) <= set(range(4, 10)) for row in small)
    with pytest.raises(ValueError):
        induction_sequences(tokenizer, len(WORDS), length=1)


def test_induction_loss_matches_a_hand_computation(model, tokenizer) -> None:
    result = induction_loss(model, tokenizer, sequences=3, length=10, seed=5, batch_size=2, progress=False)
    assert (result.sequences, result.length, result.seed) == (3, 10, 5)
    first = second = 0.0
    for row in induction_sequences(tokenizer, len(WORDS), sequences=3, length=10, seed=5):
        ids = [tokenizer.bos_token_id, *row, *row]  # the tiny tokenizer prepends <bos>
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        # Tokens 2..10 of each copy: positions 2..10 (first) and 12..20 (second), each predicted from the one before.
        first -= sum(float(log_probs[t - 1, ids[t]]) for t in range(2, 11))
        second -= sum(float(log_probs[t - 1, ids[t]]) for t in range(12, 21))
    assert result.first_copy_loss == pytest.approx(first / 27, rel=1e-5)
    assert result.second_copy_loss == pytest.approx(second / 27, rel=1e-5)
    # The default length fits two copies into the tiny model's context (64 tokens with <bos>: 31 each).
    assert induction_loss(model, tokenizer, sequences=1, progress=False).length == (CONTEXT - 1) // 2
    with pytest.raises(SequenceTooLongError, match="length <="):
        induction_loss(model, tokenizer, length=CONTEXT, progress=False)


def test_induction_loss_sees_broken_copying(model, tokenizer) -> None:
    """The same model gives the same value; one whose attention outputs are zeroed (nothing can be copied) differs."""
    base = induction_loss(model, tokenizer, sequences=4, progress=False)
    assert induction_loss(copy.deepcopy(model), tokenizer, sequences=4, progress=False) == base
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for layer in broken.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    cut = induction_loss(broken, tokenizer, sequences=4, progress=False)
    assert cut.second_copy_loss != pytest.approx(base.second_copy_loss, abs=1e-4)
    # Without attention (Llama's positions enter only there) each prediction depends on the current token
    # alone, and both copies score the same (previous token, token) pairs: copying is gone, the copies tie.
    assert cut.second_copy_loss == pytest.approx(cut.first_copy_loss, rel=1e-5)
    assert base.second_copy_loss != pytest.approx(base.first_copy_loss, rel=1e-3)


# --- confidence intervals and the RealToxicityPrompts protocol -------------------------------------------------------
def test_wilson_and_bootstrap_intervals() -> None:
    # Wilson (1927) for 3 of 10 at 95%: centre (0.3 + z^2/20) / (1 + z^2/10), known value [0.1078, 0.6032].
    low, high = wilson_interval(3, 10)
    assert (round(low, 4), round(high, 4)) == (0.1078, 0.6032)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(5, 10, 0.5)[1] - wilson_interval(5, 10, 0.5)[0] < high - low
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)
    values = [0.0, 1.0] * 50
    a, b = bootstrap_interval(values, seed=1)
    assert a < 0.5 < b and (a, b) == bootstrap_interval(values, seed=1) and b - a < 0.25
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_protocol_toxicity_against_a_hand_computation() -> None:
    """Expected maximum toxicity: the mean of per-prompt maxima; toxicity probability: share of maxima >= 0.5."""
    fake = CallableScorer(lambda texts: [float(t) for t in texts], "fake")
    groups = [["0.1", "0.7", "0.2"], ["0.4", "0.3", "0.1"], ["0.5", "0.9", "0.0"], ["0.2", "0.2", "0.2"]]
    result = protocol_toxicity(groups, fake)
    maxima = [0.7, 0.4, 0.9, 0.2]
    assert result.max_scores == maxima and result.samples == 3 and result.prompts == 4 and result.scorer == "fake"
    assert result.expected_max_toxicity == pytest.approx(sum(maxima) / 4)
    mean = sum(maxima) / 4
    assert result.expected_max_toxicity_std == pytest.approx(math.sqrt(sum((m - mean) ** 2 for m in maxima) / 4))
    assert result.toxicity_probability == 0.5 and result.toxicity_probability_ci == wilson_interval(2, 4)
    low, high = result.expected_max_toxicity_ci
    assert min(maxima) <= low <= mean <= high <= max(maxima)
    # At threshold 0.4 the second prompt counts too (>=).
    assert protocol_toxicity(groups, fake, threshold=0.4).toxicity_probability == 0.75
    data = result.to_dict()
    assert "max_scores" not in data and data["toxicity_probability_ci"] == list(wilson_interval(2, 4))
    with pytest.raises(EvaluationError, match="same number"):
        protocol_toxicity([["0.1"], ["0.1", "0.2"]], fake)
    with pytest.raises(EvaluationError):
        protocol_toxicity([], fake)
    with pytest.raises(TypeError):
        protocol_toxicity(["0.1", "0.2"], fake)


def test_sample_protocol_toxicity_is_seeded_and_groups_by_prompt(model, tokenizer) -> None:
    seen: list[list[str]] = []

    def record(texts: list[str]) -> list[float]:
        seen.append(list(texts))
        return [1.0 if "bad" in t.split() else 0.0 for t in texts]

    prompts = ["the cat sat on the", "hello world", "the dog was very"]
    result = sample_protocol_toxicity(model, tokenizer, prompts, record, samples=4, max_new_tokens=5, progress=False)
    again = sample_protocol_toxicity(model, tokenizer, prompts, record, samples=4, max_new_tokens=5, progress=False)
    assert seen[0] == seen[1] and len(seen[0]) == 12 and result == again
    expected = [float(any("bad" in t.split() for t in seen[0][i * 4 : (i + 1) * 4])) for i in range(3)]
    assert result.max_scores == expected and result.toxicity_probability == sum(expected) / 3
    other = sample_protocol_toxicity(
        model, tokenizer, prompts, record, samples=4, max_new_tokens=5, seed=9, progress=False
    )
    assert seen[2] != seen[0] and other.samples == 4


# --- the embedded model ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_smollm2_generation_and_perplexity(single_thread) -> None:
    from hf_lrp_surgery.models import load_model

    model, tokenizer = load_model()
    generations = generate(
        model,
        tokenizer,
        ["The capital of France is", "Water boils at"],
        DecodingSettings(max_new_tokens=8),
        progress=False,
    )
    assert [g.prompt_index for g in generations] == [0, 1]
    assert all(0 < len(g.token_ids) <= 8 and g.text.strip() for g in generations)
    value = perplexity(
        model, tokenizer, ["The capital of France is Paris.", "Water boils at 100 degrees Celsius."], progress=False
    )
    assert math.isfinite(value) and 1 < value < 1000
