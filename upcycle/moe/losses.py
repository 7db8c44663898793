"""Auxiliary router losses: Switch/GShard load balancing and the ST-MoE router z-loss.

Both take the tensors a `RouterOutput` carries, so any router in `upcycle.moe.routing` can be
trained with them. Padding is excluded through the optional `token_mask`.
"""

from __future__ import annotations

import torch


def _flat_mask(token_mask: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    if token_mask is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return token_mask.reshape(-1).to(device=device, dtype=torch.bool)


def tokens_per_expert(
    expert_indices: torch.Tensor,
    num_experts: int,
    dispatch_mask: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Count the (token, expert) assignments each expert receives.

    Args:
        expert_indices: (T, k) long.
        num_experts: E.
        dispatch_mask: optional (T, k) bool; False pairs are not counted.
        token_mask: optional (T,) bool; False tokens (padding) are not counted.

    Returns:
        (E,) float tensor of counts (no gradient).
    """
    valid = torch.ones_like(expert_indices, dtype=torch.bool)
    if dispatch_mask is not None:
        valid = valid & dispatch_mask
    if token_mask is not None:
        valid = valid & _flat_mask(token_mask, expert_indices.shape[0], expert_indices.device)[:, None]
    counts = torch.zeros(num_experts, dtype=torch.float32, device=expert_indices.device)
    return counts.index_add_(0, expert_indices[valid], torch.ones_like(expert_indices[valid], dtype=torch.float32))


def load_balancing_loss(
    router_probs: torch.Tensor,
    expert_indices: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/GShard load-balancing loss, ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of (token, choice) assignments routed to expert i (so the f_i sum to 1
    over experts, also for k > 1, as in Switch and in transformers' Mixtral loss divided by k),
    and ``P_i`` the mean router probability of expert i over tokens. A perfectly uniform router
    scores 1.0; gradients flow through ``P`` only.

    Args:
        router_probs: (T, E) probabilities.
        expert_indices: (T, k) chosen experts.
        num_experts: E.
        token_mask: optional (T,) bool; False tokens (padding) are left out of both averages.

    Returns:
        A scalar tensor.
    """
    mask = _flat_mask(token_mask, router_probs.shape[0], router_probs.device)
    num_valid = mask.sum().clamp(min=1)
    counts = tokens_per_expert(expert_indices, num_experts, token_mask=mask)
    fraction = counts / (num_valid * expert_indices.shape[1])
    mean_prob = (router_probs.float() * mask[:, None]).sum(0) / num_valid
    return num_experts * torch.sum(fraction.to(mean_prob.dtype) * mean_prob)


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: the mean over tokens of ``logsumexp(logits)**2``.

    Args:
        router_logits: (T, E) raw router logits.
        token_mask: optional (T,) bool; False tokens (padding) are left out of the mean.

    Returns:
        A scalar tensor.
    """
    mask = _flat_mask(token_mask, router_logits.shape[0], router_logits.device)
    z = torch.logsumexp(router_logits.float(), dim=-1) ** 2
    return (z * mask).sum() / mask.sum().clamp(min=1)
