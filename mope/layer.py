"""MoPE layers: a routed mixture of LoRA experts on a linear layer (`Linear`) or on a gated FFN
block (`GatedFFNBlock`), both `BaseTunerLayer`s like PEFT's own.

Parameter layout (per adapter, E experts of rank r; each expert is a LoRA pair, ``B_i @ A_i``):

- ``mope_A``: (E, r, in_features), or (1, r, in_features) with ``share_a`` (HydraLoRA).
- ``mope_B``: (E, out_features, r).
- ``mope_shared_A`` (r, in_features) / ``mope_shared_B`` (out_features, r): the always-on
  expert of ``shared_expert``.
- ``mope_router``: an `upcycle.moe.routing.Router` (E logits from the layer's or block's input).

Why the experts are stacked rather than looped over: with the (T, E) routing weights ``g``
(zero for experts a token did not pick) the routed update is
``sum_i g_i B_i A_i x = B_stack @ (g ⊙ (A_stack @ x))`` where ``A_stack`` is (E·r, in) and
``B_stack`` is (out, E·r). That is two matmuls of the shape of one LoRA of rank E·r plus an
elementwise product, whatever E and k are: a top-2-of-8 layer of rank 8 costs what a LoRA of
rank 64 costs, which is the LoRA with the same number of trainable parameters. Gathering each
token's k experts instead would save FLOPs only when E·r is large against in/out features, at
the price of (T, k, r, in) gathered weights; for the ranks MoPE uses the dense form is faster.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from mope.errors import MoPEError, MoPEMergeError
from mope.router_kinds import build_mope_router
from mope.routing import combine_weights, constant_routing_weights
from upcycle.moe.routing import RouterOutput

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def is_gated_ffn(module: nn.Module | None) -> bool:
    """True for a Llama-style gated FFN block: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
    if module is None:
        return False
    if isinstance(module, GatedFFNBlock):
        module = module.get_base_layer()
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in FFN_PROJECTIONS) and callable(
        getattr(module, "act_fn", None)
    )


def stacked_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return ``sum_i weights[:, i] * B_i A_i x`` for all experts at once.

    Args:
        x: (T, in) input.
        lora_a: (E_A, r, in) with E_A in (E, 1) (1: one A shared by all experts).
        lora_b: (E, out, r).
        weights: (T, E) per-token expert weights (scaling included, zero for unpicked experts).

    Returns:
        (T, out).
    """
    num_a, rank, in_features = lora_a.shape
    num_experts, out_features, _ = lora_b.shape
    hidden = F.linear(x, lora_a.reshape(num_a * rank, in_features)).view(-1, num_a, rank)
    hidden = hidden * weights.unsqueeze(-1)  # (T, E, r); broadcasts a shared A over the experts
    stacked_b = lora_b.permute(1, 0, 2).reshape(out_features, num_experts * rank)
    return F.linear(hidden.reshape(-1, num_experts * rank), stacked_b)


def _init_experts(lora_a: torch.Tensor, lora_b: torch.Tensor, zero_b: bool) -> None:
    # LoRA's init per expert: kaiming-uniform(a=sqrt(5)) A, i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero
    # so the adapted model starts as the base model (or the same kaiming bound when not zero_b).
    with torch.no_grad():
        nn.init.uniform_(lora_a, -1 / math.sqrt(lora_a.shape[-1]), 1 / math.sqrt(lora_a.shape[-1]))
        if zero_b:
            lora_b.zero_()
        else:
            nn.init.uniform_(lora_b, -1 / math.sqrt(lora_b.shape[-1]), 1 / math.sqrt(lora_b.shape[-1]))


class MoPELayer(BaseTunerLayer):
    """State and routing shared by MoPE's layers; ``last_routing[adapter]`` holds the
    `RouterOutput` of the last forward (read by `mope.aux_loss` and `mope.router_stats`)."""

    adapter_layer_names = ("mope_A", "mope_B", "mope_shared_A", "mope_shared_B", "mope_router")
    other_param_names = (
        "r",
        "scaling",
        "num_experts",
        "mope_dropout",
        "aux_loss_coef",
        "z_loss_coef",
        "router_noise",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.aux_loss_coef: dict[str, float] = {}
        self.z_loss_coef: dict[str, float] = {}
        self.router_noise: dict[str, float] = {}
        self.mope_dropout = nn.ModuleDict({})
        self.mope_router = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.last_routing: dict[str, RouterOutput] = {}
        self.kwargs = kwargs

    def _update_common(self, adapter_name: str, config, num_experts: int, router_in_features: int) -> None:
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.lora_alpha / config.r
        self.num_experts[adapter_name] = num_experts
        self.aux_loss_coef[adapter_name] = config.aux_loss_coef
        self.z_loss_coef[adapter_name] = config.z_loss_coef
        self.router_noise[adapter_name] = config.router_noise
        self.mope_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.mope_router[adapter_name] = build_mope_router(config, router_in_features, num_experts)

    def _finish_update(self, adapter_name: str, config) -> None:
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def route(self, adapter_name: str, hidden_states: torch.Tensor) -> RouterOutput:
        """Run the adapter's router on (..., H) hidden states and remember the result."""
        router = self.mope_router[adapter_name]
        parameter = next(router.parameters(), None)
        router_input = hidden_states if parameter is None else hidden_states.to(parameter.dtype)
        jitter = self.router_noise[adapter_name]
        if self.training and jitter > 0:
            # Switch/Mixtral router jitter: multiplicative uniform noise on the router input only.
            router_input = router_input * torch.empty_like(router_input).uniform_(1 - jitter, 1 + jitter)
        routing = router(router_input)
        self.last_routing[adapter_name] = routing
        return routing

    def constant_routing_weights(self, adapter_name: str) -> torch.Tensor:
        """Return the (E,) weights every token gets, for routing that does not depend on the token.

        Raises:
            MoPEMergeError: when the weights depend on the token.
        """
        router = self.mope_router[adapter_name]
        weights = constant_routing_weights(router)
        if weights is None:
            raise MoPEMergeError(
                f"adapter {adapter_name!r} routes each token to {router.top_k} of {router.num_experts} experts "
                f"with a {type(router).__name__} whose weights depend on the token, so no single weight "
                "matrix reproduces it and merging would change the model. Mergeable: modules with one expert "
                "(num_experts=1, or 1 through num_experts_pattern; the shared expert merges with it) and "
                "top_k=0 routers whose rows are all equal (uniform weights). Keep the PeftModel, or export "
                "a routing='block' adapter to a MoE checkpoint with mope.export(model, out)."
            )
        return weights

    def check_mergeable(self, adapter_name: str) -> None:
        """Raise `MoPEMergeError` unless merging ``adapter_name`` into the base weights is exact."""
        self.constant_routing_weights(adapter_name)


class Linear(nn.Module, MoPELayer):
    """A linear layer with a routed mixture of LoRA experts (``routing="linear"``: its own router
    reads this layer's input)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, num_experts: int, **kwargs: Any) -> None:
        super().__init__()
        MoPELayer.__init__(self, base_layer, **kwargs)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.mope_A = nn.ParameterDict({})
        self.mope_B = nn.ParameterDict({})
        self.mope_shared_A = nn.ParameterDict({})
        self.mope_shared_B = nn.ParameterDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts)

    def update_layer(self, adapter_name: str, config, num_experts: int) -> None:
        """Add (or replace) the experts and router of ``adapter_name``."""
        self._update_common(adapter_name, config, num_experts, self.in_features)
        num_a = 1 if config.share_a else num_experts
        lora_a = torch.empty(num_a, config.r, self.in_features)
        lora_b = torch.empty(num_experts, self.out_features, config.r)
        _init_experts(lora_a, lora_b, config.init_weights)
        self.mope_A[adapter_name] = nn.Parameter(lora_a)
        self.mope_B[adapter_name] = nn.Parameter(lora_b)
        if config.shared_expert:
            shared_a = torch.empty(1, config.r, self.in_features)
            shared_b = torch.empty(1, self.out_features, config.r)
            _init_experts(shared_a, shared_b, config.init_weights)
            self.mope_shared_A[adapter_name] = nn.Parameter(shared_a[0])
            self.mope_shared_B[adapter_name] = nn.Parameter(shared_b[0])
        self._finish_update(adapter_name, config)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Return the (out, in) weight change of an adapter whose routing is constant.

        Raises:
            MoPEMergeError: when the routing depends on the token.
        """
        weights = self.constant_routing_weights(adapter_name).to(self.mope_B[adapter_name].dtype)
        lora_a = self.mope_A[adapter_name].expand(weights.shape[0], -1, -1)
        delta = torch.einsum("e,eor,eri->oi", weights, self.mope_B[adapter_name], lora_a)
        if adapter_name in self.mope_shared_A:
            delta = delta + self.mope_shared_B[adapter_name] @ self.mope_shared_A[adapter_name]
        return delta * self.scaling[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' constant-routing updates into the base weight.

        Raises:
            MoPEMergeError: for an adapter whose routing depends on the token.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_layer = self.get_base_layer()
        for adapter_name in adapter_names:
            if adapter_name not in self.mope_A:
                continue
            delta = self.get_delta_weight(adapter_name).to(base_layer.weight.dtype)
            merged = base_layer.weight.data + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise MoPEError(f"merging adapter {adapter_name!r} produced non-finite weights.")
            base_layer.weight.data = merged
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract the merged adapters again."""
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            base_layer.weight.data -= self.get_delta_weight(adapter_name).to(base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name not in self.mope_A:
                continue
            lora_a = self.mope_A[adapter_name]
            x_cast = self._cast_input_dtype(x, lora_a.dtype)
            tokens = x_cast.reshape(-1, self.in_features)
            routing = self.route(adapter_name, x_cast)
            weights = combine_weights(routing, self.num_experts[adapter_name]).to(lora_a.dtype)
            scaling = self.scaling[adapter_name]
            dropped = self.mope_dropout[adapter_name](tokens)
            delta = stacked_lora(dropped, lora_a, self.mope_B[adapter_name], weights * scaling)
            if adapter_name in self.mope_shared_A:
                shared = F.linear(F.linear(dropped, self.mope_shared_A[adapter_name]), self.mope_shared_B[adapter_name])
                delta = delta + shared * scaling
            result = result + delta.view(*x.shape[:-1], self.out_features).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "mope." + super().__repr__()


class GatedFFNBlock(nn.Module, MoPELayer):
    """A gated FFN block (``down(act(gate(x)) * up(x))``) turned into a mixture of LoRA-adapted
    FFN experts with one router (``routing="block"``, MixLoRA).

    Expert i is the FFN with ``W_p + scaling * B_{p,i} A_{p,i}`` in each adapted projection p;
    the block returns ``sum_i g_i(x) * FFN_i(x)`` over the token's chosen experts, which is what a
    Mixtral sparse MoE block computes. The frozen base matmuls run once per token; only the
    intermediate activations (T, k, I) and the experts' low-rank parts are per chosen expert.
    The ``mope_*`` containers hold one ``ParameterDict`` per adapter, keyed by projection name.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config,
        num_experts: int,
        projections: tuple[str, ...],
        **kwargs: Any,
    ) -> None:
        super().__init__()
        MoPELayer.__init__(self, base_layer, **kwargs)
        self.mope_A = nn.ModuleDict({})
        self.mope_B = nn.ModuleDict({})
        self.mope_shared_A = nn.ModuleDict({})
        self.mope_shared_B = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts, projections)

    @property
    def hidden_size(self) -> int:
        return self.get_base_layer().gate_proj.in_features

    def update_layer(self, adapter_name: str, config, num_experts: int, projections: tuple[str, ...]) -> None:
        """Add (or replace) the experts of ``adapter_name`` on ``projections`` and its block router."""
        self._update_common(adapter_name, config, num_experts, self.hidden_size)
        base = self.get_base_layer()
        experts_a, experts_b = nn.ParameterDict({}), nn.ParameterDict({})
        shared_a, shared_b = nn.ParameterDict({}), nn.ParameterDict({})
        for name in projections:
            linear = getattr(base, name)
            lora_a = torch.empty(1 if config.share_a else num_experts, config.r, linear.in_features)
            lora_b = torch.empty(num_experts, linear.out_features, config.r)
            _init_experts(lora_a, lora_b, config.init_weights)
            experts_a[name], experts_b[name] = nn.Parameter(lora_a), nn.Parameter(lora_b)
            if config.shared_expert:
                one_a = torch.empty(1, config.r, linear.in_features)
                one_b = torch.empty(1, linear.out_features, config.r)
                _init_experts(one_a, one_b, config.init_weights)
                shared_a[name], shared_b[name] = nn.Parameter(one_a[0]), nn.Parameter(one_b[0])
        self.mope_A[adapter_name] = experts_a
        self.mope_B[adapter_name] = experts_b
        if config.shared_expert:
            self.mope_shared_A[adapter_name] = shared_a
            self.mope_shared_B[adapter_name] = shared_b
        self._finish_update(adapter_name, config)

    def adapted_projections(self, adapter_name: str) -> tuple[str, ...]:
        """The projections of this block that carry experts of ``adapter_name``."""
        return tuple(self.mope_A[adapter_name].keys())

    def expert_delta_weights(self, adapter_name: str, projection: str, expert: int | None = None) -> torch.Tensor:
        """Return the (E, out, in) weight change of each expert on one projection, the shared
        expert and the scaling included (expert i's weight is ``W + result[i]``); with `expert`,
        that expert's (out, in) change alone, the same values (an exporter writing one expert at a
        time computed all E for each: 8x the work and the memory at E = 8)."""
        lora_a = self.mope_A[adapter_name][projection]
        lora_b = self.mope_B[adapter_name][projection]
        if expert is not None:
            lora_b = lora_b[expert : expert + 1]
            lora_a = lora_a[expert : expert + 1] if lora_a.shape[0] > 1 else lora_a
        delta = torch.einsum("eor,eri->eoi", lora_b, lora_a.expand(lora_b.shape[0], -1, -1))
        if adapter_name in self.mope_shared_A:
            delta.add_(self.mope_shared_B[adapter_name][projection] @ self.mope_shared_A[adapter_name][projection])
        delta.mul_(self.scaling[adapter_name])  # in place: no second (E, out, in) tensor
        return delta if expert is None else delta[0]

    def check_mergeable(self, adapter_name: str) -> None:
        """Raise `MoPEMergeError` unless the block has one expert: a weighted sum of several FFNs is
        no single FFN (the activation sits between the projections), even with constant weights."""
        if self.num_experts[adapter_name] > 1:
            raise MoPEMergeError(
                f"adapter {adapter_name!r} mixes {self.num_experts[adapter_name]} FFN experts in this block; a "
                "sum of FFNs is not one FFN, so it cannot be merged into the dense weights. Export it to a MoE "
                "checkpoint with mope.export(model, out), or keep the PeftModel."
            )
        self.constant_routing_weights(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold a one-expert block adapter into the FFN's weights.

        Raises:
            MoPEMergeError: when the block has more than one expert (a sum of FFNs is no FFN).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter_name in adapter_names:
            if adapter_name not in self.mope_A:
                continue
            self.check_mergeable(adapter_name)
            for projection in self.adapted_projections(adapter_name):
                linear = getattr(base, projection)
                merged = linear.weight.data + self.expert_delta_weights(adapter_name, projection)[0].to(
                    linear.weight.dtype
                )
                if safe_merge and not torch.isfinite(merged).all():
                    raise MoPEError(f"merging adapter {adapter_name!r} produced non-finite weights.")
                linear.weight.data = merged
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract the merged adapters again."""
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            for projection in self.adapted_projections(adapter_name):
                linear = getattr(base, projection)
                delta = self.expert_delta_weights(adapter_name, projection)[0]
                linear.weight.data -= delta.to(linear.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.mope_A]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise MoPEError(
                f"adapters {active} are active on the same FFN block with routing='block'; a block runs one "
                "mixture at a time. Activate one of them with model.set_adapter(name)."
            )
        return self._mixture_forward(active[0], x)

    def _mixture_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        experts_a, experts_b = self.mope_A[adapter_name], self.mope_B[adapter_name]
        shared_a = self.mope_shared_A[adapter_name] if adapter_name in self.mope_shared_A else {}
        shared_b = self.mope_shared_B[adapter_name] if adapter_name in self.mope_shared_B else {}
        scaling = self.scaling[adapter_name]
        num_experts = self.num_experts[adapter_name]
        dropout = self.mope_dropout[adapter_name]
        adapter_dtype = next(iter(experts_a.values())).dtype

        tokens = x.reshape(-1, x.shape[-1])
        routing = self.route(adapter_name, x)
        weights = routing.expert_weights
        if routing.dispatch_mask is not None:
            weights = weights * routing.dispatch_mask.to(weights.dtype)
        weights = weights.to(adapter_dtype)  # (T, k)
        picked = F.one_hot(routing.expert_indices, num_experts).to(adapter_dtype)  # (T, k, E)
        num_tokens, top_k = weights.shape
        dropped = dropout(self._cast_input_dtype(tokens, adapter_dtype))

        def mix(per_choice: torch.Tensor) -> torch.Tensor:
            # (T, k or 1, D) -> (T, D): sum over the token's choices, weighted; a (T, 1, D) input
            # (the same for every choice) is scaled by the sum of the weights.
            return (weights.unsqueeze(-1) * per_choice).sum(1)

        def project_input(name: str) -> torch.Tensor:
            """(T, k, out) per-choice outputs of gate/up ((T, 1, out) when not adapted)."""
            base_out = getattr(base, name)(tokens)
            if name not in experts_a:
                return base_out.unsqueeze(1)
            lora_a, lora_b = experts_a[name], experts_b[name]
            num_a, rank, in_features = lora_a.shape
            hidden = F.linear(dropped, lora_a.reshape(num_a * rank, in_features))  # (T, E_A * r)
            hidden = hidden.view(num_tokens, 1, num_a, rank) * picked.unsqueeze(-1)  # (T, k, E, r)
            stacked_b = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_experts * rank)
            delta = F.linear(hidden.reshape(num_tokens, top_k, num_experts * rank), stacked_b) * scaling
            if name in shared_a:
                shared = F.linear(F.linear(dropped, shared_a[name]), shared_b[name]) * scaling
                base_out = base_out + shared.to(base_out.dtype)
            return base_out.unsqueeze(1) + delta.to(base_out.dtype)

        intermediate = base.act_fn(project_input("gate_proj")) * project_input("up_proj")  # (T, k|1, I)
        down = base.down_proj
        # The frozen down projection is linear, so it runs once on the mixed intermediate state.
        output = F.linear(mix(intermediate.to(adapter_dtype)).to(down.weight.dtype), down.weight)
        if down.bias is not None:
            output = output + down.bias * weights.sum(-1, keepdim=True).to(down.bias.dtype)
        if "down_proj" in experts_a:
            lora_a, lora_b = experts_a["down_proj"], experts_b["down_proj"]
            num_a, rank, in_features = lora_a.shape
            dropped_mid = dropout(intermediate.to(adapter_dtype))  # (T, k|1, I)
            hidden = F.linear(dropped_mid, lora_a.reshape(num_a * rank, in_features))
            hidden = hidden.view(num_tokens, dropped_mid.shape[1], num_a, rank)
            choice_weights = (weights.unsqueeze(-1) * picked).unsqueeze(-1)  # (T, k, E, 1)
            hidden = (hidden * choice_weights).sum(1)  # (T, E, r)
            stacked_b = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_experts * rank)
            delta = F.linear(hidden.reshape(num_tokens, num_experts * rank), stacked_b)
            if "down_proj" in shared_a:
                delta = delta + F.linear(F.linear(mix(dropped_mid), shared_a["down_proj"]), shared_b["down_proj"])
            output = output + (delta * scaling).to(output.dtype)
        return output.view(*x.shape[:-1], output.shape[-1]).to(x.dtype)

    def __repr__(self) -> str:
        return "mope." + super().__repr__()
