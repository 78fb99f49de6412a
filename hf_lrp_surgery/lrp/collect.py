"""Objectives, collectors and aggregation: relevance of inputs, neurons, heads and weights.

One relevance pass is one forward and one backward pass with the rules of
:class:`~hf_lrp_surgery.lrp.attach.LRPRules` attached. The backward starts from the explained
output, the *objective* (a logit, a target-token logit or the teacher-forced logits of a
continuation, or their log-probabilities); since every objective is linear in the logits (the
softmax of ``logprob`` is held constant) and samples do not interact, a batch yields each sample's
relevance.

Collectors are hooks that read ``input * gradient`` where it means something:

* MLP neurons: the input of the MLP output projection (``down_proj`` / ``fc2`` / ``c_proj``); for a
  mixture of experts, the input of each expert's down matrix, at units ``e * I + i`` (see :mod:`.moe`);
* attention heads: the input of the attention output projection, split per head;
* weights: ``W * dL/dW`` of every prunable Linear/Conv1D, computed in the backward from the saved
  layer input and the incoming gradient, and added straight into an fp32 buffer (no gradient is
  written to ``.grad``, so an optimizer's gradients are never touched);
* inputs: token (and position) embedding ``* gradient``, summed over the hidden dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery._deprecation import moved_names, warn_deprecated
from hf_lrp_surgery.exceptions import NonFiniteRelevanceError, ReferenceSetError
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture
from hf_lrp_surgery.lrp.attach import LRPRules, Variant
from hf_lrp_surgery.lrp.layout import GRANULARITIES
from hf_lrp_surgery.lrp.moe import add_product_tap
from hf_lrp_surgery.lrp.offload import execution_device, weight_value
from hf_lrp_surgery.lrp.result import RelevanceResult
from hf_lrp_surgery.references import samples as _samples

if TYPE_CHECKING:
    from hf_lrp_surgery.references.samples import Batch, SampleLike

__all__ = [
    "COLLECTABLE",
    "OBJECTIVES",
    "WEIGHT_BUFFERS",
    "Objective",
    "WeightBuffers",
    "collect_relevance",
    "renamed_seed",
]

#: What a relevance pass explains: the target ``"logit"`` or its ``"logprob"``.
Objective = Literal["logit", "logprob"]
#: Every objective.
OBJECTIVES: tuple[Objective, ...] = ("logit", "logprob")

WeightBuffers = Literal["float32", "model"]
"""The dtype weight relevance is summed in: float32 (float64 for float64 models) or the model's own."""

WEIGHT_BUFFERS: tuple[WeightBuffers, ...] = ("float32", "model")
#: What :func:`collect_relevance` can collect: the component kinds, and the input tokens.
COLLECTABLE: tuple[str, ...] = (*GRANULARITIES, "inputs")


def renamed_seed(seed: Any, *, stacklevel: int = 3) -> Any:
    """Return the value of a deprecated ``seed=`` keyword, warning that it is now ``objective=``.

    The relevance objective used to be called ``seed``, which read as a random seed.

    Args:
        seed: The value given as ``seed=``.
        stacklevel: How far up the stack the user's call is (from the caller of this function).

    Returns:
        ``seed``, to be used as the objective.
    """
    warn_deprecated("seed= (the relevance objective) is deprecated; use objective=", stacklevel=stacklevel + 1)
    return seed


def _objective(logits: torch.Tensor, batch: Batch, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the scalar to differentiate and the explained value per sample (in fp64)."""
    rows = logits[batch.seed_rows, batch.seed_positions]  # [N, V]
    rows = rows if rows.dtype == torch.float64 else rows.float()
    tokens = torch.where(batch.seed_tokens == _samples.ARGMAX, rows.detach().argmax(-1), batch.seed_tokens)
    weights = torch.nn.functional.one_hot(tokens, rows.shape[-1]).to(rows.dtype)
    if objective == "logprob":
        # d log p_t / d logits = onehot - softmax; held constant it is linear in the logits.
        weights = weights - rows.detach().softmax(-1)
    per_seed = (rows * weights).sum(-1)
    explained = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    explained.index_add_(0, batch.seed_rows, per_seed.detach().double())
    return per_seed.sum(), explained


class _Collectors:
    """Hooks that read relevance during the backward pass, installed after the rules."""

    def __init__(
        self,
        arch: ResolvedArchitecture,
        components: frozenset[str],
        per_sample_abs_weights: bool,
        dtype: torch.dtype,
        weights_dtype: torch.dtype,
    ) -> None:
        self.arch = arch
        self.dtype = dtype
        self.weights_dtype = weights_dtype
        self.components = components
        self.per_sample_abs_weights = per_sample_abs_weights
        self.handles: list[Any] = []
        self.mask: torch.Tensor | None = None  # [B, T] bool, set per batch
        self.real_rows: torch.Tensor | None = None  # flat mask of real tokens, None without pads
        self.neurons: torch.Tensor | None = None  # [B, L, I] of the current batch
        self.heads: torch.Tensor | None = None  # [B, L, H]
        self.weights: dict[str, torch.Tensor] = {}
        self.weights_abs: dict[str, torch.Tensor] = {}
        self.saved: dict[tuple[Any, ...], torch.Tensor] = {}

    def __enter__(self) -> _Collectors:
        try:
            for layer in self.arch.layers:
                if "neurons" in self.components and self.arch.spec.moe is not None:
                    # Prepended, as below: expert neuron relevance is what enters each expert's down matrix.
                    self.handles.append(
                        add_product_tap(
                            layer.mlp_out,
                            self._expert_tap(layer.index),
                            model_type=self.arch.spec.model_type,
                            prepend=True,
                        )
                    )
                elif "neurons" in self.components:
                    # Prepended, so its gradient hook runs before the rules' 1/2 on the gated product:
                    # neuron relevance is the relevance entering the output projection, unsplit.
                    self.handles.append(
                        layer.mlp_out.register_forward_pre_hook(
                            self._input_hook("neurons", layer.index, 1), prepend=True
                        )
                    )
                if "heads" in self.components:
                    self.handles.append(
                        layer.o_proj.register_forward_pre_hook(
                            self._input_hook("heads", layer.index, self.arch.num_heads), prepend=True
                        )
                    )
            if "weights" in self.components:
                for prunable in self.arch.prunable:
                    # Appended after the rules' hooks: the gradient it sees is the rule-modified one.
                    self.handles.append(
                        prunable.module.register_forward_hook(
                            self._weight_hook(prunable.name, prunable.orientation == "conv1d")
                        )
                    )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.end_batch()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def end_batch(self) -> None:
        self.saved.clear()

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()
        self.real_rows = None if bool(self.mask.all()) else self.mask.reshape(-1)
        batch, layers = mask.shape[0], self.arch.num_layers
        device = mask.device
        if "neurons" in self.components:
            self.neurons = torch.zeros(batch, layers, self.arch.num_neurons, dtype=self.dtype, device=device)
        if "heads" in self.components:
            self.heads = torch.zeros(batch, layers, self.arch.num_heads, dtype=self.dtype, device=device)

    def _input_hook(self, kind: str, layer: int, groups: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not x.requires_grad:
                return

            # A hook on x must not close over x: that cycle runs through autograd's C++ side, which the
            # garbage collector cannot see, and would keep every activation alive. x is held in
            # ``self.saved`` instead and released by ``end_batch``.
            self.saved[(kind, layer)] = x

            def grad_hook(grad: torch.Tensor) -> None:
                mask = self.mask  # [B, T]; OPT feeds its MLP [B*T, D], hence the reshapes
                saved = self.saved[(kind, layer)].reshape(*mask.shape, -1)  # type: ignore[union-attr]
                product = saved.to(self.dtype) * grad.reshape(saved.shape).to(self.dtype)
                relevance = torch.where(mask[..., None], product, 0.0)  # type: ignore[index]
                if kind == "heads":
                    relevance = relevance.unflatten(-1, (groups, -1)).sum(-1)
                target = self.neurons if kind == "neurons" else self.heads
                assert target is not None  # allocated by start_batch for every collected kind
                target[:, layer].add_(relevance.sum(1).to(target.device))

            x.register_hook(grad_hook)

        return pre_hook

    def _expert_tap(self, layer: int) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
        """Expert neuron relevance: ``x * grad`` at expert ``e``'s gated product, into units ``e * I + i``."""
        width = self.arch.expert_width

        def tap(expert: int, tokens: torch.Tensor, x: torch.Tensor) -> None:
            if not x.requires_grad:
                return
            key, rows_key = ("experts", layer, expert), ("expert_tokens", layer, expert)
            # As in _input_hook: the hook must not close over x or tokens (a cycle through autograd).
            self.saved[key] = x
            self.saved[rows_key] = tokens

            def grad_hook(grad: torch.Tensor) -> None:
                mask = self.mask  # [B, T]
                assert mask is not None and self.neurons is not None  # set by start_batch
                saved, rows = self.saved[key], self.saved[rows_key]  # [n, I], flat [B*T] row indices
                product = saved.to(self.dtype) * grad.to(self.dtype)
                relevance = torch.where(mask.reshape(-1)[rows][:, None], product, 0.0)
                sample = torch.div(rows, mask.shape[1], rounding_mode="floor")
                target = self.neurons[:, layer, expert * width : (expert + 1) * width]
                target.index_add_(0, sample.to(target.device), relevance.to(target.device))

            x.register_hook(grad_hook)

        return tap

    def _weight_hook(self, name: str, conv1d: bool) -> Callable[..., None]:
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if not output.requires_grad:
                return

            def grad_hook(grad: torch.Tensor) -> None:
                x2 = x.reshape(-1, x.shape[-1])
                g2 = grad.reshape(-1, grad.shape[-1])
                if self.real_rows is not None:  # drop pads (a copy, so only when there are pads)
                    x2, g2 = x2[self.real_rows], g2[self.real_rows]
                weight = weight_value(module, g2.device)  # read here: an offloaded weight is on meta now
                # The product runs in the activations' dtype, as autograd's weight gradient does (a
                # bf16 matmul accumulates in fp32 inside and is rounded once); only the sum over
                # batches is held at ``weights_dtype``. Buffers are created in the first backward, as
                # autograd creates .grad: activations are being freed by then, so the peak stays
                # near a plain gradient pass's.
                g2 = g2.to(x2.dtype)
                _accumulate(self.weights, name, x2.T @ g2 if conv1d else g2.T @ x2, weight, self.weights_dtype)
                if self.per_sample_abs_weights:
                    start = 0
                    for length in self.mask.sum(1).tolist():  # type: ignore[union-attr]
                        xs, gs = x2[start : start + length], g2[start : start + length]
                        start += length
                        per_sample = (xs.T @ gs if conv1d else gs.T @ xs).mul_(weight).abs_()
                        _accumulate(self.weights_abs, name, per_sample, None, self.weights_dtype)

            output.register_hook(grad_hook)

        return forward_hook


def _accumulate(
    buffers: dict[str, torch.Tensor],
    name: str,
    value: torch.Tensor,
    weight: torch.Tensor | None,
    dtype: torch.dtype,
) -> None:
    """Add ``value`` (times ``weight`` where given) into ``buffers[name]``, held at ``dtype``.

    The first batch's product becomes the buffer (converted in place of a copy where the dtypes
    agree); later ones go through one fused ``addcmul_``/``add_``, which promotes element by element
    and makes no parameter-sized temporary at the buffer's dtype.
    """
    if name not in buffers:
        value = value.to(dtype)
        buffers[name] = value if weight is None else value.mul_(weight)
    elif weight is None:
        buffers[name].add_(value)
    else:
        buffers[name].addcmul_(value, weight)


def _in_block_order(
    buffers: dict[str, torch.Tensor], arch: ResolvedArchitecture, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Weight buffers on the CPU in block order; a layer that got no gradient has zero relevance."""
    return {
        p.name: buffers[p.name].cpu() if p.name in buffers else torch.zeros(p.weight.shape, dtype=dtype)
        for p in arch.prunable
    }


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, in one reduction where it is (NaN and inf survive a sum).

    ``isfinite(t).all()`` costs about ten reductions over a parameter-sized buffer; a sum of finite values
    can only overflow, so the exact test runs only when the sum is not finite.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _check_finite(result: RelevanceResult) -> None:
    tensors: list[tuple[str, torch.Tensor]] = [
        (key, getattr(result, key))
        for key in ("neurons", "neurons_abs", "heads", "heads_abs", "explained")
        if getattr(result, key) is not None
    ]
    tensors += [(f"weights[{k}]", v) for k, v in result.weights.items()]
    tensors += [(f"inputs[{i}]", v) for i, v in enumerate(result.input_relevance)]
    bad = [key for key, tensor in tensors if not _all_finite(tensor)]
    if bad:
        raise NonFiniteRelevanceError(
            f"relevance is NaN or infinite in {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; the forward "
            "pass overflowed or the weights hold NaN/inf. Run the relevance pass in float32 or bfloat16 "
            "(fp16 overflows easily), use padding_side='right' (fully masked pad rows give NaN in some "
            "attention kernels), and check the model's weights with torch.isfinite"
        )


def collect_relevance(
    model: nn.Module,
    samples: Iterable[SampleLike],
    tokenizer: Any = None,
    *,
    components: Sequence[str] = ("neurons", "heads", "inputs"),
    variant: Variant = "attnlrp",
    epsilon: float = 0.0,
    objective: Objective = "logit",
    batch_size: int = 8,
    padding_side: Literal["left", "right"] = "right",
    per_sample_abs_weights: bool = False,
    weight_buffers: WeightBuffers = "float32",
    progress: bool = True,
    description: str = "relevance",
    seed: Objective | None = None,
) -> RelevanceResult:
    """Compute AttnLRP relevance over a reference set and aggregate it in fp32 (fp64 for fp64 models).

    The model's parameters, their ``.grad`` and its train/eval mode are left as they were.

    Args:
        model: A supported causal LM (optionally PEFT-wrapped) without active dropout.
        samples: The reference set (see :func:`~hf_lrp_surgery.references.samples.as_samples` for accepted forms).
        tokenizer: Needed when samples are text.
        components: Any of ``"neurons"``, ``"heads"``, ``"weights"``, ``"inputs"``.
        variant: ``"attnlrp"``, ``"cp"`` or ``"gradient"`` (no rules: gradient x input, and
            gradient x weight for weights; see :class:`~hf_lrp_surgery.lrp.attach.LRPRules`).
        epsilon: LRP-epsilon on the prunable linear layers (0: gradient x input).
        objective: ``"logit"`` explains the target logits; ``"logprob"`` their log-probabilities (the
            gradient ``onehot - softmax`` on the logits, held constant).
        batch_size: Samples per forward/backward pass.
        padding_side: Where batches are padded; pads get zero relevance either way. Right padding
            (the default) never creates fully masked attention rows, which some attention kernels
            turn into NaN (transformers' eager attention in float64 with left padding).
        per_sample_abs_weights: Also sum per-sample ``|R|`` of the weights (a second fp32 buffer the
            size of the prunable weights, and one small matmul per sample and layer).
        weight_buffers: The dtype the weight relevance is summed in across batches: ``"float32"``
            (float64 for a float64 model) or ``"model"``, the model's own dtype, which halves the
            parameter-sized memory of a bf16/fp16 pass (to that of a plain gradient pass) at the cost
            of rounding each batch's sum to it. Each batch's product is computed in the model's dtype
            either way, as autograd's weight gradient is.
        progress: Show a tqdm progress bar.
        description: The progress bar's label.
        seed: Deprecated name of ``objective``.

    Returns:
        The aggregated :class:`~hf_lrp_surgery.lrp.result.RelevanceResult`.

    Raises:
        ReferenceSetError: The set is empty, a sample has nothing to explain, or text comes without
            a tokenizer.
        SequenceTooLongError: A sample is longer than the model's context.
        NonFiniteRelevanceError: Relevance came out NaN or infinite.
        UnsupportedArchitectureError: ``"weights"`` on a mixture-of-experts model; see also
            :class:`LRPRules`.
        TrainingModeError: See :class:`LRPRules`.

    Example:
        >>> result = collect_relevance(model, ["The capital of France is"], tokenizer)  # doctest: +SKIP
        >>> result.top("neurons", 5)  # doctest: +SKIP
    """
    unknown = set(components) - set(COLLECTABLE)
    if unknown or not components:
        raise ValueError(f"components must be a non-empty subset of {COLLECTABLE}, got {list(components)}")
    if seed is not None:
        objective = renamed_seed(seed)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be 'logit' or 'logprob', got {objective!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if weight_buffers not in WEIGHT_BUFFERS:
        raise ValueError(f"weight_buffers must be one of {WEIGHT_BUFFERS}, got {weight_buffers!r}")
    sample_list = _samples.as_samples(samples)
    if not sample_list:
        raise ReferenceSetError("the reference set is empty; give at least one sample to explain")

    rules = LRPRules(model, variant=variant, epsilon=epsilon)
    arch = rules.arch
    if "weights" in components:
        arch.check_granularity("weights")
    encoded = [
        _samples.encode_sample(s, i, tokenizer, arch.max_positions, arch.vocab_size) for i, s in enumerate(sample_list)
    ]
    wanted = frozenset(components)
    result = RelevanceResult(
        fingerprint=fingerprint(model),
        settings={
            "method": "gradient" if variant == "gradient" else "lrp",
            "variant": variant,
            "epsilon": float(epsilon),
            # Saved scores and model cards of earlier releases read the objective under this key.
            "seed": objective,
            "components": sorted(wanted),
            "per_sample_abs_weights": bool(per_sample_abs_weights and "weights" in wanted),
            "weight_buffers": weight_buffers,
        },
    )
    device = execution_device(arch.token_embedding)
    pad_id = _samples.pad_token_id(tokenizer, arch.model)
    explained: list[torch.Tensor] = []
    dtype = torch.float64 if arch.embedding_weight.dtype == torch.float64 else torch.float32
    neuron_sums = torch.zeros(arch.num_layers, arch.num_neurons, dtype=dtype, device=device)
    neuron_abs = torch.zeros_like(neuron_sums)
    head_sums = torch.zeros(arch.num_layers, arch.num_heads, dtype=dtype, device=device)
    head_abs = torch.zeros_like(head_sums)
    weights_dtype = arch.embedding_weight.dtype if weight_buffers == "model" else dtype

    with (
        rules,
        _Collectors(arch, wanted, per_sample_abs_weights, dtype, weights_dtype) as collectors,
        torch.enable_grad(),
        tqdm(total=len(encoded), desc=description, unit="sample", disable=not progress, leave=False) as bar,
    ):
        for start in range(0, len(encoded), batch_size):
            batch = _samples.make_batch(encoded[start : start + batch_size], pad_id, padding_side, device)
            collectors.start_batch(batch.attention_mask)
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
            explained_sum, batch_explained = _objective(logits, batch, objective)
            del logits  # the backward does not need them: T x vocab values freed before it runs
            leaves = [rules.inputs[key] for key in ("tokens", "positions") if key in rules.inputs]
            grads = torch.autograd.grad(explained_sum, leaves)
            collectors.end_batch()
            del explained_sum
            explained.append(batch_explained.cpu())
            if collectors.neurons is not None:
                neuron_sums += collectors.neurons.sum(0)
                neuron_abs += collectors.neurons.abs().sum(0)
            if collectors.heads is not None:
                head_sums += collectors.heads.sum(0)
                head_abs += collectors.heads.abs().sum(0)
            if "inputs" in wanted:
                token_relevance = torch.stack(
                    [(leaf.detach().to(dtype) * g.to(dtype)).sum(-1) for leaf, g in zip(leaves, grads)]
                ).sum(0)
                mask = batch.attention_mask.bool()
                for b in range(mask.shape[0]):
                    result.input_relevance.append(token_relevance[b][mask[b]].cpu())
                    result.input_ids.append(batch.input_ids[b][mask[b]].cpu())
            bar.update(batch.input_ids.shape[0])

    result.num_samples = len(encoded)
    result.explained = torch.cat(explained)
    if "neurons" in wanted:
        result.neurons, result.neurons_abs = neuron_sums.cpu(), neuron_abs.cpu()
    if "heads" in wanted:
        result.heads, result.heads_abs = head_sums.cpu(), head_abs.cpu()
    if "weights" in wanted:
        result.weights = _in_block_order(collectors.weights, arch, weights_dtype)
        if per_sample_abs_weights:
            result.weights_abs = _in_block_order(collectors.weights_abs, arch, weights_dtype)
    _check_finite(result)
    return result


_MOVED = {"Encoded", "ReferenceSample", "SampleLike", "as_samples", "encode_sample", "make_batch", "pad_token_id"}


__getattr__ = moved_names(
    __name__,
    {
        "SeedMode": "hf_lrp_surgery.lrp.collect:Objective",
        "COMPONENTS": "hf_lrp_surgery.lrp.collect:COLLECTABLE",
        **{name: f"hf_lrp_surgery.references.samples:{name}" for name in _MOVED},
    },
)
