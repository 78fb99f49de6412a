"""The engine against an independent AttnLRP implementation (test 8 of shared/design/lrp.md).

The reference library (LXT) does not import with transformers 5, so the independent implementation
is :mod:`explicit_lrp` (in this folder): a Llama forward re-implemented from the module weights and
an explicit, layer-by-layer AttnLRP that redistributes relevance as LRP messages, without autograd
and without any of the engine's code. Its module docstring explains why its uniform rules (1/2 on
each factor of ``P V``, of ``q k^T`` and of the gated product) are the engine's gradient factors
(1/4 on q and k, 1/2 on v, 1/2 on the gated product).

Precision: with the sdpa kernel the whole model runs in float64 and the engine agrees with the
explicit propagation to ~1e-15. transformers' *eager* Llama attention computes the softmax in float32
even for a float64 model, forward and backward; the engine's relevance through the softmax (the
q/k path) then carries float32 rounding, ~1e-8 relative, while CP-LRP (no relevance through the
softmax) still agrees to ~1e-15. The tolerances below follow that.
"""

from __future__ import annotations

import pytest
import torch
from explicit_lrp import ExplicitLlama
from tiny_models import VOCAB, model_from_config, tiny_config

from hf_lrp_surgery.lrp.collect import collect_relevance

pytestmark = pytest.mark.usefixtures("single_thread")

#: Lengths of the explained sequences (1: a single-token softmax row; 17: > 2 heads' worth of keys).
LENGTHS = (1, 6, 17)
#: Relative tolerance (of the largest |R| of a quantity) where the engine computes in float64
#: throughout, and where the eager kernel's float32 softmax backward is on the path (observed
#: <= 2e-8).
EXACT = 1e-12
EAGER_SOFTMAX = 1e-7


def _sequences() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    out = []
    for length in LENGTHS:
        ids = torch.randint(3, VOCAB, (length,), generator=generator)
        ids[0] = 1  # BOS
        out.append(ids)
    return out


SEQUENCES = _sequences()

_MODELS: dict[tuple[str, bool], torch.nn.Module] = {}


def _model(attn: str, biases: bool = False) -> torch.nn.Module:
    key = (attn, biases)
    if key not in _MODELS:
        config = tiny_config("llama")
        if biases:  # q/k/v/o and MLP biases: each keeps its LRP-0 share
            config.attention_bias = True
            config.mlp_bias = True
        _MODELS[key] = model_from_config(config, dtype=torch.float64, attn_implementation=attn)
    return _MODELS[key]


def _explicit(model: torch.nn.Module, attn: str) -> ExplicitLlama:
    return ExplicitLlama(model, fp32_softmax=attn == "eager")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    scale = float(expected.abs().max())
    assert scale > 0, what
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("biases", [False, True], ids=["nobias", "biases"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_explicit_forward_reproduces_the_model(attn: str, biases: bool) -> None:
    model = _model(attn, biases)
    explicit = _explicit(model, attn)
    with torch.no_grad():
        for ids in SEQUENCES:
            expected = model(ids[None]).logits[0]
            logits, _, _ = explicit.forward(ids)
            torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_explicit_propagation_bookkeeping(attn: str) -> None:
    """The explicit propagation on its own (no biases in the model): CP-LRP conserves the logit
    exactly; AttnLRP conserves it up to the softmax rule's leak, which it reports per layer."""
    explicit = _explicit(_model(attn), attn)
    for ids in SEQUENCES:
        cp = explicit.relevance(ids, variant="cp")
        assert cp.inputs.sum().item() == pytest.approx(cp.logit, rel=1e-12, abs=1e-12)
        assert cp.softmax_leak == [0.0] * len(cp.softmax_leak)
        attn_lrp = explicit.relevance(ids, variant="attnlrp")
        total = attn_lrp.inputs.sum().item() + sum(attn_lrp.softmax_leak)
        assert total == pytest.approx(attn_lrp.logit, rel=1e-12, abs=1e-12)
        if len(ids) > 1:  # a single-token softmax row neither leaks nor passes relevance to q/k
            assert abs(sum(attn_lrp.softmax_leak)) > 1e-3


@pytest.mark.parametrize("biases", [False, True], ids=["nobias", "biases"])
@pytest.mark.parametrize("variant", ["attnlrp", "cp"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_engine_matches_explicit(attn: str, variant: str, biases: bool) -> None:
    model = _model(attn, biases)
    explicit = _explicit(model, attn)
    rtol = EAGER_SOFTMAX if (attn == "eager" and variant == "attnlrp") else EXACT
    for ids in SEQUENCES:
        expected = explicit.relevance(ids, variant=variant)
        result = collect_relevance(
            model, [ids.tolist()], components=("neurons", "heads", "inputs"), variant=variant, progress=False
        )
        where = f"{attn}/{variant}/{'biases' if biases else 'nobias'}/T={len(ids)}"
        assert result.explained.item() == pytest.approx(expected.logit, rel=1e-14)
        assert torch.equal(result.input_ids[0], ids)
        _assert_close(result.input_relevance[0], expected.inputs, rtol, f"input relevance {where}")
        _assert_close(result.neurons, expected.neurons, rtol, f"neuron relevance {where}")
        _assert_close(result.heads, expected.heads, rtol, f"head relevance {where}")
