"""The generic MoE block and the routing zoo (DESIGN section 5).

`MoE` replaces a dense FFN; `build_router` makes any router of the zoo by name; the losses work
on any `RouterOutput`.
"""

from upcycle.moe.block import MoE, MoEStats, SharedExperts, collect_aux_loss, loss_free_bias_delta, moe_modules
from upcycle.moe.dispatch import apply_capacity, expert_capacity, grouped_linear
from upcycle.moe.experts import Experts
from upcycle.moe.ffn import DenseFFN, read_dense_ffn
from upcycle.moe.losses import load_balancing_loss, router_z_loss, tokens_per_expert
from upcycle.moe.memory import saved_activation_bytes
from upcycle.moe.routing import (
    ROUTERS,
    Router,
    RouterOutput,
    SequenceRouterOutput,
    SoftRouterOutput,
    build_router,
)

__all__ = [
    "ROUTERS",
    "DenseFFN",
    "Experts",
    "MoE",
    "MoEStats",
    "Router",
    "RouterOutput",
    "SequenceRouterOutput",
    "SharedExperts",
    "SoftRouterOutput",
    "apply_capacity",
    "build_router",
    "collect_aux_loss",
    "expert_capacity",
    "grouped_linear",
    "load_balancing_loss",
    "loss_free_bias_delta",
    "moe_modules",
    "read_dense_ffn",
    "router_z_loss",
    "saved_activation_bytes",
    "tokens_per_expert",
]
