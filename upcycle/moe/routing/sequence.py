"""Routers that mix within a sequence rather than per token: Soft MoE (slots that are convex
combinations of a sequence's tokens), sentence-level routing and SMEAR (one choice or one merged
expert per sequence)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.moe.routing.base import LinearScores, Router, select_top_k
from upcycle.moe.routing.output import (
    RouterOutput,
    SequenceRouterOutput,
    SoftRouterOutput,
    all_experts,
    as_sequences,
)

__all__ = ["SMEARRouter", "SentenceRouter", "SoftMoERouter"]


class SoftMoERouter(Router):
    """Soft MoE (Puigcerver 2023): each expert processes ``slots_per_expert`` slots, each slot a
    convex combination of the tokens of one sequence; each token's output is a convex
    combination of slot outputs. Nothing is dropped and everything is differentiable.

    Parameters: ``slot_embeddings`` (E * slots, H); inputs and slot embeddings are L2-normalised
    and scaled by a learned ``scale`` (the paper's normalisation, which keeps logits bounded).
    Mixing runs within each sequence (the attention mask's shape gives the batch structure), so
    like expert-choice it is not causal. The token-level summary has k == E with
    ``expert_weights`` = combine weights summed over each expert's slots (sum to 1 per token).
    """

    mode: ClassVar[str] = "soft"

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int | None = None,
        slots_per_expert: int = 1,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(hidden_size, num_experts, num_experts)
        self.slots_per_expert = slots_per_expert
        self.slot_embeddings = nn.Parameter(torch.empty(num_experts * slots_per_expert, hidden_size))
        nn.init.normal_(self.slot_embeddings, std=init_std)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SoftRouterOutput:
        """Return dispatch/combine weights (B, S, E * slots) and the token-level summary."""
        sequences, mask = as_sequences(hidden_states, attention_mask)
        tokens = F.normalize(sequences.float(), dim=-1)
        slots = F.normalize(self.slot_embeddings.float(), dim=-1) * self.scale
        slot_logits = tokens @ slots.T  # (B, S, E * slots)
        dispatch = torch.softmax(slot_logits.masked_fill(~mask[..., None], float("-inf")), dim=1)
        combine = torch.softmax(slot_logits, dim=-1)
        num_tokens = mask.numel()
        per_expert = (num_tokens, self.num_experts, self.slots_per_expert)
        logits = slot_logits.reshape(per_expert).logsumexp(-1)
        weights = combine.reshape(per_expert).sum(-1)
        indices = all_experts(num_tokens, self.num_experts, logits.device)
        return SoftRouterOutput(
            indices,
            weights,
            logits,
            weights,
            mask.reshape(-1, 1).expand_as(indices),
            dispatch_weights=dispatch,
            combine_weights=combine,
        )


class SentenceRouter(LinearScores):
    """Sentence-level routing: the mask-weighted mean of each sequence's hidden states picks the
    top-k experts for every token of that sequence (softmax before top-k; weights sum to 1 when
    ``normalize``).

    The batch structure comes from (B, S, H) hidden states or a (B, S) attention mask; without
    either, all tokens form one sequence.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        normalize: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std)
        self.normalize = normalize

    def sequence_logits(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits (B, E), mask (B, S))`` from the masked mean of each sequence."""
        sequences, mask = as_sequences(hidden_states, attention_mask)
        weights = mask.to(sequences.dtype)[..., None]
        pooled = (sequences * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.logits(pooled), mask

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Return the sequence's choice broadcast to its tokens; padding is not dispatched."""
        logits, mask = self.sequence_logits(hidden_states, attention_mask)
        indices, weights, probs = select_top_k(logits, self.top_k, normalize=self.normalize)
        seq_len = mask.shape[1]
        return RouterOutput(
            indices.repeat_interleave(seq_len, 0),
            weights.repeat_interleave(seq_len, 0),
            logits.repeat_interleave(seq_len, 0),
            probs.repeat_interleave(seq_len, 0),
            mask.reshape(-1, 1).expand(-1, self.top_k),
        )


class SMEARRouter(SentenceRouter):
    """SMEAR (Muqeeth 2023): per sequence, merge the experts' parameters with the softmax of the
    pooled router logits and run the one merged expert; every expert gets gradient.

    Output: a `SequenceRouterOutput` with ``sequence_probs`` (B, E) (sum to 1), broadcast to the
    tokens as k == E ``expert_weights``.
    """

    mode: ClassVar[str] = "merge"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int | None = None, init_std: float = 0.02):
        super().__init__(hidden_size, num_experts, num_experts, True, init_std)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SequenceRouterOutput:
        """Return the per-sequence merge coefficients and their token-level broadcast."""
        logits, mask = self.sequence_logits(hidden_states, attention_mask)
        probs = torch.softmax(logits.float(), dim=-1)
        seq_len = mask.shape[1]
        token_probs = probs.repeat_interleave(seq_len, 0)
        indices = all_experts(token_probs.shape[0], self.num_experts, logits.device)
        return SequenceRouterOutput(
            indices,
            token_probs,
            logits.repeat_interleave(seq_len, 0),
            token_probs,
            mask.reshape(-1, 1).expand_as(indices),
            sequence_probs=probs,
        )
