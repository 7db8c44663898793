"""Reading a stock MoE checkpoint for merging: its family pair, on-disk layout, MoE layers and experts.

The family tables are read in reverse: the pair's MoE side tells which tensors are the router,
the experts (per-expert or fused, detected from the tensor names) and the shared expert; its dense
side tells the names and config class to write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.checkpoint import SourceCheckpoint, open_checkpoint
from upcycle.errors import UpcycleError
from upcycle.families import find_family_for_moe
from upcycle.families.base import ExpertLayout, FamilyPair

PROJECTIONS = ("gate", "up", "down")


def _common_prefix(*templates: str) -> str:
    prefix = os.path.commonprefix(list(templates))
    return prefix[: prefix.rfind(".") + 1]


@dataclass
class MoESource:
    """An opened MoE checkpoint and what merging needs to know about it."""

    checkpoint: SourceCheckpoint
    config: dict
    family: FamilyPair
    layout_name: str
    layout: ExpertLayout
    num_experts: int
    top_k: int
    expert_size: int
    hidden_size: int
    shared_size: int
    moe_layers: list[int]

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def block_prefix(self, layer: int) -> str:
        """Return the name prefix of the layer's MoE block on disk (e.g. `model.layers.0.mlp.`)."""
        templates = [self.layout.router, self.layout.down]
        return _common_prefix(*(t.format(layer=layer, expert=0) for t in templates))

    def module_name(self, layer: int) -> str:
        """Return the module name of the layer's sparse MoE block once loaded in transformers 5.

        transformers keeps experts fused in memory under the names of the family's fused layout.
        """
        fused = self.family.layouts.get("fused", self.layout)
        return _common_prefix(fused.router.format(layer=layer), fused.down.format(layer=layer)).rstrip(".")

    def projection_tensor_names(self, layer: int) -> dict[str, list[str]]:
        """Return, per projection (gate, up, down), the on-disk tensors holding the layer's routed experts:
        one per expert (per-expert layouts), or the one fused tensor (gate and up share `gate_up`)."""
        layout = self.layout
        if layout.fused:
            gate_up = layout.gate_up.format(layer=layer)
            return {"gate": [gate_up], "up": [gate_up], "down": [layout.down.format(layer=layer)]}
        templates = {"gate": layout.gate, "up": layout.up, "down": layout.down}
        return {p: [t.format(layer=layer, expert=e) for e in range(self.num_experts)] for p, t in templates.items()}

    def expert_read_order(self, layer: int) -> list[str]:
        """Return the on-disk names of the layer's routed expert tensors in the order a merge uses them:
        all gates, all ups, all downs (per-expert layouts), or gate_up then down (fused)."""
        names = self.projection_tensor_names(layer)
        return list(dict.fromkeys(name for projection in PROJECTIONS for name in names[projection]))

    def expert_tensor_names(self, layer: int) -> list[str]:
        """Return the on-disk names of the layer's router, its selection bias (DeepSeek-V3-style routers)
        and its routed expert tensors."""
        bias = self.selection_bias_name(layer)
        return [self.layout.router.format(layer=layer), *([bias] if bias else []), *self.expert_read_order(layer)]

    def selection_bias_name(self, layer: int) -> str | None:
        """Return the name of the layer's expert-selection bias (`e_score_correction_bias`), or None."""
        grouped = self.family.grouped_router
        if grouped is None or grouped.bias.format(layer=layer) not in self.checkpoint.tensors:
            return None
        return grouped.bias.format(layer=layer)

    @property
    def routed_scaling(self) -> float:
        """Return the factor the MoE multiplies its routed output by (DeepSeek-V3-style routers; else 1.0)."""
        grouped = self.family.grouped_router
        return float(self.config.get(grouped.routed_scaling, 1.0)) if grouped is not None else 1.0

    def shared_tensor_names(self, layer: int) -> list[str]:
        """Return the on-disk names of the layer's shared expert (gate, up, down, sigmoid gate), if any."""
        shared = self.family.shared_expert
        if shared is None:
            return []
        templates = (shared.gate, shared.up, shared.down, shared.expert_gate)
        names = [t.format(layer=layer) for t in templates if t]  # DeepSeek-V3-style shared experts: no gate
        return [name for name in names if name in self.checkpoint.tensors]

    def router(self, layer: int) -> torch.Tensor:
        """Return the layer's router weight (E, H)."""
        return self.checkpoint.tensors.get(self.layout.router.format(layer=layer))

    def shared_gate(self, layer: int) -> torch.Tensor | None:
        """Return the layer's shared-expert sigmoid gate weight (1, H), or None without a shared expert or
        without a gate (DeepSeek-V3-style shared experts are always fully on)."""
        if not self.shared_size or not self.family.shared_expert.expert_gate:
            return None
        return self.checkpoint.tensors.get(self.family.shared_expert.expert_gate.format(layer=layer))

    def shared_projections(self, layer: int) -> dict[str, torch.Tensor]:
        """Return the layer's shared-expert gate/up/down weights ({} without a shared expert)."""
        if not self.shared_size:
            return {}
        shared = self.family.shared_expert
        templates = {"gate": shared.gate, "up": shared.up, "down": shared.down}
        return {p: self.checkpoint.tensors.get(t.format(layer=layer)) for p, t in templates.items()}


def fused_projection(gate_up: torch.Tensor, projection: str, size: int) -> list[torch.Tensor]:
    """Return the gate (first `size` rows) or up (the rest) of every expert of a fused (E, 2I, H) tensor, as views."""
    return list(gate_up[:, :size] if projection == "gate" else gate_up[:, size:])


def moe_config_object(config: dict, **changes):
    """Return the transformers config object of `config` with `changes` set through its attribute names.

    Some classes store a field under another name (Qwen3-MoE writes `num_experts` as
    `num_local_experts`), so fields are read and written through the object, not the dict.
    """
    from transformers import AutoConfig

    fields = {key: value for key, value in config.items() if key not in ("model_type", "upcycle")}
    config_object = AutoConfig.for_model(config["model_type"], **fields)
    for name, value in changes.items():
        setattr(config_object, name, value)
    return config_object


def moe_config_attribute(config: dict, name: str):
    """Return the field `name` of `config` as its transformers config class reads it."""
    return getattr(moe_config_object(config), name)


def _detect_layout(checkpoint: SourceCheckpoint, family: FamilyPair, num_layers: int) -> tuple[str, list[int]]:
    """Return (layout name, MoE layer indices) from the tensor names present.

    Raises:
        UpcycleError: no layout of the family matches the tensors.
    """
    for name, layout in family.layouts.items():
        probe = layout.gate_up if layout.fused else layout.gate
        layers = [
            layer
            for layer in range(num_layers)
            if probe.format(layer=layer, expert=0) in checkpoint.tensors
            and layout.router.format(layer=layer) in checkpoint.tensors
        ]
        if layers:
            return name, layers
    expected = " or ".join(
        (layout.gate_up if layout.fused else layout.gate).format(layer=0, expert=0)
        for layout in family.layouts.values()
    )
    raise UpcycleError(f"{checkpoint.name} has no {family.target_model_type} expert tensors (looked for {expected})")


def open_moe(source: str | Path, revision: str | None = None) -> MoESource:
    """Open the MoE checkpoint `source` (local dir or Hub id) and return what merging needs.

    Raises:
        UpcycleError: not a supported MoE (a dense model included), no expert tensors, or expert
            tensors whose shapes disagree with the config.
    """
    from upcycle.families.configs import normalized_source_config

    checkpoint = open_checkpoint(source, revision=revision)
    family = find_family_for_moe(checkpoint.config)
    config = normalized_source_config(checkpoint.config)
    if checkpoint.config.get("upcycle") is not None:
        config["upcycle"] = checkpoint.config["upcycle"]
    num_layers = int(config["num_hidden_layers"])
    layout_name, moe_layers = _detect_layout(checkpoint, family, num_layers)
    layout = family.layouts[layout_name]
    num_experts = int(moe_config_attribute(config, family.experts_field))
    hidden = int(config["hidden_size"])
    router_shape = checkpoint.tensors.shape(layout.router.format(layer=moe_layers[0]))
    if layout.fused:
        stacked = checkpoint.tensors.shape(layout.gate_up.format(layer=moe_layers[0]))
        experts_on_disk, expert_size = stacked[0], stacked[1] // 2
    else:
        experts_on_disk = 0
        while layout.gate.format(layer=moe_layers[0], expert=experts_on_disk) in checkpoint.tensors:
            experts_on_disk += 1
        expert_size = checkpoint.tensors.shape(layout.gate.format(layer=moe_layers[0], expert=0))[0]
    if router_shape != (num_experts, hidden) or experts_on_disk != num_experts:
        raise UpcycleError(
            f"{checkpoint.name}: config says {num_experts} experts of hidden size {hidden}, but layer "
            f"{moe_layers[0]} has a router of shape {router_shape} and {experts_on_disk} experts on disk"
        )
    shared_size = 0
    if family.shared_expert is not None:
        name = family.shared_expert.gate.format(layer=moe_layers[0])
        shared_size = checkpoint.tensors.shape(name)[0] if name in checkpoint.tensors else 0
        down = family.shared_expert.down
        if shared_size and all(not checkpoint.tensors.get(down.format(layer=layer)).any() for layer in moe_layers):
            shared_size = 0  # a placeholder (all-zero down_proj) adds nothing: folding it only widens the FFN
    return MoESource(
        checkpoint=checkpoint,
        config=config,
        family=family,
        layout_name=layout_name,
        layout=layout,
        num_experts=num_experts,
        top_k=int(moe_config_attribute(config, family.top_k_field)),
        expert_size=expert_size,
        hidden_size=hidden,
        shared_size=shared_size,
        moe_layers=moe_layers,
    )
