"""Calibration data: load text with `datasets`, tokenize it, and stream batches through a model.

Routines that collect statistics (FFN inputs for router initialisation: `collect_ffn_inputs`;
routing counts for merging) build on `calibration_batches`, which yields one tokenized batch at a time so memory
stays bounded by a batch, whatever the data size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.errors import UpcycleError
from upcycle.progress import progress

TEXT_FIELDS = ("text", "content", "prompt")


def load_calibration_texts(data: str | Path, samples: int = 128, split: str = "train") -> list[str]:
    """Return up to `samples` non-empty texts from `data`: a local .txt/.text/.md, .jsonl/.json,
    .parquet or .csv file, a local directory or a Hub dataset id (`upcycle.data_files`).

    JSON/parquet/CSV rows use the first of the fields `text`, `content`, `prompt` that exists.

    Returns:
        The texts, stripped, in file order; at least one.

    Raises:
        UpcycleError: one line, for a file that does not exist, has an unknown extension, is empty
            or not UTF-8 text; data without a text field; or data `datasets` cannot load.
    """
    from datasets import load_dataset

    from upcycle.data_files import DataFileError, load_error_detail, resolve_data_source

    try:
        builder, kwargs = resolve_data_source(data, split)
    except DataFileError as err:
        raise UpcycleError(f"calibration {err}") from None
    texts: list[str] = []
    try:
        for row in load_dataset(builder, split=split, streaming=True, **kwargs):
            field = next((name for name in TEXT_FIELDS if name in row), None)
            if field is None:
                raise UpcycleError(
                    f"calibration data {data} has no {'/'.join(TEXT_FIELDS)} field (fields: {list(row)})"
                )
            text = str(row[field]).strip()
            if text:
                texts.append(text)
            if len(texts) >= samples:
                break
    except UpcycleError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise UpcycleError(f"cannot load calibration data {data}: {load_error_detail(err)}") from None
    if not texts:
        raise UpcycleError(f"calibration data {data} holds no text")
    return texts


def calibration_batches(
    tokenizer,
    texts: list[str],
    max_length: int = 256,
    batch_size: int = 4,
    vocab_size: int | None = None,
    *,
    special_tokens_mask: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenized batches (`input_ids`, `attention_mask`, and `special_tokens_mask` when asked)
    of `texts`, truncated to `max_length`.

    Raises:
        UpcycleError: `max_length` or `batch_size` is below 1, or the tokenizer gives a token id
            outside the model's vocabulary of `vocab_size` (a tokenizer of another model).
    """
    if max_length < 1 or batch_size < 1:
        raise UpcycleError(f"max_length and batch_size must be at least 1, got {max_length} and {batch_size}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            return_special_tokens_mask=special_tokens_mask,
        )
        largest = int(batch["input_ids"].max()) if batch["input_ids"].numel() else -1
        if vocab_size is not None and largest >= vocab_size:
            raise UpcycleError(
                f"the tokenizer gives token id {largest} but the model's vocabulary has {vocab_size} entries; "
                "use the model's own tokenizer"
            )
        yield batch


class _TokenReservoir:
    """A uniform random sample of at most `capacity` rows from a stream (reservoir sampling,
    Algorithm R, vectorised per batch), stored in bfloat16 to halve its memory."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity = capacity
        self.generator = generator
        self.rows: torch.Tensor | None = None
        self.filled = 0
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.bfloat16)
        if self.rows is None:
            self.rows = torch.empty(self.capacity, rows.shape[1], dtype=torch.bfloat16)
        take = min(self.capacity - self.filled, len(rows))
        self.rows[self.filled : self.filled + take] = rows[:take]
        self.filled += take
        rest = rows[take:]
        positions = self.seen + take + torch.arange(len(rest))
        self.seen += len(rows)
        if len(rest):
            slots = (torch.rand(len(rest), generator=self.generator) * (positions + 1)).long()
            keep = slots < self.capacity
            self.rows[slots[keep]] = rest[keep]

    def sample(self) -> torch.Tensor:
        return self.rows[: self.filled] if self.rows is not None else torch.empty(0)


def collect_ffn_inputs(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    modules: dict[int, str],
    *,
    max_tokens: int = 4096,
    seed: int = 0,
    total: int | None = None,
    quiet: bool = False,
) -> dict[int, torch.Tensor]:
    """Run `batches` through `model` and return, per layer, a uniform sample of at most `max_tokens`
    inputs (tokens, hidden) of the module named `modules[layer]` (e.g. the FFN's gate_proj).

    Inputs are captured with forward pre-hooks; padding tokens are skipped. Memory is bounded by
    one batch plus `len(modules) * max_tokens * hidden` bfloat16 values, whatever the data size.

    Raises:
        UpcycleError: a module name is not in the model.
    """

    from upcycle.rng import derived_generator

    named = dict(model.named_modules())
    missing = [name for name in modules.values() if name not in named]
    if missing:
        raise UpcycleError(f"the model has no module {missing[0]!r} to collect FFN inputs from")
    reservoirs = {
        layer: _TokenReservoir(max_tokens, derived_generator(seed, "calibration", layer)) for layer in modules
    }
    mask: list[torch.Tensor] = []

    def hook_for(layer: int):
        def hook(_module, args):
            hidden = args[0]
            reservoirs[layer].add(hidden.reshape(-1, hidden.shape[-1])[mask[0]])

        return hook

    handles = [named[name].register_forward_pre_hook(hook_for(layer)) for layer, name in modules.items()]
    try:
        with torch.no_grad():
            for batch in progress(batches, desc="calibration", unit="batch", total=total, quiet=quiet):
                mask[:] = [batch["attention_mask"].reshape(-1).bool()]
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return {layer: reservoir.sample() for layer, reservoir in reservoirs.items()}


@dataclass(frozen=True)
class MoELayerProbe:
    """What routing-statistics collection needs to know about one MoE layer of a loaded model.

    `block` is the module name of the sparse MoE block (its input is the routed hidden state);
    `router_weight` (E, H) and `shared_gate_weight` (1, H) are read from the checkpoint, so the
    routing is recomputed the same way for every family (softmax, top-k, optional renormalisation).
    """

    block: str
    router_weight: torch.Tensor
    shared_gate_weight: torch.Tensor | None = None
    # DeepSeek-V3-style routers (sigmoid scores): the selection bias and the group-limited top-k.
    selection_bias: torch.Tensor | None = None
    groups: int = 1
    top_groups: int = 1

    def route(
        self, hidden: torch.Tensor, top_k: int, normalize_top_k: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (per-expert scores (N, E) in float32, mixture weights (N, E): zero outside each token's
        top-k, the top-k expert indices (N, k)) of the hidden states `hidden` (N, H), as the family's
        router computes them.

        Softmax routers score with softmax(x W^T) and pick the top-k scores. Sigmoid routers (a
        `selection_bias`) score with sigmoid(x W^T) in float32, pick the top-k of score + bias among
        the `top_groups` best of `groups` equal groups (a group scores the sum of its two best), and
        weigh them by their scores. Weights are renormalised to sum to 1 when `normalize_top_k`.
        """
        if self.selection_bias is None:
            logits = torch.nn.functional.linear(hidden, self.router_weight.to(hidden.device, hidden.dtype))
            scores = torch.softmax(logits.float(), dim=-1)
            top_weights, top_index = torch.topk(scores, top_k, dim=-1)
        else:
            logits = torch.nn.functional.linear(hidden.float(), self.router_weight.to(hidden.device).float())
            scores = logits.sigmoid()
            choice = scores + self.selection_bias.to(scores.device).float()
            experts = choice.shape[-1]
            grouped = choice.view(-1, self.groups, experts // self.groups)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            kept_groups = torch.topk(group_scores, k=self.top_groups, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, kept_groups, 1)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, experts).bool()
            top_index = torch.topk(choice.masked_fill(~expert_mask, float("-inf")), top_k, dim=-1, sorted=False)[1]
            top_weights = scores.gather(1, top_index)
            if normalize_top_k:  # as transformers' Glm4MoeTopkRouter (and DeepSeek-V3) renormalise
                top_weights = top_weights / (top_weights.sum(dim=-1, keepdim=True) + 1e-20)
            return scores, torch.zeros_like(scores).scatter_(1, top_index, top_weights), top_index
        if normalize_top_k:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return scores, torch.zeros_like(scores).scatter_(1, top_index, top_weights), top_index


@dataclass
class RoutingStatistics:
    """Routing statistics of one MoE layer over the non-padding calibration tokens (sums, float64)."""

    tokens: int
    selection_counts: torch.Tensor  # (E,): tokens that had the expert in their top-k
    probability_sum: torch.Tensor  # (E,): routing score over all experts (softmax; sigmoid for DeepSeek-V3-style)
    weight_sum: torch.Tensor  # (E,): mixture weight the token gave the expert (0 when not in its top-k)
    shared_gate_sum: float | None = None  # sigmoid(shared_expert_gate(x)), for shared-expert MoEs
    expert_output_sum: torch.Tensor | None = None  # (E, H): every expert applied to every token

    def mean(self, total: torch.Tensor) -> torch.Tensor:
        """Return `total` divided by the token count (zeros when no token was seen)."""
        return total / max(self.tokens, 1)

    def to_dict(self) -> dict:
        """Return the statistics as JSON-ready data (means, not sums; no expert outputs)."""
        return {
            "tokens": self.tokens,
            "selection_counts": [int(c) for c in self.selection_counts.tolist()],
            "mean_probability": self.mean(self.probability_sum).tolist(),
            "mean_weight": self.mean(self.weight_sum).tolist(),
            "shared_gate_mean": None if self.shared_gate_sum is None else self.shared_gate_sum / max(self.tokens, 1),
        }


def _fused_expert_output_sums(experts: torch.nn.Module, hidden: torch.Tensor, act) -> torch.Tensor:
    """Return (E, H): each expert of a transformers-5 fused experts module applied to `hidden` (N, H), summed
    over tokens. One expert at a time, so the intermediate activations are (N, I), not (E, N, I)."""
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise UpcycleError(
            f"{type(experts).__name__} has no fused gate_up_proj/down_proj; cannot compute expert outputs"
        )
    sums = []
    for gate_up, down in zip(experts.gate_up_proj, experts.down_proj, strict=True):
        gate, up = torch.nn.functional.linear(hidden, gate_up).chunk(2, dim=-1)
        sums.append(torch.nn.functional.linear(act(gate) * up, down).double().sum(0))
    return torch.stack(sums)


class RoutingRecorder:
    """Forward pre-hooks on a model's MoE blocks that accumulate `RoutingStatistics` per MoE layer.

    Used as a context manager (the hooks are removed on exit) by whatever drives the model: set
    `mask` (the flat attention mask of the batch) before each batch goes through a block. Routing
    is recomputed from the probe's router weight (softmax over experts, top-k, renormalised when
    `normalize_top_k`), as Mixtral, Qwen-MoE, GraniteMoE and FlexOlmo route. Only running sums are
    kept. With `expert_outputs`, every expert is also applied to every token (HC-SMoE's output
    features; E times the FFN compute).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: dict[int, MoELayerProbe],
        top_k: int,
        normalize_top_k: bool = True,
        expert_outputs: bool = False,
    ):
        from transformers.activations import ACT2FN

        self.model = model
        self.layers = layers
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.expert_outputs = expert_outputs
        self.act = ACT2FN[getattr(model.config, "hidden_act", "silu")]
        self.mask = torch.ones(0, dtype=torch.bool)
        self.stats: dict[int, RoutingStatistics] = {}
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        """Install the hooks and return the recorder.

        Raises:
            UpcycleError: a probe names a module the model does not have.
        """
        for layer, probe in self.layers.items():
            try:
                block = self.model.get_submodule(probe.block)
            except AttributeError:
                self.__exit__()
                raise UpcycleError(f"the loaded model has no MoE block {probe.block!r}") from None
            self._handles.append(block.register_forward_pre_hook(self._hook_for(layer, probe)))
        return self

    def __exit__(self, *_exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook_for(self, layer: int, probe: MoELayerProbe):
        num_experts = probe.router_weight.shape[0]
        self.stats[layer] = RoutingStatistics(
            tokens=0,
            selection_counts=torch.zeros(num_experts, dtype=torch.float64),
            probability_sum=torch.zeros(num_experts, dtype=torch.float64),
            weight_sum=torch.zeros(num_experts, dtype=torch.float64),
            shared_gate_sum=0.0 if probe.shared_gate_weight is not None else None,
            expert_output_sum=(
                torch.zeros(num_experts, probe.router_weight.shape[1], dtype=torch.float64)
                if self.expert_outputs
                else None
            ),
        )

        @torch.no_grad()
        def hook(module, args):
            hidden = args[0].reshape(-1, args[0].shape[-1])[self.mask.to(args[0].device)]
            record = self.stats[layer]
            probabilities, weights, top_index = probe.route(hidden, self.top_k, self.normalize_top_k)
            record.tokens += hidden.shape[0]
            record.selection_counts += torch.bincount(top_index.reshape(-1).cpu(), minlength=num_experts).double()
            record.probability_sum += probabilities.sum(0).double().cpu()
            record.weight_sum += weights.sum(0).double().cpu()
            if probe.shared_gate_weight is not None:
                gate = torch.nn.functional.linear(hidden, probe.shared_gate_weight.to(hidden.device, hidden.dtype))
                record.shared_gate_sum += torch.sigmoid(gate.float()).sum().item()
            if self.expert_outputs:
                record.expert_output_sum += _fused_expert_output_sums(module.experts, hidden, self.act).cpu()

        return hook


@torch.no_grad()
def collect_routing_statistics(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    layers: dict[int, MoELayerProbe],
    top_k: int,
    normalize_top_k: bool = True,
    expert_outputs: bool = False,
    total: int | None = None,
    quiet: bool = False,
) -> dict[int, RoutingStatistics]:
    """Run `batches` through `model` once and return routing statistics per MoE layer (`RoutingRecorder`).

    Memory is one batch of activations whatever the data size.

    Raises:
        UpcycleError: a probe names a module the model does not have.
    """
    device = next(model.parameters()).device
    with RoutingRecorder(model, layers, top_k, normalize_top_k, expert_outputs) as recorder:
        for batch in progress(batches, total=total, desc="calibration", unit="batch", quiet=quiet):
            recorder.mask = batch["attention_mask"].reshape(-1).bool()
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return recorder.stats
