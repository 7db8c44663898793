"""How MoPE reads the routers of `upcycle.moe.routing`: routing weights, and whether a router's
weights are Mixtral's (for `mope.export`) or constant over tokens (for merging).

Which routers MoPE accepts and building them is `mope.router_kinds`.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.moe.routing import DenseRouter, HashRouter, NoisyTopKRouter, RouterOutput, SwitchRouter, TopKRouter


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
