"""The container for relevance aggregated over a reference set."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from safetensors.torch import save_file

from hf_lrp_surgery._deprecation import moved_names
from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.exceptions import ArtefactError, FingerprintMismatchError
from hf_lrp_surgery.fingerprint import ModelFingerprint
from hf_lrp_surgery.io import atomic_directory, read_artefact
from hf_lrp_surgery.lrp.layout import Granularity

__all__ = ["RelevanceResult"]


_TENSORS_FILE = "relevance.safetensors"
_META_FILE = "relevance.json"
_FORMAT_VERSION = 1


@dataclass
class RelevanceResult:
    """Relevance summed over the samples of a reference set, in fp32.

    Sums (not means) are stored so that results over disjoint sample sets, ranks or training steps
    merge by addition; :meth:`mean` divides by :attr:`num_samples`.

    Attributes:
        fingerprint: The model the relevance was computed on.
        settings: How it was computed (variant, epsilon, seed, padding, ...); results merge only
            when their settings agree.
        num_samples: Number of explained samples.
        neurons: Signed relevance of the MLP neurons, ``[num_layers, num_neurons]``.
        neurons_abs: Sum over samples of per-sample ``|R|`` of the neurons.
        heads: Signed relevance of the attention heads, ``[num_layers, num_heads]``.
        heads_abs: Sum over samples of per-sample ``|R|`` of the heads.
        weights: Signed weight relevance per prunable module name (same shape as the weight).
        weights_abs: Sum over samples of per-sample ``|R|`` of the weights (only if requested).
        explained: Per sample, the explained output value (sum of the seeded logits).
        input_relevance: Per sample, the relevance of each input token (token + position
            embedding), if collected.
        input_ids: Per sample, the token ids that ``input_relevance`` refers to.
    """

    fingerprint: ModelFingerprint
    settings: dict[str, Any]
    num_samples: int = 0
    neurons: torch.Tensor | None = None
    neurons_abs: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    heads_abs: torch.Tensor | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    weights_abs: dict[str, torch.Tensor] = field(default_factory=dict)
    explained: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    input_relevance: list[torch.Tensor] = field(default_factory=list)
    input_ids: list[torch.Tensor] = field(default_factory=list)

    # -- reading ------------------------------------------------------------------------------
    @overload
    def mean(self, component: Literal["neurons", "heads"], *, absolute: bool = False) -> torch.Tensor: ...

    @overload
    def mean(self, component: Literal["weights"], *, absolute: bool = False) -> dict[str, torch.Tensor]: ...

    @overload
    def mean(self, component: Granularity, *, absolute: bool = False) -> torch.Tensor | dict[str, torch.Tensor]: ...

    def mean(self, component: Granularity, *, absolute: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Mean relevance per sample.

        Args:
            component: ``"neurons"``, ``"heads"`` or ``"weights"``.
            absolute: Mean of per-sample ``|R|`` instead of the signed mean.

        Returns:
            A ``[num_layers, n]`` tensor, or for weights a dict of module name -> tensor.

        Raises:
            KeyError: The component (or its ``|R|`` form) was not collected.
        """
        if self.num_samples == 0:
            raise ValueError("this result holds no samples")
        value = getattr(self, f"{component}_abs" if absolute else component)
        if value is None or (isinstance(value, dict) and not value):
            raise KeyError(
                f"{component}{' |R|' if absolute else ''} relevance was not collected; pass "
                f"components including {component!r}"
                + (" and per_sample_abs_weights=True" if absolute and component == "weights" else "")
            )
        if isinstance(value, dict):
            return {name: tensor / self.num_samples for name, tensor in value.items()}
        return value / self.num_samples

    def top(
        self, component: Literal["neurons", "heads"], k: int = 10, *, absolute: bool = False
    ) -> list[tuple[int, int, float]]:
        """The ``k`` most relevant neurons or heads.

        Args:
            component: ``"neurons"`` or ``"heads"``.
            k: How many.
            absolute: Rank by mean ``|R|`` instead of signed mean.

        Returns:
            ``(layer, index, mean relevance)`` tuples, most relevant first.
        """
        scores = self.mean(component, absolute=absolute)
        assert isinstance(scores, torch.Tensor)
        values, flat = scores.flatten().topk(min(k, scores.numel()))
        width = scores.shape[1]
        return [(int(i) // width, int(i) % width, float(v)) for v, i in zip(values, flat)]

    # -- combining ----------------------------------------------------------------------------
    def merge(self, other: RelevanceResult) -> RelevanceResult:
        """Sum of two results over disjoint sample sets (same model and settings).

        Raises:
            FingerprintMismatchError: The results were computed on different models.
            ValueError: The results were computed with different settings.
        """
        if other.fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"cannot merge relevance of {other.fingerprint.short()} into {self.fingerprint.short()}"
            )
        if other.settings != self.settings:
            raise ValueError(f"cannot merge relevance computed with {other.settings} into {self.settings}")

        def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None or b is None:
                return a if b is None else b
            return a + b

        def add_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: a[k] + b[k] if k in a and k in b else {**b, **a}[k] for k in {**a, **b}}

        return RelevanceResult(
            fingerprint=self.fingerprint,
            settings=dict(self.settings),
            num_samples=self.num_samples + other.num_samples,
            neurons=add(self.neurons, other.neurons),
            neurons_abs=add(self.neurons_abs, other.neurons_abs),
            heads=add(self.heads, other.heads),
            heads_abs=add(self.heads_abs, other.heads_abs),
            weights=add_dict(self.weights, other.weights),
            weights_abs=add_dict(self.weights_abs, other.weights_abs),
            explained=torch.cat([self.explained, other.explained]),
            input_relevance=[*self.input_relevance, *other.input_relevance],
            input_ids=[*self.input_ids, *other.input_ids],
        )

    # -- persistence --------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {"explained": self.explained}
        for key in ("neurons", "neurons_abs", "heads", "heads_abs"):
            value = getattr(self, key)
            if value is not None:
                tensors[key] = value
        for prefix, mapping in (("weights", self.weights), ("weights_abs", self.weights_abs)):
            tensors.update({f"{prefix}/{name}": tensor for name, tensor in mapping.items()})
        for i, (rel, ids) in enumerate(zip(self.input_relevance, self.input_ids)):
            tensors[f"input_relevance/{i}"] = rel
            tensors[f"input_ids/{i}"] = ids
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save as ``relevance.safetensors`` + ``relevance.json``, atomically.

        Args:
            directory: Destination directory (an existing non-empty one is replaced only with ``overwrite``).
            overwrite: Replace an existing non-empty directory.

        Returns:
            The directory.

        Example:
            >>> result.save("runs/relevance")  # doctest: +SKIP
            >>> RelevanceResult.load("runs/relevance").top("neurons", 3)  # doctest: +SKIP
        """
        meta = {
            "format_version": _FORMAT_VERSION,
            "hf_lrp_surgery_version": __version__,
            "fingerprint": self.fingerprint.to_dict(),
            "settings": self.settings,
            "num_samples": self.num_samples,
        }
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_file(self._tensors(), str(tmp / _TENSORS_FILE), metadata={"format": "pt"})
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RelevanceResult:
        """Load a result saved with :meth:`save`.

        Raises:
            FileNotFoundError: The directory does not hold a saved result.
            ArtefactError: A file is unreadable, truncated, of an unknown format or missing an entry.
        """
        meta, tensors = read_artefact(
            directory, _META_FILE, _TENSORS_FILE, what="relevance result", version=_FORMAT_VERSION
        )
        count = sum(1 for key in tensors if key.startswith("input_ids/"))
        try:
            return cls(
                fingerprint=ModelFingerprint.from_dict(meta["fingerprint"]),
                settings=meta["settings"],
                num_samples=int(meta["num_samples"]),
                **component_tensors(tensors),
                explained=tensors["explained"],
                input_relevance=[tensors[f"input_relevance/{i}"] for i in range(count)],
                input_ids=[tensors[f"input_ids/{i}"] for i in range(count)],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ArtefactError(
                f"{directory}/{_META_FILE} or its tensors lack or garble an entry ({err!r}); save the result again"
            ) from err


def component_tensors(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The component fields of a :class:`RelevanceResult` from flat tensor names (as saved).

    Args:
        flat: ``neurons``, ``neurons_abs``, ``heads``, ``heads_abs``, ``weights/<module>`` and
            ``weights_abs/<module>`` tensors (others are ignored).

    Returns:
        Keyword arguments for :class:`RelevanceResult`.

    Example:
        >>> fields = component_tensors({"heads": torch.ones(2, 4), "weights/fc1": torch.ones(3, 3)})
        >>> fields["heads"].shape, list(fields["weights"]), fields["neurons"]
        (torch.Size([2, 4]), ['fc1'], None)
    """
    return {
        **{key: flat.get(key) for key in ("neurons", "neurons_abs", "heads", "heads_abs")},
        **{
            group: {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(f"{group}/")}
            for group in ("weights", "weights_abs")
        },
    }


__getattr__ = moved_names(__name__, {"Component": "hf_lrp_surgery.lrp.layout:Granularity"})
