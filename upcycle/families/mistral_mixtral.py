"""Mistral -> Mixtral: Mixtral is Mistral's MoE sibling (sliding window included)."""

from dataclasses import replace

from upcycle.families.llama_mixtral import FAMILY as LLAMA_MIXTRAL

FAMILY = replace(LLAMA_MIXTRAL, name="mistral->mixtral", source_model_types=("mistral",), requirements=())
