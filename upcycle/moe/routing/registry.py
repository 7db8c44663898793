"""The router registry: `ROUTERS` maps each kind's name to its class, `build_router` makes one by
name and checks its options."""

from __future__ import annotations

import inspect

from upcycle.errors import UpcycleError
from upcycle.moe.routing.balanced import BASERouter, SBASERouter
from upcycle.moe.routing.base import Router
from upcycle.moe.routing.dselect import DSelectKRouter
from upcycle.moe.routing.expert_choice import ExpertChoiceRouter
from upcycle.moe.routing.hashing import HashRouter
from upcycle.moe.routing.sequence import SentenceRouter, SMEARRouter, SoftMoERouter
from upcycle.moe.routing.token_choice import CosineRouter, DenseRouter, NoisyTopKRouter, SwitchRouter, TopKRouter

__all__ = ["ROUTERS", "build_router"]


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
