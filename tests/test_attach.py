"""Model-level tests of the rules (lrp.md, tests 2-4 and 6): invariance, exact conservation and
bookkeeping, reversibility and the errors, on tiny random models of every family in fp64."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import (
    EAGER_ONLY_FAMILIES,
    EXTRA_FAMILIES,
    FAMILIES,
    KERNELS,
    model_from_config,
    tiny_config,
    tiny_model,
)
from torch import nn
from transformers import BloomConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_lrp_surgery.exceptions import RulesAlreadyAttachedError, TrainingModeError, UnsupportedArchitectureError
from hf_lrp_surgery.lrp import LRPRules, resolve
from hf_lrp_surgery.lrp.moe import add_linear_tap, add_product_tap

EXACT = dict(rtol=1e-9, atol=0.0)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
pytestmark = pytest.mark.usefixtures("single_thread")

#: Padding per attention kernel. transformers' eager attention of the llama-like models and OPT runs
#: its softmax in fp32: in an fp64 model the mask value finfo(float64).min becomes -inf there, a fully
#: masked (left-)pad query row turns NaN, and the NaN reaches the real rows through P @ V (0 * NaN),
#: with or without rules. So fp64 eager is tested right-padded and sdpa left-padded.
PADDING_FOR = {"eager": "right", "sdpa": "left"}
#: Every family, Gemma 3's multimodal wrapper (explained on text; its vision tower has no rules) and the
#: families built with the eager kernel only.
ALL_FAMILIES = FAMILIES + EXTRA_FAMILIES + EAGER_ONLY_FAMILIES
#: (family, attention kernel) pairs of the kernel-parametrised tests.
FAMILY_KERNELS = [(family, attn) for family in ALL_FAMILIES for attn in KERNELS[family]]
#: Bias parameters per family (gemma3's are all in the vision tower, which text never reaches).
EXPECTED_BIASES = {
    "llama": 0,
    "qwen2": 6,
    "qwen3": 0,
    "gemma3_text": 0,
    "opt": 17,
    "opt_postln": 16,
    "gpt2": 13,
    "gemma3": 15,
    "mistral": 0,
    "phi3": 0,
    "olmo2": 0,
    "granite": 0,
    "smollm3": 0,
    "gpt_neox": 13,
    "gemma2": 0,
    "qwen3_moe": 0,
    "mixtral": 0,
    "olmoe": 0,
}


def _explained(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The seed: each row's logit of its own arg-max token at its last real position, summed."""
    if mask is None:
        mask = torch.ones(logits.shape[:2], dtype=torch.long)
    position = (mask * torch.arange(mask.shape[1])).argmax(-1)
    last = logits[torch.arange(len(logits)), position]
    return last.gather(1, last.detach().argmax(-1, keepdim=True)).sum()


def _pads(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [batch, seq] masks of the pads and the real tokens."""
    return mask == 0, mask != 0


def _leaves(rules: LRPRules) -> list[torch.Tensor]:
    return [rules.inputs[key] for key in ("tokens", "positions") if key in rules.inputs]


def _biases(model: nn.Module) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if name.endswith("bias")]


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _relevance(x: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype) if grad is None else (x.detach() * grad).sum()


# -- forward invariance ------------------------------------------------------------------------------


@pytest.mark.parametrize("family,attn", FAMILY_KERNELS)
def test_forward_invariance(family: str, attn: str, ids, padded) -> None:
    model = tiny_model(family, attn_implementation=attn)
    input_ids, mask = padded(PADDING_FOR[attn])
    batches = [dict(input_ids=ids), dict(input_ids=input_ids, attention_mask=mask)]
    reference = [model(**batch).logits for batch in batches]
    for kwargs in (dict(variant="attnlrp"), dict(variant="cp"), dict(variant="attnlrp", epsilon=0.1)):
        with LRPRules(model, **kwargs):
            for batch, ref in zip(batches, reference):
                assert torch.equal(model(**batch).logits, ref), (kwargs, batch.keys())
                with torch.no_grad():
                    assert torch.equal(model(**batch).logits, ref)
    assert not torch.equal(reference[0], model(input_ids=ids.flip(-1)).logits)


# -- exact conservation (CP) -------------------------------------------------------------------------


@pytest.mark.parametrize("family,attn", FAMILY_KERNELS)
def test_cp_conservation_is_exact(family: str, attn: str, padded) -> None:
    """Tokens + positions + biases = the explained logit. Any non-linearity without a rule breaks it."""
    model = tiny_model(family, attn_implementation=attn)
    input_ids, mask = padded(PADDING_FOR[attn])
    biases = _biases(model)
    assert len(biases) == EXPECTED_BIASES[family]
    arch = resolve(model)
    # q_proj and k_proj of block 0 (fused q/k/v: its q and k output features are checked).
    qk_weights = [p.weight for p in arch.prunable[: 1 if arch.spec.qkv_proj else 2]]
    with LRPRules(model, variant="cp") as rules:
        explained = _explained(model(input_ids=input_ids, attention_mask=mask).logits, mask)
        leaves = _leaves(rules)
        assert len(leaves) == (2 if arch.position_embedding is not None else 1)
        grads = torch.autograd.grad(explained, [*leaves, *biases, *qk_weights], allow_unused=True)
    input_rel = [(x.detach() * g).sum(-1) for x, g in zip(leaves, grads)]  # [batch, seq] each
    bias_rel = [_relevance(b, g) for b, g in zip(biases, grads[len(leaves) :])]
    total = sum(r.sum() for r in input_rel) + sum(bias_rel, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(total, explained.detach(), **EXACT)
    assert abs(sum(r.sum() for r in input_rel).item()) > 1e-3 * abs(explained.item()), "relevance must reach inputs"
    # Pads carry exactly zero relevance (left pads are masked as keys for every real query).
    pads, real = _pads(mask)
    for r in input_rel:
        if r.shape[0] == mask.shape[0]:  # GPT-2's position embedding output is [1, seq], shared by the rows
            assert torch.equal(r[pads], torch.zeros_like(r[pads]))
            assert (r[real] != 0).all()
    # CP: no relevance through the softmax, so the query and key weights get none.
    for grad in grads[len(grads) - len(qk_weights) :]:
        assert grad is not None
        if arch.spec.qkv_proj is not None:
            roles = arch.qkv_roles()
            per_output = grad if arch.spec.orientation == "conv1d" else grad.T  # [in, out]
            assert per_output[:, roles == 2].abs().max() > 0  # v gets relevance
            grad = per_output[:, roles != 2]
        assert torch.equal(grad, torch.zeros_like(grad))


# -- exact AttnLRP bookkeeping ------------------------------------------------------------------------


class _Capture:
    """Forward hooks that keep the tensors we account relevance at, with their gradients retained."""

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.handles: list = []

    def output(self, module: nn.Module, key: tuple) -> None:
        def hook(mod, args, out):
            out.retain_grad()
            self.tensors[key] = out

        self.handles.append(module.register_forward_hook(hook))

    def input(self, module: nn.Module, key: tuple) -> None:
        def hook(mod, args):
            args[0].retain_grad()
            self.tensors[key] = args[0]

        self.handles.append(module.register_forward_pre_hook(hook))

    def output_before_rules(self, module: nn.Module, key: tuple) -> None:
        """The output's gradient before the rules' tensor hooks on it (prepended: runs first)."""

        def hook(mod, args, out):
            out.register_hook(lambda grad: self.tensors.__setitem__((*key, "grad"), grad))

        self.handles.append(module.register_forward_hook(hook, prepend=True))

    def input_before_rules(self, module: nn.Module, key: tuple) -> None:
        """The input's gradient before the rules' own tensor hooks on it (prepended: runs first)."""

        def hook(mod, args):
            self.tensors[key] = args[0]
            args[0].register_hook(lambda grad: self.tensors.__setitem__((*key, "grad"), grad))

        self.handles.append(module.register_forward_pre_hook(hook, prepend=True))

    def experts(self, experts: nn.Module, act: nn.Module, layer: int, model_type: str) -> None:
        """Per expert of a MoE block: gate|up output, activation output, gated product before and after the rules."""

        def linear(parameter, expert, tokens, z):
            if parameter == "gate_up_proj":
                z.retain_grad()
                self.tensors[(layer, "gate_up", expert)] = z

        def product_raw(expert, tokens, x):
            self.tensors[(layer, "product", expert)] = x
            x.register_hook(lambda grad: self.tensors.__setitem__((layer, "product", expert, "grad"), grad))
            x.retain_grad()  # after every hook: the rule-modified gradient

        calls = []

        def act_hook(mod, args, out):
            out.retain_grad()
            self.tensors[(layer, "act", len(calls))] = out
            calls.append(None)

        self.handles.append(add_linear_tap(experts, linear, model_type=model_type))
        self.handles.append(add_product_tap(experts, product_raw, model_type=model_type, prepend=True))
        self.handles.append(act.register_forward_hook(act_hook))

    def r(self, key: tuple) -> torch.Tensor:
        """Element-wise relevance ``x * grad`` at the captured tensor (the rule-modified gradient)."""
        x = self.tensors[key]
        return x.detach() * x.grad

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _attnlrp_bookkeeping(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """logit = tokens + positions + biases + sum over layers of the softmax leak, where
    leak = R(o_proj input)/2 - R(q_proj out) - R(k_proj out); and the MLPs conserve.

    R(t) = t * grad at t in the modified backward. Every operation conserves it except biases (which
    absorb b * b.grad, also the q/k/v biases: R at a projection output includes its bias's share) and
    the attention: V gets R_o/2 (factor 1/2), P gets R_o (no factor), the softmax passes on
    R_S = R_o - its leak, and q and k get R_S/4 each. So the block loses R_o - R_q - R_k - R_v =
    R_o/2 - R_q - R_k. For a fused projection (GPT-2, Phi-3, GPT-NeoX) the q/k/v outputs are its output
    features of each role (``qkv_roles``); a fused gate|up output is split in halves.
    """
    arch = resolve(model)
    spec = arch.spec
    base = arch.model
    blocks = base.get_submodule(spec.decoder_layers)
    biases = _biases(model)
    model.zero_grad(set_to_none=True)
    cap = _Capture()
    with LRPRules(model, variant="attnlrp") as rules:
        for layer in arch.layers:
            i = layer.index
            for j, proj in enumerate(layer.attention_projections):
                cap.output(proj, (i, "qkv", j))
                cap.output_before_rules(proj, (i, "qkv_raw", j))
            cap.input(layer.o_proj, (i, "o_in"))
            if spec.moe is not None:
                cap.experts(layer.mlp_out, layer.mlp_act, i, spec.model_type)
                continue
            block = blocks[i]
            for j, path in enumerate(spec.mlp_in):
                cap.output(block.get_submodule(path), (i, "mlp_in", j))
            cap.output(layer.mlp_act, (i, "act"))
            cap.input(layer.mlp_out, (i, "mlp_out_in"))
            cap.input_before_rules(layer.mlp_out, (i, "neurons"))
        try:
            explained = _explained(model(input_ids=input_ids, attention_mask=mask).logits, mask)
            leaves = _leaves(rules)
            for leaf in leaves:
                leaf.retain_grad()
            explained.backward()
        finally:
            cap.remove()
    input_rel = sum(_relevance(x, x.grad) for x in leaves)
    bias_rel = sum((_relevance(b, b.grad) for b in biases), torch.zeros((), dtype=torch.float64))
    leak = torch.zeros((), dtype=torch.float64)
    for layer in arch.layers:
        i = layer.index
        r_o = cap.r((i, "o_in")).sum()
        if spec.qkv_proj is not None:  # a fused projection: the q, k and v output features of one output
            roles = arch.qkv_roles()
            r_qkv = cap.r((i, "qkv", 0))
            r_q, r_k, r_v = (r_qkv[..., roles == role].sum() for role in range(3))
            factor = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)[roles]
            assert torch.equal(cap.tensors[(i, "qkv", 0)].grad, cap.tensors[(i, "qkv_raw", 0, "grad")] * factor)
        else:
            r_q, r_k, r_v = (cap.r((i, "qkv", j)).sum() for j in range(3))
            for j, factor in enumerate((0.25, 0.25, 0.5)):  # the uniform rule's factors at the outputs
                assert torch.equal(cap.tensors[(i, "qkv", j)].grad, cap.tensors[(i, "qkv_raw", j, "grad")] * factor)
        # Q.K^T is bilinear (RoPE, q/k norms, scaling, repeat_kv are linear here): equal factors on q
        # and k give them equal relevance.
        torch.testing.assert_close(r_q, r_k, **EXACT)
        # The uniform rule on P.V gives V half of the attention output's relevance ...
        torch.testing.assert_close(r_v, r_o / 2, **EXACT)
        leak = leak + r_o / 2 - r_q - r_k
        if spec.moe is not None:
            _moe_bookkeeping(cap, i)
            continue
        # ... and the MLP conserves: identity rule on the activation, 1/2 on each factor of a gated product.
        r_act = cap.r((i, "act"))
        scale = float(r_act.abs().max())
        close = dict(rtol=1e-9, atol=1e-12 * scale)
        r_in = [cap.r((i, "mlp_in", j)) for j in range(len(spec.mlp_in))]
        if spec.mlp_kind == "gated_fused":  # gate | up halves of one output
            r_in = list(r_in[0].chunk(2, dim=-1))
        torch.testing.assert_close(r_in[0], r_act, **close)  # gate / fc1 out = act out
        # Neuron relevance: the MLP output projection's input times the gradient arriving there.
        r_neurons = cap.tensors[(i, "neurons")].detach() * cap.tensors[(i, "neurons", "grad")]
        if spec.gated:
            torch.testing.assert_close(r_act + r_in[1], r_neurons, **close)
            torch.testing.assert_close(cap.r((i, "mlp_out_in")), r_neurons / 2, **close)  # the 1/2 hook
        else:
            torch.testing.assert_close(r_act, r_neurons, **close)
    torch.testing.assert_close(input_rel + bias_rel + leak, explained.detach(), **EXACT)
    assert abs(leak.item()) > 1e-3 * abs(explained.item()), "the softmax leaks: the identity must not be trivial"
    model.zero_grad(set_to_none=True)


def _moe_bookkeeping(cap: _Capture, layer: int) -> None:
    """Each expert of a MoE block conserves like a dense gated MLP (the routing weights are constants)."""
    experts = sorted(key[2] for key in cap.tensors if key[:2] == (layer, "gate_up"))
    assert len(experts) > 1, "the tiny MoE must route to several experts"
    for call, expert in enumerate(experts):  # the loop visits the hit experts in increasing order
        r_gate, r_up = cap.r((layer, "gate_up", expert)).chunk(2, dim=-1)
        r_act = cap.r((layer, "act", call))
        product = cap.tensors[(layer, "product", expert)]
        r_neurons = product.detach() * cap.tensors[(layer, "product", expert, "grad")]
        close = dict(rtol=1e-9, atol=1e-12 * float(r_act.abs().max()))
        torch.testing.assert_close(r_gate, r_act, **close)  # identity rule on the activation
        torch.testing.assert_close(r_act + r_up, r_neurons, **close)  # 1/2 + 1/2 of the gated product
        torch.testing.assert_close(cap.r((layer, "product", expert)), r_neurons / 2, **close)


@pytest.mark.parametrize("family,attn", FAMILY_KERNELS)
def test_attnlrp_bookkeeping_is_exact(family: str, attn: str, padded) -> None:
    _attnlrp_bookkeeping(tiny_model(family, attn_implementation=attn), *padded(PADDING_FOR[attn]))


# -- reversibility -----------------------------------------------------------------------------------


def _plain_pass(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    weights = torch.linspace(-1.0, 1.0, logits.numel(), dtype=logits.dtype).view_as(logits)
    (logits * weights).sum().backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _assert_same_pass(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        if a[1][name] is None or b[1][name] is None:  # parameters the pass does not reach
            assert a[1][name] is b[1][name], name
        else:
            assert torch.equal(a[1][name], b[1][name]), name


def _class_forwards(model: nn.Module) -> dict[type, object]:
    classes = {cls for m in model.modules() for cls in type(m).__mro__}
    classes |= {nn.LayerNorm, nn.Dropout, nn.Linear, nn.Embedding, nn.ReLU, nn.GELU, nn.SiLU, nn.Softmax}
    return {cls: cls.__dict__.get("forward") for cls in classes}


def _assert_clean(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__, f"{name} keeps an instance forward"
        for attr in HOOK_DICTS:
            assert not getattr(module, attr), f"{name}.{attr} is not empty"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_detach_restores_the_model_and_touches_nothing_else(family: str, ids) -> None:
    model, fresh = tiny_model(family), tiny_model(family)
    other, other_fresh = tiny_model(family, seed=1), tiny_model(family, seed=1)
    reference, other_reference = _plain_pass(fresh, ids), _plain_pass(other_fresh, ids)
    _assert_same_pass(_plain_pass(model, ids), reference)  # same seed, same model
    class_forwards = _class_forwards(model)
    attention_functions = {key: ALL_ATTENTION_FUNCTIONS[key] for key in ALL_ATTENTION_FUNCTIONS}

    for kwargs in (dict(variant="attnlrp"), dict(variant="cp", epsilon=0.1)):
        with LRPRules(model, **kwargs) as rules:
            explained = _explained(model(ids).logits)
            explained.backward()  # a relevance pass that also accumulates .grad
            assert rules.inputs
            _assert_same_pass(_plain_pass(other, ids), other_reference)  # another instance is unaffected
            assert any("forward" in m.__dict__ for m in model.modules())
            assert any(getattr(m, attr) for m in model.modules() for attr in HOOK_DICTS)
        assert rules.inputs == {}
        _assert_clean(model)
        _assert_same_pass(_plain_pass(model, ids), reference)

    with pytest.raises(RuntimeError, match="inside"):  # an error inside the block also detaches
        with LRPRules(model):
            model(ids)
            raise RuntimeError("inside")
    _assert_clean(model)
    _assert_same_pass(_plain_pass(model, ids), reference)
    assert not model.training
    assert _class_forwards(model) == class_forwards
    assert all(class_forwards[cls] is cls.__dict__.get("forward") for cls in class_forwards)
    assert {key: ALL_ATTENTION_FUNCTIONS[key] for key in ALL_ATTENTION_FUNCTIONS} == attention_functions
    with LRPRules(model):  # attachable again
        pass


def test_attach_detach_methods_and_model_mode() -> None:
    model = tiny_model("llama").train()  # all dropout probabilities are 0: allowed
    rules = LRPRules(model).attach()
    try:
        assert model.training
        with pytest.raises(RulesAlreadyAttachedError, match="already attached"):
            LRPRules(model).attach()
    finally:
        rules.detach()
    rules.detach()  # idempotent
    _assert_clean(model)
    assert model.training


# -- errors --------------------------------------------------------------------------------------


def test_unknown_model_type() -> None:
    model = model_from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'.*supported: .*llama"):
        LRPRules(model)


class _Swish2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(2 * x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", [nn.Tanh, _Swish2])
def test_unknown_activation_is_refused(family: str, activation: type) -> None:
    model = tiny_model(family)
    spec = resolve(model).spec
    _set_submodule(model, f"{spec.decoder_layers}.1.{spec.mlp_act}", activation())
    with pytest.raises(UnsupportedArchitectureError, match=activation.__name__):
        LRPRules(model)
    _assert_clean(model)


@pytest.mark.parametrize(
    "family,path,norm",
    [
        ("llama", "model.norm", lambda: nn.LayerNorm(32)),
        ("qwen3", "model.layers.0.self_attn.q_norm", lambda: nn.LayerNorm(8)),
        ("opt", "model.decoder.layers.0.self_attn_layer_norm", lambda: LlamaRMSNorm(32)),
        ("gpt2", "transformer.ln_f", lambda: nn.RMSNorm(32)),
    ],
)
def test_unknown_norm_is_refused(family: str, path: str, norm) -> None:
    model = tiny_model(family)
    module = norm()
    _set_submodule(model, path, module)
    with pytest.raises(UnsupportedArchitectureError, match=type(module).__name__):
        LRPRules(model)


@pytest.mark.parametrize("key", ["attn_logit_softcapping", "final_logit_softcapping"])
def test_gemma_softcapping_is_refused(key: str) -> None:
    config = tiny_config("gemma3_text")
    setattr(config, key, 30.0)
    with pytest.raises(UnsupportedArchitectureError, match=key):
        LRPRules(model_from_config(config))


@pytest.mark.parametrize(
    "family,key",
    [("llama", "attention_dropout"), ("qwen2", "attention_dropout"), ("opt", "dropout"), ("gpt2", "resid_pdrop")],
)
def test_training_mode_with_dropout_is_refused(family: str, key: str) -> None:
    config = tiny_config(family)
    setattr(config, key, 0.1)
    model = model_from_config(config).train()
    with pytest.raises(TrainingModeError, match="eval"):
        LRPRules(model).attach()
    _assert_clean(model)
    model.eval()
    with LRPRules(model):  # eval mode: dropout is inactive, attaching is fine
        pass


def test_double_attach_is_refused(ids) -> None:
    model = tiny_model("qwen2")
    with LRPRules(model):
        with pytest.raises(RulesAlreadyAttachedError):
            LRPRules(model).attach()
        with pytest.raises(RulesAlreadyAttachedError):
            with LRPRules(model, variant="cp"):
                pass
        model(ids)  # the first attachment still works
    with LRPRules(model, variant="cp"):
        pass


def test_bad_arguments() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="variant"):
        LRPRules(model, variant="lxt")
    with pytest.raises(ValueError, match="epsilon"):
        LRPRules(model, epsilon=-1.0)


def test_peft_model(ids, padded) -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama")
    # init_lora_weights=False: A and B random, so the LoRA paths change the function.
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    ).eval()
    reference = peft_model(ids).logits
    assert not torch.allclose(reference, base(ids).logits)
    arch = resolve(peft_model)
    assert arch.model is peft_model.get_base_model()
    assert all("lora" not in type(p.module).__module__ for p in arch.prunable)  # the base layers
    for variant in ("attnlrp", "cp"):
        with LRPRules(peft_model, variant=variant):
            assert torch.equal(peft_model(ids).logits, reference)
            with pytest.raises(RulesAlreadyAttachedError):
                LRPRules(arch.model).attach()  # the same model, unwrapped
    _assert_clean(peft_model)
    assert torch.equal(peft_model(ids).logits, reference)
    # The LoRA paths are linear: bookkeeping and CP conservation stay exact.
    input_ids, mask = padded("right")
    _attnlrp_bookkeeping(peft_model, input_ids, mask)
    with LRPRules(peft_model, variant="cp") as rules:
        explained = _explained(peft_model(input_ids=input_ids, attention_mask=mask).logits, mask)
        (grad,) = torch.autograd.grad(explained, rules.inputs["tokens"])
        torch.testing.assert_close((rules.inputs["tokens"].detach() * grad).sum(), explained.detach(), **EXACT)


# -- epsilon -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_epsilon_is_finite_and_changes_relevance(family: str, padded) -> None:
    model = tiny_model(family, attn_implementation="sdpa")
    input_ids, mask = padded("left")
    relevance = {}
    for epsilon in (0.0, 0.05):
        with LRPRules(model, epsilon=epsilon) as rules:
            explained = _explained(model(input_ids=input_ids, attention_mask=mask).logits, mask)
            (grad,) = torch.autograd.grad(explained, rules.inputs["tokens"])
            relevance[epsilon] = (rules.inputs["tokens"].detach() * grad).sum(-1)
    assert torch.isfinite(relevance[0.05]).all()
    assert not torch.allclose(relevance[0.0], relevance[0.05], rtol=1e-4, atol=0)
    assert torch.equal(relevance[0.05][1, :3], torch.zeros(3, dtype=torch.float64))  # pads stay at 0
