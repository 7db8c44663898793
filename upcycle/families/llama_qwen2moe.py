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
    overrides={**QWEN2_QWEN2MOE.overrides, "qkv_bias": False},
    extra_copied_fields=frozenset({"head_dim"}),
    engine_notice="vLLM's Qwen2-MoE always builds q/k/v biases, which a Llama source has none of (wrong logits "
    "there), and llama.cpp's qwen2moe does not renormalise top-k; to serve with them use the default "
    "--target mixtral",
    requirements=(
        Requirement("attention_bias", False, "Qwen2-MoE has bias on q/k/v only, never on o_proj"),
        Requirement("mlp_bias", False, "Qwen2-MoE experts have no bias"),
    ),
)
