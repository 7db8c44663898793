"""The generic MoE block and the routing zoo (DESIGN section 5)."""

from upcycle.moe.losses import load_balancing_loss, router_z_loss, tokens_per_expert
from upcycle.moe.routers import ROUTERS, Router, RouterOutput, build_router

__all__ = [
    "ROUTERS",
    "Router",
    "RouterOutput",
    "build_router",
    "load_balancing_loss",
    "router_z_loss",
    "tokens_per_expert",
]
