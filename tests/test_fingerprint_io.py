"""Model fingerprints and atomic writes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_lrp_surgery.exceptions import FingerprintMismatchError
from hf_lrp_surgery.fingerprint import ModelFingerprint, check_fingerprint, fingerprint
from hf_lrp_surgery.io import atomic_directory, write_json_atomic


def _llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def test_fingerprint_is_stable_across_dtype_and_round_trips(tmp_path) -> None:
    model = _llama()
    fp = fingerprint(model)
    assert fp == fingerprint(copy.deepcopy(model).to(torch.bfloat16))
    assert ModelFingerprint.from_dict(fp.to_dict()) == fp
    model.save_pretrained(tmp_path / "m")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert fingerprint(reloaded) == fp
    check_fingerprint(fp, reloaded)


def test_fingerprint_changes_with_weights_and_config() -> None:
    model = _llama()
    fp = fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # in place: the cache must notice
    changed = fingerprint(model)
    assert changed.config_sha256 == fp.config_sha256 and changed.weights_blake2b != fp.weights_blake2b
    with pytest.raises(FingerprintMismatchError, match="different weights"):
        check_fingerprint(fp, model, what="the mask")
    other = _llama(rms_norm_eps=1e-3)
    with pytest.raises(FingerprintMismatchError, match="different architecture"):
        check_fingerprint(fp, other)


def test_fingerprint_notices_fused_optimizer_steps() -> None:
    # Fused AdamW (the Trainer's default optimizer) updates weights without bumping ``_version``.
    model = _llama().train()
    before = fingerprint(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    assert fingerprint(model) != before
    assert fingerprint(model) == fingerprint(copy.deepcopy(model))


def test_atomic_directory_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("replaced")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(FileExistsError):
        with atomic_directory(target, overwrite=False):
            pass
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").read_text().strip().startswith("{")


def test_a_mismatch_from_fp16_rounding_says_so() -> None:
    """An artefact computed on fp16 weights, checked against the fp32 original, names the dtype as the cause."""
    model = _llama()
    half = copy.deepcopy(model).half()
    recorded = fingerprint(half)
    assert recorded.dtype == "float16" and fingerprint(model).dtype == "float32"
    assert ModelFingerprint.from_dict(recorded.to_dict()) == recorded
    with pytest.raises(FingerprintMismatchError, match=r"computed on float16 weights .* dtype=torch.float16"):
        check_fingerprint(recorded, model, what="this mask")
