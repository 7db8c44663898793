"""The generic MoE block: a router, stacked experts, optional shared experts, capacity, losses.

`MoE` is a drop-in replacement for a dense FFN module: ``moe(hidden_states)`` returns a tensor of
the same shape. The step's routing decision, statistics and auxiliary losses are kept on the
module (``last_router_output``, ``last_stats``, ``aux_loss``); `collect_aux_loss` sums them over a
model for the training loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.moe.dispatch import apply_capacity, combine_pairs, dispatch_rows, expert_capacity, plan_dispatch
from upcycle.moe.experts import Experts
from upcycle.moe.ffn import read_dense_ffn
from upcycle.moe.losses import load_balancing_loss, router_z_loss, tokens_per_expert
from upcycle.moe.routing import ROUTERS, Router, RouterOutput, build_router, flatten_token_mask

__all__ = ["MoE", "MoEStats", "SharedExperts", "collect_aux_loss", "moe_modules"]


@dataclass
class MoEStats:
    """One forward's routing statistics (detached) and losses (with gradient).

    Attributes:
        tokens_per_expert: (E,) computed (token, expert) pairs per expert.
        num_pairs: candidate pairs before capacity (real tokens x k).
        num_dropped: pairs dropped by the capacity limit.
        load_balancing_loss: Switch/GShard loss (1.0 when uniform).
        z_loss: ST-MoE router z-loss.
        aux_loss: ``load_balancing_coef * load_balancing_loss + z_loss_coef * z_loss``.
    """

    tokens_per_expert: torch.Tensor
    num_pairs: int
    num_dropped: int
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor

    @property
    def drop_rate(self) -> float:
        """Fraction of candidate pairs dropped by the capacity limit."""
        return self.num_dropped / max(self.num_pairs, 1)


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeekMoE / Qwen2-MoE): one FFN of ``num_shared * I`` units, with an
    optional per-token sigmoid gate (``gate``, a (1, H) linear) as in Qwen2-MoE.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str | Callable[[torch.Tensor], torch.Tensor],
        gated: bool = True,
        bias: bool = False,
        use_gate: bool = False,
    ) -> None:
        super().__init__()
        self.ffn = Experts(1, hidden_size, intermediate_size, activation, gated, bias)
        self.gate = nn.Linear(hidden_size, 1, bias=False) if use_gate else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, H)."""
        output = self.ffn.forward_batched(hidden_states[None])[0]
        if self.gate is not None:
            output = torch.sigmoid(self.gate(hidden_states)) * output
        return output


class MoE(nn.Module):
    """Mixture-of-Experts FFN.

    Args:
        hidden_size, intermediate_size: H and each expert's I.
        num_experts, top_k: E and k.
        router: a `Router`, or a kind for `build_router` (``"topk"``, ``"switch"``...).
        router_options: keyword options for `build_router`.
        activation: a transformers activation name or a callable / module.
        gated: GLU experts (gate/up/down) or plain MLP experts (up/down).
        bias: biases on the expert projections.
        num_shared_experts: always-on experts (0: none), fused into one FFN of that many times I.
        shared_expert_gate: a sigmoid gate on the shared experts' output (Qwen2-MoE).
        capacity_factor: None (no limit) or the factor in
            ``capacity = ceil(factor * tokens * k / E)``; pairs beyond it are dropped (the token
            keeps its residual path). Token-choice routers only; expert-choice has its own.
        capacity_priority: ``"order"`` (drop late tokens first) or ``"score"`` (V-MoE
            batch-prioritised: drop the lowest-scoring tokens first).
        load_balancing_coef, z_loss_coef: weights of the losses summed into ``aux_loss``.
        bias_update_rate: > 0 turns on DeepSeek-V3 loss-free balancing: after each training
            forward the router's ``selection_bias`` moves by this rate against the measured load
            (needs a router with a selection bias; built automatically from a kind).

    Raises:
        UpcycleError: for inconsistent options.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int = 2,
        router: str | Router = "topk",
        router_options: dict | None = None,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
        gated: bool = True,
        bias: bool = False,
        num_shared_experts: int = 0,
        shared_expert_gate: bool = False,
        capacity_factor: float | None = None,
        capacity_priority: str = "order",
        load_balancing_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        bias_update_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(router, str):
            options = dict(router_options or {})
            takes_bias = "selection_bias" in inspect.signature(ROUTERS.get(router, Router).__init__).parameters
            if bias_update_rate > 0 and takes_bias:
                options.setdefault("selection_bias", True)
            router = build_router(router, hidden_size, num_experts, top_k, **options)
        if router.num_experts != num_experts:
            raise UpcycleError(f"the router has {router.num_experts} experts but the block {num_experts}.")
        if bias_update_rate > 0 and getattr(router, "selection_bias", None) is None:
            raise UpcycleError(
                f"bias_update_rate needs a router with a selection bias (topk, switch, cosine with "
                f"selection_bias=True); {type(router).__name__} has none."
            )
        if capacity_priority not in ("order", "score"):
            raise UpcycleError(f"capacity_priority must be 'order' or 'score', got {capacity_priority!r}.")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.router = router
        self.experts = Experts(num_experts, hidden_size, intermediate_size, activation, gated, bias)
        self.shared_experts = (
            SharedExperts(
                hidden_size,
                num_shared_experts * intermediate_size,
                activation,
                gated,
                bias,
                shared_expert_gate,
            )
            if num_shared_experts > 0
            else None
        )
        self.capacity_factor = capacity_factor
        self.capacity_priority = capacity_priority
        self.load_balancing_coef = load_balancing_coef
        self.z_loss_coef = z_loss_coef
        self.bias_update_rate = bias_update_rate
        self.last_router_output: RouterOutput | None = None
        self.last_stats: MoEStats | None = None

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The last forward's weighted auxiliary loss (None before the first forward)."""
        return None if self.last_stats is None else self.last_stats.aux_loss

    @classmethod
    def from_dense(
        cls,
        ffn: nn.Module,
        num_experts: int,
        top_k: int = 2,
        router: str | Router = "topk",
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        noise_std: float = 0.0,
        **options: object,
    ) -> MoE:
        """Build a MoE whose every expert is a copy of a dense FFN (sparse upcycling).

        With a router whose weights sum to 1 (e.g. ``topk`` with ``normalize=True``, the default)
        and no capacity limit, the block reproduces ``ffn`` exactly (up to float rounding).

        Args:
            ffn: the dense FFN module (see `upcycle.moe.ffn.read_dense_ffn` for the layouts).
            num_experts, top_k, router: as in `MoE`.
            activation: overrides the activation found on ``ffn``.
            noise_std: standard deviation of Gaussian noise added to each copy (0: exact copies).
            options: any other `MoE` argument.

        Returns:
            The MoE, on the FFN's device and dtype.

        Raises:
            UpcycleError: when the FFN's layout is unknown.
        """
        dense = read_dense_ffn(ffn, activation)
        moe = cls(
            dense.hidden_size,
            dense.intermediate_size,
            num_experts,
            top_k,
            router=router,
            activation=dense.activation,
            gated=dense.gated,
            bias=dense.in_bias is not None or dense.down_bias is not None,
            **options,
        ).to(device=dense.down_weight.device, dtype=dense.down_weight.dtype)
        with torch.no_grad():
            experts = moe.experts
            experts.in_proj.copy_(dense.in_weight.expand_as(experts.in_proj))
            experts.down_proj.copy_(dense.down_weight.expand_as(experts.down_proj))
            if experts.in_proj_bias is not None:
                experts.in_proj_bias.copy_(
                    _or_zeros(dense.in_bias, dense.in_weight.shape[0]).expand_as(experts.in_proj_bias)
                )
                experts.down_proj_bias.copy_(
                    _or_zeros(dense.down_bias, dense.hidden_size).expand_as(experts.down_proj_bias)
                )
            if noise_std > 0:
                experts.in_proj.add_(torch.randn_like(experts.in_proj) * noise_std)
                experts.down_proj.add_(torch.randn_like(experts.down_proj) * noise_std)
        return moe

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **router_kwargs: object
    ) -> torch.Tensor:
        """Route, run the experts, and combine.

        Args:
            hidden_states: (..., H); (B, S, H) gives sequence-level routers their batch structure.
            attention_mask: optional padding mask with one entry per token (1 = real).
            router_kwargs: passed to the router (e.g. ``input_ids`` for hash routing).

        Returns:
            A tensor of the input's shape. Also sets ``last_router_output`` and ``last_stats``.
        """
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        routing = self.router(hidden_states, attention_mask, **router_kwargs)
        if self.router.mode == "soft":
            output = self._soft_forward(hidden_states, routing)
            kept = routing.dispatch_mask
        elif self.router.mode == "merge":
            output = self._merged_forward(hidden_states, routing)
            kept = routing.dispatch_mask
        else:
            kept = routing.dispatch_mask
            if self.capacity_factor is not None and routing.expert_indices.shape[1] < self.num_experts:
                num_real = flat.shape[0] if kept is None else int(kept[:, 0].sum())
                capacity = expert_capacity(self.capacity_factor, num_real, self.top_k, self.num_experts)
                kept = apply_capacity(
                    routing.expert_indices,
                    routing.expert_weights,
                    kept,
                    capacity,
                    self.num_experts,
                    self.capacity_priority,
                )
            output = self._sparse_forward(flat, routing, kept)
        if self.shared_experts is not None:
            output = output + self.shared_experts(flat)
        self._record(routing, kept, attention_mask, flat.shape[0])
        return output.reshape(shape)

    def _sparse_forward(
        self, hidden_states: torch.Tensor, routing: RouterOutput, kept: torch.Tensor | None
    ) -> torch.Tensor:
        plan = plan_dispatch(routing.expert_indices, kept, self.num_experts)
        expert_out = self.experts(dispatch_rows(hidden_states, plan), plan.group_sizes)
        return combine_pairs(expert_out, routing.expert_weights, plan)

    def _soft_forward(self, hidden_states: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        dispatch, combine = routing.dispatch_weights, routing.combine_weights
        batch, seq, num_slots = dispatch.shape
        sequences = hidden_states.reshape(batch, seq, -1)
        slots = torch.einsum("bsn,bsh->bnh", dispatch.to(sequences.dtype), sequences)
        per_expert = num_slots // self.num_experts
        slots = slots.reshape(batch, self.num_experts, per_expert, -1).transpose(0, 1)
        slot_out = self.experts.forward_batched(slots.reshape(self.num_experts, batch * per_expert, -1))
        slot_out = slot_out.reshape(self.num_experts, batch, per_expert, -1).transpose(0, 1)
        slot_out = slot_out.reshape(batch, num_slots, -1)
        output = torch.einsum("bsn,bnh->bsh", combine.to(slot_out.dtype), slot_out)
        return output.reshape(-1, output.shape[-1])

    def _merged_forward(self, hidden_states: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        coefficients = routing.sequence_probs
        sequences = hidden_states.reshape(coefficients.shape[0], -1, hidden_states.shape[-1])
        output = self.experts.forward_merged(sequences, coefficients)
        return output.reshape(-1, output.shape[-1])

    def _record(
        self,
        routing: RouterOutput,
        kept: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        num_tokens: int,
    ) -> None:
        token_mask = flatten_token_mask(attention_mask, num_tokens)
        balance = load_balancing_loss(routing.router_probs, routing.expert_indices, self.num_experts, token_mask)
        z_loss = router_z_loss(routing.router_logits, token_mask)
        with torch.no_grad():
            load = tokens_per_expert(routing.expert_indices, self.num_experts, kept, token_mask)
            candidates = tokens_per_expert(routing.expert_indices, self.num_experts, routing.dispatch_mask, token_mask)
            num_pairs = int(candidates.sum())
        self.last_router_output = routing
        self.last_stats = MoEStats(
            tokens_per_expert=load,
            num_pairs=num_pairs,
            num_dropped=num_pairs - int(load.sum()),
            load_balancing_loss=balance,
            z_loss=z_loss,
            aux_loss=self.load_balancing_coef * balance + self.z_loss_coef * z_loss,
        )
        if self.training and self.bias_update_rate > 0:
            self.update_selection_bias(load)

    @torch.no_grad()
    def update_selection_bias(self, load: torch.Tensor) -> None:
        """DeepSeek-V3 loss-free balancing: raise the bias of under-loaded experts and lower that
        of over-loaded ones by ``bias_update_rate`` (sign of the deviation from the mean load).

        Call it yourself with an all-reduced load under data parallelism; the training forward
        calls it with the local load.
        """
        bias = self.router.selection_bias
        bias.add_(loss_free_bias_delta(load, self.bias_update_rate).to(bias.dtype))

    def extra_repr(self) -> str:
        return (
            f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"capacity_priority={self.capacity_priority!r}, bias_update_rate={self.bias_update_rate}"
        )


def loss_free_bias_delta(load: torch.Tensor, rate: float) -> torch.Tensor:
    """Return DeepSeek-V3's loss-free balancing step for per-expert selection biases:
    ``rate * sign(mean(load) - load)`` (float32, shape of `load`), which raises the bias of
    under-loaded experts, lowers that of over-loaded ones and leaves an expert at the mean alone."""
    load = load.float()
    return rate * torch.sign(load.mean() - load)


def _or_zeros(tensor: torch.Tensor | None, size: int) -> torch.Tensor:
    return torch.zeros(size) if tensor is None else tensor


def moe_modules(model: nn.Module) -> list[tuple[str, MoE]]:
    """Return ``(name, module)`` for every `MoE` block in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum the last forward's ``aux_loss`` over every `MoE` block (None when there is none)."""
    losses = [module.aux_loss for _, module in moe_modules(model) if module.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
