"""Op-level identities of the AttnLRP rules (lrp.md, tests 1): every rule against its analytic form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

from hf_lrp_surgery.lrp.rules import ACTIVATION_RATIOS, NORM_KINDS, activation_rule, epsilon_factor, norm_rule

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
EXACT = dict(rtol=1e-12, atol=1e-14)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)


# -- linear layers: gradient x input is LRP-epsilon -----------------------------------------------


@pytest.mark.parametrize("epsilon", [0.0, 0.3])
@pytest.mark.parametrize("orientation", ["linear", "conv1d"])
def test_linear_gradient_times_input_is_the_epsilon_rule(epsilon: float, orientation: str) -> None:
    """Input relevance equals sum_i a_j w_ij R_i / (z_i + eps sign z_i); W * W.grad is that sum per weight."""
    tokens, n_in, n_out = 5, 7, 6
    if orientation == "linear":
        layer = torch.nn.Linear(n_in, n_out, dtype=F64)
    else:
        layer = Conv1D(n_out, n_in).to(F64)
    with torch.no_grad():
        layer.weight.copy_(_randn(*layer.weight.shape, seed=1))
        layer.bias.copy_(_randn(n_out, seed=2))
    w = layer.weight.detach() if orientation == "linear" else layer.weight.detach().T  # [out, in]
    b = layer.bias.detach()
    x = _randn(tokens, n_in, seed=3).requires_grad_(True)
    z = layer(x)
    if epsilon:
        z.register_hook(lambda g: g * epsilon_factor(z, epsilon))
    g = _randn(tokens, n_out, seed=4)
    (z * g).sum().backward()  # the seed: R_out = z * g
    r_out = (z * g).detach()

    zd = z.detach()
    denom = zd + epsilon * torch.where(zd >= 0, 1.0, -1.0)
    contrib = x.detach()[:, None, :] * w[None] * (r_out / denom)[:, :, None]  # [t, out, in]: a_j w_ij R_i / z_i
    torch.testing.assert_close(x.detach() * x.grad, contrib.sum(1), **EXACT)
    weight_rel = layer.weight.detach() * layer.weight.grad
    expected_w = contrib.sum(0) if orientation == "linear" else contrib.sum(0).T
    torch.testing.assert_close(weight_rel, expected_w, **EXACT)
    bias_rel = b * layer.bias.grad
    torch.testing.assert_close(bias_rel, (b * r_out / denom).sum(0), **EXACT)
    # Row sums of the weight relevance are the input relevance; column sums plus bias the output's.
    in_dim, out_dim = (0, 1) if orientation == "linear" else (1, 0)
    torch.testing.assert_close(weight_rel.sum(in_dim), (x.detach() * x.grad).sum(0), **EXACT)
    if epsilon == 0:
        torch.testing.assert_close(weight_rel.sum(out_dim) + bias_rel, r_out.sum(0), **EXACT)
    else:  # epsilon absorbs relevance
        assert not torch.allclose(weight_rel.sum(out_dim) + bias_rel, r_out.sum(0), rtol=1e-3)


def test_epsilon_factor_sign_of_zero_is_positive() -> None:
    z = torch.tensor([0.0, -0.0, 2.0, -2.0, -0.5, 1e-30], dtype=F64)
    factor = epsilon_factor(z, 0.5)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor, torch.tensor([0.0, 0.0, 0.8, 0.8, 0.5, 2e-30], dtype=F64), rtol=1e-15, atol=0)
    assert not factor.requires_grad
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        low = epsilon_factor(torch.zeros(3, dtype=dtype), 1e-6)
        assert low.dtype == dtype and torch.equal(low, torch.zeros(3, dtype=dtype))


# -- softmax and bilinear products ------------------------------------------------------------------


def test_softmax_input_times_gradient_is_the_attnlrp_softmax_rule() -> None:
    x = _randn(3, 9, seed=5).requires_grad_(True)
    s = torch.softmax(x, -1)
    g = _randn(3, 9, seed=6)
    (s * g).sum().backward()
    r = (s * g).detach()
    expected = x.detach() * (r - s.detach() * r.sum(-1, keepdim=True))
    torch.testing.assert_close(x.detach() * x.grad, expected, **EXACT)
    # It leaks: the relevance that leaves the softmax is not the relevance that entered it.
    assert not torch.allclose((x.detach() * x.grad).sum(-1), r.sum(-1), rtol=1e-3)


def _half(grad: torch.Tensor) -> torch.Tensor:
    return grad * 0.5


def test_bilinear_matmul_with_half_factors_conserves() -> None:
    a = _randn(4, 5, seed=7).requires_grad_(True)
    b = _randn(5, 6, seed=8).requires_grad_(True)
    a.register_hook(_half)
    b.register_hook(_half)
    c = a @ b
    g = _randn(4, 6, seed=9)
    (c * g).sum().backward()
    r_out = (c * g).sum().detach()
    r_a, r_b = (a.detach() * a.grad).sum(), (b.detach() * b.grad).sum()
    torch.testing.assert_close(r_a, r_out / 2, **EXACT)
    torch.testing.assert_close(r_b, r_out / 2, **EXACT)
    torch.testing.assert_close(r_a + r_b, r_out, **EXACT)


def test_attention_uniform_rule_splits() -> None:
    """1/4 on q and k, 1/2 on v: R(q) + R(k) is half of what reaches the logits, R(v) half of R(out)."""
    q = _randn(2, 5, 4, seed=10).requires_grad_(True)
    k = _randn(2, 5, 4, seed=11).requires_grad_(True)
    v = _randn(2, 5, 4, seed=12).requires_grad_(True)
    for t, f in ((q, 0.25), (k, 0.25), (v, 0.5)):
        t.register_hook(lambda grad, f=f: grad * f)
    scores = q @ k.transpose(-1, -2) / 2.0
    scores.retain_grad()
    out = torch.softmax(scores, -1) @ v
    g = _randn(2, 5, 4, seed=13)
    (out * g).sum().backward()
    r_out = (out * g).sum().detach()
    r_scores = (scores.detach() * scores.grad).sum()
    r_q, r_k, r_v = ((t.detach() * t.grad).sum() for t in (q, k, v))
    torch.testing.assert_close(r_v, r_out / 2, **EXACT)
    torch.testing.assert_close(r_q, r_scores / 4, **EXACT)
    torch.testing.assert_close(r_k, r_scores / 4, **EXACT)


def test_gated_product_with_half_factor_conserves_elementwise() -> None:
    gate = _randn(3, 8, seed=14).requires_grad_(True)
    up = _randn(3, 8, seed=15).requires_grad_(True)
    act = activation_rule(gate, F.silu, "silu")
    act.retain_grad()
    product = act * up
    product.register_hook(_half)
    g = _randn(3, 8, seed=16)
    (product * g).sum().backward()
    r_product = (product * g).detach()
    r_act, r_up = act.detach() * act.grad, up.detach() * up.grad
    torch.testing.assert_close(r_act + r_up, r_product, **EXACT)
    torch.testing.assert_close(gate.detach() * gate.grad, r_act, **EXACT)  # identity rule on the gate


# -- element-wise activations: identity rule --------------------------------------------------------


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _new_gelu(x: torch.Tensor) -> torch.Tensor:  # transformers' NewGELUActivation (GPT-2)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


FORWARDS = {
    "silu": [F.silu],
    "gelu": [F.gelu],
    "gelu_tanh": [lambda x: F.gelu(x, approximate="tanh"), _new_gelu],
    "relu": [F.relu],
    "quick_gelu": [_quick_gelu],
    "tanh": [torch.tanh, torch.Tensor.tanh],
}
ACTIVATION_CASES = [(kind, i) for kind in FORWARDS for i in range(len(FORWARDS[kind]))]


def test_every_activation_kind_is_tested() -> None:
    assert set(FORWARDS) == set(ACTIVATION_RATIOS)


@pytest.mark.parametrize("kind,index", ACTIVATION_CASES)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
def test_activation_identity_rule(kind: str, index: int, dtype: torch.dtype) -> None:
    forward_fn = FORWARDS[kind][index]
    big = torch.finfo(dtype).max / 4
    large = 1e4 if dtype == torch.float16 else 1e30
    special = torch.tensor([0.0, 1e-12, -1e-12, 1e-6, -1e-6, large, -large, big, -big], dtype=F64)
    x = torch.cat([_randn(64, seed=17) * 3, special]).to(dtype).requires_grad_(True)
    g = torch.cat([_randn(64, seed=18), torch.ones(len(special), dtype=F64)]).to(dtype)
    y = activation_rule(x, forward_fn, kind)
    assert torch.equal(y, forward_fn(x.detach())), "the forward must be bit-identical"
    (y * g).sum().backward()
    r_in, r_out = x.detach() * x.grad, y.detach() * g
    assert x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all() and torch.isfinite(r_in).all(), "no NaN/inf, also at 0, +-1e-12, large"
    # R_in == R_out element-wise. f(x)/x is in [0, 1.2] and evaluated to a few ulps *absolute*, so
    # the error is bounded relative to |x * g| (not |f(x) * g|: GELU(-5) cancels in every form).
    tol = {F64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    err = (r_in.double() - r_out.double()).abs()
    bound = tol * (x.detach().double() * g.double()).abs() + torch.finfo(dtype).tiny
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()} at {x.detach()[(err > bound)].tolist()}"
    # The closed-form ratio at zero (never a division): the derivative of f at 0.
    zero = x.detach() == 0
    expected_at_zero = {"silu": 0.5, "gelu": 0.5, "gelu_tanh": 0.5, "relu": 0.0, "quick_gelu": 0.5, "tanh": 1.0}[kind]
    assert torch.equal(x.grad[zero], torch.full_like(x.grad[zero], expected_at_zero) * g[zero])


def test_tanh_softcapping_identity_rule_conserves_elementwise() -> None:
    """Soft-capping cap * tanh(x / cap) (Gemma 2) with the identity rule on its tanh: R_in = R_out."""
    cap = 2.0
    x = torch.cat([_randn(64, seed=40) * 6, torch.tensor([0.0, 1e-12, -1e-12, 1e6], dtype=F64)]).requires_grad_(True)
    y = activation_rule(x / cap, torch.tanh, "tanh") * cap
    assert torch.equal(y, torch.tanh(x.detach() / cap) * cap), "the forward must be bit-identical"
    g = _randn(68, seed=41)
    (y * g).sum().backward()
    torch.testing.assert_close(x.detach() * x.grad, y.detach() * g, **EXACT)


def test_activation_rule_is_not_plain_autograd() -> None:
    """The identity rule differs from the true derivative (otherwise it would be untested)."""
    x = _randn(10, seed=19).requires_grad_(True)
    activation_rule(x, F.silu, "silu").sum().backward()
    rule_grad = x.grad.clone()
    x.grad = None
    F.silu(x).sum().backward()
    assert not torch.allclose(rule_grad, x.grad, rtol=1e-3)
    torch.testing.assert_close(rule_grad, torch.sigmoid(x.detach()), **EXACT)


# -- norms: identity rule on the normaliser ---------------------------------------------------------


def _norm_module(kind: str, dim: int, dtype: torch.dtype) -> torch.nn.Module:
    module = {
        "rms": lambda: LlamaRMSNorm(dim, eps=1e-6),
        "rms_one_plus": lambda: Gemma3RMSNorm(dim, eps=1e-6),
        "layernorm": lambda: torch.nn.LayerNorm(dim, eps=1e-5),
    }[kind]().to(dtype)
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.add_(0.5 * _randn(*p.shape, seed=20 + i).to(dtype))
    return module


def _eps(module: torch.nn.Module) -> float:
    return float(getattr(module, "variance_epsilon", None) or module.eps)


def _reference_modified(kind: str, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """The norm with its normaliser detached, written out in fp64 (the function whose gradient we want)."""
    w = module.weight
    if kind == "layernorm":
        centred = x - x.mean(-1, keepdim=True)
        inv = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + _eps(module)).detach()
        return w * centred * inv + module.bias
    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(module)).detach()
    return (1.0 + w if kind == "rms_one_plus" else w) * x * inv


def _apply_rule(kind: str, module: torch.nn.Module, x: torch.Tensor, forward_fn=None) -> torch.Tensor:
    return norm_rule(x, module.weight, getattr(module, "bias", None), forward_fn or module.forward, kind, _eps(module))


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_rule_forward_identical_and_conserves(kind: str) -> None:
    module = _norm_module(kind, 12, F64)
    x = (_randn(2, 5, 12, seed=30) * 2 + 0.3).requires_grad_(True)
    with torch.no_grad():
        x[0, 1, 3] = 0.0  # an exact zero: the closed form is used there
    y = _apply_rule(kind, module, x)
    assert torch.equal(y, module(x.detach())), "the forward must be bit-identical"
    g = _randn(2, 5, 12, seed=31)
    (y * g).sum().backward()
    r_in, r_out = x.detach() * x.grad, y.detach() * g
    assert torch.isfinite(x.grad).all()
    if kind == "layernorm":
        # R_in + R_bias = R_out per token (mean-centering mixes features, so per token, not per feature).
        r_bias_per_token = module.bias.detach() * g
        torch.testing.assert_close(r_in.sum(-1) + r_bias_per_token.sum(-1), r_out.sum(-1), **EXACT)
        torch.testing.assert_close((module.bias.detach() * module.bias.grad).sum(), r_bias_per_token.sum(), **EXACT)
    else:
        # Element-wise, and exact although LlamaRMSNorm/Gemma3RMSNorm compute in fp32 for this fp64 input.
        torch.testing.assert_close(r_in, r_out, **EXACT)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_rule_gradients_are_those_of_the_modified_function(kind: str) -> None:
    """With an fp64 forward, the rule's gradients to x, weight and bias are those of the norm with
    its normaliser held constant."""
    module = _norm_module(kind, 12, F64)

    def fp64_forward(x: torch.Tensor) -> torch.Tensor:  # the module's function, computed in fp64
        with torch.no_grad():
            return _reference_modified(kind, x, module)

    x = (_randn(3, 4, 12, seed=32) * 2 - 0.2).requires_grad_(True)
    with torch.no_grad():
        x[1, 2, 5] = 0.0
    g = _randn(3, 4, 12, seed=33)
    (_apply_rule(kind, module, x, fp64_forward) * g).sum().backward()
    got = [x.grad] + [p.grad for p in module.parameters()]
    x.grad = None
    module.zero_grad(set_to_none=True)
    (_reference_modified(kind, x, module) * g).sum().backward()
    expected = [x.grad] + [p.grad for p in module.parameters()]
    assert len(got) == (3 if kind == "layernorm" else 2)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **EXACT)
    # Not the plain gradient of the norm.
    x.grad = None
    (module(x) * g).sum().backward()
    assert not torch.allclose(got[0], x.grad, rtol=1e-3)


@pytest.mark.parametrize("kind", NORM_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_rule_low_precision(kind: str, dtype: torch.dtype) -> None:
    """Transformers' modules in low precision: bit-identical forward, finite gradients close to the
    fp64 modified function (including exact zeros in the input)."""
    module = _norm_module(kind, 16, dtype)
    x64 = _randn(2, 6, 16, seed=34) * 3
    x64[0, 0, :4] = 0.0
    x64[1, 0] = 1e-5  # a row of tiny values (the normaliser is then ~1/sqrt(eps))
    x = x64.to(dtype).requires_grad_(True)
    y = _apply_rule(kind, module, x)
    assert torch.equal(y, module(x.detach()))
    g = _randn(2, 6, 16, seed=35).to(dtype)
    (y * g).sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    ref_module = _norm_module(kind, 16, F64)
    with torch.no_grad():
        for p, q in zip(ref_module.parameters(), module.parameters()):
            p.copy_(q.double())
    xr = x.detach().double().requires_grad_(True)
    (_reference_modified(kind, xr, ref_module) * g.double()).sum().backward()
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    scale = xr.grad.abs().max()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol * scale)
    for p, q in zip(module.parameters(), ref_module.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=tol, atol=tol * q.grad.abs().max())
