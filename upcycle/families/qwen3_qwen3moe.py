"""Qwen3 -> Qwen3-MoE: same attention (q/k norms), experts in `mlp.experts`."""

from upcycle.families.base import FamilyPair, Requirement
from upcycle.families.qwen2_qwen2moe import QWEN_LAYOUTS

FAMILY = FamilyPair(
    name="qwen3->qwen3_moe",
    source_model_types=("qwen3",),
    target_model_type="qwen3_moe",
    target_architecture="Qwen3MoeForCausalLM",
    experts_field="num_experts",
    top_k_field="num_experts_per_tok",
    expert_size_field="moe_intermediate_size",
    layouts=QWEN_LAYOUTS,
    default_layout="per-expert",
    dense_layers_field="mlp_only_layers",
    overrides={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    extra_copied_fields=frozenset({"head_dim"}),
    # Qwen3-MoE has no per-layer attention types: a sliding-window Qwen3 would change behaviour.
    dropped_fields=frozenset({"layer_types", "max_window_layers"}),
    requirements=(Requirement("use_sliding_window", False, "Qwen3-MoE has no per-layer sliding window"),),
)
