"""Which routers of the `upcycle.moe.routing` zoo MoPE accepts, and building one for a module.

MoPE writes no router of its own. Every router of `upcycle.moe.routing.ROUTERS` whose dispatch
mode is ``"token"`` fits (``topk``, ``switch``, ``noisy_topk``, ``dense``, ``cosine``,
``dselect_k``, ``base``, ``sbase``, ``hash``, ``expert_choice``, ``sentence``); the last two look
at other tokens of the batch (not causal), which is fine for classification and leaks the future
in causal-LM training. ``soft`` and ``smear`` mix tokens or parameters, not experts' outputs per
token, and are refused.

This module reads the three router fields of a config (``router``, ``top_k``,
``router_options``) through `RouterSpec` and imports neither `mope.config` nor `mope.routing`, so
`mope.config` (which checks the router when a config is made) and `mope.layer` (which builds the
routers) both depend on it without depending on each other.
"""

from __future__ import annotations

from typing import Any, Protocol

from mope.errors import MoPEConfigError
from upcycle.errors import UpcycleError
from upcycle.moe.routing import ROUTERS, Router, build_router


class RouterSpec(Protocol):
    """The router fields of a `MoPEConfig`."""

    router: str
    top_k: int
    router_options: dict[str, Any]


def router_kind(spec: RouterSpec) -> str:
    """Return the router kind a config builds: ``"dense"`` whenever ``top_k == 0``."""
    return "dense" if spec.top_k == 0 else spec.router


def build_mope_router(spec: RouterSpec, in_features: int, num_experts: int) -> Router:
    """Build the router of one adapted module: ``num_experts`` logits from ``in_features`` inputs.

    Raises:
        MoPEConfigError: for an unknown router kind, one that does not fit MoPE, or options it rejects.
    """
    kind = router_kind(spec)
    if kind not in ROUTERS:
        raise MoPEConfigError(f"MoPEConfig: unknown router {spec.router!r}; valid kinds: {', '.join(sorted(ROUTERS))}.")
    if ROUTERS[kind].mode != "token":
        raise MoPEConfigError(
            f"MoPEConfig: router {kind!r} mixes tokens or parameters (mode {ROUTERS[kind].mode!r}), not "
            "per-token expert outputs, so it cannot drive LoRA experts; use 'topk', 'dense' or another "
            "token-choice router."
        )
    if kind == "dense" and spec.top_k != 0:
        raise MoPEConfigError(f"MoPEConfig: router='dense' uses every expert; set top_k=0 (got top_k={spec.top_k}).")
    top_k = num_experts if spec.top_k == 0 else spec.top_k
    try:
        return build_router(kind, in_features, num_experts, top_k, **spec.router_options)
    except UpcycleError as exc:
        raise MoPEConfigError(f"MoPEConfig: cannot build router {kind!r}: {exc}") from exc


def check_router_kind(spec: RouterSpec, expert_counts: list[int]) -> None:
    """Build a throw-away router for each expert count so that a bad router fails when the config is made.

    Raises:
        MoPEConfigError: see `build_mope_router`.
    """
    for num_experts in sorted(set(expert_counts)):
        build_mope_router(spec, 2, num_experts)
