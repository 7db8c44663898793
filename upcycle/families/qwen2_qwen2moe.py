"""Qwen2 -> Qwen2-MoE, with an optional shared expert.

Qwen2-MoE always has a shared expert gated by sigmoid(shared_expert_gate(x)). With no shared
expert requested it is written empty (width 0), which adds exactly zero.
"""

from upcycle.families.base import ExpertLayout, FamilyPair, Requirement, SharedExpertNames

QWEN_LAYOUTS = {
    "per-expert": ExpertLayout(
        fused=False,
        router="model.layers.{layer}.mlp.gate.weight",
        gate="model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
        up="model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
        down="model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
    ),
    "fused": ExpertLayout(
        fused=True,
        router="model.layers.{layer}.mlp.gate.weight",
        gate_up="model.layers.{layer}.mlp.experts.gate_up_proj",
        down="model.layers.{layer}.mlp.experts.down_proj",
    ),
}

FAMILY = FamilyPair(
    name="qwen2->qwen2_moe",
    source_model_types=("qwen2",),
    target_model_type="qwen2_moe",
    target_architecture="Qwen2MoeForCausalLM",
    engine_notice="llama.cpp's qwen2moe does not renormalise the top-k weights, so it matches transformers only "
    "with --top-k equal to --experts; vLLM runs it exactly",
    experts_field="num_experts",
    top_k_field="num_experts_per_tok",
    expert_size_field="moe_intermediate_size",
    layouts=QWEN_LAYOUTS,
    default_layout="per-expert",
    shared_expert=SharedExpertNames(
        gate="model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
        up="model.layers.{layer}.mlp.shared_expert.up_proj.weight",
        down="model.layers.{layer}.mlp.shared_expert.down_proj.weight",
        expert_gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
        placeholder_width=64,
    ),
    shared_expert_size_field="shared_expert_intermediate_size",
    # Qwen2 always has q/k/v bias; Qwen2-MoE makes it a field.
    dense_layers_field="mlp_only_layers",
    overrides={"norm_topk_prob": True, "qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    requirements=(Requirement("attention_bias", False, "Qwen2-MoE has bias on q/k/v only"),),
)
