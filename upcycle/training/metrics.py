"""Router metrics for MoE and MoPE training: per-layer expert load, its coefficient of variation,
router entropy and the share of assignments a capacity-limited engine would drop.

`RouterMetrics` accumulates counts over the micro-batches of a logging interval as one tensor per
layer, so the caller can sum it across processes (`Accelerator.reduce`) before `summary`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from upcycle.moe.losses import tokens_per_expert


def native_router_layers(outputs, top_k: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Return ``(layer_name, router_logits (T, E), expert_indices (T, k))`` for each MoE layer of a
    transformers MoE output (``router_logits`` per layer), picking the top-k of the logits."""
    logits = getattr(outputs, "router_logits", None) or ()
    layers = []
    for index, layer_logits in enumerate(logits):
        if layer_logits is None:
            continue
        layer_logits = layer_logits.detach().float()
        indices = torch.topk(layer_logits, min(top_k, layer_logits.shape[-1]), dim=-1).indices
        layers.append((f"layer_{index}", layer_logits, indices))
    return layers


def mope_router_layers(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Return ``(module_name, router_logits, expert_indices)`` of every routed MoPE layer's last forward."""
    from mope.layer import MoPELayer

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, MoPELayer) or module.disable_adapters or module.merged:
            continue
        for adapter_name in module.active_adapters:
            routing = module.last_routing.get(adapter_name)
            if routing is not None and module.num_experts[adapter_name] > 1:
                short = name.removeprefix("base_model.model.")  # PEFT's wrapper prefix
                layers.append((short, routing.router_logits.detach().float(), routing.expert_indices.detach()))
    return layers


class RouterMetrics:
    """Accumulates, per router, ``[tokens per expert (E) | entropy sum | tokens | dropped | assignments]``."""

    def __init__(self, capacity_factor: float | None):
        self.capacity_factor = capacity_factor
        self.state: dict[str, torch.Tensor] = {}

    def update(self, layer: str, router_logits: torch.Tensor, expert_indices: torch.Tensor, token_mask) -> None:
        """Add one micro-batch of one router: logits (T, E), chosen experts (T, k), mask (T,) or None."""
        num_experts = router_logits.shape[-1]
        mask = (
            torch.ones(router_logits.shape[0], dtype=torch.bool, device=router_logits.device)
            if token_mask is None
            else token_mask.reshape(-1).to(device=router_logits.device, dtype=torch.bool)
        )
        counts = tokens_per_expert(expert_indices, num_experts, token_mask=mask).float()
        log_probs = torch.log_softmax(router_logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        assignments = counts.sum()
        dropped = torch.zeros((), device=counts.device)
        if self.capacity_factor is not None:
            # Capacity per expert as GShard/Switch engines set it for this batch: cf * T * k / E.
            capacity = math.ceil(self.capacity_factor * float(assignments) / num_experts)
            dropped = (counts - capacity).clamp(min=0).sum()
        row = torch.cat([counts, torch.stack([(entropy * mask).sum(), mask.sum().float(), dropped, assignments])])
        self.state[layer] = row if layer not in self.state else self.state[layer] + row

    def packed(self) -> torch.Tensor | None:
        """Return every router's row concatenated (for a cross-process sum), or None when empty."""
        return torch.cat(list(self.state.values())) if self.state else None

    def summary(self, packed: torch.Tensor | None = None) -> dict[str, float]:
        """Return ``moe/<layer>/{load_cv, entropy, dropped_frac, max_load}`` per router and their
        means ``moe/{...}``; `packed` (a reduced `packed()`) replaces the local counts. Resets."""
        if not self.state:
            return {}
        rows = dict(self.state)
        if packed is not None:
            offset = 0
            for layer, row in self.state.items():
                rows[layer] = packed[offset : offset + row.numel()]
                offset += row.numel()
        metrics: dict[str, float] = {}
        for layer, row in rows.items():
            counts, (entropy_sum, tokens, dropped, assignments) = row[:-4], row[-4:]
            load = counts / counts.sum().clamp(min=1)
            metrics[f"moe/{layer}/load_cv"] = float(load.std(unbiased=False) / load.mean().clamp(min=1e-12))
            metrics[f"moe/{layer}/max_load"] = float(load.max() * load.numel())
            metrics[f"moe/{layer}/entropy"] = float(entropy_sum / tokens.clamp(min=1))
            metrics[f"moe/{layer}/dropped_frac"] = float(dropped / assignments.clamp(min=1))
            for expert, share in enumerate(load.tolist()):
                metrics[f"moe/{layer}/load/expert_{expert}"] = share
        for name in ("load_cv", "max_load", "entropy", "dropped_frac"):
            values = [value for key, value in metrics.items() if key.endswith(f"/{name}")]
            metrics[f"moe/{name}"] = sum(values) / len(values)
        self.state = {}
        return metrics
