"""Token-choice routers: each token picks its experts from a score over all experts (top-k,
Switch, noisy top-k, dense, and the cosine-similarity scores of X-MoE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.moe.routing.base import LinearScores, select_top_k
from upcycle.moe.routing.output import RouterOutput, all_experts, pair_mask

__all__ = ["CosineRouter", "DenseRouter", "NoisyTopKRouter", "SwitchRouter", "TopKRouter"]


class TopKRouter(LinearScores):
    """Token-choice top-k (GShard, Mixtral): every token picks its k highest-scoring experts.

    Weights sum to 1 per token when ``normalize`` is True or ``softmax_order == "after"``; else
    they are the k softmax probabilities (sum <= 1). With ``selection_bias=True`` a per-expert
    buffer ``selection_bias`` is added to the scores for the choice only (DeepSeek-V3); the MoE
    block nudges it against the measured load.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        softmax_order: str = "before",
        normalize: bool = True,
        score_fn: str = "softmax",
        selection_bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std)
        if softmax_order not in ("before", "after"):
            raise UpcycleError(f"softmax_order must be 'before' or 'after', got {softmax_order!r}.")
        if score_fn not in ("softmax", "sigmoid"):
            raise UpcycleError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}.")
        self.softmax_order = softmax_order
        self.normalize = normalize
        self.score_fn = score_fn
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts))
        else:
            self.selection_bias = None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Return the top-k choice; padding tokens (mask 0) get a False ``dispatch_mask``."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.logits(hidden_states)
        indices, weights, probs = select_top_k(
            logits, self.top_k, self.softmax_order, self.normalize, self.selection_bias, self.score_fn
        )
        return RouterOutput(indices, weights, logits, probs, pair_mask(attention_mask, indices))


class SwitchRouter(TopKRouter):
    """Switch Transformer routing (Fedus 2021): top-1, weight = the softmax probability (< 1).

    ``jitter_eps`` > 0 multiplies the router input by uniform noise in [1 - eps, 1 + eps] while
    training, as Switch does for stability.

    Raises:
        UpcycleError: when ``top_k`` is not 1.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 1,
        jitter_eps: float = 0.0,
        selection_bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        if top_k != 1:
            raise UpcycleError(f"the switch router routes each token to one expert; got top_k={top_k}.")
        super().__init__(hidden_size, num_experts, 1, "before", False, "softmax", selection_bias, init_std)
        self.jitter_eps = jitter_eps

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(hidden_states).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            hidden_states = hidden_states * noise
        return super().logits(hidden_states)


class NoisyTopKRouter(LinearScores):
    """Noisy top-k gating (Shazeer 2017): while training, logits get Gaussian noise whose scale
    ``softplus(x @ noise_weight.T)`` is learned; weights are a softmax over the k kept logits
    (sum to 1). In eval mode it is plain top-k-then-softmax. ``router_probs`` is the softmax of
    the (noisy) logits, ``router_logits`` the clean logits.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02) -> None:
        super().__init__(hidden_size, num_experts, top_k, init_std)
        # Zero init, as in the paper: the noise starts at softplus(0) and is learned from there.
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Return the noisy top-k choice; weights sum to 1 per token."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        clean = self.logits(hidden_states).float()
        noisy = clean
        if self.training:
            scale = F.softplus(F.linear(hidden_states, self.noise_weight).float()) + 1e-2
            noisy = clean + torch.randn_like(clean) * scale
        indices, weights, probs = select_top_k(noisy, self.top_k, softmax_order="after")
        return RouterOutput(indices, weights, clean, probs, pair_mask(attention_mask, indices))


class DenseRouter(LinearScores):
    """Dense mixture: every token uses all E experts with softmax weights (sum to 1); k == E.

    The ``top_k`` argument is accepted for a uniform `build_router` call and ignored.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int | None = None, init_std: float = 0.02):
        super().__init__(hidden_size, num_experts, num_experts, init_std)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RouterOutput:
        """Return all experts for every token with their softmax weights."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.logits(hidden_states)
        probs = torch.softmax(logits.float(), dim=-1)
        indices = all_experts(logits.shape[0], self.num_experts, logits.device)
        return RouterOutput(indices, probs, logits, probs, pair_mask(attention_mask, indices))


class CosineRouter(TopKRouter):
    """X-MoE routing (Chi 2022): project tokens to a low dimension, L2-normalise tokens and expert
    embeddings, and score by cosine similarity over a learned temperature, against representation
    collapse. Selection and weights as `TopKRouter` (softmax before top-k, renormalised when
    ``normalize``).

    Parameters: ``projection`` (routing_dim, H), ``expert_embeddings`` (E, routing_dim),
    ``log_temperature`` (scalar, clamped to temperatures >= ``min_temperature``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        routing_dim: int = 16,
        temperature: float = 0.07,
        min_temperature: float = 0.01,
        normalize: bool = True,
        selection_bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, "before", normalize, "softmax", selection_bias, init_std)
        del self.weight
        self.projection = nn.Parameter(torch.empty(routing_dim, hidden_size))
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, routing_dim))
        nn.init.normal_(self.projection, std=init_std)
        nn.init.normal_(self.expert_embeddings, std=init_std)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.min_temperature = min_temperature

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return (T, E) cosine similarities divided by the temperature."""
        tokens = F.normalize(F.linear(hidden_states.float(), self.projection.float()), dim=-1)
        experts = F.normalize(self.expert_embeddings.float(), dim=-1)
        temperature = self.log_temperature.exp().clamp(min=self.min_temperature)
        return tokens @ experts.T / temperature
