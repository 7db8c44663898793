"""Llama -> Mixtral: same attention, norms and rope; the MLP becomes `block_sparse_moe`."""

from upcycle.families.base import ExpertLayout, FamilyPair, Requirement

MIXTRAL_LAYOUTS = {
    "per-expert": ExpertLayout(
        fused=False,
        router="model.layers.{layer}.block_sparse_moe.gate.weight",
        gate="model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        up="model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        down="model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    ),
    "fused": ExpertLayout(
        fused=True,
        router="model.layers.{layer}.mlp.gate.weight",
        gate_up="model.layers.{layer}.mlp.experts.gate_up_proj",
        down="model.layers.{layer}.mlp.experts.down_proj",
    ),
}

FAMILY = FamilyPair(
    name="llama->mixtral",
    source_model_types=("llama",),
    target_model_type="mixtral",
    target_architecture="MixtralForCausalLM",
    experts_field="num_local_experts",
    top_k_field="num_experts_per_tok",
    expert_size_field="intermediate_size",
    layouts=MIXTRAL_LAYOUTS,
    default_layout="per-expert",
    # Mixtral always renormalises the top-k softmax weights, so identical experts are exact.
    extra_copied_fields=frozenset({"head_dim"}),
    requirements=(
        Requirement("attention_bias", False, "Mixtral attention has no bias"),
        Requirement("mlp_bias", False, "Mixtral experts have no bias"),
    ),
)
