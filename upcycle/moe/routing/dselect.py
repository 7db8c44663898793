"""DSelect-k routing: k differentiable selectors, each a smooth binary code over the experts."""

from __future__ import annotations

import math

import torch
from torch import nn

from upcycle.moe.routing.base import Router
from upcycle.moe.routing.output import RouterOutput, pair_mask

__all__ = ["DSelectKRouter", "smooth_step"]


def smooth_step(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """DSelect-k's cubic smooth step: 0 below -gamma/2, 1 above gamma/2, C^1 in between."""
    cubic = -2.0 / gamma**3 * x**3 + 3.0 / (2.0 * gamma) * x + 0.5
    return torch.where(x <= -gamma / 2, torch.zeros_like(x), torch.where(x >= gamma / 2, torch.ones_like(x), cubic))


class DSelectKRouter(Router):
    """DSelect-k (Hazimeh 2021), per-token: k selectors, each a smooth binary code over
    ``m = ceil(log2 E)`` bits (a distribution over experts that becomes one-hot as the codes
    saturate), mixed by a softmax over the selectors. The dense mixture sums to 1 over experts.

    Dispatch keeps the k largest entries of that mixture (exact once the codes are binary; before
    that the mass outside the top k is dropped). Weights are renormalised to sum to 1 when
    ``normalize``. ``router_probs`` is the mixture and ``router_logits`` its log, so the z-loss
    is not meaningful for this router.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        gamma: float = 1.0,
        normalize: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k)
        self.gamma = gamma
        self.normalize = normalize
        self.num_bits = max(1, math.ceil(math.log2(num_experts)))
        self.code = nn.Linear(hidden_size, top_k * self.num_bits)
        self.selector = nn.Linear(hidden_size, top_k, bias=False)
        nn.init.normal_(self.code.weight, std=init_std)
        # The paper starts codes uniformly inside the smooth region, so every bit gets gradient.
        nn.init.uniform_(self.code.bias, -gamma / 2, gamma / 2)
        nn.init.normal_(self.selector.weight, std=init_std)
        expert_ids = torch.arange(2**self.num_bits)
        bits = (expert_ids[:, None] >> torch.arange(self.num_bits)) & 1
        self.register_buffer("bits", bits.bool(), persistent=False)  # (2**m, m)

    def mixture(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return the (T, E) expert distribution (rows sum to 1)."""
        code = smooth_step(self.code(hidden_states).float(), self.gamma)
        code = code.view(-1, self.top_k, 1, self.num_bits)  # (T, k, 1, m)
        per_selector = torch.where(self.bits, code, 1 - code).prod(-1)[..., : self.num_experts]  # (T, k, E)
        per_selector = per_selector / per_selector.sum(-1, keepdim=True).clamp(min=1e-9)
        selector_weights = torch.softmax(self.selector(hidden_states).float(), dim=-1)
        return (selector_weights[..., None] * per_selector).sum(1)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Return the k largest entries of the DSelect-k mixture."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        mixture = self.mixture(hidden_states)
        weights, indices = mixture.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-9)
        logits = mixture.clamp(min=1e-9).log()
        return RouterOutput(indices, weights, logits, mixture, pair_mask(attention_mask, indices))
