"""Mixture-of-experts MLPs: the router rule, expert neurons, and the taps that reach inside the expert loop.

A sparse MoE MLP (Qwen3-MoE's ``Qwen3MoeSparseMoeBlock``, Mixtral's ``MixtralSparseMoeBlock``, OLMoE's
``OlmoeSparseMoeBlock``) computes, for each token ``x``,

    ``y = sum_k w_k(x) * down_{e_k}(act(gate_{e_k}(x)) * up_{e_k}(x))``

over the router's top-k experts ``e_k``, with routing weights ``w_k(x)`` (a softmax over the router logits,
restricted to the top k; renormalised to sum 1 by Mixtral always, by Qwen3-MoE and OLMoE when
``norm_topk_prob``). Under the router rule below the normalisation makes no difference to the engine.

**The router rule.** The routing weights and the top-k selection are constants of the relevance pass: the
relevance of ``y`` flows through the expert outputs, each scaled by its (constant) routing weight, and the
router logits (and the router's weight) get no relevance. This is the rule AttnLRP's CP variant applies to
the gate of a gated MLP (a multiplicative gate held constant; Achtibat et al., ICML 2024, arXiv
2402.05602), applied to the product ``w_k * expert(x)``: relevance is conserved through it exactly
(``R(w_k * z) = R(z)`` for constant ``w_k``), so the CP conservation and AttnLRP bookkeeping identities hold
as for a dense model. Inside each expert the rules are those of a dense gated MLP: identity rule on the
activation, 1/2 on each factor of ``act(gate) * up`` (AttnLRP) or the gate held constant (CP), and
LRP-epsilon on both expert matrices if asked. The ``"gradient"`` variant has no rules, so there the
routing weights are differentiated like everything else.

**Expert neurons.** Neuron ``i`` of expert ``e`` is unit ``e * I + i`` of its block (``I`` the expert width,
``E * I`` units per block); its relevance is ``x * grad`` at the input of ``down_e``, summed over the tokens
routed to ``e``. A token not routed to ``e`` contributes nothing to ``e``'s neurons (its activation there is
never computed: it is zero).

**Taps.** The experts' matrices are slices of two fused 3-D parameters used by ``F.linear`` inside a Python
loop over the experts, with no module to hook. While any tap is installed on an experts module, its
``forward`` is an instance-level override that runs an exact copy of transformers' eager expert loop
(the forward values are bit-identical: same operations, same order; the experts classes of the three
families run the same loop) and calls the taps on each expert's gated product (the neurons: collectors,
the 1/2 rule, mask hooks) and on each expert's two linear outputs (LRP-epsilon). When the last tap is
removed the override goes and the class's forward is used again. Only the eager experts implementation is
this loop: a model loaded with another
(``experts_implementation="grouped_mm"``, transformers' default, or ``"batched_mm"``) is refused by name.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_lrp_surgery.exceptions import UnsupportedArchitectureError

__all__ = [
    "LinearTap",
    "ProductTap",
    "TapHandle",
    "add_linear_tap",
    "add_product_tap",
    "check_eager_experts",
    "constant_routing_forward",
    "expert_units",
]

#: ``tap(expert, tokens, x) -> replacement or None``: called on each expert's gated product ``x``
#: (``[n, I]``, the input of its down matrix) with ``tokens`` the flat (batch * sequence) indices of its rows.
#: A returned tensor replaces ``x`` (a mask hook zeroing neurons); ``None`` keeps it (a tap that only
#: registers gradient hooks).
ProductTap = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
#: ``tap(parameter, expert, tokens, z)``: called on each expert's linear outputs ``z``: ``parameter`` is the
#: fused parameter's name (``"gate_up_proj"``: ``z`` is ``[n, 2 I]``; ``"down_proj"``: ``[n, H]``, before the
#: routing weight).
LinearTap = Callable[[str, int, torch.Tensor, torch.Tensor], None]

#: The experts implementations (``config._experts_implementation``) whose forward is the eager loop.
_EAGER = ("eager",)


@dataclass
class _Taps:
    product: list[ProductTap] = field(default_factory=list)
    linear: list[LinearTap] = field(default_factory=list)
    previous_forward: Any = None  # an instance-level forward already there when the first tap came


_TAPS: weakref.WeakKeyDictionary[nn.Module, _Taps] = weakref.WeakKeyDictionary()


class TapHandle:
    """Removes one tap (and the forward override with the last one). Idempotent."""

    def __init__(self, experts: nn.Module, kind: str, tap: Any) -> None:
        self._experts = weakref.ref(experts)
        self._kind = kind
        self._tap = tap

    def remove(self) -> None:
        """Take the tap off; with the last one, restore the experts module's own forward."""
        experts = self._experts()
        taps = _TAPS.get(experts) if experts is not None else None
        if experts is None or taps is None or self._tap is None:
            return
        entries = getattr(taps, self._kind)
        if any(t is self._tap for t in entries):
            entries.pop(next(i for i, t in enumerate(entries) if t is self._tap))
        self._tap = None
        if not taps.product and not taps.linear:
            del _TAPS[experts]
            if taps.previous_forward is None:
                experts.__dict__.pop("forward", None)
            else:
                experts.forward = taps.previous_forward


def check_eager_experts(experts: nn.Module, model_type: str) -> None:
    """Refuse an experts module that does not run the eager loop (the only one the taps reproduce).

    Args:
        experts: An experts module (``Qwen3MoeExperts``, ``MixtralExperts``, ``OlmoeExperts``).
        model_type: For the message.

    Raises:
        UnsupportedArchitectureError: Its config selects another experts implementation (named).

    Example:
        >>> check_eager_experts(model.model.layers[0].mlp.experts, "qwen3_moe")  # doctest: +SKIP
    """
    config = getattr(experts, "config", None)
    implementation = getattr(config, "_experts_implementation", None)
    if implementation not in _EAGER:
        raise UnsupportedArchitectureError(
            f"{model_type}: the experts run the {implementation!r} experts implementation; relevance and mask "
            "hooks reach inside the eager expert loop only: load the model with experts_implementation='eager' "
            "(or call model.set_experts_implementation('eager'))"
        )


def _taps_of(experts: nn.Module, model_type: str) -> _Taps:
    taps = _TAPS.get(experts)
    if taps is None:
        check_eager_experts(experts, model_type)
        taps = _Taps(previous_forward=experts.__dict__.get("forward"))
        _TAPS[experts] = taps
        experts.forward = functools.partial(_tapped_forward, experts)
    return taps


def add_product_tap(experts: nn.Module, tap: ProductTap, *, model_type: str, prepend: bool = False) -> TapHandle:
    """Call ``tap`` on every expert's gated product (the expert neurons) in each forward of ``experts``.

    Args:
        experts: The experts module.
        tap: See :data:`ProductTap`.
        model_type: For error messages.
        prepend: Run before the taps already installed (its gradient hooks then run first too).

    Returns:
        The handle that removes the tap.

    Raises:
        UnsupportedArchitectureError: The experts do not run the eager loop.

    Example:
        >>> handle = add_product_tap(experts, lambda e, tokens, x: None, model_type="qwen3_moe")  # doctest: +SKIP
        >>> handle.remove()  # doctest: +SKIP
    """
    taps = _taps_of(experts, model_type)
    if prepend:
        taps.product.insert(0, tap)
    else:
        taps.product.append(tap)
    return TapHandle(experts, "product", tap)


def add_linear_tap(experts: nn.Module, tap: LinearTap, *, model_type: str) -> TapHandle:
    """Call ``tap`` on both linear outputs of every expert in each forward of ``experts``.

    Args:
        experts: The experts module.
        tap: See :data:`LinearTap`.
        model_type: For error messages.

    Returns:
        The handle that removes the tap.

    Raises:
        UnsupportedArchitectureError: The experts do not run the eager loop.
    """
    taps = _taps_of(experts, model_type)
    taps.linear.append(tap)
    return TapHandle(experts, "linear", tap)


def _tapped_forward(
    experts: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' eager expert loop, operation for operation, with taps.

    The loop of ``Qwen3MoeExperts.forward``, ``MixtralExperts.forward`` and ``OlmoeExperts.forward`` (5.x: the
    same code). Mixtral's routing weights arrive in fp32 whatever the model's dtype: the product with them is
    then fp32 and cast back by the ``.to`` before ``index_add_``, as in the class's forward.
    """
    taps = _TAPS.get(experts) or _Taps()
    num_experts = experts.num_experts
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

    for hit in expert_hit:
        expert_idx = hit[0]
        if expert_idx == num_experts:
            continue
        expert = int(expert_idx)
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate_up = nn.functional.linear(current_state, experts.gate_up_proj[expert_idx])
        for linear_tap in taps.linear:
            linear_tap("gate_up_proj", expert, token_idx, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        current_hidden_states = experts.act_fn(gate) * up
        for product_tap in taps.product:
            replaced = product_tap(expert, token_idx, current_hidden_states)
            if replaced is not None:
                current_hidden_states = replaced
        current_hidden_states = nn.functional.linear(current_hidden_states, experts.down_proj[expert_idx])
        for linear_tap in taps.linear:
            linear_tap("down_proj", expert, token_idx, current_hidden_states)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

    return final_hidden_states


def constant_routing_forward(hidden_states: torch.Tensor, *, original: Callable[..., Any]) -> Any:
    """The router's forward with its routing weights detached: the router rule (see the module docstring).

    Args:
        hidden_states: The router's input.
        original: The router module's own ``forward`` (returning ``(logits, routing weights, indices)``).

    Returns:
        The same three values, bit for bit; the routing weights carry no gradient.
    """
    logits, scores, indices = original(hidden_states)
    return logits, scores.detach(), indices


def expert_units(units: torch.Tensor, expert_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split block-level expert neuron indices ``e * I + i`` into ``(e, i)``.

    Args:
        units: int64 neuron indices of one block (``0 <= unit < E * I``).
        expert_width: ``I``, the neurons per expert.

    Returns:
        The expert indices and the neuron indices within the expert.

    Example:
        >>> expert_units(torch.tensor([0, 13, 25]), 12)
        (tensor([0, 1, 2]), tensor([0, 1, 1]))
    """
    index = units.to(torch.long)
    return torch.div(index, expert_width, rounding_mode="floor"), index % expert_width
