"""The standalone API: attribute, contrast, select, apply, save — each step a value you can keep."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from hf_lrp_surgery.carriers import CarrierName, CorrectedModel, apply_masks
from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.lrp.architectures import resolve
from hf_lrp_surgery.masks import Granularity, Mask
from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions, reject_unknown
from hf_lrp_surgery.references import ReferenceSource, load_reference_set
from hf_lrp_surgery.scoring import Scores, contrast, get_scorer, score, score_pair

if TYPE_CHECKING:  # correction drives the Surgeon, so it is imported where the recipe runs
    from hf_lrp_surgery.correction import Behaviour, RecipeResult

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
        options: ScoringOptions | None = None,
        *,
        limit: int | None = None,
        description: str | None = None,
        **keywords: Any,
    ) -> Scores:
        """Score components on one reference set (see :func:`hf_lrp_surgery.scoring.score`).

        Args:
            samples: Strings, ``(prompt, continuation)`` pairs, a file path or a ``datasets``
                object (see :func:`~hf_lrp_surgery.references.load_reference_set`); ignored by the
                sample-free methods ``magnitude`` and ``random``.
            options: The :class:`~hf_lrp_surgery.options.ScoringOptions` (default: their defaults,
                with the Surgeon's ``batch_size``).
            limit: Use only the first ``limit`` samples.
            description: Progress bar label.
            **keywords: Fields of ``ScoringOptions`` (``method``, ``components``, ``aggregation``,
                ``objective``, ``variant``, ``epsilon``, ``random_seed``, ...), replacing those of
                ``options``; ``seed`` is a deprecated name of ``objective``.

        Returns:
            The :class:`~hf_lrp_surgery.scoring.Scores` (higher = keep).

        Raises:
            ValueError: An option is out of range or the method is not registered.
            TypeError: A keyword is not a scoring option.
            ReferenceSetError: A method that needs samples got an empty set.

        Example:
            >>> scores = surgeon.attribute(toxic_pairs, method="wanda", components=["heads"])  # doctest: +SKIP
        """
        options = ScoringOptions.take(options, keywords, batch_size=self.batch_size)
        reject_unknown(keywords, "Surgeon.attribute")
        reference = load_reference_set(samples, limit=limit) if get_scorer(options.method).needs_samples else []
        return score(self.model, reference, self.tokenizer, options, progress=self.progress, description=description)

    def contrast(
        self,
        *,
        undesired: ReferenceSource | Scores,
        general: ReferenceSource | Scores,
        options: ScoringOptions | None = None,
        contrast_options: ContrastOptions | None = None,
        limit: int | None = None,
        **keywords: Any,
    ) -> Scores:
        """Differential scores ``general - undesired`` (low = prune; see :func:`~hf_lrp_surgery.scoring.contrast`).

        A paired method (``scoring.PAIRED_METHODS``: ``aura``, ``atp``, ``repetition_neurons``) reads
        both sets together and is its own contrast: its scores (see
        :func:`~hf_lrp_surgery.scoring.score_pair`) are returned as they are, with no normalisation
        or protection.

        Args:
            undesired: The behaviour to remove: a reference set, or scores already computed (not
                for paired methods).
            general: The behaviour to keep: a reference set, or scores already computed (not for
                paired methods).
            options: How sets given as samples are scored (as in :meth:`attribute`). For sample-free
                methods there is nothing to contrast and their plain scores are returned.
            contrast_options: The :class:`~hf_lrp_surgery.options.ContrastOptions` (paired methods
                take only the defaults, which they do not apply).
            limit: Use only the first ``limit`` samples of each set.
            **keywords: Fields of either options class (``method``, ``components``, ``normalize``,
                ``protect_top``, ``aggregation``, ``objective``, ...), replacing theirs.

        Returns:
            The contrastive :class:`~hf_lrp_surgery.scoring.Scores` (paired methods: their own scores).

        Raises:
            ValueError: An option is out of range, or a paired method was given contrast options.
            TypeError: A keyword is not an option.
            ReferenceSetError: A paired method was given scores instead of a reference set, or an empty set.

        Example:
            >>> scores = surgeon.contrast(undesired=toxic, general=neutral, method="aura")  # doctest: +SKIP
        """
        contrasting = ContrastOptions.take(contrast_options, keywords)
        options = ScoringOptions.take(options, keywords, batch_size=self.batch_size)
        reject_unknown(keywords, "Surgeon.contrast")
        entry = get_scorer(options.method)
        if entry.paired:
            if isinstance(undesired, Scores) or isinstance(general, Scores):
                raise ReferenceSetError(
                    f"the {options.method} method scores the undesired and the general set together; pass both "
                    "as reference sets, not as Scores"
                )
            if contrasting != ContrastOptions():
                raise ValueError(
                    f"the {options.method} method is its own contrast and applies no normalize or protect_top; "
                    f"leave the contrast options at their defaults (got {contrasting.to_dict()})"
                )
            return score_pair(
                self.model,
                load_reference_set(undesired, limit=limit),
                load_reference_set(general, limit=limit),
                self.tokenizer,
                options,
                progress=self.progress,
            )
        if not entry.needs_samples and not isinstance(general, Scores):
            return self.attribute([], options)
        sets = {}
        for name, source in (("general", general), ("undesired", undesired)):
            sets[name] = (
                source
                if isinstance(source, Scores)
                else self.attribute(source, options, limit=limit, description=f"{options.method} ({name})")
            )
        return contrast(sets["general"], sets["undesired"], contrasting)

    def select(
        self,
        scores: Scores,
        granularity: Granularity | None = None,
        budget: int | float = 50,
        *,
        options: SelectionOptions | None = None,
        **keywords: Any,
    ) -> Mask:
        """Prune the lowest-scoring components (see :func:`hf_lrp_surgery.masks.select`).

        Args:
            scores: What to select from (higher = keep).
            granularity: The component kind (default: that of ``options``, ``"neurons"``).
            budget: A count, or a fraction of the eligible components.
            options: The :class:`~hf_lrp_surgery.options.SelectionOptions`.
            **keywords: Their fields (``scope``, ``modules``, ``layers``), replacing those of ``options``.

        Returns:
            The :class:`~hf_lrp_surgery.masks.Mask`.

        Raises:
            ValueError: An option is out of range.
            TypeError: A keyword is not a selection option.
            BudgetError: The budget is not positive or exceeds the eligible components.

        Example:
            >>> mask = surgeon.select(scores, "heads", 2, scope="per_layer")  # doctest: +SKIP
        """
        if granularity is not None:
            keywords["granularity"] = granularity
        options = SelectionOptions.take(options, keywords)
        reject_unknown(keywords, "Surgeon.select")
        return options.select(scores, budget)

    def apply(
        self, masks: Mask | Sequence[Mask], carrier: CarrierName = "adapter", *, inplace: bool = False
    ) -> CorrectedModel:
        """Apply masks as an IA3 adapter or baked into the weights (see :func:`hf_lrp_surgery.carriers.apply_masks`).

        Returns:
            The verified :class:`~hf_lrp_surgery.carriers.CorrectedModel`; also kept for :meth:`save`.
        """
        self.corrected = apply_masks(self.model, masks, carrier, inplace=inplace)
        return self.corrected

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        corrected: CorrectedModel | None = None,
        base_model_name_or_path: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Save the last corrected model (or ``corrected``) with the tokenizer, masks and check record.

        Args:
            directory: Destination (an existing non-empty one is replaced only with ``overwrite``).
            corrected: What to save (default: the result of the last :meth:`apply`).
            base_model_name_or_path: For adapters: where the base model loads from.
            overwrite: Replace an existing non-empty directory.

        Returns:
            The directory.

        Raises:
            ValueError: Nothing was applied yet.
            OutputExistsError: ``directory`` is not empty and ``overwrite`` is false, or is a file.
        """
        target = corrected or self.corrected
        if target is None:
            raise ValueError("nothing to save: call apply() first")
        return target.save(
            directory, tokenizer=self.tokenizer, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite
        )

    def correct(self, behaviour: Behaviour, output: str | os.PathLike[str], **options: Any) -> RecipeResult:
        """Correct a behaviour end to end: paired sets, attribution, budget search, saved model, held-out numbers.

        Args:
            behaviour: A shipped behaviour (:func:`~hf_lrp_surgery.correction.detox_behaviour`, ...) or
                your own (:func:`~hf_lrp_surgery.correction.user_behaviour`).
            output: Where the recipe writes ``report.json``, ``mask/``, ``adapter/``, ``baked/`` and the plots.
            **options: The recipe's options (``budgets``, ``limits``, ``focus``, ``prompts``, ``overwrite``,
                ``method``, ``granularity``, ...; see :func:`~hf_lrp_surgery.correction.run_recipe`); the
                Surgeon's ``batch_size`` and ``progress`` are used unless given.

        Returns:
            The :class:`~hf_lrp_surgery.correction.RecipeResult`.

        Raises:
            OutputExistsError: ``output`` would replace something.
            BudgetError: A budget does not fit the model.
            ReferenceSetError: No attribution prompt got both an undesired and a desired continuation.

        Example:
            >>> behaviour = user_behaviour("prompts.txt", "mypkg.judge:score")  # doctest: +SKIP
            >>> result = surgeon.correct(behaviour, "runs/fix", budgets=[10, 50])  # doctest: +SKIP
        """
        from hf_lrp_surgery.correction import run_recipe

        options.setdefault("progress", self.progress)
        if options.get("scoring") is None:
            options.setdefault("batch_size", self.batch_size)
        return run_recipe(self.model, self.tokenizer, behaviour, output, **options)

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
