"""What a training loop reads from a MoPE model: the auxiliary router loss and router statistics."""

from __future__ import annotations

import torch
from torch import nn

from mope.layer import MoPELayer
from upcycle.moe.losses import load_balancing_loss, router_z_loss, tokens_per_expert
from upcycle.moe.routing import flatten_token_mask


def _routed(model: nn.Module):
    for name, module in model.named_modules():
        if not isinstance(module, MoPELayer) or module.disable_adapters or module.merged:
            continue
        for adapter_name in module.active_adapters:
            routing = module.last_routing.get(adapter_name)
            if routing is not None:
                yield name, module, adapter_name, routing


def aux_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return the summed auxiliary router loss of the last forward, to add to the task loss.

    For every router of an active adapter: ``aux_loss_coef * load_balancing_loss`` (Switch/GShard,
    ``E * sum_i f_i * P_i``, 1.0 for a perfectly balanced router) ``+ z_loss_coef * router_z_loss``
    (ST-MoE), both from `upcycle.moe.losses`. Pass the batch's ``attention_mask`` to leave padding
    out of both averages.

    Returns:
        A scalar tensor (0 when no router ran), differentiable with respect to the routers.
    """
    total = None
    for _, module, adapter_name, routing in _routed(model):
        token_mask = flatten_token_mask(attention_mask, routing.router_probs.shape[0])
        loss = module.aux_loss_coef[adapter_name] * load_balancing_loss(
            routing.router_probs, routing.expert_indices, module.num_experts[adapter_name], token_mask
        )
        if module.z_loss_coef[adapter_name]:
            loss = loss + module.z_loss_coef[adapter_name] * router_z_loss(routing.router_logits, token_mask)
        total = loss if total is None else total + loss
    if total is None:
        parameter = next(model.parameters())
        return torch.zeros((), device=parameter.device)
    return total


def router_stats(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Return, per routed module (``"name"`` or ``"name[adapter]"`` with several active adapters),
    the last forward's ``tokens_per_expert`` (E,) counts of (token, choice) pairs,
    ``load_fraction`` (E,) the same as fractions, and ``mean_prob`` (E,) the mean router
    probability; all detached, for logging."""
    entries = list(_routed(model))
    several = len({adapter for _, _, adapter, _ in entries}) > 1
    stats = {}
    for name, module, adapter_name, routing in entries:
        counts = tokens_per_expert(routing.expert_indices.detach(), module.num_experts[adapter_name])
        stats[f"{name}[{adapter_name}]" if several else name] = {
            "tokens_per_expert": counts,
            "load_fraction": counts / counts.sum().clamp(min=1),
            "mean_prob": routing.router_probs.detach().float().mean(0),
        }
    return stats
