"""The plan of a merge: every output tensor listed before any is computed, and the per-layer computation.

Non-MoE tensors are copied. Each MoE layer is computed when its first output tensor is written,
from that layer's experts only (`LayerCache`), so peak memory is one layer's experts, not the
model. A layer becomes one dense FFN (`MergePlan.dense_layer`) or `experts_out` merged experts
and their router (`MergePlan.grouped_layer`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from upcycle.calibration import RoutingStatistics
from upcycle.checkpoint import PlannedTensor, TensorSpec, TensorStream
from upcycle.errors import UpcycleError
from upcycle.merging import methods
from upcycle.merging.base import BaseFFN
from upcycle.merging.calibrate import LayerwiseCalibration
from upcycle.merging.grouping import average_linkage, output_distances, weight_distances
from upcycle.merging.masks import DareMasksAhead, dare_generator
from upcycle.merging.source import PROJECTIONS, MoESource, fused_projection


@dataclass
class MergePlan:
    """Everything a layer computation needs, decided before any tensor is computed.

    `experts_out` None merges each MoE layer into one dense FFN, K into K experts. The layer
    computations record the expert weights and groups they used in `expert_weights` and `groups`.
    Experts are read through `stream` (`expert_stream`), or come from the layer-wise calibration
    run when `stats` is one (`LayerwiseCalibration`), which loaded them already.
    """

    moe: MoESource
    method: str
    experts_out: int | None
    stats: dict[int, RoutingStatistics] | LayerwiseCalibration
    base: BaseFFN | None
    density: float
    scale: float
    seed: int
    stream: TensorStream
    expert_weights: dict[int, list[float]] = field(default_factory=dict)
    groups: dict[int, list[list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._fused_gate_up: torch.Tensor | None = None
        moe = self.moe
        dense_dare = self.method == "dare" and self.experts_out is None
        self._dare_masks = (
            DareMasksAhead(self.seed, moe.num_experts, moe.expert_size * moe.hidden_size, self.density)
            if dense_dare
            else None
        )
        self._float64_scratch: torch.Tensor | None = None

    def dense_width(self) -> int:
        """Return the FFN width of the dense output: one expert's (all experts' for concat) plus the shared expert's."""
        moe = self.moe
        routed = moe.num_experts * moe.expert_size if self.method == "concat" else moe.expert_size
        return routed + moe.shared_size

    def coefficients(self, layer: int) -> torch.Tensor:
        """Return the per-expert merge coefficients of `layer` for the method (unnormalised, float64)."""
        stats = self.stats.get(layer)
        experts = self.moe.num_experts
        if self.method == "router-weight":
            return stats.probability_sum
        if self.method == "concat":
            return stats.mean(stats.weight_sum) if stats else torch.full((experts,), 1.0 / experts, dtype=torch.float64)
        if self.method in ("frequency", "select") or (self.method in methods.TASK_VECTOR_METHODS and stats):
            return stats.selection_counts
        return torch.ones(experts, dtype=torch.float64)

    def merge_projection(
        self,
        layer: int,
        projection: str,
        experts: list[torch.Tensor],
        members: list[int],
        coefficients: torch.Tensor,
        base: torch.Tensor | None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Return one projection (gate, up or down) of the experts `members` merged into one by the method.

        `experts` holds that projection of every routed expert of `layer`; `base` the base FFN's
        projection for the task-vector methods. With `out_dtype`, a weighted mean, ties and dare come in that
        dtype (cast chunk by chunk: the bits of casting their result); other results are cast by the caller.
        """
        sub = [experts[member] for member in members]
        weights = coefficients[torch.tensor(members)]
        if len(members) == 1:  # a singleton group keeps its expert exactly, whatever the method
            return sub[0]
        if self.method == "select":
            return sub[int(torch.argmax(weights))]
        if self.method == "concat":
            return methods.concat(sub, weights, projection)
        if self.method == "task-arithmetic":
            return methods.task_arithmetic(sub, base, weights, self.scale)
        out = None if out_dtype is None else torch.empty(sub[0].shape, dtype=out_dtype)
        if self.method == "ties":
            return methods.ties(sub, base, weights, self.density, self.scale, out=out)
        if self.method == "dare":
            if self._dare_masks is not None:  # a dense merge (all experts): its masks were drawn ahead
                masks = self._dare_masks.take(layer, projection)
                return methods.dare(sub, base, weights, self.density, None, self.scale, masks=masks, out=out)
            generator = dare_generator(self.seed, layer, projection, members)
            return methods.dare(sub, base, weights, self.density, generator, self.scale, out=out)
        if out is not None:
            return methods.weighted_mean(sub, weights, out=out)
        return methods.weighted_mean(sub, weights, out=self._scratch(sub[0].numel()))

    def _scratch(self, numel: int) -> torch.Tensor:
        """Return a reused float64 buffer of `numel` elements for a merge result (cast and copied out of it
        before the next merge: see `_own`)."""
        if self._float64_scratch is None or self._float64_scratch.numel() != numel:
            self._float64_scratch = torch.empty(numel, dtype=torch.float64)
        return self._float64_scratch

    def request_after(self, after: int) -> None:
        """Queue the experts of the first MoE layer after `after` (-1: the first) for reading ahead, in the
        order they are used (gate, up, down), so the disk reads them while this layer is computed."""
        following = [layer for layer in self.moe.moe_layers if layer > after]
        if following and not isinstance(self.stats, LayerwiseCalibration):  # which reads its own
            self.stream.request(self.moe.expert_read_order(following[0]))

    def projection_experts(self, layer: int, projection: str) -> list[torch.Tensor]:
        """Return that projection of every routed expert of `layer`, as read (views of a fused tensor)."""
        if isinstance(self.stats, LayerwiseCalibration):
            self.stats.get(layer)  # runs the layer, which loads its experts
            return self.stats.experts(layer, projection)
        names = self.moe.projection_tensor_names(layer)[projection]
        if not self.moe.layout.fused:
            return [self.stream.take(name) for name in names]
        if projection == "down":
            return list(self.stream.take(names[0]))
        if projection == "gate":  # gate and up are the halves of one fused tensor: read it once
            self._fused_gate_up = self.stream.take(names[0])
        gate_up = self._fused_gate_up
        if projection == "up":
            self._fused_gate_up = None
        return fused_projection(gate_up, projection, self.moe.expert_size)

    def _own(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return `tensor`, copied if it shares reused memory: an expert read by the stream or held by the
        layer-wise calibration, or the float64 scratch buffer (a float64 output)."""
        scratch = self._float64_scratch
        shares_scratch = scratch is not None and tensor.untyped_storage().data_ptr() == scratch.data_ptr()
        calibration_held = isinstance(self.stats, LayerwiseCalibration) and self.stats.holds(tensor)
        return tensor.clone() if self.stream.issued(tensor) or shares_scratch or calibration_held else tensor

    def _done_with(self, projection: str, experts: list[torch.Tensor]) -> None:
        """Hand the memory of `projection`'s experts back to the stream once nothing else reads it (a fused
        layout's gate and up share one tensor: it goes after up)."""
        if isinstance(self.stats, LayerwiseCalibration) or (self.moe.layout.fused and projection == "gate"):
            return
        self.stream.release(experts)

    def dense_layer(self, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Return the dense FFN (gate, up, down) in `dtype` that replaces the MoE block of `layer`.

        One projection of the experts is held at a time: read, merged, cast, dropped.
        """
        moe = self.moe
        if self._dare_masks is not None:  # this layer's masks, and the next layer's while this one is merged
            for ahead in [layer, *[later for later in moe.moe_layers if later > layer][:1]]:
                self._dare_masks.request(ahead)
        coefficients = self.coefficients(layer)
        self.expert_weights[layer] = methods.normalized(coefficients).tolist()
        shared = moe.shared_projections(layer)
        stats = self.stats.get(layer)
        # Qwen2-MoE adds sigmoid(shared_expert_gate(x)) * shared(x); a fixed mean gate folds it in.
        shared_gate = None
        if shared and moe.shared_gate(layer) is None:
            shared_gate = 1.0  # DeepSeek-V3-style shared experts have no gate: always fully on
        elif shared:
            shared_gate = stats.shared_gate_sum / max(stats.tokens, 1) if stats else 0.5
        merged = {}
        for projection in PROJECTIONS:
            experts = self.projection_experts(layer, projection)
            base = self.base.projection(moe, layer, projection, experts) if self.base is not None else None
            scaled = projection == "down" and moe.routed_scaling != 1.0
            tensor = self.merge_projection(
                layer,
                projection,
                experts,
                list(range(moe.num_experts)),
                coefficients,
                base,
                out_dtype=None if scaled or shared else dtype,  # float64 for the arithmetic below
            )
            if scaled:  # the MoE scales its routed output
                tensor = tensor.double() * moe.routed_scaling
            if shared and projection == "down":
                tensor = torch.cat([shared["down"].double() * shared_gate, tensor.double()], dim=1)
            elif shared:
                tensor = torch.cat([shared[projection].double(), tensor.double()])
            merged[projection] = self._own(tensor.to(dtype))
            del tensor, base
            self._done_with(projection, experts)
            del experts
        return merged

    def grouped_layer(
        self, layer: int, dtype: torch.dtype
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """Return ({"router": (K, H), and "bias": (K,) for a selection bias} in float64, the K merged experts
        {gate, up, down: K tensors in `dtype`}) of `layer`.

        Grouping by weights needs every projection of the layer's experts at once (one layer's experts).
        """
        moe = self.moe
        experts = {p: self.projection_experts(layer, p) for p in PROJECTIONS}
        stats = self.stats.get(layer)
        if stats is not None and stats.expert_output_sum is not None:
            distances = output_distances(stats.mean(stats.expert_output_sum))
        else:
            distances = weight_distances([experts[p] for p in PROJECTIONS])
        groups = average_linkage(distances, self.experts_out)
        self.groups[layer] = groups
        coefficients = self.coefficients(layer)
        self.expert_weights[layer] = methods.normalized(coefficients).tolist()
        router = moe.router(layer)
        merged: dict[str, list[torch.Tensor]] = {p: [] for p in PROJECTIONS}
        for projection in PROJECTIONS:
            base = self.base.projection(moe, layer, projection, experts[projection]) if self.base is not None else None
            for members in groups:
                tensor = self.merge_projection(
                    layer, projection, experts[projection], members, coefficients, base, out_dtype=dtype
                )
                merged[projection].append(self._own(tensor.to(dtype)))
            del tensor, base
            self._done_with(projection, experts[projection])
            experts[projection] = None  # drop this projection's experts before merging the next
        bias_name = moe.selection_bias_name(layer)
        rows = {"router": router, **({"bias": moe.checkpoint.tensors.get(bias_name)} if bias_name else {})}
        merged_rows = {key: [] for key in rows}
        for members in groups:
            weights = coefficients[torch.tensor(members)]
            for key, values in rows.items():  # the router row and the selection bias follow the experts
                if self.method == "select" and len(members) > 1:
                    merged_rows[key].append(values[members[int(torch.argmax(weights))]].double())
                else:
                    merged_rows[key].append(methods.weighted_mean(values[torch.tensor(members)], weights))
        return {key: torch.stack(values) for key, values in merged_rows.items()}, merged

    def layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Return {name: shape} of the tensors that replace layer `layer`'s MoE block, in write order."""
        moe = self.moe
        hidden, size = moe.hidden_size, moe.expert_size
        if self.experts_out is None:
            names = moe.family.dense_mlp
            width = self.dense_width()
            return {
                names.gate.format(layer=layer): (width, hidden),
                names.up.format(layer=layer): (width, hidden),
                names.down.format(layer=layer): (hidden, width),
            }
        layout, experts = moe.layout, self.experts_out
        shapes = {layout.router.format(layer=layer): (experts, hidden)}
        if moe.selection_bias_name(layer):
            shapes[moe.selection_bias_name(layer)] = (experts,)
        if layout.fused:
            shapes[layout.gate_up.format(layer=layer)] = (experts, 2 * size, hidden)
            shapes[layout.down.format(layer=layer)] = (experts, hidden, size)
        else:
            for expert in range(experts):
                shapes[layout.gate.format(layer=layer, expert=expert)] = (size, hidden)
                shapes[layout.up.format(layer=layer, expert=expert)] = (size, hidden)
                shapes[layout.down.format(layer=layer, expert=expert)] = (hidden, size)
        for name in moe.shared_tensor_names(layer):
            shapes[name] = moe.checkpoint.tensors.shape(name)
        return shapes

    def layer_tensors(self, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Return the tensors in `dtype` that replace layer `layer`'s MoE block by output name (the names of
        `layer_shapes`), and queue the next MoE layer's experts for reading ahead."""
        self.request_after(layer)
        if self.experts_out is None:
            names = self.moe.family.dense_mlp
            merged = self.dense_layer(layer, dtype)
            return {
                names.gate.format(layer=layer): merged["gate"],
                names.up.format(layer=layer): merged["up"],
                names.down.format(layer=layer): merged["down"],
            }
        moe, layout = self.moe, self.moe.layout
        rows, merged = self.grouped_layer(layer, dtype)
        tensors = {layout.router.format(layer=layer): rows["router"].to(dtype)}
        if "bias" in rows:
            tensors[moe.selection_bias_name(layer)] = rows["bias"].float()
        if layout.fused:
            gate, up, down = (torch.stack(merged[p]) for p in PROJECTIONS)
            tensors[layout.gate_up.format(layer=layer)] = torch.cat([gate, up], dim=1)
            tensors[layout.down.format(layer=layer)] = down
        else:
            for expert in range(self.experts_out):
                for projection, template in (("gate", layout.gate), ("up", layout.up), ("down", layout.down)):
                    tensors[template.format(layer=layer, expert=expert)] = merged[projection][expert]
        for name in moe.shared_tensor_names(layer):
            tensors[name] = moe.checkpoint.tensors.get(name).to(dtype)
        return tensors


def expert_stream(moe: MoESource, calibrating: bool, grouping: bool = False) -> TensorStream:
    """Return the stream that reads `moe`'s experts ahead of the merge: at most two projections of a layer
    ahead, one when `grouping` (grouping by weights holds a whole layer), or a quarter of a layer when
    `calibrating` (the layer-wise run holds a whole layer, and its forward pass needs room; measured on
    scripts/bench/scale.py's merge frequency, a sixth of a layer took 29-32 s, a quarter or a third 25-26 s,
    a third 90 MiB more peak RSS)."""
    tensors = moe.checkpoint.tensors
    layer_bytes = sum(
        math.prod(tensors.shape(name)) * tensors.dtype(name).itemsize
        for name in moe.expert_read_order(moe.moe_layers[0])
    )
    if calibrating:
        return tensors.stream(budget=layer_bytes // 4)
    return tensors.stream(budget=layer_bytes // 3 if grouping else 2 * layer_bytes // 3)


class LayerCache:
    """Computes a layer's merged tensors when the first is asked for, and hands them out once each."""

    def __init__(self, compute: Callable[[int, torch.dtype], dict[str, torch.Tensor]]):
        self._compute = compute
        self._tensors: dict[str, torch.Tensor] = {}
        self._layer: int | None = None

    def take(self, layer: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Return the tensor `name` of `layer` in `dtype`, computing the layer (and dropping the previous one)
        if it is not the one held. Raises KeyError for a name already taken or not of that layer."""
        if self._layer != layer:
            self._tensors = self._compute(layer, dtype)
            self._layer = layer
        return self._tensors.pop(name).to(dtype).contiguous()


def _copied_tensors(plan: MergePlan) -> dict[int, list[str]]:
    """Return the names of the tensors copied unchanged, by layer (-1: outside the layers), in checkpoint order.

    Raises:
        UpcycleError: a MoE block holds tensors the family does not describe (they would be lost),
            or a dense layer of the MoE is narrower or wider than the merged FFN.
    """
    moe = plan.moe
    tensors = moe.checkpoint.tensors
    moe_names: dict[int, set[str]] = {
        layer: set(moe.expert_tensor_names(layer)) | set(moe.shared_tensor_names(layer)) for layer in moe.moe_layers
    }
    layer_of = re.compile(r"\.layers\.(\d+)\.")
    zero_biases = {
        template.format(layer=layer).removesuffix(".weight") + ".bias"
        for template in moe.family.zero_biases
        for layer in range(int(moe.config["num_hidden_layers"]))
    }
    copied: dict[int, list[str]] = {}
    for name in tensors.keys():
        if any(name.endswith(suffix) for suffix in moe.family.ignored_source_tensors):
            continue
        match = layer_of.search(name)
        layer = int(match.group(1)) if match else -1
        if layer in moe_names and name in moe_names[layer]:
            continue
        if layer in moe_names and name.startswith(moe.block_prefix(layer)):
            raise UpcycleError(
                f"{moe.name} has {name} in a MoE block, which {moe.family.name} does not describe; "
                "merging would drop it"
            )
        if plan.experts_out is None and name in zero_biases:
            if tensors.get(name).any():
                raise UpcycleError(
                    f"{moe.name} has a non-zero {name}, which a dense {moe.family.source_model_types[0]} cannot "
                    "hold; merge into fewer experts (--experts K) instead"
                )
            continue  # written as zeros for the engines by the upcycling; the dense family has no such bias
        copied.setdefault(layer, []).append(name)
    if plan.experts_out is None:
        width = plan.dense_width()
        dense_gate = moe.family.dense_mlp.gate
        for layer, names in copied.items():
            gate = dense_gate.format(layer=layer)
            if gate in names and tensors.shape(gate)[0] != width:
                raise UpcycleError(
                    f"layer {layer} of {moe.name} is dense with width {tensors.shape(gate)[0]} but the merged "
                    f"FFN is {width} wide; a {moe.family.source_model_types[0]} config has one width for all layers"
                )
    return copied


def plan_merge(plan: MergePlan, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """Return every output tensor in write order: copies of the non-MoE tensors and the merged layers.

    Floating-point tensors are written in `dtype` (None: each in its source dtype).

    Raises:
        UpcycleError: a MoE block holds tensors the family does not describe (they would be lost),
            or a dense layer of the MoE is narrower or wider than the merged FFN.
    """
    moe = plan.moe
    tensors = moe.checkpoint.tensors
    copied = _copied_tensors(plan)

    def output_dtype(source: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and source.is_floating_point else source

    planned: list[PlannedTensor] = []

    def add_copies(names: list[str]) -> None:
        for name in names:
            out = output_dtype(tensors.dtype(name))
            planned.append(
                PlannedTensor(TensorSpec(name, out, tensors.shape(name)), lambda n=name, d=out: tensors.get(n).to(d))
            )

    cache = LayerCache(plan.layer_tensors)
    plan.request_after(-1)
    top_level = copied.pop(-1, [])
    add_copies([name for name in top_level if "embed" in name])
    for layer in range(int(moe.config["num_hidden_layers"])):
        add_copies(copied.get(layer, []))
        if layer not in moe.moe_layers:
            continue
        weight_dtype = output_dtype(tensors.dtype(moe.layout.router.format(layer=layer)))
        for name, shape in plan.layer_shapes(layer).items():
            # The selection bias stays float32, as the router computes in float32.
            tensor_dtype = torch.float32 if name == moe.selection_bias_name(layer) else weight_dtype
            planned.append(
                PlannedTensor(
                    TensorSpec(name, tensor_dtype, shape),
                    lambda layer=layer, name=name, d=tensor_dtype: cache.take(layer, name, d),
                )
            )
    add_copies([name for name in top_level if "embed" not in name])
    return planned
