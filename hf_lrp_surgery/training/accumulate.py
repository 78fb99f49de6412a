"""Relevance accumulated over the passes of a training run, reduced across ranks, saved with checkpoints.

Each relevance pass during training explains the two reference sets (``general`` and
``undesired``) on the model as it is at that step. The accumulator keeps, per set, running sums of
the relevance (signed and per-sample ``|R|``) and the number of explained samples, so the result
is the mean over every sample of every pass. Under ``torch.distributed`` each rank explains its
share of the samples and the per-rank sums and counts of a pass are all-reduced before they are
added, so every rank holds the same totals as a single process that explained all the samples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.fingerprint import ModelFingerprint
from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.lrp.result import RelevanceResult
from hf_lrp_surgery.scoring import Aggregation, Layout, Scores

__all__ = ["RelevanceAccumulator", "SETS", "distributed_rank_and_size"]

#: The two reference sets of a contrast, in the order they are explained.
SETS: tuple[str, str] = ("general", "undesired")
_TENSORS_FILE = "accumulated.safetensors"
_META_FILE = "accumulated.json"
_FORMAT_VERSION = 1


def distributed_rank_and_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, or ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shapes(layout: Layout, components: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The name and shape of every running sum for these components."""
    shapes: dict[str, tuple[int, ...]] = {}
    if "neurons" in components:
        shapes["neurons"] = shapes["neurons_abs"] = (layout.num_layers, layout.num_neurons)
    if "heads" in components:
        shapes["heads"] = shapes["heads_abs"] = (layout.num_layers, layout.num_heads)
    return shapes


@dataclass
class RelevanceAccumulator:
    """Running sums of relevance per reference set over the passes of a training run.

    Attributes:
        layout: Where the components live in the model.
        components: The component kinds accumulated (``"neurons"``, ``"heads"``, ``"weights"``).
        settings: How each pass computes relevance (variant, the objective under its recorded key ``seed``,
            ...); recorded in the scores.
        sums: Set name -> sum name (``neurons``, ``neurons_abs``, ``heads``, ``heads_abs``,
            ``weights/<module>``, ``weights_abs/<module>``) -> fp64 running sum.
        counts: Set name -> explained samples over all passes.
        steps: The training steps at which passes ran.
    """

    layout: Layout
    components: tuple[str, ...]
    settings: dict[str, Any]
    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {name: 0 for name in SETS})
    steps: list[int] = field(default_factory=list)

    @property
    def passes(self) -> int:
        """Number of relevance passes accumulated."""
        return len(self.steps)

    def _zeros(self, weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        shapes = dict(_shapes(self.layout, self.components))
        if "weights" in self.components:
            shapes.update({f"weights/{name}": shape for name, shape in weight_shapes.items()})
            if self.settings.get("per_sample_abs_weights"):
                shapes.update({f"weights_abs/{name}": shape for name, shape in weight_shapes.items()})
        return {key: torch.zeros(shape, dtype=torch.float64) for key, shape in shapes.items()}

    def add_pass(
        self,
        step: int,
        results: dict[str, RelevanceResult | None],
        weight_shapes: dict[str, tuple[int, ...]],
        device: torch.device | None = None,
    ) -> None:
        """Add one pass: this rank's relevance of its share of each set, all-reduced across ranks.

        Args:
            step: The training step of the pass.
            results: Set name -> this rank's relevance (``None`` when its share was empty).
            weight_shapes: Prunable module name -> weight shape (for empty shares).
            device: Where to run the all-reduce (the model's device; CPU for gloo).
        """
        pass_sums: dict[str, dict[str, torch.Tensor]] = {}
        for name in SETS:
            sums = self._zeros(weight_shapes)
            result = results.get(name)
            if result is not None:
                for key in sums:
                    kind, _, module = key.partition("/")
                    value = getattr(result, kind)[module] if module else getattr(result, kind)
                    sums[key] += value.double()
            pass_sums[name] = sums
        local_counts = [getattr(results.get(name), "num_samples", 0) for name in SETS]
        counts = self._all_reduce(pass_sums, local_counts, device)
        for name, count in zip(SETS, counts):
            if name not in self.sums:
                self.sums[name] = {key: torch.zeros_like(value) for key, value in pass_sums[name].items()}
            for key, value in pass_sums[name].items():
                self.sums[name][key] += value
            self.counts[name] += count
        self.steps.append(int(step))

    @staticmethod
    def _all_reduce(
        pass_sums: dict[str, dict[str, torch.Tensor]], counts: list[int], device: torch.device | None
    ) -> list[int]:
        """Sum every tensor of ``pass_sums`` (in place) and the counts over all ranks, in one collective."""
        _, world = distributed_rank_and_size()
        if world == 1:
            return counts
        import torch.distributed as dist

        tensors = [t for sums in pass_sums.values() for t in sums.values()]
        flat = torch.cat([torch.tensor(counts, dtype=torch.float64)] + [t.flatten() for t in tensors])
        flat = flat.to(device or "cpu")
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu()
        reduced_counts = [int(round(float(c))) for c in flat[: len(counts)]]
        offset = len(counts)
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
        return reduced_counts

    def relevance(self, name: str, fingerprint: ModelFingerprint) -> RelevanceResult:
        """The accumulated relevance of one set as a :class:`RelevanceResult` (sums over all passes).

        Args:
            name: ``"general"`` or ``"undesired"``.
            fingerprint: The model the result is attributed to (the current weights).

        Raises:
            ValueError: No pass has run yet.
        """
        if not self.counts.get(name):
            raise ValueError("no relevance has been accumulated yet; run a relevance pass first")
        sums = self.sums[name]
        return RelevanceResult(
            fingerprint=fingerprint,
            settings={**self.settings, "passes": self.passes, "steps": list(self.steps)},
            num_samples=self.counts[name],
            neurons=sums.get("neurons"),
            neurons_abs=sums.get("neurons_abs"),
            heads=sums.get("heads"),
            heads_abs=sums.get("heads_abs"),
            weights={k.split("/", 1)[1]: v for k, v in sums.items() if k.startswith("weights/")},
            weights_abs={k.split("/", 1)[1]: v for k, v in sums.items() if k.startswith("weights_abs/")},
        )

    def scores(self, name: str, fingerprint: ModelFingerprint, aggregation: Aggregation) -> Scores:
        """Mean relevance per sample of one set, over all passes, as :class:`Scores`."""
        return Scores.from_relevance(self.relevance(name, fingerprint), self.layout, aggregation=aggregation)

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Save the sums and counts into ``directory`` (replaced atomically)."""
        tensors = {
            f"{name}/{key}": value.contiguous() for name, sums in self.sums.items() for key, value in sums.items()
        }
        meta = {
            "format_version": _FORMAT_VERSION,
            "hf_lrp_surgery_version": __version__,
            "layout": self.layout.to_dict(),
            "components": list(self.components),
            "settings": self.settings,
            "counts": self.counts,
            "steps": self.steps,
        }
        with atomic_directory(directory) as tmp:
            save_file(tensors, str(tmp / _TENSORS_FILE), metadata={"format": "pt"})
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RelevanceAccumulator:
        """Load sums saved with :meth:`save`.

        Raises:
            FileNotFoundError: ``directory`` holds no accumulated relevance.
            ValueError: Unknown format version.
        """
        directory = Path(directory)
        if not (directory / _META_FILE).is_file() or not (directory / _TENSORS_FILE).is_file():
            raise FileNotFoundError(f"{directory} holds no accumulated relevance ({_META_FILE} + {_TENSORS_FILE})")
        meta = json.loads((directory / _META_FILE).read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: unknown accumulated-relevance format {meta.get('format_version')!r}")
        sums: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in load_file(str(directory / _TENSORS_FILE)).items():
            name, rest = key.split("/", 1)
            sums.setdefault(name, {})[rest] = value
        return cls(
            layout=Layout.from_dict(meta["layout"]),
            components=tuple(meta["components"]),
            settings=meta["settings"],
            sums=sums,
            counts={k: int(v) for k, v in meta["counts"].items()},
            steps=[int(s) for s in meta["steps"]],
        )
