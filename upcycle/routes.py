"""Routing analysis: how a MoE's routers use their experts on some text.

For every MoE layer of a stock transformers MoE (router logits from ``output_router_logits=True``)
or of a generic upcycle model (each `upcycle.moe.MoE` block's last routing decision), over the
non-padding tokens of the data:

- expert load (share of (token, expert) assignments per expert) and its coefficient of variation;
- router entropy (mean per-token entropy of the routing distribution, and over log E);
- tokens dropped at a capacity factor, with OpenMoE's diagnostics: the drop rate by position in
  the sequence ("drop towards the end") and how consistently a token id goes to the same expert
  ("context-independent specialisation").

Capacity is simulated per sequence (each sequence one group, as GShard/T5X group tokens), serving
first choices before second choices and earlier tokens first: ``capacity = ceil(factor * real
tokens * k / E)``. `analyze_routing` returns the numbers as a `RoutingReport`; `write_report`
writes them as JSON with heatmap plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from upcycle.errors import UpcycleError, flag
from upcycle.families.moe_fields import TOP_K_FIELDS, biased_routers, first_positive_field
from upcycle.moe import apply_capacity, expert_capacity, moe_modules
from upcycle.options import check_count, check_real
from upcycle.progress import progress

__all__ = ["LayerRouting", "RoutingReport", "analyze_routing", "routing_report", "write_report"]

REPORT_FILE = "routes.json"
LOAD_PLOT = "expert_load.png"
DROP_PLOT = "drop_by_position.png"


@dataclass
class LayerRouting:
    """Routing statistics of one MoE layer.

    Attributes:
        name: the MoE module's name (generic) or ``MoE layer N``, the N-th layer returning router
            logits (stock).
        num_experts, top_k: E and k.
        tokens: non-padding tokens seen.
        expert_counts: (token, expert) assignments per expert.
        expert_load: ``expert_counts`` as shares (sum 1).
        load_cv: coefficient of variation of ``expert_counts`` (population std / mean; 0 = balanced).
        router_entropy: mean per-token entropy of the routing probabilities, in nats.
        normalized_entropy: ``router_entropy / log E`` (1 = uniform routing).
        dropped_fraction: share of assignments beyond capacity at the report's capacity factor.
        drop_rate_by_position: dropped share of the assignments in each position bucket.
        token_consistency: over token ids seen at least twice, the share of their occurrences whose
            top-1 expert is that id's most frequent top-1 expert (1 = the id alone decides; None
            when no id repeats).
        consistency_occurrences: occurrences counted in ``token_consistency``.
    """

    name: str
    num_experts: int
    top_k: int
    tokens: int
    expert_counts: list[int]
    expert_load: list[float]
    load_cv: float
    router_entropy: float
    normalized_entropy: float
    dropped_fraction: float
    drop_rate_by_position: list[float]
    token_consistency: float | None
    consistency_occurrences: int


@dataclass
class RoutingReport:
    """The routing analysis of one model on one data set."""

    model: str
    kind: str  # "stock" or "generic"
    capacity_factor: float
    position_buckets: list[list[int]]  # [first, last] position of each bucket
    layers: list[LayerRouting] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Return the report as JSON-ready data."""
        return asdict(self)


class _LayerAccumulator:
    """Running sums for one layer; every update is a few vectorised ops over a batch."""

    def __init__(self, name: str, num_experts: int, top_k: int, num_buckets: int, vocab_size: int):
        self.name, self.num_experts, self.top_k = name, num_experts, top_k
        self.tokens = 0
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.bucket_pairs = torch.zeros(num_buckets, dtype=torch.float64)
        self.bucket_dropped = torch.zeros(num_buckets, dtype=torch.float64)
        self.id_expert = torch.zeros(vocab_size * num_experts, dtype=torch.float64)

    def update(
        self,
        probs: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        selected: torch.Tensor,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        buckets: torch.Tensor,
        capacity_factor: float,
    ) -> None:
        """Add one batch: (B, S, E) probs, (B, S, k) indices/weights/selected, (B, S) mask, ids, buckets."""
        real = mask.bool()
        selected = selected & real[..., None]
        self.tokens += int(real.sum())
        self.counts += torch.bincount(indices[selected], minlength=self.num_experts).double()
        probs = probs[real].double()
        self.entropy_sum += float(-(probs * probs.clamp(min=1e-30).log()).sum())
        for sequence in range(indices.shape[0]):
            num_real = int(real[sequence].sum())
            if num_real == 0:
                continue
            capacity = expert_capacity(capacity_factor, num_real, self.top_k, self.num_experts)
            kept = apply_capacity(indices[sequence], weights[sequence], selected[sequence], capacity, self.num_experts)
            candidates = selected[sequence].sum(-1).double()
            dropped = candidates - kept.sum(-1).double()
            self.bucket_pairs.index_add_(0, buckets[sequence], candidates)
            self.bucket_dropped.index_add_(0, buckets[sequence], dropped)
        first_choice = indices[..., 0][real]
        keys = input_ids[real].long() * self.num_experts + first_choice
        self.id_expert += torch.bincount(keys, minlength=self.id_expert.numel()).double()

    def result(self) -> LayerRouting:
        counts = self.counts
        mean = counts.mean()
        load_cv = float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0
        per_id = self.id_expert.view(-1, self.num_experts)
        occurrences = per_id.sum(-1)
        repeated = occurrences >= 2
        consistent = per_id[repeated].max(-1).values.sum()
        total_repeated = occurrences[repeated].sum()
        entropy = self.entropy_sum / max(self.tokens, 1)
        pairs = self.bucket_pairs
        return LayerRouting(
            name=self.name,
            num_experts=self.num_experts,
            top_k=self.top_k,
            tokens=self.tokens,
            expert_counts=[int(c) for c in counts.tolist()],
            expert_load=(counts / counts.sum().clamp(min=1)).tolist(),
            load_cv=load_cv,
            router_entropy=entropy,
            normalized_entropy=entropy / math.log(self.num_experts) if self.num_experts > 1 else 0.0,
            dropped_fraction=float(self.bucket_dropped.sum() / pairs.sum().clamp(min=1)),
            drop_rate_by_position=(self.bucket_dropped / pairs.clamp(min=1)).tolist(),
            token_consistency=float(consistent / total_repeated) if total_repeated > 0 else None,
            consistency_occurrences=int(total_repeated),
        )


def _stock_top_k(config) -> int:
    top_k = first_positive_field(config, TOP_K_FIELDS)
    if top_k is not None:
        return top_k
    raise UpcycleError(f"cannot tell the top-k of this {config.model_type} MoE (no {'/'.join(TOP_K_FIELDS)} field)")


def _stock_layers(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Run a stock MoE with ``output_router_logits=True``; return per layer its softmax top-k routing."""
    outputs = model(**batch, output_router_logits=True)
    router_logits = getattr(outputs, "router_logits", None)
    if not router_logits:
        raise UpcycleError(
            f"{type(model).__name__} returns no router logits; `upcycle routes` reads stock transformers MoEs "
            "and generic upcycle models"
        )
    top_k = _stock_top_k(model.config)
    batch_size, seq_len = batch["input_ids"].shape
    layers = []
    for layer, logits in enumerate(router_logits):
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = probs.topk(top_k, dim=-1)
        layers.append((f"MoE layer {layer}", _shaped(probs, indices, weights, None, batch_size, seq_len)))
    return layers


def _biased_router_layers(
    model: nn.Module, routers: list[tuple[str, nn.Module]], batch: dict[str, torch.Tensor]
) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Run a stock MoE with DeepSeek-V3-style routers and return per layer the routing those routers chose:
    the sigmoid scores normalised over the experts (as probabilities, for the entropy), the experts
    picked (selection bias and group limit included) and their weights (without the routed scaling
    factor, so they sum to 1 where the model renormalises)."""
    outputs: dict[str, tuple] = {}
    handles = [
        module.register_forward_hook(lambda _m, _args, out, name=name: outputs.__setitem__(name, out))
        for name, module in routers
    ]
    try:
        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    batch_size, seq_len = batch["input_ids"].shape
    layers = []
    for name, module in routers:
        logits, weights, indices = outputs[name]
        scale = float(getattr(module, "routed_scaling_factor", 1.0) or 1.0)
        scores = logits.float().sigmoid()
        probs = scores / scores.sum(dim=-1, keepdim=True)
        routing = _shaped(probs, indices, weights.float() / scale, None, batch_size, seq_len)
        layers.append((name, routing))
    return layers


def _generic_layers(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], batch: dict[str, torch.Tensor]
) -> list[tuple[str, dict[str, torch.Tensor]]]:
    model(**batch)
    batch_size, seq_len = batch["input_ids"].shape
    layers = []
    for name, block in blocks:
        routing = block.last_router_output
        layers.append(
            (
                name,
                _shaped(
                    routing.router_probs,
                    routing.expert_indices,
                    routing.expert_weights,
                    routing.dispatch_mask,
                    batch_size,
                    seq_len,
                ),
            )
        )
    return layers


def _shaped(probs, indices, weights, dispatch_mask, batch_size, seq_len) -> dict[str, torch.Tensor]:
    def view(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().reshape(batch_size, seq_len, -1).cpu()

    selected = torch.ones_like(indices, dtype=torch.bool) if dispatch_mask is None else dispatch_mask
    return {
        "probs": view(probs.float()),
        "indices": view(indices),
        "weights": view(weights.float()),
        "selected": view(selected),
    }


@torch.no_grad()
def analyze_routing(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    capacity_factor: float = 1.0,
    max_length: int = 256,
    num_buckets: int = 8,
    name: str = "",
    quiet: bool = True,
    total: int | None = None,
) -> RoutingReport:
    """Run ``batches`` (``input_ids``, ``attention_mask``) through ``model`` and measure its routing.

    Args:
        model: a stock transformers MoE or a model holding `upcycle.moe.MoE` blocks.
        capacity_factor: the factor of the simulated expert capacity (drops, drop rate by position).
        max_length: the longest sequence; positions ``0 .. max_length - 1`` split into ``num_buckets``.
        num_buckets: position buckets of ``drop_rate_by_position``.
        total: the number of batches, for the progress bar.

    Returns:
        The `RoutingReport`.

    Raises:
        UpcycleError: the model is no MoE that can be read, or the data holds no tokens.
    """

    if capacity_factor <= 0:
        raise UpcycleError(f"{flag('capacity_factor')} must be positive, got {capacity_factor}")
    num_buckets = max(1, min(num_buckets, max_length))
    bucket_of = torch.arange(max_length) * num_buckets // max_length
    edges = [[int((bucket_of == b).nonzero().min()), int((bucket_of == b).nonzero().max())] for b in range(num_buckets)]
    blocks = moe_modules(model)
    routers = [] if blocks else biased_routers(model)
    kind = "generic" if blocks else "stock"
    vocab_size = int(model.get_input_embeddings().num_embeddings)
    accumulators: dict[str, _LayerAccumulator] = {}
    device = next(model.parameters()).device
    model.eval()
    for batch in progress(batches, desc="routing", unit="batch", total=total, quiet=quiet):
        batch = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        if blocks:
            layers = _generic_layers(model, blocks, batch)
        elif routers:
            layers = _biased_router_layers(model, routers, batch)
        else:
            layers = _stock_layers(model, batch)
        seq_len = batch["input_ids"].shape[1]
        if seq_len > max_length:
            raise UpcycleError(f"a batch has {seq_len} positions but max_length is {max_length}")
        buckets = bucket_of[:seq_len].expand(batch["input_ids"].shape[0], seq_len)
        for layer_name, routing in layers:
            if layer_name not in accumulators:
                num_experts, top_k = routing["probs"].shape[-1], routing["indices"].shape[-1]
                accumulators[layer_name] = _LayerAccumulator(layer_name, num_experts, top_k, num_buckets, vocab_size)
            accumulators[layer_name].update(
                routing["probs"],
                routing["indices"],
                routing["weights"],
                routing["selected"],
                batch["attention_mask"].cpu(),
                batch["input_ids"].cpu(),
                buckets,
                capacity_factor,
            )
    if not accumulators or next(iter(accumulators.values())).tokens == 0:
        raise UpcycleError(f"the data gave no tokens to route; check {flag('calibration')}")
    layers = [accumulator.result() for accumulator in accumulators.values()]
    return RoutingReport(name or type(model).__name__, kind, capacity_factor, edges, layers)


def routing_report(
    source: str | Path,
    calibration: str | Path,
    *,
    tokenizer: str | Path | None = None,
    calibration_samples: int = 128,
    max_length: int = 256,
    batch_size: int = 4,
    capacity_factor: float = 1.0,
    num_buckets: int = 8,
    quiet: bool = False,
) -> RoutingReport:
    """Load the MoE at ``source`` (with `upcycle.load`) and its tokenizer, and analyse its routing on
    up to ``calibration_samples`` texts of ``calibration`` (see `upcycle.calibration.load_calibration_texts`).

    Raises:
        UpcycleError: the model, tokenizer or data cannot be read, or the model is no readable MoE.
    """
    from transformers import AutoTokenizer

    from upcycle.calibration import calibration_batches, load_calibration_texts
    from upcycle.generic.load import load
    from upcycle.progress import progress_bars

    check_count("calibration_samples", calibration_samples)
    check_count("max_length", max_length)
    check_count("batch_size", batch_size)
    check_count("position_buckets", num_buckets)
    check_real("capacity_factor", capacity_factor, minimum=0.0, exclusive_minimum=True)
    texts = load_calibration_texts(calibration, samples=calibration_samples)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or source)
    except (OSError, ValueError) as err:
        raise UpcycleError(
            f"cannot load a tokenizer from {tokenizer or source} ({str(err).splitlines()[0]}); pass {flag('tokenizer')}"
        ) from None
    with progress_bars(not quiet):
        model = load(source)
    vocab_size = int(model.get_input_embeddings().num_embeddings)
    batches = calibration_batches(tok, texts, max_length=max_length, batch_size=batch_size, vocab_size=vocab_size)
    return analyze_routing(
        model,
        batches,
        capacity_factor=capacity_factor,
        max_length=max_length,
        num_buckets=num_buckets,
        name=str(source),
        quiet=quiet,
        total=-(-len(texts) // batch_size),
    )


def write_report(report: RoutingReport, output: str | Path, force: bool = False) -> Path:
    """Write ``routes.json``, the per-layer expert-load heatmap and the drop-by-position plot into
    ``output`` (atomically); return the directory.

    Raises:
        UpcycleError: ``output`` exists and ``force`` is False.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from upcycle.checkpoint import atomic_output_dir

    output = Path(output)
    with atomic_output_dir(output, force) as directory:
        (directory / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        load = [layer.expert_load for layer in report.layers]
        figure, axes = plt.subplots(figsize=(max(4, 0.5 * len(load[0]) + 2), max(3, 0.35 * len(load) + 1.5)))
        image = axes.imshow(load, aspect="auto", cmap="viridis")
        axes.set_xlabel("expert")
        axes.set_ylabel("layer")
        axes.set_yticks(range(len(load)), [layer.name for layer in report.layers], fontsize=7)
        axes.set_title(f"expert load (uniform = {1 / len(load[0]):.3f})", fontsize=9)
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        figure.savefig(directory / LOAD_PLOT, dpi=120)
        plt.close(figure)
        figure, axes = plt.subplots(figsize=(6, 4))
        centres = [(first + last) / 2 for first, last in report.position_buckets]
        for layer in report.layers:
            axes.plot(centres, layer.drop_rate_by_position, marker="o", label=layer.name)
        axes.set_xlabel("position in sequence")
        axes.set_ylabel(f"drop rate at capacity factor {report.capacity_factor}")
        axes.legend(fontsize=6)
        figure.tight_layout()
        figure.savefig(directory / DROP_PLOT, dpi=120)
        plt.close(figure)
    return output
