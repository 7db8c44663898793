"""Dense -> stock MoE: check the options, open the source, plan every output tensor
(`upcycle.stock_plan`), then stream them through `upcycle.checkpoint.write_checkpoint`."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from upcycle import __version__
from upcycle.card import write_model_card
from upcycle.checkpoint import (
    check_free_space,
    check_output_dir,
    count_parameters,
    dtype_name,
    open_checkpoint,
    parse_dtype,
    parse_shard_size,
    write_checkpoint,
)
from upcycle.checkpoint.validate import check_architecture_matches_model_type, check_config_matches_tensors
from upcycle.errors import UpcycleError, flag
from upcycle.experts import ExpertBuilder, make_expert_builder
from upcycle.families import FamilyPair, find_family
from upcycle.families.configs import build_target_config, leading_dense_count, normalized_source_config
from upcycle.generic.convert import convert_generic, generic_requested
from upcycle.options import check_count, check_expert_groups, check_real, given_options, parse_moe_layers
from upcycle.rng import SEED_SCHEME
from upcycle.router_init import calibrated_router_rows, check_router_init
from upcycle.stock_plan import plan_conversion
from upcycle.summaries import ConvertSummary, active_parameters

__all__ = ["ConvertSummary", "convert"]


def _estimated_output_bytes(checkpoint, family, builder, layers: list[int], out_dtype) -> int:
    """Return about how many bytes the output's tensors take: the source's, plus each MoE layer's
    routed experts in place of its dense FFN (shared experts and routers are small and ignored)."""
    tensors = checkpoint.tensors
    total = 0
    for name in tensors.keys():
        dtype = tensors.dtype(name)
        size = (out_dtype if out_dtype is not None and dtype.is_floating_point else dtype).itemsize
        total += math.prod(tensors.shape(name)) * size
    gate = family.dense_mlp.gate.format(layer=layers[0])
    if gate not in tensors:
        return total
    intermediate, hidden = tensors.shape(gate)
    size = (out_dtype or tensors.dtype(gate)).itemsize
    routed = builder.routed_experts() * builder.expert_size(intermediate)
    return total + len(layers) * 3 * hidden * size * max(routed - intermediate, 0)


def _grouped_router(
    family: FamilyPair, builder: ExpertBuilder, top_k: int, expert_groups: int | None, top_groups: int | None
) -> tuple[dict, dict]:
    """Return (the target config's grouped-router fields, the settings to record) for a family with
    a grouped sigmoid router; ({}, {}) for others.

    Raises:
        UpcycleError: groups that do not split the experts into groups of whole FFN copies of at
            least 2 experts, or too few chosen groups for top-k (`upcycle.options.check_expert_groups`).
    """
    fields = family.grouped_router
    if fields is None:
        return {}, {}
    groups = expert_groups or 1
    chosen = top_groups or groups
    experts, routed_top_k = builder.routed_experts(), builder.routed_top_k(top_k)
    check_expert_groups(groups, chosen, experts, routed_top_k, builder.router_groups(), builder.num_experts)
    scaling = builder.routed_scaling
    config = {fields.groups: groups, fields.top_groups: chosen, fields.routed_scaling: scaling}
    return config, {"expert_groups": groups, "top_groups": chosen, "routed_scaling": scaling}


def convert(
    source: str | Path,
    output: str | Path,
    *,
    experts: int = 8,
    top_k: int = 2,
    target: str = "auto",
    layout: str | None = None,
    dtype: str | None = "auto",
    seed: int = 0,
    router_std: float | None = None,
    force: bool = False,
    quiet: bool = False,
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    command: str | None = None,
    card_model_id: str | None = None,
    method: str = "copy",
    noise: float = 0.0,
    drop_ratio: float | None = None,
    granularity: int | None = None,
    granular_scaling: str = "paper",
    partition_method: str | None = None,
    shared_experts: int = 0,
    router_init: str | None = None,
    calibration: str | Path | None = None,
    calibration_samples: int = 128,
    calibration_max_length: int = 256,
    calibration_tokens: int = 4096,
    moe_layers: str | list[int] = "all",
    router: str = "topk",
    router_options: dict | None = None,
    ffn_pattern: str | None = None,
    expert_groups: int | None = None,
    top_groups: int | None = None,
    routed_scaling: float | None = None,
) -> ConvertSummary:
    """Upcycle the dense checkpoint `source` (local dir or Hub id) into a stock MoE checkpoint at `output`.

    `target="generic"` (or "auto" for a source with no exact stock pair, or with `router` other
    than "topk", `router_options` or `ffn_pattern`) writes the generic format instead: see
    `upcycle.generic.convert_generic`.

    `method` builds the experts from each dense FFN (see `upcycle.experts`): "copy" (default; with
    `noise`), "drop" (`drop_ratio`), "granular" (`granularity`, `granular_scaling`; `experts` and
    `top_k` count FFN copies, the output has experts * G experts and top-k * G) or "partition"
    (`partition_method`; `experts` disjoint neuron groups). `shared_experts` moves part of the FFN
    into an always-on shared expert (targets with one: qwen2_moe, glm4_moe). `router_init` (default "random",
    "centroids" for partition) is "random" (N(0, router_std^2), router_std defaulting to the
    source's initializer_range), "kmeans" (centroids of the FFN inputs the dense model produces on
    `calibration`: a local text/jsonl/parquet file or a Hub dataset id; `calibration_samples`
    texts, at most `calibration_tokens` sampled tokens per layer) or "centroids" (partition only).
    `moe_layers` ("all", "every:N" = layers N-1, 2N-1, ..., or "0,4,8" / "0-3" / "2-") picks the
    layers that become MoE, for targets that can keep others dense (glm4_moe: only leading ones).
    `expert_groups` (default 1), `top_groups` (default: all groups) and `routed_scaling` (default
    1) set a grouped sigmoid router's fields (glm4_moe); with "granular" each group holds whole
    FFN copies, so top-k still picks whole copies.

    With "copy" and no noise the output reproduces the source's logits until it is trained; see
    README for what each other method computes at init. The output is written to a temporary
    directory next to `output` and renamed at the end.
    The model card's usage snippet loads `card_model_id` (the Hub repo it will be pushed to), else `output`.

    Returns:
        A `ConvertSummary` with the output path, family, parameter counts and settings.

    Raises:
        UpcycleError: bad settings, an unsupported or unreadable source, or an existing output
            without `force`. Nothing is left at `output` (or next to it) when it raises.
    """
    output = Path(output)
    check_count("experts", experts)
    check_count("top_k", top_k, 1, experts)
    check_count("seed", seed, 0)
    check_count("calibration_samples", calibration_samples)
    check_count("calibration_max_length", calibration_max_length)
    check_count("calibration_tokens", calibration_tokens)
    check_count("shared_experts", shared_experts, 0)
    check_real("noise", noise, minimum=0.0)
    if router_std is not None:
        check_real("router_std", router_std, minimum=0.0)
    if drop_ratio is not None:
        check_real("drop_ratio", drop_ratio, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    if granularity is not None:
        check_count("granularity", granularity)
    for name, count in (("expert_groups", expert_groups), ("top_groups", top_groups)):
        if count is not None:
            check_count(name, count)
    if routed_scaling is not None:
        check_real("routed_scaling", routed_scaling, minimum=0.0, exclusive_minimum=True)
    out_dtype = parse_dtype(dtype)
    parse_shard_size(max_shard_size)
    check_output_dir(output, force)

    checkpoint = open_checkpoint(source, revision=revision)
    check_architecture_matches_model_type(checkpoint.config, checkpoint.name)
    stock_only = {
        "layout": layout is not None,
        "method": method != "copy",
        "noise": noise > 0,
        "shared_experts": shared_experts > 0,
        "router_init": router_init is not None,
        "router_std": router_std is not None,
        "moe_layers": moe_layers != "all",
        "expert_groups": expert_groups is not None,
        "top_groups": top_groups is not None,
        "routed_scaling": routed_scaling is not None,
    }
    generic_options = {"router": router, "router_options": router_options, "ffn_pattern": ffn_pattern}
    if generic_requested(target, checkpoint.config, **generic_options, stock_options=stock_only, quiet=quiet):
        return convert_generic(
            source,
            output,
            experts=experts,
            top_k=top_k,
            **generic_options,
            dtype=dtype,
            seed=seed,
            force=force,
            quiet=quiet,
            revision=revision,
            command=command,
            card_model_id=card_model_id,
        )
    source_config = normalized_source_config(checkpoint.config)
    family = find_family(source_config, target)
    notice_applies = not family.engine_notice_field or source_config.get(family.engine_notice_field)
    if family.engine_notice and notice_applies and not quiet:
        print(f"upcycle: notice: {family.engine_notice}", file=sys.stderr)
    check_config_matches_tensors(checkpoint, source_config)
    layout = layout or family.default_layout
    if layout not in family.layouts:
        raise UpcycleError(
            f"{family.target_model_type} has no {layout!r} layout; use {flag('layout')} {' or '.join(family.layouts)}"
        )
    std = float(router_std if router_std is not None else source_config.get("initializer_range", 0.02))
    num_layers = int(source_config["num_hidden_layers"])
    selected_layers = parse_moe_layers(moe_layers, num_layers)
    if len(selected_layers) < num_layers and not family.dense_layers_field:
        raise UpcycleError(
            f"{family.target_model_type} cannot keep layers dense (every layer is MoE); use {flag('moe_layers')} all, "
            f"or a target that can (qwen2_moe, qwen3_moe)"
        )
    dense_layers = [layer for layer in range(num_layers) if layer not in selected_layers]
    if family.dense_layers_leading:
        leading_dense_count(family, dense_layers)
    if shared_experts and family.shared_expert is None:
        raise UpcycleError(
            f"{family.target_model_type} has no shared expert; "
            f"drop {flag('shared_experts')} or use {flag('target')} qwen2_moe"
        )
    grouping = given_options({name: stock_only[name] for name in ("expert_groups", "top_groups", "routed_scaling")})
    if grouping and family.grouped_router is None:
        raise UpcycleError(
            f"{family.target_model_type} has no grouped sigmoid router; drop {', '.join(grouping)} "
            f"or use {flag('target')} glm4_moe"
        )
    builder = make_expert_builder(
        method,
        experts,
        seed=seed,
        shared_experts=shared_experts,
        noise=noise,
        drop_ratio=drop_ratio,
        granularity=granularity,
        granular_scaling=granular_scaling,
        partition_method=partition_method,
        routed_scaling=1.0 if routed_scaling is None else routed_scaling,
    )
    router_fields, router_settings = _grouped_router(family, builder, top_k, expert_groups, top_groups)
    router_init = check_router_init(router_init, builder, calibration)
    # Before planning (a plan of 100000 experts takes long to build): refuse what the disk cannot hold.
    check_free_space(output, _estimated_output_bytes(checkpoint, family, builder, selected_layers, out_dtype))
    router_rows = None
    if router_init == "kmeans":
        router_rows = calibrated_router_rows(
            checkpoint,
            family,
            selected_layers,
            builder.routed_experts() // builder.router_groups(),
            std,
            seed,
            calibration,
            samples=calibration_samples,
            max_length=calibration_max_length,
            max_tokens=calibration_tokens,
            quiet=quiet,
        )
    plan, moe_layer_list, expert_size = plan_conversion(
        checkpoint,
        family,
        builder,
        layout=layout,
        top_k=top_k,
        dtype=out_dtype,
        router_std=std,
        seed=seed,
        moe_layers=selected_layers,
        router_init=router_init,
        router_rows=router_rows,
    )
    num_experts, routed_top_k = builder.routed_experts(), builder.routed_top_k(top_k)
    dense_size = expert_size * builder.units()
    hidden = int(source_config["hidden_size"])
    total = count_parameters(planned.spec for planned in plan)
    active = active_parameters(total, len(moe_layer_list), num_experts, routed_top_k, 3 * expert_size * hidden)
    settings = {
        "num_experts": num_experts,
        "top_k": routed_top_k,
        "layout": layout,
        "dtype": dtype_name(out_dtype),
        "seed": seed,
        "seed_scheme": SEED_SCHEME,
        "router_init": router_init,
        "router_std": std,
        **builder.settings(),
        **router_settings,
        "exact_at_init": builder.exact_at_init(),
    }
    if method in ("granular", "partition"):
        settings["requested_experts"], settings["requested_top_k"] = experts, top_k
    if router_init == "kmeans":
        settings["calibration"] = str(calibration)
        settings["calibration_samples"] = calibration_samples
    provenance = {
        "version": __version__,
        "operation": "upcycle",
        "source": checkpoint.name,
        "source_model_type": source_config["model_type"],
        "family": family.name,
        "moe_layers": moe_layer_list,
        **settings,
    }
    config = build_target_config(
        family,
        source_config,
        num_experts,
        routed_top_k,
        expert_size,
        provenance,
        shared_expert_size=builder.shared_size(dense_size),
        dense_layers=[layer for layer in range(num_layers) if layer not in moe_layer_list],
        shared_experts=shared_experts,
        router_fields=router_fields,
    )
    if out_dtype is not None:
        config["dtype"] = dtype_name(out_dtype)
    summary = ConvertSummary(
        output=output,
        family=family.name,
        source=checkpoint.name,
        source_model_type=source_config["model_type"],
        target_model_type=family.target_model_type,
        layout=layout,
        num_experts=num_experts,
        top_k=routed_top_k,
        moe_layers=moe_layer_list,
        total_parameters=total,
        active_parameters=active,
        settings=settings,
    )
    write_checkpoint(
        output,
        weights=plan,
        config=config,
        side_files=checkpoint.extra_files,
        card=lambda directory: write_model_card(directory, summary, command=command, model_id=card_model_id),
        force=force,
        max_shard_size=max_shard_size,
        quiet=quiet,
    )
    return summary
