"""Nothing trusted blindly: masks validated when built, loaded and applied; saved corrected models checked whole.

Every tampering of issue 15 on a tiny llama: negative, repeated, unsorted and out-of-range indices,
counts in ``mask.json`` that disagree with the tensors, a reversed ``layout.neuron_modules``, a
``check.json`` entry outside the directory, parts of different saves, deleted or truncated weight
files, an fp16 correction loaded with the default dtype, a save killed midway, and outputs that
would replace something without ``overwrite=True``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from hf_lrp_surgery.carriers import MaskHooks, apply_masks, bake, load_corrected, read_surgery, save_corrected, verify
from hf_lrp_surgery.exceptions import (
    FingerprintMismatchError,
    MaskManifestError,
    MaskVerificationError,
    OutputExistsError,
    SavedModelError,
)
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp import resolve
from hf_lrp_surgery.lrp.layout import Layout
from hf_lrp_surgery.masks import Mask

PROBE = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 30, 31, 32]])
REDO = "save the corrected model again, or download it again"
#: What the file record says about a part that is not the one saved (its size or its hash differs).
FOREIGN = "mixes parts of different saves|bytes, the save wrote"
NEURONS = "model.layers.0.mlp.down_proj"


def _base(directory: Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A tiny llama saved (fp32) to ``directory`` and loaded back in ``dtype`` (so it knows its path)."""
    if not directory.exists():
        tiny_model("llama", dtype=torch.float32).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def _mask(model: nn.Module, granularity: str, picks: dict[int, list[int]], **extra: Any) -> Mask:
    """A ``granularity`` mask pruning ``picks`` (block -> units) on ``model``'s real layout."""
    layout = Layout.of(resolve(model))
    carriers = layout.carriers(granularity)  # type: ignore[arg-type]
    indices = {carriers[block]: torch.tensor(units, dtype=torch.int64) for block, units in picks.items()}
    return Mask(granularity, fingerprint(model), layout, indices, **extra)  # type: ignore[arg-type]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@functools.cache
def _saved(root: str) -> tuple[Path, Path, Path]:
    """Base, adapter and baked directories under ``root`` (saved once per session)."""
    base_dir = Path(root) / "base"
    model = _base(base_dir)
    masks = [_mask(model, "neurons", {0: [1, 3, 5], 1: [2]}), _mask(model, "heads", {1: [0]})]
    adapter = apply_masks(model, masks, "adapter").save(Path(root) / "adapter", tokenizer=tiny_tokenizer())
    baked = apply_masks(model, masks, "bake").save(Path(root) / "baked")
    return base_dir, adapter, baked


@pytest.fixture
def saved(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> dict[str, Path]:
    """Fresh copies of the saved adapter and baked directories (tests tamper with them), and the base."""
    base_dir, adapter, baked = _saved(str(tmp_path_factory.getbasetemp() / "manifests"))
    return {
        "base": base_dir,
        "adapter": Path(shutil.copytree(adapter, tmp_path / "adapter")),
        "baked": Path(shutil.copytree(baked, tmp_path / "baked")),
    }


def _rewrite_mask(directory: Path, *, indices: dict[str, list[int]] | None = None, **meta: Any) -> None:
    """Tamper with a saved mask: replace tensors and/or manifest keys (without fixing anything else)."""
    if indices is not None:
        tensors = load_file(str(directory / "mask.safetensors"))
        tensors.update({name: torch.tensor(values, dtype=torch.int64) for name, values in indices.items()})
        save_file(tensors, str(directory / "mask.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((directory / "mask.json").read_text())
    (directory / "mask.json").write_text(json.dumps({**manifest, **meta}))


def _forget_file_record(directory: Path) -> None:
    """Drop check.json's file record, as in directories saved before it existed (or a thorough tamperer)."""
    path = directory / "surgery" / "check.json"
    record = json.loads(path.read_text())
    record.pop("files")
    path.write_text(json.dumps(record))


# -- the mask value ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("granularity", "units", "problem"),
    [
        ("neurons", [-1], "negative"),
        ("neurons", [3, 3, 3], "repeated"),
        ("neurons", [5, 2], "unsorted"),
        ("neurons", [10_000], "beyond its"),
        ("heads", [0, 99], "beyond its"),
    ],
)
def test_bad_indices_are_refused_when_a_mask_is_built(granularity: str, units: list[int], problem: str) -> None:
    """Negative, repeated, unsorted or out-of-range indices: a MaskManifestError, never an IndexError."""
    model = _base_cached()
    with pytest.raises(MaskManifestError, match=problem):
        _mask(model, granularity, {0: units})


def test_weight_indices_are_checked_against_recorded_and_real_matrix_sizes() -> None:
    """Weights: beyond ``module_sizes`` when built, beyond the real matrix (or a wrong size) when applied."""
    model = _base_cached()
    name = "model.layers.0.mlp.down_proj"
    numel = model.get_submodule(name).weight.numel()
    layout = Layout.of(resolve(model))
    with pytest.raises(MaskManifestError, match=f"beyond its {numel}"):
        Mask("weights", fingerprint(model), layout, {name: torch.tensor([numel])}, {"module_sizes": {name: numel}})
    unrecorded = Mask("weights", fingerprint(model), layout, {name: torch.tensor([0, numel + 5])})
    for use in (lambda: bake(model, unrecorded), lambda: apply_masks(model, unrecorded, "bake")):
        with pytest.raises(MaskManifestError, match=f"beyond its {numel}"):
            use()
    wrong_size = Mask("weights", fingerprint(model), layout, {name: torch.tensor([0])}, {"module_sizes": {name: 7}})
    with pytest.raises(MaskManifestError, match="of 7 elements"):
        bake(model, wrong_size)


def test_a_reversed_layout_is_refused_wherever_a_mask_meets_the_model(tmp_path: Path) -> None:
    """Same fingerprint, reversed neuron_modules: apply, bake, verify, hooks and loading all refuse it."""
    model = _base_cached()
    mask = _mask(model, "neurons", {0: [1]})
    reversed_layout = replace(mask.layout, neuron_modules=mask.layout.neuron_modules[::-1])
    tampered = Mask("neurons", mask.fingerprint, reversed_layout, mask.indices)
    corrected = apply_masks(model, mask, "bake")
    for use in (
        lambda: apply_masks(model, tampered, "adapter"),
        lambda: bake(model, tampered),
        lambda: verify(corrected.model, tampered),
        lambda: verify(corrected.model, tampered, carrier="bake"),
        lambda: MaskHooks(model).add(tampered),
    ):
        with pytest.raises(MaskManifestError, match="layout is not the model's .*neuron_modules"):
            use()


# -- loading a mask --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ({"indices": {NEURONS: [1, 3, 63]}, "count": 4, "per_layer": [3, 1]}, "beyond its"),
        ({"indices": {NEURONS: [-1, 1, 3]}}, "negative"),
        ({"indices": {NEURONS: [3, 3, 3]}}, "repeated"),
        ({"per_layer": [4, 0]}, "per_layer"),
        ({"per_module": {NEURONS: 4}}, "per_module"),
        ({"count": 9}, "says 9 pruned units"),
    ],
)
def test_mask_load_refuses_tampered_files(tamper: dict[str, Any], problem: str, tmp_path: Path) -> None:
    """Indices or counts in mask.json that disagree with the tensors are refused on load."""
    mask = _mask(_base_cached(), "neurons", {0: [1, 3, 5], 1: [2]})
    directory = mask.save(tmp_path / "mask")
    _rewrite_mask(directory, **tamper)
    with pytest.raises(MaskManifestError, match=problem):
        Mask.load(directory)


def test_mask_load_names_unreadable_files(tmp_path: Path) -> None:
    mask = _mask(_base_cached(), "neurons", {0: [1]})
    directory = mask.save(tmp_path / "mask")
    tensors = directory / "mask.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:20])
    with pytest.raises(MaskManifestError, match="mask.safetensors cannot be read"):
        Mask.load(directory)
    (directory / "mask.json").write_text("{not json")
    with pytest.raises(MaskManifestError, match="mask.json cannot be read as JSON"):
        Mask.load(directory)


def test_older_manifests_without_counts_still_load(tmp_path: Path) -> None:
    mask = _mask(_base_cached(), "neurons", {0: [1]})
    directory = mask.save(tmp_path / "mask")
    manifest = json.loads((directory / "mask.json").read_text())
    for key in ("per_layer", "per_module", "units_per_module"):
        manifest.pop(key)
    (directory / "mask.json").write_text(json.dumps(manifest))
    assert Mask.load(directory).indices.keys() == mask.indices.keys()


# -- saved corrected models ------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["adapter", "baked"])
@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ({"indices": {NEURONS: [-1, 1, 3]}}, "negative"),
        ({"indices": {NEURONS: [3, 3, 3]}}, "repeated"),
        ({"indices": {NEURONS: [1, 3, 63]}, "count": 4, "per_layer": [3, 1]}, "beyond its"),
        ({"per_layer": [0, 4]}, "per_layer"),
        ({"reverse": True}, "layout is not the model's"),
    ],
)
def test_load_corrected_fails_on_every_mask_tampering(
    form: str, tamper: dict[str, Any], problem: str, saved: dict[str, Path]
) -> None:
    """The file record catches the edit (SavedModelError); without it the manifest checks do (MaskManifestError)."""
    directory = saved[form]
    neurons = directory / "surgery" / "neurons"
    if tamper.pop("reverse", False):
        layout = json.loads((neurons / "mask.json").read_text())["layout"]
        # Counts adjusted too, as a thorough edit would: only the layout check is left to notice.
        tamper.update(layout={**layout, "neuron_modules": layout["neuron_modules"][::-1]}, per_layer=[1, 3])
    _rewrite_mask(neurons, **tamper)
    with pytest.raises(SavedModelError, match=FOREIGN):
        load_corrected(directory)
    _forget_file_record(directory)
    with pytest.raises(MaskManifestError, match=problem):
        load_corrected(directory)


def test_check_json_entries_stay_inside_the_directory(saved: dict[str, Path], tmp_path: Path) -> None:
    """A mask directory or file named outside surgery/ (``../../../other/mask``, absolute) is refused."""
    outside = _mask(_base_cached(), "neurons", {0: [0]}).save(tmp_path / "other" / "mask")
    path = saved["baked"] / "surgery" / "check.json"
    record = json.loads(path.read_text())
    for entry in ("../../../other/mask", os.path.relpath(outside, path.parent), str(outside), "neurons/../heads"):
        path.write_text(json.dumps({**record, "granularities": [entry]}))
        with pytest.raises(SavedModelError, match="mask directory"):
            read_surgery(saved["baked"])
    for name in ("../../other/mask/mask.json", str(outside / "mask.json")):
        path.write_text(json.dumps({**record, "files": {name: {"bytes": 1}}}))
        with pytest.raises(SavedModelError, match="outside"):
            read_surgery(saved["baked"])
    path.write_text("{")
    with pytest.raises(SavedModelError, match="cannot be read as JSON"):
        read_surgery(saved["baked"])


def test_saved_files_use_relative_names_only(saved: dict[str, Path]) -> None:
    """No local absolute path in any saved JSON but the adapter's base model (push replaces that one)."""
    base = str(saved["base"])
    for form in ("adapter", "baked"):
        directory = saved[form]
        record = json.loads((directory / "surgery" / "check.json").read_text())
        assert all(not Path(name).is_absolute() and ".." not in name for name in record["files"])
        for path in directory.rglob("*.json"):
            data = json.loads(path.read_text())
            if path.name in ("adapter_config.json", "check.json"):
                assert data.get("base_model_name_or_path") in (base, None)
                data.pop("base_model_name_or_path", None)
            text = json.dumps(data)
            assert str(saved["base"].parent) not in text and str(directory) not in text, path
    assert read_surgery(saved["adapter"])[3] == base


def test_parts_of_different_saves_are_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    """Mask, adapter config and weights must come from one save (the budget-5 / budget-50 mix-up)."""
    model = _base_cached()
    other = [_mask(model, "neurons", {0: [7, 8]}), _mask(model, "heads", {0: [1]})]
    apply_masks(model, other, "adapter").save(tmp_path / "other", base_model_name_or_path=str(saved["base"]))
    adapter = saved["adapter"]

    mixed = Path(shutil.copytree(adapter, tmp_path / "mixed-mask"))
    shutil.rmtree(mixed / "surgery" / "neurons")
    shutil.copytree(tmp_path / "other" / "surgery" / "neurons", mixed / "surgery" / "neurons")
    with pytest.raises(SavedModelError, match=FOREIGN):
        load_corrected(mixed)
    _forget_file_record(mixed)
    with pytest.raises(SavedModelError, match="adapter_config.json does not describe the adapter"):
        read_surgery(mixed)

    mixed = Path(shutil.copytree(adapter, tmp_path / "mixed-weights"))
    shutil.copy(tmp_path / "other" / "adapter_model.safetensors", mixed / "adapter_model.safetensors")
    shutil.copy(tmp_path / "other" / "adapter_config.json", mixed / "adapter_config.json")
    with pytest.raises(SavedModelError, match="adapter_model.safetensors has .* bytes, the save wrote"):
        load_corrected(mixed)
    _forget_file_record(mixed)
    with pytest.raises(SavedModelError, match="adapter_config.json does not describe the adapter"):
        load_corrected(mixed)

    mixed = Path(shutil.copytree(adapter, tmp_path / "mixed-models"))
    heads = mixed / "surgery" / "heads" / "mask.json"
    manifest = json.loads(heads.read_text())
    heads.write_text(json.dumps({**manifest, "fingerprint": fingerprint(tiny_model("llama", seed=3)).to_dict()}))
    _forget_file_record(mixed)
    with pytest.raises(SavedModelError, match="mask of another model"):
        read_surgery(mixed)


@pytest.mark.parametrize(
    ("form", "weights"), [("adapter", "adapter_model.safetensors"), ("baked", "model.safetensors")]
)
@pytest.mark.parametrize("recorded", [True, False])
def test_deleted_or_truncated_weights_name_the_file(
    form: str, weights: str, recorded: bool, saved: dict[str, Path]
) -> None:
    """One clear SavedModelError naming the file (from the record, or wrapping what loading raised)."""
    directory = saved[form]
    if not recorded:
        _forget_file_record(directory)
    path = directory / weights
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(SavedModelError, match=f"{weights}.*{REDO}") as truncated:
        load_corrected(directory)
    assert truncated.value.path == path
    path.unlink()
    with pytest.raises(SavedModelError, match=REDO) as deleted:
        load_corrected(directory)
    assert (weights in str(deleted.value)) if recorded else ("weight files" in str(deleted.value))


def test_saves_of_earlier_releases_still_load(saved: dict[str, Path]) -> None:
    """A check.json without the file record (saved before it existed) still loads and verifies."""
    _forget_file_record(saved["adapter"])
    _forget_file_record(saved["baked"])
    for form in ("adapter", "baked"):
        assert read_surgery(saved[form])[1] == ("adapter" if form == "adapter" else "bake")
        load_corrected(saved[form])


# -- dtype -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("carrier", ["adapter", "bake"])
def test_an_fp16_correction_loads_in_fp16_by_default(carrier: str, tmp_path: Path) -> None:
    """Corrected in fp16 on an fp32 checkpoint: load_corrected(dir) loads fp16 (the recorded dtype) and verifies."""
    model = _base(tmp_path / "base", dtype=torch.float16)
    corrected = apply_masks(model, _mask(model, "neurons", {0: [1, 3]}), carrier)
    corrected.save(tmp_path / "corrected")
    loaded = load_corrected(tmp_path / "corrected")
    assert resolve(loaded).embedding_weight.dtype == torch.float16
    assert (_logits(loaded).float() - _logits(corrected.model).float()).abs().max() == 0
    if carrier == "adapter":
        with pytest.raises(FingerprintMismatchError, match=r"float16 weights .* dtype=torch.float16"):
            load_corrected(tmp_path / "corrected", dtype=torch.float32)


# -- outputs ---------------------------------------------------------------------------------------
def test_saves_refuse_to_replace_without_overwrite(tmp_path: Path) -> None:
    """Mask.save, CorrectedModel.save and save_corrected keep a non-empty directory unless overwrite=True."""
    model = _base(tmp_path / "base")
    first, second = _mask(model, "neurons", {0: [1]}), _mask(model, "neurons", {0: [2]})
    first.save(tmp_path / "mask")
    with pytest.raises(OutputExistsError, match="overwrite"):
        second.save(tmp_path / "mask")
    assert Mask.load(tmp_path / "mask").indices[NEURONS].tolist() == [1]
    second.save(tmp_path / "mask", overwrite=True)
    assert Mask.load(tmp_path / "mask").indices[NEURONS].tolist() == [2]

    corrected = apply_masks(model, first, "adapter")
    corrected.save(tmp_path / "adapter")
    newer = apply_masks(model, second, "adapter")
    for save in (lambda: newer.save(tmp_path / "adapter"), lambda: save_corrected(newer, tmp_path / "adapter")):
        with pytest.raises(OutputExistsError, match="overwrite"):
            save()
        assert read_surgery(tmp_path / "adapter")[0][0].indices[NEURONS].tolist() == [1]
    newer.save(tmp_path / "adapter", overwrite=True)
    assert read_surgery(tmp_path / "adapter")[0][0].indices[NEURONS].tolist() == [2]
    with pytest.raises(OutputExistsError, match="holds the input"):
        newer.save(tmp_path / "base", overwrite=True)  # the adapter's own base model
    assert (tmp_path / "base" / "config.json").is_file()


_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from hf_lrp_surgery.carriers import AdapterCarrier, apply_masks
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp import resolve
from hf_lrp_surgery.lrp.layout import Layout
from hf_lrp_surgery.masks import Mask

base, target = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base).eval()
layout = Layout.of(resolve(model))
mask = Mask("neurons", fingerprint(model), layout, {layout.neuron_modules[0]: torch.arange(40)})
original = AdapterCarrier.save

def save_then_die(self, model, directory, **kwargs):
    original(self, model, directory, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the adapter is written, before the masks

AdapterCarrier.save = save_then_die
apply_masks(model, mask, "adapter").save(target, overwrite=True)
"""


def test_a_save_killed_midway_leaves_the_previous_save_whole(tmp_path: Path) -> None:
    """SIGKILL after the adapter is written: the old directory is intact and loads; the staging is swept later."""
    model = _base(tmp_path / "base")
    old = _mask(model, "neurons", {0: [1, 2, 3, 4, 5]})
    apply_masks(model, old, "adapter").save(tmp_path / "out")
    script = tmp_path / "killed_save.py"
    script.write_text(textwrap.dedent(_KILLED_SAVE))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "out")], env=env)
    assert done.returncode == -9
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert staging and (staging[0] / "adapter_model.safetensors").is_file()
    assert read_surgery(tmp_path / "out")[0][0].indices[NEURONS].tolist() == [1, 2, 3, 4, 5]
    load_corrected(tmp_path / "out")
    apply_masks(model, old, "adapter").save(tmp_path / "out", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@functools.cache
def _base_cached() -> PreTrainedModel:
    """A tiny fp32 llama in memory (tests that change it work on a copy)."""
    return tiny_model("llama", dtype=torch.float32).eval()


# -- soft masks ------------------------------------------------------------------------------------
def _rewrite_scales(directory: Path, name: str, values: list[float]) -> None:
    """Replace the saved scales of ``name`` in a mask directory (without fixing anything else)."""
    tensors = load_file(str(directory / "mask.safetensors"))
    tensors[f"scale:{name}"] = torch.tensor(values, dtype=torch.float32)
    save_file(tensors, str(directory / "mask.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("form", ["adapter", "bake"])
def test_a_damaged_soft_scale_in_a_saved_corrected_model_is_caught(form: str, tmp_path: Path) -> None:
    """Out of range: the file record, then the mask checks; in range but not the carried one: verification."""
    model = _base(tmp_path / "base")
    scales = {NEURONS: [0.0, 0.5, 0.25], "model.layers.1.mlp.down_proj": [0.75]}
    mask = _mask(model, "neurons", {0: [1, 3, 5], 1: [2]}).with_scales(scales)
    corrected = apply_masks(model, mask, form)
    directory = corrected.save(tmp_path / form)
    loaded = load_corrected(directory)
    assert (_logits(loaded) - _logits(corrected.model)).abs().max() <= 1e-5
    neurons = directory / "surgery" / "neurons"
    _rewrite_scales(neurons, NEURONS, [0.0, 1.5, 0.25])
    with pytest.raises(SavedModelError, match=FOREIGN):
        load_corrected(directory)
    _forget_file_record(directory)
    with pytest.raises(MaskManifestError, match=r"outside \[0, 1\)"):
        load_corrected(directory)
    # In range, consistent files: the adapter's IA3 value is not the scale; the baked unit is not zero.
    _rewrite_scales(neurons, NEURONS, [0.0, 0.5, 0.0] if form == "bake" else [0.0, 0.5, 0.3])
    manifest = json.loads((neurons / "mask.json").read_text())
    manifest["dampened"] = 2 if form == "bake" else 3
    (neurons / "mask.json").write_text(json.dumps(manifest))
    with pytest.raises(MaskVerificationError, match="not zero" if form == "bake" else "scales"):
        load_corrected(directory)
