"""The architecture registry: one declarative entry per ``config.model_type``.

An entry names, relative to the causal-LM module, where the decoder blocks, embeddings and head
live, and relative to a decoder block, where the attention projections and the MLP are. It also
lists the activation and norm classes the engine knows how to treat. :func:`resolve` binds an entry
to a model instance and checks that every activation and norm module in the model is one the entry
handles; anything else is an :class:`~hf_lrp_surgery.exceptions.UnsupportedArchitectureError`
naming the class, never a silently wrong relevance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

import torch
from torch import nn

from hf_lrp_surgery.exceptions import UnsupportedArchitectureError

__all__ = [
    "ArchitectureSpec",
    "LayerModules",
    "MoESpec",
    "PrunableModule",
    "ResolvedArchitecture",
    "REGISTRY",
    "parameter",
    "resolve",
    "text_config_of",
    "supported_model_types",
    "unwrap_model",
]

NormKind = Literal["rms", "rms_one_plus", "layernorm"]
#: ``gated``: ``down(act(gate(x)) * up(x))`` with separate gate and up projections; ``gated_fused``: the
#: same with gate and up the first and second half of one projection's output (Phi-3's ``gate_up_proj``);
#: ``plain``: ``out(act(in(x)))``; ``moe``: a sparse mixture of gated experts whose weights are fused 3-D
#: parameters of one experts module (see :class:`MoESpec` and :mod:`hf_lrp_surgery.lrp.moe`).
MLPKind = Literal["gated", "gated_fused", "plain", "moe"]
#: Output layout of a fused q/k/v projection: ``blocks`` is ``[q | k | v]`` (GPT-2's ``c_attn``, Phi-3's
#: ``qkv_proj``); ``heads`` is ``[q_0 | k_0 | v_0 | q_1 | ...]``, one ``head_dim`` slice of each per head
#: (GPT-NeoX's ``query_key_value``, which transformers views as ``[..., heads, 3 * head_dim]``).
QKVLayout = Literal["blocks", "heads"]
#: Where a tanh soft-capping ``cap * tanh(x / cap)`` sits: on the attention logits (inside the attention
#: kernel, before the softmax) or on the final logits (after the LM head).
SoftcapSite = Literal["attention", "logits"]
Orientation = Literal["linear", "conv1d"]

_LLAMA_STYLE_ACTS = MappingProxyType({"SiLUActivation": "silu", "SiLU": "silu"})
_GEMMA_ACTS = MappingProxyType({"GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"})
_OPT_ACTS = MappingProxyType({"ReLU": "relu", "GELUActivation": "gelu", "GELU": "gelu"})
_GPT2_ACTS = MappingProxyType(
    {
        "NewGELUActivation": "gelu_tanh",
        "GELUTanh": "gelu_tanh",
        "GELUActivation": "gelu",
        "ReLU": "relu",
        "QuickGELUActivation": "quick_gelu",
    }
)
_GPT_NEOX_ACTS = MappingProxyType(
    {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "ReLU": "relu"}
)
_LAYERNORM: Mapping[str, NormKind] = MappingProxyType({"LayerNorm": "layernorm"})


@dataclass(frozen=True)
class MoESpec:
    """Where the parts of a sparse mixture-of-experts MLP are, and which classes the engine explains exactly.

    The MoE MLP of a block is ``sum_k w_k(x) * expert_{e_k}(x)`` over the router's top-k experts ``e_k``;
    each expert is a gated MLP ``down_e(act(gate_e(x)) * up_e(x))`` whose matrices are slices of two fused
    3-D parameters of the experts module: ``gate_up[e]`` (``[2 I, H]``, gate rows first) and ``down[e]``
    (``[H, I]``). Expert neuron ``i`` of expert ``e`` is unit ``e * I + i`` of the block
    (:mod:`hf_lrp_surgery.lrp.moe` states the relevance rule of the router).

    Every family listed here combines its experts exactly so: the MoE module's output is the experts
    module's output (no shared expert, no residual inside the block), and the routing weights ``w_k`` are
    whatever the router returns. How the router computes them (a softmax over all experts restricted to
    the top k, renormalised to sum 1 or not) does not matter to the engine: they are constants of the
    relevance pass, and ``R(w_k * z) = R(z)`` for any constant ``w_k``.

    Attributes:
        block: Block-relative path of the MoE MLP module.
        block_class: Its class name; a block whose MLP is another class (a dense MLP between MoE blocks) is
            refused.
        block_children: The MoE module's child names, exactly; anything else (a shared expert, a shared
            gate) has no rule here and is refused by name.
        experts: Block-relative path of the experts module (it holds the fused parameters).
        experts_class: Its class name (the engine runs an exact copy of its eager loop, so no other class).
        router: Block-relative path of the router (its routing weights are constants of the relevance pass).
        router_class: Its class name.
        gate_up: Name of the fused ``[E, 2 I, H]`` gate|up parameter of the experts module.
        down: Name of the ``[E, H, I]`` down parameter.
    """

    block: str
    block_class: str
    block_children: frozenset[str]
    experts: str
    experts_class: str
    router: str
    router_class: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where things are in one model family.

    Paths to the model-level modules are relative to the causal-LM module; paths to the block-level
    modules are relative to one decoder block.

    Attributes:
        model_type: The ``config.model_type`` this entry serves.
        decoder_layers: Path of the ``ModuleList`` of decoder blocks.
        token_embedding: Path of the token embedding.
        position_embedding: Path of a learned position embedding (OPT, GPT-2), else ``None``.
        q_proj, k_proj, v_proj: Separate query/key/value projections (``None`` when fused).
        qkv_proj: A fused q|k|v projection (GPT-2's ``c_attn``), else ``None``.
        qkv_layout: How the fused projection's output features are ordered (see :data:`QKVLayout`).
        o_proj: The attention output projection (its input holds the per-head outputs).
        mlp_kind: See :data:`MLPKind`.
        mlp_in: The MLP's input projections: ``(gate, up)`` for gated, ``(gate_up,)`` for gated_fused,
            ``(in,)`` for plain, ``()`` for moe (the expert matrices are parameters, not modules).
        mlp_act: The MLP's activation module (moe: the experts module's, shared by every expert).
        mlp_out: The MLP's output projection (its input holds the neurons); moe: the experts module.
        moe: The mixture-of-experts layout, for ``mlp_kind="moe"`` only.
        activations: Activation class name -> rule kind (a key of ``ACTIVATION_RATIOS``).
        norms: Norm class name -> norm kind.
        orientation: ``"linear"`` for ``nn.Linear`` weights ``[out, in]``, ``"conv1d"`` for GPT-2's
            ``Conv1D`` weights ``[in, out]``.
        unsupported_config: Config attribute -> the non-linearity it adds, which the engine has no rule
            for; a non-``None`` value is refused (the message names both).
        softcapping: Config attribute -> site of a tanh soft-capping the forward applies when the
            attribute is not ``None``. While the rules are attached every ``tanh`` the model's forward
            runs gets the identity rule, so the entry must list every ``tanh`` of the family's forward
            (the CP conservation test fails otherwise). Attention soft-capping is explained on the eager
            kernel only (the others fuse it out of reach).
        module_roots: Paths of the submodules a text forward runs through, whose activation and norm
            modules get rules (``""``: the whole model). Gemma 3's multimodal model lists its language
            model and head, so that its vision tower (never run on text) does not have to be supported.
    """

    model_type: str
    decoder_layers: str
    token_embedding: str
    o_proj: str
    mlp_kind: MLPKind
    mlp_in: tuple[str, ...]
    mlp_act: str
    mlp_out: str
    activations: Mapping[str, str]
    norms: Mapping[str, NormKind]
    position_embedding: str | None = None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None
    qkv_layout: QKVLayout = "blocks"
    orientation: Orientation = "linear"
    unsupported_config: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    softcapping: Mapping[str, SoftcapSite] = field(default_factory=lambda: MappingProxyType({}))
    module_roots: tuple[str, ...] = ("",)
    moe: MoESpec | None = None

    def __post_init__(self) -> None:
        separate = all(p is not None for p in (self.q_proj, self.k_proj, self.v_proj))
        if separate == (self.qkv_proj is not None):
            raise ValueError(f"{self.model_type}: give either q/k/v projections or a fused qkv_proj")
        if (self.mlp_kind == "moe") != (self.moe is not None):
            raise ValueError(f"{self.model_type}: a moe MLP, and only a moe MLP, needs a MoESpec")
        expected = {"gated": 2, "moe": 0}.get(self.mlp_kind, 1)
        if len(self.mlp_in) != expected:
            raise ValueError(f"{self.model_type}: a {self.mlp_kind} MLP has {expected} input projection(s)")
        if set(self.softcapping) & set(self.unsupported_config):
            raise ValueError(f"{self.model_type}: a config key cannot be both supported and refused")

    @property
    def gated(self) -> bool:
        """Whether the MLP multiplies an activated gate with an up projection (fused, or in every expert)."""
        return self.mlp_kind in ("gated", "gated_fused", "moe")

    @property
    def attention_projections(self) -> tuple[str, ...]:
        """The block-relative paths of the q/k/v projection(s)."""
        if self.qkv_proj is not None:
            return (self.qkv_proj,)
        return (self.q_proj, self.k_proj, self.v_proj)  # type: ignore[return-value]

    @property
    def prunable(self) -> tuple[str, ...]:
        """Block-relative paths of every prunable weight module, attention first, then MLP.

        A moe MLP has no weight modules (its expert matrices are fused 3-D parameters): only the attention
        projections are listed, and the weights granularity is refused for it
        (:meth:`ResolvedArchitecture.check_granularity`).
        """
        if self.mlp_kind == "moe":
            return (*self.attention_projections, self.o_proj)
        return (*self.attention_projections, self.o_proj, *self.mlp_in, self.mlp_out)


def _llama_like(
    model_type: str,
    *,
    acts: Mapping[str, str] = _LLAMA_STYLE_ACTS,
    norm_class: str,
    norm_kind: NormKind = "rms",
    prefix: str = "model",
    unsupported: Mapping[str, str] = MappingProxyType({}),
    softcapping: Mapping[str, SoftcapSite] = MappingProxyType({}),
    module_roots: tuple[str, ...] = ("",),
) -> ArchitectureSpec:
    return ArchitectureSpec(
        model_type=model_type,
        decoder_layers=f"{prefix}.layers",
        token_embedding=f"{prefix}.embed_tokens",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        o_proj="self_attn.o_proj",
        mlp_kind="gated",
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_act="mlp.act_fn",
        mlp_out="mlp.down_proj",
        activations=acts,
        norms=MappingProxyType({norm_class: norm_kind}),
        unsupported_config=unsupported,
        softcapping=softcapping,
        module_roots=module_roots,
    )


_OPT = ArchitectureSpec(
    model_type="opt",
    decoder_layers="model.decoder.layers",
    token_embedding="model.decoder.embed_tokens",
    position_embedding="model.decoder.embed_positions",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.out_proj",
    mlp_kind="plain",
    mlp_in=("fc1",),
    mlp_act="activation_fn",
    mlp_out="fc2",
    activations=_OPT_ACTS,
    norms=_LAYERNORM,
)

_GPT2 = ArchitectureSpec(
    model_type="gpt2",
    decoder_layers="transformer.h",
    token_embedding="transformer.wte",
    position_embedding="transformer.wpe",
    qkv_proj="attn.c_attn",
    o_proj="attn.c_proj",
    mlp_kind="plain",
    mlp_in=("mlp.c_fc",),
    mlp_act="mlp.act",
    mlp_out="mlp.c_proj",
    activations=_GPT2_ACTS,
    norms=_LAYERNORM,
    orientation="conv1d",
)

# Phi-3: fused q|k|v (blocks, with GQA) and fused gate|up (gate first: ``chunk(2)`` in Phi3MLP).
_PHI3 = ArchitectureSpec(
    model_type="phi3",
    decoder_layers="model.layers",
    token_embedding="model.embed_tokens",
    qkv_proj="self_attn.qkv_proj",
    o_proj="self_attn.o_proj",
    mlp_kind="gated_fused",
    mlp_in=("mlp.gate_up_proj",),
    mlp_act="mlp.activation_fn",
    mlp_out="mlp.down_proj",
    activations=_LLAMA_STYLE_ACTS,
    norms=MappingProxyType({"Phi3RMSNorm": "rms"}),
)

# GPT-NeoX / Pythia: fused q|k|v per head, parallel attention + MLP (two residual adds: linear), partial
# rotary (linear in q and k), LayerNorms, biases everywhere.
_GPT_NEOX = ArchitectureSpec(
    model_type="gpt_neox",
    decoder_layers="gpt_neox.layers",
    token_embedding="gpt_neox.embed_in",
    qkv_proj="attention.query_key_value",
    qkv_layout="heads",
    o_proj="attention.dense",
    mlp_kind="plain",
    mlp_in=("mlp.dense_h_to_4h",),
    mlp_act="mlp.act",
    mlp_out="mlp.dense_4h_to_h",
    activations=_GPT_NEOX_ACTS,
    norms=_LAYERNORM,
)


def _sparse_moe(
    model_type: str,
    *,
    norm_class: str,
    block_class: str,
    experts_class: str,
    router_class: str,
    unsupported: Mapping[str, str] = MappingProxyType({}),
) -> ArchitectureSpec:
    """A llama-style attention block with a sparse MoE MLP (``mlp.gate`` router, ``mlp.experts`` fused experts)."""
    return ArchitectureSpec(
        model_type=model_type,
        decoder_layers="model.layers",
        token_embedding="model.embed_tokens",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        o_proj="self_attn.o_proj",
        mlp_kind="moe",
        mlp_in=(),
        mlp_act="mlp.experts.act_fn",
        mlp_out="mlp.experts",
        activations=_LLAMA_STYLE_ACTS,
        norms=MappingProxyType({norm_class: "rms"}),
        unsupported_config=unsupported,
        moe=MoESpec(
            block="mlp",
            block_class=block_class,
            block_children=frozenset({"experts", "gate"}),
            experts="mlp.experts",
            experts_class=experts_class,
            router="mlp.gate",
            router_class=router_class,
        ),
    )


# The MoE families share transformers' eager expert loop (``experts_implementation="eager"``, required) and
# a softmax top-k router; none has a shared expert.
# Qwen3-MoE: Qwen3 attention (per-head q/k norms); routing weights renormalised when ``norm_topk_prob``.
# ``mlp_only_layers`` / ``decoder_sparse_step`` blocks (dense Qwen3MoeMLP) are refused by class.
_QWEN3_MOE = _sparse_moe(
    "qwen3_moe",
    norm_class="Qwen3MoeRMSNorm",
    block_class="Qwen3MoeSparseMoeBlock",
    experts_class="Qwen3MoeExperts",
    router_class="Qwen3MoeTopKRouter",
)
# Mixtral: Mistral attention (the sliding window is a mask: additive, linear); routing weights always
# renormalised and left in fp32 (the loop multiplies, then casts: same as the class's forward). The router
# jitter (``router_jitter_noise``) multiplies the block's input by noise in training mode only; a relevance
# pass in training mode with it set is refused like active dropout (lrp/attach.py).
_MIXTRAL = _sparse_moe(
    "mixtral",
    norm_class="MixtralRMSNorm",
    block_class="MixtralSparseMoeBlock",
    experts_class="MixtralExperts",
    router_class="MixtralTopKRouter",
)
# OLMoE: OLMo attention with q/k RMSNorms over all heads (each gets the norm rule, as in olmo2); routing
# weights renormalised when ``norm_topk_prob`` (off in the released models). ``clip_qkv`` clamps q, k and v
# in place: a non-linearity without a rule here, refused.
_OLMOE = _sparse_moe(
    "olmoe",
    norm_class="OlmoeRMSNorm",
    block_class="OlmoeSparseMoeBlock",
    experts_class="OlmoeExperts",
    router_class="OlmoeTopKRouter",
    unsupported=MappingProxyType({"clip_qkv": "the clamp of the q/k/v projection outputs"}),
)

_GEMMA_SOFTCAP: Mapping[str, str] = MappingProxyType(
    {"attn_logit_softcapping": "the tanh soft-capping", "final_logit_softcapping": "the tanh soft-capping"}
)
# Gemma 2's forward runs tanh exactly at these two soft-cappings (its GELU-tanh is one F.gelu call).
_GEMMA2_SOFTCAP: Mapping[str, SoftcapSite] = MappingProxyType(
    {"attn_logit_softcapping": "attention", "final_logit_softcapping": "logits"}
)

#: ``config.model_type`` -> entry.
REGISTRY: Mapping[str, ArchitectureSpec] = MappingProxyType(
    {
        "llama": _llama_like("llama", norm_class="LlamaRMSNorm"),
        "qwen2": _llama_like("qwen2", norm_class="Qwen2RMSNorm"),
        "qwen3": _llama_like("qwen3", norm_class="Qwen3RMSNorm"),
        # Sliding-window attention is a mask (additive, linear).
        "mistral": _llama_like("mistral", norm_class="MistralRMSNorm"),
        # NoPE layers only skip RoPE (linear).
        "smollm3": _llama_like("smollm3", norm_class="SmolLM3RMSNorm"),
        # Norms after attention and MLP, q/k RMSNorms over all heads: each gets the norm rule.
        "olmo2": _llama_like("olmo2", norm_class="Olmo2RMSNorm"),
        # Embedding, attention and residual multipliers and the logits scaling are constant factors (linear).
        "granite": _llama_like("granite", norm_class="GraniteRMSNorm"),
        "gemma2": _llama_like(
            "gemma2",
            acts=_GEMMA_ACTS,
            norm_class="Gemma2RMSNorm",
            norm_kind="rms_one_plus",
            softcapping=_GEMMA2_SOFTCAP,
        ),
        "phi3": _PHI3,
        "gpt_neox": _GPT_NEOX,
        "qwen3_moe": _QWEN3_MOE,
        "mixtral": _MIXTRAL,
        "olmoe": _OLMOE,
        "gemma3_text": _llama_like(
            "gemma3_text",
            acts=_GEMMA_ACTS,
            norm_class="Gemma3RMSNorm",
            norm_kind="rms_one_plus",
            unsupported=_GEMMA_SOFTCAP,
        ),
        "gemma3": _llama_like(
            "gemma3",
            acts=_GEMMA_ACTS,
            norm_class="Gemma3RMSNorm",
            norm_kind="rms_one_plus",
            prefix="model.language_model",
            unsupported=_GEMMA_SOFTCAP,
            module_roots=("model.language_model", "lm_head"),
        ),
        "opt": _OPT,
        "gpt2": _GPT2,
    }
)


def supported_model_types() -> list[str]:
    """The ``model_type`` values the engine supports, sorted."""
    return sorted(REGISTRY)


@dataclass(frozen=True)
class PrunableModule:
    """One prunable weight of a decoder block.

    Attributes:
        name: The module's full name in the model (``model.layers.3.mlp.down_proj``).
        layer: The decoder block index.
        role: The block-relative path (``mlp.down_proj``).
        module: The module itself.
        orientation: ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (weight ``[in, out]``).
    """

    name: str
    layer: int
    role: str
    module: nn.Module
    orientation: Orientation

    @property
    def weight(self) -> torch.Tensor:
        """The module's weight parameter."""
        return parameter(self.module)


@dataclass(frozen=True)
class LayerModules:
    """The modules of one decoder block that the engine attaches to.

    Attributes:
        index: The block index.
        attention_projections: The q/k/v projection(s).
        o_proj: The attention output projection.
        mlp_act: The MLP activation module (moe: the experts module's).
        mlp_out: The MLP output projection (moe: the experts module).
        router: The MoE router (moe only, else ``None``).
    """

    index: int
    attention_projections: tuple[nn.Module, ...]
    o_proj: nn.Module
    mlp_act: nn.Module
    mlp_out: nn.Module
    router: nn.Module | None = None


@dataclass(frozen=True)
class ResolvedArchitecture:
    """An :class:`ArchitectureSpec` bound to one model instance.

    Attributes:
        spec: The registry entry.
        model: The causal-LM module (PEFT wrappers removed).
        layers: Per decoder block, the modules the rules and collectors use.
        prunable: Every prunable weight of every block, in block order.
        activations: ``(module, kind)`` for every activation module in the model.
        norms: ``(module, kind)`` for every norm module in the model.
        token_embedding, position_embedding: The embedding modules.
        num_heads, head_dim, num_kv_heads: Attention geometry (from the o_proj width and config).
        num_neurons: MLP width (neurons per block; moe: ``num_experts * expert_width``, unit ``e * I + i``
            being neuron ``i`` of expert ``e``).
        num_experts: Experts per block (0 for a dense MLP).
        expert_width: Neurons per expert ``I`` (0 for a dense MLP).
        max_positions: The model's context length, if the config states it.
        softcaps: The config keys of the entry's ``softcapping`` that are set on this model (their
            tanh gets the identity rule while the rules are attached).
    """

    spec: ArchitectureSpec
    model: nn.Module
    layers: tuple[LayerModules, ...]
    prunable: tuple[PrunableModule, ...]
    activations: tuple[tuple[nn.Module, str], ...]
    norms: tuple[tuple[nn.Module, NormKind], ...]
    token_embedding: nn.Module
    position_embedding: nn.Module | None
    num_heads: int
    head_dim: int
    num_kv_heads: int
    num_neurons: int
    max_positions: int | None = field(default=None)
    softcaps: tuple[str, ...] = ()
    num_experts: int = 0
    expert_width: int = 0

    def check_granularity(self, granularity: str) -> None:
        """Refuse a component kind the engine cannot attribute or prune exactly on this model.

        Args:
            granularity: ``"neurons"``, ``"heads"`` or ``"weights"``.

        Raises:
            UnsupportedArchitectureError: ``"weights"`` on a mixture-of-experts model.

        Example:
            >>> resolve(moe_model).check_granularity("weights")  # doctest: +SKIP
            Traceback (most recent call last):
            UnsupportedArchitectureError: qwen3_moe: the weights granularity is not supported ...
        """
        if granularity == "weights" and self.spec.moe is not None:
            raise UnsupportedArchitectureError(
                f"{self.spec.model_type}: the weights granularity is not supported on mixture-of-experts models "
                "(the expert matrices are fused 3-D parameters); use neurons (expert neurons) or heads"
            )

    @property
    def embedding_weight(self) -> torch.Tensor:
        """The token embedding matrix (its device is where inputs go, its dtype the model's)."""
        return parameter(self.token_embedding, "weight")

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding: token ids must lie in ``[0, vocab_size)``."""
        return int(self.embedding_weight.shape[0])

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.layers)

    def qkv_split(self) -> tuple[int, int, int]:
        """Widths of the q, k and v outputs (the split of a fused projection)."""
        kv = self.num_kv_heads * self.head_dim
        return self.num_heads * self.head_dim, kv, kv

    def qkv_roles(self) -> torch.Tensor:
        """Per output feature of the fused q/k/v projection, whether it is a query (0), key (1) or value (2).

        Returns:
            An int64 tensor as long as the projection's output, in the entry's ``qkv_layout``.

        Example:
            >>> arch.qkv_roles()[: 3 * arch.head_dim].unique_consecutive()  # doctest: +SKIP
            tensor([0, 1, 2])
        """
        q, kv, _ = self.qkv_split()
        if self.spec.qkv_layout == "heads":  # [q_h | k_h | v_h] per head (resolve checks kv heads == heads)
            return torch.arange(3).repeat_interleave(self.head_dim).repeat(self.num_heads)
        return torch.cat([torch.zeros(q, dtype=torch.long), torch.ones(kv, dtype=torch.long), torch.full((kv,), 2)])

    def neuron_writers(self, layer: int, neurons: torch.Tensor) -> tuple[tuple[str, torch.Tensor], ...]:
        """The MLP input projections that write the given neurons of one block, and which of their outputs.

        Pruning a neuron zeroes these output features (weight rows of a Linear, columns of a Conv1D, and
        bias entries) as well as the neuron's input column of the MLP output projection. For a fused
        gate|up projection (``gated_fused``) neuron ``i`` is written by outputs ``i`` (gate) and
        ``num_neurons + i`` (up).

        Args:
            layer: The decoder block index.
            neurons: int64 neuron indices (``0 <= i < num_neurons``).

        Returns:
            ``(module name, int64 output-feature indices)`` per MLP input projection, in ``spec.mlp_in``
            order.

        Raises:
            UnsupportedArchitectureError: A mixture-of-experts model (its writers are slices of fused 3-D
                parameters: see :func:`~hf_lrp_surgery.masks.geometry.zeroed_entries`).

        Example:
            >>> arch.neuron_writers(0, torch.tensor([3]))  # doctest: +SKIP
            (('model.layers.0.mlp.gate_up_proj', tensor([ 3, 35])),)
        """
        if self.spec.moe is not None:
            raise UnsupportedArchitectureError(
                f"{self.spec.model_type}: expert neurons are written by slices of the fused 3-D expert parameters, "
                "not by module rows; masks.geometry.zeroed_entries gives them"
            )
        index = neurons.to(torch.long)
        outputs = torch.cat([index, index + self.num_neurons]) if self.spec.mlp_kind == "gated_fused" else index
        return tuple((f"{self.spec.decoder_layers}.{layer}.{role}", outputs) for role in self.spec.mlp_in)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the causal-LM module inside a PEFT wrapper (or ``model`` itself).

    Args:
        model: A ``PreTrainedModel`` or a ``peft.PeftModel`` around one.

    Returns:
        The module whose ``config.model_type`` names the architecture.
    """
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _weight_module(module: nn.Module) -> nn.Module:
    """The module that owns the weight: a PEFT layer's ``base_layer`` or the module itself."""
    return getattr(module, "base_layer", module)


def text_config_of(config: Any) -> Any:
    """The text part of a config (Gemma 3's multimodal config nests it), or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def parameter(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A parameter of a weight-owning module (through a PEFT layer's ``base_layer``), typed as a tensor.

    Raises:
        TypeError: The module has no such tensor.
    """
    value = getattr(_weight_module(module), name, None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor {name!r}")
    return value


def _looks_like_activation(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ in ("transformers.activations", "torch.nn.modules.activation") and not isinstance(
        module, (nn.Softmax, nn.MultiheadAttention)
    )


def _looks_like_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Norm" in name and not name.endswith(("Model", "Layer"))


def _get(root: nn.Module, path: str, model_type: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r}: expected a module at {path!r} but the model has none; "
            "this model's layout differs from the registry entry (open an issue with the model id)"
        ) from err


def resolve(model: nn.Module) -> ResolvedArchitecture:
    """Bind the registry entry for ``model.config.model_type`` to ``model``.

    Args:
        model: A causal LM (``...ForCausalLM`` or ``Gemma3ForConditionalGeneration``), optionally
            wrapped by PEFT.

    Returns:
        The resolved modules and geometry.

    Raises:
        UnsupportedArchitectureError: The model type has no entry; a config option adds a
            non-linearity without a rule (e.g. Gemma 3 logit soft-capping, OLMoE's ``clip_qkv``); attention
            soft-capping is set on a kernel other than eager; or an activation or norm module of a class the
            entry does not handle was found (the message names it).

    Example:
        >>> arch = resolve(model)  # doctest: +SKIP
        >>> arch.num_layers, arch.num_neurons, arch.num_heads  # doctest: +SKIP
        (30, 1536, 9)
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = REGISTRY.get(model_type)  # type: ignore[arg-type]
    if spec is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by the relevance engine; supported: "
            f"{', '.join(supported_model_types())}. Adding one is a new entry in "
            "hf_lrp_surgery/lrp/architectures.py with its activation and norm classes."
        )
    text_config = text_config_of(config)
    for key, nonlinearity in spec.unsupported_config.items():
        if getattr(text_config, key, None) is not None:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} with {key}={getattr(text_config, key)!r}: {nonlinearity} has no LRP "
                f"rule in this engine; set config.{key} = None only if the model was trained without it"
            )
    softcaps = tuple(key for key in spec.softcapping if getattr(text_config, key, None) is not None)
    kernel = getattr(text_config, "_attn_implementation", None) or "eager"
    for key in softcaps:
        if spec.softcapping[key] == "attention" and kernel != "eager":
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} with {key}={getattr(text_config, key)!r} on the {kernel!r} attention "
                "kernel: the attention soft-capping is explained only where it runs as a tanh in eager attention; "
                "load the model with attn_implementation='eager'"
            )

    activations: list[tuple[nn.Module, str]] = []
    norms: list[tuple[nn.Module, NormKind]] = []
    scanned = [(_get(model, root, spec.model_type) if root else model, root) for root in spec.module_roots]
    for path, module in (named for scope, root in scanned for named in scope.named_modules(prefix=root)):
        cls_name = type(module).__name__
        if cls_name in spec.activations:
            activations.append((module, spec.activations[cls_name]))
        elif cls_name in spec.norms:
            norms.append((module, spec.norms[cls_name]))
        elif _looks_like_activation(module) or _looks_like_norm(module):
            raise UnsupportedArchitectureError(
                f"{model_type}: module {path!r} is a {type(module).__module__}.{cls_name}, which the "
                f"registry entry does not handle (activations: {sorted(spec.activations)}, norms: "
                f"{sorted(spec.norms)}). Add its rule to the entry, or use a model with supported classes."
            )

    blocks = _get(model, spec.decoder_layers, spec.model_type)
    layers: list[LayerModules] = []
    prunable: list[PrunableModule] = []
    for index, block in enumerate(cast(nn.ModuleList, blocks)):
        router = _check_moe_block(block, index, spec) if spec.moe is not None else None
        act = _get(block, spec.mlp_act, spec.model_type)
        if type(act).__name__ not in spec.activations:
            raise UnsupportedArchitectureError(
                f"{model_type}: the MLP activation of block {index} is a {type(act).__name__}, which has no "
                f"identity rule here (known: {sorted(spec.activations)})"
            )
        layers.append(
            LayerModules(
                index=index,
                attention_projections=tuple(_get(block, p, spec.model_type) for p in spec.attention_projections),
                o_proj=_get(block, spec.o_proj, spec.model_type),
                mlp_act=act,
                mlp_out=_get(block, spec.mlp_out, spec.model_type),
                router=router,
            )
        )
        for role in spec.prunable:
            prunable.append(
                PrunableModule(
                    name=f"{spec.decoder_layers}.{index}.{role}",
                    layer=index,
                    role=role,
                    module=_weight_module(_get(block, role, spec.model_type)),
                    orientation=spec.orientation,
                )
            )

    num_heads = int(text_config.num_attention_heads)
    o_width = _in_features(layers[0].o_proj, spec.orientation)
    head_dim = o_width // num_heads
    num_kv_heads = int(getattr(text_config, "num_key_value_heads", None) or num_heads)
    if spec.qkv_layout == "heads" and num_kv_heads != num_heads:
        raise UnsupportedArchitectureError(
            f"{model_type}: a per-head fused q/k/v projection with {num_kv_heads} key/value heads for {num_heads} "
            "query heads (grouped-query attention) is not a layout the registry entry describes"
        )
    num_experts = expert_width = 0
    if spec.moe is not None:
        down = parameter(layers[0].mlp_out, spec.moe.down)  # [E, H, I]
        num_experts, expert_width = int(down.shape[0]), int(down.shape[2])
    return ResolvedArchitecture(
        spec=spec,
        model=model,
        layers=tuple(layers),
        prunable=tuple(prunable),
        activations=tuple(activations),
        norms=tuple(norms),
        token_embedding=_get(model, spec.token_embedding, spec.model_type),
        position_embedding=(_get(model, spec.position_embedding, spec.model_type) if spec.position_embedding else None),
        num_heads=num_heads,
        head_dim=head_dim,
        num_kv_heads=num_kv_heads,
        num_neurons=(
            num_experts * expert_width if spec.moe is not None else _in_features(layers[0].mlp_out, spec.orientation)
        ),
        max_positions=(
            getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
        ),
        softcaps=softcaps,
        num_experts=num_experts,
        expert_width=expert_width,
    )


#: The experts-module attributes (set by transformers' ``use_experts_implementation``) of the one layout the
#: engine's copy of the eager expert loop computes: gate|up concatenated, not transposed, no biases, no
#: post-expert norm, not split across devices (expert parallelism).
_EXPERTS_LAYOUT = MappingProxyType(
    {
        "has_gate": True,
        "has_bias": False,
        "is_transposed": False,
        "is_concatenated": True,
        "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    }
)


def _check_moe_block(block: nn.Module, index: int, spec: ArchitectureSpec) -> nn.Module:
    """Check one block's MoE MLP against the entry; return its router.

    Raises:
        UnsupportedArchitectureError: The MLP, experts or router is of another class, the MoE module has a
            child the entry does not list (a shared expert), or the experts use another weight layout.
    """
    moe = spec.moe
    assert moe is not None  # called for moe entries only
    mlp = _get(block, moe.block, spec.model_type)
    if type(mlp).__name__ != moe.block_class:
        raise UnsupportedArchitectureError(
            f"{spec.model_type}: the MLP of block {index} is a {type(mlp).__name__}, not a {moe.block_class} "
            "(dense MLP blocks between MoE blocks, e.g. mlp_only_layers or decoder_sparse_step > 1, are not a "
            "layout the registry entry describes)"
        )
    children = {name for name, _ in mlp.named_children()}
    if children != moe.block_children:
        extra = sorted(children - moe.block_children) or sorted(moe.block_children - children)
        raise UnsupportedArchitectureError(
            f"{spec.model_type}: the MoE MLP of block {index} has the parts {extra} beyond its experts and router "
            "(e.g. a shared expert), which the relevance engine does not explain"
        )
    experts = _get(block, moe.experts, spec.model_type)
    router = _get(block, moe.router, spec.model_type)
    for module, expected in ((experts, moe.experts_class), (router, moe.router_class)):
        if type(module).__name__ != expected:
            raise UnsupportedArchitectureError(
                f"{spec.model_type}: block {index} has a {type(module).__name__} where the entry expects a {expected}"
            )
    for key, value in _EXPERTS_LAYOUT.items():
        if getattr(experts, key, value) != value:
            raise UnsupportedArchitectureError(
                f"{spec.model_type}: the experts of block {index} have {key}={getattr(experts, key)!r}; the engine "
                f"explains only the layout {dict(_EXPERTS_LAYOUT)}"
            )
    return router


def _in_features(module: nn.Module, orientation: Orientation) -> int:
    weight = parameter(module)
    return int(weight.shape[1] if orientation == "linear" else weight.shape[0])
