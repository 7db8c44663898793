"""OLMo 2 -> FlexOlmo: same post-norm blocks and q/k norms (OLMoE is not exact: other norms)."""

from upcycle.families.base import FamilyPair
from upcycle.families.qwen2_qwen2moe import QWEN_LAYOUTS

FAMILY = FamilyPair(
    name="olmo2->flex_olmo",
    source_model_types=("olmo2",),
    target_model_type="flex_olmo",
    target_architecture="FlexOlmoForCausalLM",
    experts_field="num_experts",
    top_k_field="num_experts_per_tok",
    expert_size_field="intermediate_size",
    layouts=QWEN_LAYOUTS,
    default_layout="per-expert",
    overrides={"norm_topk_prob": True},
    engine_notice="llama.cpp has no FlexOlmo architecture (its GGUF converter refuses it); serve this with vLLM "
    "(Transformers backend) or transformers",
)
