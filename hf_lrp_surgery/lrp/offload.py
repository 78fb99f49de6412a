"""Models dispatched with accelerate: CPU / disk offload (``device_map``) seen by the relevance engine.

``accelerate.dispatch_model`` (and ``from_pretrained(device_map=...)``, ``load_checkpoint_and_dispatch``,
``cpu_offload``) puts an ``AlignDevicesHook`` on the modules it offloads: their parameters live on the
``meta`` device, and the hook copies the real values from its ``weights_map`` (a CPU state dict or an
offload folder on disk) onto the execution device just before the module's forward and drops them
right after. Code that reads ``module.weight`` outside that window sees an empty meta tensor.

The relevance pass itself needs nothing special: autograd keeps the on-loaded weights its backward
uses, and every rule and collector reads activations and gradients. Only the few places that read
parameter *values* or *devices* outside a forward need the real tensors; this module gives them:

* :func:`execution_device`: the device a module computes on (where the inputs must go);
* :func:`parameter_value`: a parameter's real value (from the hook's weights map when offloaded);
* :func:`state_dict` / :func:`parameter_values`: the model's state dict / parameters with real values
  (the fingerprint hashes these);
* :func:`refuse_offloaded`: a clear error where weights would be written (baking a mask), since
  writes into an offloaded (meta) parameter are silently lost.

Nothing here imports accelerate: hooks are recognised by their attributes (``offload``,
``weights_map``, ``execution_device``; a ``SequentialHook``'s ``hooks``), so a model without hooks
costs one attribute lookup per module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hf_lrp_surgery.exceptions import OffloadedWeightsError

__all__ = [
    "OffloadedWeightsError",
    "execution_device",
    "is_offloaded",
    "offloading_hooks",
    "parameter_value",
    "parameter_values",
    "refuse_offloaded",
    "state_dict",
    "weight_value",
]


def _hooks_of(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def _offloading_hook(module: nn.Module) -> Any | None:
    """The module's accelerate hook that offloads its tensors (``offload=True`` with a weights map)."""
    for hook in _hooks_of(module):
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            return hook
    return None


def offloading_hooks(model: nn.Module) -> dict[str, Any]:
    """Every module of ``model`` whose accelerate hook offloads its tensors, by module name.

    Args:
        model: Any module (a dispatched ``PreTrainedModel``, optionally PEFT-wrapped).

    Returns:
        ``{module name: AlignDevicesHook}``; empty for a model on one device.

    Example:
        >>> sorted(offloading_hooks(model))  # doctest: +SKIP
        ['lm_head', 'model.layers.1']
    """
    return {name: hook for name, module in model.named_modules() if (hook := _offloading_hook(module)) is not None}


def is_offloaded(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is offloaded (on ``meta``, held by an accelerate hook).

    Args:
        model: Any module.

    Returns:
        ``True`` when at least one module's tensors live in an accelerate weights map.

    Example:
        >>> is_offloaded(dispatch_model(model, {"": "disk"}, offload_dir="off"))  # doctest: +SKIP
        True
    """
    return any(_offloading_hook(module) is not None for module in model.modules())


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else its first parameter's.

    Args:
        module: A module (e.g. the token embedding).

    Returns:
        The device inputs of ``module`` must be on.

    Raises:
        OffloadedWeightsError: The module's parameters are on ``meta`` and no hook says where it runs.

    Example:
        >>> ids = ids.to(execution_device(arch.token_embedding))  # doctest: +SKIP
    """
    for hook in _hooks_of(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    tensor: torch.Tensor | None = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    if tensor is None:
        return torch.device("cpu")
    if tensor.device.type == "meta":
        raise OffloadedWeightsError(
            f"{type(module).__name__} has its parameters on the meta device and no accelerate hook that loads "
            "them; load the model with from_pretrained(device_map=...) or accelerate.dispatch_model, or "
            "materialise it (e.g. model.to_empty + load_state_dict) before a relevance pass"
        )
    return tensor.device


def _owner(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """The offloading hook that holds tensor ``name`` of ``model`` and its key in the hook's weights map."""
    parts = name.split(".")
    # The deepest module carrying an offloading hook: a block-level hook (dispatch_model) holds its
    # submodules' tensors under relative names, a leaf-level hook (cpu_offload) its own.
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut])
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        hook = _offloading_hook(module)
        if hook is not None:
            return hook, ".".join(parts[cut:])
    return None


def _real(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "meta":
        return tensor
    owner = _owner(model, name)
    if owner is None:
        raise OffloadedWeightsError(
            f"{name} is on the meta device and no accelerate hook of the model holds its value; load the model "
            "with from_pretrained(device_map=...) or accelerate.dispatch_model"
        )
    hook, key = owner
    try:
        return hook.weights_map[key]
    except KeyError as err:
        raise OffloadedWeightsError(
            f"{name} is offloaded, but its accelerate hook's weights map has no {key!r}; re-dispatch the model "
            "(its offload folder may be stale)"
        ) from err


def parameter_value(module: nn.Module, name: str, device: torch.device | None = None) -> torch.Tensor | None:
    """The real value of ``module.<name>`` (a parameter or buffer), also when accelerate offloaded it.

    Args:
        module: The module that owns the tensor (e.g. a norm, or a prunable Linear).
        name: The attribute, e.g. ``"weight"``.
        device: Move the value there (offloaded values come on the CPU); ``None`` leaves it.

    Returns:
        The tensor itself when it is not offloaded (so gradients still flow to a real parameter), a
        tensor read from the hook's weights map (no gradient) when it is, or ``None`` when the module
        has no such tensor.

    Raises:
        OffloadedWeightsError: The tensor is on ``meta`` and no hook holds its value.

    Example:
        >>> w = parameter_value(module, "weight", grad.device)  # doctest: +SKIP
    """
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.device.type == "meta":
        tensor = _real(module, name, tensor)
    return tensor if device is None else tensor.to(device)


def weight_value(module: nn.Module, device: torch.device | None = None) -> torch.Tensor:
    """``module.weight``'s real value (see :func:`parameter_value`), for a module that must have one.

    Args:
        module: A Linear / Conv1D / norm with a ``weight``.
        device: Move the value there; ``None`` leaves it.

    Returns:
        The weight, or its value from the accelerate weights map when it is offloaded.

    Raises:
        OffloadedWeightsError: The weight is on ``meta`` and no hook holds its value.
        AttributeError: The module has no ``weight`` tensor.

    Example:
        >>> relevance = (grad.T @ x).mul_(weight_value(module, grad.device))  # doctest: +SKIP
    """
    weight = parameter_value(module, "weight", device)
    if weight is None:
        raise AttributeError(f"{type(module).__name__} has no weight tensor")
    return weight


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the real values of offloaded tensors (same keys, same order).

    Offloaded values are read from the weights maps (on the CPU, or from the offload folder), one
    at a time as the dictionary is built; iterate it, do not keep it, for a model larger than memory.

    Args:
        model: Any module.

    Returns:
        The state dict.

    Raises:
        OffloadedWeightsError: A tensor is on ``meta`` and no hook holds its value.

    Example:
        >>> digest = hash_tensors(state_dict(model).items())  # doctest: +SKIP
    """
    states = model.state_dict()
    if not any(t.device.type == "meta" for t in states.values()):
        return states
    return {name: _real(model, name, tensor) for name, tensor in states.items()}


def parameter_values(model: nn.Module) -> Iterator[torch.Tensor]:
    """``model.parameters()`` with the real values of offloaded parameters (read one at a time).

    Args:
        model: Any module.

    Yields:
        Each parameter, or its real value when it is offloaded.

    Raises:
        OffloadedWeightsError: A parameter is on ``meta`` and no hook holds its value.

    Example:
        >>> total = sum(float(p.double().sum()) for p in parameter_values(model))  # doctest: +SKIP
    """
    for name, param in model.named_parameters():
        yield _real(model, name, param) if param.device.type == "meta" else param


def refuse_offloaded(model: nn.Module, what: str) -> None:
    """Refuse to write weights of an offloaded model, where the write would be silently lost.

    An offloaded parameter is an empty ``meta`` tensor: ``param[index] = 0`` does nothing, and the
    next forward loads the unchanged value from the weights map again.

    Args:
        model: The model about to be written.
        what: What would write, for the message (e.g. ``"baking a mask"``).

    Raises:
        OffloadedWeightsError: Some of the model's weights are offloaded.

    Example:
        >>> refuse_offloaded(model, "baking a mask")  # doctest: +SKIP
    """
    hooks = offloading_hooks(model)
    if hooks:
        names = sorted(hooks)
        raise OffloadedWeightsError(
            f"{what} writes weights, but this model is dispatched with accelerate and {', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''} are offloaded (meta tensors, loaded from a weights map for "
            "each forward), so the write would be lost. Use carrier='hooks' (in memory, works on offloaded "
            "models), or load the model without a device_map (e.g. on the CPU: masks are index lists and the "
            "fingerprint is the same on every device) and bake there"
        )
