"""Model fingerprints: which model an artefact (relevance, mask) was computed on.

A fingerprint is the model type, a hash of the architecture-defining config and a hash of the
weights. The weight hash is taken over every tensor of the state dict rendered in bfloat16, so the
fp32, bf16 and device copies of one checkpoint share a fingerprint, while any real change to the
weights (fine-tuning, pruning, another checkpoint) changes it.

A fingerprint does not cover an artefact's :class:`~hf_lrp_surgery.lrp.layout.Layout` (where its units
sit in the model): the layout is derived from the config and the architecture registry, so it is
compared explicitly, with the model's own, wherever a mask meets a model
(:meth:`~hf_lrp_surgery.masks.Mask.validate`, run by every carrier next to the fingerprint check).
Saved fingerprints therefore stay valid, and an edited layout is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hf_lrp_surgery.exceptions import FingerprintMismatchError
from hf_lrp_surgery.lrp import offload

__all__ = ["ModelFingerprint", "fingerprint", "check_fingerprint"]

#: Config keys that do not change what the model computes (or that only say how it is stored).
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "name_or_path",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "use_cache",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "_commit_hash",
        "architectures",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_experts_implementation",
    }
)

# model -> (parameter versions and probe, fingerprint): hashing 100M+ weights takes a while. In-place
# updates (optimizer steps, baking a mask) bump a parameter's ``_version``, which invalidates it; fused
# optimizer kernels (AdamW(fused=True), the Trainer's default) do not, so a few strided elements of
# every parameter are part of the key too.
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], ModelFingerprint]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of a model's architecture and weights.

    Attributes:
        model_type: ``config.model_type``.
        config_sha256: SHA-256 of the config without storage-only keys (dtype, paths, versions).
        weights_blake2b: BLAKE2b of every state-dict tensor (name, shape, bf16 bytes).
        num_parameters: Number of parameter elements.
        dtype: The dtype of the weights when the fingerprint was taken (``"float32"``, ...). Not part
            of the identity (the fp32 and bf16 copies of a checkpoint are the same model); it explains a
            mismatch when a model was corrected in fp16 and loaded in another dtype. ``None`` in
            fingerprints saved before it was recorded.
    """

    model_type: str
    config_sha256: str
    weights_blake2b: str
    num_parameters: int
    dtype: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The fingerprint as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        """Rebuild a fingerprint saved with :meth:`to_dict`."""
        return cls(
            **{key: data[key] for key in ("model_type", "config_sha256", "weights_blake2b", "num_parameters")},
            dtype=data.get("dtype"),
        )

    def same_architecture(self, other: ModelFingerprint) -> bool:
        """Whether ``other`` is the same model type and configuration (the weights may differ).

        Args:
            other: Another fingerprint.

        Returns:
            ``True`` when a mask built for one fits the other's modules.

        Example:
            >>> fingerprint(model).same_architecture(mask.fingerprint)  # doctest: +SKIP
        """
        return (self.model_type, self.config_sha256) == (other.model_type, other.config_sha256)

    def short(self) -> str:
        """A short human-readable form, e.g. ``llama:3f2a9c1d07b4``."""
        return f"{self.model_type}:{self.weights_blake2b[:12]}"


def _config_digest(config: Any) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    for sub in ("text_config", "vision_config"):
        if isinstance(data.get(sub), dict):
            data[sub] = {k: v for k, v in data[sub].items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=32)
    for name, tensor in offload.state_dict(model).items():
        canonical = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name}:{tuple(canonical.shape)};".encode())
        digest.update(canonical.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weights_dtype(model: nn.Module) -> str | None:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return str(max(set(floating), key=floating.count)).removeprefix("torch.") if floating else None


def fingerprint(model: nn.Module) -> ModelFingerprint:
    """Compute (or return the cached) fingerprint of ``model``.

    Args:
        model: A ``PreTrainedModel`` (optionally wrapped by PEFT; adapter weights are part of the
            state dict and so of the fingerprint).

    Returns:
        The fingerprint. Cached per model instance until a parameter changes in place.

    Example:
        >>> fp = fingerprint(model)  # doctest: +SKIP
        >>> fp.short()  # doctest: +SKIP
        'llama:3f2a9c1d07b4'
    """
    versions = tuple(
        (p._version, float(p.detach().reshape(-1)[:: max(1, p.numel() // 16)].double().sum()))
        for p in offload.parameter_values(model)
    )
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; fingerprints are for transformers models")
    result = ModelFingerprint(
        model_type=str(config.model_type),
        config_sha256=_config_digest(config),
        weights_blake2b=_weights_digest(model),
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=_weights_dtype(model),
    )
    _CACHE[model] = (versions, result)
    return result


def check_fingerprint(expected: ModelFingerprint, model: nn.Module, *, what: str = "this artefact") -> None:
    """Refuse to use an artefact on a model other than the one it was computed on.

    Args:
        expected: The fingerprint stored with the artefact.
        model: The model it is about to be used with.
        what: How to name the artefact in the error message.

    Raises:
        FingerprintMismatchError: The architecture or the weights differ.
    """
    actual = fingerprint(model)
    if actual == expected:
        return
    if (actual.model_type, actual.config_sha256) != (expected.model_type, expected.config_sha256):
        detail = (
            f"a different architecture ({expected.model_type} config {expected.config_sha256[:12]} vs "
            f"{actual.model_type} config {actual.config_sha256[:12]})"
        )
    else:
        detail = f"different weights ({expected.short()} vs {actual.short()})"
        if expected.dtype and actual.dtype and expected.dtype != actual.dtype:
            detail += (
                f". It was computed on {expected.dtype} weights and this model is {actual.dtype}: rounding to "
                f"{expected.dtype} changed the weights, so load the model with dtype=torch.{expected.dtype}"
            )
    raise FingerprintMismatchError(
        f"{what} was computed on {detail}; load the model it was computed on, or recompute it on this model"
    )
