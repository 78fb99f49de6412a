"""Tiny random causal LMs of every supported family, built locally from configs (nothing downloaded).

Every parameter gets Gaussian noise on top of its initialisation, so norm weights are not 1 (0 for
Gemma), biases are not 0 and the weights are large enough for the activations to be non-linear:
identities that only hold for the default initialisation would fail here.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
    SmolLM3Config,
)

__all__ = [
    "FAMILIES",
    "MOE_FAMILIES",
    "EXTRA_FAMILIES",
    "EAGER_ONLY_FAMILIES",
    "KERNELS",
    "VOCAB",
    "CONTEXT",
    "tiny_config",
    "tiny_model",
    "model_from_config",
]

#: One entry per layout the engine must handle (``opt_postln`` is OPT-350m's post-LN layout with
#: ``project_in``/``project_out``).
FAMILIES = [
    "llama",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "opt",
    "opt_postln",
    "gpt2",
    "mistral",
    "phi3",
    "olmo2",
    "granite",
    "smollm3",
    "gpt_neox",
    "qwen3_moe",
    "mixtral",
    "olmoe",
]
#: The families of :data:`FAMILIES` whose MLPs are sparse mixtures of experts (neurons are expert neurons).
MOE_FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]
#: Also built by :func:`tiny_model`: Gemma 3's multimodal wrapper (a SigLIP vision tower around the
#: ``gemma3_text`` model), explained on text only.
EXTRA_FAMILIES = ["gemma3"]
#: Families whose transformers class has only the eager attention kernel here (Gemma 2: transformers
#: refuses sdpa, which cannot soft-cap the attention logits). The kernel-parametrised tests run them on
#: eager only; tests/test_families.py runs the sdpa-based collector tests for them on eager.
EAGER_ONLY_FAMILIES = ["gemma2"]
#: Attention kernels each family is built with in the tests.
KERNELS = {
    family: ("eager",) if family in EAGER_ONLY_FAMILIES else ("eager", "sdpa")
    for family in FAMILIES + EXTRA_FAMILIES + EAGER_ONLY_FAMILIES
}
#: Gemma 2's soft-capping values in the tiny config: small, so that the tanh is far from linear on
#: the tiny model's attention scores and logits (the released models use 50 and 30).
GEMMA2_ATTN_SOFTCAP = 1.5
GEMMA2_FINAL_SOFTCAP = 2.0

VOCAB = 64
CONTEXT = 64
HIDDEN = 32
FFN = 48
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
NOISE = 0.15
#: The tiny mixture of experts: 4 experts of width 12 (4 * 12 = FFN units per block), top-2 routing.
EXPERTS = 4
EXPERT_WIDTH = FFN // EXPERTS
TOP_K = 2

_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama_like(config_cls: type[PretrainedConfig], **extra: object) -> PretrainedConfig:
    """The shared tiny geometry; ``extra`` adds family keys or overrides these (a MoE's expert width)."""
    params: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        attention_dropout=0.0,
        **_SPECIAL,
    )
    return config_cls(**{**params, **extra})


def _opt(*, pre_ln: bool) -> OPTConfig:
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_dim=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=CONTEXT,
        do_layer_norm_before=pre_ln,
        word_embed_proj_dim=HIDDEN if pre_ln else HIDDEN // 2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        **_SPECIAL,
    )


def tiny_config(family: str) -> PretrainedConfig:
    """The config of :func:`tiny_model` (a fresh object; edit it freely).

    Args:
        family: One of :data:`FAMILIES`, :data:`EXTRA_FAMILIES` or :data:`EAGER_ONLY_FAMILIES`.

    Returns:
        A config with all dropout probabilities 0.
    """
    if family == "llama":
        return _llama_like(LlamaConfig, tie_word_embeddings=False)
    if family == "qwen2":  # q/k/v biases, as in every Qwen2 checkpoint
        return _llama_like(Qwen2Config, tie_word_embeddings=True, use_sliding_window=False)
    if family == "qwen3":  # per-head q_norm / k_norm
        return _llama_like(Qwen3Config, head_dim=HEAD_DIM, tie_word_embeddings=False)
    if family == "gemma3_text":  # scaled embedding, (1 + w) RMSNorms, q/k norms, a sliding-window layer
        return _llama_like(
            Gemma3TextConfig,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    if family == "gemma3":
        vision = SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )
        return Gemma3Config(
            text_config=tiny_config("gemma3_text").to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
            image_token_index=VOCAB - 1,
        )
    if family == "mistral":  # a sliding window (a mask) in every block; 5 so that 2 blocks reach all 8 test tokens
        return _llama_like(MistralConfig, sliding_window=5, tie_word_embeddings=False)
    if family == "phi3":  # fused qkv_proj (GQA) and gate_up_proj
        return _llama_like(Phi3Config, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=False)
    if family == "olmo2":  # norms after attention / MLP, q/k norms over all heads
        return _llama_like(Olmo2Config, tie_word_embeddings=False)
    if family == "granite":  # embedding / attention / residual multipliers, logits scaling (not 1)
        return _llama_like(
            GraniteConfig,
            embedding_multiplier=3.0,
            attention_multiplier=0.2,
            residual_multiplier=0.5,
            logits_scaling=2.5,
            tie_word_embeddings=True,
        )
    if family == "smollm3":  # llama-like, block 1 without RoPE (NoPE)
        return _llama_like(SmolLM3Config, no_rope_layers=[1, 0], use_sliding_window=False, tie_word_embeddings=True)
    if family == "gemma2":  # soft-capped attention logits and final logits, post-norms, a sliding window
        return _llama_like(
            Gemma2Config,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP,
            final_logit_softcapping=GEMMA2_FINAL_SOFTCAP,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    if family == "qwen3_moe":  # Qwen3 attention, a top-2 softmax router (renormalised) over 4 fused experts
        return _llama_like(
            Qwen3MoeConfig,
            head_dim=HEAD_DIM,
            moe_intermediate_size=EXPERT_WIDTH,
            num_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            experts_implementation="eager",  # the loop the engine reaches into (grouped_mm is refused)
            tie_word_embeddings=False,
        )
    if family == "mixtral":  # Mistral attention (sliding window 5, as mistral), top-2 of 4 experts, renormalised
        return _llama_like(
            MixtralConfig,
            intermediate_size=EXPERT_WIDTH,  # Mixtral's intermediate_size is the width of one expert
            num_local_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            sliding_window=5,
            router_jitter_noise=0.0,  # training-only; tests/test_moe.py sets it
            experts_implementation="eager",
            tie_word_embeddings=False,
        )
    if family == "olmoe":  # q/k norms over all heads, top-2 of 4 experts, not renormalised (as released)
        return _llama_like(
            OlmoeConfig,
            intermediate_size=EXPERT_WIDTH,  # OLMoE's intermediate_size is the width of one expert
            num_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
            clip_qkv=None,  # a clamp: refused (tests/test_moe.py)
            experts_implementation="eager",
            tie_word_embeddings=False,
        )
    if family == "gpt_neox":  # Pythia: parallel attention + MLP, partial rotary, per-head fused q|k|v
        return GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=CONTEXT,
            rotary_pct=0.5,
            use_parallel_residual=True,
            hidden_act="gelu",
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **_SPECIAL,
        )
    if family == "opt":
        return _opt(pre_ln=True)
    if family == "opt_postln":
        return _opt(pre_ln=False)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_positions=CONTEXT,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=FFN,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **_SPECIAL,
        )
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES + EXTRA_FAMILIES + EAGER_ONLY_FAMILIES}")


def model_from_config(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float64,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> PreTrainedModel:
    """Build a causal LM from ``config`` with noisy random parameters, in eval mode.

    The parameters are drawn in float32 (so every dtype holds the same model up to rounding) under a
    forked RNG (the global RNG state is left alone).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto = AutoModelForImageTextToText if config.model_type == "gemma3" else AutoModelForCausalLM
        model = auto.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(NOISE * torch.randn_like(param))
    return model.to(dtype).eval()


def tiny_model(
    family: str,
    *,
    dtype: torch.dtype = torch.float64,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` (hidden 32, 2 layers, 4 heads, vocab 64, context 64).

    Args:
        family: One of :data:`FAMILIES`, :data:`EXTRA_FAMILIES` or :data:`EAGER_ONLY_FAMILIES`.
        dtype: Parameter dtype.
        attn_implementation: One of the family's :data:`KERNELS`.
        seed: Seed of the random parameters.

    Returns:
        The model, in eval mode.
    """
    return model_from_config(tiny_config(family), dtype=dtype, attn_implementation=attn_implementation, seed=seed)
