"""The routing zoo: each router turns hidden states into a `RouterOutput`.

Every router is an `nn.Module` subclass of `Router` with one job, called as
``router(hidden_states, attention_mask=None)`` where ``hidden_states`` is (T, H) (or (B, S, H))
and ``attention_mask`` is an optional (B, S) or (T,) padding mask (1 = real token). Build one by
name with `build_router`.

Three dispatch modes, read by `upcycle.moe.MoE` from ``Router.mode``:

- ``"token"``: the output's ``(expert_indices, expert_weights)`` say which experts compute each
  token and how to weight them; pairs whose ``dispatch_mask`` is False are skipped. Expert-choice
  routing fits here with k == E and a ``dispatch_mask`` marking the tokens each expert picked.
- ``"soft"`` (Soft MoE): experts process slots, convex combinations of tokens; the output is a
  `SoftRouterOutput` carrying the dispatch and combine weights.
- ``"merge"`` (SMEAR): one merged expert per sequence, its parameters averaged with the
  sequence's routing weights; the output is a `SequenceRouterOutput`.

For routers whose selection is dense (dense, soft, merge) ``expert_indices`` is
``arange(E)`` for every token and k == E.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.errors import UpcycleError

__all__ = [
    "ROUTERS",
    "BASERouter",
    "CosineRouter",
    "DSelectKRouter",
    "DenseRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "NoisyTopKRouter",
    "Router",
    "RouterOutput",
    "SBASERouter",
    "SMEARRouter",
    "SentenceRouter",
    "SequenceRouterOutput",
    "SoftMoERouter",
    "SoftRouterOutput",
    "SwitchRouter",
    "TopKRouter",
    "build_router",
    "flatten_token_mask",
    "select_top_k",
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


def _as_sequences(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
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


def _all_experts(num_tokens: int, num_experts: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_experts, device=device).expand(num_tokens, num_experts)


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


class _LinearScores(Router):
    """A router whose scores are a bias-free linear map, stored as ``weight`` (E, H)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, init_std: float = 0.02) -> None:
        super().__init__(hidden_size, num_experts, top_k)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return (T, E) logits for (T, H) hidden states."""
        return F.linear(hidden_states, self.weight)


class TopKRouter(_LinearScores):
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
        return RouterOutput(indices, weights, logits, probs, _pair_mask(attention_mask, indices))


def _pair_mask(attention_mask: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor | None:
    mask = flatten_token_mask(attention_mask, indices.shape[0])
    return None if mask is None else mask[:, None].expand_as(indices)


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


class NoisyTopKRouter(_LinearScores):
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
        return RouterOutput(indices, weights, clean, probs, _pair_mask(attention_mask, indices))


class DenseRouter(_LinearScores):
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
        indices = _all_experts(logits.shape[0], self.num_experts, logits.device)
        return RouterOutput(indices, probs, logits, probs, _pair_mask(attention_mask, indices))


class ExpertChoiceRouter(_LinearScores):
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
        indices = _all_experts(num_tokens, self.num_experts, logits.device)
        return RouterOutput(indices, probs * chosen, logits, probs, chosen)


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
        sequences, mask = _as_sequences(hidden_states, attention_mask)
        tokens = F.normalize(sequences.float(), dim=-1)
        slots = F.normalize(self.slot_embeddings.float(), dim=-1) * self.scale
        slot_logits = tokens @ slots.T  # (B, S, E * slots)
        dispatch = torch.softmax(slot_logits.masked_fill(~mask[..., None], float("-inf")), dim=1)
        combine = torch.softmax(slot_logits, dim=-1)
        num_tokens = mask.numel()
        per_expert = (num_tokens, self.num_experts, self.slots_per_expert)
        logits = slot_logits.reshape(per_expert).logsumexp(-1)
        weights = combine.reshape(per_expert).sum(-1)
        indices = _all_experts(num_tokens, self.num_experts, logits.device)
        return SoftRouterOutput(
            indices,
            weights,
            logits,
            weights,
            mask.reshape(-1, 1).expand_as(indices),
            dispatch_weights=dispatch,
            combine_weights=combine,
        )


class SentenceRouter(_LinearScores):
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
        sequences, mask = _as_sequences(hidden_states, attention_mask)
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
        indices = _all_experts(token_probs.shape[0], self.num_experts, logits.device)
        return SequenceRouterOutput(
            indices,
            token_probs,
            logits.repeat_interleave(seq_len, 0),
            token_probs,
            mask.reshape(-1, 1).expand_as(indices),
            sequence_probs=probs,
        )


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


class BASERouter(_LinearScores):
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
        return RouterOutput(indices, weights, logits, probs, _pair_mask(attention_mask, indices))


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


class SBASERouter(_LinearScores):
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
        return RouterOutput(indices, weights, logits, probs, _pair_mask(attention_mask, indices))


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
        return RouterOutput(indices, weights, logits, mixture, _pair_mask(attention_mask, indices))


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
        return RouterOutput(indices, weights, logits, probs, _pair_mask(attention_mask, indices))


ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "switch": SwitchRouter,
    "noisy_topk": NoisyTopKRouter,
    "dense": DenseRouter,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftMoERouter,
    "smear": SMEARRouter,
    "base": BASERouter,
    "sbase": SBASERouter,
    "dselect_k": DSelectKRouter,
    "sentence": SentenceRouter,
    "cosine": CosineRouter,
    "hash": HashRouter,
}


def build_router(kind: str, hidden_size: int, num_experts: int, top_k: int, **options: object) -> Router:
    """Build a router by name.

    Args:
        kind: one of `ROUTERS` (``"topk"``, ``"switch"``, ``"noisy_topk"``, ``"dense"``, ...).
        hidden_size, num_experts, top_k: the block's shape; routers that fix k (dense, soft,
            smear) ignore ``top_k``.
        options: the router's own keyword arguments (e.g. ``softmax_order="after"``).

    Returns:
        The router module.

    Raises:
        UpcycleError: for an unknown kind or an option the router does not take.
    """
    if kind not in ROUTERS:
        raise UpcycleError(f"unknown router kind {kind!r}; valid kinds: {', '.join(sorted(ROUTERS))}.")
    router_cls = ROUTERS[kind]
    accepted = [
        name
        for name in inspect.signature(router_cls.__init__).parameters
        if name not in ("self", "hidden_size", "num_experts", "top_k")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UpcycleError(
            f"router {kind!r} does not take option(s) {', '.join(unknown)}; "
            f"its options: {', '.join(accepted) or '(none)'}."
        )
    return router_cls(hidden_size, num_experts, top_k, **options)
