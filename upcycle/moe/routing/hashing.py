"""Hash routing: a parameter-free baseline that sends each token to fixed experts."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from upcycle.moe.routing.base import Router
from upcycle.moe.routing.output import RouterOutput, pair_mask

__all__ = ["HashRouter"]


class HashRouter(Router):
    """Hash routing (Roller 2021), a parameter-free baseline: each token goes to fixed experts.

    With ``input_ids`` (T,) the expert is a multiplicative hash of the token id (Hash Layers);
    without, of the sign pattern of a fixed random projection of the hidden state (an LSH of the
    token's representation). ``top_k`` experts are consecutive after the hashed one, weights 1/k
    (sum to 1). ``router_probs`` is the one-hot-per-choice average, ``router_logits`` zeros.
    """

    _MULTIPLIER: ClassVar[int] = 2654435761  # Knuth's multiplicative hash constant

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, num_bits: int = 16, seed: int = 0):
        super().__init__(hidden_size, num_experts, top_k)
        self.num_bits = num_bits
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(num_bits, hidden_size, generator=generator), persistent=False)
        self.register_buffer("powers", 2 ** torch.arange(num_bits), persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> RouterOutput:
        """Return the hashed experts; no gradient flows (there is nothing to learn)."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        if input_ids is not None:
            keys = (input_ids.reshape(-1).long() * self._MULTIPLIER) % (2**32)
        else:
            signs = F.linear(hidden_states.float(), self.projection.float()) > 0
            keys = (signs.long() * self.powers).sum(-1)
        first = keys % self.num_experts
        indices = (first[:, None] + torch.arange(self.top_k, device=first.device)) % self.num_experts
        weights = torch.full(indices.shape, 1.0 / self.top_k, device=indices.device)
        probs = torch.zeros(indices.shape[0], self.num_experts, device=indices.device)
        probs.scatter_add_(1, indices, weights)
        logits = torch.zeros_like(probs)
        return RouterOutput(indices, weights, logits, probs, pair_mask(attention_mask, indices))
