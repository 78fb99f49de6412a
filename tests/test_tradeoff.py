"""The trade-off search on a synthetic landscape: front, choice within limits, score caching, determinism."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_model

from hf_lrp_surgery.correction.tradeoff import ScoreKey, TradeoffResult, TradeoffSpace, TrialMeasure, tradeoff_search
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.options import ContrastOptions
from hf_lrp_surgery.scoring import Scores, score


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _landscape(mask: Mask) -> TrialMeasure:
    """Magnitude removes the behaviour cheaply, random does not; KL grows with the count."""
    method = mask.provenance["scores"]["method"]
    gain = 0.004 if method == "magnitude" else 0.001
    per_unit = 0.002 if mask.granularity == "neurons" else 0.01
    kl = per_unit * mask.count
    return TrialMeasure({"rate": max(0.0, 0.5 - gain * mask.count)}, kl, kl <= 0.05, {"perplexity_increase": 0.0})


def _search(model, calls, **keywords):
    def scores_for(key: ScoreKey, contrast: ContrastOptions) -> Scores:
        calls.append((key, contrast))
        return score(model, options=None, method=key.method, components=(key.granularity,), progress=False)

    space = TradeoffSpace(
        methods=("magnitude", "random"),
        budgets={"neurons": (1, 60), "heads": (1, 4)},
        normalizations=("total",),
        protect_tops=(0.0,),
    )
    return tradeoff_search(
        space,
        scores_for,
        keywords.pop("evaluate", _landscape),
        primary="rate",
        lower_is_better=True,
        baseline={"rate": 0.5},
        trials=keywords.pop("trials", 25),
        progress=False,
        **keywords,
    )


def test_the_search_chooses_the_best_point_within_the_limits_and_keeps_the_front(model):
    calls: list = []
    result = _search(model, calls, start_budgets={"neurons": [10]})
    assert len(result.points) == 25
    # Relevance once per (method, granularity, contrast): never recomputed for a later trial.
    assert len(calls) == len(set(calls)) <= 4
    feasible = [p for p in result.points if p.within_limits]
    assert result.chosen is not None and result.chosen.within_limits
    assert result.chosen.effect["rate"] == min(p.effect["rate"] for p in feasible)
    assert result.chosen.choice.method == "magnitude"  # the cheap remover wins within the limits
    # The front: no measured point dominates a front point, and every non-front point is dominated.
    objectives = {p.choice: (p.effect["rate"], p.kl) for p in result.points}
    for p in result.points:
        dominated = any(
            o[0] <= objectives[p.choice][0] and o[1] <= objectives[p.choice][1] and o != objectives[p.choice]
            for o in objectives.values()
        )
        assert p.pareto == (not dominated)
    assert result.front == sorted(result.front, key=lambda p: p.kl)
    # The enqueued starting points are measured first, one per method.
    assert [(p.choice.method, p.choice.budget) for p in result.points[:2]] == [("magnitude", 10), ("random", 10)]
    # The evaluation's other fields are kept.
    assert "perplexity_increase" in result.points[0].details


def test_the_same_seed_gives_the_same_trials(model):
    first = _search(model, [], trials=12, seed=3)
    again = _search(model, [], trials=12, seed=3)
    assert [p.choice for p in first.points] == [p.choice for p in again.points]


def test_nothing_within_the_limits_chooses_nothing(model):
    def too_costly(mask: Mask) -> TrialMeasure:
        return TrialMeasure({"rate": 0.1}, 1.0, False)

    space = TradeoffSpace(
        methods=("magnitude",), budgets={"heads": (1, 3)}, normalizations=("total",), protect_tops=(0.0,)
    )
    result = tradeoff_search(
        space,
        lambda key, contrast: score(model, method=key.method, components=(key.granularity,), progress=False),
        too_costly,
        primary="rate",
        lower_is_better=True,
        baseline={"rate": 0.5},
        trials=4,
        progress=False,
    )
    assert result.chosen is None
    assert result.to_dict()["chosen"] is None


def test_the_result_saves_json_and_a_plot_and_loads_validated(model, tmp_path):
    result = _search(model, [], trials=8)
    path = result.save(tmp_path)
    data = TradeoffResult.load_dict(path)
    assert data["trials"] == 8 and len(data["points"]) == 8
    assert data["chosen"] == (None if result.chosen is None else result.chosen.to_dict())
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    (tmp_path / "bad.json").write_text(json.dumps({"points": []}))
    with pytest.raises(ValueError, match="not a trade-off search"):
        TradeoffResult.load_dict(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"methods": ()}, "at least one value"),
        ({"budgets": {"layers": (1, 2)}}, "unknown granularity"),
        ({"budgets": {"neurons": (5, 2)}}, "lowest <= highest"),
        ({"normalizations": ("median",)}, "unknown normalisation"),
        ({"protect_tops": (1.5,)}, "protect_top"),
    ],
)
def test_a_bad_space_is_refused_when_made(keywords, message):
    with pytest.raises(ValueError, match=message):
        TradeoffSpace(**keywords)


def test_the_primary_metric_must_be_measured(model):
    with pytest.raises(ValueError, match="primary metric"):
        tradeoff_search(
            TradeoffSpace(
                methods=("magnitude",), budgets={"heads": (1, 2)}, normalizations=("total",), protect_tops=(0.0,)
            ),
            lambda key, contrast: score(model, method=key.method, components=(key.granularity,), progress=False),
            lambda mask: TrialMeasure({"other": 0.0}, 0.0, True),
            primary="rate",
            lower_is_better=True,
            baseline={},
            trials=1,
            progress=False,
        )


def test_a_paired_method_searches_only_its_granularities_and_no_contrast(model):
    def scores_for(key: ScoreKey, contrast: ContrastOptions) -> Scores:
        # Stand-in scores (the search only selects from them); what matters is what is asked for.
        return score(model, method="magnitude", components=(key.granularity,), progress=False)

    space = TradeoffSpace(
        methods=("magnitude", "aura"),
        budgets={"neurons": (1, 30), "weights": (1, 30)},
        normalizations=("total", "max"),
        protect_tops=(0.0, 0.05),
    )
    result = tradeoff_search(
        space, scores_for, _landscape, primary="rate", lower_is_better=True, baseline={}, trials=20, progress=False
    )
    aura = [p for p in result.points if p.choice.method == "aura"]
    assert aura, "the sampler never proposed the paired method"
    assert all(p.choice.granularity == "neurons" and p.choice.contrast == ContrastOptions() for p in aura)
    with pytest.raises(ValueError, match="none of the searched granularities"):
        tradeoff_search(
            TradeoffSpace(methods=("aura",), budgets={"weights": (1, 3)}),
            scores_for,
            _landscape,
            primary="rate",
            lower_is_better=True,
            baseline={},
            progress=False,
        )


def test_confirmation_runs_on_the_best_cheap_points_until_one_passes(model):
    confirmed: list[tuple[str, int]] = []

    def confirm(mask: Mask) -> TrialMeasure:
        confirmed.append((mask.granularity, mask.count))
        # The fuller check fails above 15 components.
        return TrialMeasure({}, 0.0, mask.count <= 15, {"perplexity_increase": 0.01 * mask.count})

    # The same search without confirmation: the cheap ranking the confirmation walks down.
    cheap = _search(model, [])
    ranked = sorted(
        {p.choice: p for p in cheap.points if p.within_limits}.values(),
        key=lambda p: (p.effect["rate"], p.kl, p.choice.budget),
    )
    result = _search(model, [], confirm=confirm, max_confirmations=50)
    passing = next(i for i, p in enumerate(ranked) if p.choice.budget <= 15)
    assert confirmed == [(p.choice.granularity, p.choice.budget) for p in ranked[: passing + 1]]
    assert result.chosen is not None and result.chosen.choice == ranked[passing].choice
    assert result.chosen.details["confirmed"] == {
        "within_limits": True,
        "perplexity_increase": 0.01 * result.chosen.choice.budget,
    }
    failed = {p.choice for p in ranked[:passing]}
    assert all(not p.within_limits for p in result.points if p.choice in failed)
    # With too few confirmations allowed, nothing is chosen.
    if passing > 0:
        assert _search(model, [], confirm=confirm, max_confirmations=passing).chosen is None


def test_soft_masks_are_searched_where_they_apply(model):
    def scores_for(key: ScoreKey, contrast: ContrastOptions) -> Scores:
        return score(model, method="magnitude", components=(key.granularity,), progress=False)

    space = TradeoffSpace(
        methods=("magnitude",),
        budgets={"neurons": (1, 30), "weights": (1, 30)},
        normalizations=("total",),
        protect_tops=(0.0,),
        dampenings=(None, "relevance", "aura"),
    )
    seen: list[Mask] = []

    def evaluate(mask: Mask) -> TrialMeasure:
        seen.append(mask)
        return _landscape(mask)

    result = tradeoff_search(
        space,
        scores_for,
        evaluate,
        primary="rate",
        lower_is_better=True,
        baseline={},
        trials=20,
        start_budgets={"neurons": [5]},
        progress=False,
    )
    assert result.points[0].choice.dampen is None  # the starting trial is the space's first (hard) choice
    assert {p.choice.dampen for p in result.points if p.choice.granularity == "neurons"} <= {None, "relevance"}
    assert all(p.choice.dampen is None for p in result.points if p.choice.granularity == "weights")
    assert any(m.soft for m in seen), "the sampler never proposed a soft mask"
    assert all(m.soft == (m.provenance["selection"].get("dampen") is not None) for m in seen)
    with pytest.raises(ValueError, match="dampening must be"):
        TradeoffSpace(dampenings=("median",))


def test_the_command_line_searches_constant_dampening_and_the_card_spells_it_back(capsys):
    """``--search-dampenings`` takes constant scales; the spelling the card writes parses to the same values."""
    from hf_lrp_surgery.cli import build_parser
    from hf_lrp_surgery.correction.tradeoff import spell_dampening

    args = build_parser().parse_args(["fix-repetition", "--search", "--search-dampenings", "none", "0.5", "aura"])
    assert args.search_dampenings == [None, 0.5, "aura"]
    again = build_parser().parse_args(
        ["fix-repetition", "--search", "--search-dampenings", *(spell_dampening(d) for d in args.search_dampenings)]
    )
    assert again.search_dampenings == args.search_dampenings
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fix-repetition", "--search", "--search-dampenings", "1.5"])
    assert "give none, relevance, aura or a scale in [0, 1)" in capsys.readouterr().err


def test_a_trial_the_cheap_limits_refuse_is_not_measured_and_stays_off_the_front(model, tmp_path):
    """An evaluation may refuse a mask on KL before measuring its behaviour; the search never chooses it."""
    measured: list[int] = []

    def screened(mask: Mask) -> TrialMeasure:
        full = _landscape(mask)
        if not full.within_limits:
            return TrialMeasure({}, full.kl, False, {"refused_by": ["kl"]})
        measured.append(mask.count)
        return full

    result = _search(model, [], trials=25, start_budgets={"neurons": [10, 60]})
    again = _search(model, [], trials=25, start_budgets={"neurons": [10, 60]}, evaluate=screened)
    refused = [p for p in again.points if not p.measured]
    assert refused, "no trial was over the limit: the test would pass without the screen"
    assert all(not p.within_limits and not p.pareto and p.effect == {} for p in refused)
    assert len(measured) == len({p.choice for p in again.points if p.measured})
    assert again.chosen is not None and again.chosen.measured
    # Within the limits the same points are measured the same way as without the screen.
    full = {p.choice: p.effect for p in result.points if p.within_limits}
    assert all(full[p.choice] == p.effect for p in again.points if p.measured and p.choice in full)
    # The saved result and its plot keep the refused trials.
    data = TradeoffResult.load_dict(again.save(tmp_path))
    assert sum(not point["effect"] for point in data["points"]) == len(refused)
    # A measure within the limits must carry the behaviour.
    with pytest.raises(ValueError, match="primary metric"):
        _search(model, [], trials=1, evaluate=lambda mask: TrialMeasure({}, 0.0, True))
