"""Scorers from activation statistics of the reference set: ``activation`` and ``wanda``.

``activation``: mean |a| of a neuron, mean L2 norm of a head's output, mean |x_j| of a weight's input.
``wanda``: |W_ij| * RMS(x_j) (Sun et al., "A Simple and Effective Pruning Approach for LLMs", 2023);
neurons RMS(a_i) * ||W_out[:, i]||, heads RMS(head output) * ||W_o[:, head]||.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery.lrp.offload import execution_device
from hf_lrp_surgery.references.samples import encode_sample, make_batch, pad_token_id
from hf_lrp_surgery.scoring._weights import unit_weight_norms
from hf_lrp_surgery.scoring.registry import ScoringRequest, register_scorer
from hf_lrp_surgery.scoring.scores import Scores

__all__ = ["activation", "wanda"]


@dataclass
class _Statistics:
    tokens: int = 0
    neurons_abs: torch.Tensor | None = None  # [L, I] sum |a|
    neurons_sq: torch.Tensor | None = None  # [L, I] sum a^2
    heads_norm: torch.Tensor | None = None  # [L, H] sum ||head output||
    heads_sq: torch.Tensor | None = None  # [L, H] sum ||head output||^2
    inputs_abs: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [in] sum |x_j|
    inputs_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [in] sum x_j^2


def _activation_statistics(request: ScoringRequest) -> _Statistics:
    """One forward pass over the reference set, summing |a| and a^2 of every scored input over real tokens."""
    model, arch, tokenizer, components = request.model, request.arch, request.tokenizer, request.options.components
    batch_size = request.options.batch_size
    encoded = [
        encode_sample(s, i, tokenizer, arch.max_positions, arch.vocab_size) for i, s in enumerate(request.samples)
    ]
    device = execution_device(arch.token_embedding)
    L, heads = arch.num_layers, arch.num_heads
    stats = _Statistics()
    real: list[torch.Tensor] = []  # the current batch's flat mask of real tokens

    def accumulate(kind: str, key: Any, groups: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])[real[0]].double()
            if kind == "neurons":
                stats.neurons_abs[key] += x.abs().sum(0).cpu()  # type: ignore[index]
                stats.neurons_sq[key] += x.pow(2).sum(0).cpu()  # type: ignore[index]
            elif kind == "heads":
                norms_sq = x.unflatten(-1, (groups, -1)).pow(2).sum(-1)  # [tokens, H]
                stats.heads_norm[key] += norms_sq.sqrt().sum(0).cpu()  # type: ignore[index]
                stats.heads_sq[key] += norms_sq.sum(0).cpu()  # type: ignore[index]
            else:
                stats.inputs_abs[key] = stats.inputs_abs.get(key, 0) + x.abs().sum(0).cpu()
                stats.inputs_sq[key] = stats.inputs_sq.get(key, 0) + x.pow(2).sum(0).cpu()

        return hook

    handles = []
    if "neurons" in components:
        stats.neurons_abs = torch.zeros(L, arch.num_neurons, dtype=torch.float64)
        stats.neurons_sq = torch.zeros_like(stats.neurons_abs)
        handles += [
            layer.mlp_out.register_forward_pre_hook(accumulate("neurons", layer.index, 1)) for layer in arch.layers
        ]
    if "heads" in components:
        stats.heads_norm = torch.zeros(L, heads, dtype=torch.float64)
        stats.heads_sq = torch.zeros_like(stats.heads_norm)
        handles += [
            layer.o_proj.register_forward_pre_hook(accumulate("heads", layer.index, heads)) for layer in arch.layers
        ]
    if "weights" in components:
        handles += [p.module.register_forward_pre_hook(accumulate("weights", p.name, 1)) for p in arch.prunable]
    pad_id = pad_token_id(tokenizer, arch.model)
    try:
        with (
            torch.no_grad(),
            tqdm(
                total=len(encoded), desc=request.description, unit="sample", disable=not request.progress, leave=False
            ) as bar,
        ):
            for start in range(0, len(encoded), batch_size):
                batch = make_batch(encoded[start : start + batch_size], pad_id, "right", device)
                real[:] = [batch.attention_mask.reshape(-1).bool()]
                stats.tokens += int(batch.attention_mask.sum())
                model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
                bar.update(batch.input_ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _per_token(total: torch.Tensor | None, tokens: int) -> torch.Tensor:
    assert total is not None  # summed for every scored kind
    return total / tokens


def _from_statistics(request: ScoringRequest, wanda: bool) -> Scores:
    """Activation or Wanda-style scores from one statistics pass over the reference set."""
    arch, components = request.arch, request.options.components
    stats = _activation_statistics(request)
    scores = request.new_scores(
        {"method": request.options.method, "components": list(components), "tokens": stats.tokens}
    )
    n = stats.tokens
    if "neurons" in components:
        if wanda:
            norms = torch.stack([unit_weight_norms(layer.mlp_out, arch, 1) for layer in arch.layers]).double()
            scores.neurons = (_per_token(stats.neurons_sq, n).sqrt() * norms).float()
        else:
            scores.neurons = _per_token(stats.neurons_abs, n).float()
    if "heads" in components:
        if wanda:
            norms = torch.stack(
                [unit_weight_norms(layer.o_proj, arch, arch.num_heads) for layer in arch.layers]
            ).double()
            scores.heads = (_per_token(stats.heads_sq, n).sqrt() * norms).float()
        else:
            scores.heads = _per_token(stats.heads_norm, n).float()
    if "weights" in components:
        for p in arch.prunable:
            rms = (stats.inputs_sq[p.name] / n).sqrt().float() if wanda else (stats.inputs_abs[p.name] / n).float()
            # Broadcast the per-input statistic over the weight's input axis.
            per_input = rms[:, None] if p.orientation == "conv1d" else rms[None, :]
            if wanda:
                scores.weights[p.name] = p.weight.detach().float().abs().cpu() * per_input
            else:
                scores.weights[p.name] = per_input.expand(p.weight.shape).clone()
    return scores


@register_scorer(
    "activation",
    description="mean |a| of a neuron, mean L2 norm of a head's output, mean |x_j| of a weight's input",
    in_comparison=True,
)
def activation(request: ScoringRequest) -> Scores:
    """Mean activation magnitude of each unit over the real tokens of the reference set."""
    return _from_statistics(request, wanda=False)


@register_scorer(
    "wanda",
    description="|W_ij| * RMS(x_j) (Sun et al., 2023); neurons and heads: RMS(output) * ||outgoing weights||",
    in_comparison=True,
)
def wanda(request: ScoringRequest) -> Scores:
    """Weight magnitude times input RMS (Wanda), per weight or per unit."""
    return _from_statistics(request, wanda=True)
