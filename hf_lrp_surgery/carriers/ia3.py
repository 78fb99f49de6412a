"""The adapter carrier: neuron and head masks as PEFT IA3 vectors on the inputs of the output projections.

A 0/1 vector on the input of the MLP / attention output projection (``feedforward_modules``) is
exactly neuron pruning / head ablation (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning", 2022, for IA3; implemented by ``peft``). It loads with
``PeftModel.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained(adapter_dir)`` and is
switched off with ``disable_adapter()``. A soft mask's dampened unit gets its scale ``alpha`` in the vector
(for a head, every column of the head): ``alpha`` times the input of the output projection is exactly
the baked model's output projection with that column scaled. Weight masks have no exact IA3 form and are
baked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_lrp_surgery.carriers._check import active_scaling, check_zeros, mask_list, validate_masks
from hf_lrp_surgery.carriers.corrected import SURGERY_DIR, set_adapter_enabled
from hf_lrp_surgery.carriers.registry import Carrier, CarrierCard, LoadOptions
from hf_lrp_surgery.exceptions import MaskVerificationError, ModelLoadError, SavedModelError
from hf_lrp_surgery.lrp.architectures import resolve, unwrap_model
from hf_lrp_surgery.masks.geometry import input_scales, input_units
from hf_lrp_surgery.masks.mask import Mask

__all__ = ["AdapterCarrier", "to_adapter"]

_ADAPTER_CONFIG = "adapter_config.json"


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
    carrier = AdapterCarrier()
    masks = mask_list(masks)
    carrier.check(model, masks)
    return carrier.apply(model, masks, adapter_name=adapter_name)


class AdapterCarrier(Carrier):
    """Neuron and head masks as an IA3 adapter: switchable off, saved as a PEFT adapter directory."""

    name = "adapter"
    granularities = frozenset({"neurons", "heads"})
    model_files = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    base_config = "adapter_config.json"
    card = CarrierCard(
        kind="IA3 adapter",
        form="an IA3 adapter (switchable off)",
        pruned="An IA3 adapter whose vectors are 1 everywhere except 0 on the pruned units (and a soft mask's scale "
        "on its dampened units), at the input of the "
        "MLP / attention output projections: exactly the pruned model while enabled, exactly the base "
        "model when disabled. Keep it unmerged to be able to switch it off.",
        library_name="peft",
        relation="adapter",
        tags=("ia3", "peft"),
        usage=(
            "from transformers import AutoModelForCausalLM",
            "from peft import PeftModel",
            "",
            "# with peft installed, transformers loads the base model and the adapter in one call:",
            'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            "",
            "# or explicitly:",
            'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "{repo}")',
            "with model.disable_adapter():  # the original model, exactly",
            "    ...",
        ),
        switchable=True,
    )

    def check(self, model: nn.Module, masks: Sequence[Mask]) -> None:
        """Refuse weight masks (no exact IA3 form), expert-neuron masks, wrapped models and another model's masks.

        Raises:
            ValueError: A weight mask, or a neuron mask on a mixture-of-experts model (peft's IA3 cannot
                scale one expert's slice of the fused 3-D expert parameters).
        """
        if any(m.granularity == "weights" for m in masks):
            raise ValueError(
                "a weight mask has no exact IA3 form; use carrier='bake' for weight masks "
                "(neuron and head masks can be adapters)"
            )
        if any(m.granularity == "neurons" for m in masks):
            spec = resolve(model).spec
            if spec.moe is not None:
                raise ValueError(
                    f"{spec.model_type}: an expert-neuron mask has no exact IA3 form (the experts are fused 3-D "
                    "parameters); use carrier='bake' for neuron masks on mixture-of-experts models (head masks "
                    "can be adapters)"
                )
        super().check(model, masks)

    @torch.no_grad()
    def apply(self, model: nn.Module, masks: Sequence[Mask], *, adapter_name: str) -> nn.Module:
        """Wrap ``model`` in an IA3 adapter that is 0 on the masked inputs (soft: their scales) and 1 elsewhere."""
        from peft import IA3Config, get_peft_model

        targets = [name for mask in masks for name in mask.indices]
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
        for mask in masks:
            for name in mask.indices:
                layer: Any = base.get_submodule(name)  # a peft IA3 layer: its attributes are not typed
                vector = layer.ia3_l[adapter_name]
                units = input_units(mask, name, arch).to(vector.device)
                vector.view(-1)[units] = input_scales(mask, name, arch).to(vector.device, vector.dtype)
        return peft_model

    def verify(self, model: nn.Module, masks: Sequence[Mask]) -> None:
        """Every carrier module has an active IA3 vector (a dropped adapter is an error), zero on the mask."""
        base = unwrap_model(model)
        for mask in masks:
            if mask.granularity == "weights":
                continue
            for name in mask.indices:
                module = base.get_submodule(name)
                if active_scaling(module) is None:
                    raise MaskVerificationError(
                        f"{name} should carry an active IA3 adapter with the {mask.granularity} mask, but "
                        f"{'its adapter is disabled or merged' if hasattr(module, 'ia3_l') else 'it has none'}: the "
                        "adapter was dropped while loading or switched off. Load it with "
                        "hf_lrp_surgery.carriers.load_corrected, or PeftModel.from_pretrained, and keep it enabled"
                    )
        check_zeros(model, masks)

    def save(self, model: nn.Module, directory: Path, *, base_model_name_or_path: str | None) -> None:
        """Save the adapter, its config pointing at the base model users will load it on.

        Raises:
            ValueError: No ``base_model_name_or_path``.
        """
        if not base_model_name_or_path:
            raise ValueError("an adapter needs base_model_name_or_path: the Hub id or path its base model loads from")
        peft_model: Any = model  # a peft.PeftModel
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_model_name_or_path
        # The adapter never touches the embeddings; without this peft looks the base up on the Hub.
        peft_model.save_pretrained(str(directory), save_embedding_layers=False)

    def check_saved(self, directory: Path, masks: Sequence[Mask]) -> None:
        """The saved ``adapter_config.json`` is an IA3 adapter on exactly the masks' carrier modules.

        Raises:
            SavedModelError: The config is missing, unreadable, not IA3, or targets other modules
                (the adapter and the masks come from different saves).
        """
        path = directory / _ADAPTER_CONFIG
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SavedModelError(
                f"{path} is missing or unreadable ({err}); save the corrected model again, or download it again",
                path=path,
            ) from err
        fields = config if isinstance(config, dict) else {}
        targets = fields.get("target_modules")
        expected = sorted({name for mask in masks for name in mask.indices})
        if fields.get("peft_type") != "IA3" or not isinstance(targets, list) or sorted(targets) != expected:
            raise SavedModelError(
                f"{path} does not describe the adapter of the masks in {directory / SURGERY_DIR} (it targets "
                f"{sorted(targets) if isinstance(targets, list) else targets!r}, the masks prune {expected}): the "
                "directory mixes parts of different saves. Save the corrected model again",
                path=path,
            )

    def load(self, directory: Path, options: LoadOptions) -> nn.Module:
        """Load the base model, check it is the masks' model, and put the adapter on it ``via`` peft or transformers.

        Raises:
            ModelLoadError: The base model could not be loaded.
            FingerprintMismatchError: The base model is not the one the masks were built for.
            MaskManifestError: A mask does not fit the base model's layout.
            ValueError: An unknown ``via``.
        """
        from transformers import AutoModelForCausalLM

        if not options.base_model:
            raise ModelLoadError(
                f"{directory} records no base model for its adapter; pass base_model= with a path or Hub id of the "
                "model the mask was built for"
            )
        try:
            base = AutoModelForCausalLM.from_pretrained(options.base_model, **options.from_pretrained_kwargs())
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"cannot load the adapter's base model {options.base_model!r}: {err}; pass base_model= "
                "with a path or Hub id of the model the mask was built for"
            ) from err
        for mask in options.masks:
            mask.check_model(base)
        validate_masks(base, options.masks)
        if options.via == "peft":
            from peft import PeftModel

            return PeftModel.from_pretrained(base, str(directory))
        if options.via == "transformers":
            base.load_adapter(str(directory))
            return base
        raise ValueError(f"via must be 'peft' or 'transformers', got {options.via!r}")

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Switch the adapter layers on or off (see :func:`set_adapter_enabled`)."""
        set_adapter_enabled(model, enabled)
