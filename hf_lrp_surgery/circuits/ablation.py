"""What a pruned component is replaced with while a circuit is searched and measured: zero, mean or corrupted.

Three ablation kinds, all forward pre-hooks on the carrier modules (the MLP output projection for
neurons, the attention output projection for heads; each prunable weight's own module for weights).
Which input features a neuron or head mask touches comes from
:func:`hf_lrp_surgery.masks.geometry.input_units`; a weight mask's flat indices are into the weight
as the module stores it (as :func:`~hf_lrp_surgery.masks.geometry.zeroed_entries` reads them):

* ``"zero"`` (default): the pruned input features are zeroed, the same function as baking the mask
  (:func:`hf_lrp_surgery.carriers.bake`) or carrying it as an IA3 adapter; weight elements are zeroed
  in place and restored on exit.
* ``"mean"``: each pruned input feature is replaced by its mean over the real (non-pad) tokens of the
  reference prompts, measured on the unpruned model. For neurons that is the neuron's activation at
  the input of the MLP output projection, for heads the head's slice of the attention output
  projection's input. For a weight ``W_ij`` the product ``W_ij x_j`` is replaced by ``W_ij x̄_j``:
  the weight is zeroed and the module's output gets the bias-like correction
  ``c_i = Σ_j (W ⊙ M)_ij x̄_j`` (``M`` the pruned entries).
* ``"corrupted"``: activation patching from the corrupted counterpart of each evaluation prompt
  (for IOI the ABC prompt of :func:`~hf_lrp_surgery.circuits.tasks.ioi_task`, three other names, the
  same token length, as in ACDC and edge attribution patching): every pruned input feature takes,
  at every position, its value in the unpruned model's run on the corrupted prompt; for weights
  the output gets ``(W ⊙ M) x_corrupted`` instead of ``(W ⊙ M) x``.

The corrupted activations are recorded once per evaluation set, on the batches of a
:class:`PreparedTask` (prompts encoded once, sorted by length, right-padded), which is also the
fast evaluator every search point uses.

Only zero ablation is what a carrier (bake, IA3, hooks) computes; a circuit found with mean or
corrupted ablation is refused by :meth:`~hf_lrp_surgery.circuits.discovery.Circuit.carrier_mask`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hf_lrp_surgery.carriers.hooks import MaskHooks
from hf_lrp_surgery.circuits.tasks import NextTokenTask, TaskMetrics, metrics_from_logits
from hf_lrp_surgery.exceptions import AblationError, CircuitDiscoveryError
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, parameter, resolve, unwrap_model
from hf_lrp_surgery.lrp.layout import Granularity
from hf_lrp_surgery.lrp.offload import execution_device
from hf_lrp_surgery.masks import Mask
from hf_lrp_surgery.masks.geometry import input_units
from hf_lrp_surgery.references.samples import Batch, encode_sample, make_batch, pad_token_id
from hf_lrp_surgery.scoring import Layout

__all__ = ["ABLATIONS", "Ablation", "AblationKind", "PreparedTask", "ablated", "carrier_modules"]

#: What a pruned component is replaced with.
AblationKind = Literal["zero", "mean", "corrupted"]
#: Every ablation kind (``"zero"`` first: the default, and the only one a carrier computes).
ABLATIONS: tuple[AblationKind, ...] = ("zero", "mean", "corrupted")


# -- the evaluator ----------------------------------------------------------------------------
class PreparedTask:
    """A task encoded once into length-sorted, right-padded batches, for repeated metric evaluation.

    Sorting by length removes almost all padding; the logits are returned in the task's order.

    Args:
        model: The model (for its architecture, device and pad token).
        tokenizer: Its tokenizer.
        task: The prompts.
        batch_size: Prompts per forward pass.

    Raises:
        ReferenceSetError: A task token is not exactly one token.

    Example:
        >>> prepared = PreparedTask(model, tokenizer, ioi_task(tokenizer, 64, seed=100))  # doctest: +SKIP
        >>> prepared.metrics(model).logit_diff  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, tokenizer: Any, task: NextTokenTask, *, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        arch = resolve(model)
        self.task = task
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.correct, self.wrong = task.token_ids(tokenizer)
        encoded = [
            encode_sample(s, i, tokenizer, arch.max_positions, arch.vocab_size) for i, s in enumerate(task.samples())
        ]
        self.lengths = [len(e.ids) for e in encoded]
        order = sorted(range(len(encoded)), key=lambda i: (self.lengths[i], i))
        self.order = torch.tensor(order, dtype=torch.long)
        pad = pad_token_id(tokenizer, arch.model)
        device = execution_device(arch.token_embedding)
        self.batches: list[Batch] = [
            make_batch([encoded[i] for i in order[start : start + batch_size]], pad, "right", device)
            for start in range(0, len(order), batch_size)
        ]

    def __len__(self) -> int:
        return len(self.task)

    @torch.no_grad()
    def logits(self, model: nn.Module, *, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """``[N, V]`` fp32 logits at each prompt's last token (in the task's order, on the CPU), as
        :func:`~hf_lrp_surgery.circuits.tasks.last_token_logits` gives them.

        Args:
            model: The model (any hooks on it apply).
            on_batch: Called with the batch index before each forward pass (corrupted patching reads it).
        """
        out = []
        for i, batch in enumerate(self.batches):
            if on_batch is not None:
                on_batch(i)
            positions = torch.unique(batch.seed_positions)
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
                logits_to_keep=positions,
            ).logits
            out.append(logits[batch.seed_rows, torch.searchsorted(positions, batch.seed_positions)].float().cpu())
        ordered = torch.cat(out)
        result = torch.empty_like(ordered)
        result[self.order] = ordered
        return result

    def metrics(self, model: nn.Module, ablation: Ablation | None = None) -> TaskMetrics:
        """Accuracy and logit difference of ``model`` (with ``ablation``'s batch hooks fed, if any).

        Example:
            >>> with ablated(model, mask, ablation):  # doctest: +SKIP
            ...     metrics = prepared.metrics(model, ablation)
        """
        on_batch = ablation.at_batch if ablation is not None else None
        return metrics_from_logits(self.logits(model, on_batch=on_batch), self.correct, self.wrong)


# -- the ablation values ----------------------------------------------------------------------
def carrier_modules(layout: Layout, granularity: Granularity, modules: Sequence[str] | None = None) -> tuple[str, ...]:
    """The modules whose inputs an ablation of ``granularity`` replaces (weights: ``modules`` or all prunable)."""
    if granularity == "weights":
        return tuple(modules) if modules is not None else tuple(layout.weight_modules)
    return layout.carriers(granularity)


@dataclass
class Ablation:
    """What pruned components are replaced with, with the values it needs recorded on the unpruned model.

    Attributes:
        kind: ``"zero"``, ``"mean"`` or ``"corrupted"``.
        granularity: The component kind the values were recorded for (``None`` for zero ablation).
        means: Mean ablation: module name -> mean input feature vector ``[in]`` over the reference tokens.
        corrupted: Corrupted patching: per batch of ``prepared``, module name -> its input ``[B, T, in]``
            on the corrupted prompts.
        prepared: Corrupted patching: the evaluation batches the recorded activations belong to.
        settings: How the values were made (for reports).
        batch: The batch being evaluated (set by :meth:`PreparedTask.metrics`).

    Example:
        >>> ablation = Ablation.record("mean", model, tokenizer, "neurons", reference=task)  # doctest: +SKIP
    """

    kind: AblationKind = "zero"
    granularity: Granularity | None = None
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    corrupted: list[dict[str, torch.Tensor]] = field(default_factory=list)
    prepared: PreparedTask | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    batch: int | None = None

    def at_batch(self, index: int) -> None:
        """Tell the patching hooks which evaluation batch runs next."""
        self.batch = index

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (without the recorded values)."""
        return {"kind": self.kind, **self.settings}

    @classmethod
    def record(
        cls,
        kind: AblationKind,
        model: nn.Module,
        tokenizer: Any,
        granularity: Granularity,
        *,
        reference: NextTokenTask | None = None,
        evaluation: PreparedTask | None = None,
        modules: Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> Ablation:
        """Record what ``kind`` needs on the unpruned model (one pass over the prompts).

        Args:
            kind: The ablation kind.
            model: The unpruned model.
            tokenizer: Its tokenizer.
            granularity: The components that will be ablated.
            reference: Mean ablation: the prompts whose real tokens the means are taken over.
            evaluation: Corrupted patching: the prepared evaluation prompts; their tasks' examples need
                ``info["corrupted"]`` of the same token length (:meth:`NextTokenTask.corrupted`).
            modules: Weights: the modules to record (default every prunable one).
            batch_size: Prompts per pass (mean ablation).

        Returns:
            The :class:`Ablation`.

        Raises:
            AblationError: The prompts the kind needs are missing, or a corrupted prompt's length differs.
            ValueError: An unknown kind.
        """
        if kind not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {kind!r}")
        if kind == "zero":
            return cls()
        arch = resolve(model)
        names = carrier_modules(Layout.of(arch), granularity, modules)
        if kind == "mean":
            if reference is None:
                raise AblationError("mean ablation needs reference= prompts to take the means over")
            prepared = PreparedTask(model, tokenizer, reference, batch_size=batch_size)
            sums, tokens = _record(model, prepared, names, arch, mean=True)
            means = {n: (s / tokens).to(_dtype(arch)) for n, s in sums.items()}
            settings = {"reference": reference.name, "reference_size": len(reference), "tokens": tokens}
            return cls("mean", granularity, means=means, settings=settings)
        if evaluation is None:
            raise AblationError("corrupted patching needs evaluation= (a PreparedTask) to record the corrupted runs on")
        corrupted_task = evaluation.task.corrupted()
        shadow = PreparedTask(model, tokenizer, corrupted_task, batch_size=evaluation.batch_size)
        mismatch = [i for i, (a, b) in enumerate(zip(evaluation.lengths, shadow.lengths)) if a != b]
        if mismatch:
            i = mismatch[0]
            raise AblationError(
                f"example {i}: the corrupted prompt is {shadow.lengths[i]} tokens, the clean one "
                f"{evaluation.lengths[i]}; "
                "activation patching needs the same token length (give corrupted prompts with single-token names)"
            )
        # Same lengths and the same stable sort: the corrupted batches line up with the clean ones.
        per_batch, _ = _record(model, shadow, names, arch, mean=False)
        settings = {"evaluation": evaluation.task.name, "evaluation_size": len(evaluation)}
        return cls("corrupted", granularity, corrupted=per_batch, prepared=evaluation, settings=settings)


def _dtype(arch: ResolvedArchitecture) -> torch.dtype:
    return arch.embedding_weight.dtype


@torch.no_grad()
def _record(
    model: nn.Module, prepared: PreparedTask, names: Sequence[str], arch: ResolvedArchitecture, *, mean: bool
) -> tuple[Any, int]:
    """Inputs of ``names`` on ``prepared``'s prompts: summed over real tokens (``mean``) or per batch."""
    root = unwrap_model(model)
    state: dict[str, Any] = {"batch": 0}
    sums: dict[str, torch.Tensor] = {}
    per_batch: list[dict[str, torch.Tensor]] = [{} for _ in prepared.batches]
    tokens = 0

    def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if mean:
                real = prepared.batches[state["batch"]].attention_mask.bool()
                total = x[real].double().sum(0).cpu()
                sums[name] = sums[name] + total if name in sums else total
            else:
                per_batch[state["batch"]][name] = x.clone()

        return hook

    handles = [root.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in dict.fromkeys(names)]
    try:
        prepared.logits(model, on_batch=lambda i: state.__setitem__("batch", i))
    finally:
        for handle in handles:
            handle.remove()
    if mean:
        tokens = int(sum(int(b.attention_mask.sum()) for b in prepared.batches))
        return sums, tokens
    return per_batch, 0


# -- applying it ------------------------------------------------------------------------------
@contextlib.contextmanager
def ablated(
    model: nn.Module, masks: Mask | Sequence[Mask], ablation: Ablation | AblationKind | None = None
) -> Iterator[nn.Module]:
    """Ablate what ``masks`` prune, for the duration of the block.

    Zero ablation (the default) of neurons and heads: a forward pre-hook zeroes the input of each
    block's MLP output projection (neurons) or attention output projection (each head's slice) where
    pruned (:class:`~hf_lrp_surgery.carriers.hooks.MaskHooks`), the same function as baking the mask;
    weights are zeroed in place and restored on exit. Mean and corrupted ablation replace the pruned
    features by the values recorded in ``ablation`` (see the module docstring); corrupted patching
    must be evaluated with ``PreparedTask.metrics(model, ablation)`` on ``ablation.prepared``.

    Args:
        model: The model the masks were selected on (same layout; the weight fingerprint is not
            re-checked, so that a pruning sweep costs forward passes only).
        masks: One mask or several of different granularities.
        ablation: An :class:`Ablation` (``None`` or ``"zero"``: zero ablation).

    Yields:
        ``model``.

    Raises:
        CircuitDiscoveryError: A mask's layout is not the model's.
        AblationError: A mean/corrupted ablation recorded for another granularity, or given as a bare
            name (it needs recorded values: :meth:`Ablation.record`); or a soft mask.

    Example:
        >>> with ablated(model, mask):  # doctest: +SKIP
        ...     metrics = evaluate_task(model, tokenizer, task)
    """
    if ablation is None or ablation == "zero":
        ablation = Ablation()
    if isinstance(ablation, str):
        raise AblationError(f"{ablation} ablation needs recorded values; pass Ablation.record({ablation!r}, ...)")
    arch = resolve(model)
    layout = Layout.of(arch)
    mask_list = [masks] if isinstance(masks, Mask) else list(masks)
    for mask in mask_list:
        if mask.soft:
            raise AblationError(
                "circuit ablation removes units whole; this mask dampens some (a soft mask): use its hard part "
                "(masks.soft.hard_part) or Mask.with_scales(None)"
            )
        if mask.layout != layout:
            raise CircuitDiscoveryError(
                "the mask was selected on a model with another layout; select it on this model's scores"
            )
        if ablation.kind != "zero" and mask.granularity != ablation.granularity:
            raise AblationError(
                f"the {ablation.kind} ablation was recorded for {ablation.granularity}, the mask prunes "
                f"{mask.granularity}"
            )
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles: list[Any] = []
    root = unwrap_model(model)
    with MaskHooks(model, arch) as hooks:
        try:
            for mask in mask_list:
                if mask.granularity != "weights":
                    if ablation.kind == "zero":
                        hooks.add(mask)
                    else:
                        handles += _replace_inputs(model, arch, mask, ablation)
                    continue
                mask.validate(arch)
                with torch.no_grad():
                    for name in mask.indices:
                        # A weight's flat index is into the weight as the module stores it
                        # (masks.geometry.zeroed_entries): a dense boolean of that shape zeroes the
                        # same entries, in one vectorised pass even for tens of millions of them.
                        param = parameter(root.get_submodule(name))
                        pruned = mask.dense(name, param.numel()).view(param.shape).to(param.device)
                        if ablation.kind != "zero":
                            handles.append(_correct_output(model, arch, name, param * pruned, ablation))
                        saved.append((param, param.detach().clone()))
                        param.masked_fill_(pruned, 0)
            yield model
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for param, values in reversed(saved):
                    param.copy_(values)


def _value(ablation: Ablation, name: str, like: torch.Tensor) -> torch.Tensor:
    """The recorded replacement of module ``name``'s input: ``[in]`` (mean) or ``[B, T, in]`` (corrupted)."""
    if ablation.kind == "mean":
        if name not in ablation.means:
            raise AblationError(f"no mean was recorded for {name}; record the ablation with this module")
        return ablation.means[name].to(like.device, like.dtype)
    if ablation.batch is None or ablation.batch >= len(ablation.corrupted):
        raise AblationError(
            "corrupted patching reads the batch being evaluated; evaluate with "
            "ablation.prepared.metrics(model, ablation), not evaluate_task"
        )
    value = ablation.corrupted[ablation.batch].get(name)
    if value is None or value.shape != like.shape:
        raise AblationError(
            f"{name}: the corrupted activations of batch {ablation.batch} do not match this input "
            f"({None if value is None else tuple(value.shape)} vs {tuple(like.shape)}); evaluate on ablation.prepared"
        )
    return value.to(like.device, like.dtype)


def _replace_inputs(model: nn.Module, arch: ResolvedArchitecture, mask: Mask, ablation: Ablation) -> list[Any]:
    """Pre-hooks that put the recorded values in the pruned input features of each carrier of ``mask``."""
    mask.validate(arch)
    root = unwrap_model(model)
    handles = []
    for name in mask.indices:
        module = root.get_submodule(name)
        units = input_units(mask, name, arch)

        def hook(module: nn.Module, args: tuple, name: str = name, units: torch.Tensor = units) -> tuple | None:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            dropped = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
            dropped[units.to(x.device)] = True
            return (torch.where(dropped, _value(ablation, name, x), x), *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def _correct_output(
    model: nn.Module, arch: ResolvedArchitecture, name: str, pruned: torch.Tensor, ablation: Ablation
) -> Any:
    """A forward hook adding ``(W ⊙ M) x_ref`` to the output of the weight module ``name``.

    ``pruned`` is ``W ⊙ M``: the weight's pruned entries (taken before they are zeroed), zero elsewhere.
    """
    conv1d = arch.spec.orientation == "conv1d"  # Conv1D stores [in, out]: y = x @ W
    matrix = pruned if conv1d else pruned.T  # [in, out]
    module = unwrap_model(model).get_submodule(name)
    cached: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return None
        x = args[0]
        if ablation.kind == "mean":  # a constant: the bias-like correction c = (W ⊙ M) x̄
            if "bias" not in cached:
                cached["bias"] = _value(ablation, name, x).to(matrix.dtype) @ matrix
            return output + cached["bias"].to(output.dtype)
        return output + (_value(ablation, name, x).to(matrix.dtype) @ matrix).to(output.dtype)

    return module.register_forward_hook(hook)
