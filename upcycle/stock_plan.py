"""The plan of a dense -> stock MoE conversion: every output tensor (name, dtype, shape) in write
order, and how to compute each from lazily read source tensors when it is written."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from upcycle.checkpoint import PlannedTensor, SourceCheckpoint, TensorSpec
from upcycle.errors import UpcycleError, flag
from upcycle.experts import ExpertBuilder, LazyFFN
from upcycle.families import FamilyPair
from upcycle.router_init import centroid_router, random_router, virtual_group_router

GROUPED_MM_ALIGNMENT = 16  # bytes: torch grouped_mm needs expert weight rows aligned to this


def _dense_mlp_layers(checkpoint: SourceCheckpoint, family: FamilyPair, num_layers: int) -> list[int]:
    names = family.dense_mlp
    layers = []
    for layer in range(num_layers):
        present = [
            template.format(layer=layer) in checkpoint.tensors for template in (names.gate, names.up, names.down)
        ]
        if all(present):
            layers.append(layer)
        elif any(present):
            raise UpcycleError(f"layer {layer} of {checkpoint.name} has an incomplete MLP (gate/up/down missing)")
    if not layers:
        raise UpcycleError(
            f"{checkpoint.name} has no dense MLP tensors named like {names.gate!r}; is it a {family.name} source?"
        )
    return layers


def plan_conversion(
    checkpoint: SourceCheckpoint,
    family: FamilyPair,
    builder: ExpertBuilder,
    *,
    layout: str,
    top_k: int,
    dtype: torch.dtype | None,
    router_std: float,
    seed: int,
    moe_layers: list[int] | None = None,
    router_init: str = "random",
    router_rows: dict[int, torch.Tensor] | None = None,
) -> tuple[list[PlannedTensor], list[int], int]:
    """Return (planned output tensors in write order, MoE layer indices, routed expert width).

    `moe_layers` (default: every layer with a dense MLP) become MoE layers; the others keep their
    dense MLP. `router_init` is "random" (N(0, router_std^2)), "kmeans" (rows from `router_rows`,
    one (rows, hidden) tensor per MoE layer, computed from calibration data) or "centroids" (the
    partition builder's neuron-cluster centroids). Granular builders repeat each row over a
    virtual group. A grouped router (GLM-4-MoE) also gets its selection bias, float32 zeros (as
    the target keeps it), after its weight. Each tensor is computed when written, from lazily
    read inputs.

    Raises:
        UpcycleError: the checkpoint's MLP tensors are missing or shaped unexpectedly, or a
            requested MoE layer has no dense MLP.
    """
    tensors = checkpoint.tensors
    names = family.dense_mlp
    expert_layout = family.layouts[layout]
    num_layers = int(checkpoint.config["num_hidden_layers"])
    mlp_layers = _dense_mlp_layers(checkpoint, family, num_layers)
    if moe_layers is None:
        moe_layers = mlp_layers
    elif not set(moe_layers) <= set(mlp_layers):
        missing = sorted(set(moe_layers) - set(mlp_layers))
        raise UpcycleError(f"{flag('moe_layers')} names layers without a dense MLP: {missing}")
    mlp_names = {
        template.format(layer=layer) for layer in moe_layers for template in (names.gate, names.up, names.down)
    }

    def output_dtype(name: str) -> torch.dtype:
        source = tensors.dtype(name)
        return dtype if dtype is not None and source.is_floating_point else source

    def copy(name: str, out_dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        return lambda: tensors.get(name).to(out_dtype)

    plan: list[PlannedTensor] = []
    layer_of = re.compile(r"\.layers\.(\d+)\.")
    copied: dict[int, list[str]] = {}
    for name in tensors.keys():
        if name in mlp_names or any(name.endswith(suffix) for suffix in family.ignored_source_tensors):
            continue
        match = layer_of.search(name)
        copied.setdefault(int(match.group(1)) if match else -1, []).append(name)

    def add_copies(key: int) -> None:
        for name in copied.get(key, []):
            out_dtype = output_dtype(name)
            plan.append(PlannedTensor(TensorSpec(name, out_dtype, tensors.shape(name)), copy(name, out_dtype)))
        for template in family.zero_biases if key >= 0 else ():
            weight = template.format(layer=key)
            bias = weight.removesuffix(".weight") + ".bias"
            if weight in tensors and bias not in tensors:
                spec = TensorSpec(bias, output_dtype(weight), (tensors.shape(weight)[0],))
                plan.append(PlannedTensor(spec, lambda spec=spec: torch.zeros(spec.shape, dtype=spec.dtype)))

    def router_weights(layer: int, hidden: int, dense: LazyFFN) -> torch.Tensor:
        groups = builder.router_groups()
        if router_init == "kmeans":
            rows = router_rows[layer]
        elif router_init == "centroids":
            rows = centroid_router(builder.centroid_rows(layer, dense))
        else:
            rows = random_router(builder.routed_experts() // groups, hidden, router_std, seed, layer)
        return virtual_group_router(rows, groups)

    expert_size = None
    num_experts = builder.routed_experts()
    # Write order follows the model: embeddings, the layers in turn, then final norm and head.
    top_level = copied.pop(-1, [])
    copied[-1] = [name for name in top_level if "embed" in name]
    add_copies(-1)
    for layer in range(num_layers):
        add_copies(layer)
        if layer not in moe_layers:
            continue
        gate_name, up_name, down_name = (t.format(layer=layer) for t in (names.gate, names.up, names.down))
        intermediate, hidden = tensors.shape(gate_name)
        if tensors.shape(up_name) != (intermediate, hidden) or tensors.shape(down_name) != (
            hidden,
            intermediate,
        ):
            raise UpcycleError(f"layer {layer}: gate/up/down shapes do not match a gated FFN")
        expert_size = builder.expert_size(intermediate)
        weight_dtype = output_dtype(gate_name)
        row_bytes = expert_size * torch.empty((), dtype=weight_dtype).element_size()
        dtype_name = str(weight_dtype).removeprefix("torch.")
        if row_bytes % GROUPED_MM_ALIGNMENT:
            # transformers runs experts with grouped_mm, which rejects rows not 16-byte aligned.
            raise UpcycleError(
                f"routed experts would be {expert_size} neurons wide ({row_bytes} bytes per row in {dtype_name}), "
                f"which transformers' grouped matmul cannot run (rows must be a multiple of {GROUPED_MM_ALIGNMENT} "
                f"bytes); choose {flag('experts')}/{flag('granularity')}/{flag('shared_experts')} "
                "that give a width divisible by 8"
            )
        layer_names = dict(zip(("gate", "up", "down"), (gate_name, up_name, down_name), strict=True))
        dense = LazyFFN(lambda projection, _names=layer_names: tensors.get(_names[projection]), intermediate)

        router_name = expert_layout.router.format(layer=layer)
        plan.append(
            PlannedTensor(
                TensorSpec(router_name, weight_dtype, (num_experts, hidden)),
                lambda layer=layer, hidden=hidden, dense=dense, d=weight_dtype: router_weights(layer, hidden, dense).to(
                    d
                ),
            )
        )
        if family.grouped_router is not None:
            spec = TensorSpec(family.grouped_router.bias.format(layer=layer), torch.float32, (num_experts,))
            plan.append(PlannedTensor(spec, lambda spec=spec: torch.zeros(spec.shape, dtype=spec.dtype)))
        plan.extend(_expert_tensors(builder, expert_layout, layer, hidden, expert_size, weight_dtype, dense))
        if family.shared_expert is not None:
            plan.extend(_shared_expert(family, builder, layer, hidden, weight_dtype, dense))
    copied[-1] = [name for name in top_level if "embed" not in name]
    add_copies(-1)
    return plan, moe_layers, expert_size


def _expert_tensors(builder, expert_layout, layer, hidden, expert_size, weight_dtype, dense) -> list[PlannedTensor]:
    experts = range(builder.routed_experts())

    def one(projection: str, expert: int) -> Callable[[], torch.Tensor]:
        return lambda: builder.projection(projection, layer, expert, dense).to(weight_dtype)

    if expert_layout.fused:

        def gate_up() -> torch.Tensor:
            stacked = torch.empty(len(experts), 2 * expert_size, hidden, dtype=weight_dtype)
            for expert in experts:
                stacked[expert, :expert_size] = one("gate", expert)()
                stacked[expert, expert_size:] = one("up", expert)()
            return stacked

        def down() -> torch.Tensor:
            return torch.stack([one("down", expert)() for expert in experts])

        return [
            PlannedTensor(
                TensorSpec(
                    expert_layout.gate_up.format(layer=layer),
                    weight_dtype,
                    (len(experts), 2 * expert_size, hidden),
                ),
                gate_up,
            ),
            PlannedTensor(
                TensorSpec(expert_layout.down.format(layer=layer), weight_dtype, (len(experts), hidden, expert_size)),
                down,
            ),
        ]
    planned = []
    for expert in experts:
        for projection, template, shape in (
            ("gate", expert_layout.gate, (expert_size, hidden)),
            ("up", expert_layout.up, (expert_size, hidden)),
            ("down", expert_layout.down, (hidden, expert_size)),
        ):
            name = template.format(layer=layer, expert=expert)
            planned.append(PlannedTensor(TensorSpec(name, weight_dtype, shape), one(projection, expert)))
    return planned


def _shared_expert(
    family: FamilyPair, builder: ExpertBuilder, layer: int, hidden: int, weight_dtype: torch.dtype, dense: LazyFFN
) -> list[PlannedTensor]:
    """The shared expert (the builder's shared neurons, down_proj times the family's `down_scale`) and its
    sigmoid gate where the family has one; without shared experts, for targets that always have one, an
    all-zero placeholder of the family's placeholder width (it adds exactly zero; width 0 where the
    engines accept it).

    The gate must give sigmoid(gate . x) == 0.5 for every x. All zeros does in transformers and vLLM,
    but llama.cpp's qwen2moe graph computes that sigmoid as silu(z) / z, which is 0/0 = NaN at z = 0
    (every logit NaN). So every entry is a tiny power of two instead: 2^-64, which makes z so small
    that sigmoid(z) rounds to exactly 0.5 in float32 and bfloat16 (|z| < 2^-25) while z stays a
    normal float32 (llama.cpp keeps this gate in float32). float16 cannot hold 2^-64; it gets its
    smallest value 2^-24: exact when run in float16 while |sum(x)| < 2^14, within about
    2^-26 * |sum(x)| of 0.5 when upcast to float32.
    """
    shared = family.shared_expert
    width = builder.shared_size(dense.size)
    placeholder = width == 0 and (shared.placeholder_width > 0 or shared.placeholder_experts > 0)
    if placeholder:
        width = shared.placeholder_width or shared.placeholder_experts * builder.expert_size(dense.size)
    gate_value = shared.gate_value(weight_dtype)

    def projection(name: str) -> torch.Tensor:
        if placeholder:
            return torch.zeros((hidden, width) if name == "down" else (width, hidden), dtype=weight_dtype)
        weight = builder.shared_projection(name, dense)
        if name == "down" and shared.down_scale != 1.0:
            return (weight.float() * shared.down_scale).to(weight_dtype)
        return weight.to(weight_dtype)

    planned = [
        PlannedTensor(
            TensorSpec(template.format(layer=layer), weight_dtype, shape),
            lambda name=name: projection(name),
        )
        for name, template, shape in (
            ("gate", shared.gate, (width, hidden)),
            ("up", shared.up, (width, hidden)),
            ("down", shared.down, (hidden, width)),
        )
    ]
    if shared.expert_gate:
        planned.append(
            PlannedTensor(
                TensorSpec(shared.expert_gate.format(layer=layer), weight_dtype, (1, hidden)),
                lambda: torch.full((1, hidden), gate_value, dtype=weight_dtype),
            )
        )
    return planned
