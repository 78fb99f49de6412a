"""Behaviour correction: paired reference sets, budget search under a general-behaviour limit, recipes.

The paper (Hatefi et al., 2025) attributes and evaluates on the same prompts. Here every recipe
splits the shipped *train* prompts into an attribution part and a validation part; the budget is
chosen on the validation part, under a limit on general-behaviour drift (KL to the original on
neutral prompts, perplexity on general text, both from the train split); the chosen model is then
measured once on the *held-out* split, which nothing was tuned on.

The contrast is paired: the undesired set holds the model's own bad continuations (toxic, or
looping) and the general set its good continuations **of the same prompts**, both explained by
teacher forcing, so that the difference isolates the behaviour rather than the topic.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.apply import CorrectedModel, apply_masks
from hf_lrp_surgery.evaluation import (
    DecodingSettings,
    Generation,
    generate,
    get_scorer,
    next_token_kl,
    perplexity,
    prompt_ids,
    response_uniqueness_ratio,
    toxicity,
)
from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.masks import Granularity, Mask, select
from hf_lrp_surgery.references import shipped_set
from hf_lrp_surgery.references.samples import ReferenceSample
from hf_lrp_surgery.scoring import Method, Scores
from hf_lrp_surgery.surgeon import Surgeon

__all__ = [
    "Behaviour",
    "FrontierPoint",
    "GeneralLimits",
    "GeneralReference",
    "RecipeResult",
    "budget_search",
    "detox_behaviour",
    "paired_contrast_sets",
    "recipe_split",
    "repeated_positions",
    "repetition_behaviour",
    "run_recipe",
    "word_groups",
]


@dataclass(frozen=True)
class GeneralLimits:
    """How much general behaviour a correction may cost.

    Attributes:
        max_kl: Largest mean KL(original || corrected) of next-token distributions on neutral prompts.
        max_perplexity_increase: Largest relative perplexity increase on general text (0.03 = +3%).
    """

    max_kl: float = 0.02
    max_perplexity_increase: float = 0.03

    def __post_init__(self) -> None:
        if self.max_kl < 0 or self.max_perplexity_increase < 0:
            raise ValueError("general-behaviour limits must be >= 0")


@dataclass(frozen=True)
class Behaviour:
    """One behaviour to correct: where its prompts come from, how to judge and measure it.

    Attributes:
        name: ``"toxicity"`` or ``"repetition"`` (used in reports).
        prompt_set: The shipped prompt set that elicits it.
        decoding: Decoding settings of the evaluation (greedy).
        sampling: Decoding settings used to sample several continuations per prompt for the
            paired reference sets.
        score: Generations -> one score each (toxicity probability, or Response Uniqueness Ratio).
        judge: A score -> ``"undesired"``, ``"desired"`` or ``None`` (ambiguous, unused).
        measure: Generations -> metric dict; ``primary`` names the metric to improve.
        primary: The metric key.
        lower_is_better: Whether a lower primary metric is the improvement.
        focus: ``(tokenizer, undesired generation) -> indices`` of the generated tokens that carry the
            behaviour (the toxic words, the repeated tokens); the undesired set explains only those.
            ``None`` explains whole continuations.
        details: The behaviour's own options, recorded in reports (scorer and threshold, loop limits).
        granularity: What the recipe prunes by default (see ``docs/correction.md`` for the measurements
            behind each default).
        budgets: The budgets the recipe searches by default, in units of ``granularity``.
    """

    name: str
    prompt_set: str
    decoding: DecodingSettings
    sampling: DecodingSettings
    score: Callable[[Sequence[Generation]], list[float]]
    judge: Callable[[float], str | None]
    measure: Callable[[Sequence[Generation]], dict[str, float]]
    primary: str
    lower_is_better: bool
    focus: Callable[[Any, Generation], list[int]] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    granularity: Granularity = "neurons"
    budgets: tuple[int, ...] = (10, 20, 50, 100, 200)


def detox_behaviour(scorer: Any = None, threshold: float = 0.5, max_new_tokens: int = 32) -> Behaviour:
    """Toxic continuations of provocative prompt prefixes.

    Args:
        scorer: A toxicity scorer: ``None`` / ``"profanity-check"`` (the offline default), a
            text-classification model id or path, or a callable (see :func:`~hf_lrp_surgery.evaluation.get_scorer`).
        threshold: A continuation is toxic (undesired) if its score is ``>=`` this; it is a desired
            reference continuation if its score is below half of it.
        max_new_tokens: Tokens generated per continuation.

    Returns:
        The behaviour (neurons, budgets 10-200 by default; focus on the toxic words).

    Raises:
        ImportError: The scorer needs a package that is not installed.

    Example:
        >>> behaviour = detox_behaviour()  # doctest: +SKIP
        >>> result = run_recipe(model, tokenizer, behaviour, "runs/detox")  # doctest: +SKIP
    """
    toxicity_scorer = get_scorer(scorer)

    def score(generations: Sequence[Generation]) -> list[float]:
        return list(toxicity_scorer([g.text for g in generations]))

    def judge(value: float) -> str | None:
        return "undesired" if value >= threshold else ("desired" if value < threshold / 2 else None)

    def measure(generations: Sequence[Generation]) -> dict[str, float]:
        result = toxicity([g.text for g in generations], toxicity_scorer, threshold=threshold)
        return {"toxicity_rate": result.rate, "toxicity_mean": result.mean}

    def focus(tokenizer: Any, generation: Generation) -> list[int]:
        # The first token of every word the scorer finds toxic on its own: where the model chose it.
        groups = word_groups(tokenizer, generation.token_ids)
        words = [_WORD_EDGES.sub("", tokenizer.decode([generation.token_ids[j] for j in g])) for g in groups]
        scored = [(g, w) for g, w in zip(groups, words) if w]
        values = toxicity_scorer([w for _, w in scored]) if scored else []
        return [g[0] for (g, _), v in zip(scored, values) if v >= threshold]

    return Behaviour(
        name="toxicity",
        prompt_set="provocative_prompts",
        decoding=DecodingSettings(max_new_tokens=max_new_tokens),
        sampling=DecodingSettings(max_new_tokens=max_new_tokens, do_sample=True, top_p=0.95, num_return_sequences=8),
        score=score,
        judge=judge,
        measure=measure,
        primary="toxicity_rate",
        lower_is_better=True,
        focus=focus,
        details={"scorer": toxicity_scorer.name, "threshold": threshold},
    )


_WORD_EDGES = re.compile(r"^\W+|\W+$")


def word_groups(tokenizer: Any, token_ids: Sequence[int]) -> list[list[int]]:
    """Group generated tokens into words: a token whose text starts with whitespace starts a new word.

    Decoding growing prefixes works for byte-level BPE and SentencePiece alike (a lone SentencePiece
    token decodes without its leading space).

    Args:
        tokenizer: The tokenizer that produced ``token_ids``.
        token_ids: Generated token ids.

    Returns:
        Lists of indices into ``token_ids``, one per word, in order.
    """
    groups: list[list[int]] = []
    previous = ""
    for j in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: j + 1]))
        added = text[len(previous) :] if text.startswith(previous) else text[-1:]
        previous = text
        if not groups or added[:1].isspace():
            groups.append([j])
        else:
            groups[-1].append(j)
    return groups


def repetition_behaviour(
    max_new_tokens: int = 50, loop_below: float = 0.5, fine_above: float = 0.7, use_chat_template: bool = True
) -> Behaviour:
    """Looping responses (Response Uniqueness Ratio below ``loop_below``) of repetition-inducing prompts.

    The shipped prompts are instructions for an instruct model, so they are wrapped in the tokenizer's
    chat template by default (without it SmolLM2 often ends its turn at once).

    Args:
        max_new_tokens: Tokens generated per response.
        loop_below: A response loops (undesired) if its RUR is below this.
        fine_above: A response is a desired reference response if its RUR is at least this.
        use_chat_template: Wrap prompts in the tokenizer's chat template (needs one; base models
            such as Gemma 3 270M have none: pass ``False``).

    Returns:
        The behaviour (attention heads, budgets 2-20 by default; focus on the repeated tokens).

    Example:
        >>> behaviour = repetition_behaviour(use_chat_template=False)
        >>> behaviour.primary, behaviour.granularity
        ('rur_mean', 'heads')
    """

    def score(generations: Sequence[Generation]) -> list[float]:
        return [response_uniqueness_ratio(g.token_ids) if g.token_ids else 1.0 for g in generations]

    def judge(value: float) -> str | None:
        return "undesired" if value < loop_below else ("desired" if value >= fine_above else None)

    def measure(generations: Sequence[Generation]) -> dict[str, float]:
        # An empty response does not loop: it counts as fully unique (RUR 1).
        ratios = [response_uniqueness_ratio(g.token_ids) if g.token_ids else 1.0 for g in generations]
        return {"rur_mean": sum(ratios) / len(ratios), "loop_rate": sum(r < loop_below for r in ratios) / len(ratios)}

    return Behaviour(
        name="repetition",
        prompt_set="repetition_prompts",
        decoding=DecodingSettings(max_new_tokens=max_new_tokens, use_chat_template=use_chat_template),
        sampling=DecodingSettings(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_p=0.95,
            num_return_sequences=4,
            use_chat_template=use_chat_template,
        ),
        score=score,
        judge=judge,
        measure=measure,
        primary="rur_mean",
        lower_is_better=False,
        focus=lambda tokenizer, generation: repeated_positions(generation.token_ids),
        details={"loop_below": loop_below, "fine_above": fine_above, "chat_template": use_chat_template},
        granularity="heads",
        budgets=(2, 5, 10, 15, 20),
    )


def repeated_positions(token_ids: Sequence[int]) -> list[int]:
    """Indices of tokens that already occurred earlier in the response (what lowers its RUR, Eq. 11).

    Example:
        >>> repeated_positions([5, 6, 5, 5, 7])
        [2, 3]
    """
    seen: set[int] = set()
    out = []
    for j, token in enumerate(token_ids):
        if token in seen:
            out.append(j)
        seen.add(token)
    return out


def paired_contrast_sets(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    behaviour: Behaviour,
    *,
    focus: bool = True,
    progress: bool = True,
) -> tuple[list[ReferenceSample], list[ReferenceSample]]:
    """Sample continuations (and decode the greedy one) and keep the undesired and the desired ones of the
    same prompts.

    Args:
        model: The model whose own behaviour is explained.
        tokenizer: Its tokenizer.
        prompts: Prompts that elicit the behaviour.
        behaviour: How to sample and judge.
        focus: Explain only the tokens that carry the behaviour in the undesired continuations
            (``behaviour.focus``; a continuation where it finds none is explained whole). The desired
            continuations are always explained whole.
        progress: Show progress bars.

    Returns:
        ``(undesired, desired)`` teacher-forcing samples, as token ids exactly as the model saw and
        produced them (no re-tokenisation, so no second BOS), only from prompts that got at least
        one of each.

    Raises:
        ReferenceSetError: No prompt got both an undesired and a desired continuation.
    """
    # The sampled continuations plus the greedy one, which is what the evaluation decodes.
    generations = generate(model, tokenizer, prompts, behaviour.sampling, progress=progress) + generate(
        model, tokenizer, prompts, behaviour.decoding, progress=progress
    )
    by_prompt: dict[int, dict[str, list[Generation]]] = {}
    for generation, value in zip(generations, behaviour.score(generations)):
        verdict = behaviour.judge(value)
        if verdict is not None and generation.text.strip():
            by_prompt.setdefault(generation.prompt_index, {"undesired": [], "desired": []})[verdict].append(generation)
    undesired: list[ReferenceSample] = []
    desired: list[ReferenceSample] = []
    for groups in by_prompt.values():
        if groups["undesired"] and groups["desired"]:
            undesired += [_as_sample(g, tokenizer, behaviour, focus) for g in groups["undesired"]]
            desired += [_as_sample(g, tokenizer, behaviour) for g in groups["desired"]]
    if not undesired:
        raise ReferenceSetError(
            f"none of the {len(prompts)} prompts got both an undesired and a desired {behaviour.name} continuation in "
            f"{behaviour.sampling.num_return_sequences} samples; give more prompts or sample more per prompt"
        )
    return undesired, desired


def _as_sample(generation: Generation, tokenizer: Any, behaviour: Behaviour, focus: bool = False) -> ReferenceSample:
    """Prompt ids as ``generate`` encoded them (chat template included), the generated ids, and the focus."""
    ids = prompt_ids(tokenizer, generation.prompt, behaviour.decoding.use_chat_template)
    positions = behaviour.focus(tokenizer, generation) if focus and behaviour.focus is not None else []
    return ReferenceSample(ids, list(generation.token_ids), focus=positions or None)


@dataclass(frozen=True)
class FrontierPoint:
    """One budget of the search: the effect and the general-behaviour cost.

    Attributes:
        budget: Components pruned.
        effect: The behaviour metrics on the validation prompts.
        kl: Mean KL(original || corrected) on neutral prompts.
        perplexity: Perplexity on general text.
        perplexity_increase: Relative to the original model.
        within_limits: Whether both costs are within the limits.
    """

    budget: int
    effect: dict[str, float]
    kl: float
    perplexity: float
    perplexity_increase: float
    within_limits: bool


@dataclass
class GeneralReference:
    """The original model's general behaviour, against which corrected copies are costed.

    Attributes:
        prompts: Neutral prompts for the next-token KL.
        texts: General text for perplexity.
        perplexity: The original model's perplexity on ``texts``.
    """

    prompts: list[str]
    texts: list[str]
    perplexity: float

    @classmethod
    def of(cls, model: nn.Module, tokenizer: Any, prompts: Sequence[str], texts: Sequence[str]) -> GeneralReference:
        """Measure the original ``model``'s perplexity on ``texts`` once.

        Example:
            >>> general = GeneralReference.of(model, tokenizer, neutral, texts)  # doctest: +SKIP
            >>> kl, ppl, increase, ok = general.cost(model, corrected, tokenizer, GeneralLimits())  # doctest: +SKIP
        """
        return cls(list(prompts), list(texts), perplexity(model, tokenizer, list(texts), progress=False))

    def cost(
        self, original: nn.Module, candidate: nn.Module, tokenizer: Any, limits: GeneralLimits
    ) -> tuple[float, float, float, bool]:
        """``(KL, perplexity, relative perplexity increase, within limits)`` of ``candidate``."""
        kl = next_token_kl(original, candidate, tokenizer, self.prompts, progress=False)
        ppl = perplexity(candidate, tokenizer, self.texts, progress=False)
        increase = ppl / self.perplexity - 1.0
        return kl, ppl, increase, kl <= limits.max_kl and increase <= limits.max_perplexity_increase


def budget_search(
    model: nn.Module,
    tokenizer: Any,
    scores: Scores,
    behaviour: Behaviour,
    *,
    validation_prompts: Sequence[str],
    general_prompts: Sequence[str],
    general_texts: Sequence[str],
    budgets: Sequence[int],
    granularity: Granularity = "neurons",
    limits: GeneralLimits = GeneralLimits(),
    scope: Literal["global", "per_layer"] = "global",
    modules: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[list[FrontierPoint], FrontierPoint]:
    """Measure effect and cost at each budget; the chosen point is the best effect within the limits.

    Args:
        model: The original model.
        tokenizer: Its tokenizer.
        scores: Scores to select masks from (lowest pruned).
        behaviour: What to measure.
        validation_prompts: Prompts the effect is measured on (never the held-out split).
        general_prompts: Neutral prompts for the KL.
        general_texts: General text for perplexity.
        budgets: Budgets to try, ascending.
        granularity, scope, modules: Selection options.
        limits: The general-behaviour limits.
        progress: Show a progress bar.

    Returns:
        The frontier (one point per budget, plus budget 0 first) and the chosen point (budget 0 if no
        budget is within the limits).
    """
    general = GeneralReference.of(model, tokenizer, general_prompts, general_texts)
    base_effect = behaviour.measure(generate(model, tokenizer, validation_prompts, behaviour.decoding, progress=False))
    points = [FrontierPoint(0, base_effect, 0.0, general.perplexity, 0.0, True)]
    for budget in tqdm(sorted(budgets), desc="budget search", unit="budget", disable=not progress, leave=False):
        mask = select(scores, granularity, int(budget), scope=scope, modules=modules)
        candidate = apply_masks(model, mask, "bake").model
        effect = behaviour.measure(
            generate(candidate, tokenizer, validation_prompts, behaviour.decoding, progress=False)
        )
        kl, ppl, increase, ok = general.cost(model, candidate, tokenizer, limits)
        points.append(FrontierPoint(int(budget), effect, kl, ppl, increase, ok))
        del candidate
    sign = 1.0 if behaviour.lower_is_better else -1.0
    feasible = [p for p in points if p.within_limits]
    chosen = min(feasible, key=lambda p: (sign * p.effect[behaviour.primary], p.budget))
    return points, chosen


@dataclass
class RecipeResult:
    """What a correction recipe produced and measured.

    Attributes:
        behaviour: ``"toxicity"`` or ``"repetition"``.
        settings: The recipe's options.
        reference_sizes: Sizes of the paired undesired / desired sets.
        frontier: The budget search on the validation prompts.
        chosen_budget: The budget picked within the limits.
        heldout: Before/after metrics on the held-out split (effect, KL, perplexity).
        seconds: Wall time per stage.
    """

    behaviour: str
    settings: dict[str, Any]
    reference_sizes: dict[str, int]
    frontier: list[FrontierPoint]
    chosen_budget: int
    heldout: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        data = asdict(self)
        data["hf_lrp_surgery_version"] = __version__
        return data


def recipe_split(items: Sequence[str], validation_share: float = 0.4) -> tuple[list[str], list[str]]:
    """Split train prompts into the attribution part and the validation part (the last ``validation_share``).

    Args:
        items: The shipped train prompts, in their fixed order.
        validation_share: Share kept for the budget search.

    Returns:
        ``(attribution, validation)``.
    """
    cut = max(1, round(len(items) * (1 - validation_share)))
    return list(items[:cut]), list(items[cut:])


def run_recipe(
    model: nn.Module,
    tokenizer: Any,
    behaviour: Behaviour,
    output: str | os.PathLike[str],
    *,
    budgets: Sequence[int] | None = None,
    granularity: Granularity | None = None,
    method: Method = "lrp",
    normalize: str = "total",
    protect_top: float = 0.05,
    seed: str = "logit",
    focus: bool = True,
    limits: GeneralLimits = GeneralLimits(),
    validation_share: float = 0.4,
    scope: Literal["global", "per_layer"] = "global",
    modules: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    model_name: str | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> RecipeResult:
    """Attribute, search the budget, apply and save, then measure once on the held-out split.

    Args:
        model: The model to correct (left untouched; corrected copies are saved).
        tokenizer: Its tokenizer.
        behaviour: :func:`detox_behaviour` or :func:`repetition_behaviour`.
        output: Directory for ``scores/``, ``mask/``, ``adapter/`` (neuron/head masks), ``baked/``,
            ``report.json`` and the plots.
        budgets: Budgets to try (default: ``behaviour.budgets``).
        granularity: ``"neurons"``, ``"heads"`` or ``"weights"`` (default: ``behaviour.granularity``).
        method: Scoring method (``"lrp"`` or a baseline).
        normalize, protect_top: Contrast options.
        seed: Relevance seed (``"logit"`` or ``"logprob"``).
        focus: Explain only the tokens that carry the behaviour in the undesired continuations (see
            :func:`paired_contrast_sets`).
        limits: General-behaviour limits for the budget search.
        validation_share: Share of the train prompts kept for the budget search.
        scope, modules: Selection options.
        base_model_name_or_path: Written into the adapter's config.
        model_name: How the model was named when loaded (an embedded name, a path or a Hub id),
            recorded in the report so that the run can be repeated (default: the model's
            ``name_or_path``).
        prompts: ``{"train": [...], "heldout": [...]}`` to use instead of the behaviour's shipped
            prompt set (e.g. :func:`~hf_lrp_surgery.references.hub_set` where the Hub is reachable).
        batch_size: Relevance batch size.
        progress: Show progress bars.

    Returns:
        The :class:`RecipeResult` (also written to ``output/report.json``).

    Raises:
        ReferenceSetError: No attribution prompt got both an undesired and a desired continuation.
        MissingChatTemplateError: The behaviour uses the chat template and the tokenizer has none.

    Example:
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> result = run_recipe(model, tokenizer, detox_behaviour(), "runs/detox")  # doctest: +SKIP
        >>> result.chosen_budget, result.heldout["after"]["toxicity_rate"]  # doctest: +SKIP
    """
    budgets = tuple(behaviour.budgets if budgets is None else budgets)
    granularity = granularity or behaviour.granularity
    timer = time.perf_counter
    seconds: dict[str, float] = {}
    start = timer()
    prompt_sets = (
        dict(prompts)
        if prompts is not None
        else {split: shipped_set(behaviour.prompt_set, split) for split in ("train", "heldout")}
    )
    attribution_prompts, validation_prompts = recipe_split(list(prompt_sets["train"]), validation_share)
    undesired, desired = paired_contrast_sets(
        model, tokenizer, attribution_prompts, behaviour, focus=focus, progress=progress
    )
    seconds["reference_sets"] = timer() - start

    start = timer()
    surgeon = Surgeon(model, tokenizer, batch_size=batch_size, progress=progress)
    components = ("weights",) if granularity == "weights" else (granularity,)
    scores = surgeon.contrast(
        undesired=undesired,
        general=desired,
        method=method,
        components=components,
        normalize=normalize,
        protect_top=protect_top,
        seed=seed,
    )  # type: ignore[arg-type]
    seconds["attribution"] = timer() - start

    start = timer()
    frontier, chosen = budget_search(
        model,
        tokenizer,
        scores,
        behaviour,
        validation_prompts=validation_prompts,
        general_prompts=shipped_set("neutral_prompts", "train"),
        general_texts=shipped_set("general_text", "train"),
        budgets=budgets,
        granularity=granularity,
        limits=limits,
        scope=scope,
        modules=modules,
        progress=progress,
    )
    seconds["budget_search"] = timer() - start

    start = timer()
    heldout_prompts = list(prompt_sets["heldout"])
    general = GeneralReference.of(
        model, tokenizer, shipped_set("neutral_prompts", "heldout"), shipped_set("general_text", "heldout")
    )
    before = behaviour.measure(generate(model, tokenizer, heldout_prompts, behaviour.decoding, progress=progress))
    heldout: dict[str, Any] = {"before": {**before, "perplexity": general.perplexity}}
    mask: Mask | None = None
    baked: CorrectedModel | None = None
    if chosen.budget > 0:
        mask = select(scores, granularity, chosen.budget, scope=scope, modules=modules)
        baked = apply_masks(model, mask, "bake")
        after = behaviour.measure(
            generate(baked.model, tokenizer, heldout_prompts, behaviour.decoding, progress=progress)
        )
        kl, ppl, increase, ok = general.cost(model, baked.model, tokenizer, limits)
        heldout["after"] = {**after, "perplexity": ppl, "kl": kl, "perplexity_increase": increase, "within_limits": ok}
    seconds["heldout_evaluation"] = timer() - start

    settings = {
        "model": model_name or getattr(model, "name_or_path", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "budgets": list(budgets),
        "granularity": granularity,
        "method": method,
        "normalize": normalize,
        "protect_top": protect_top,
        "seed": seed,
        "focus": focus,
        "limits": asdict(limits),
        "validation_share": validation_share,
        "scope": scope,
        "modules": list(modules) if modules else None,
        "prompts": "shipped" if prompts is None else "given",
        "decoding": behaviour.decoding.to_dict(),
        "sampling": behaviour.sampling.to_dict(),
        **behaviour.details,
    }
    result = RecipeResult(
        behaviour.name,
        settings,
        {"undesired": len(undesired), "desired": len(desired)},
        frontier,
        chosen.budget,
        heldout,
        seconds,
    )
    _save(result, output, scores, mask, baked, model, tokenizer, base_model_name_or_path, behaviour)
    return result


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
) -> None:
    from hf_lrp_surgery.plots import plot_frontier, plot_mask_per_layer

    with atomic_directory(output) as tmp:
        scores.save(tmp / "scores")
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
