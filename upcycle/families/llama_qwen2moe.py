"""Llama -> Qwen2-MoE: the same decoder without q/k/v bias, which gives Llama sources shared experts.

Qwen2-MoE always has a shared expert gated by sigmoid(shared_expert_gate(x)); with no shared
expert requested it is written empty (width 0), which adds exactly zero. Used with
`--target qwen2_moe` (Mixtral stays the default target for Llama).
"""

from dataclasses import replace

from upcycle.families.base import Requirement
from upcycle.families.qwen2_qwen2moe import FAMILY as QWEN2_QWEN2MOE

FAMILY = replace(
    QWEN2_QWEN2MOE,
    name="llama->qwen2_moe",
    source_model_types=("llama",),
    # Qwen2-MoE engines (vLLM) always build q/k/v biases: write them as zeros (exact) and say so.
    overrides={**QWEN2_QWEN2MOE.overrides, "qkv_bias": True},
    zero_biases=tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.weight" for p in ("q", "k", "v")),
    extra_copied_fields=frozenset({"head_dim"}),
    engine_notice="llama.cpp's qwen2moe does not renormalise the top-k weights, so it matches transformers only "
    "with --top-k equal to --experts; vLLM runs it exactly (the Llama's q/k/v get zero biases)",
    requirements=(
        Requirement("attention_bias", False, "Qwen2-MoE has bias on q/k/v only, never on o_proj"),
        Requirement("mlp_bias", False, "Qwen2-MoE experts have no bias"),
    ),
)
