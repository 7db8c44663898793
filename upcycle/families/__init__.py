"""The dense -> MoE family pairs, one declarative module each; `find_family` picks one."""

from __future__ import annotations

from upcycle.errors import UpcycleError
from upcycle.families import (
    glm4moe,
    granite_granitemoe,
    llama_mixtral,
    llama_qwen2moe,
    mistral_mixtral,
    olmo2_flexolmo,
    qwen2_qwen2moe,
    qwen3_qwen3moe,
)
from upcycle.families.base import FamilyPair

FAMILIES: tuple[FamilyPair, ...] = (
    llama_mixtral.FAMILY,
    mistral_mixtral.FAMILY,
    qwen2_qwen2moe.FAMILY,
    qwen3_qwen3moe.FAMILY,
    granite_granitemoe.FAMILY,
    olmo2_flexolmo.FAMILY,
    # After the natural pairs: `--target auto` keeps Llama -> Mixtral; `--target qwen2_moe` picks it.
    llama_qwen2moe.FAMILY,
    # DeepSeek-V3-style routing on GQA attention, only with `--target glm4_moe`.
    *glm4moe.FAMILIES,
)
TARGETS = tuple(sorted({family.target_model_type for family in FAMILIES}))

# Merging (MoE -> dense) runs the pairs in reverse. A MoE type several pairs write maps back to
# this dense type unless the checkpoint's `upcycle` provenance names its pair: Mixtral is Mistral's
# MoE sibling (same sliding-window field), so a foreign Mixtral becomes a Mistral.
MERGE_DENSE_DEFAULTS = {"mixtral": "mistral"}


def supported_pairs() -> str:
    """Return the supported pairs as one human-readable line."""
    return ", ".join(family.name for family in FAMILIES)


def find_family(source_config: dict, target: str = "auto") -> FamilyPair:
    """Return the family pair converting a model with `source_config` to `target` ("auto": the natural one).

    Raises:
        UpcycleError: no pair for that source/target, or the source uses a feature the target
            cannot express (e.g. a Llama with attention bias).
    """
    model_type = source_config.get("model_type")
    candidates = [
        family
        for family in FAMILIES
        if model_type in family.source_model_types and target in ("auto", family.target_model_type)
    ]
    if not candidates:
        wanted = "" if target == "auto" else f" -> {target}"
        raise UpcycleError(
            f"no exact stock MoE counterpart for model_type {model_type!r}{wanted}; supported pairs: "
            f"{supported_pairs()}"
        )
    family = candidates[0]
    for requirement in family.requirements:
        value = source_config.get(requirement.field, requirement.value)
        if value != requirement.value:
            raise UpcycleError(
                f"{model_type} with {requirement.field}={value!r} cannot become {family.target_model_type} "
                f"exactly ({requirement.reason}); supported pairs: {supported_pairs()}"
            )
    return family


def find_family_by_target(target_model_type: str) -> FamilyPair:
    """Return the first family pair whose target is `target_model_type` (used to read MoE checkpoints).

    Raises:
        UpcycleError: no family writes that model type.
    """
    for family in FAMILIES:
        if family.target_model_type == target_model_type:
            return family
    raise UpcycleError(f"model_type {target_model_type!r} is not a supported MoE; supported: {', '.join(TARGETS)}")


def find_family_for_moe(moe_config: dict) -> FamilyPair:
    """Return the pair whose MoE side is `moe_config` (used by merging to go back to the dense side).

    The pair named in the config's `upcycle` provenance wins (a Mixtral upcycled from a Llama goes
    back to Llama); otherwise `MERGE_DENSE_DEFAULTS`, else the first pair writing that model type.

    Raises:
        UpcycleError: the config is a dense model of a supported pair, or not a supported MoE.
    """
    model_type = moe_config.get("model_type")
    provenance = moe_config.get("upcycle") or {}
    for family in FAMILIES:
        if family.name == provenance.get("family") and family.target_model_type == model_type:
            return family
    if model_type in MERGE_DENSE_DEFAULTS:
        dense = MERGE_DENSE_DEFAULTS[model_type]
        return next(f for f in FAMILIES if f.target_model_type == model_type and dense in f.source_model_types)
    if any(model_type in family.source_model_types for family in FAMILIES):
        raise UpcycleError(
            f"model_type {model_type!r} is a dense model, not a MoE; merge takes a MoE checkpoint "
            f"({', '.join(TARGETS)}); use `upcycle convert` to go from dense to MoE"
        )
    return find_family_by_target(model_type)
