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
from hf_lrp_surgery.correction.behaviours import Behaviour, BehaviourMetadata
from hf_lrp_surgery.correction.paired import paired_contrast_sets
from hf_lrp_surgery.correction.search import FrontierPoint, GeneralBaseline, GeneralLimits, budget_search
from hf_lrp_surgery.evaluation import generate
from hf_lrp_surgery.exceptions import BudgetError
from hf_lrp_surgery.io import atomic_directory, check_output
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.layout import Granularity, Layout
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions, reject_unknown
from hf_lrp_surgery.plots import plot_frontier, plot_mask_per_layer
from hf_lrp_surgery.references import shipped_set
from hf_lrp_surgery.scoring import Scores
from hf_lrp_surgery.surgeon import Surgeon

__all__ = ["RecipeResult", "recipe_split", "run_recipe"]

_DEFAULT_LIMITS = GeneralLimits()


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
    """

    behaviour: str
    settings: dict[str, Any]
    reference_sizes: dict[str, int]
    frontier: list[FrontierPoint]
    chosen_budget: int
    heldout: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    behaviour_metadata: BehaviourMetadata | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form (``report.json``).

        Returns:
            The fields as plain data, plus ``hf_lrp_surgery_version``.
        """
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

    Example:
        >>> recipe_split(["a", "b", "c", "d", "e"])
        (['a', 'b', 'c'], ['d', 'e'])
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
    scoring: ScoringOptions | None = None,
    contrast: ContrastOptions | None = None,
    selection: SelectionOptions | None = None,
    focus: bool = True,
    limits: GeneralLimits = _DEFAULT_LIMITS,
    validation_share: float = 0.4,
    base_model_name_or_path: str | None = None,
    model_name: str | None = None,
    prompts: Mapping[str, Sequence[str]] | None = None,
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
        overwrite: Replace a non-empty ``output`` (checked before anything runs).
        progress: Show progress bars.
        **keywords: The fields of the three options (``method=``, ``objective=``, ``normalize=``,
            ``protect_top=``, ``granularity=``, ``scope=``, ``modules=``, ``batch_size=``, ...), which
            replace those of ``scoring`` / ``contrast`` / ``selection``.

    Returns:
        The :class:`RecipeResult` (also written to ``output/report.json``).

    Raises:
        OutputExistsError: ``output`` would replace something (see :func:`~hf_lrp_surgery.io.check_output`).
        BudgetError: A budget is not positive or exceeds the model's components of that granularity.
        ReferenceSetError: No attribution prompt got both an undesired and a desired continuation.
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
    check_output(output, overwrite=overwrite)
    _check_budgets(model, budgets, selection.granularity)
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
    if "validation" in prompt_sets:  # the user gave the validation split
        attribution_prompts, validation_prompts = list(prompt_sets["train"]), list(prompt_sets["validation"])
    else:
        attribution_prompts, validation_prompts = recipe_split(list(prompt_sets["train"]), validation_share)
    undesired, desired = paired_contrast_sets(
        model, tokenizer, attribution_prompts, behaviour, focus=focus, progress=progress
    )
    seconds["reference_sets"] = timer() - start

    start = timer()
    surgeon = Surgeon(model, tokenizer, batch_size=scoring.batch_size, progress=progress)
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
        general_texts=shipped_set("general_text", "train"),
        budgets=budgets,
        selection=selection,
        limits=limits,
        progress=progress,
    )
    seconds["budget_search"] = timer() - start

    start = timer()
    heldout_prompts = list(prompt_sets["heldout"])
    general = GeneralBaseline.of(
        model, tokenizer, shipped_set("neutral_prompts", "heldout"), shipped_set("general_text", "heldout")
    )
    before = behaviour.measure(generate(model, tokenizer, heldout_prompts, behaviour.decoding, progress=progress))
    heldout: dict[str, Any] = {"before": {**before, "perplexity": general.perplexity}}
    mask: Mask | None = None
    baked: CorrectedModel | None = None
    if chosen.budget > 0:
        mask = selection.select(scores, chosen.budget)
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
        **{key: value for key, value in selection.to_dict().items() if key != "layers"},
        **{key: value for key, value in scoring.to_dict().items() if key != "components"},
        **contrast.to_dict(),
        "focus": focus,
        "limits": asdict(limits),
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
        chosen.budget,
        heldout,
        seconds,
        behaviour.metadata,
    )
    _save(result, output, scores, mask, baked, model, tokenizer, base_model_name_or_path, behaviour, overwrite)
    return result


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
) -> None:
    with atomic_directory(output, overwrite=overwrite) as tmp:
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
