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

Modules, one job each: `output` (the `RouterOutput` types and mask helpers), `base` (the `Router`
interface, linear scores, `select_top_k`), `token_choice` (top-k, Switch, noisy top-k, dense,
cosine), `expert_choice`, `sequence` (Soft MoE, sentence-level, SMEAR), `balanced` (BASE,
S-BASE), `dselect` (DSelect-k), `hashing` (hash routing) and `registry` (`ROUTERS`,
`build_router`).
"""

from upcycle.moe.routing.balanced import BASERouter, SBASERouter, balanced_assignment, balanced_capacity, sinkhorn
from upcycle.moe.routing.base import Router, select_top_k
from upcycle.moe.routing.dselect import DSelectKRouter, smooth_step
from upcycle.moe.routing.expert_choice import ExpertChoiceRouter
from upcycle.moe.routing.hashing import HashRouter
from upcycle.moe.routing.output import RouterOutput, SequenceRouterOutput, SoftRouterOutput, flatten_token_mask
from upcycle.moe.routing.registry import ROUTERS, build_router
from upcycle.moe.routing.sequence import SentenceRouter, SMEARRouter, SoftMoERouter
from upcycle.moe.routing.token_choice import CosineRouter, DenseRouter, NoisyTopKRouter, SwitchRouter, TopKRouter

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
    "balanced_assignment",
    "balanced_capacity",
    "build_router",
    "flatten_token_mask",
    "select_top_k",
    "sinkhorn",
    "smooth_step",
]
