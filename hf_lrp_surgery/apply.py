"""Mask carriers: baked weights and PEFT IA3 adapters, saving, loading and verification after load.

* **bake** zeroes exactly what the mask says: for a neuron the column of the MLP output projection
  that reads it (``down_proj`` / ``fc2`` / ``c_proj``) and the rows of the input projections that
  write it (``gate_proj`` and ``up_proj`` for gated MLPs, with their biases), so the weights show the
  pruning; for a head the columns of the attention output projection that read it; for weights
  the elements. The result is an ordinary checkpoint.
* **adapter** expresses neuron and head masks as IA3 vectors on the *input* of the output
  projections (``feedforward_modules``): a 0/1 vector there is exactly neuron pruning / head
  ablation (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
  In-Context Learning", 2022, for IA3; implemented by ``peft``). It loads with
  ``PeftModel.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained(adapter_dir)`` and is
  switched off with ``disable_adapter()``. Weight masks have no exact IA3 form and are baked.

A saved corrected model carries ``surgery/``: the mask (``mask.json`` + ``mask.safetensors``) and
``check.json`` (carrier, and the logits of the original and the corrected model on a fixed probe).
:func:`verify` proves a loaded model carries the mask: zeros where the manifest says, an active
adapter where there should be one, and probe logits that match the corrected model. A silently
dropped adapter is a :class:`~hf_lrp_surgery.exceptions.MaskVerificationError`, not a no-op.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from hf_lrp_surgery.exceptions import MaskVerificationError, ModelLoadError
from hf_lrp_surgery.io import atomic_directory
from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, resolve, unwrap_model
from hf_lrp_surgery.masks import Mask

__all__ = [
    "CHECK_FILE",
    "Carrier",
    "CorrectedModel",
    "LogitsProbe",
    "SURGERY_DIR",
    "apply_masks",
    "bake",
    "input_units",
    "load_corrected",
    "read_surgery",
    "save_corrected",
    "set_adapter_enabled",
    "to_adapter",
    "verify",
]

Carrier = Literal["bake", "adapter"]
#: Sub-directory of a saved corrected model that holds the mask and the check record.
SURGERY_DIR = "surgery"
#: The file in ``surgery/`` that records the carrier and the probe logits of a saved corrected model.
CHECK_FILE = "check.json"
_PROBE_LENGTH = 16
_PROBE_VOCAB = 128


def _masks(masks: Mask | Sequence[Mask]) -> list[Mask]:
    out = [masks] if isinstance(masks, Mask) else list(masks)
    if not out:
        raise ValueError("give at least one mask")
    granularities = [m.granularity for m in out]
    if len(set(granularities)) != len(granularities):
        raise ValueError(f"give at most one mask per granularity, got {granularities}")
    return out


def _modules(arch: ResolvedArchitecture) -> dict[str, nn.Module]:
    """Every prunable weight-owning module by full name."""
    return {p.name: p.module for p in arch.prunable}


def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def input_units(mask: Mask, name: str, arch: ResolvedArchitecture) -> torch.Tensor:
    """Input features of the carrier module that the mask zeroes (neurons, or every column of a head).

    Args:
        mask: A neuron or head mask.
        name: One of its carrier modules.
        arch: The resolved architecture of the model it was built for.

    Returns:
        The int64 indices of the carrier's input features.
    """
    index = mask.indices[name]
    return _head_columns(index, arch.head_dim) if mask.granularity == "heads" else index


# -- bake -------------------------------------------------------------------------------------
def bake(model: nn.Module, masks: Mask | Sequence[Mask]) -> nn.Module:
    """Zero the masked units in the weights of ``model``, in place.

    Args:
        model: The base model the masks were built for.
        masks: One mask or one per granularity.

    Returns:
        ``model`` (same object), now carrying the masks in its weights.

    Raises:
        FingerprintMismatchError: A mask was built for another model (the check runs before any
            weight is touched).

    Example:
        >>> bake(model, mask).save_pretrained("runs/baked")  # doctest: +SKIP
    """
    mask_list = _masks(masks)
    for mask in mask_list:
        mask.check_model(model)
    return _bake(model, mask_list)


@torch.no_grad()
def _bake(model: nn.Module, mask_list: list[Mask]) -> nn.Module:
    """:func:`bake` without the fingerprint check (done by the caller on the original model)."""
    arch = resolve(model)
    modules = _modules(arch)
    spec = arch.spec
    conv1d = spec.orientation == "conv1d"
    for mask in mask_list:
        for name, index in mask.indices.items():
            weight = modules[name].weight
            if mask.granularity == "weights":
                weight[torch.unravel_index(index.to(weight.device), weight.shape)] = 0
                continue
            columns = input_units(mask, name, arch).to(weight.device)
            # The carrier reads the units on its input axis: columns of [out, in], rows of Conv1D's [in, out].
            if conv1d:
                weight[columns] = 0
            else:
                weight[:, columns] = 0
            if mask.granularity == "neurons":
                layer = mask.layer_of(name)
                for role in spec.mlp_in:
                    writer = modules[f"{spec.decoder_layers}.{layer}.{role}"]
                    if conv1d:
                        writer.weight[:, columns] = 0
                    else:
                        writer.weight[columns] = 0
                    if getattr(writer, "bias", None) is not None:
                        writer.bias[columns] = 0
    return model


# -- adapter ----------------------------------------------------------------------------------
def _refuse_wrapped(model: nn.Module) -> None:
    if unwrap_model(model) is not model or any(hasattr(m, "ia3_l") or hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError(
            "the model already carries a PEFT adapter; merge it first (peft_model.merge_and_unload()) "
            "and compute the mask on the merged model"
        )


def to_adapter(model: nn.Module, masks: Mask | Sequence[Mask], *, adapter_name: str = "default") -> nn.Module:
    """Wrap ``model`` in a PEFT IA3 adapter that carries neuron and/or head masks exactly.

    ``peft`` injects the adapter layers into ``model`` itself (pass a copy to keep the original).

    Args:
        model: The base model the masks were built for (not already PEFT-wrapped).
        masks: Neuron and/or head masks (at most one of each).
        adapter_name: Name of the adapter.

    Returns:
        A ``peft.PeftModel``; ``with peft_model.disable_adapter():`` gives the base model's outputs.

    Raises:
        ValueError: A weight mask was given (it has no exact IA3 form: bake it), or the model is
            already PEFT-wrapped.
        FingerprintMismatchError: A mask was built for another model.

    Example:
        >>> peft_model = to_adapter(copy.deepcopy(model), mask)  # doctest: +SKIP
        >>> peft_model.save_pretrained("runs/adapter")  # doctest: +SKIP
    """
    mask_list = _masks(masks)
    _check_adapter_input(model, mask_list)
    return _to_adapter(model, mask_list, adapter_name)


def _check_adapter_input(model: nn.Module, mask_list: list[Mask]) -> None:
    if any(m.granularity == "weights" for m in mask_list):
        raise ValueError(
            "a weight mask has no exact IA3 form; use carrier='bake' for weight masks "
            "(neuron and head masks can be adapters)"
        )
    _refuse_wrapped(model)
    for mask in mask_list:
        mask.check_model(model)


@torch.no_grad()
def _to_adapter(model: nn.Module, mask_list: list[Mask], adapter_name: str) -> nn.Module:
    """:func:`to_adapter` without the input checks (done by the caller on the original model)."""
    from peft import IA3Config, get_peft_model

    targets = [name for mask in mask_list for name in mask.indices]
    if not targets:
        raise ValueError("the masks prune nothing")
    config = IA3Config(
        target_modules=targets,
        feedforward_modules=targets,
        init_ia3_weights=True,
        fan_in_fan_out=resolve(model).spec.orientation == "conv1d",
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    arch = resolve(peft_model)
    base = unwrap_model(peft_model)
    for mask in mask_list:
        for name in mask.indices:
            vector = base.get_submodule(name).ia3_l[adapter_name]
            vector.view(-1)[input_units(mask, name, arch).to(vector.device)] = 0
    return peft_model


# -- probe ------------------------------------------------------------------------------------
def _vocab_size(model: nn.Module) -> int:
    return int(unwrap_model(model).get_output_embeddings().weight.shape[0])


@torch.no_grad()
def _probe_logits(model: nn.Module, input_ids: list[int], vocab_ids: list[int]) -> torch.Tensor:
    device = resolve(model).token_embedding.weight.device
    ids = torch.tensor([input_ids], device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
    return logits[:, vocab_ids].double().cpu()


@dataclass(frozen=True)
class LogitsProbe:
    """Logits of the original and the corrected model on a fixed probe, to recognise the corrected model.

    Attributes:
        input_ids: The probe tokens (seeded, so every copy of a model sees the same).
        vocab_ids: The vocabulary entries whose logits are kept.
        original: ``[len(input_ids)][len(vocab_ids)]`` logits of the base model.
        corrected: The same for the corrected model.
        dtype: The dtype the logits were computed in.
    """

    input_ids: list[int]
    vocab_ids: list[int]
    original: list[list[float]]
    corrected: list[list[float]]
    dtype: str

    @staticmethod
    def positions(model: nn.Module, seed: int = 0) -> tuple[list[int], list[int]]:
        """The probe's token ids and kept vocabulary ids for ``model``'s vocabulary."""
        generator = torch.Generator().manual_seed(seed)
        vocab = _vocab_size(model)
        input_ids = torch.randint(0, vocab, (_PROBE_LENGTH,), generator=generator).tolist()
        vocab_ids = torch.randperm(vocab, generator=generator)[:_PROBE_VOCAB].sort().values.tolist()
        return input_ids, vocab_ids

    def check(self, model: nn.Module) -> float:
        """Compare ``model``'s probe logits with the corrected model's.

        Returns:
            The largest absolute logit difference to the corrected model.

        Raises:
            MaskVerificationError: The logits are not the corrected model's (beyond a tolerance set by
                the model's dtype), or are closer to the original model's.
        """
        logits = _probe_logits(model, self.input_ids, self.vocab_ids)
        corrected, original = torch.tensor(self.corrected), torch.tensor(self.original)
        to_corrected = float((logits - corrected).abs().max())
        to_original = float((logits - original).abs().max())
        half = ("torch.bfloat16", "torch.float16")
        low_precision = self.dtype in half or str(resolve(model).token_embedding.weight.dtype) in half
        tolerance = (0.05 if low_precision else 1e-4) * (1.0 + float(corrected.abs().max()))
        if to_corrected > tolerance or (to_original < to_corrected and self.original != self.corrected):
            raise MaskVerificationError(
                f"the model's probe logits differ from the corrected model's by {to_corrected:.3g} (tolerance "
                f"{tolerance:.3g}; to the original model: {to_original:.3g}): this is not the corrected model. "
                "Was the adapter dropped or disabled, or the base model swapped?"
            )
        return to_corrected


# -- verification -----------------------------------------------------------------------------
def _active_scaling(module: nn.Module) -> torch.Tensor | None:
    """The product of the active IA3 vectors of an IA3 layer, or ``None`` when it scales nothing."""
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return None
    vectors = [module.ia3_l[a].detach().flatten() for a in module.active_adapters if a in module.ia3_l]
    if not vectors:
        return None
    return torch.stack(vectors).prod(0)


def verify(
    model: nn.Module, masks: Mask | Sequence[Mask], *, carrier: Carrier | None = None, probe: LogitsProbe | None = None
) -> None:
    """Prove that ``model`` carries ``masks``.

    Every masked unit must be exactly zero where its carrier keeps it: in an active IA3 vector on
    the carrier module (adapters), or in the weights (baked or merged). With ``carrier="adapter"``
    a carrier module without an active IA3 vector is an error (the adapter was dropped or
    disabled). With a ``probe``, the model's logits must also be the corrected model's.

    Args:
        model: The loaded model (plain, with an integrated adapter, or a ``PeftModel``).
        masks: The masks it should carry.
        carrier: The carrier it was saved with, if known.
        probe: The probe logits recorded when it was corrected.

    Raises:
        MaskVerificationError: Some masked unit is not zero, an adapter is missing or disabled, or
            the probe logits differ.
    """
    base = unwrap_model(model)
    arch = resolve(model)
    spec_conv1d = arch.spec.orientation == "conv1d"
    for mask in _masks(masks):
        for name, index in mask.indices.items():
            module = base.get_submodule(name)
            weight = getattr(module, "base_layer", module).weight.detach()
            if mask.granularity == "weights":
                values = weight[torch.unravel_index(index.to(weight.device), weight.shape)]
                where = "weights"
            else:
                units = input_units(mask, name, arch).to(weight.device)
                scaling = _active_scaling(module) if hasattr(module, "ia3_l") else None
                if carrier == "adapter" and scaling is None:
                    raise MaskVerificationError(
                        f"{name} should carry an active IA3 adapter with the {mask.granularity} mask, but "
                        f"{'its adapter is disabled or merged' if hasattr(module, 'ia3_l') else 'it has none'}: the "
                        "adapter was dropped while loading or switched off. Load it with "
                        "hf_lrp_surgery.apply.load_corrected, or PeftModel.from_pretrained, and keep it enabled"
                    )
                if scaling is not None:
                    values, where = scaling.to(weight.device)[units], "the IA3 vector"
                else:
                    values, where = (weight[units] if spec_conv1d else weight[:, units]), "weights"
            if bool(values.ne(0).any()):
                raise MaskVerificationError(
                    f"{name}: {int(values.ne(0).sum())} of the values in {where} that the {mask.granularity} mask "
                    "sets to zero are not zero: the model does not carry the mask"
                )
    if probe is not None:
        probe.check(model)


# -- applying, saving and loading -------------------------------------------------------------
@dataclass
class CorrectedModel:
    """A model carrying masks, with what is needed to save it and to recognise it after loading.

    Attributes:
        model: The corrected model: a ``PreTrainedModel`` (baked) or a ``peft.PeftModel`` (adapter).
        masks: The masks it carries.
        carrier: ``"bake"`` or ``"adapter"``.
        probe: Probe logits of the original and the corrected model.
        base_model_name_or_path: Where the base model loads from (the adapter's base).
    """

    model: nn.Module
    masks: list[Mask]
    carrier: Carrier
    probe: LogitsProbe
    base_model_name_or_path: str | None = None

    def verify(self) -> None:
        """Prove that :attr:`model` carries the masks (see :func:`verify`)."""
        verify(self.model, self.masks, carrier=self.carrier, probe=self.probe)

    def save(
        self, directory: str | os.PathLike[str], *, tokenizer: Any = None, base_model_name_or_path: str | None = None
    ) -> Path:
        """Save the corrected model, atomically; see :func:`save_corrected`."""
        return save_corrected(self, directory, tokenizer=tokenizer, base_model_name_or_path=base_model_name_or_path)


def apply_masks(
    model: nn.Module,
    masks: Mask | Sequence[Mask],
    carrier: Carrier = "adapter",
    *,
    inplace: bool = False,
    adapter_name: str = "default",
) -> CorrectedModel:
    """Apply masks to a model with the chosen carrier and record the probe that recognises the result.

    Args:
        model: The base model the masks were built for.
        masks: One mask or one per granularity.
        carrier: ``"adapter"`` (IA3, neuron and head masks; switchable off) or ``"bake"``.
        inplace: Modify ``model`` itself instead of a deep copy (saves memory on large models; the
            original is then gone for baked masks and wrapped for adapters).
        adapter_name: Name of the IA3 adapter.

    Returns:
        The :class:`CorrectedModel`, already verified.

    Raises:
        FingerprintMismatchError: A mask was built for another model.
        ValueError: An unknown carrier, or a weight mask with ``carrier="adapter"``.

    Example:
        >>> corrected = apply_masks(model, mask, "adapter")  # doctest: +SKIP
        >>> corrected.save("runs/detox-adapter", tokenizer=tokenizer)  # doctest: +SKIP
    """
    if carrier not in ("bake", "adapter"):
        raise ValueError(f"carrier must be 'bake' or 'adapter', got {carrier!r}")
    mask_list = _masks(masks)
    if carrier == "adapter":
        _check_adapter_input(model, mask_list)
    else:
        _refuse_wrapped(model)
        for mask in mask_list:
            mask.check_model(model)
    input_ids, vocab_ids = LogitsProbe.positions(model)
    original = _probe_logits(model, input_ids, vocab_ids)
    dtype = str(resolve(model).token_embedding.weight.dtype)
    base_path = getattr(model, "name_or_path", None) or None
    target = model if inplace else copy.deepcopy(model)
    corrected_model = _bake(target, mask_list) if carrier == "bake" else _to_adapter(target, mask_list, adapter_name)
    corrected = _probe_logits(corrected_model, input_ids, vocab_ids)
    probe = LogitsProbe(input_ids, vocab_ids, original.tolist(), corrected.tolist(), dtype)
    result = CorrectedModel(corrected_model, mask_list, carrier, probe, base_path)
    result.verify()
    return result


def save_corrected(
    corrected: CorrectedModel,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Save a corrected model so that ``from_pretrained`` loads it, with its masks and check record.

    Baked: a normal checkpoint. Adapter: a PEFT adapter directory whose ``adapter_config.json``
    points at ``base_model_name_or_path``. Both get ``surgery/`` (the masks and ``check.json``).
    The directory appears complete or not at all.

    Args:
        corrected: The result of :func:`apply_masks`.
        directory: Destination (replaced if it exists).
        tokenizer: Saved alongside, so the directory is self-contained for generation.
        base_model_name_or_path: For adapters: the Hub id or path of the base model, as users will
            load it (default: where the base model was loaded from).

    Returns:
        The directory.
    """
    base_path = base_model_name_or_path or corrected.base_model_name_or_path
    if corrected.carrier == "adapter":
        if not base_path:
            raise ValueError("an adapter needs base_model_name_or_path: the Hub id or path its base model loads from")
        for config in corrected.model.peft_config.values():
            config.base_model_name_or_path = base_path
    record = {
        "carrier": corrected.carrier,
        "base_model_name_or_path": base_path,
        "granularities": [m.granularity for m in corrected.masks],
        "probe": asdict(corrected.probe),
    }
    with atomic_directory(directory) as tmp:
        if corrected.carrier == "adapter":
            # The adapter never touches the embeddings; without this peft looks the base up on the Hub.
            corrected.model.save_pretrained(str(tmp), save_embedding_layers=False)
        else:
            corrected.model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for mask in corrected.masks:
            (tmp / SURGERY_DIR / mask.granularity).mkdir(parents=True)
            mask.write_into(tmp / SURGERY_DIR / mask.granularity)
        (tmp / SURGERY_DIR / CHECK_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(directory)


def read_surgery(directory: str | os.PathLike[str]) -> tuple[list[Mask], Carrier, LogitsProbe, str | None]:
    """Read the masks, carrier, probe and base model path saved with a corrected model.

    Raises:
        FileNotFoundError: ``directory`` holds no ``surgery/check.json``.
    """
    root = Path(directory) / SURGERY_DIR
    if not (root / CHECK_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no {SURGERY_DIR}/{CHECK_FILE}; it was not saved by hf_lrp_surgery")
    record = json.loads((root / CHECK_FILE).read_text())
    masks = [Mask.load(root / granularity) for granularity in record["granularities"]]
    return masks, record["carrier"], LogitsProbe(**record["probe"]), record.get("base_model_name_or_path")


def load_corrected(
    directory: str | os.PathLike[str],
    *,
    via: Literal["peft", "transformers"] = "peft",
    base_model: str | None = None,
    adapter_enabled: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a saved corrected model and verify that it carries its masks.

    Args:
        directory: A directory written by :func:`save_corrected`.
        via: For adapters: ``"peft"`` (``PeftModel.from_pretrained`` on the base model; returns a
            ``PeftModel``) or ``"transformers"`` (transformers' integrated adapter loading; returns
            the base model class with the adapter injected).
        base_model: For adapters: load the base from here instead of the saved
            ``base_model_name_or_path``.
        adapter_enabled: Return the adapter switched on (default) or off (the original model).
        dtype: Load in this dtype (default: as saved).

    Returns:
        The model, in eval mode.

    Raises:
        MaskVerificationError: The loaded model does not carry the masks (e.g. the adapter was
            silently dropped).
        FingerprintMismatchError: The adapter's base model is not the one the masks were built for.
        ModelLoadError: The base model could not be loaded.

    Example:
        >>> model = load_corrected("runs/detox-adapter")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    masks, carrier, probe, saved_base = read_surgery(directory)
    kwargs = {} if dtype is None else {"dtype": dtype}
    path = str(directory)
    if carrier == "bake":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        base_path = base_model or saved_base
        try:
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"cannot load the adapter's base model {base_path!r}: {err}; pass base_model= "
                "with a path or Hub id of the model the mask was built for"
            ) from err
        for mask in masks:
            mask.check_model(base)
        if via == "peft":
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, path)
        elif via == "transformers":
            base.load_adapter(path)
            model = base
        else:
            raise ValueError(f"via must be 'peft' or 'transformers', got {via!r}")
    model.eval()
    verify(model, masks, carrier=carrier, probe=probe)
    if not adapter_enabled and carrier == "adapter":
        set_adapter_enabled(model, False)
    return model


def set_adapter_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every PEFT adapter layer in ``model`` on or off.

    Works on a ``PeftModel`` and on a model with an adapter loaded by transformers
    (``from_pretrained(adapter_dir)`` / ``load_adapter``), whose own ``disable_adapters()`` refuses
    to run with peft < 0.22 under transformers 5.24.

    Args:
        model: The model.
        enabled: ``True`` to switch the adapters on, ``False`` for the original model's outputs.

    Returns:
        The number of adapter layers switched.

    Raises:
        ValueError: The model has no adapter layers.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model has no PEFT adapter layers to switch")
    for layer in layers:
        layer.enable_adapters(enabled)
    return len(layers)
