"""Several dense fine-tunes of one base -> one stock MoE (mergekit-moe, Branch-Train-MiX).

Read and check the recipe, open every source lazily and check it matches the base, compute the
router rows (one model in memory at most), plan every output tensor with the stock conversion's
plan (`upcycle.stock_plan`; routed expert e is source e's FFN), then stream the tensors through
`upcycle.checkpoint.write_checkpoint`, one at a time.
"""

from __future__ import annotations

import sys
from pathlib import Path

from upcycle import __version__
from upcycle.checkpoint import (
    check_output_dir,
    count_parameters,
    dtype_name,
    parse_dtype,
    parse_shard_size,
    write_checkpoint,
)
from upcycle.compose.gates import cheap_embed_router_rows, hidden_router_rows
from upcycle.compose.recipe import ExpertSpec, Recipe, load_recipe, parse_recipe
from upcycle.compose.report import ComposeSummary, write_compose_card
from upcycle.compose.sources import SourceExperts, open_sources, planning_checkpoint
from upcycle.errors import UpcycleError, flag
from upcycle.families import find_family
from upcycle.families.configs import build_target_config
from upcycle.options import check_count, parse_moe_layers
from upcycle.rng import SEED_SCHEME
from upcycle.stock_plan import plan_conversion
from upcycle.summaries import active_parameters

__all__ = ["ComposeSummary", "ExpertSpec", "Recipe", "compose", "load_recipe", "parse_recipe"]


def compose(
    recipe: str | Path | dict,
    output: str | Path,
    *,
    dtype: str | None = "auto",
    layout: str | None = None,
    moe_layers: str | list[int] = "all",
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
    max_shard_size: str | int = "5GB",
    command: str | None = None,
    card_model_id: str | None = None,
) -> ComposeSummary:
    """Compose the MoE that `recipe` describes (a YAML file path, or the same as a dict) at `output`.

    Routed expert e of every MoE layer is the FFN of `experts[e].source`, bit for bit; attention,
    norms, embeddings and the head come from `base` (`non_expert: base`) or are the elementwise mean
    over the experts' distinct sources (`non_expert: average`); `shared_expert: base` makes the
    base's FFN the always-on shared expert (qwen2_moe targets). Routers: `hidden` (the base's FFN
    inputs on each expert's prompts, positive minus negative, unit norm), `cheap_embed` (the same on
    raw token embeddings), `random` (N(0, router_std^2), drawn as `upcycle.convert` draws them) or
    `kmeans` (each expert's data mean). `dtype`, `layout`, `moe_layers` and `seed` are as in
    `upcycle.convert`. The model card's usage snippet loads `card_model_id`, else `output`.

    Returns:
        A `ComposeSummary`.

    Raises:
        UpcycleError: a bad recipe, a missing source, sources that do not match the base, a target
            without the requested shared expert, or an existing output without `force`; one line,
            and nothing is left at `output` (or next to it).
    """
    output = Path(output)
    check_count("seed", seed, 0)
    out_dtype = parse_dtype(dtype)
    parse_shard_size(max_shard_size)
    plan_recipe = load_recipe(recipe)
    check_output_dir(output, force)
    opened = open_sources(plan_recipe)
    source_config = opened.base_config
    family = find_family(source_config, plan_recipe.target)
    # As convert: say once where the stock target is not exact in other engines.
    notice_applies = not family.engine_notice_field or source_config.get(family.engine_notice_field)
    if family.engine_notice and notice_applies and not quiet:
        print(f"upcycle: notice: {family.engine_notice}", file=sys.stderr)
    layout = layout or family.default_layout
    if layout not in family.layouts:
        raise UpcycleError(
            f"{family.target_model_type} has no {layout!r} layout; use {flag('layout')} {' or '.join(family.layouts)}"
        )
    if plan_recipe.shared_expert == "base" and family.shared_expert is None:
        raise UpcycleError(
            f"{plan_recipe.where}: shared_expert base needs a target with a shared expert (qwen2_moe); "
            f"{family.target_model_type} has none"
        )
    num_layers = int(source_config["num_hidden_layers"])
    selected_layers = parse_moe_layers(moe_layers, num_layers)
    if len(selected_layers) < num_layers and not family.dense_layers_field:
        raise UpcycleError(
            f"{family.target_model_type} cannot keep layers dense (every layer is MoE); use {flag('moe_layers')} all, "
            f"or a target that can (qwen2_moe, qwen3_moe)"
        )
    num_experts = len(plan_recipe.experts)
    std = float(
        plan_recipe.router_std if plan_recipe.router_std is not None else source_config.get("initializer_range", 0.02)
    )
    builder = SourceExperts(
        num_experts,
        seed=seed,
        sources=[checkpoint.tensors for checkpoint in opened.experts],
        mlp=family.dense_mlp,
        shared_base=plan_recipe.shared_expert == "base",
    )
    checkpoint = planning_checkpoint(opened, plan_recipe.non_expert, selected_layers, family.dense_mlp)
    # Plan before computing routers: the plan's shape checks are cheap, the forward pass is not.
    plan_conversion(
        checkpoint, family, builder, layout=layout, top_k=plan_recipe.top_k, dtype=out_dtype,
        router_std=std, seed=seed, moe_layers=selected_layers,
    )  # fmt: skip
    router_rows = None
    if plan_recipe.router_init in ("hidden", "kmeans"):
        router_rows = hidden_router_rows(opened.base, family, selected_layers, plan_recipe, quiet)
    elif plan_recipe.router_init == "cheap_embed":
        router_rows = cheap_embed_router_rows(opened.base, selected_layers, plan_recipe)
    plan, moe_layer_list, expert_size = plan_conversion(
        checkpoint,
        family,
        builder,
        layout=layout,
        top_k=plan_recipe.top_k,
        dtype=out_dtype,
        router_std=std,
        seed=seed,
        moe_layers=selected_layers,
        router_init="random" if router_rows is None else "kmeans",
        router_rows=router_rows,
    )
    hidden = int(source_config["hidden_size"])
    total = count_parameters(planned.spec for planned in plan)
    active = active_parameters(total, len(moe_layer_list), num_experts, plan_recipe.top_k, 3 * expert_size * hidden)
    sources = [checkpoint.name for checkpoint in opened.experts]
    settings = {
        "num_experts": num_experts,
        "top_k": plan_recipe.top_k,
        "layout": layout,
        "dtype": dtype_name(out_dtype),
        "seed": seed,
        "seed_scheme": SEED_SCHEME,
        "non_expert": plan_recipe.non_expert,
        "router_init": plan_recipe.router_init,
        **({"router_std": std} if plan_recipe.router_init == "random" else {}),
        "shared_expert": plan_recipe.shared_expert,
        "method": "compose",
    }
    recipe_data = plan_recipe.to_dict()
    for entry, name in zip(recipe_data["experts"], sources, strict=True):
        entry["resolved"] = name
    provenance = {
        "version": __version__,
        "operation": "compose",
        "source": opened.base.name,
        "source_model_type": source_config["model_type"],
        "family": family.name,
        "moe_layers": moe_layer_list,
        "base": opened.base.name,
        "sources": sources,
        **settings,
        "experts": recipe_data["experts"],
        "exact_at_init": False,
    }
    config = build_target_config(
        family,
        source_config,
        num_experts,
        plan_recipe.top_k,
        expert_size,
        provenance,
        shared_expert_size=builder.shared_size(expert_size),
        dense_layers=[layer for layer in range(num_layers) if layer not in moe_layer_list],
        # Targets that count shared experts in expert widths (glm4_moe): the base FFN is one expert wide.
        shared_experts=1 if builder.shared_size(expert_size) else 0,
    )
    if out_dtype is not None:
        config["dtype"] = dtype_name(out_dtype)
    summary = ComposeSummary(
        output=output,
        family=family.name,
        base=opened.base.name,
        sources=sources,
        source_model_type=source_config["model_type"],
        target_model_type=family.target_model_type,
        layout=layout,
        num_experts=num_experts,
        top_k=plan_recipe.top_k,
        moe_layers=moe_layer_list,
        non_expert=plan_recipe.non_expert,
        router_init=plan_recipe.router_init,
        shared_expert=plan_recipe.shared_expert,
        total_parameters=total,
        active_parameters=active,
        settings=settings,
    )
    write_checkpoint(
        output,
        weights=plan,
        config=config,
        side_files=opened.base.extra_files,
        card=lambda directory: write_compose_card(directory, summary, command=command, model_id=card_model_id),
        force=force,
        max_shard_size=max_shard_size,
        quiet=quiet,
    )
    return summary
