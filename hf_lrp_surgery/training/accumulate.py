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
from safetensors.torch import save_file

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.fingerprint import ModelFingerprint
from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.lrp.layout import GRANULARITIES
from hf_lrp_surgery.lrp.result import RelevanceResult, component_tensors
from hf_lrp_surgery.scoring import Aggregation, Layout, Scores
from hf_lrp_surgery.training._state_files import check_format, damaged, entry, read_json_object, read_tensors

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

    def _sum_shapes(self, weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The name and shape of every running sum of one set."""
        shapes = dict(_shapes(self.layout, self.components))
        if "weights" in self.components:
            shapes.update({f"weights/{name}": shape for name, shape in weight_shapes.items()})
            if self.settings.get("per_sample_abs_weights"):
                shapes.update({f"weights_abs/{name}": shape for name, shape in weight_shapes.items()})
        return shapes

    def _zeros(self, weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        return {key: torch.zeros(shape, dtype=torch.float64) for key, shape in self._sum_shapes(weight_shapes).items()}

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
            **component_tensors(sums),
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
        # Checkpoint state belongs to the library: a save at the same step replaces it, as the Trainer does.
        with atomic_directory(directory, overwrite=True) as tmp:
            save_file(tensors, str(tmp / _TENSORS_FILE), metadata={"format": "pt"})
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RelevanceAccumulator:
        """Load sums saved with :meth:`save`, checking that the two files are complete and agree.

        Args:
            directory: A directory written by :meth:`save` (``<checkpoint>/lrp_surgery/relevance``).

        Returns:
            The accumulator.

        Raises:
            TrainingStateError: A file is missing, truncated or does not parse, an entry is missing or
                of the wrong type, the tensors are not those of the recorded components and sets, or the
                format version is unknown; the message names the file.

        Example:
            >>> accumulator = RelevanceAccumulator.load("out/checkpoint-4/lrp_surgery/relevance")  # doctest: +SKIP
        """
        directory = Path(directory)
        meta_path, tensors_path = directory / _META_FILE, directory / _TENSORS_FILE
        meta = read_json_object(meta_path)
        check_format(meta, meta_path, _FORMAT_VERSION, "accumulated-relevance")
        try:
            layout = Layout.from_dict(entry(meta, "layout", dict, meta_path))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise damaged(meta_path, f"has a 'layout' entry that is not a model layout ({err!r})") from err
        sums: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in read_tensors(tensors_path).items():
            name, _, rest = key.partition("/")
            sums.setdefault(name, {})[rest] = value
        accumulator = cls(
            layout=layout,
            components=tuple(entry(meta, "components", list, meta_path, items=str)),
            settings=entry(meta, "settings", dict, meta_path),
            sums=sums,
            counts=dict(entry(meta, "counts", dict, meta_path, items=int)),
            steps=list(entry(meta, "steps", list, meta_path, items=int)),
        )
        accumulator._check_loaded(meta_path, tensors_path)
        return accumulator

    def _check_loaded(self, meta_path: Path, tensors_path: Path) -> None:
        """Refuse loaded sums that are not exactly those :meth:`add_pass` keeps for the recorded components."""
        if not self.components or not set(self.components) <= set(GRANULARITIES):
            raise damaged(meta_path, f"records the components {list(self.components)}, not neurons, heads or weights")
        if sorted(self.counts) != sorted(SETS):
            raise damaged(meta_path, f"counts the sets {sorted(self.counts)}, not {list(SETS)}")
        if not self.steps:
            return
        expected = self._sum_shapes({name: () for name in self.layout.weight_modules})
        if sorted(self.sums) != sorted(SETS):
            raise damaged(tensors_path, f"holds sums of the sets {sorted(self.sums)}, not {list(SETS)}")
        for name, sums in self.sums.items():
            if sorted(sums) != sorted(expected):
                raise damaged(tensors_path, f"holds the {name} sums {sorted(sums)}, not {sorted(expected)}")
            for key, shape in expected.items():
                found = tuple(sums[key].shape)
                if not key.startswith("weights") and found != shape:
                    raise damaged(tensors_path, f"has a {name}/{key} sum of shape {found}, not {shape}")
