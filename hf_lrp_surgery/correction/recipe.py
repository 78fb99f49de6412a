"""The correction recipe: paired sets, attribution, budget search, the corrected model and its report."""

from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.carriers import CorrectedModel, apply_masks
from hf_lrp_surgery.correction.behaviours import BEHAVIOURS, CHAT_TEMPLATE_OPTION, Behaviour, BehaviourMetadata
from hf_lrp_surgery.correction.paired import paired_contrast_sets
from hf_lrp_surgery.correction.search import FrontierPoint, GeneralBaseline, GeneralCost, GeneralLimits, budget_search
from hf_lrp_surgery.correction.tradeoff import ScoreKey, TradeoffResult, TradeoffSpace, TrialMeasure, tradeoff_search
from hf_lrp_surgery.evaluation import generate, wilson_interval
from hf_lrp_surgery.exceptions import BudgetError
from hf_lrp_surgery.io import atomic_directory, check_output
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.layout import Granularity, Layout
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions, reject_unknown
from hf_lrp_surgery.plots import plot_frontier, plot_mask_per_layer
from hf_lrp_surgery.references import general_texts, shipped_set
from hf_lrp_surgery.references.samples import ReferenceSample
from hf_lrp_surgery.scoring import Scores, get_scorer
from hf_lrp_surgery.surgeon import Surgeon

__all__ = ["SIDE_EFFECT_BEHAVIOURS", "RecipeResult", "recipe_split", "run_recipe", "side_effect_behaviours"]

_DEFAULT_LIMITS = GeneralLimits()

#: The shipped behaviours every recipe measures before and after as side effects (except its own).
SIDE_EFFECT_BEHAVIOURS = ("toxicity", "repetition")
#: Sequences of the induction probe, and its seeds: the search's and the held-out measurement's differ.
_INDUCTION_SEQUENCES = 16
_SEARCH_SEED, _HELDOUT_SEED = 0, 1


@dataclass
class RecipeResult:
    """What a correction recipe produced and measured.

    Attributes:
        behaviour: The behaviour's name (``"toxicity"``, ``"repetition"``).
        settings: The recipe's options.
        reference_sizes: Sizes of the paired undesired / desired sets.
        frontier: The budget search on the validation prompts.
        chosen_budget: The budget picked within the limits.
        heldout: Before/after metrics on the held-out split (effect, KL, perplexity).
        seconds: Wall time per stage.
        behaviour_metadata: The behaviour's tags, command, goal and metrics, which the model card reads
            (``None`` in results made by hand: the card then looks the behaviour up by name).
        side_effects: Other behaviours measured before and after on their own held-out prompts: name ->
            ``{"prompt_set", "split", "prompts", "decoding", "metrics", "before", "after"}`` (``after`` only
            when a budget was chosen).
        tradeoff: The trade-off search (``TradeoffResult.to_dict()``), when the recipe ran one instead of
            the budget search; ``None`` otherwise.
    """

    behaviour: str
    settings: dict[str, Any]
    reference_sizes: dict[str, int]
    frontier: list[FrontierPoint]
    chosen_budget: int
    heldout: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    behaviour_metadata: BehaviourMetadata | None = None
    side_effects: dict[str, Any] = field(default_factory=dict)
    tradeoff: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form (``report.json``).

        Returns:
            The fields as plain data, plus ``hf_lrp_surgery_version``.
        """
        data = asdict(self)
        data["hf_lrp_surgery_version"] = __version__
        return data


def recipe_split(
    items: Sequence[str] | Mapping[str, Sequence[str]], validation_share: float = 0.4
) -> tuple[list[str], list[str]]:
    """The attribution part and the validation part (the budget search's) of a behaviour's train prompts.

    Args:
        items: The train prompts in their fixed order (the last ``validation_share`` become the validation
            part), or a mapping of splits (as :func:`~hf_lrp_surgery.references.shipped_splits` gives):
            its ``"train"`` and ``"validation"`` lists as they are where it has both, else its ``"train"``
            list split.
        validation_share: Share of the train prompts kept for the budget search (when no validation split
            is given).

    Returns:
        ``(attribution, validation)``.

    Example:
        >>> recipe_split(["a", "b", "c", "d", "e"])
        (['a', 'b', 'c'], ['d', 'e'])
        >>> recipe_split({"train": ["a", "b"], "validation": ["c"], "heldout": ["d"]})
        (['a', 'b'], ['c'])
    """
    if isinstance(items, Mapping):
        if "validation" in items:
            return list(items["train"]), list(items["validation"])
        items = items["train"]
    cut = max(1, round(len(items) * (1 - validation_share)))
    return list(items[:cut]), list(items[cut:])


def side_effect_behaviours(behaviour: Behaviour, tokenizer: Any) -> list[Behaviour]:
    """The shipped behaviours a recipe for ``behaviour`` measures as side effects, with their defaults.

    Every behaviour of :data:`SIDE_EFFECT_BEHAVIOURS` but ``behaviour`` itself: detox measures
    repetition, the repetition fix measures toxicity, any other behaviour (e.g. contact details)
    both. A behaviour that takes the chat-template switch uses plain prompts where the tokenizer has no
    chat template.

    Args:
        behaviour: The behaviour being corrected.
        tokenizer: The model's tokenizer.

    Returns:
        The behaviours, built with their factories' defaults (the offline toxicity scorer).

    Example:
        >>> [b.name for b in side_effect_behaviours(detox_behaviour(), tokenizer)]  # doctest: +SKIP
        ['repetition']
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    found = []
    for name in SIDE_EFFECT_BEHAVIOURS:
        entry = BEHAVIOURS.get(name)
        if entry is None or name == behaviour.name:
            continue
        plain = CHAT_TEMPLATE_OPTION in entry.metadata.options and not templated
        found.append(entry.factory(**({CHAT_TEMPLATE_OPTION.parameter: False} if plain else {})))
    return found


def _with_intervals(figures: dict[str, Any], behaviour: Behaviour, count: int) -> dict[str, Any]:
    """``figures`` with the Wilson interval (``<key>_ci``) of every metric of ``behaviour`` that is a share."""
    out = dict(figures)
    for metric in behaviour.metadata.metrics:
        value = out.get(metric.key)
        if metric.share and isinstance(value, (int, float)) and count > 0:
            out[f"{metric.key}_ci"] = list(wilson_interval(round(value * count), count))
    return out


def _measure(
    model: nn.Module, tokenizer: Any, behaviour: Behaviour, prompts: Sequence[str], progress: bool
) -> dict[str, Any]:
    """The behaviour's metrics (with intervals) on ``prompts`` under its evaluation decoding."""
    generations = generate(model, tokenizer, prompts, behaviour.decoding, progress=progress)
    return _with_intervals(behaviour.measure(generations), behaviour, len(generations))


def run_recipe(
    model: nn.Module,
    tokenizer: Any,
    behaviour: Behaviour,
    output: str | os.PathLike[str],
    *,
    budgets: Sequence[int] | None = None,
    scoring: ScoringOptions | None = None,
    contrast: ContrastOptions | None = None,
    selection: SelectionOptions | None = None,
    focus: bool = True,
    limits: GeneralLimits = _DEFAULT_LIMITS,
    validation_share: float = 0.4,
    base_model_name_or_path: str | None = None,
    model_name: str | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
    general_passages: int | None = 5,
    side_effects: Sequence[Behaviour] | None = None,
    side_effect_prompts: int = 20,
    search: TradeoffSpace | None = None,
    trials: int = 24,
    search_seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **keywords: Any,
) -> RecipeResult:
    """Attribute, search the budget, apply and save, then measure once on the held-out split.

    Args:
        model: The model to correct (left untouched; corrected copies are saved).
        tokenizer: Its tokenizer.
        behaviour: A registered behaviour, e.g. :func:`detox_behaviour` or :func:`repetition_behaviour`.
        output: Directory for ``scores/``, ``mask/``, ``adapter/`` (neuron/head masks), ``baked/``,
            ``report.json`` and the plots.
        budgets: Budgets to try (default: ``behaviour.budgets``), checked against the model's
            component count before anything runs.
        scoring: How to score (method, objective, batch size, ...; the components are the selection's
            granularity).
        contrast: How to contrast the undesired and the desired set.
        selection: What to prune (default granularity: ``behaviour.granularity``).
        focus: Explain only the tokens that carry the behaviour in the undesired continuations (see
            :func:`paired_contrast_sets`).
        limits: General-behaviour limits for the budget search.
        validation_share: Share of the train prompts kept for the budget search.
        base_model_name_or_path: Written into the adapter's config.
        model_name: How the model was named when loaded (an embedded name, a path or a Hub id),
            recorded in the report so that the run can be repeated (default: the model's
            ``name_or_path``).
        prompts: ``{"train": [...], "heldout": [...]}`` (optionally ``"validation"``, which then replaces the
            split of ``train``) to use instead of the behaviour's own prompts or shipped prompt set (e.g.
            :func:`~hf_lrp_surgery.references.hub_set` where the Hub is reachable).
        general_passages: Passages per general-text domain in the budget search (the first ones of each
            domain's train split; ``None``: all); the held-out measurement always uses every held-out passage.
            With 5 (and the 16-sequence induction probe), the general cost of one budget point on
            SmolLM2-135M on one CPU thread is 45 s instead of the 21 s of KL plus all 24 prose passages.
        side_effects: Other behaviours to measure before and after on their held-out prompts (default:
            :func:`side_effect_behaviours`; ``()``: none).
        side_effect_prompts: Held-out prompts per side-effect behaviour (the first ones; greedy).
        search: Run the trade-off search over this space (methods x granularities x budgets x contrast
            options; see :mod:`~hf_lrp_surgery.correction.tradeoff`) instead of the budget search of one
            method: every trial is measured on the validation prompts (behaviour and KL), the best ones
            within the KL limit are confirmed against every limit (perplexity per domain, induction probe),
            best first, and the first that passes is chosen. ``budgets``, ``scoring.method``,
            ``selection.granularity`` and ``contrast`` then only fill what the space leaves open.
        trials: Trials of the trade-off search.
        search_seed: Its sampler's seed.
        overwrite: Replace a non-empty ``output`` (checked before anything runs).
        progress: Show progress bars.
        **keywords: The fields of the three options (``method=``, ``objective=``, ``normalize=``,
            ``protect_top=``, ``granularity=``, ``scope=``, ``modules=``, ``batch_size=``, ...), which
            replace those of ``scoring`` / ``contrast`` / ``selection``.

    General behaviour (the limits of the search, and the held-out figures) is the KL on neutral
    prompts, perplexity on every general-text domain (:func:`~hf_lrp_surgery.references.general_texts`)
    and the induction probe (16 random sequences of 50 tokens shown twice; seed 0 in the search, seed 1
    held out); see :class:`~hf_lrp_surgery.correction.search.GeneralBaseline`.

    Returns:
        The :class:`RecipeResult` (also written to ``output/report.json``).

    Raises:
        OutputExistsError: ``output`` would replace something (see :func:`~hf_lrp_surgery.io.check_output`).
        BudgetError: A budget is not positive or exceeds the model's components of that granularity.
        ReferenceSetError: No attribution prompt got both an undesired and a desired continuation.
        ValueError: ``general_passages`` or ``side_effect_prompts`` is not a count >= 1.
        MissingChatTemplateError: The behaviour uses the chat template and the tokenizer has none.

    Example:
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> result = run_recipe(model, tokenizer, detox_behaviour(), "runs/detox")  # doctest: +SKIP
        >>> result.chosen_budget, result.heldout["after"]["toxicity_rate"]  # doctest: +SKIP
    """
    budgets = tuple(behaviour.budgets if budgets is None else budgets)
    if keywords.get("granularity") is None:
        keywords.pop("granularity", None)
    selection = SelectionOptions.take(selection, keywords, granularity=behaviour.granularity)
    scoring = replace(ScoringOptions.take(scoring, keywords), components=(selection.granularity,))
    contrast = ContrastOptions.take(contrast, keywords)
    reject_unknown(keywords, "run_recipe")
    if isinstance(side_effect_prompts, bool) or not isinstance(side_effect_prompts, int) or side_effect_prompts < 1:
        raise ValueError(f"side_effect_prompts must be a count >= 1, got {side_effect_prompts!r}")
    if general_passages is not None and (
        isinstance(general_passages, bool) or not isinstance(general_passages, int) or general_passages < 1
    ):
        raise ValueError(f"general_passages must be a count >= 1 or None, got {general_passages!r}")
    search_texts = general_texts("train", per_domain=general_passages)
    check_output(output, overwrite=overwrite)
    if search is None:
        _check_budgets(model, budgets, selection.granularity)
    else:
        for granularity, (_, highest) in search.budgets.items():
            _check_budgets(model, [highest], granularity)  # type: ignore[arg-type]
    timer = time.perf_counter
    seconds: dict[str, float] = {}
    start = timer()
    prompt_sets = (
        dict(prompts)
        if prompts is not None
        else {split: behaviour.prompts_for(split) for split in ("train", "heldout")}
    )
    if prompts is None and behaviour.prompts is not None and "validation" in behaviour.prompts:
        prompt_sets["validation"] = behaviour.prompts_for("validation")
    attribution_prompts, validation_prompts = recipe_split(prompt_sets, validation_share)
    undesired, desired = paired_contrast_sets(
        model, tokenizer, attribution_prompts, behaviour, focus=focus, progress=progress
    )
    seconds["reference_sets"] = timer() - start

    surgeon = Surgeon(model, tokenizer, batch_size=scoring.batch_size, progress=progress)
    tradeoff: TradeoffResult | None = None
    if search is None:
        start = timer()
        scores = surgeon.contrast(undesired=undesired, general=desired, options=scoring, contrast_options=contrast)
        seconds["attribution"] = timer() - start

        start = timer()
        frontier, chosen = budget_search(
            model,
            tokenizer,
            scores,
            behaviour,
            validation_prompts=validation_prompts,
            general_prompts=shipped_set("neutral_prompts", "train"),
            general_texts=search_texts,
            budgets=budgets,
            selection=selection,
            limits=limits,
            induction_sequences=_INDUCTION_SEQUENCES,
            progress=progress,
        )
        chosen_budget = chosen.budget
        seconds["budget_search"] = timer() - start
    else:
        start = timer()
        tradeoff, frontier, score_of = _tradeoff(
            model,
            tokenizer,
            behaviour,
            surgeon,
            (undesired, desired),
            search,
            scoring=scoring,
            selection=selection,
            limits=limits,
            validation_prompts=validation_prompts,
            general_texts=search_texts,
            trials=trials,
            seed=search_seed,
            progress=progress,
        )
        seconds["tradeoff_search"] = timer() - start
        seconds["attribution"] = sum(score_of.seconds.values())
        chosen_budget = 0 if tradeoff.chosen is None else tradeoff.chosen.choice.budget
        picked = tradeoff.chosen.choice if tradeoff.chosen is not None else None
        if picked is not None:
            scoring = replace(scoring, method=picked.method, components=(picked.granularity,))
            selection = replace(selection, granularity=picked.granularity, dampen=picked.dampen)
            contrast = picked.contrast
        scores = score_of(ScoreKey(scoring.method, selection.granularity), contrast)

    start = timer()
    heldout_prompts = list(prompt_sets["heldout"])
    general = GeneralBaseline.of(
        model,
        tokenizer,
        shipped_set("neutral_prompts", "heldout"),
        general_texts("heldout"),
        induction_sequences=_INDUCTION_SEQUENCES,
        induction_seed=_HELDOUT_SEED,
        progress=progress,
    )
    unchanged = general.unchanged().figures()
    general_before = {k: v for k, v in unchanged.items() if k.startswith(("perplexity", "induction_"))}
    for key in ("perplexity_increase", "perplexity_increases", "induction_increase"):
        general_before.pop(key, None)
    before = _measure(model, tokenizer, behaviour, heldout_prompts, progress)
    if behaviour.protocol is not None:
        before.update(behaviour.protocol(model, tokenizer, heldout_prompts, progress))
    heldout: dict[str, Any] = {"before": {**before, **general_before}}
    mask: Mask | None = None
    baked: CorrectedModel | None = None
    if chosen_budget > 0:
        mask = selection.select(scores, chosen_budget)
        baked = apply_masks(model, mask, "bake")
        after = _measure(baked.model, tokenizer, behaviour, heldout_prompts, progress)
        if behaviour.protocol is not None:
            after.update(behaviour.protocol(baked.model, tokenizer, heldout_prompts, progress))
        cost = general.cost(model, baked.model, tokenizer, limits, progress=progress)
        heldout["after"] = {**after, **cost.figures()}
    seconds["heldout_evaluation"] = timer() - start

    start = timer()
    side_effect_results: dict[str, Any] = {}
    for other in side_effect_behaviours(behaviour, tokenizer) if side_effects is None else side_effects:
        other_prompts = other.prompts_for("heldout")[:side_effect_prompts]
        block: dict[str, Any] = {
            "prompt_set": other.prompt_set,
            "split": "heldout",
            "prompts": len(other_prompts),
            "decoding": other.decoding.to_dict(),
            "metrics": [asdict(m) for m in other.metadata.metrics],
            "before": _measure(model, tokenizer, other, other_prompts, progress),
        }
        if baked is not None:
            block["after"] = _measure(baked.model, tokenizer, other, other_prompts, progress)
        side_effect_results[other.name] = block
    seconds["side_effects"] = timer() - start

    settings = {
        "model": model_name or getattr(model, "name_or_path", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "budgets": list(budgets) if search is None else None,
        "search": None if search is None else {"space": search.to_dict(), "trials": trials, "seed": search_seed},
        **{key: value for key, value in selection.to_dict().items() if key != "layers"},
        **{key: value for key, value in scoring.to_dict().items() if key != "components"},
        **contrast.to_dict(),
        "focus": focus,
        "limits": asdict(limits),
        "general_passages": general_passages,
        "induction_probe": {
            "sequences": _INDUCTION_SEQUENCES,
            "length": general.induction.length if general.induction else None,
            "search_seed": _SEARCH_SEED,
            "heldout_seed": _HELDOUT_SEED,
        },
        "side_effect_prompts": side_effect_prompts,
        "validation_share": validation_share,
        "prompts": "given" if prompts is not None else ("shipped" if behaviour.prompts is None else "behaviour"),
        "decoding": behaviour.decoding.to_dict(),
        "sampling": behaviour.sampling.to_dict(),
        **behaviour.details,
    }
    result = RecipeResult(
        behaviour.name,
        settings,
        {"undesired": len(undesired), "desired": len(desired)},
        frontier,
        chosen_budget,
        heldout,
        seconds,
        behaviour.metadata,
        side_effect_results,
        None if tradeoff is None else tradeoff.to_dict(),
    )
    _save(
        result, output, scores, mask, baked, model, tokenizer, base_model_name_or_path, behaviour, overwrite, tradeoff
    )
    return result


class _ScoreCache:
    """Contrasted scores per method and contrast; each method's relevance of every searched granularity is one pass
    per set, computed once."""

    def __init__(
        self,
        surgeon: Surgeon,
        sets: tuple[list[ReferenceSample], list[ReferenceSample]],
        scoring: ScoringOptions,
        granularities: Sequence[Granularity],
    ) -> None:
        self.surgeon, self.sets, self.scoring, self.granularities = surgeon, sets, scoring, tuple(granularities)
        self.per_set: dict[str, tuple[Scores, Scores] | Scores] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, key: ScoreKey, contrast: ContrastOptions) -> Scores:
        undesired, desired = self.sets
        entry = get_scorer(key.method)
        components = tuple(g for g in self.granularities if g in entry.components)
        options = replace(self.scoring, method=key.method, components=components)
        if key.method not in self.per_set:
            started = time.perf_counter()
            if entry.paired or not entry.needs_samples:  # its own contrast, or nothing to contrast
                self.per_set[key.method] = self.surgeon.contrast(undesired=undesired, general=desired, options=options)
            else:
                self.per_set[key.method] = (
                    self.surgeon.attribute(desired, options, description=f"{key.method} (general)"),
                    self.surgeon.attribute(undesired, options, description=f"{key.method} (undesired)"),
                )
            self.seconds[key.method] = time.perf_counter() - started
        cached = self.per_set[key.method]
        if isinstance(cached, Scores):
            return cached
        general, bad = cached
        return self.surgeon.contrast(undesired=bad, general=general, options=options, contrast_options=contrast)


def _tradeoff(
    model: nn.Module,
    tokenizer: Any,
    behaviour: Behaviour,
    surgeon: Surgeon,
    sets: tuple[list[ReferenceSample], list[ReferenceSample]],
    space: TradeoffSpace,
    *,
    scoring: ScoringOptions,
    selection: SelectionOptions,
    limits: GeneralLimits,
    validation_prompts: Sequence[str],
    general_texts: Mapping[str, Sequence[str]],
    trials: int,
    seed: int,
    progress: bool,
) -> tuple[TradeoffResult, list[FrontierPoint], _ScoreCache]:
    """The trade-off search of :func:`run_recipe`: cheap trials (behaviour, KL, induction probe), then confirmed."""
    general = GeneralBaseline.of(
        model,
        tokenizer,
        shipped_set("neutral_prompts", "train"),
        general_texts,
        induction_sequences=_INDUCTION_SEQUENCES,
        induction_seed=_SEARCH_SEED,
    )
    base_effect = behaviour.measure(generate(model, tokenizer, validation_prompts, behaviour.decoding, progress=False))
    costs: list[GeneralCost] = []

    def evaluate(mask: Mask) -> TrialMeasure:
        candidate = apply_masks(model, mask, "bake").model
        # KL and the induction probe are cheap: every trial is held to them first, so the sampler learns where
        # copying breaks, and a correction they refuse costs no generation (most of a trial's time).
        kl, rise, exceeded = general.screen(model, candidate, tokenizer, limits)
        details: dict[str, Any] = {} if rise is None else {"induction_increase": rise}
        if exceeded:
            return TrialMeasure({}, kl, False, {**details, "refused_by": list(exceeded)})
        effect = behaviour.measure(
            generate(candidate, tokenizer, validation_prompts, behaviour.decoding, progress=False)
        )
        return TrialMeasure(effect, kl, True, details)

    def confirm(mask: Mask) -> TrialMeasure:
        cost = general.cost(model, apply_masks(model, mask, "bake").model, tokenizer, limits)
        costs.append(cost)
        return TrialMeasure({}, cost.kl, cost.within_limits, cost.figures())

    score_of = _ScoreCache(surgeon, sets, scoring, space.granularities)
    start_budgets: dict[str, list[int]] = {behaviour.granularity: [behaviour.budgets[0]]}
    result = tradeoff_search(
        space,
        score_of,
        evaluate,
        primary=behaviour.primary,
        lower_is_better=behaviour.lower_is_better,
        baseline=base_effect,
        confirm=confirm,
        trials=trials,
        seed=seed,
        selection=selection,
        start_budgets=start_budgets,
        progress=progress,
    )
    frontier = [FrontierPoint.of(0, base_effect, general.unchanged())]
    effects = {p.choice: p.effect for p in result.points}
    frontier += [FrontierPoint.of(c.budget, effects[c], cost) for c, cost in zip(result.confirmed, costs)]
    return result, frontier, score_of


def _check_budgets(model: nn.Module, budgets: Sequence[int], granularity: Granularity) -> None:
    """Refuse budgets the model cannot have before the expensive steps (the selection checks them again)."""
    arch = resolve(model)
    units = Layout.of(arch).units(granularity, arch)
    for value in budgets:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < int(value) <= units:
            raise BudgetError(
                f"budget {value!r} is not a count in 1..{units} (the model's {granularity}); give budgets in that range"
            )


def _save(
    result: RecipeResult,
    output: str | os.PathLike[str],
    scores: Scores,
    mask: Mask | None,
    baked: CorrectedModel | None,
    model: nn.Module,
    tokenizer: Any,
    base_model_name_or_path: str | None,
    behaviour: Behaviour,
    overwrite: bool,
    tradeoff: TradeoffResult | None = None,
) -> None:
    with atomic_directory(output, overwrite=overwrite) as tmp:
        scores.save(tmp / "scores")
        if tradeoff is not None:
            tradeoff.save(tmp)
        (tmp / "report.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        plot_frontier(result.frontier, behaviour.primary, tmp / "effect_vs_budget.png", chosen=result.chosen_budget)
        if mask is not None and baked is not None:
            mask.save(tmp / "mask")
            plot_mask_per_layer(mask, tmp / "mask_per_layer.png")
            baked.save(tmp / "baked", tokenizer=tokenizer)
            if mask.granularity != "weights":  # weight masks have no adapter form
                apply_masks(model, mask, "adapter").save(
                    tmp / "adapter", tokenizer=tokenizer, base_model_name_or_path=base_model_name_or_path
                )
