"""Model cards for corrected models: Hub metadata, results before and after, what was pruned, how to load it.

A card is a pure function of a saved corrected model directory (see :func:`~hf_lrp_surgery.carriers.save_corrected`):
the masks and the check record in ``surgery/``, plus what :func:`write_card` copies there, namely the
recipe's ``report.json``, its plots and the card's own options (``surgery/card.json``). So a push
can rebuild the card with the final repo id without losing anything, and the numbers on the card
travel with the model.

The metadata is built with ``huggingface_hub.ModelCardData``: ``base_model`` and
``base_model_relation`` (``adapter`` for the IA3 form, ``finetune`` for baked weights), tags
(``hf-lrp-surgery``, ``lrp``, ``pruning`` and the behaviour's, e.g. ``detoxification``) and a
``model-index`` with the held-out results of the corrected model and of the base model before
surgery (``config: before``), each with the shipped set and split it was measured on.

Everything behaviour-specific (tags, goal, metric names, the scorer sentence, the recipe command
and its options) comes from the report's ``behaviour_metadata``
(:class:`~hf_lrp_surgery.correction.BehaviourMetadata`); a report written before reports carried it
is read with the registered behaviour of its name.

PEFT's ``save_pretrained`` writes its own README (a template full of "More Information Needed").
:func:`write_card` runs after it: it keeps PEFT's metadata (``library_name``), drops its template
text and the ``base_model:*`` tags the Hub derives itself, and keeps any text a person wrote.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_lrp_surgery._deprecation import moved_names
from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.carriers import CHECK_FILE, SURGERY_DIR, CarrierCard, get_carrier, read_surgery
from hf_lrp_surgery.correction import BEHAVIOURS, GENERAL_METRICS, Metric, behaviour_metadata
from hf_lrp_surgery.correction.tradeoff import spell_dampening
from hf_lrp_surgery.exceptions import CardError
from hf_lrp_surgery.io import write_json_atomic, write_text_atomic
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.models import EMBEDDED_MODELS

__all__ = ["CARD_MARKER", "CardError", "build_card", "card_from_recipe", "is_hub_id", "write_card"]

#: First line of every card body this module writes (how a later write recognises its own card).
CARD_MARKER = "<!-- hf_lrp_surgery model card -->"
_KEPT_START = "<!-- kept from the previous README -->"
_KEPT_END = "<!-- end of the text kept from the previous README -->"
_CARD_OPTIONS = "card.json"
_REPORT = "report.json"
_PLOTS = ("effect_vs_budget.png", "mask_per_layer.png", "tradeoff.png")
_BASE_TAGS = ["hf-lrp-surgery", "lrp", "pruning"]
_PACKAGES = ("hf-lrp-surgery", "torch", "transformers", "peft", "huggingface_hub", "safetensors")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PLACEHOLDER_REPO = "<namespace>/<repo-name>"
# Metadata this module derives; an earlier README's values for them are never carried over.
_GENERATED_KEYS = ("base_model", "base_model_relation", "model-index", "model_name", "eval_results")


# -- inputs -----------------------------------------------------------------------------------
def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repo id rather than a local path."""
    return bool(name) and _REPO_ID.match(str(name)) is not None and not Path(str(name)).exists()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CardError(f"{path} is not readable JSON ({err}); write it again or remove it") from err
    if not isinstance(data, dict):
        raise CardError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = __version__ if package == "hf-lrp-surgery" else "not installed"
    return found


# -- sections ---------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics(report: Mapping[str, Any]) -> dict[str, tuple[Metric, str]]:
    """Metric key -> (the metric, the shipped set it is measured on): the behaviour's (search metrics, then
    held-out-only ones such as the RealToxicityPrompts protocol's), then the general ones."""
    metadata = behaviour_metadata(report)
    own = (*metadata.metrics, *metadata.heldout_metrics) if metadata else ()
    prompt_set = metadata.prompt_set if metadata else f"{report.get('behaviour')}_prompts"
    return {m.key: (m, m.dataset or prompt_set) for m in (*own, *GENERAL_METRICS)}


def _eval_results(report: Mapping[str, Any]) -> list[EvalResult]:
    metrics = _metrics(report)
    heldout = report.get("heldout", {})
    results = []
    for state, label in (("after", None), ("before", "before")):
        for key, value in heldout.get(state, {}).items():
            if key not in metrics or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, shipped = metrics[key]
            name = metric.title + (" (base model, before surgery)" if label else "")
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text generation",
                    dataset_type=f"hf_lrp_surgery/{shipped}",
                    dataset_name=f"hf_lrp_surgery {shipped}",
                    dataset_split="heldout",
                    metric_type=key,
                    metric_name=name,
                    metric_value=float(value),
                    metric_config=label,
                )
            )
    return results


def _results_section(report: Mapping[str, Any], plots: Sequence[str]) -> list[str]:
    before, after = report.get("heldout", {}).get("before", {}), report.get("heldout", {}).get("after", {})
    given = report.get("settings", {}).get("prompts") == "given"
    where = (
        "of the user-given behaviour prompts (general text and neutral prompts: the sets shipped with `hf_lrp_surgery`)"
        if given
        else "of the sets shipped with `hf_lrp_surgery`"
    )
    lines = [
        "## Results",
        "",
        f"Measured once on the held-out split {where}, which nothing was "
        "tuned on (the budget was chosen on validation prompts from the train split).",
        "",
        "| metric | measured on (held-out) | base model | corrected | change |",
        "|---|---|---|---|---|",
    ]
    for key, (metric, shipped) in _metrics(report).items():
        if key not in before and key not in after:
            continue
        lines.append(_result_row(metric, f"`{shipped}`", before, after, key))
    settings = report.get("settings", {})
    limits, decoding = settings.get("limits", {}), settings.get("decoding", {})
    lines += [""]
    if decoding:
        sampled = "sampled" if decoding.get("do_sample") else "greedy"
        lines.append(
            f"Generations: {sampled}, {decoding.get('max_new_tokens')} new tokens"
            f"{', chat template' if decoding.get('use_chat_template') else ''}."
        )
    metadata = behaviour_metadata(report)
    scorer = metadata.describe_scorer(settings) if metadata else None
    if scorer:
        lines.append(scorer)
    if any(key.endswith("_ci") for key in (*before, *after)):
        lines.append("Figures in brackets are 95% confidence intervals.")
    if "induction_loss" in before or "induction_loss" in after:
        probe = settings.get("induction_probe", {})
        lines.append(
            f"Induction probe: {probe.get('sequences', 16)} random token sequences of {probe.get('length', 50)} "
            "tokens, each shown twice; the loss on the second copy measures in-context copying (it must not rise), "
            "the first copy's is unpredictable by design."
        )
    if limits:
        induction = limits.get("max_induction_increase")
        lines.append(
            f"General-behaviour limits of the budget search: KL <= {limits.get('max_kl')}, perplexity "
            f"+<= {100 * float(limits.get('max_perplexity_increase', 0)):.3g}%"
            f"{' on every general-text domain' if induction is not None else ''}"
            f"{f', induction second-copy loss +<= {induction} nats' if induction is not None else ''}; "
            + (
                f"chosen budget {report.get('chosen_budget')} of {settings.get('budgets')}."
                if not report.get("tradeoff")
                else "the point was chosen by the trade-off search below."
            )
        )
    if "effect_vs_budget.png" in plots and not report.get("tradeoff"):
        lines += ["", "![Effect and general-behaviour cost per budget](surgery/effect_vs_budget.png)"]
    lines += _tradeoff_section(report, "tradeoff.png" in plots)
    lines += _side_effects_section(report)
    return lines + [""]


def _cell(figures: Mapping[str, Any], key: str, default: Any = None) -> str:
    value = figures.get(key, default)
    if value is None:
        return "-"
    interval = figures.get(f"{key}_ci")
    if isinstance(interval, Sequence) and len(interval) == 2 and not isinstance(interval, str):
        return f"{_fmt(value)} [{_fmt(float(interval[0]))}, {_fmt(float(interval[1]))}]"
    return _fmt(value)


def _result_row(metric: Metric, where: str, before: Mapping[str, Any], after: Mapping[str, Any], key: str) -> str:
    """One table row: base model, corrected, change (better/worse by the metric's direction)."""
    old, new = before.get(key, 0.0 if key == "kl" else None), after.get(key)
    change = ""
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        delta = new - old
        relative = f" ({100 * delta / old:+.1f}%)" if old else ""
        better = (delta < 0) == metric.lower_is_better if delta else None
        change = f"{delta:+.4g}{relative}" + {True: " better", False: " worse", None: ""}[better]
    return f"| {metric.title} | {where} | {_cell(before, key, old)} | {_cell(after, key)} | {change} |"


def _tradeoff_section(report: Mapping[str, Any], plot: bool) -> list[str]:
    """The trade-off search's Pareto front and chosen point (``report.json``'s ``tradeoff``), if one ran."""
    search = report.get("tradeoff")
    if not search:
        return []
    primary = search.get("primary", "effect")
    chosen = search.get("chosen")
    lines = [
        "",
        "### Trade-off search",
        "",
        f"{search.get('trials')} trials of a multi-objective TPE search (Optuna) over method x granularity x budget x "
        f"contrast options, on the validation prompts only: {primary} against KL; the best trials within the KL limit "
        "were checked against every limit, best first, and the first that passed was chosen "
        f"({'none passed' if chosen is None else 'marked below'}). The held-out figures above are the chosen point's.",
        "",
        f"| method | granularity | budget | normalize | protect top | dampening | {primary} (validation) | KL | "
        "within limits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for point in search.get("front", []):
        mark = " **(chosen)**" if chosen is not None and point.get("trial") == chosen.get("trial") else ""
        lines.append(
            f"| {point['method']}{mark} | {point['granularity']} | {point['budget']} | {point.get('normalize', '-')} | "
            f"{point.get('protect_top', '-')} | {point.get('dampen') or 'pruned'} | {_fmt(point['effect'][primary])} | "
            f"{_fmt(point['kl'])} | "
            f"{'yes' if point.get('within_limits') else 'no'} |"
        )
    if chosen is not None and not chosen.get("pareto"):
        lines.append(
            f"| {chosen['method']} **(chosen)** | {chosen['granularity']} | {chosen['budget']} | "
            f"{chosen.get('normalize', '-')} | {chosen.get('protect_top', '-')} | {chosen.get('dampen') or 'pruned'} | "
            f"{_fmt(chosen['effect'][primary])} | "
            f"{_fmt(chosen['kl'])} | yes |"
        )
    if plot:
        lines += ["", "![Trade-off search: behaviour against KL, Pareto front and choice](surgery/tradeoff.png)"]
    return lines


def _side_effects_section(report: Mapping[str, Any]) -> list[str]:
    """Other behaviours measured before and after (``report.json``'s ``side_effects``)."""
    effects = report.get("side_effects") or {}
    if not effects:
        return []
    lines = [
        "",
        "### Side effects on other behaviours",
        "",
        "The other shipped behaviours, measured before and after on their own held-out prompts (greedy), so "
        "that a correction of one behaviour does not silently worsen another.",
        "",
        "| behaviour | metric | measured on (held-out) | base model | corrected | change |",
        "|---|---|---|---|---|---|",
    ]
    for name, block in effects.items():
        before, after = block.get("before", {}), block.get("after", {})
        where = f"`{block.get('prompt_set')}` ({block.get('prompts')} prompts)"
        for entry in block.get("metrics", []):
            metric = Metric(**entry)
            if metric.key in before or metric.key in after:
                lines.append(f"| {name} " + _result_row(metric, where, before, after, metric.key))
    return lines


def _units_per_layer(mask: Mask) -> list[int]:
    units = {"neurons": mask.layout.num_neurons, "heads": mask.layout.num_heads}.get(mask.granularity)
    if units is not None:
        return [units] * mask.layout.num_layers
    totals = [0] * mask.layout.num_layers
    for name, size in mask.provenance.get("module_sizes", {}).items():
        totals[mask.layout.weight_modules[name][0]] += int(size)
    return totals


def _carrier_card(carrier: str, root: Path) -> CarrierCard:
    """What the card says about the carrier the model was saved with (from the carrier registry)."""
    try:
        card = get_carrier(carrier).card
    except ValueError as err:
        raise CardError(f"cannot write a card for {root}: {err}") from err
    if card is None:
        raise CardError(f"cannot write a card for {root}: the {carrier!r} carrier saves no model to publish")
    return card


def _pruned_section(masks: Sequence[Mask], card: CarrierCard, plots: Sequence[str]) -> list[str]:
    what = {"neurons": "MLP neurons", "heads": "attention heads", "weights": "weights"}
    lines = ["## What was pruned", "", card.pruned]
    for mask in masks:
        totals = _units_per_layer(mask)
        total = sum(totals)
        scores = mask.provenance.get("scores", {})
        selection = mask.provenance.get("selection", {})
        lines += [
            "",
            f"### {mask.count} {what[mask.granularity]}"
            f"{f' of {total} ({100 * mask.count / total:.3g}%)' if total else ''}",
            "",
            f"- scores: `{scores.get('method', '?')}` "
            f"({', '.join(f'{k}={v}' for k, v in _flat_options(scores.get('settings', {})).items())})",
            f"- selection: {', '.join(f'{k}={v}' for k, v in selection.items() if v is not None)}",
            f"- base model fingerprint: `{mask.fingerprint.short()}` (config and weights; the mask refuses "
            "any other model)",
            "",
            "| layer | pruned | of | share |",
            "|---|---|---|---|",
        ]
        for layer, (count, of) in enumerate(zip(mask.per_layer(), totals)):
            lines.append(f"| {layer} | {count} | {of or '-'} | {f'{100 * count / of:.2f}%' if of else '-'} |")
    if "mask_per_layer.png" in plots:
        lines += ["", "![Pruned units per layer](surgery/mask_per_layer.png)"]
    lines += [
        "",
        f"The full mask (indices per module, manifest with method, options and fingerprint) is in "
        f"`{SURGERY_DIR}/`, with `check.json` (probe logits that recognise this model after loading).",
    ]
    return lines + [""]


def _flat_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level options of a scores' settings (nested inputs of a contrast summarised by their method)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "method":
            continue
        out[key] = value.get("method", "...") if isinstance(value, Mapping) else value
    return out


def _usage_section(repo: str, card: CarrierCard, base_model: str | None) -> list[str]:
    base = base_model or "<base model id>"
    lines = ["## How to use", "", "```python"]
    lines += [line.format(repo=repo, base=base) for line in card.usage] + ["```"]
    lines += [
        "",
        "Load and prove the mask is carried (exact zeros where the manifest says, and the probe logits of "
        "the corrected model; a silently dropped adapter is an error, not a no-op):",
        "",
        "```python",
        "from hf_lrp_surgery.hub import load_from_hub",
        "",
        f'model = load_from_hub("{repo}")',
    ]
    if card.switchable:
        lines.append(f'original = load_from_hub("{repo}", adapter_enabled=False)  # the adapter switched off')
    return lines + ["```", ""]


def _reproduce_section(command: str | None, versions: Mapping[str, str]) -> list[str]:
    lines = ["## How to reproduce", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += ["| package | version |", "|---|---|"] + [f"| {k} | {v} |" for k, v in versions.items()]
    lines += [
        "",
        "Method: attribution-guided pruning (Hatefi et al., *Attribution-Guided Pruning for Insight and "
        "Control*, arXiv 2506.13727) with AttnLRP relevance (Achtibat et al., ICML 2024), as implemented by "
        "`hf_lrp_surgery`: relevance of the model's own undesired and desired continuations of the same "
        "prompts is contrasted and the units least relevant to the desired behaviour are pruned.",
    ]
    return lines + [""]


# -- the card ---------------------------------------------------------------------------------
def _options(
    directory: Path,
    repo_id: str | None,
    base_model: str | None,
    command: str | None,
    license: str | None,
    tags: Sequence[str] | None,
) -> dict[str, Any]:
    """The card options: given values win over the ones stored with the model by an earlier write."""
    stored = _read_json(directory / SURGERY_DIR / _CARD_OPTIONS)
    given: dict[str, Any] = {"repo_id": repo_id, "base_model": base_model, "command": command, "license": license}
    given["tags"] = list(tags) if tags is not None else None
    return {key: value if value is not None else stored.get(key) for key, value in given.items()}


def build_card(
    directory: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    command: str | None = None,
    license: str | None = None,
    tags: Sequence[str] | None = None,
) -> ModelCard:
    """Build the model card of a saved corrected model, without writing anything.

    Args:
        directory: A directory written by :func:`~hf_lrp_surgery.carriers.save_corrected`, optionally with
            ``surgery/report.json`` and plots (see :func:`write_card`).
        repo_id: The Hub repo the card is for (used in the loading examples and as the model-index name).
        base_model: Hub id of the base model (default: the one saved with the model, when it is a Hub id).
        command: The command that reproduces the model.
        license: The license (usually the base model's).
        tags: Extra tags.

    Returns:
        The card (``card.data`` holds the metadata, ``card.text`` the body).

    Raises:
        CardError: ``directory`` is not a saved corrected model.

    Example:
        >>> print(build_card("runs/detox/adapter", repo_id="me/smollm2-detox").data.tags)  # doctest: +SKIP
    """
    root = Path(directory)
    try:
        masks, carrier, _, saved_base = read_surgery(root)
    except FileNotFoundError as err:
        raise CardError(f"cannot write a card for {root}: {err}") from err
    options = _options(root, repo_id, base_model, command, license, tags)
    base = options["base_model"] or (saved_base if is_hub_id(saved_base) else None)
    report = _read_json(root / SURGERY_DIR / _REPORT)
    behaviour, metadata = report.get("behaviour"), behaviour_metadata(report)
    plots = [p for p in _PLOTS if (root / SURGERY_DIR / p).is_file()]
    repo = options["repo_id"] or _PLACEHOLDER_REPO
    extra = list(metadata.tags) if metadata else []
    card = _carrier_card(carrier, root)
    extra += list(card.tags)
    data = ModelCardData(
        base_model=base,
        license=options["license"],
        library_name=card.library_name,
        pipeline_tag="text-generation",
        tags=_BASE_TAGS + extra + list(options["tags"] or []),
        model_name=repo.split("/")[-1] if options["repo_id"] else root.resolve().name,
        eval_results=_eval_results(report) or None,
        base_model_relation=card.relation if base else None,
    )
    what = " and ".join(f"{m.count} {m.granularity}" for m in masks)
    if metadata:
        goal = metadata.goal
    else:
        goal = f"change its {behaviour} behaviour" if behaviour else "remove an unwanted behaviour"
    form = card.form
    base_text = f"[`{base}`](https://huggingface.co/{base})" if base else f"`{saved_base or 'the base model'}`"
    body = [
        CARD_MARKER,
        f"# {repo.split('/')[-1]}",
        "",
        f"{base_text} with {what} pruned to {goal}, by attribution-guided pruning with Layer-wise Relevance "
        f"Propagation, {form}. Made with `hf_lrp_surgery`.",
        "",
    ]
    recipe_model = report.get("settings", {}).get("model")
    if recipe_model in EMBEDDED_MODELS:
        dtype = report["settings"].get("dtype", "float32")
        body += [
            f"The recipe ran on `hf_lrp_surgery`'s embedded `{recipe_model}` "
            f"({EMBEDDED_MODELS[recipe_model].description}), de-quantised to {dtype}: its weights are close to, "
            "not equal to, the base model's, and every number below is for that model.",
            "",
        ]
    if report:
        body += _results_section(report, plots)
    body += _pruned_section(masks, card, plots)
    body += _usage_section(repo, card, base)
    body += _reproduce_section(options["command"], _versions())
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _is_peft_template(text: str) -> bool:
    return "[More Information Needed]" in text or "<!-- Provide a quick summary of what the model is/does. -->" in text


def _kept_text(previous: ModelCard) -> str:
    """Text a person wrote in the previous README (never a template, never our own generated text)."""
    text = previous.text
    if CARD_MARKER in text:
        match = re.search(re.escape(_KEPT_START) + r"\n(.*?)\n" + re.escape(_KEPT_END), text, re.S)
        return match.group(1).strip() if match else ""
    return "" if _is_peft_template(text) else text.strip()


def write_card(
    directory: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    report: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    plots: Sequence[str | os.PathLike[str]] = (),
    command: str | None = None,
    license: str | None = None,
    tags: Sequence[str] | None = None,
) -> Path:
    """Write ``README.md`` (the model card) into a saved corrected model directory.

    Run it after everything else that writes into the directory (PEFT's ``save_pretrained`` writes a
    README of its own): the metadata of an existing README is kept where ours has no value (e.g.
    PEFT's ``library_name``), its tags are merged (except ``base_model:*``, which the Hub derives),
    PEFT's template text is dropped and any other text is kept in a section of its own. The report,
    plots and options are stored under ``surgery/`` so that a later call (e.g. a push with the final
    repo id) rebuilds the same card.

    Args:
        directory: A directory written by :func:`~hf_lrp_surgery.carriers.save_corrected`.
        repo_id: The Hub repo the card is for (default: the one stored by an earlier call, if any).
        base_model: Hub id of the base model (default: stored, or the one saved with the model).
        report: A recipe's ``report.json`` (path or dict) with before/after results; copied into ``surgery/``.
        plots: ``effect_vs_budget.png`` / ``mask_per_layer.png`` files to show; copied into ``surgery/``.
        command: The command that reproduces the model.
        license: The license (usually the base model's).
        tags: Extra tags.

    Returns:
        The path of ``README.md``.

    Raises:
        CardError: ``directory`` is not a saved corrected model, or a plot has an unknown name.

    Example:
        >>> write_card("runs/fix/adapter", repo_id="me/fix",  # doctest: +SKIP
        ...            base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    """
    root = Path(directory)
    surgery = root / SURGERY_DIR
    if not (surgery / CHECK_FILE).is_file():
        raise CardError(
            f"{root} is not a saved corrected model (no {SURGERY_DIR}/check.json); save it with "
            "CorrectedModel.save / save_corrected first"
        )
    for plot in map(Path, plots):
        if plot.name not in _PLOTS:
            raise CardError(f"unknown plot {plot.name!r}; the card shows {_PLOTS}")
        shutil.copyfile(plot, surgery / plot.name)
    if report is not None:
        data = dict(report) if isinstance(report, Mapping) else json.loads(Path(report).read_text())
        write_json_atomic(surgery / _REPORT, data)
    options = _options(root, repo_id, base_model, command, license, tags)
    write_json_atomic(surgery / _CARD_OPTIONS, options)
    card = build_card(root, **options)

    readme = root / "README.md"
    if readme.is_file():
        previous = ModelCard.load(readme, ignore_metadata_errors=True)
        ours = card.data.to_dict()
        for key, value in previous.data.to_dict().items():
            if key == "tags":
                card.data["tags"] = _merge_tags(card.data.get("tags") or [], value)
            elif key not in ours and key not in _GENERATED_KEYS:
                card.data[key] = value
        kept = _kept_text(previous)
        if kept:
            card.text = card.text.rstrip() + f"\n\n## Further information\n\n{_KEPT_START}\n{kept}\n{_KEPT_END}\n"
    write_text_atomic(readme, str(card))
    return readme


def _merge_tags(ours: list[str], theirs: Any) -> list[str]:
    extra = [t for t in (theirs if isinstance(theirs, list) else [theirs]) if isinstance(t, str)]
    return ours + [t for t in extra if t not in ours and not t.startswith("base_model:")]


def _budget_arguments(settings: Mapping[str, Any]) -> list[str]:
    """The flags of a budget search of one method."""
    return [
        "--budgets",
        *map(str, settings.get("budgets") or []),
        "--granularity",
        str(settings.get("granularity")),
        "--method",
        str(settings.get("method")),
        "--normalize",
        str(settings.get("normalize")),
        "--protect-top",
        str(settings.get("protect_top")),
    ]


def _search_arguments(search: Mapping[str, Any]) -> list[str]:
    """The flags of a trade-off search (``settings["search"]``)."""
    space = search.get("space", {})
    budgets = space.get("budgets", {})
    parts = ["--search", "--trials", str(search.get("trials")), "--search-seed", str(search.get("seed"))]
    parts += ["--search-methods", *space.get("methods", []), "--search-granularities", *budgets]
    parts += ["--search-dampenings", *(spell_dampening(d) for d in space.get("dampenings", [None]))]
    for granularity, (low, high) in budgets.items():
        parts += [f"--{granularity.removesuffix('s')}-range", str(low), str(high)]
    return parts


def _recipe_command(report: Mapping[str, Any], base_model: str | None) -> str | None:
    metadata = behaviour_metadata(report)
    settings = report.get("settings", {})
    if metadata is None or not settings or settings.get("prompts") == "given":  # the CLI runs on the shipped prompts
        return None
    limits = settings.get("limits", {})
    # The model the recipe ran on (an embedded name such as smollm2-135m-instruct, a path or a Hub id).
    name = metadata.command
    parts = [
        "hf-lrp-surgery",
        name,
        "--model",
        settings.get("model") or base_model or "<base model id>",
        *(_search_arguments(settings["search"]) if settings.get("search") else _budget_arguments(settings)),
        "--objective",
        settings.get("objective", settings.get("seed")),  # reports written before the rename say "seed"
        "--scope",
        settings.get("scope"),
        "--max-kl",
        str(limits.get("max_kl")),
        "--max-perplexity-increase",
        str(limits.get("max_perplexity_increase")),
    ]
    if limits.get("max_induction_increase") is not None:
        parts += ["--max-induction-increase", str(limits["max_induction_increase"])]
    passages = settings.get("general_passages")
    if isinstance(passages, int) and passages != 5:  # None (every passage) has no flag
        parts += ["--general-passages", str(passages)]
    if settings.get("modules"):
        parts += ["--modules", *settings["modules"]]
    if settings.get("dtype") not in (None, "float32"):
        parts += ["--dtype", settings["dtype"]]
    if settings.get("focus") is False:
        parts.append("--no-focus")
    for option in metadata.options:
        parts += option.arguments(settings)
    if base_model:
        parts += ["--base-model-id", base_model]
    return " ".join(shlex.quote(str(p)) for p in parts + ["--output", f"runs/{name}"])


def card_from_recipe(
    output_dir: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    repo_ids: Mapping[str, str] | None = None,
    command: str | None = None,
    license: str | None = None,
) -> dict[str, Path]:
    """Write model cards into the ``baked/`` and ``adapter/`` models of a correction recipe's output.

    Args:
        output_dir: A directory written by :func:`~hf_lrp_surgery.correction.run_recipe` (``report.json``,
            ``effect_vs_budget.png``, ``mask_per_layer.png``, ``baked/`` and, for neuron and head masks,
            ``adapter/``).
        base_model: Hub id of the base model (default: the one saved with each model, when it is a Hub id).
        repo_ids: ``{"baked": repo_id, "adapter": repo_id}``, the repos the models will be pushed to.
        command: The command that reproduces the run (default: the recipe command rebuilt from the
            report's settings; decoding settings are the behaviour's defaults).
        license: The license (usually the base model's).

    Returns:
        ``{"baked": README path, "adapter": README path}`` for the forms present.

    Raises:
        CardError: No ``report.json``, or the recipe found no budget within its limits (nothing was saved).

    Example:
        >>> card_from_recipe("runs/detox", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",  # doctest: +SKIP
        ...                  repo_ids={"adapter": "me/smollm2-detox-ia3", "baked": "me/smollm2-detox"})
    """
    root = Path(output_dir)
    report_path = root / _REPORT
    if not report_path.is_file():
        raise CardError(f"{root} holds no {_REPORT}; give the output directory of a correction recipe")
    report = json.loads(report_path.read_text())
    forms = [form for form in ("baked", "adapter") if (root / form / SURGERY_DIR / CHECK_FILE).is_file()]
    if not forms:
        raise CardError(
            f"{root} holds no corrected model (chosen budget {report.get('chosen_budget')}): the recipe "
            "found no budget within its general-behaviour limits, so there is nothing to publish"
        )
    plots = [root / p for p in _PLOTS if (root / p).is_file()]
    command = command or _recipe_command(report, base_model)
    return {
        form: write_card(
            root / form,
            repo_id=(repo_ids or {}).get(form),
            base_model=base_model,
            report=report_path,
            plots=plots,
            command=command,
            license=license,
        )
        for form in forms
    }


__getattr__ = moved_names(
    __name__, {"BEHAVIOUR_TAGS": lambda: {key: entry.metadata.tags[0] for key, entry in BEHAVIOURS.items()}}
)
