"""Mistral -> Mixtral: Mixtral is Mistral's MoE sibling (sliding window included)."""

from dataclasses import replace

from upcycle.families.llama_mixtral import FAMILY as LLAMA_MIXTRAL

FAMILY = replace(
    LLAMA_MIXTRAL,
    name="mistral->mixtral",
    source_model_types=("mistral",),
    requirements=(),
    engine_notice="llama.cpp runs Mixtral without a sliding window: with a sliding_window source it matches "
    "transformers only on sequences shorter than the window; vLLM runs it exactly",
    engine_notice_field="sliding_window",
)
