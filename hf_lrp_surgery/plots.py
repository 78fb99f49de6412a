"""Plots saved next to reports (matplotlib, non-interactive backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hf_lrp_surgery.masks import Mask

__all__ = ["plot_mask_per_layer"]


def plot_mask_per_layer(masks: Mask | Sequence[Mask], path: str | Path) -> Path:
    """Bar chart of pruned units per decoder block, one panel per mask.

    Args:
        masks: One mask or several (e.g. neurons and heads).
        path: The PNG to write.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask_list = [masks] if isinstance(masks, Mask) else list(masks)
    fig, axes = plt.subplots(1, len(mask_list), figsize=(6 * len(mask_list), 4), squeeze=False)
    for ax, mask in zip(axes[0], mask_list):
        counts = mask.per_layer()
        ax.bar(range(len(counts)), counts, color="C3")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"pruned {mask.granularity}")
        method = mask.provenance.get("scores", {}).get("method", "?")
        ax.set_title(f"{mask.count} {mask.granularity} pruned ({method}, "
                     f"{mask.provenance.get('selection', {}).get('scope', '?')} scope)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
