"""Old import path of the routing zoo, kept only for the modules outside `upcycle.moe` that still
import from it (`mope.routing`, `mope.layer`, `mope.training`, `tests/peft_mope`).

The zoo lives in `upcycle.moe.routing`; import from there (or from `upcycle.moe`). This module
re-exports exactly the names those callers use and is to be deleted once they have moved.
"""

from upcycle.moe.routing import (
    ROUTERS,
    CosineRouter,
    DenseRouter,
    HashRouter,
    NoisyTopKRouter,
    Router,
    RouterOutput,
    SwitchRouter,
    TopKRouter,
    build_router,
    flatten_token_mask,
)

__all__ = [
    "ROUTERS",
    "CosineRouter",
    "DenseRouter",
    "HashRouter",
    "NoisyTopKRouter",
    "Router",
    "RouterOutput",
    "SwitchRouter",
    "TopKRouter",
    "build_router",
    "flatten_token_mask",
]
