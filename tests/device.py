"""The relevance identities on a chosen device and dtype (fp32, bf16): ``HF_LRP_TEST_DEVICE=cuda``.

The rest of the suite runs on the CPU in float64, where the identities hold to 1e-9. This file runs
them where a user runs the library: on the device named by ``HF_LRP_TEST_DEVICE`` (default ``cpu``)
in float32 and bfloat16, with tolerances for those dtypes. It is not collected by a plain ``pytest``
run (its name does not start with ``test_``); run it explicitly::

    HF_LRP_TEST_DEVICE=cuda python -m pytest tests/device.py -q

(``benchmarks/device_check.sh`` does, with the speed benchmarks.) Naming a CUDA device on a machine
without one fails at once, by name, instead of silently testing the CPU.

Identities checked, per family, dtype and attention kernel:

* forward invariance: logits with the rules attached equal the logits without;
* CP conservation: with the CP variant on a bias-free model, each sample's input relevance sums to
  the explained logit;
* weight <-> unit consistency: column sums of each MLP output projection's weight relevance equal the
  neuron relevance, and per-head column sums of the attention output projection the head relevance;
* device vs CPU float64 on the same (rounded) weights: float32 agrees closely, bfloat16 ranks the
  neurons alike.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from tiny_models import tiny_model

from hf_lrp_surgery.lrp import LRPRules, ReferenceSample, collect_relevance, resolve

__all__ = ["DEVICE_ENV", "test_device_name"]

#: The environment variable that names the device of this file's tests.
DEVICE_ENV = "HF_LRP_TEST_DEVICE"
#: Bias-free families (CP conservation then needs no bias terms), one per layout kind.
FAMILIES = ("llama", "qwen3", "gemma3_text", "mistral")
DTYPES = (torch.float32, torch.bfloat16)
#: Tolerances of the identities, relative to the largest value compared, per dtype: bf16 rounds every
#: gradient to 8 bits of mantissa, while the collectors accumulate in fp32.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
#: CP conservation: bf16 rounds the residual stream at every block, so the sum drifts by ~1-2% of the
#: largest logit (measured on the CPU); a missed rule moves it by far more.
CONSERVATION = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
#: Device vs CPU float64 (the reference runs every product exactly).
AGREEMENT = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
ROWS = torch.randint(4, 60, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
#: Teacher-forced targets: a max-logit objective could pick another token within bf16 noise.
SAMPLES = [ReferenceSample(row[:9], continuation=row[9:]) for row in ROWS]


def test_device_name() -> torch.device:
    """The device named by ``HF_LRP_TEST_DEVICE`` (default ``cpu``), checked to exist.

    Returns:
        The device.

    Raises:
        pytest.UsageError: The variable names a device torch does not know, or a CUDA device this
            machine does not have.

    Example:
        >>> test_device_name()  # doctest: +SKIP
        device(type='cuda')
    """
    name = os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"{DEVICE_ENV}={name!r} is not a torch device name ({err})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"{DEVICE_ENV}={name!r}, but torch sees no CUDA device on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise pytest.UsageError(f"{DEVICE_ENV}={name!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


test_device_name.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


#: Checked when the file is collected: a missing device fails the run once, by name, before any test.
DEVICE = test_device_name()


@pytest.fixture(scope="module")
def device() -> torch.device:
    """The device of this file's tests (see :func:`test_device_name`)."""
    return DEVICE


def _model(family: str, dtype: torch.dtype, attn: str, device: torch.device) -> torch.nn.Module:
    return torch.nn.Module.to(tiny_model(family, dtype=dtype, attn_implementation=attn), device)


def _scale(explained: torch.Tensor) -> float:
    return float(explained.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_invariance(family: str, dtype: torch.dtype, attn: str, device: torch.device) -> None:
    model = _model(family, dtype, attn, device)
    ids = torch.tensor(ROWS[:2], device=device)
    plain = model(input_ids=ids).logits  # with gradients, as the rules run (the same kernels)
    with LRPRules(model):
        ruled = model(input_ids=ids).logits
    assert torch.equal(ruled, plain)
    assert not torch.equal(plain, model(input_ids=ids.flip(-1)).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cp_conservation(family: str, dtype: torch.dtype, device: torch.device) -> None:
    model = _model(family, dtype, "sdpa", device)
    result = collect_relevance(model, SAMPLES, components=("inputs",), variant="cp", progress=False)
    totals = torch.stack([r.sum() for r in result.input_relevance]).double()
    scale = _scale(result.explained)
    torch.testing.assert_close(totals, result.explained, rtol=0, atol=CONSERVATION[dtype] * scale)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_relevance_sums_to_unit_relevance(family: str, dtype: torch.dtype, device: torch.device) -> None:
    model = _model(family, dtype, "sdpa", device)
    result = collect_relevance(model, SAMPLES, components=("neurons", "heads", "weights"), progress=False)
    assert result.neurons is not None and result.heads is not None
    arch = resolve(model)
    for layer in arch.layers:
        down = result.weights[f"{arch.spec.decoder_layers}.{layer.index}.{arch.spec.mlp_out}"]
        o_proj = result.weights[f"{arch.spec.decoder_layers}.{layer.index}.{arch.spec.o_proj}"]
        neurons, heads = result.neurons[layer.index], result.heads[layer.index]
        assert neurons.abs().sum() > 0 and heads.abs().sum() > 0
        # The unit side multiplies by autograd's input gradient (rounded to the dtype), the weight side sums
        # the same products in fp32 before multiplying by W: equal up to that rounding.
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(down.sum(0), neurons, rtol=0, atol=tolerance * float(neurons.abs().max()))
        per_head = o_proj.sum(0).unflatten(0, (arch.num_heads, -1)).sum(-1)
        torch.testing.assert_close(per_head, heads, rtol=0, atol=tolerance * float(heads.abs().max()))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_device_agrees_with_cpu_float64(family: str, dtype: torch.dtype, device: torch.device) -> None:
    """The same rounded weights on the CPU in float64 (the exact reference) and on the device in ``dtype``."""
    low = tiny_model(family, dtype=dtype, attn_implementation="sdpa")
    exact = copy.deepcopy(low).double()
    components = ("neurons", "heads")
    on_device = collect_relevance(torch.nn.Module.to(low, device), SAMPLES, components=components, progress=False)
    reference = collect_relevance(exact, SAMPLES, components=components, progress=False)
    for key in components:
        got, want = getattr(on_device, key), getattr(reference, key)
        assert got is not None and want is not None
        torch.testing.assert_close(got.double(), want, rtol=0, atol=AGREEMENT[dtype] * float(want.abs().max()))
    assert on_device.neurons is not None and reference.neurons is not None
    assert _spearman(on_device.neurons, reference.neurons) > 0.99
