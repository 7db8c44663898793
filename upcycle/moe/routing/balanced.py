"""Balanced assignment of tokens to experts: BASE layers (a greedy balanced assignment) and S-BASE
(a Sinkhorn-balanced transport plan), with the assignment and Sinkhorn steps themselves."""

from __future__ import annotations

import math

import torch

from upcycle.errors import UpcycleError
from upcycle.moe.routing.base import LinearScores
from upcycle.moe.routing.output import RouterOutput, flatten_token_mask, pair_mask

__all__ = ["BASERouter", "SBASERouter", "balanced_assignment", "balanced_capacity", "sinkhorn"]


def balanced_assignment(scores: torch.Tensor, capacity: torch.Tensor | int) -> torch.Tensor:
    """Assign each row (token) to one column (expert), at most ``capacity`` rows per column.

    Greedy rounds, each vectorised: every unassigned token proposes to its best expert that still
    has room; each expert accepts its highest-scoring proposers up to its remaining room and
    closes when full. An expert fills (or all tokens are placed) each round, so there are at most
    E rounds. It is the greedy approximation of BASE's linear assignment, not an exact auction
    solver. Pass `balanced_capacity` for an assignment balanced to within one token.

    Args:
        scores: (T, E) affinities, higher is better.
        capacity: tokens per expert, an int or an (E,) tensor; needs ``sum >= T``.

    Returns:
        (T,) long expert per token.
    """
    num_tokens, num_experts = scores.shape
    device = scores.device
    room = torch.as_tensor(capacity, device=device).expand(num_experts).clone()
    assigned = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
    scores = scores.detach().float()
    for _ in range(num_experts):
        open_tokens = (assigned < 0).nonzero().squeeze(1)
        if open_tokens.numel() == 0:
            break
        candidate_scores = scores[open_tokens].masked_fill(room[None] <= 0, float("-inf"))
        best_score, best_expert = candidate_scores.max(-1)
        # Rank proposers within each expert by score: sort by score, then stably by expert.
        by_score = best_score.argsort(descending=True)
        by_expert = best_expert[by_score].argsort(stable=True)
        order = by_score[by_expert]
        experts_in_order = best_expert[order]
        counts = torch.bincount(experts_in_order, minlength=num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=device) - starts[experts_in_order]
        accepted = rank < room[experts_in_order]
        assigned[open_tokens[order[accepted]]] = experts_in_order[accepted]
        room -= torch.bincount(experts_in_order[accepted], minlength=num_experts)
    return assigned


def balanced_capacity(num_tokens: int, num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """Return (E,) per-expert capacities summing to ``num_tokens``: floor(T / E) for every expert,
    plus one for the first ``T mod E`` experts, so a full assignment is balanced to within one token.

    A uniform ``ceil(T / E)`` would let the greedy assignment fill the first experts and leave the
    last one short (T=10, E=4: 3, 3, 3, 1).
    """
    base, remainder = divmod(num_tokens, num_experts)
    return base + (torch.arange(num_experts, device=device) < remainder).long()


class BASERouter(LinearScores):
    """BASE layers (Lewis 2021): while training, a balanced assignment of tokens to experts
    (each expert gets floor or ceil of T/E of the real tokens, one expert per token), computed by
    `balanced_assignment` with `balanced_capacity` on the router scores; in eval mode each token takes its best expert
    (set ``balanced_in_eval=True`` to keep balancing). The weight is ``sigmoid(score)`` of the
    assigned expert, as in the paper, so it does not sum to 1.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 1,
        balanced_in_eval: bool = False,
        init_std: float = 0.02,
    ) -> None:
        if top_k != 1:
            raise UpcycleError(f"BASE routing assigns one expert per token; got top_k={top_k}.")
        super().__init__(hidden_size, num_experts, 1, init_std)
        self.balanced_in_eval = balanced_in_eval

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Return one expert per token; balanced over the real tokens while training."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.logits(hidden_states)
        token_mask = flatten_token_mask(attention_mask, logits.shape[0])
        if self.training or self.balanced_in_eval:
            experts = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            real = (
                torch.arange(logits.shape[0], device=logits.device)
                if token_mask is None
                else token_mask.nonzero().squeeze(1)
            )
            experts[real] = balanced_assignment(
                logits[real], balanced_capacity(real.numel(), self.num_experts, logits.device)
            )
        else:
            experts = logits.argmax(-1)
        indices = experts[:, None]
        weights = torch.sigmoid(logits.float().gather(-1, indices))
        probs = torch.softmax(logits.float(), dim=-1)
        return RouterOutput(indices, weights, logits, probs, pair_mask(attention_mask, indices))


def sinkhorn(logits: torch.Tensor, num_iters: int = 8, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Balance ``exp(logits)`` so every token has mass 1/T and every expert 1/E (Sinkhorn-Knopp).

    Args:
        logits: (T, E).
        num_iters: row/column normalisation rounds.
        token_mask: optional (T,) bool; masked tokens get no mass.

    Returns:
        (T, E) transport plan, computed in log space in float32 without gradient.
    """
    with torch.no_grad():
        log_plan = logits.detach().float()
        if token_mask is not None:
            log_plan = log_plan.masked_fill(~token_mask[:, None], float("-inf"))
        num_tokens = log_plan.shape[0] if token_mask is None else int(token_mask.sum().clamp(min=1))
        for _ in range(num_iters):
            log_plan = log_plan - log_plan.logsumexp(0, keepdim=True) - math.log(log_plan.shape[1])
            log_plan = log_plan - log_plan.logsumexp(1, keepdim=True).nan_to_num(neginf=0.0) - math.log(num_tokens)
        return log_plan.exp()


class SBASERouter(LinearScores):
    """S-BASE (Clark 2022): while training, pick each token's top-k experts from the Sinkhorn-
    balanced transport plan instead of the raw scores; in eval mode, from the raw scores. The
    weights are the softmax probabilities of the picked experts (renormalised to sum to 1 when
    ``normalize``), so the router learns through them.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 1,
        num_iters: int = 8,
        normalize: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std)
        self.num_iters = num_iters
        self.normalize = normalize

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Return the Sinkhorn-balanced top-k choice."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.logits(hidden_states)
        probs = torch.softmax(logits.float(), dim=-1)
        token_mask = flatten_token_mask(attention_mask, logits.shape[0])
        selection = sinkhorn(logits, self.num_iters, token_mask) if self.training else probs
        indices = selection.topk(self.top_k, dim=-1).indices
        weights = probs.gather(-1, indices)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return RouterOutput(indices, weights, logits, probs, pair_mask(attention_mask, indices))
