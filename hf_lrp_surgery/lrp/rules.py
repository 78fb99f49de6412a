"""AttnLRP rules as autograd primitives.

The engine keeps the invariant ``R(x) = x * g(x)``, where ``g`` is the gradient of a modified
backward pass (Achtibat et al., "AttnLRP", ICML 2024, arXiv 2402.05602; Arras et al., arXiv
2502.15886). Linear and additive operations need no change. The functions here change the backward
of the few operations that do, and leave every forward value bit-identical:

* :func:`activation_rule` gives an element-wise activation ``y = f(x)`` the identity rule
  ``R_in = R_out``: the gradient is multiplied by ``f(x) / x`` evaluated in closed form.
* :func:`norm_rule` differentiates a norm with its normaliser held constant.
* :func:`epsilon_factor` is the factor that turns the gradient at a linear output into LRP-epsilon.

The uniform rule on bilinear products (1/2 on a gated MLP product, 1/4 on q and k, 1/2 on v) is a
constant factor on a gradient; :mod:`hf_lrp_surgery.lrp.attach` applies it with tensor hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "ACTIVATION_RATIOS",
    "NORM_KINDS",
    "activation_rule",
    "norm_rule",
    "epsilon_factor",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _silu_ratio(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def _gelu_ratio(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh_ratio(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def _relu_ratio(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).to(x.dtype)


def _quick_gelu_ratio(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(1.702 * x)


def _tanh_ratio(x: torch.Tensor) -> torch.Tensor:
    # tanh(x)/x has no division-free closed form; the quotient of two correctly rounded values is
    # accurate to a few ulps for every finite x != 0 (tanh(x) == x for tiny x), and the limit 1 is
    # taken at 0. Infinite x gives 1/inf = 0, the limit.
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.ones_like(x), torch.tanh(safe) / safe)


#: ``f(x) / x`` in closed form for each supported activation kind. Never computed as ``f(x) / x`` of
#: the activation's output (tanh: an exact quotient away from 0), so it is finite at ``x = 0`` and for
#: tiny ``x`` in every precision.
ACTIVATION_RATIOS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": _silu_ratio,
    "gelu": _gelu_ratio,
    "gelu_tanh": _gelu_tanh_ratio,
    "relu": _relu_ratio,
    "quick_gelu": _quick_gelu_ratio,
    # The tanh of a soft-capping cap * tanh(x / cap) (Gemma 2); the scalings around it are linear.
    "tanh": _tanh_ratio,
}


class _ActivationRule(torch.autograd.Function):
    """Forward runs the activation; backward sends ``grad * f(x)/x`` to the input."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, forward_fn: Callable[[torch.Tensor], torch.Tensor], kind: str
    ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.kind = kind
        return forward_fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        compute = torch.promote_types(x.dtype, torch.float32)
        ratio = ACTIVATION_RATIOS[ctx.kind](x.to(compute))
        return (grad.to(compute) * ratio).to(x.dtype), None, None


def activation_rule(x: torch.Tensor, forward_fn: Callable[[torch.Tensor], torch.Tensor], kind: str) -> torch.Tensor:
    """Apply an element-wise activation with the LRP identity rule ``R_in = R_out``.

    The forward value is ``forward_fn(x)``, bit for bit. The backward sends ``grad * f(x)/x`` to
    ``x``, with ``f(x)/x`` evaluated in fp32 (fp64 for fp64 inputs) in closed form, so that
    ``x * grad_x == f(x) * grad`` element-wise and no NaN or inf appears at or near ``x = 0`` in any
    precision.

    Args:
        x: The activation's input.
        forward_fn: The activation itself (the module's original ``forward``).
        kind: A key of :data:`ACTIVATION_RATIOS` matching ``forward_fn``.

    Returns:
        ``forward_fn(x)`` with the identity-rule backward.

    Example:
        >>> x = torch.tensor([0.0, 1.0], requires_grad=True)
        >>> activation_rule(x, torch.nn.functional.silu, "silu").sum().backward()
        >>> x.grad  # sigmoid(x) = silu(x) / x
        tensor([0.5000, 0.7311])
    """
    return _ActivationRule.apply(x, forward_fn, kind)


class _NormRule(torch.autograd.Function):
    """Forward runs the norm; backward differentiates it with the normaliser held constant."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        forward_fn: Callable[[torch.Tensor], torch.Tensor],
        kind: str,
        eps: float,
    ) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if kind == "layernorm":
            xf = xf - xf.mean(-1, keepdim=True)
        inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = forward_fn(x)
        ctx.save_for_backward(x, weight, inv, out if kind != "layernorm" else None)
        ctx.kind = kind
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, inv, out = ctx.saved_tensors
        kind = ctx.kind
        g = grad.to(inv.dtype)
        if weight is None:
            scale = torch.ones((), dtype=g.dtype, device=g.device)
        elif kind == "rms_one_plus":
            scale = 1.0 + weight.to(g.dtype)
        else:
            scale = weight.to(g.dtype)
        if kind == "layernorm":
            gw = g * scale
            grad_x = ((gw - gw.mean(-1, keepdim=True)) * inv).to(x.dtype)
        else:
            # The RMS norm is the diagonal map x -> (scale / rms(x)) * x. Its factor is read off the
            # forward that ran (out / x), so that x * grad_x == out * grad up to one rounding even
            # where the module computes in a lower precision than its input (transformers' RMSNorms
            # compute in fp32 for fp64 inputs); the closed form is used where x == 0.
            xf = x.to(g.dtype)
            ratio = torch.where(xf != 0, out.to(g.dtype) / xf, scale * inv)
            grad_x = (g * ratio).to(x.dtype)
        grad_w = grad_b = None
        reduce_dims = tuple(range(g.dim() - 1))
        if weight is not None and ctx.needs_input_grad[1]:
            xf = x.to(g.dtype)
            if kind == "layernorm":
                xf = xf - xf.mean(-1, keepdim=True)
            grad_w = (g * xf * inv).sum(reduce_dims).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(reduce_dims).to(grad.dtype)
        return grad_x, grad_w, grad_b, None, None, None


#: Norm kinds: ``rms`` (``w * x / rms(x)``), ``rms_one_plus`` (Gemma: ``(1 + w) * x / rms(x)``) and
#: ``layernorm`` (``w * (x - mean) / std + b``).
NORM_KINDS = ("rms", "rms_one_plus", "layernorm")


def norm_rule(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    forward_fn: Callable[[torch.Tensor], torch.Tensor],
    kind: str,
    eps: float,
) -> torch.Tensor:
    """Apply a norm over the last dimension with the identity rule on its normaliser.

    The forward value is ``forward_fn(x)``, bit for bit. The backward is that of the norm with
    ``1/rms(x)`` (or ``1/std(x)``) held constant, computed in fp32 (fp64 for fp64 inputs): the norm
    becomes a linear map (plus LayerNorm's bias), so relevance passes through it unchanged
    (LayerNorm: up to its bias). For the RMS kinds the diagonal factor is taken from the forward that
    ran (``out / x``, closed form where ``x == 0``), so ``R_in == R_out`` element-wise to rounding
    even when the module computes in a lower precision than its input.

    Args:
        x: The norm's input.
        weight: The scale parameter (``None`` for a norm without one).
        bias: LayerNorm's bias, else ``None``.
        forward_fn: The norm module's original ``forward``.
        kind: One of :data:`NORM_KINDS`.
        eps: The norm's epsilon.

    Returns:
        ``forward_fn(x)`` with the modified backward (also to ``weight`` and ``bias``).
    """
    return _NormRule.apply(x, weight, bias, forward_fn, kind, eps)


def epsilon_factor(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The epsilon-rule factor ``z / (z + epsilon * sign(z))`` with ``sign(0) = +1``, in fp32 (or fp64).

    Multiplying the gradient at a linear layer's output ``z`` by this factor turns gradient x input
    into LRP-epsilon for that layer.

    Args:
        z: A linear layer's output (pre-activation).
        epsilon: The stabiliser, > 0.

    Returns:
        The factor, detached, in ``z``'s dtype.
    """
    zf = z.detach().to(torch.promote_types(z.dtype, torch.float32))
    sign = torch.where(zf >= 0, 1.0, -1.0)
    return (zf / (zf + epsilon * sign)).to(z.dtype)
