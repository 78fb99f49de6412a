"""Reversible attachment of the AttnLRP rules to one model instance.

Nothing is patched on a class or in a global registry. The rules live in

* instance-level ``forward`` overrides on the activation and norm modules (removed on detach, so
  attribute lookup falls back to the class method again), and
* forward (pre-)hooks that put gradient-scaling tensor hooks on the q/k/v projection outputs and on
  the gated product consumed by the MLP output projection (hook handles removed on detach), and
* for a model with tanh soft-capping (Gemma 2), an instance-level ``forward`` override on the causal
  LM that runs its forward under a torch-function mode giving each ``tanh`` the identity rule (the
  mode is on this thread's stack only while that forward runs), and
* for a mixture-of-experts model, an instance-level ``forward`` override on each router that detaches
  its routing weights (the router rule of :mod:`.moe`) and taps inside the eager expert loop for the
  1/2 on each expert's gated product and LRP-epsilon on the expert matrices (removed on detach).

Every forward value stays bit-identical; only the backward changes. See :mod:`.rules`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hf_lrp_surgery.exceptions import RulesAlreadyAttachedError, TrainingModeError
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, resolve, text_config_of
from hf_lrp_surgery.lrp.moe import add_linear_tap, add_product_tap, check_eager_experts, constant_routing_forward
from hf_lrp_surgery.lrp.offload import parameter_value
from hf_lrp_surgery.lrp.rules import activation_rule, epsilon_factor, norm_rule

__all__ = ["LRPRules", "Variant", "VARIANT_FACTORS"]

Variant = Literal["attnlrp", "cp", "gradient"]

#: Gradient factors per variant: q, k, v projection outputs and the gated MLP product.
#: AttnLRP: uniform rule on Q.K^T (1/2 each) behind the uniform rule on P.V (1/2 to P, 1/2 to V).
#: CP: no relevance through the softmax (P and the MLP gate held constant).
VARIANT_FACTORS: dict[str, dict[str, float]] = {
    "attnlrp": {"q": 0.25, "k": 0.25, "v": 0.5, "gated_product": 0.5},
    "cp": {"q": 0.0, "k": 0.0, "v": 1.0, "gated_product": 1.0},
    # No rules at all: the plain gradient, so that collectors read gradient x input (the baseline).
    "gradient": {},
}

_DROPOUT_CONFIG_KEYS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "attn_pdrop",
    "resid_pdrop",
    "embd_pdrop",
    "hidden_dropout",
    # Mixtral's router jitter: in training mode its MoE blocks multiply their input by uniform noise.
    "router_jitter_noise",
)

_ATTACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _scale_hook(factor: float | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * factor

    return hook


def _check_no_active_dropout(model: nn.Module) -> None:
    active = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.training and m.p > 0]
    if model.training:
        config = getattr(model, "config", None)
        text_config = text_config_of(config)
        active += [
            f"config.{key}={getattr(text_config, key)}"
            for key in _DROPOUT_CONFIG_KEYS
            if isinstance(getattr(text_config, key, None), (int, float)) and getattr(text_config, key) > 0
        ]
    if active:
        raise TrainingModeError(
            f"the model is in training mode with active dropout or noise ({', '.join(active[:4])}"
            f"{', ...' if len(active) > 4 else ''}); relevance needs a deterministic forward: call "
            "model.eval() before the relevance pass (and model.train() after it)"
        )


class LRPRules:
    """Attach the AttnLRP (or CP-LRP) rules to one model instance, reversibly.

    While attached, ``input * gradient`` of the model's backward pass is LRP relevance. After
    :meth:`detach` (or leaving the ``with`` block) the model's forward and backward are exactly
    what they were; other models and torch classes are never touched.

    Args:
        model: A supported causal LM (see :func:`~hf_lrp_surgery.lrp.architectures.resolve`),
            optionally wrapped by PEFT, in eval mode (or without active dropout).
        variant: ``"attnlrp"`` (default), ``"cp"`` (no relevance through softmax and gates;
            exactly conservative), or ``"gradient"`` (no rules: the plain gradient, for the
            gradient x input / gradient x weight baselines).
        epsilon: LRP-epsilon stabiliser on the prunable linear layers; 0 (default) is plain
            gradient x input there. Not allowed with ``"gradient"``.

    Attributes:
        arch: The resolved architecture.
        inputs: After each forward pass, the embedding outputs whose ``input * gradient`` is the
            input relevance: ``"tokens"`` and, for OPT/GPT-2, ``"positions"``.

    Raises:
        UnsupportedArchitectureError: See ``resolve``; or a mixture-of-experts model whose experts do not
            run the eager loop (see :func:`~hf_lrp_surgery.lrp.moe.check_eager_experts`).
        TrainingModeError: The model has active dropout (or, in training mode, a router jitter:
            Mixtral's ``router_jitter_noise``).
        RulesAlreadyAttachedError: Rules are already attached to this model.

    Example:
        >>> with LRPRules(model) as rules:  # doctest: +SKIP
        ...     logits = model(input_ids).logits
        ...     emb = rules.inputs["tokens"]
        ...     (grad,) = torch.autograd.grad(logits[0, -1].max(), emb)
        ...     token_relevance = (emb * grad).sum(-1)
    """

    def __init__(self, model: nn.Module, *, variant: Variant = "attnlrp", epsilon: float = 0.0) -> None:
        if variant not in VARIANT_FACTORS:
            raise ValueError(f"variant must be one of {sorted(VARIANT_FACTORS)}, got {variant!r}")
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if epsilon > 0 and variant == "gradient":
            raise ValueError("epsilon is an LRP rule; the 'gradient' variant has no rules, so use epsilon=0")
        self.arch: ResolvedArchitecture = resolve(model)
        if self.arch.spec.moe is not None:
            for layer in self.arch.layers:
                check_eager_experts(layer.mlp_out, self.arch.spec.model_type)
        self.variant: Variant = variant
        self.epsilon = float(epsilon)
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._patched: list[tuple[nn.Module, Any]] = []
        self._attached = False

    # -- public -------------------------------------------------------------------------------
    def attach(self) -> LRPRules:
        """Install the rules. Returns ``self``."""
        model = self.arch.model
        if model in _ATTACHED:
            raise RulesAlreadyAttachedError(
                "LRP rules are already attached to this model; leave the other LRPRules context first"
            )
        _check_no_active_dropout(model)
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        _ATTACHED.add(model)
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove every hook and instance override; the model is as it was before :meth:`attach`."""
        if self._attached:
            _ATTACHED.discard(self.arch.model)
            self._attached = False
        self._uninstall()
        self.inputs = {}

    def __enter__(self) -> LRPRules:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- installation -------------------------------------------------------------------------
    def _install(self) -> None:
        arch = self.arch
        factors = VARIANT_FACTORS[self.variant]
        if self.variant == "gradient":
            self._install_input_hooks()
            return
        gated = arch.spec.gated
        gate_modules = {id(layer.mlp_act) for layer in arch.layers} if gated else set()

        for module, kind in arch.activations:
            if gated and id(module) in gate_modules and factors["gated_product"] == 1.0:
                self._override_forward(module, _detached_forward)
            else:
                self._override_forward(module, functools.partial(_activation_forward, kind=kind))
        for module, kind in arch.norms:
            self._override_forward(module, functools.partial(_norm_forward, module=module, kind=kind))

        fused_factor = torch.tensor([factors["q"], factors["k"], factors["v"]])[arch.qkv_roles()]
        for layer in arch.layers:
            if len(layer.attention_projections) == 1:  # a fused q/k/v projection: factors per output feature
                self._scale_output(layer.attention_projections[0], fused_factor)
            else:
                for module, key in zip(layer.attention_projections, ("q", "k", "v")):
                    self._scale_output(module, factors[key])
            if arch.spec.moe is not None:
                self._install_moe(layer.mlp_out, layer.router, factors["gated_product"])
            elif gated and factors["gated_product"] != 1.0:
                self._handles.append(
                    layer.mlp_out.register_forward_pre_hook(_input_scale_pre_hook(factors["gated_product"]))
                )

        if self.epsilon > 0:
            for prunable in arch.prunable:
                self._handles.append(prunable.module.register_forward_hook(_epsilon_hook(self.epsilon)))
        if arch.softcaps:
            self._set_forward(arch.model, _tanh_identity_forward(arch.model.forward))

        self._install_input_hooks()

    def _install_moe(self, experts: nn.Module, router: nn.Module | None, product_factor: float) -> None:
        """The router rule, the uniform rule on each expert's gated product, and epsilon on the expert matrices."""
        model_type = self.arch.spec.model_type
        assert router is not None  # resolve binds a router to every block of a moe entry
        self._override_forward(router, constant_routing_forward)
        if product_factor != 1.0:
            self._handles.append(add_product_tap(experts, _product_scale_tap(product_factor), model_type=model_type))
        if self.epsilon > 0:
            self._handles.append(add_linear_tap(experts, _epsilon_tap(self.epsilon), model_type=model_type))

    def _install_input_hooks(self) -> None:
        arch = self.arch
        self._handles.append(arch.token_embedding.register_forward_hook(self._input_hook("tokens")))
        if arch.position_embedding is not None:
            self._handles.append(arch.position_embedding.register_forward_hook(self._input_hook("positions")))

    def _override_forward(self, module: nn.Module, rule_forward: Callable[..., torch.Tensor]) -> None:
        self._set_forward(module, functools.partial(rule_forward, original=module.forward))

    def _set_forward(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def _scale_output(self, module: nn.Module, factor: float | torch.Tensor) -> None:
        self._handles.append(module.register_forward_hook(_output_scale_hook(factor)))

    def _input_hook(self, key: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.inputs[key] = output
            return output

        return hook

    def _uninstall(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []
        for module, previous in reversed(self._patched):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched = []


def _activation_forward(x: torch.Tensor, *, original: Callable, kind: str) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return original(x)
    return activation_rule(x, original, kind)


class _TanhIdentityMode(TorchFunctionMode):
    """Give every ``tanh`` run while the mode is active the identity rule (tanh soft-capping).

    A soft-capping ``cap * tanh(x / cap)`` is an element-wise monotone map: AttnLRP treats it like an
    activation, R_in = R_out (Achtibat et al. 2024, Sec. 3), i.e. the gradient times ``f(x)/x``. The
    scalings by ``cap`` around the tanh are linear and need nothing. The attention-logit cap runs inside
    the eager attention function, out of reach of module hooks, hence a mode around the model's forward.
    """

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if (
            func in (torch.tanh, torch.Tensor.tanh)
            and not kwargs
            and len(args) == 1
            and torch.is_grad_enabled()
            and isinstance(args[0], torch.Tensor)
            and args[0].requires_grad
        ):
            return activation_rule(args[0], torch.tanh, "tanh")
        return func(*args, **kwargs)


def _tanh_identity_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """The causal LM's ``forward`` run under :class:`_TanhIdentityMode` (signature kept for ``generate``)."""

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with _TanhIdentityMode():
            return original(*args, **kwargs)

    return forward


def _detached_forward(x: torch.Tensor, *, original: Callable) -> torch.Tensor:
    return original(x).detach()


def _norm_forward(x: torch.Tensor, *, original: Callable, module: nn.Module, kind: str) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return original(x)
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps")  # noqa: B009 (an attribute of the norm class, not of nn.Module)
    weight, bias = parameter_value(module, "weight", x.device), parameter_value(module, "bias", x.device)
    return norm_rule(x, weight, bias, original, kind, float(eps))


def _output_scale_hook(factor: float | torch.Tensor) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            scale = factor.to(output.device, output.dtype) if isinstance(factor, torch.Tensor) else factor
            output.register_hook(_scale_hook(scale))

    return hook


def _input_scale_pre_hook(factor: float) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            args[0].register_hook(_scale_hook(factor))

    return hook


def _product_scale_tap(factor: float) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
    def tap(expert: int, tokens: torch.Tensor, x: torch.Tensor) -> None:
        if x.requires_grad:
            x.register_hook(_scale_hook(factor))

    return tap


def _epsilon_tap(epsilon: float) -> Callable[[str, int, torch.Tensor, torch.Tensor], None]:
    def tap(parameter: str, expert: int, tokens: torch.Tensor, z: torch.Tensor) -> None:
        if z.requires_grad:
            z.register_hook(_scale_hook(epsilon_factor(z, epsilon)))

    return tap


def _epsilon_hook(epsilon: float) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(_scale_hook(epsilon_factor(output, epsilon)))

    return hook
