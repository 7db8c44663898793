"""What every router shares: the `Router` interface, the linear scores of the learned routers, and
the token-choice top-k selection (`select_top_k`) several of them use."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.moe.routing.output import RouterOutput

__all__ = ["LinearScores", "Router", "select_top_k"]


def select_top_k(
    logits: torch.Tensor,
    top_k: int,
    softmax_order: str = "before",
    normalize: bool = True,
    selection_bias: torch.Tensor | None = None,
    score_fn: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-choice top-k selection shared by the linear routers.

    Args:
        logits: (T, E) router logits.
        top_k: experts per token.
        softmax_order: ``"before"`` (probabilities over all experts, then top-k, Mixtral/Switch) or
            ``"after"`` (top-k logits, then a softmax over the k, so weights always sum to 1).
        normalize: with ``"before"``, rescale the k weights to sum to 1.
        selection_bias: optional (E,) bias added to the scores for the choice only (DeepSeek-V3
            loss-free balancing); the weights never see it.
        score_fn: ``"softmax"`` or ``"sigmoid"`` (DeepSeek-V3 affinity scores; with
            ``normalize=True`` the weights sum to 1).

    Returns:
        ``(expert_indices (T, k), expert_weights (T, k), router_probs (T, E))``.
    """
    logits = logits.float()
    if score_fn == "sigmoid":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    else:
        scores = probs = torch.softmax(logits, dim=-1)
    if softmax_order == "after" and score_fn == "softmax":
        selection = logits if selection_bias is None else logits + selection_bias
        indices = selection.topk(top_k, dim=-1).indices
        weights = torch.softmax(logits.gather(-1, indices), dim=-1)
        return indices, weights, probs
    selection = scores if selection_bias is None else scores + selection_bias
    indices = selection.topk(top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return indices, weights, probs


class Router(nn.Module):
    """Base class: ``forward(hidden_states (T, H), attention_mask=None) -> RouterOutput``.

    Attributes:
        num_experts: E.
        top_k: experts per token (E for dense routers; the average per token for expert-choice).
        mode: ``"token"``, ``"soft"`` or ``"merge"``; how `upcycle.moe.MoE` dispatches.
    """

    mode: ClassVar[str] = "token"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise UpcycleError(
                f"a router needs 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}."
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        raise NotImplementedError


class LinearScores(Router):
    """A router whose scores are a bias-free linear map, stored as ``weight`` (E, H)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02) -> None:
        super().__init__(hidden_size, num_experts, top_k)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return (T, E) logits for (T, H) hidden states."""
        return F.linear(hidden_states, self.weight)
