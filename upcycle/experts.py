"""Building expert weights from one dense gated FFN (gate/up/down), one tensor at a time.

An expert builder decides, for every MoE layer, how many routed experts there are, how wide each
is, how many experts a token uses, and computes each expert projection (and the shared expert's)
from the dense FFN on demand, so the converter can stream. Every random choice comes from a
generator derived from the seed and (layer, expert, projection), never from visit order. The
family modules know nothing about builders.

Shared experts (`shared_experts=N`) are common to all methods: the dense FFN's first `N * w`
neurons (w = one routed expert's width; an FFN's neuron order carries no meaning) become the
always-on shared expert, and the routed experts are built from the remaining neurons. A gated
FFN is a sum over its neurons, so FFN(x) = shared(x) + FFN_rest(x) exactly.

Scalings below assume what every supported target does: top-k weights renormalised to sum to
one (softmax routing in Mixtral, GraniteMoE, and Qwen/FlexOlmo with `norm_topk_prob=True`;
sigmoid routing in GLM-4-MoE). A target that then multiplies the routed output by a routed
scaling factor s (GLM-4-MoE's `routed_scaling_factor`) gets every routed expert's down_proj
divided by s (`routed_scaling`), on top of the method's own scaling, so s cancels exactly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from upcycle.errors import UpcycleError, flag
from upcycle.kmeans import balanced_kmeans
from upcycle.options import check_real, given_options
from upcycle.rng import derived_generator

# Which dense projection an expert projection comes from, and the axis that indexes neurons.
PROJECTIONS = ("gate", "up", "down")
NEURON_AXIS = {"gate": 0, "up": 0, "down": 1}
METHODS = ("copy", "drop", "granular", "partition")
PARTITION_METHODS = ("random", "kmeans")
GRANULAR_SCALINGS = ("paper", "down")


class _LayerTensors:
    """The dense FFN tensors of one layer read so far (and views derived from them), by key."""

    __slots__ = ("__weakref__", "tensors")

    def __init__(self):
        self.tensors: dict[tuple, torch.Tensor] = {}


# The one layer whose tensors are held: reading another layer's FFN drops them. A weak reference,
# so a finished conversion's plan (and the layer it held) is freed with the plan.
_held: weakref.ref | None = None


def _hold(layer: _LayerTensors) -> None:
    global _held
    held = _held() if _held is not None else None
    if held is not layer:
        if held is not None:
            held.tensors.clear()
        _held = weakref.ref(layer)


@dataclass(frozen=True)
class LazyFFN:
    """One layer's dense gated FFN, read lazily: `dense("gate")` returns the gate weight (I, H);
    `size` is I, known without reading.

    Each projection is read once per layer, however many experts are built from it: the tensors
    read are kept until an FFN of another layer is read (at most one layer's FFN is held, process
    wide). The tensors returned are therefore shared between calls: callers must not modify them
    in place (clone first).
    """

    read: Callable[[str], torch.Tensor]
    size: int
    key: tuple = ()
    cache: _LayerTensors = field(default_factory=_LayerTensors, compare=False, repr=False)

    def __call__(self, projection: str) -> torch.Tensor:
        entry = (*self.key, projection)
        tensor = self.cache.tensors.get(entry)
        if tensor is None:
            _hold(self.cache)
            tensor = self.cache.tensors[entry] = self.read(projection)
        return tensor

    def derived(self, key: object, size: int, transform: Callable[[torch.Tensor, str], torch.Tensor]) -> LazyFFN:
        """Return the FFN whose projection `name` is `transform(self(name), name)`, `size` wide, read
        once per layer like this one (`key` tells it from other FFNs derived from this one)."""
        return LazyFFN(lambda name: transform(self(name), name), size, (*self.key, key), self.cache)


def neuron_slice(weight: torch.Tensor, projection: str, neurons: torch.Tensor | slice) -> torch.Tensor:
    """Return the rows (gate/up) or columns (down) of `weight` for `neurons`, as a fresh tensor."""
    if isinstance(neurons, slice):
        picked = weight[neurons] if NEURON_AXIS[projection] == 0 else weight[:, neurons]
    else:
        picked = weight.index_select(NEURON_AXIS[projection], neurons)
    return picked.clone()


@dataclass
class ExpertBuilder:
    """Common part of every method: the expert count, the shared-expert split and the settings.

    Subclasses set `units` (how many expert widths the dense FFN is cut into) and implement
    `routed_projection`.
    """

    num_experts: int  # as requested: copies of the FFN (copy/drop/granular) or partitions
    shared_experts: int = 0
    seed: int = 0
    # The target multiplies the routed output by this; every routed down_proj is divided by it.
    routed_scaling: float = 1.0
    method: str = field(default="", init=False)

    def units(self) -> int:
        """Return into how many equal expert widths the dense FFN's neurons are cut."""
        return 1 + self.shared_experts

    def expert_size(self, dense_size: int) -> int:
        """Return the intermediate width of one routed (and one shared) expert.

        Raises:
            UpcycleError: the dense width does not split evenly.
        """
        units = self.units()
        if dense_size % units:
            raise UpcycleError(
                f"the FFN's {dense_size} neurons do not split into {units} equal expert widths "
                f"({self._split_reason()}); choose numbers that divide {dense_size}"
            )
        return dense_size // units

    def _split_reason(self) -> str:
        return f"{self.shared_experts} shared + 1 routed"

    def shared_size(self, dense_size: int) -> int:
        """Return the total width of the shared expert (0 without shared experts)."""
        return self.shared_experts * self.expert_size(dense_size)

    def routed_experts(self) -> int:
        """Return the number of routed experts per MoE layer in the output."""
        return self.num_experts

    def routed_top_k(self, top_k: int) -> int:
        """Return the experts per token in the output for a requested `top_k`."""
        return top_k

    def router_groups(self) -> int:
        """Return how many consecutive experts share one router row (virtual groups; 1 = none)."""
        return 1

    def routed_dense(self, dense: LazyFFN) -> LazyFFN:
        """Return the dense FFN restricted to the neurons that feed routed experts."""
        start = self.shared_size(dense.size)
        if start == 0:
            return dense
        rest = slice(start, None)
        return dense.derived(("routed", start), dense.size - start, lambda w, name: neuron_slice(w, name, rest))

    def projection(self, name: str, layer: int, expert: int, dense: LazyFFN) -> torch.Tensor:
        """Return the `name` ("gate"/"up"/"down") weight of routed expert `expert` in `layer`.

        Read-only: a plain copy is the dense tensor itself, shared with every other copy."""
        return self.routed_projection(name, layer, expert, self.routed_dense(dense))

    def shared_projection(self, name: str, dense: LazyFFN) -> torch.Tensor:
        """Return the `name` weight of the shared expert: the dense FFN's first shared neurons, unscaled."""
        return neuron_slice(dense(name), name, slice(0, self.shared_size(dense.size)))

    def routed_projection(self, name: str, layer: int, expert: int, dense: LazyFFN) -> torch.Tensor:
        """Return the `name` weight of routed expert `expert`, built from `dense` (the routed neurons)."""
        raise NotImplementedError

    def unscaled(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """Return `weight` (of projection `name`) with the routed scaling cancelled: a down_proj
        divided by `routed_scaling` (in float32, back to its dtype); anything else as it is."""
        if name != "down" or self.routed_scaling == 1.0:
            return weight
        return (weight.float() / self.routed_scaling).to(weight.dtype)

    def exact_at_init(self) -> bool:
        """Return whether the MoE computes the dense model's function before training (any router)."""
        return False

    def settings(self) -> dict:
        """Return the settings to record in the checkpoint's provenance."""
        return {"method": self.method, "shared_experts": self.shared_experts}


@dataclass
class CopyExperts(ExpertBuilder):
    """Sparse Upcycling (Komatsuzaki et al. 2022): every expert is a copy of the dense FFN.

    `noise` > 0 adds N(0, (noise * std(W))^2) to each copy (per expert and projection), which
    breaks the symmetry between experts at the cost of exactness.
    """

    noise: float = 0.0

    def __post_init__(self):
        self.method = "copy"

    def routed_projection(self, name, layer, expert, dense):
        weight = dense(name)  # every plain copy is the very tensor read (read-only; the writer copies nothing)
        if self.noise > 0:
            weight = weight.clone()
            generator = derived_generator(self.seed, "noise", layer, expert, name)
            weight += torch.randn(weight.shape, generator=generator).to(weight.dtype) * (
                self.noise * weight.float().std()
            ).to(weight.dtype)
        return self.unscaled(weight, name)

    def exact_at_init(self) -> bool:
        return self.noise == 0

    def settings(self) -> dict:
        return {**super().settings(), "noise": self.noise}


def dropped_neurons(seed: int, layer: int, expert: int, width: int, ratio: float) -> torch.Tensor:
    """Return the sorted indices of the `floor(ratio * width)` neurons expert `expert` of `layer` re-draws."""
    generator = derived_generator(seed, "drop", layer, expert)
    count = int(ratio * width)
    return torch.sort(torch.randperm(width, generator=generator)[:count]).values


@dataclass
class DropExperts(ExpertBuilder):
    """Drop-Upcycling (Nakamura et al., ICLR 2025): copies whose `drop_ratio` of neurons are re-drawn.

    Each expert draws its own set S of floor(r * I) intermediate neurons, one set for the three
    projections so every neuron stays whole (the authors' script draws positions per matrix).
    The rows S of gate/up and columns S of down are replaced by draws from N(mu, sigma^2), where
    mu and sigma are the mean and std of the weights being replaced, per matrix (as in the
    authors' script). Kept neurons are bit-identical to the source.
    """

    drop_ratio: float = 0.5

    def __post_init__(self):
        self.method = "drop"
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise UpcycleError(f"{flag('drop_ratio')} must be between 0 and 1, got {self.drop_ratio}")

    def routed_projection(self, name, layer, expert, dense):
        weight = dense(name).clone()
        width = weight.shape[NEURON_AXIS[name]]
        dropped = dropped_neurons(self.seed, layer, expert, width, self.drop_ratio)
        if len(dropped) == 0:
            return self.unscaled(weight, name)
        replaced = neuron_slice(weight, name, dropped).float()
        mean, std = replaced.mean(), (replaced.std() if replaced.numel() > 1 else torch.tensor(0.0))
        generator = derived_generator(self.seed, "drop-values", layer, expert, name)
        fresh = (torch.randn(replaced.shape, generator=generator) * std + mean).to(weight.dtype)
        weight.index_copy_(NEURON_AXIS[name], dropped, fresh)
        return self.unscaled(weight, name)

    def exact_at_init(self) -> bool:
        return self.drop_ratio == 0

    def settings(self) -> dict:
        return {**super().settings(), "drop_ratio": self.drop_ratio}


@dataclass
class GranularExperts(ExpertBuilder):
    """Granular upcycling (He et al. 2024, arXiv 2410.07524; Megatron-Core's upcycling utilities).

    The FFN is cut into `granularity` G shards of I/G neurons; `shared_experts` of them form the
    shared expert and the other G_r = G - shared shards are routed. Each of the `num_experts`
    copies holds every routed shard, so there are num_experts * G_r experts (expert e is shard
    e % G_r of copy e // G_r) and top-k becomes top_k * G_r. The router gives all shards of one
    copy the same row (a virtual group), so top-k picks whole copies at init.

    Weight scaling: the renormalised top-k weights of a virtual group sum to 1/G_r of the
    dense path, so the routed output must be scaled by a = G_r (a = E * G_r^2 / T when the
    target does not renormalise, the paper's softmax-then-top-k case). "paper" multiplies
    gate, up and down by a^(1/3), the paper's choice for GLU FFNs; SiLU is not homogeneous, so
    this is approximate. "down" multiplies only down_proj by a, which is exact at init.
    """

    granularity: int = 2
    scaling: str = "paper"

    def __post_init__(self):
        self.method = "granular"
        if self.granularity < 1:
            raise UpcycleError(f"{flag('granularity')} must be at least 1, got {self.granularity}")
        if self.shared_experts >= self.granularity:
            raise UpcycleError(
                f"{flag('shared_experts')} {self.shared_experts} leaves no routed shard of {flag('granularity')} "
                f"{self.granularity}; use fewer shared experts than the granularity"
            )
        if self.scaling not in GRANULAR_SCALINGS:
            raise UpcycleError(f"unknown granular scaling {self.scaling!r}; use {' or '.join(GRANULAR_SCALINGS)}")

    def routed_shards(self) -> int:
        """Return G_r: the shards of each copy that are routed."""
        return self.granularity - self.shared_experts

    def units(self) -> int:
        return self.granularity

    def _split_reason(self) -> str:
        return f"{flag('granularity')} {self.granularity}"

    def routed_experts(self) -> int:
        return self.num_experts * self.routed_shards()

    def routed_top_k(self, top_k: int) -> int:
        return top_k * self.routed_shards()

    def router_groups(self) -> int:
        return self.routed_shards()

    def activation_scale(self) -> float:
        """Return a: how much the routed output must be scaled to match the dense path at init."""
        return float(self.routed_shards())

    def weight_scales(self) -> dict[str, float]:
        """Return the multiplier of each projection ("paper": a^(1/3) each; "down": a on down)."""
        scale = self.activation_scale()
        if self.scaling == "down":
            return {"gate": 1.0, "up": 1.0, "down": scale}
        return dict.fromkeys(PROJECTIONS, scale ** (1 / 3))

    def routed_projection(self, name, layer, expert, dense):
        weight = dense(name)
        shard_size = weight.shape[NEURON_AXIS[name]] // self.routed_shards()
        shard = expert % self.routed_shards()
        piece = neuron_slice(weight, name, slice(shard * shard_size, (shard + 1) * shard_size))
        multiplier = self.weight_scales()[name] / (self.routed_scaling if name == "down" else 1.0)
        return piece if multiplier == 1.0 else (piece.float() * multiplier).to(weight.dtype)

    def exact_at_init(self) -> bool:
        return self.scaling == "down" or self.routed_shards() == 1

    def settings(self) -> dict:
        return {
            **super().settings(),
            "granularity": self.granularity,
            "granular_scaling": self.scaling,
            "weight_scales": self.weight_scales(),
        }


@dataclass
class PartitionExperts(ExpertBuilder):
    """Neuron partition (MoEfication, Zhang et al. 2022; LLaMA-MoE's neuron-independent experts).

    The FFN's neurons are split into `num_experts` (+ `shared_experts`) disjoint groups of equal
    size, so the total parameter count is unchanged and a token uses top_k/E of the routed FFN.
    "random" draws a permutation from the seed; "kmeans" is balanced k-means on the neurons'
    concatenated, L2-normalised gate and up rows. Each expert's down_proj is multiplied by E:
    with renormalised weights 1/E each (a uniform router) and top-k = E this reproduces the dense
    FFN exactly, and with top-k < E it keeps the expected output magnitude.
    """

    partition_method: str = "random"
    _groups: dict[int, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.method = "partition"
        if self.partition_method not in PARTITION_METHODS:
            raise UpcycleError(
                f"unknown {flag('partition_method')} {self.partition_method!r}; use {' or '.join(PARTITION_METHODS)}"
            )

    def units(self) -> int:
        return self.num_experts + self.shared_experts

    def _split_reason(self) -> str:
        return f"{self.num_experts} routed + {self.shared_experts} shared experts"

    def neuron_groups(self, layer: int, dense: LazyFFN) -> list[torch.Tensor]:
        """Return, per routed expert of `layer`, the sorted indices of its neurons among the routed
        neurons (cached per layer: a few integers per neuron)."""
        if layer not in self._groups:
            width = dense.size
            generator = derived_generator(self.seed, "partition", layer)
            if self.partition_method == "random":
                labels = torch.empty(width, dtype=torch.long)
                labels[torch.randperm(width, generator=generator)] = torch.arange(width) % self.num_experts
            else:
                rows = [torch.nn.functional.normalize(dense(name).float(), dim=1) for name in ("gate", "up")]
                features = torch.cat(rows, dim=1)
                labels = balanced_kmeans(features, self.num_experts, generator)
            self._groups[layer] = [torch.nonzero(labels == e).flatten() for e in range(self.num_experts)]
        return self._groups[layer]

    def routed_projection(self, name, layer, expert, dense):
        neurons = self.neuron_groups(layer, dense)[expert]
        piece = neuron_slice(dense(name), name, neurons)
        if name == "down":
            piece = (piece.float() * (self.num_experts / self.routed_scaling)).to(piece.dtype)
        return piece

    def centroid_rows(self, layer: int, dense: LazyFFN) -> torch.Tensor:
        """Return (E, H) router rows: the mean gate row of each expert's neurons, so an expert's
        logit is its neurons' mean gate pre-activation."""
        routed = self.routed_dense(dense)
        gate = routed("gate").float()
        return torch.stack([gate[neurons].mean(dim=0) for neurons in self.neuron_groups(layer, routed)])

    def settings(self) -> dict:
        return {**super().settings(), "partition_method": self.partition_method}


def make_expert_builder(
    method: str,
    num_experts: int,
    *,
    seed: int = 0,
    shared_experts: int = 0,
    noise: float = 0.0,
    drop_ratio: float | None = None,
    granularity: int | None = None,
    granular_scaling: str = "paper",
    partition_method: str | None = None,
    routed_scaling: float = 1.0,
) -> ExpertBuilder:
    """Return the builder for `method` with its options; options of other methods must be unset.

    `routed_scaling` is the target's factor on the routed output (1: none), which every routed
    expert's down_proj is divided by.

    Raises:
        UpcycleError: unknown method, an option given to a method that does not use it, or an
            option out of range.
    """
    if method not in METHODS:
        raise UpcycleError(f"unknown {flag('method')} {method!r}; use one of {', '.join(METHODS)}")
    if shared_experts < 0:
        raise UpcycleError(f"{flag('shared_experts')} must be 0 or more, got {shared_experts}")
    misplaced = {
        "noise": method != "copy" and noise != 0,
        "drop_ratio": method != "drop" and drop_ratio is not None,
        "granularity": method != "granular" and granularity is not None,
        "partition_method": method != "partition" and partition_method is not None,
    }
    for option in given_options(misplaced):
        raise UpcycleError(f"{option} does not apply to {flag('method')} {method}; remove it or change the method")
    if noise < 0:
        raise UpcycleError(f"{flag('noise')} must be 0 or more, got {noise}")
    check_real("routed_scaling", routed_scaling, minimum=0.0, exclusive_minimum=True)
    common = {"num_experts": num_experts, "shared_experts": shared_experts, "seed": seed}
    common["routed_scaling"] = routed_scaling
    if method == "copy":
        return CopyExperts(**common, noise=noise)
    if method == "drop":
        return DropExperts(**common, drop_ratio=0.5 if drop_ratio is None else drop_ratio)
    if method == "granular":
        granularity = 2 if granularity is None else granularity
        return GranularExperts(**common, granularity=granularity, scaling=granular_scaling)
    return PartitionExperts(**common, partition_method=partition_method or "random")
