"""config.json of a target: the source config read as transformers reads it, and a stock MoE
config built from it (every attention/norm/rope field carried over, the family's MoE fields set)."""

from __future__ import annotations

from typing import Any

from upcycle.errors import UpcycleError, flag
from upcycle.families.base import NEVER_COPIED, FamilyPair


def normalized_source_config(config: dict) -> dict:
    """Return the source config as its transformers class writes it (legacy rope fields folded into
    `rope_parameters`, every default explicit).

    Raises:
        UpcycleError: transformers does not know the model_type or rejects the config.
    """
    from transformers import AutoConfig

    fields = {key: value for key, value in config.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(config["model_type"], **fields).to_dict()
    except (ValueError, KeyError, TypeError) as err:
        raise UpcycleError(f"transformers cannot read this {config['model_type']!r} config: {err}") from None


def build_target_config(
    family: FamilyPair,
    source_config: dict,
    num_experts: int,
    top_k: int,
    expert_size: int,
    provenance: dict,
    shared_expert_size: int = 0,
    dense_layers: list[int] | None = None,
    shared_experts: int = 0,
    router_fields: dict[str, Any] | None = None,
) -> dict:
    """Return the target config.json content: the target class's full dict, source fields carried over.

    `dense_layers` (layers that keep their dense FFN) go to the family's `dense_layers_field` (as
    a count where the family keeps only leading layers dense: see `leading_dense_count`);
    `shared_experts` to its `shared_experts_field`; `router_fields` (the target's own field names,
    e.g. GLM-4-MoE's n_group) are set as given. A target that always has a shared expert gets its
    all-zero placeholder's width and count when none is asked for (0), as `stock_plan` writes it.

    Raises:
        UpcycleError: transformers rejects the resulting config, or the dense layers are not the
            leading ones where the family can only keep those.
    """
    from transformers import AutoConfig

    target_defaults = AutoConfig.for_model(family.target_model_type).to_dict()
    fields = {
        key: value
        for key, value in source_config.items()
        if key not in NEVER_COPIED
        and key not in family.dropped_fields
        and (key in target_defaults or key in family.extra_copied_fields)
    }
    fields.update(family.overrides)
    fields[family.experts_field] = num_experts
    fields[family.top_k_field] = top_k
    fields[family.expert_size_field] = expert_size
    placeholder = family.shared_expert
    if family.shared_expert_size_field:
        fields[family.shared_expert_size_field] = shared_expert_size or (
            placeholder.placeholder_width if placeholder else 0
        )
    if family.shared_experts_field:
        fields[family.shared_experts_field] = shared_experts or (placeholder.placeholder_experts if placeholder else 0)
    if family.dense_layers_leading:
        fields[family.dense_layers_field] = leading_dense_count(family, dense_layers or [])
    elif family.dense_layers_field:
        fields[family.dense_layers_field] = sorted(dense_layers or [])
    if family.rope_defaults:
        rope = dict(fields.get("rope_parameters") or {})
        fields["rope_parameters"] = {**family.rope_defaults, **rope}
    fields.update(router_fields or {})
    try:
        target = AutoConfig.for_model(family.target_model_type, **fields)
    except (ValueError, TypeError) as err:
        raise UpcycleError(f"cannot build a {family.target_model_type} config: {err}") from None
    config = target.to_dict()
    for name in family.top_level_rope_fields:
        config[name] = config["rope_parameters"][name]
    config["architectures"] = [family.target_architecture]
    config["upcycle"] = provenance
    return config


def leading_dense_count(family: FamilyPair, dense_layers: list[int]) -> int:
    """Return how many leading layers stay dense, for a family whose config can only keep the first
    layers dense (`dense_layers_leading`, e.g. GLM-4-MoE's first_k_dense_replace).

    Raises:
        UpcycleError: `dense_layers` are not layers 0..n-1 (a MoE layer comes before a dense one).
    """
    count = len(dense_layers)
    if sorted(dense_layers) != list(range(count)):
        raise UpcycleError(
            f"{family.target_model_type} keeps only its first layers dense ({family.dense_layers_field}), but the "
            f"dense layers would be {sorted(dense_layers)}; use {flag('moe_layers')} N- (every layer from N on)"
        )
    return count


def import_config_class_in_background(model_type: str) -> None:
    """Start importing transformers' config class of `model_type` on a daemon thread, and return at once.

    A merge builds its dense config.json only after the last tensor is written (it records what the layers
    computed), and `LlamaConfig`'s module pulls in transformers' kernels, accelerate and sympy: 1-2 s of one core
    with the disk idle at the end of every merge on scripts/bench/scale.py. Imported while the tensors stream, it is
    ready by then. A failure is left to the later import on the caller's thread, which raises it where it belongs.
    """
    import threading

    def load() -> None:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            CONFIG_MAPPING[model_type]
        except Exception:  # noqa: BLE001 - raised again, where it matters, by the caller's own import
            return

    threading.Thread(target=load, name="upcycle-config-import", daemon=True).start()


def build_dense_config(
    family: FamilyPair, moe_config: dict, name: str, intermediate_size: int, provenance: dict
) -> dict:
    """Return the dense config.json of `family` for the MoE config `moe_config` (of the checkpoint `name`):
    the dense class's full dict with every field it shares with the MoE.

    Attention, norm and rope fields carry over; the expert count, top-k, router and shared-expert
    fields, which the dense class does not know, fall away; the FFN width is `intermediate_size`.

    Raises:
        UpcycleError: transformers rejects the resulting config.
    """
    from transformers import AutoConfig

    dense_type = family.source_model_types[0]
    dense_defaults = AutoConfig.for_model(dense_type).to_dict()
    moe_only = {
        family.experts_field,
        family.top_k_field,
        family.expert_size_field,
        family.shared_expert_size_field,
        family.shared_experts_field,
    }
    fields = {
        key: value
        for key, value in moe_config.items()
        if key not in NEVER_COPIED and key not in moe_only and key not in family.overrides and key in dense_defaults
    }
    fields["intermediate_size"] = intermediate_size
    # What the pair required of its source holds for the dense model too (e.g. a Mistral that became a
    # GLM-4-MoE had no sliding window; the MoE config has no such field, and Mistral's default is 4096).
    fields.update({r.field: r.value for r in family.requirements if r.field in dense_defaults})
    try:
        dense = AutoConfig.for_model(dense_type, **fields)
    except (ValueError, TypeError) as err:
        raise UpcycleError(f"cannot build a {dense_type} config from {name}: {err}") from None
    config = dense.to_dict()
    config["architectures"] = [type(dense).__name__.replace("Config", "ForCausalLM")]
    config["upcycle"] = provenance
    return config
