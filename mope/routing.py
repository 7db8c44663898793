"""How MoPE uses the routing zoo of `upcycle.moe`: choosing, building and reading routers.

MoPE writes no router of its own. Every router of `upcycle.moe.routers.ROUTERS` whose dispatch
mode is ``"token"`` fits (``topk``, ``switch``, ``noisy_topk``, ``dense``, ``cosine``,
``dselect_k``, ``base``, ``sbase``, ``hash``, ``expert_choice``, ``sentence``); the last two look
at other tokens of the batch (not causal), which is fine for classification and leaks the future
in causal-LM training. ``soft`` and ``smear`` mix tokens or parameters, not experts' outputs per
token, and are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mope.errors import MoPEConfigError
from upcycle.errors import UpcycleError
from upcycle.moe.routers import (
    ROUTERS,
    DenseRouter,
    HashRouter,
    NoisyTopKRouter,
    Router,
    RouterOutput,
    SwitchRouter,
    TopKRouter,
    build_router,
)

if TYPE_CHECKING:
    from mope.config import MoPEConfig


def router_kind(config: MoPEConfig) -> str:
    """Return the router kind a config builds: ``"dense"`` whenever ``top_k == 0``."""
    return "dense" if config.top_k == 0 else config.router


def build_mope_router(config: MoPEConfig, in_features: int, num_experts: int) -> Router:
    """Build the router of one adapted module.

    Raises:
        MoPEConfigError: for a router kind that does not fit MoPE or options it rejects.
    """
    kind = router_kind(config)
    if kind not in ROUTERS:
        raise MoPEConfigError(
            f"MoPEConfig: unknown router {config.router!r}; valid kinds: {', '.join(sorted(ROUTERS))}."
        )
    if ROUTERS[kind].mode != "token":
        raise MoPEConfigError(
            f"MoPEConfig: router {kind!r} mixes tokens or parameters (mode {ROUTERS[kind].mode!r}), not "
            "per-token expert outputs, so it cannot drive LoRA experts; use 'topk', 'dense' or another "
            "token-choice router."
        )
    if kind == "dense" and config.top_k != 0:
        raise MoPEConfigError(f"MoPEConfig: router='dense' uses every expert; set top_k=0 (got top_k={config.top_k}).")
    top_k = num_experts if config.top_k == 0 else config.top_k
    try:
        return build_router(kind, in_features, num_experts, top_k, **config.router_options)
    except UpcycleError as exc:
        raise MoPEConfigError(f"MoPEConfig: cannot build router {kind!r}: {exc}") from exc


def check_router_kind(config: MoPEConfig) -> None:
    """Build a throw-away router of the config's kind so a bad router fails when the config is made.

    Raises:
        MoPEConfigError: see `build_mope_router`.
    """
    counts = [config.num_experts, *config.num_experts_pattern.values()]
    for num_experts in sorted(set(counts)):
        build_mope_router(config, 2, num_experts)


def combine_weights(routing: RouterOutput, num_experts: int) -> torch.Tensor:
    """Scatter a router's (T, k) choice into dense (T, E) weights, zero for experts not chosen.

    Pairs with a False ``dispatch_mask`` (padding, expert-choice misses) get weight 0.
    """
    weights = routing.expert_weights
    if routing.dispatch_mask is not None:
        weights = weights * routing.dispatch_mask.to(weights.dtype)
    dense = weights.new_zeros(weights.shape[0], num_experts)
    return dense.scatter_add(1, routing.expert_indices, weights)


def is_softmax_renormalised(router: nn.Module) -> bool:
    """True when the router's weights are Mixtral's in eval mode: softmax over all experts of a
    bias-free linear map ``weight`` (E, H), top-k, renormalised to sum to 1.

    ``topk`` with ``softmax_order="after"`` and ``noisy_topk`` (in eval) compute a softmax over the k
    kept logits, which is the same thing; ``dense`` is the k == E case.
    """
    if type(router) is TopKRouter:
        return (
            router.score_fn == "softmax"
            and router.selection_bias is None
            and (router.normalize or router.softmax_order == "after")
        )
    return type(router) in (NoisyTopKRouter, DenseRouter)


def _weights_sum_to_one(router: nn.Module) -> bool:
    """True when the router's weights of a token's chosen experts always sum to 1."""
    if isinstance(router, SwitchRouter):
        return router.num_experts == 1  # the softmax of a single logit
    if isinstance(router, TopKRouter):
        return router.normalize or (router.softmax_order == "after" and router.score_fn == "softmax")
    return isinstance(router, (NoisyTopKRouter, DenseRouter, HashRouter))


def constant_routing_weights(router: nn.Module) -> torch.Tensor | None:
    """Return the (E,) weights every token gets when the router's output cannot depend on the
    token, else None.

    Two cases are recognised from the router's structure (never from samples):

    - one expert and weights that sum to 1: every token gets weight 1 for it;
    - a dense router (``top_k=0``) whose weight rows are all equal: every token's logits are
      equal, so its softmax is uniform, 1/E per expert.

    Every other router can give two tokens different weights, so a mixture it drives is not a
    fixed linear map.
    """
    weight = getattr(router, "weight", None)
    if router.num_experts == 1 and _weights_sum_to_one(router):
        dtype = weight.dtype if weight is not None else torch.float32
        return torch.ones(1, dtype=dtype, device=None if weight is None else weight.device)
    if type(router) is DenseRouter and torch.equal(weight, weight[:1].expand_as(weight)):
        return torch.full((router.num_experts,), 1.0 / router.num_experts, dtype=weight.dtype, device=weight.device)
    return None
