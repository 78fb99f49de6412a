"""``LRPSurgeryCallback``: relevance, surgery and mask enforcement inside a ``transformers.Trainer``.

The callback drives the library's ordinary functions from Trainer events; it has no relevance,
contrast, selection or carrier code of its own:

* **relevance during fine-tuning** (``every_n_steps``, ``on_evaluate``, ``at_end``): each pass
  runs :func:`~hf_lrp_surgery.lrp.collect.collect_relevance` on the two reference sets in eval
  mode (no dropout, no gradient checkpointing), with the optimizer's gradients set aside and put
  back, and adds the result to running sums (:class:`RelevanceAccumulator`: the mean over every
  sample of every pass). Summaries go into the Trainer's logs: the undesired mass per layer of the
  contrast and the next candidates for pruning;
* **surgery** at the end of training, or at every checkpoint: :func:`~hf_lrp_surgery.scoring.contrast`
  of the accumulated relevance, :func:`~hf_lrp_surgery.masks.select`, then
  :func:`~hf_lrp_surgery.carriers.apply_masks` and :func:`~hf_lrp_surgery.carriers.save_corrected`
  next to the checkpoint, and an optional push;
* **masks enforced while training** (:class:`MaskEnforcer`): a mask given up front, or made at a
  checkpoint, stays exactly in place until training ends;
* **resume**: the accumulated relevance and the masks are saved into every checkpoint and restored
  when the Trainer resumes from one;
* **several processes** (DDP, ``accelerate launch``, ``torchrun``): each rank explains its share of
  the reference samples, sums and counts are all-reduced, the masks are rank 0's on every rank and
  only the main process writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, SupportsIndex, cast

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_lrp_surgery.carriers import CarrierName, apply_masks, get_carrier
from hf_lrp_surgery.correction.behaviours import Behaviour
from hf_lrp_surgery.correction.paired import paired_contrast_sets
from hf_lrp_surgery.exceptions import ReferenceSetError, TrainingSetupError, TrainingStateError
from hf_lrp_surgery.fingerprint import ModelFingerprint, fingerprint
from hf_lrp_surgery.io import atomic_directory, check_output, write_json_atomic
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, unwrap_model
from hf_lrp_surgery.lrp.collect import collect_relevance
from hf_lrp_surgery.lrp.layout import GRANULARITIES
from hf_lrp_surgery.masks import Mask, select
from hf_lrp_surgery.masks.selection import budget_count, match_groups, plain_budget
from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions, reject_unknown
from hf_lrp_surgery.references import ReferenceSource, load_reference_set
from hf_lrp_surgery.references.samples import ARGMAX, ReferenceSample, encode_sample
from hf_lrp_surgery.scoring import Scores, contrast
from hf_lrp_surgery.training._state_files import UNREADABLE, check_format, damaged, entry, read_json_object
from hf_lrp_surgery.training.accumulate import SETS, RelevanceAccumulator, distributed_rank_and_size
from hf_lrp_surgery.training.enforce import MaskEnforcer

__all__ = ["LRPSurgeryCallback", "STATE_DIR", "CORRECTED_DIR"]

#: Sub-directory of a Trainer checkpoint that holds the callback's state.
STATE_DIR = "lrp_surgery"
#: Sub-directory of a Trainer checkpoint (or of ``args.output_dir`` at the end) with the corrected model.
CORRECTED_DIR = "corrected"
_STATE_FILE = "state.json"
_STATE_FORMAT = 1
_LOG_PREFIX = "lrp/"

PushFn = Callable[[Path, str], Any]


def _samples_digest(samples: Mapping[str, Sequence[ReferenceSample | str]]) -> str:
    """A hash of the reference sets (or of a behaviour's prompts), to refuse resuming a run with other sets."""
    return hashlib.sha256(json.dumps({k: [repr(s) for s in v] for k, v in samples.items()}).encode()).hexdigest()


class LRPSurgeryCallback(TrainerCallback):
    """Attribution-guided surgery during fine-tuning with any ``transformers.Trainer`` (or trl trainer).

    Args:
        undesired: The behaviour to remove (any form :func:`~hf_lrp_surgery.references.load_reference_set`
            takes). Needed for relevance passes and surgery.
        general: The behaviour to keep.
        behaviour: Instead of ``undesired`` and ``general``: a
            :class:`~hf_lrp_surgery.correction.Behaviour` (a shipped one, or
            :func:`~hf_lrp_surgery.correction.user_behaviour`). At every relevance pass its train prompts
            are continued by the model being fine-tuned, and its undesired and desired continuations of
            the same prompts (:func:`~hf_lrp_surgery.correction.paired_contrast_sets`, with focus) are the
            two sets explained, so the surgery follows the behaviour as training changes it.
        tokenizer: Tokenizes text samples (default: the Trainer's ``processing_class``); saved with
            the corrected model.
        masks: Masks to enforce from the first step (at most one per granularity), built for the
            model being trained (the fingerprint is checked on a fresh run).
        budget: Units each surgery prunes in addition to those already pruned (a count, numpy integers
            included, or a fraction of the eligible units), as in :func:`~hf_lrp_surgery.masks.select`.
            Checked here, and against the model's component count before the first training step.
        scoring_options: How relevance passes score (:class:`~hf_lrp_surgery.options.ScoringOptions`):
            ``method`` ``"lrp"`` (AttnLRP) or ``"gradient"`` (gradient x input, no rules),
            ``aggregation``, ``objective``, ``variant``, ``epsilon``, ``batch_size``; the scored
            components are the selection's granularity.
        contrast_options: :class:`~hf_lrp_surgery.options.ContrastOptions` of the surgery's contrast.
        selection_options: What surgery prunes (:class:`~hf_lrp_surgery.options.SelectionOptions`):
            ``granularity`` (``"neurons"``, ``"heads"`` or ``"weights"``), ``scope``, ``modules``, ``layers``.
        every_n_steps: Run a relevance pass every this many optimizer steps (``None``: never).
        on_evaluate: Also run one after every evaluation.
        at_end: Also run one at the last step (before surgery at the end), when relevance is used at all.
        surgery: ``"end"`` (one selection when training ends), ``"save"`` (one selection at every
            checkpoint, enforced from then on) or ``None`` (relevance and enforcement only).
        carrier: How the saved corrected model carries the masks: ``"bake"`` (an ordinary
            checkpoint with zeros) or ``"adapter"`` (IA3 on the fine-tuned base; neurons and heads).
        output_dir: Where the corrected model is saved at the end (default:
            ``<args.output_dir>/corrected``); at checkpoints it goes to ``<checkpoint>/corrected``.
        overwrite: Replace a non-empty ``output_dir`` at the end of training; without it such a
            directory is refused before the first step. ``<checkpoint>/corrected`` is always
            rewritten, as the Trainer rewrites the checkpoint.
        base_model_name_or_path: For ``carrier="adapter"`` at the end: where the fine-tuned base
            loads from (default: it is saved next to the adapter, in ``<output_dir>-base``).
        push_to_hub: A Hub repo id to push every saved corrected model to (main process only).
        push_fn: ``push_fn(directory, repo_id, **push_kwargs)`` does the push (default:
            ``hf_lrp_surgery.hub.push_to_hub``). A failed push is a warning (with the directory
            to retry from), never the end of a training run; failures are kept in ``push_errors``.
        push_kwargs: Extra keyword arguments of ``push_fn`` (e.g. ``private=True``, ``base_model=``).
        limit: Use at most this many samples of each set.
        top_k: Pruning candidates written to the logs.
        progress: Show progress bars during relevance passes.
        **keywords: Fields of the three options classes (``granularity``, ``scope``, ``method``,
            ``normalize``, ``aggregation``, ``objective``, ``batch_size``, ...), replacing theirs;
            ``seed`` is a deprecated name of ``objective``.

    Raises:
        ReferenceSetError: A relevance schedule or surgery is asked for without both reference sets (or a
            behaviour); or, at a relevance pass, no prompt of the behaviour got both an undesired and a
            desired continuation.
        BudgetError: ``budget`` is not a count >= 1 or a fraction in (0, 1].
        ValueError: An option is out of range, ``carrier="adapter"`` with weight masks, or a behaviour
            given together with reference sets.
        TypeError: A keyword is not an option.

    Before the first training step (:meth:`on_train_begin`) the callback also checks what needs the
    model: the budget against its component count, the tokenizer against its vocabulary, every
    reference sample's encoding, and on resume the checkpoint's state (see :meth:`on_train_begin`).

    Example:
        >>> callback = LRPSurgeryCallback(undesired=toxic_pairs, general=clean_pairs, granularity="neurons",
        ...                               budget=20, every_n_steps=50)  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=train)  # doctest: +SKIP
        >>> callback.attach(trainer)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        undesired: ReferenceSource | None = None,
        general: ReferenceSource | None = None,
        *,
        behaviour: Behaviour | None = None,
        tokenizer: Any = None,
        masks: Mask | Sequence[Mask] | None = None,
        budget: int | float | SupportsIndex = 50,
        scoring_options: ScoringOptions | None = None,
        contrast_options: ContrastOptions | None = None,
        selection_options: SelectionOptions | None = None,
        every_n_steps: int | None = None,
        on_evaluate: bool = False,
        at_end: bool = True,
        surgery: Literal["end", "save"] | None = "end",
        carrier: CarrierName = "bake",
        output_dir: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        base_model_name_or_path: str | None = None,
        push_to_hub: str | None = None,
        push_fn: PushFn | None = None,
        push_kwargs: dict[str, Any] | None = None,
        limit: int | None = None,
        top_k: int = 3,
        progress: bool = False,
        **keywords: Any,
    ) -> None:
        self.selection = SelectionOptions.take(selection_options, keywords)
        granularity = self.selection.granularity
        self.contrast_options = ContrastOptions.take(contrast_options, keywords)
        keywords.setdefault("components", (granularity,))
        self.scoring = ScoringOptions.take(scoring_options, keywords)
        reject_unknown(keywords, "LRPSurgeryCallback")
        method = self.scoring.method
        if surgery not in ("end", "save", None):
            raise ValueError(f"surgery must be 'end', 'save' or None, got {surgery!r}")
        saving = get_carrier(carrier)  # refuses an unregistered name, listing the registered ones
        if not saving.persistent:
            raise ValueError(f"the {carrier!r} carrier saves no model; use a carrier that does, e.g. 'bake'")
        if method not in ("lrp", "gradient"):
            raise ValueError(f"method must be 'lrp' or 'gradient' (relevance needs samples), got {method!r}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.budget = _as_budget(budget)
        mask_list = [masks] if isinstance(masks, Mask) else list(masks or [])
        if len({m.granularity for m in mask_list}) != len(mask_list):
            raise ValueError(f"give at most one mask per granularity, got {[m.granularity for m in mask_list]}")
        carried = {m.granularity for m in mask_list} | ({granularity} if surgery else set())
        refused = sorted(carried - saving.granularities)
        if refused:
            form = saving.card.form if saving.card else carrier
            raise ValueError(
                f"{', '.join(refused)} masks have no exact form as {form} (carrier={carrier!r}); use carrier='bake'"
            )
        if saving.base_config and push_to_hub and not (push_kwargs or {}).get("base_model"):
            raise ValueError(
                "an adapter saved by the callback sits on the fine-tuned weights, which exist only locally, so the Hub "
                "copy would not load; push with carrier='bake' (a self-contained checkpoint), or push the fine-tuned "
                "base first and pass push_kwargs={'base_model': '<its repo id>'}"
            )
        self.relevance_wanted = bool(every_n_steps or on_evaluate or surgery)
        self.samples: dict[str, list[ReferenceSample]] = {}
        if behaviour is not None and (undesired is not None or general is not None):
            raise ValueError("give a behaviour or the two reference sets undesired= and general=, not both")
        self.behaviour = behaviour
        self.behaviour_prompts = behaviour.prompts_for("train") if behaviour is not None else []
        if self.relevance_wanted and behaviour is None:
            for name, source in (("general", general), ("undesired", undesired)):
                if source is None:
                    raise ReferenceSetError(
                        f"relevance passes and surgery contrast two reference sets, but {name}= was not given; pass "
                        "both undesired= and general= (or surgery=None and no schedule, to only enforce masks)"
                    )
                self.samples[name] = load_reference_set(source, limit=limit)
        self.tokenizer = tokenizer
        self.initial_masks = mask_list
        self.every_n_steps = every_n_steps
        self.on_evaluate_pass = on_evaluate
        self.at_end = at_end
        self.surgery = surgery
        self.carrier: CarrierName = carrier
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.base_model_name_or_path = base_model_name_or_path
        self.push_to_hub = push_to_hub
        self.push_fn = push_fn
        self.push_kwargs = dict(push_kwargs or {})
        self.push_errors: list[str] = []
        self.top_k = top_k
        self.progress = progress
        self.enforcer: MaskEnforcer | None = None
        self.accumulator: RelevanceAccumulator | None = None
        self.surgery_steps: list[int] = []
        self.saved: list[Path] = []
        self._pending_logs: dict[str, float] = {}

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> LRPSurgeryCallback:
        """Add the callback to ``trainer`` right after its flow callback, before the reporting integrations.

        ``trainer.add_callback(callback)`` works too, but puts the callback after TensorBoard / W&B,
        which then never see the relevance summaries (they still reach ``state.log_history`` and the
        console).

        Args:
            trainer: A ``transformers.Trainer`` (or a subclass such as trl's trainers).

        Returns:
            The callback.
        """
        from transformers.trainer_callback import DefaultFlowCallback

        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, self)
        return self

    @property
    def masks(self) -> dict[str, Mask]:
        """The masks in force, by granularity."""
        if self.enforcer is None:
            return {m.granularity: m for m in self.initial_masks}
        return dict(self.enforcer.masks)

    # -- checks -------------------------------------------------------------------------------
    def _check_setup(self, args: TrainingArguments, model: nn.Module) -> None:
        weight_masks = any(m.granularity == "weights" for m in self.initial_masks) or (
            self.surgery is not None and self.selection.granularity == "weights"
        )
        fsdp = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        if fsdp or _sharded(model):
            raise TrainingSetupError(
                "LRPSurgeryCallback does not support FSDP: relevance passes, weight masks and surgery need whole, "
                "unsharded parameters on every rank. Train with DDP (torchrun / accelerate launch without an FSDP "
                "config), or apply the mask after training with hf_lrp_surgery.Surgeon"
            )
        deepspeed = bool(getattr(args, "deepspeed", None)) or os.environ.get(
            "ACCELERATE_USE_DEEPSPEED", ""
        ).lower() in ("1", "true")
        if deepspeed and (weight_masks or self.relevance_wanted):
            raise TrainingSetupError(
                "under DeepSpeed, LRPSurgeryCallback only enforces neuron and head masks given up front (activation "
                "masks): DeepSpeed keeps fp32 master weights, so zeroed weights do not stay zero, and ZeRO partitions "
                "the parameters that relevance passes and surgery read. Pass masks= with surgery=None and no "
                "relevance schedule, or train with DDP"
            )
        if self.surgery is not None and unwrap_model(model) is not model:
            raise TrainingSetupError(
                "surgery needs a plain model, but this one is PEFT-wrapped (e.g. LoRA fine-tuning); pass surgery=None "
                "(relevance and enforcement work), then merge the adapter (merge_and_unload()) and run "
                "hf_lrp_surgery.Surgeon on the merged model"
            )

    def _check_initial_mask(self, mask: Mask, model: nn.Module, resumed: bool) -> None:
        if not resumed or not fingerprint(model).same_architecture(mask.fingerprint):
            mask.check_model(model)  # raises, naming what differs

    def _check_references(self, arch: ResolvedArchitecture) -> None:
        """Tokenise every reference sample once and check its ids (and the tokenizer's) against the vocabulary.

        Args:
            arch: The resolved model being trained.

        Raises:
            TrainingSetupError: The tokenizer has more tokens than the model's embedding has rows.
            ReferenceSetError: A sample does not encode (text without a tokenizer, empty, too long, ...)
                or holds a token id outside the vocabulary; the message names the set and the sample.
        """
        embedding = arch.token_embedding
        rows = int(getattr(embedding, "num_embeddings", None) or arch.embedding_weight.shape[0])
        size = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        if size is not None and size > rows:
            raise TrainingSetupError(
                f"the tokenizer has {size} tokens but the model's embedding only {rows} rows, so ids {rows} and up "
                "have no embedding; resize it before training (model.resize_token_embeddings(len(tokenizer))) or "
                "pass this model's own tokenizer"
            )
        for name, samples in self.samples.items():
            for index, sample in enumerate(samples):
                try:
                    encoded = encode_sample(sample, index, self.tokenizer, arch.max_positions)
                except ReferenceSetError as err:
                    raise type(err)(f"the {name} reference set: {err}") from err
                ids = encoded.ids + [token for _, token in encoded.seeds if token != ARGMAX]
                outside = [i for i in ids if not 0 <= i < rows]
                if outside:
                    raise ReferenceSetError(
                        f"sample {index} of the {name} reference set has token id {outside[0]}, outside the model's "
                        f"vocabulary of {rows} (ids 0..{rows - 1}); encode it with this model's tokenizer"
                    )

    def _check_budget(self) -> None:
        """Refuse a budget the first surgery cannot meet, before training rather than when it ends.

        The eligible units counted here are those in the chosen layers (and module groups) that no
        mask in force holds yet; units the contrast protects are known only at surgery, so this is
        an upper bound and a budget that passes can still be refused then.

        Raises:
            BudgetError: The budget exceeds the eligible units, or a fraction of them rounds to 0.
            ModuleGroupError: A module group matches no prunable module.
            ValueError: ``layers`` is not a subset of the model's blocks.
        """
        assert self.enforcer is not None
        if self.surgery is None:
            return
        layout, granularity, layers = self.enforcer.layout, self.selection.granularity, self.selection.layers
        chosen = set(range(layout.num_layers)) if layers is None else set(layers)
        if not chosen or not chosen <= set(range(layout.num_layers)):
            raise ValueError(f"layers must be a non-empty subset of 0..{layout.num_layers - 1}, got {layers}")
        if granularity == "weights":
            sizes = {p.name: p.weight.numel() for p in self.enforcer.arch.prunable}
            matched = match_groups(layout, self.selection.modules)
            groups = {n: sizes[n] for n in matched if layout.weight_modules[n][0] in chosen}
        else:
            per_module = layout.units_per_module(granularity) or 0
            groups = {layout.carriers(granularity)[layer]: per_module for layer in chosen}
        in_force = self.enforcer.masks.get(granularity)
        held = in_force.indices if in_force is not None else {}
        pruned = sum(int(index.numel()) for name, index in held.items() if name in groups)
        what = f"{granularity} in {len(groups)} {'modules' if granularity == 'weights' else 'layers'}"
        if pruned:
            what += f" ({pruned} more are masked already)"
        budget_count(self.budget, sum(groups.values()) - pruned, what)

    # -- events -------------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        """Check the set-up, restore a resumed run's state and start enforcing the masks.

        Everything that can fail is checked here, before the first training step: the set-up, the
        tokenizer against the model's vocabulary, every reference sample's encoding, the masks, a
        resumed checkpoint's state, the budget against the model's component count, and that the
        corrected model's ``output_dir`` is free. When a check fails, the enforcement hooks come off again.

        Args:
            args: The Trainer's arguments.
            state: The Trainer's state (``global_step > 0`` when it resumed from a checkpoint).
            control: The Trainer's control flags.
            model: The model being trained.
            optimizer: The optimizer whose state is cleared at pruned weights.
            processing_class: The Trainer's tokenizer or processor (used when ``tokenizer=`` was not given).
            **kwargs: Further Trainer objects (unused).

        Raises:
            TrainingSetupError: FSDP, DeepSpeed beyond activation masks, surgery on a PEFT model, no
                model, or a tokenizer larger than the model's vocabulary.
            ReferenceSetError: A reference sample does not encode, or holds ids outside the vocabulary.
            BudgetError: The budget exceeds the units the first surgery may prune.
            OutputExistsError: The corrected model's ``output_dir`` is not empty and ``overwrite`` is false.
            TrainingStateError: A resumed checkpoint's callback state is missing, damaged or from another set-up.

        Example:
            >>> trainer.train()  # calls on_train_begin before step 1  # doctest: +SKIP
        """
        if model is None:
            raise TrainingSetupError("the Trainer passed no model to the callback")
        self._check_setup(args, model)
        if self.tokenizer is None:
            self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if self.push_to_hub and self.push_fn is None:
            self.push_fn = _default_push()
        self.enforcer = MaskEnforcer(model)
        self._check_references(self.enforcer.arch)
        layout = self.enforcer.layout
        self.accumulator = RelevanceAccumulator(
            layout=layout,
            components=self.scoring.components,
            settings={**self._relevance_settings(), "components": list(self.scoring.components)},
        )
        self.surgery_steps, self.saved, self._pending_logs = [], [], {}
        resumed = state.global_step > 0
        for mask in self.initial_masks:  # all checked before a weight mask changes the fingerprint
            self._check_initial_mask(mask, model, resumed)
        try:
            for mask in self.initial_masks:
                self.enforcer.add(mask, optimizer)
            if resumed:
                self._restore(args, state, model, optimizer)
            self._check_budget()  # against the units no mask in force (given or restored) holds yet
            if (self.initial_masks or self.surgery) and state.is_world_process_zero:
                check_output(self._final_dir(args), overwrite=self.overwrite)  # saved to when training ends
        except Exception:
            self.enforcer.remove()  # a run that does not start leaves no hooks on the model
            raise

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Put the weight masks (and the optimizer state at them) back after the update."""
        if self.enforcer is not None:
            self.enforcer.after_optimizer_step(optimizer)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        """Run the scheduled relevance pass (and the final one at the last step)."""
        step = state.global_step
        scheduled = self.every_n_steps is not None and step % self.every_n_steps == 0
        last = self.at_end and self.relevance_wanted and step >= state.max_steps > 0
        if (scheduled or last) and self._pass_due(step):
            self._relevance_pass(model, step)  # type: ignore[arg-type]
            control.should_log = True
        return control

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Run a relevance pass after an evaluation, if asked (logged with the next log)."""
        if self.on_evaluate_pass and self.enforcer is not None and self._pass_due(state.global_step):
            self._relevance_pass(model, state.global_step)  # type: ignore[arg-type]

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the pending relevance summaries to this log (and to ``state.log_history``)."""
        if not self._pending_logs or logs is None:
            return
        logs.update(self._pending_logs)
        if state.log_history:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Surgery at the checkpoint (if ``surgery="save"``), then save the callback's state into it."""
        if self.enforcer is None or model is None:
            return
        checkpoint = self._checkpoint_dir(args, state)
        if self.surgery == "save":
            self._surgery(model, optimizer, state.global_step)
            if state.is_world_process_zero:
                self._save_corrected(model, checkpoint / CORRECTED_DIR, base=str(checkpoint.resolve()), overwrite=True)
        if state.is_world_process_zero:
            self._save_state(checkpoint / STATE_DIR)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Final relevance pass and surgery; save (and push) the corrected model; remove the hooks."""
        if self.enforcer is None or model is None:
            return
        try:
            step = state.global_step
            if self.at_end and self.relevance_wanted and self._pass_due(step):
                self._relevance_pass(model, step)
                if self._pending_logs:  # training is over: no further log call will carry them
                    state.log_history.append({**self._pending_logs, "step": step})
                    self._pending_logs = {}
            if self.surgery == "end":
                self._surgery(model, optimizer, step)
            if self.enforcer.masks and state.is_world_process_zero:
                self._save_corrected(
                    model, self._final_dir(args), base=self.base_model_name_or_path, overwrite=self.overwrite
                )
        finally:
            self.enforcer.remove()

    # -- relevance ----------------------------------------------------------------------------
    def _relevance_settings(self) -> dict[str, Any]:
        """How each pass computes relevance, under the keys of earlier releases' checkpoints (``seed``)."""
        gradient = self.scoring.method == "gradient"
        return {
            "method": self.scoring.method,
            "variant": "gradient" if gradient else self.scoring.variant,
            "epsilon": 0.0 if gradient else float(self.scoring.epsilon),
            "seed": self.scoring.objective,
            "per_sample_abs_weights": self.selection.granularity == "weights" and self.scoring.aggregation == "abs",
        }

    def _pass_due(self, step: int) -> bool:
        return (bool(self.samples) or self.behaviour is not None) and (
            self.accumulator is None or step not in self.accumulator.steps
        )

    def _relevance_pass(self, model: nn.Module, step: int) -> None:
        """Explain both sets on the current weights (eval mode, optimizer gradients set aside) and accumulate."""
        assert self.accumulator is not None and self.enforcer is not None
        if self.behaviour is not None:  # the model's own continuations now, not those of the model it started as
            undesired, desired = paired_contrast_sets(
                model, self.tokenizer, self.behaviour_prompts, self.behaviour, progress=self.progress
            )
            self.samples = {"general": desired, "undesired": undesired}
        rank, world = distributed_rank_and_size()
        params = list(model.parameters())
        grads = [p.grad for p in params]
        modes = [(m, m.training) for m in model.modules()]
        for p in params:
            p.grad = None  # anything written during the pass lands in fresh tensors, discarded below
        model.eval()  # no dropout; transformers' gradient checkpointing only acts in training mode
        try:
            settings = self._relevance_settings()
            results = {}
            for name in SETS:
                shard = self.samples[name][rank::world]
                results[name] = (
                    collect_relevance(
                        model,
                        shard,
                        self.tokenizer,
                        components=self.accumulator.components,
                        variant=settings["variant"],
                        epsilon=settings["epsilon"],
                        objective=settings["seed"],
                        per_sample_abs_weights=settings["per_sample_abs_weights"],
                        batch_size=self.scoring.batch_size,
                        progress=self.progress,
                        description=f"relevance ({name}, step {step})",
                    )
                    if shard
                    else None
                )
            weight_shapes = {p.name: tuple(p.weight.shape) for p in self.enforcer.arch.prunable}
            self.accumulator.add_pass(step, results, weight_shapes, device=self.enforcer.arch.embedding_weight.device)
        finally:
            for module, training in modes:
                module.training = training
            for p, grad in zip(params, grads):
                p.grad = grad
        self._pending_logs.update(self._summary(model))

    def _scores(self, model: nn.Module, current: ModelFingerprint | None = None) -> Scores:
        """The contrast of the accumulated relevance (attributed to ``current``), pruned units made ineligible."""
        assert self.accumulator is not None and self.enforcer is not None
        current = current or fingerprint(model)  # for logs the cached fingerprint is enough
        aggregation = self.scoring.aggregation
        scores = contrast(
            self.accumulator.scores("general", current, aggregation),
            self.accumulator.scores("undesired", current, aggregation),
            self.contrast_options,
        )
        pruned = self.enforcer.masks.get(self.selection.granularity)
        return scores if pruned is None else scores.excluding(pruned)

    def _summary(self, model: nn.Module) -> dict[str, float]:
        """Log entries: passes, samples, undesired mass per layer, and the next pruning candidates."""
        assert self.accumulator is not None
        granularity = self.selection.granularity
        scores = self._scores(model)
        values = scores.get(granularity)
        logs: dict[str, float] = {f"{_LOG_PREFIX}passes": float(self.accumulator.passes)}
        logs.update({f"{_LOG_PREFIX}samples_{name}": float(self.accumulator.counts[name]) for name in SETS})
        if isinstance(values, dict):
            layout = scores.layout
            per_layer = [0.0] * layout.num_layers
            for name, tensor in values.items():
                per_layer[layout.weight_modules[name][0]] += _undesired_mass(tensor)
            flat = [(layout.weight_modules[n][0], n, t.flatten()) for n, t in values.items()]
        else:
            per_layer = [_undesired_mass(row) for row in values]
            flat = [(layer, str(layer), row.flatten()) for layer, row in enumerate(values)]
        logs.update({f"{_LOG_PREFIX}undesired_mass/layer_{i:02d}": v for i, v in enumerate(per_layer)})
        candidates = sorted(
            ((float(v), layer, int(i)) for layer, _, row in flat for v, i in zip(*_lowest(row, self.top_k))),
            key=lambda c: c[0],
        )[: self.top_k]
        for rank, (value, layer, index) in enumerate(candidates, start=1):
            logs[f"{_LOG_PREFIX}candidate_{rank}/layer"] = float(layer)
            logs[f"{_LOG_PREFIX}candidate_{rank}/index"] = float(index)
            logs[f"{_LOG_PREFIX}candidate_{rank}/score"] = value
        pruned = self.enforcer.masks.get(granularity) if self.enforcer else None
        logs[f"{_LOG_PREFIX}pruned"] = float(pruned.count if pruned else 0)
        return logs

    # -- surgery ------------------------------------------------------------------------------
    def _surgery(self, model: nn.Module, optimizer: Any, step: int) -> Mask:
        """Select ``budget`` more units from the accumulated contrast and enforce them from now on."""
        assert self.enforcer is not None and self.accumulator is not None
        if self._pass_due(step) and self.accumulator.passes == 0:
            self._relevance_pass(model, step)
        scores = self._scores(model, fingerprint(model))
        selection = self.selection
        mask = select(
            scores,
            selection.granularity,
            self.budget,
            scope=selection.scope,
            modules=selection.modules,
            layers=selection.layers,
            dampen=selection.dampen,
        )
        mask = _broadcast_mask(mask)
        mask = replace(
            mask,
            provenance={
                **mask.provenance,
                "training": {
                    "step": step,
                    "relevance_passes": self.accumulator.passes,
                    "relevance_steps": list(self.accumulator.steps),
                    "samples": dict(self.accumulator.counts),
                },
            },
        )
        self.surgery_steps.append(step)
        return self.enforcer.add(mask, optimizer)

    def _save_corrected(self, model: nn.Module, directory: Path, base: str | None, overwrite: bool) -> None:
        """Apply the masks in force to a copy of the model, save it with its manifest, push it if asked."""
        assert self.enforcer is not None
        masks = self.enforcer.masks_for(fingerprint(model))
        with self.enforcer.suspended():  # the probe must record the unmasked weights as "original"
            corrected = apply_masks(model, masks, self.carrier)
        if get_carrier(self.carrier).base_config and base is None:  # it loads on the fine-tuned base: save that too
            base_dir = Path(f"{directory}-base")
            with atomic_directory(base_dir, overwrite=overwrite) as tmp:
                cast(Any, model).save_pretrained(str(tmp))  # a PreTrainedModel (or PEFT model)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(str(tmp))
            base = str(base_dir.resolve())
        corrected.save(directory, tokenizer=self.tokenizer, base_model_name_or_path=base, overwrite=overwrite)
        del corrected
        self.saved.append(directory)
        if self.push_to_hub and self.push_fn is not None:
            try:
                self.push_fn(directory, self.push_to_hub, **self.push_kwargs)
            except Exception as err:  # the model is saved; a network failure must not end the training run
                retry = getattr(err, "retry_command", None) or (
                    f"hf_lrp_surgery.hub.push_to_hub({str(directory)!r}, {self.push_to_hub!r})"
                )
                message = (
                    f"pushing {directory} to {self.push_to_hub} failed: {err}. The corrected model is saved "
                    f"there; retry with {retry}"
                )
                self.push_errors.append(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)

    # -- state --------------------------------------------------------------------------------
    def _final_dir(self, args: TrainingArguments) -> Path:
        """Where the corrected model goes when training ends."""
        return Path(self.output_dir or _output_dir(args) / CORRECTED_DIR)

    @staticmethod
    def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
        return _output_dir(args) / f"checkpoint-{state.global_step}"

    def _state_record(self) -> dict[str, Any]:
        return {
            "format_version": _STATE_FORMAT,
            "samples_sha256": _samples_digest(
                self.samples if self.behaviour is None else {self.behaviour.name: self.behaviour_prompts}
            ),
            "selection": {**self.selection.to_dict(), "budget": self.budget},
            "relevance": {**self._relevance_settings(), "aggregation": self.scoring.aggregation},
            "surgery": self.surgery,
            "surgery_steps": self.surgery_steps,
            "masks": sorted(self.enforcer.masks) if self.enforcer else [],
            # A resumed run checks that relevance/ holds these passes (and refuses when it is gone).
            "relevance_steps": list(self.accumulator.steps) if self.accumulator else [],
        }

    def _save_state(self, directory: Path) -> None:
        assert self.accumulator is not None and self.enforcer is not None
        with atomic_directory(directory, overwrite=True) as tmp:
            if self.accumulator.passes:
                self.accumulator.save(tmp / "relevance")
            for granularity, mask in self.enforcer.masks.items():
                mask.save(tmp / "masks" / granularity)
            write_json_atomic(tmp / _STATE_FILE, self._state_record())

    def _restore(self, args: TrainingArguments, state: TrainerState, model: nn.Module, optimizer: Any) -> None:
        """Load the accumulated relevance and the masks saved in the checkpoint being resumed.

        Raises:
            TrainingStateError: No state was saved, a state file is missing, damaged or disagrees with
                another, or the state was made with other reference sets, options or model.
        """
        assert self.accumulator is not None and self.enforcer is not None
        candidates = [Path(p) / STATE_DIR for p in (getattr(args, "resume_from_checkpoint", None),) if p]
        candidates.append(self._checkpoint_dir(args, state) / STATE_DIR)
        directory = next((c for c in candidates if (c / _STATE_FILE).is_file()), None)
        if directory is None:
            raise TrainingStateError(
                f"the Trainer resumed at step {state.global_step}, but no {STATE_DIR}/{_STATE_FILE} was found in "
                f"{', '.join(str(c.parent) for c in candidates)}: the checkpoint was saved without LRPSurgeryCallback "
                "(or by another output_dir). Resume from a checkpoint written with the callback, or start a new run"
            )
        path = directory / _STATE_FILE
        record = read_json_object(path)
        check_format(record, path, _STATE_FORMAT, "callback-state")
        expected = self._state_record()
        compared = (("samples_sha256", str), ("selection", dict), ("relevance", dict), ("surgery", (str, type(None))))
        for key, kind in compared:
            if entry(record, key, kind, path) != expected[key]:
                raise TrainingStateError(
                    f"the checkpoint's callback state was made with other {key.replace('_sha256', '')} "
                    f"({record.get(key)!r} vs now {expected[key]!r}); resume with the callback configured as in the "
                    "interrupted run, or start a new run"
                )
        surgery_steps = entry(record, "surgery_steps", list, path, items=int)
        granularities = entry(record, "masks", list, path, items=str)
        if not set(granularities) <= set(GRANULARITIES):
            raise damaged(path, f"lists masks {granularities}, not granularities of {list(GRANULARITIES)}")
        # Checkpoints of earlier releases have no relevance_steps: their relevance/ is loaded when present.
        steps = entry(record, "relevance_steps", list, path, items=int) if "relevance_steps" in record else None
        relevance = directory / "relevance"
        if steps and not relevance.is_dir():
            raise damaged(
                relevance,
                f"is missing, but {_STATE_FILE} records relevance passes at steps {steps} (resuming would silently "
                "restart the accumulation)",
            )
        if steps or (steps is None and relevance.is_dir()):
            loaded = RelevanceAccumulator.load(relevance)
            if steps is not None and loaded.steps != steps:
                raise damaged(relevance, f"holds passes at steps {loaded.steps}, but {_STATE_FILE} records {steps}")
            if loaded.layout != self.accumulator.layout:
                raise TrainingStateError("the checkpoint's accumulated relevance is for another model layout")
            self.accumulator = loaded
        self.surgery_steps = list(surgery_steps)
        current = fingerprint(model)
        for granularity in granularities:
            mask_dir = directory / "masks" / granularity
            try:
                mask = Mask.load(mask_dir)
            except UNREADABLE as err:
                raise damaged(mask_dir, f"does not hold a readable {granularity} mask ({err})") from err
            if not current.same_architecture(mask.fingerprint):
                mask.check_model(model)
            self.enforcer.add(mask, optimizer)


# -- helpers ------------------------------------------------------------------------------------
def _as_budget(budget: object) -> int | float:
    """The budget as a plain ``int`` (numpy integers too) or ``float``, checked as far as it can be without a model.

    Args:
        budget: A count >= 1 or a fraction in (0, 1].

    Returns:
        The budget (JSON-serialisable, as checkpoints record it).

    Raises:
        BudgetError: ``budget`` is a bool, not a number, below 1 as a count, or outside (0, 1] as a fraction.

    Example:
        >>> _as_budget(np.int64(5))  # doctest: +SKIP
        5
    """
    plain = plain_budget(budget)
    # No upper bound yet: the component count is known in on_train_begin (_check_budget).
    budget_count(plain, sys.maxsize, "components")
    return plain


def _sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by torch FSDP: FSDP1 (``FlatParameter``) or FSDP2 (``DTensor``) parameters.

    FSDP1's flat parameters are plain ``Parameter`` objects marked ``_is_flat_param`` (``FlatParameter`` is
    only an ``isinstance`` hook), so the class name does not show them.

    Args:
        model: The model the Trainer trains (wrapped or not).

    Returns:
        ``True`` when some parameter is an FSDP shard.

    Example:
        >>> _sharded(FullyShardedDataParallel(model))  # doctest: +SKIP
        True
    """
    return any(getattr(p, "_is_flat_param", False) or type(p).__name__ == "DTensor" for p in model.parameters())


def _output_dir(args: TrainingArguments) -> Path:
    """The Trainer's output directory (with the default ``TrainingArguments`` gives when there is none)."""
    return Path(getattr(args, "output_dir", None) or "trainer_output")


def _default_push() -> PushFn:
    try:
        from hf_lrp_surgery.hub import push_to_hub
    except ImportError as err:
        raise TrainingSetupError(
            f"push_to_hub= needs hf_lrp_surgery.hub ({err}); pass push_fn= to push another "
            "way, or leave push_to_hub unset"
        ) from err
    return push_to_hub


def _undesired_mass(scores: torch.Tensor) -> float:
    """How much of a contrast lies on the undesired side: the sum of its finite negative parts."""
    finite = scores[torch.isfinite(scores)]
    return float((-finite).clamp_min(0).sum())


def _lowest(row: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    finite = torch.isfinite(row)
    values = torch.where(finite, row.double(), torch.inf)
    count = min(k, int(finite.sum()))
    if count == 0:
        return [], []
    top = torch.topk(values, count, largest=False)
    return top.values.tolist(), top.indices.tolist()


def _broadcast_mask(mask: Mask) -> Mask:
    """Rank 0's selection on every rank (the sums are all-reduced, so this only guards against float drift)."""
    rank, world = distributed_rank_and_size()
    if world == 1:
        return mask
    import torch.distributed as dist

    scales = mask.scales or {}
    payload: list[Any] = [
        {
            name: (index.tolist(), scales[name].tolist() if name in scales else None)
            for name, index in mask.indices.items()
        }
        if rank == 0
        else None
    ]
    dist.broadcast_object_list(payload, src=0)
    chosen: dict[str, tuple[list[int], list[float] | None]] = payload[0]
    indices = {name: torch.tensor(values, dtype=torch.int64) for name, (values, _) in chosen.items()}
    soft = {name: torch.tensor(s, dtype=torch.float32) for name, (_, s) in chosen.items() if s is not None}
    return replace(mask, indices=indices, scales=soft or None)
