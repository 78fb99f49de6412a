"""The standalone API: attribute, contrast, select, apply, save — each step a value you can keep."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from hf_lrp_surgery.apply import Carrier, CorrectedModel, apply_masks
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.lrp.attach import Variant
from hf_lrp_surgery.lrp.collect import SeedMode
from hf_lrp_surgery.masks import Granularity, Mask, Scope, select
from hf_lrp_surgery.references import ReferenceSource, load_reference_set
from hf_lrp_surgery.scoring import (
    SAMPLE_FREE_METHODS,
    Aggregation,
    Method,
    Normalization,
    Scores,
    contrast,
    score,
)

__all__ = ["Surgeon"]


class Surgeon:
    """Attribution-guided surgery on one model.

    Args:
        model: A supported causal LM (see ``hf_lrp_surgery.lrp.supported_model_types()``), in eval
            mode. It is never modified unless ``apply(..., inplace=True)`` is asked for.
        tokenizer: Its tokenizer (needed for text reference sets and saved with corrected models).
        batch_size: Samples per relevance pass.
        progress: Show progress bars.

    Raises:
        UnsupportedArchitectureError: The model type is not supported.

    Example:
        >>> surgeon = Surgeon(model, tokenizer)  # doctest: +SKIP
        >>> scores = surgeon.contrast(undesired=toxic_pairs, general=neutral_pairs)  # doctest: +SKIP
        >>> mask = surgeon.select(scores, "neurons", 50)  # doctest: +SKIP
        >>> corrected = surgeon.apply(mask, carrier="adapter")  # doctest: +SKIP
        >>> surgeon.save("runs/detox")  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, batch_size: int = 8, progress: bool = True) -> None:
        resolve(model)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.corrected: CorrectedModel | None = None

    def attribute(
        self,
        samples: ReferenceSource,
        *,
        method: Method = "lrp",
        components: Sequence[Granularity] = ("neurons",),
        aggregation: Aggregation = "signed",
        seed: SeedMode = "logit",
        variant: Variant = "attnlrp",
        epsilon: float = 0.0,
        limit: int | None = None,
        random_seed: int = 0,
        description: str | None = None,
    ) -> Scores:
        """Score components on one reference set (see :func:`hf_lrp_surgery.scoring.score`).

        Args:
            samples: Strings, ``(prompt, continuation)`` pairs, a file path or a ``datasets``
                object (see :func:`~hf_lrp_surgery.references.load_reference_set`); ignored by the
                sample-free methods ``magnitude`` and ``random``.
            method, components, aggregation, seed, variant, epsilon, random_seed: See ``score``.
            limit: Use only the first ``limit`` samples.
            description: Progress bar label.

        Returns:
            The :class:`~hf_lrp_surgery.scoring.Scores` (higher = keep).
        """
        reference = [] if method in SAMPLE_FREE_METHODS else load_reference_set(samples, limit=limit)
        return score(
            self.model,
            reference,
            self.tokenizer,
            method=method,
            components=components,
            aggregation=aggregation,
            seed=seed,
            variant=variant,
            epsilon=epsilon,
            batch_size=self.batch_size,
            random_seed=random_seed,
            progress=self.progress,
            description=description,
        )

    def contrast(
        self,
        *,
        undesired: ReferenceSource | Scores,
        general: ReferenceSource | Scores,
        method: Method = "lrp",
        components: Sequence[Granularity] = ("neurons",),
        normalize: Normalization = "total",
        protect_top: float = 0.05,
        **attribute_options: Any,
    ) -> Scores:
        """Differential scores ``general - undesired`` (low = prune; see :func:`~hf_lrp_surgery.scoring.contrast`).

        Args:
            undesired: The behaviour to remove: a reference set, or scores already computed.
            general: The behaviour to keep: a reference set, or scores already computed.
            method: Scoring method for sets given as samples. For ``magnitude`` and ``random``
                there is nothing to contrast and their plain scores are returned.
            components: Component kinds to score.
            normalize: Per-set normalisation (``"none"``, ``"total"``, ``"max"``, ``"layer"``).
            protect_top: Fraction of components with the largest general ``|score|`` that are never pruned.
            **attribute_options: Passed to :meth:`attribute` (``aggregation``, ``seed``, ``limit``, ...).

        Returns:
            The contrastive :class:`~hf_lrp_surgery.scoring.Scores`.
        """
        if method in SAMPLE_FREE_METHODS and not isinstance(general, Scores):
            return self.attribute([], method=method, components=components, **attribute_options)
        sets = {}
        for name, source in (("general", general), ("undesired", undesired)):
            sets[name] = (
                source
                if isinstance(source, Scores)
                else self.attribute(
                    source, method=method, components=components, description=f"{method} ({name})", **attribute_options
                )
            )
        return contrast(sets["general"], sets["undesired"], normalize=normalize, protect_top=protect_top)

    def select(
        self,
        scores: Scores,
        granularity: Granularity = "neurons",
        budget: int | float = 50,
        *,
        scope: Scope = "global",
        modules: Sequence[str] | str | None = None,
        layers: Sequence[int] | None = None,
    ) -> Mask:
        """Prune the lowest-scoring components (see :func:`hf_lrp_surgery.masks.select`)."""
        return select(scores, granularity, budget, scope=scope, modules=modules, layers=layers)

    def apply(
        self, masks: Mask | Sequence[Mask], carrier: Carrier = "adapter", *, inplace: bool = False
    ) -> CorrectedModel:
        """Apply masks as an IA3 adapter or baked into the weights (see :func:`hf_lrp_surgery.apply.apply_masks`).

        Returns:
            The verified :class:`~hf_lrp_surgery.apply.CorrectedModel`; also kept for :meth:`save`.
        """
        self.corrected = apply_masks(self.model, masks, carrier, inplace=inplace)
        return self.corrected

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        corrected: CorrectedModel | None = None,
        base_model_name_or_path: str | None = None,
    ) -> Path:
        """Save the last corrected model (or ``corrected``) with the tokenizer, masks and check record.

        Raises:
            ValueError: Nothing was applied yet.
        """
        target = corrected or self.corrected
        if target is None:
            raise ValueError("nothing to save: call apply() first")
        return target.save(directory, tokenizer=self.tokenizer, base_model_name_or_path=base_model_name_or_path)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        corrected: CorrectedModel | None = None,
        directory: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Push the last corrected model (or ``corrected``) with its mask manifest and card to a Hub repo.

        Args:
            repo_id: ``namespace/name``.
            corrected: What to push (default: the result of the last :meth:`apply`).
            directory: Where it is saved before the upload (default: a temporary directory, removed after
                a successful push and kept after a failed one).
            **kwargs: Passed to :func:`hf_lrp_surgery.hub.push_to_hub` (``private``, ``commit_message``,
                ``base_model`` (the base's Hub id; required for adapters of a model loaded from a local
                path), ``token``, ``endpoint``, ``license``, ...).

        Returns:
            The ``CommitInfo`` of the upload.

        Raises:
            ValueError: Nothing was applied yet and no ``corrected`` was given.
            PushError: The push failed; the local copy is kept and the message says how to retry.

        Example:
            >>> base = "HuggingFaceTB/SmolLM2-135M-Instruct"
            >>> surgeon.push_to_hub("me/smollm2-detox-ia3", base_model=base)  # doctest: +SKIP
        """
        from hf_lrp_surgery.hub import push_to_hub

        target = corrected or self.corrected
        if target is None:
            raise ValueError("nothing to push: call apply() first or pass corrected=")
        return push_to_hub(target, repo_id, tokenizer=self.tokenizer, local_dir=directory, **kwargs)
