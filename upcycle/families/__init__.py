"""The dense -> MoE family pairs, one declarative module each; `find_family` picks one."""

from __future__ import annotations

from upcycle.errors import UpcycleError
from upcycle.families import (
    granite_granitemoe,
    llama_mixtral,
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
)
TARGETS = tuple(sorted({family.target_model_type for family in FAMILIES}))


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
    raise UpcycleError(
        f"model_type {target_model_type!r} is not a supported MoE; supported: {', '.join(TARGETS)}"
    )
