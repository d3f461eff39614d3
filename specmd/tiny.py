"""Tiny MoE models of every supported family, built from config classes (no download).

Used by the tests and by ``make run`` until a trained checkpoint ships. Sizes follow DESIGN.md section 10.
"""
from __future__ import annotations

import torch

from .runtime.adapters import family_config

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DEEPSEEK = dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16)

# family -> keyword arguments of its config class (``adapters.CONFIG_CLASSES``)
TINY_CONFIGS: dict[str, dict] = {
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "deepseek_v2": dict(_DEEPSEEK, q_lora_rank=None),
    "deepseek_v3": dict(_DEEPSEEK, q_lora_rank=32, n_group=2, topk_group=1),
    "gpt_oss": dict(head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=16),
    "granitemoe": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "granitemoeshared": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                             shared_intermediate_size=64),
    "phimoe": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
}


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` with the tiny sizes (``overrides`` win)."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of: {', '.join(TINY_CONFIGS)}")
    config = family_config(family, **{**COMMON, **TINY_CONFIGS[family], **overrides})
    if family == "gpt_oss":
        config._attn_implementation = "eager"  # sliding-window attention with sinks runs in eager only
    return config


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of ``family`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype).eval()
