"""The value every scorer returns: one score per component, higher = keep, with how it was made."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.exceptions import ArtefactError, NonFiniteScoreError
from hf_lrp_surgery.fingerprint import ModelFingerprint
from hf_lrp_surgery.io import atomic_directory, read_artefact
from hf_lrp_surgery.lrp.layout import GRANULARITIES, Granularity, Layout
from hf_lrp_surgery.lrp.result import RelevanceResult
from hf_lrp_surgery.options import Aggregation, check_aggregation

__all__ = ["Scores", "UnitSelection"]

_TENSORS_FILE = "scores.safetensors"
_META_FILE = "scores.json"
_FORMAT_VERSION = 1


class UnitSelection(Protocol):
    """What :meth:`Scores.excluding` reads of a mask (masks sit a layer above scores)."""

    @property
    def granularity(self) -> str:
        """The component kind."""
        ...

    @property
    def indices(self) -> Mapping[str, torch.Tensor]:
        """Carrier module -> flat indices of the selected units."""
        ...


@dataclass
class Scores:
    """One score per component (higher = keep); what masks are selected from.

    Attributes:
        method: The scoring method (one of :data:`METHODS`, or ``"contrast"``).
        settings: How the scores were computed (enough to reproduce them).
        fingerprint: The model they were computed on.
        layout: Where the components live in that model.
        num_samples: Reference samples behind the scores (0 for sample-free methods).
        neurons: ``[num_layers, num_neurons]`` or ``None``.
        heads: ``[num_layers, num_heads]`` or ``None``.
        weights: Prunable module name -> a tensor of the weight's shape (empty if not scored).
    """

    method: str
    settings: dict[str, Any]
    fingerprint: ModelFingerprint
    layout: Layout
    num_samples: int = 0
    neurons: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def components(self) -> tuple[str, ...]:
        """The component kinds that were scored."""
        return tuple(c for c in GRANULARITIES if self._has(c))

    def excluding(self, mask: UnitSelection) -> Scores:
        """A copy in which the units of ``mask`` score ``+inf``, so that no selection takes them again.

        Args:
            mask: A :class:`~hf_lrp_surgery.masks.Mask` (or anything with its ``granularity`` and
                ``indices``) selected on these scores' layout.

        Returns:
            New scores; ``self`` is left as it was.

        Raises:
            KeyError: These scores hold no components of the mask's kind.

        Example:
            >>> pruned = select(scores, "neurons", 10)  # doctest: +SKIP
            >>> more = select(scores.excluding(pruned), "neurons", 10)  # ten others  # doctest: +SKIP
        """
        self.get(mask.granularity)  # type: ignore[arg-type]
        out = replace(
            self,
            weights={k: v.clone() for k, v in self.weights.items()},
            neurons=None if self.neurons is None else self.neurons.clone(),
            heads=None if self.heads is None else self.heads.clone(),
        )
        for name, index in mask.indices.items():
            if mask.granularity == "weights":
                out.weights[name].view(-1)[index] = torch.inf
            else:
                getattr(out, mask.granularity)[self.layout.layer_of(mask.granularity, name), index] = torch.inf  # type: ignore[arg-type]
        return out

    def _has(self, component: str) -> bool:
        return bool(self.weights) if component == "weights" else getattr(self, component) is not None

    def get(self, component: Granularity) -> torch.Tensor | dict[str, torch.Tensor]:
        """The scores of one component kind.

        Raises:
            KeyError: That kind was not scored (the message says how to score it).
        """
        if component not in GRANULARITIES:
            raise KeyError(f"component must be one of {GRANULARITIES}, got {component!r}")
        if not self._has(component):
            raise KeyError(
                f"these {self.method} scores hold no {component}; score with components including "
                f"{component!r} (scored: {list(self.components) or 'nothing'})"
            )
        return self.weights if component == "weights" else getattr(self, component)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteScoreError` if a score is NaN (``+inf`` marks protected components)."""
        tensors = [(c, getattr(self, c)) for c in ("neurons", "heads") if getattr(self, c) is not None]
        tensors += [(f"weights[{k}]", v) for k, v in self.weights.items()]
        bad = [name for name, t in tensors if bool(torch.isnan(t).any()) or bool(torch.isneginf(t).any())]
        if bad:
            raise NonFiniteScoreError(
                f"{self.method} scores are NaN or -inf in {', '.join(bad[:5])}; recompute them in float32 (the "
                "model or its activations overflowed) and check the model's weights with torch.isfinite"
            )

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save as ``scores.safetensors`` + ``scores.json``, atomically.

        Args:
            directory: Destination directory (an existing non-empty one is replaced only with ``overwrite``).
            overwrite: Replace an existing non-empty directory.

        Returns:
            The directory.

        Example:
            >>> scores.save("runs/scores")  # doctest: +SKIP
            >>> Scores.load("runs/scores").method  # doctest: +SKIP
            'lrp'
        """
        tensors = {c: getattr(self, c) for c in ("neurons", "heads") if getattr(self, c) is not None}
        tensors.update({f"weights/{name}": value for name, value in self.weights.items()})
        meta = {
            "format_version": _FORMAT_VERSION,
            "hf_lrp_surgery_version": __version__,
            "method": self.method,
            "settings": self.settings,
            "fingerprint": self.fingerprint.to_dict(),
            "layout": self.layout.to_dict(),
            "num_samples": self.num_samples,
        }
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                str(tmp / _TENSORS_FILE),
                metadata={"format": "pt"},
            )
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Scores:
        """Load scores saved with :meth:`save`.

        Raises:
            FileNotFoundError: The directory does not hold saved scores.
            ArtefactError: A file is unreadable, truncated, of an unknown format or missing an entry.
        """
        meta, tensors = read_artefact(directory, _META_FILE, _TENSORS_FILE, what="scores", version=_FORMAT_VERSION)
        try:
            return cls(
                method=meta["method"],
                settings=meta["settings"],
                fingerprint=ModelFingerprint.from_dict(meta["fingerprint"]),
                layout=Layout.from_dict(meta["layout"]),
                num_samples=int(meta["num_samples"]),
                neurons=tensors.get("neurons"),
                heads=tensors.get("heads"),
                weights={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("weights/")},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ArtefactError(
                f"{directory}/{_META_FILE} lacks or garbles an entry ({err!r}); save the scores again"
            ) from err

    @classmethod
    def from_relevance(cls, result: RelevanceResult, layout: Layout, *, aggregation: Aggregation = "signed") -> Scores:
        """Mean relevance per sample as scores.

        Args:
            result: LRP (or gradient) relevance of a reference set.
            layout: The model's layout (``Layout.of(resolve(model))``).
            aggregation: ``"signed"`` (mean relevance) or ``"abs"`` (mean of per-sample ``|R|``; for
                weights this needs ``per_sample_abs_weights=True`` at collection).

        Returns:
            The scores of every component kind the result holds.
        """
        check_aggregation(aggregation)
        absolute = aggregation == "abs"
        scores = cls(
            method=str(result.settings.get("method", "lrp")),
            settings={**result.settings, "aggregation": aggregation},
            fingerprint=result.fingerprint,
            layout=layout,
            num_samples=result.num_samples,
        )
        for component in ("neurons", "heads"):
            if getattr(result, component) is not None:
                setattr(scores, component, result.mean(component, absolute=absolute))
        if result.weights:
            # Buffers summed in a bf16/fp16 model's dtype (weight_buffers="model") are ranked in fp32.
            means = result.mean("weights", absolute=absolute)
            scores.weights = {name: v.float() if v.dtype.itemsize < 4 else v for name, v in means.items()}
        return scores
