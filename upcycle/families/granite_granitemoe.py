"""Granite -> GraniteMoE: the multipliers carry over; experts are stored fused on disk."""

from upcycle.families.base import ExpertLayout, FamilyPair, Requirement

FAMILY = FamilyPair(
    name="granite->granitemoe",
    source_model_types=("granite",),
    target_model_type="granitemoe",
    target_architecture="GraniteMoeForCausalLM",
    experts_field="num_local_experts",
    top_k_field="num_experts_per_tok",
    expert_size_field="intermediate_size",
    layouts={
        # GraniteMoE checkpoints on the Hub are fused: input_linear = [gate; up] per expert.
        "fused": ExpertLayout(
            fused=True,
            router="model.layers.{layer}.block_sparse_moe.router.layer.weight",
            gate_up="model.layers.{layer}.block_sparse_moe.input_linear.weight",
            down="model.layers.{layer}.block_sparse_moe.output_linear.weight",
        ),
    },
    default_layout="fused",
    requirements=(Requirement("mlp_bias", False, "GraniteMoE experts have no bias"),),
    notes="GraniteMoE has no per-expert on-disk layout; its Hub format is fused.",
)
