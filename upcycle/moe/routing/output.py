"""What a router returns: `RouterOutput` and its Soft MoE / SMEAR variants, and the helpers that
shape a padding mask and a batch into the form those outputs need."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from upcycle.errors import UpcycleError

__all__ = [
    "RouterOutput",
    "SequenceRouterOutput",
    "SoftRouterOutput",
    "all_experts",
    "as_sequences",
    "flatten_token_mask",
    "pair_mask",
]


@dataclass
class RouterOutput:
    """What a router decided for T tokens and E experts.

    Attributes:
        expert_indices: (T, k) long, the experts chosen for each token (k == E for dense routers).
        expert_weights: (T, k) float, the weight of each chosen expert in the token's output.
        router_logits: (T, E) raw logits, for the z-loss.
        router_probs: (T, E) probabilities, for the load-balancing loss and statistics.
        dispatch_mask: optional (T, k) bool; False marks a pair that is not computed (a token an
            expert did not pick in expert-choice routing, padding, a token dropped for capacity).
    """

    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    router_logits: torch.Tensor
    router_probs: torch.Tensor
    dispatch_mask: torch.Tensor | None = None


@dataclass
class SoftRouterOutput(RouterOutput):
    """A Soft MoE decision: besides the token-level summary, per-slot dispatch and combine weights.

    Attributes:
        dispatch_weights: (B, S, E * slots) softmax over the S tokens of each sequence: slot j's
            input is ``sum_s dispatch[b, s, j] * x[b, s]``.
        combine_weights: (B, S, E * slots) softmax over slots: token s's output is
            ``sum_j combine[b, s, j] * y[b, j]``.
    """

    dispatch_weights: torch.Tensor | None = None
    combine_weights: torch.Tensor | None = None


@dataclass
class SequenceRouterOutput(RouterOutput):
    """A per-sequence decision (SMEAR): ``sequence_probs`` (B, E) are the merge coefficients."""

    sequence_probs: torch.Tensor | None = None


def flatten_token_mask(attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """Return the padding mask as a (T,) bool tensor, or None when there is no mask.

    Raises:
        UpcycleError: when the mask does not hold exactly T entries.
    """
    if attention_mask is None:
        return None
    if attention_mask.numel() != num_tokens:
        raise UpcycleError(
            f"attention_mask has {attention_mask.numel()} entries (shape {tuple(attention_mask.shape)}) "
            f"but there are {num_tokens} tokens; pass a (batch, seq) mask matching the hidden states."
        )
    return attention_mask.reshape(-1).to(torch.bool)


def as_sequences(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape to (B, S, H) with a (B, S) bool mask, using the mask's shape as the batch structure.

    Without a 2-D mask or 3-D hidden states, all tokens form one sequence.
    """
    if hidden_states.dim() == 3:
        batch, seq = hidden_states.shape[:2]
    elif attention_mask is not None and attention_mask.dim() == 2:
        batch, seq = attention_mask.shape
    else:
        batch, seq = 1, hidden_states.shape[0]
    sequences = hidden_states.reshape(batch, seq, hidden_states.shape[-1])
    mask = flatten_token_mask(attention_mask, batch * seq)
    if mask is None:
        mask = torch.ones(batch * seq, dtype=torch.bool, device=hidden_states.device)
    return sequences, mask.view(batch, seq)


def all_experts(num_tokens: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """Return (T, E) expert indices ``arange(E)`` for every token (the k == E of dense routers)."""
    return torch.arange(num_experts, device=device).expand(num_tokens, num_experts)


def pair_mask(attention_mask: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor | None:
    """Return the padding mask broadcast to the (T, k) pairs of ``indices``, or None without a mask."""
    mask = flatten_token_mask(attention_mask, indices.shape[0])
    return None if mask is None else mask[:, None].expand_as(indices)
