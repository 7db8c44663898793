"""Expert-choice routing: each expert picks its tokens, instead of each token its experts."""

from __future__ import annotations

import math

import torch

from upcycle.moe.routing.base import LinearScores
from upcycle.moe.routing.output import RouterOutput, all_experts, flatten_token_mask

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(LinearScores):
    """Expert-choice routing (Zhou 2022): each expert picks its C highest-scoring tokens.

    Scores are a softmax over experts; ``C = ceil(capacity_factor * T * top_k / E)`` (capped at
    the number of real tokens), so ``top_k`` is the average number of experts per token. Every
    expert gets exactly C tokens; a token may get 0..E experts. The output has k == E:
    ``expert_weights[t, e]`` is the score if expert e picked token t, else 0, and
    ``dispatch_mask`` marks the picks. Padding is never picked.

    Selection looks at all tokens of the batch at once, future ones included, so it is not
    causal: fine for encoders and for training, it leaks in autoregressive decoding.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float = 1.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std)
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert picks for a batch of ``num_tokens`` real tokens."""
        wanted = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(1, min(num_tokens, wanted))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Return the expert-choice assignment as a (T, E) weight matrix with a dispatch mask."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        num_tokens = hidden_states.shape[0]
        logits = self.logits(hidden_states)
        probs = torch.softmax(logits.float(), dim=-1)
        token_mask = flatten_token_mask(attention_mask, num_tokens)
        num_real = num_tokens if token_mask is None else int(token_mask.sum())
        selection = probs if token_mask is None else probs.masked_fill(~token_mask[:, None], -1.0)
        picked_tokens = selection.topk(self.capacity(max(num_real, 1)), dim=0).indices  # (C, E)
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        chosen.scatter_(0, picked_tokens, True)
        if token_mask is not None:
            chosen &= token_mask[:, None]
        indices = all_experts(num_tokens, self.num_experts, logits.device)
        return RouterOutput(indices, probs * chosen, logits, probs, chosen)
