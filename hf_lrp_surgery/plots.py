"""Plots saved next to reports (matplotlib, non-interactive backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_lrp_surgery.masks import Mask

__all__ = ["plot_frontier", "plot_mask_per_layer"]


def plot_mask_per_layer(masks: Mask | Sequence[Mask], path: str | Path) -> Path:
    """Bar chart of pruned units per decoder block, one panel per mask.

    Args:
        masks: One mask or several (e.g. neurons and heads).
        path: The PNG to write.

    Returns:
        ``path``.
    """
    plt = pyplot()

    mask_list = [masks] if isinstance(masks, Mask) else list(masks)
    fig, axes = plt.subplots(1, len(mask_list), figsize=(6 * len(mask_list), 4), squeeze=False)
    for ax, mask in zip(axes[0], mask_list):
        counts = mask.per_layer()
        ax.bar(range(len(counts)), counts, color="C3")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"pruned {mask.granularity}")
        method = mask.provenance.get("scores", {}).get("method", "?")
        ax.set_title(
            f"{mask.count} {mask.granularity} pruned ({method}, "
            f"{mask.provenance.get('selection', {}).get('scope', '?')} scope)"
        )
    return save_figure(fig, path)


def plot_frontier(frontier: Sequence[Any], metric: str, path: str | Path, *, chosen: int | None = None) -> Path:
    """Effect and general-behaviour cost against the budget (one line per quantity).

    Args:
        frontier: Points with ``budget``, ``effect[metric]``, ``kl`` and ``perplexity_increase``.
        metric: The effect metric to plot.
        path: The PNG to write.
        chosen: The budget to mark.

    Returns:
        ``path``.
    """
    plt = pyplot()

    budgets = [p.budget for p in frontier]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(budgets, [p.effect[metric] for p in frontier], "o-", color="C0")
    left.set_xlabel("components pruned")
    left.set_ylabel(metric)
    left.set_title(f"{metric} vs budget (validation prompts)")
    right.plot(budgets, [p.kl for p in frontier], "o-", color="C1", label="KL(original || corrected)")
    right.plot(
        budgets, [p.perplexity_increase for p in frontier], "s-", color="C2", label="perplexity increase (worst domain)"
    )
    right.set_xlabel("components pruned")
    right.set_title("general-behaviour cost")
    right.legend()
    for ax in (left, right):
        if chosen is not None:
            ax.axvline(chosen, color="grey", linestyle="--")
    return save_figure(fig, path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive backend (plots are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write (creating the directory) and close a figure.

    Returns:
        The path written.
    """
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    pyplot().close(fig)
    return target
