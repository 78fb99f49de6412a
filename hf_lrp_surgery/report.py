"""The relevance report: which neurons, heads and input tokens carry a model's own predictions."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.lrp.collect import collect_relevance
from hf_lrp_surgery.lrp.result import RelevanceResult
from hf_lrp_surgery.plots import pyplot, save_figure
from hf_lrp_surgery.references.samples import ReferenceSample

__all__ = ["RelevanceReport", "default_report_prompts", "greedy_continuations", "relevance_report"]


def default_report_prompts() -> list[str]:
    """The prompts shipped in ``hf_lrp_surgery/data/report_prompts.json``."""
    text = resources.files("hf_lrp_surgery").joinpath("data/report_prompts.json").read_text()
    return list(json.loads(text)["prompts"])


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """The model's own greedy continuations, decoded to text (one prompt at a time, no padding).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        prompts: Prompt texts.
        max_new_tokens: Tokens to generate per prompt.

    Returns:
        The continuation of each prompt (without the prompt).
    """
    device = next(model.parameters()).device
    continuations = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        output = cast(Any, model).generate(  # GenerationMixin, unknown to nn.Module's type
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        continuations.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    return continuations


@dataclass
class RelevanceReport:
    """What :func:`relevance_report` found.

    Attributes:
        relevance: The aggregated relevance (neurons, heads, inputs).
        samples: ``(prompt, continuation)`` pairs that were explained.
        top_neurons: ``(layer, neuron, mean |R| per sample)``, most relevant first.
        top_heads: ``(layer, head, mean |R| per sample)``, most relevant first.
        top_tokens: Per sample, the input tokens with the most relevance ``(token, relevance)``.
    """

    relevance: RelevanceResult
    samples: list[tuple[str, str]]
    top_neurons: list[tuple[int, int, float]]
    top_heads: list[tuple[int, int, float]]
    top_tokens: list[list[tuple[str, float]]]

    def to_text(self) -> str:
        """A plain-text rendering for the terminal."""
        lines = [
            f"Relevance report: {self.relevance.num_samples} samples, model {self.relevance.fingerprint.short()}",
            "",
            "Explained (prompt -> the model's own continuation):",
        ]
        for (prompt, continuation), tokens in zip(self.samples, self.top_tokens):
            lines.append(f"  {prompt!r} -> {continuation!r}")
            lines.append("      most relevant input tokens: " + ", ".join(f"{t!r} {r:+.3f}" for t, r in tokens))
        lines += ["", "Top MLP neurons (layer, neuron: mean |R| per sample):"]
        lines += [f"  L{layer:>2} n{index:<5} {value:.4f}" for layer, index, value in self.top_neurons]
        lines += ["", "Top attention heads (layer, head: mean |R| per sample):"]
        lines += [f"  L{layer:>2} h{index:<3} {value:.4f}" for layer, index, value in self.top_heads]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary (the full tensors are saved separately)."""
        return {
            "model": self.relevance.fingerprint.to_dict(),
            "settings": self.relevance.settings,
            "samples": [
                {"prompt": p, "continuation": c, "top_input_tokens": t}
                for (p, c), t in zip(self.samples, self.top_tokens)
            ],
            "top_neurons": [{"layer": layer, "neuron": i, "mean_abs_relevance": v} for layer, i, v in self.top_neurons],
            "top_heads": [{"layer": layer, "head": i, "mean_abs_relevance": v} for layer, i, v in self.top_heads],
            "per_layer": {
                "neurons_mean_abs": self.relevance.mean("neurons", absolute=True).sum(1).tolist(),
                "heads_mean_abs": self.relevance.mean("heads", absolute=True).sum(1).tolist(),
            },
        }

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``report.json``, ``report.txt``, ``relevance_per_layer.png`` and ``relevance/``, atomically.

        Args:
            directory: Destination (an existing non-empty one is replaced only with ``overwrite``).
            overwrite: Replace an existing non-empty directory.

        Returns:
            The directory.
        """
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            (tmp / "report.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
            (tmp / "report.txt").write_text(self.to_text() + "\n")
            self.relevance.save(tmp / "relevance")
            _plot(self.relevance, tmp / "relevance_per_layer.png")
        return Path(directory)


def _plot(relevance: RelevanceResult, path: Path) -> None:
    plt = pyplot()

    neurons = relevance.mean("neurons", absolute=True)
    heads = relevance.mean("heads")
    layers = range(neurons.shape[0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.bar(layers, neurons.sum(1).numpy(), label="MLP neurons (mean |R|)")
    left.plot(
        layers,
        relevance.mean("heads", absolute=True).sum(1).numpy(),
        "o-",
        color="C1",
        label="attention heads (mean |R|)",
    )
    left.set_xlabel("layer")
    left.set_ylabel("relevance per sample")
    left.set_title("Relevance mass per layer")
    left.legend()
    limit = float(heads.abs().max()) or 1.0
    image = right.imshow(heads.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    right.set_xlabel("layer")
    right.set_ylabel("head")
    right.set_title("Signed head relevance (mean per sample)")
    fig.colorbar(image, ax=right)
    save_figure(fig, path)


def relevance_report(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 8,
    top_k: int = 10,
    batch_size: int = 8,
    progress: bool = True,
) -> RelevanceReport:
    """Explain the model's own greedy continuations of some prompts.

    Each prompt is continued greedily, then ``prompt + continuation`` is explained by teacher
    forcing (the sum of the continuation's token logits) with AttnLRP.

    Args:
        model: A supported causal LM in eval mode.
        tokenizer: Its tokenizer.
        prompts: Prompts to explain; the shipped ones by default.
        max_new_tokens: Length of the explained continuation.
        top_k: Neurons, heads and input tokens to list.
        batch_size: Samples per relevance pass.
        progress: Show progress bars.

    Returns:
        The report.

    Example:
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> print(relevance_report(model, tokenizer).to_text())  # doctest: +SKIP
    """
    prompts = list(prompts) if prompts is not None else default_report_prompts()
    continuations = greedy_continuations(model, tokenizer, prompts, max_new_tokens)
    samples = [ReferenceSample(p, c) for p, c in zip(prompts, continuations)]
    relevance = collect_relevance(
        model, samples, tokenizer, components=("neurons", "heads", "inputs"), batch_size=batch_size, progress=progress
    )
    top_tokens = []
    for sample, ids, scores in zip(samples, relevance.input_ids, relevance.input_relevance):
        prompt_length = len(ids) - len(tokenizer(sample.continuation, add_special_tokens=False)["input_ids"])
        prompt_scores = scores[:prompt_length]
        order = prompt_scores.abs().argsort(descending=True)[: min(top_k, 5)]
        top_tokens.append([(tokenizer.decode([int(ids[i])]), float(prompt_scores[i])) for i in order])
    return RelevanceReport(
        relevance=relevance,
        samples=[(p, c) for p, c in zip(prompts, continuations)],
        top_neurons=relevance.top("neurons", top_k, absolute=True),
        top_heads=relevance.top("heads", top_k, absolute=True),
        top_tokens=top_tokens,
    )
