"""The tensor plan of a MoPE export: every output tensor of the stock MoE checkpoint (dense weights
copied, expert i = W + delta_i per FFN block, the adapter's router, a placeholder shared expert
where the target always has one), computed when written (see `mope.export`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mope.errors import MoPEExportError
from mope.layer import GatedFFNBlock
from upcycle.checkpoint import PlannedTensor, TensorSpec
from upcycle.families import FamilyPair

_PROJECTIONS = ("gate", "up", "down")
_MOPE_PROJECTIONS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def is_adapted(block: nn.Module, adapter_name: str) -> bool:
    """Return True if `block` is a block-routed MoPE FFN holding the adapter `adapter_name`."""
    return isinstance(block, GatedFFNBlock) and adapter_name in block.mope_A


def plan_export(
    family: FamilyPair,
    layout: str,
    dense: dict[str, torch.Tensor],
    blocks: list[nn.Module],
    adapter_name: str,
    num_experts: int,
    out_dtype: torch.dtype,
) -> tuple[list[PlannedTensor], int]:
    """Return (the output tensors in model order, the experts' intermediate size)."""
    names = family.dense_mlp
    expert_layout = family.layouts[layout]
    mlp_names = {
        template.format(layer=layer) for layer in range(len(blocks)) for template in (names.gate, names.up, names.down)
    }
    missing = sorted(mlp_names - set(dense))
    if missing:
        raise MoPEExportError(f"the base model has no {missing[0]}; is it a {family.name} source?")

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(out_dtype) if tensor.is_floating_point() else tensor

    def planned(name: str, shape: tuple[int, ...], compute: Callable[[], torch.Tensor], dtype=out_dtype):
        return PlannedTensor(TensorSpec(name, dtype, tuple(shape)), compute)

    def copied(name: str) -> PlannedTensor:
        tensor = dense[name]
        dtype = out_dtype if tensor.is_floating_point() else tensor.dtype
        return planned(name, tuple(tensor.shape), lambda: cast(dense[name]), dtype)

    by_layer: dict[int, list[str]] = {}
    for name in dense:
        if name in mlp_names:
            continue
        layer = _layer_index(name)
        by_layer.setdefault(layer, []).append(name)
    top_level = by_layer.pop(-1, [])
    plan = [copied(name) for name in top_level if "embed" in name]
    expert_size = 0
    for layer, block in enumerate(blocks):
        plan.extend(copied(name) for name in by_layer.get(layer, []))
        weights = {p: dense[getattr(names, p).format(layer=layer)] for p in _PROJECTIONS}
        expert_size, hidden = weights["gate"].shape
        experts = _ExpertWeights(block, adapter_name, weights, num_experts)
        router = (
            block.mope_router[adapter_name].weight.detach()
            if is_adapted(block, adapter_name)
            else torch.zeros(num_experts, hidden)
        )
        plan.append(planned(expert_layout.router.format(layer=layer), (num_experts, hidden), lambda r=router: cast(r)))
        if expert_layout.fused:
            plan.append(
                planned(
                    expert_layout.gate_up.format(layer=layer),
                    (num_experts, 2 * expert_size, hidden),
                    lambda e=experts: cast(torch.cat([e.all("gate"), e.all("up")], dim=1)),
                )
            )
            plan.append(
                planned(
                    expert_layout.down.format(layer=layer),
                    (num_experts, hidden, expert_size),
                    lambda e=experts: cast(e.all("down")),
                )
            )
        else:
            for expert in range(num_experts):
                for projection in _PROJECTIONS:
                    plan.append(
                        planned(
                            getattr(expert_layout, projection).format(layer=layer, expert=expert),
                            tuple(weights[projection].shape),
                            lambda e=experts, p=projection, i=expert: cast(e.one(p, i)),
                        )
                    )
        if family.shared_expert is not None:
            plan.extend(_empty_shared_expert(family, layer, hidden, planned, out_dtype))
    plan.extend(copied(name) for name in top_level if "embed" not in name)
    return plan, expert_size


class _ExpertWeights:
    """The float32 weights of a block's experts, ``W + delta_i`` per projection, computed on demand."""

    def __init__(self, block: nn.Module, adapter_name: str, dense: dict[str, torch.Tensor], num_experts: int):
        self.block, self.adapter_name, self.dense, self.num_experts = block, adapter_name, dense, num_experts
        self.adapted = block.adapted_projections(adapter_name) if is_adapted(block, adapter_name) else ()

    def all(self, projection: str) -> torch.Tensor:
        """(E, out, in) weights of every expert on one projection."""
        weight = self.dense[projection].float().unsqueeze(0).expand(self.num_experts, -1, -1)
        if _MOPE_PROJECTIONS[projection] not in self.adapted:
            return weight.clone()
        return weight + self.block.expert_delta_weights(self.adapter_name, _MOPE_PROJECTIONS[projection]).float()

    def one(self, projection: str, expert: int) -> torch.Tensor:
        """(out, in) weight of one expert on one projection (float32 where adapted)."""
        if _MOPE_PROJECTIONS[projection] not in self.adapted:
            return self.dense[projection]
        delta = self.block.expert_delta_weights(self.adapter_name, _MOPE_PROJECTIONS[projection], expert)
        # float32(W) + float32(delta), added in place into a copy: each 64 MiB temporary costs a page fault per 4 KiB
        return self.dense[projection].to(torch.float32, copy=True).add_(delta)


def _empty_shared_expert(family: FamilyPair, layer: int, hidden: int, planned, dtype) -> list[PlannedTensor]:
    """An all-zero shared expert of the family's placeholder width and the family's gate, for targets
    that always have one (Qwen2-MoE): it adds exactly 0, and engines load it (as `upcycle convert`'s)."""
    shared, width, gate = (
        family.shared_expert,
        family.shared_expert.placeholder_width,
        family.shared_expert.gate_value(dtype),
    )
    shapes = {shared.gate: (width, hidden), shared.up: (width, hidden), shared.down: (hidden, width)}
    return [
        planned(name.format(layer=layer), shape, lambda shape=shape: torch.zeros(shape, dtype=dtype))
        for name, shape in shapes.items()
    ] + [
        planned(shared.expert_gate.format(layer=layer), (1, hidden), lambda: torch.full((1, hidden), gate, dtype=dtype))
    ]


def _layer_index(name: str) -> int:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return -1
