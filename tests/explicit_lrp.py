"""An explicit, layer-by-layer AttnLRP for Llama-architecture models: relevance *messages*, no autograd.

This is the independent implementation that ``test_crosscheck.py`` holds the engine
(:mod:`hf_lrp_surgery.lrp`, AttnLRP as modified gradient x input) against. It shares no code with
the engine: it re-implements the Llama forward from the module weights and then redistributes
relevance backwards with the AttnLRP rules written as LRP messages ``R_{i<-j} = (a_i w_ij / z_j) R_j``
(Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers",
ICML 2024, arXiv 2402.05602):

* linear maps ``z = W x (+ b)`` (projections, lm_head, RoPE, the attention scaling, residual adds,
  repeat_kv): LRP-0, ``R_x[i] = sum_j x_i W_ji R_z[j] / z_j`` (a bias keeps its share);
* element-wise activation (SiLU): identity rule ``R_in = R_out``;
* RMSNorm: identity on the normaliser, i.e. the diagonal linear map ``x -> (w / rms(x)) x`` with
  ``rms`` held fixed, whose LRP-0 rule is ``R_x = R_y`` element-wise;
* gated product ``p = act(gate) * up``: uniform rule, ``R_act = R_up = R_p / 2``;
* attention ``O = P V``: LRP-0 on the sum over ``j`` of the terms ``P_tj V_jd``, then the uniform rule
  on each term (half to ``P_tj``, half to ``V_jd``);
* softmax: the AttnLRP softmax rule ``R_S = S * (R_P - P * sum_j R_P)`` (Proposition 3.1 of the paper);
* scores ``S = scale * q k^T``: LRP-0 on the sum over ``d`` of ``q_td k_jd``, uniform rule on each term.

Why these rules give the engine's gradient factors (1/4 on q and k, 1/2 on v, 1/2 on the gated
product): every rule above is linear in the incoming relevance, and the LRP-0 messages of a linear
map are exactly ``input * gradient`` with the upstream gradient ``R_z / z``. The uniform rule on the
``P V`` term gives ``V`` half of its LRP-0 share, which is ``V * grad_V`` halved (engine: 1/2 on v).
It gives ``P`` half of ``P * grad_P``; the softmax rule is ``S * grad_S`` for the upstream gradient
``R_P / P`` and is linear, so the half carries over to ``R_S``; the uniform rule on ``q k^T`` halves
again, so ``q`` and ``k`` get a quarter of ``q * grad_q`` and ``k * grad_k`` (engine: 1/4 on q and k,
applied at the projection outputs, before RoPE, which is linear and so commutes with a constant
factor; ``q`` and ``k`` feed nothing but the scores). Likewise ``act`` and ``up`` get half of their
``input * gradient`` (engine: 1/2 on the product), and the identity rule on SiLU is the engine's
``grad * silu(x) / x``. Nothing here uses gradients, though: the relevance is redistributed as
messages, which is what makes the comparison a check of the engine rather than a re-run of it.

CP-LRP (``variant="cp"``): the softmax output ``P`` and the gate activation are held constant, so
``P V`` sends all of its relevance to ``V`` (none to ``q``/``k``) and the gated product all to ``up``.

Precision: the model runs in float64, but transformers' Llama computes the RMSNorm and the rotary
cos/sin in float32, and its eager attention kernel the softmax too (``softmax(..., dtype=float32)``;
the sdpa kernel stays in float64). The forward below does the same (``fp32_softmax=True`` for
eager) so that it reproduces the model's logits bit for bit; the relevance propagation itself is
float64 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ExplicitLlama", "ExplicitRelevance"]


@dataclass
class ExplicitRelevance:
    """Relevance of one sequence from the explicit propagation."""

    logit: float  # the explained logit (the seed's relevance)
    inputs: torch.Tensor  # [T], token-embedding relevance summed over the hidden dimension
    neurons: torch.Tensor  # [L, I], relevance at the down_proj input, summed over tokens
    heads: torch.Tensor  # [L, H], relevance at the o_proj input per head, summed over tokens
    softmax_leak: list[float] = field(default_factory=list)  # per layer: sum R_P - sum R_S


def _lrp_linear(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, r_z: torch.Tensor) -> torch.Tensor:
    """LRP-0 for ``z = x W^T (+ b)``: messages ``x_i W_ji R_z[j] / z_j`` summed over ``j``.

    ``x``: [T, in], ``weight``: [out, in], ``z``, ``r_z``: [T, out]. The bias (if any) is inside ``z``
    and keeps its own share. Built as the explicit [T, out, in] message tensor.
    """
    messages = x[:, None, :] * weight[None, :, :] * (r_z / z)[:, :, None]
    return messages.sum(1)


class ExplicitLlama:
    """A Llama forward re-implemented from ``model``'s weights, with explicit AttnLRP propagation.

    Args:
        model: A ``LlamaForCausalLM`` (float64, no attention/MLP biases needed but supported).
        fp32_softmax: Compute the softmax in float32, as transformers' eager attention does (the sdpa
            kernel computes it in the model's dtype). The RMSNorm and rotary cos/sin are computed in
            float32 either way, as transformers' Llama does.
    """

    def __init__(self, model: torch.nn.Module, *, fp32_softmax: bool = True) -> None:
        cfg = model.config
        self.fp32_softmax = fp32_softmax
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self.theta = cfg.rope_parameters["rope_theta"]
        assert cfg.rope_parameters.get("rope_type", "default") == "default", "only default RoPE"
        assert cfg.hidden_act == "silu"

        def t(p: torch.Tensor | None) -> torch.Tensor | None:
            return None if p is None else p.detach().clone()

        base = model.model
        self.embed = t(base.embed_tokens.weight)
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                {
                    "ln1": t(layer.input_layernorm.weight),
                    "ln2": t(layer.post_attention_layernorm.weight),
                    **{f"{n}_w": t(getattr(attn, f"{n}_proj").weight) for n in "qkvo"},
                    **{f"{n}_b": t(getattr(attn, f"{n}_proj").bias) for n in "qkvo"},
                    **{f"{n}_w": t(getattr(mlp, f"{n}_proj").weight) for n in ("gate", "up", "down")},
                    **{f"{n}_b": t(getattr(mlp, f"{n}_proj").bias) for n in ("gate", "up", "down")},
                }
            )
        self.norm = t(base.norm.weight)
        self.lm_head_w = t(model.lm_head.weight)
        self.lm_head_b = t(getattr(model.lm_head, "bias", None))

    # -- forward ------------------------------------------------------------------------------
    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        z = x @ w.T
        return z if b is None else z + b

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xc = x.float()
        normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * normed.to(x.dtype)

    def _rope_tables(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.float32
        dim = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=compute) / dim))
        freqs = torch.arange(length, dtype=compute)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)  # [T, Dh]

    def _rope_matrices(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE at each position as an explicit matrix M_t: rotated = M_t @ x, [T, Dh, Dh].

        rotated[d] = x[d] cos[d] + rotate_half(x)[d] sin[d], rotate_half(x) = cat(-x2, x1).
        """
        length, dim = cos.shape
        half = dim // 2
        m = torch.zeros(length, dim, dim, dtype=cos.dtype)
        idx = torch.arange(dim)
        m[:, idx, idx] = cos
        m[:, idx[:half], idx[:half] + half] = -sin[:, :half]
        m[:, idx[half:], idx[half:] - half] = sin[:, half:]
        return m

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict], dict]:
        """Run the forward pass on one unpadded sequence ``ids`` [T]; return logits [T, V] and caches."""
        length = ids.shape[0]
        h = self.embed[ids]  # [T, D]
        top = {"emb": h}
        cos, sin = self._rope_tables(length, h.dtype)
        rope = self._rope_matrices(cos, sin)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        caches = []
        for p in self.layers:
            c: dict = {"h_in": h}
            x = self._rms(h, p["ln1"])
            c["x1"] = x
            q = self._linear(x, p["q_w"], p["q_b"])
            k = self._linear(x, p["k_w"], p["k_b"])
            v = self._linear(x, p["v_w"], p["v_b"])
            c.update(q=q, k=k, v=v)
            qh = q.view(length, self.heads, self.head_dim)
            kh = k.view(length, self.kv_heads, self.head_dim)
            vh = v.view(length, self.kv_heads, self.head_dim)

            def rotate(t: torch.Tensor) -> torch.Tensor:  # the HF formula (bit-close to it)
                half = self.head_dim // 2
                rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
                return t * cos[:, None, :] + rot * sin[:, None, :]

            qe, ke = rotate(qh), rotate(kh)  # [T, H, Dh], [T, KV, Dh]
            # the same map as the explicit matrices used in the backward
            assert torch.allclose(torch.einsum("tde,the->thd", rope, qh), qe, rtol=1e-12, atol=1e-12)
            c.update(qe=qe, ke=ke, rope=rope)
            outs, scores, probs = [], [], []
            for head in range(self.heads):
                g = head // self.groups  # repeat_kv: head h reads kv head h // groups
                s = (qe[:, head] @ ke[:, g].T) * self.scaling  # [T, T]
                masked = s.masked_fill(~causal, float("-inf"))
                if self.fp32_softmax:
                    prob = torch.softmax(masked.float(), dim=-1).to(s.dtype)
                else:
                    prob = torch.softmax(masked, dim=-1)
                outs.append(prob @ vh[:, g])  # [T, Dh]
                scores.append(s)
                probs.append(prob)
            o = torch.stack(outs, 1)  # [T, H, Dh]
            c.update(scores=scores, probs=probs, o=o, causal=causal)
            a = self._linear(o.reshape(length, -1), p["o_w"], p["o_b"])
            c["attn_out"] = a
            h = h + a
            c["h_mid"] = h
            x2 = self._rms(h, p["ln2"])
            c["x2"] = x2
            gate = self._linear(x2, p["gate_w"], p["gate_b"])
            up = self._linear(x2, p["up_w"], p["up_b"])
            act = gate * torch.sigmoid(gate)  # SiLU
            prod = act * up
            down = self._linear(prod, p["down_w"], p["down_b"])
            c.update(gate=gate, up=up, act=act, prod=prod, down=down)
            h = h + down
            c["h_out"] = h
            caches.append(c)
        xf = self._rms(h, self.norm)
        logits = self._linear(xf, self.lm_head_w, self.lm_head_b)
        top.update(xf=xf, logits=logits)
        return logits, caches, top

    # -- relevance ----------------------------------------------------------------------------
    def relevance(self, ids: torch.Tensor, *, variant: str = "attnlrp") -> ExplicitRelevance:
        """Explain the largest logit at the last position of ``ids`` [T] with explicit messages."""
        assert variant in ("attnlrp", "cp")
        uniform = variant == "attnlrp"
        with torch.no_grad():
            logits, caches, top = self.forward(ids)
            length = ids.shape[0]
            target = int(logits[-1].argmax())
            r_logits = torch.zeros_like(logits)
            r_logits[-1, target] = logits[-1, target]  # seed: the explained logit itself

            r_h = _lrp_linear(top["xf"], self.lm_head_w, logits, r_logits)  # lm_head, then final norm:
            # identity on the normaliser -> R_h = R_xf element-wise (r_h is already that).

            neurons, heads, leaks = [], [], []
            for p, c in zip(reversed(self.layers), reversed(caches)):
                # residual h_out = h_mid + down: LRP-0 on the sum
                r_mid = c["h_mid"] * r_h / c["h_out"]
                r_down = c["down"] * r_h / c["h_out"]
                # down_proj
                r_prod = _lrp_linear(c["prod"], p["down_w"], c["down"], r_down)
                neurons.append(r_prod.sum(0))
                # gated product p = act * up
                if uniform:
                    r_act, r_up = r_prod / 2, r_prod / 2
                else:  # CP: the gate activation is a constant
                    r_act, r_up = torch.zeros_like(r_prod), r_prod
                r_gate = r_act  # SiLU: identity rule
                r_x2 = _lrp_linear(c["x2"], p["gate_w"], c["gate"], r_gate) + _lrp_linear(
                    c["x2"], p["up_w"], c["up"], r_up
                )
                r_mid = r_mid + r_x2  # post-attention RMSNorm: R_in = R_out
                # residual h_mid = h_in + attn_out
                r_in = c["h_in"] * r_mid / c["h_mid"]
                r_attn = c["attn_out"] * r_mid / c["h_mid"]
                o = c["o"]
                r_o = _lrp_linear(o.reshape(length, -1), p["o_w"], c["attn_out"], r_attn).view_as(o)
                heads.append(r_o.sum((0, 2)))

                r_qe = torch.zeros_like(c["qe"])
                r_ke = torch.zeros_like(c["ke"])
                r_v = torch.zeros(length, self.kv_heads, self.head_dim, dtype=o.dtype)
                vh = c["v"].view(length, self.kv_heads, self.head_dim)
                causal = c["causal"]
                leak = 0.0
                for head in range(self.heads):
                    g = head // self.groups
                    prob, s = c["probs"][head], c["scores"][head]
                    # O = P V: messages P_tj V_jd R_O[t,d] / O[t,d], [T(t), T(j), Dh(d)]
                    m = prob[:, :, None] * vh[None, :, g, :] * (r_o[:, head] / o[:, head])[:, None, :]
                    if uniform:
                        r_p = m.sum(2) / 2
                        r_v[:, g] += m.sum(0) / 2  # repeat_kv: heads of a group sum back
                    else:
                        r_p = torch.zeros_like(prob)
                        r_v[:, g] += m.sum(0)
                    # softmax rule, row-wise, on the causal entries
                    r_s = s * (r_p - prob * r_p.sum(-1, keepdim=True))
                    r_s = torch.where(causal, r_s, torch.zeros_like(r_s))
                    leak += float(r_p.sum() - r_s.sum())
                    # S = scale * q k^T: messages scale q_td k_jd R_S[t,j] / S[t,j], [T(t), T(j), Dh(d)]
                    ratio = torch.where(causal, r_s / torch.where(causal, s, torch.ones_like(s)), 0.0)
                    n = self.scaling * c["qe"][:, None, head, :] * c["ke"][None, :, g, :] * ratio[:, :, None]
                    r_qe[:, head] += n.sum(1) / 2
                    r_ke[:, g] += n.sum(0) / 2
                leaks.append(leak)
                # RoPE (linear, per position): LRP-0 with the explicit matrices
                rope = c["rope"]  # [T, Dh(out), Dh(in)]
                qh = c["q"].view(length, self.heads, self.head_dim)
                kh = c["k"].view(length, self.kv_heads, self.head_dim)
                r_q = (qh[:, :, None, :] * rope[:, None] * (r_qe / c["qe"])[..., None]).sum(2)
                r_k = (kh[:, :, None, :] * rope[:, None] * (r_ke / c["ke"])[..., None]).sum(2)
                r_x1 = (
                    _lrp_linear(c["x1"], p["q_w"], c["q"], r_q.reshape(length, -1))
                    + _lrp_linear(c["x1"], p["k_w"], c["k"], r_k.reshape(length, -1))
                    + _lrp_linear(c["x1"], p["v_w"], c["v"], r_v.reshape(length, -1))
                )
                r_h = r_in + r_x1  # input RMSNorm: R_in = R_out

            return ExplicitRelevance(
                logit=float(logits[-1, target]),
                inputs=r_h.sum(-1),  # token embedding relevance
                neurons=torch.stack(neurons[::-1]),
                heads=torch.stack(heads[::-1]),
                softmax_leak=leaks[::-1],
            )
