"""Models bigger than one device: relevance and correction on a model dispatched with accelerate.

An offloaded model (``accelerate.dispatch_model`` with a disk ``device_map``, ``cpu_offload``, or
``load_checkpoint_and_dispatch`` with an offload folder) keeps its weights on ``meta`` and loads them
for each forward. Its relevance (neurons, heads, weights, inputs), its fingerprint and the masks
selected from it must be those of the same model on one device; the ``hooks`` carrier must correct it
as it corrects the on-device model; baking into its meta weights is refused by name, and the mask
bakes into an on-device copy instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Literal, cast

import pytest
import torch
from accelerate import (  # type: ignore[import-untyped]
    cpu_offload,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)
from tiny_models import tiny_config, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_lrp_surgery.carriers import apply_masks
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp import collect_relevance
from hf_lrp_surgery.lrp.offload import (
    OffloadedWeightsError,
    execution_device,
    is_offloaded,
    offloading_hooks,
    parameter_value,
    refuse_offloaded,
)
from hf_lrp_surgery.masks import select
from hf_lrp_surgery.scoring import score

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLES = [[1, 5, 7, 9, 11, 3, 8, 4], [1, 40, 33, 12, 61, 6]]
COMPONENTS = ("neurons", "heads", "weights", "inputs")


def _close(actual: object, expected: object) -> None:
    """Equal to fp64 rounding (the offloaded and the on-device model run the same float64 arithmetic)."""
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def _dispatch_disk(model: PreTrainedModel, tmp: Path) -> PreTrainedModel:
    """Embedding, block 1, final norm and head on disk, block 0 on the CPU (mixed, as a big model is)."""
    device_map = {
        "model.embed_tokens": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "disk",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    return dispatch_model(model, device_map, offload_dir=str(tmp / "offload"))


def _cpu_offload(model: PreTrainedModel, tmp: Path) -> PreTrainedModel:
    """Every module's weights in a CPU state dict, loaded per module (the GPU case's ``"cpu"`` entries)."""
    return cpu_offload(model, execution_device=torch.device("cpu"))


def _checkpoint_and_dispatch(model: PreTrainedModel, tmp: Path) -> PreTrainedModel:
    """From a saved checkpoint into an empty model, the decoder blocks offloaded to a folder."""
    model.save_pretrained(tmp / "checkpoint")
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config, dtype=torch.float64, attn_implementation="eager")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    device_map["model.rotary_emb"] = "cpu"
    dispatched = load_checkpoint_and_dispatch(
        empty, str(tmp / "checkpoint"), device_map=device_map, offload_folder=str(tmp / "offload"), dtype=torch.float64
    )
    return dispatched.eval()


DISPATCHES: dict[str, Callable[[PreTrainedModel, Path], PreTrainedModel]] = {
    "dispatch_disk": _dispatch_disk,
    "cpu_offload": _cpu_offload,
    "checkpoint_and_dispatch": _checkpoint_and_dispatch,
}


@pytest.fixture(params=sorted(DISPATCHES))
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[PreTrainedModel, PreTrainedModel]:
    """``(model on one device, the same model offloaded)``, fp64."""
    model = tiny_model("llama", dtype=torch.float64)
    offloaded = DISPATCHES[request.param](copy.deepcopy(model), tmp_path)
    assert is_offloaded(offloaded) and not is_offloaded(model)
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    return model, offloaded


def test_offloaded_relevance_equals_the_on_device_relevance(pair: tuple[PreTrainedModel, PreTrainedModel]) -> None:
    model, offloaded = pair
    expected = collect_relevance(model, SAMPLES, components=COMPONENTS, progress=False)
    actual = collect_relevance(offloaded, SAMPLES, components=COMPONENTS, progress=False)
    assert actual.fingerprint == expected.fingerprint == fingerprint(model)
    for key in ("neurons", "neurons_abs", "heads", "heads_abs", "explained"):
        _close(getattr(actual, key), getattr(expected, key))
    assert actual.weights.keys() == expected.weights.keys() and actual.weights
    for name, value in expected.weights.items():
        assert value.abs().sum() > 0, name  # a real reading, not zeros on both sides
        _close(actual.weights[name], value)
    for got, want in zip(actual.input_relevance, expected.input_relevance, strict=True):
        _close(got, want)
    # The pass leaves the dispatch as it was: weights still offloaded, forward unchanged.
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    ids = torch.tensor([SAMPLES[0]])
    with torch.no_grad():
        _close(offloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_gpt2_conv1d_and_layernorm_biases_under_cpu_offload() -> None:
    """Conv1D weights and LayerNorm weight + bias read from the weights map (another code path than Llama's)."""
    model = tiny_model("gpt2", dtype=torch.float64)
    offloaded = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    expected = collect_relevance(model, SAMPLES, components=COMPONENTS, progress=False)
    actual = collect_relevance(offloaded, SAMPLES, components=COMPONENTS, progress=False)
    _close(actual.neurons, expected.neurons)
    _close(actual.heads, expected.heads)
    for name, value in expected.weights.items():
        _close(actual.weights[name], value)


@pytest.mark.parametrize("granularity", ["neurons", "heads"])
def test_hooks_carrier_corrects_the_offloaded_model_like_the_on_device_one(
    pair: tuple[PreTrainedModel, PreTrainedModel], granularity: Literal["neurons", "heads"]
) -> None:
    model, offloaded = pair
    mask = select(score(offloaded, SAMPLES, method="lrp", components=(granularity,), progress=False), granularity, 5)
    reference = select(score(model, SAMPLES, method="lrp", components=(granularity,), progress=False), granularity, 5)
    assert {k: v.tolist() for k, v in mask.indices.items()} == {k: v.tolist() for k, v in reference.indices.items()}
    corrected = apply_masks(offloaded, mask, "hooks")
    on_device = apply_masks(model, mask, "hooks")
    ids = torch.tensor(SAMPLES[:1])
    with torch.no_grad():
        got, want, base = (m(input_ids=ids).logits for m in (corrected.model, on_device.model, model))
    _close(got, want)
    assert (got - base).abs().max() > 1e-3  # the mask changed the output


def test_baking_into_offloaded_weights_is_refused_and_bakes_into_an_on_device_copy(
    pair: tuple[PreTrainedModel, PreTrainedModel],
) -> None:
    model, offloaded = pair
    mask = select(score(offloaded, SAMPLES, method="lrp", components=("neurons",), progress=False), "neurons", 4)
    with pytest.raises(OffloadedWeightsError, match="carrier='hooks'"):
        apply_masks(offloaded, mask, "bake")
    # The mask (computed on the offloaded model) carries the on-device model's fingerprint: it bakes there.
    baked = apply_masks(model, mask, "bake")
    name, neurons = next((k, v) for k, v in mask.indices.items() if v.numel())  # k: the layer's down_proj
    assert name.endswith("mlp.down_proj")
    down = cast(torch.Tensor, baked.model.get_submodule(name).weight)
    original = cast(torch.Tensor, model.get_submodule(name).weight)
    assert (down[:, neurons] == 0).all() and (original[:, neurons] != 0).any()


def test_helpers_on_plain_and_offloaded_models(tmp_path: Path) -> None:
    model = tiny_model("llama", dtype=torch.float64)
    offloaded = _dispatch_disk(copy.deepcopy(model), tmp_path)
    assert offloading_hooks(model) == {}
    assert "lm_head" in offloading_hooks(offloaded) and "model.layers.0.mlp.down_proj" not in offloading_hooks(
        offloaded
    )
    refuse_offloaded(model, "baking")  # a plain model passes
    with pytest.raises(OffloadedWeightsError, match="baking"):
        refuse_offloaded(offloaded, "baking")
    norm = offloaded.model.norm
    assert norm.weight.device.type == "meta"
    real = parameter_value(norm, "weight")
    assert real is not None and torch.equal(real, model.model.norm.weight.detach())
    assert parameter_value(norm, "bias") is None
    assert parameter_value(model.model.norm, "weight") is model.model.norm.weight  # not offloaded: the parameter
    assert execution_device(offloaded.model.embed_tokens) == torch.device("cpu")
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(OffloadedWeightsError, match="meta device"):
        execution_device(empty.model.embed_tokens)
