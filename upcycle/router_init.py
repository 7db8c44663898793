"""Initial router weights for an upcycled MoE layer: random, k-means on calibration FFN inputs,
neuron-cluster centroids (partition), and virtual groups (granular).

Not to be confused with `upcycle.moe.routing`, the routing modules a MoE block runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from upcycle.checkpoint import SourceCheckpoint
from upcycle.errors import UpcycleError, flag
from upcycle.experts import ExpertBuilder, PartitionExperts
from upcycle.families import FamilyPair
from upcycle.kmeans import spherical_kmeans
from upcycle.progress import progress_bars
from upcycle.rng import derived_generator

ROUTER_INITS = ("random", "kmeans", "centroids")


def random_router(num_experts: int, hidden_size: int, std: float, seed: int, layer: int) -> torch.Tensor:
    """Return a (num_experts, hidden_size) float32 router drawn from N(0, std^2), reproducible per layer."""
    generator = derived_generator(seed, "router", layer)  # was seed * 1_000_003 + layer * 9_176 (collisions)
    return torch.randn(num_experts, hidden_size, generator=generator) * std


def kmeans_router(states: torch.Tensor, num_experts: int, std: float, seed: int, layer: int) -> torch.Tensor:
    """Return a (num_experts, hidden) float32 router whose rows are spherical k-means centroids of
    `states` (one layer's FFN inputs, (tokens, hidden)).

    Unit centroids make the router's argmax on a calibration token its cluster, so routing starts
    input-dependent and as balanced as the clusters. Rows are scaled to the norm a random row
    N(0, std^2) would have (std * sqrt(hidden)), so logits start as soft as with random init.

    Raises:
        ValueError: fewer calibration tokens than experts.
    """
    generator = derived_generator(seed, "kmeans-router", layer)
    centroids, _ = spherical_kmeans(states, num_experts, generator)
    return centroids * (std * math.sqrt(states.shape[1]))


def centroid_router(centroids: torch.Tensor) -> torch.Tensor:
    """Return the router (E, hidden) float32 whose row e is the centroid of expert e's neurons
    (a partition's mean gate rows): an expert's logit is then its neurons' mean gate pre-activation."""
    return centroids.float().clone()


def virtual_group_router(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """Return `rows` (C, hidden) with each row repeated `group_size` times in a row: (C * group_size, hidden).

    Granular upcycling's virtual groups (He et al. 2024): the G shards of one FFN copy share a
    router row, so they tie and top-k (a multiple of G) selects whole copies at init.
    """
    return rows.repeat_interleave(group_size, dim=0)


def check_router_init(router_init: str | None, builder: ExpertBuilder, calibration: str | Path | None) -> str:
    """Return the router initialisation to use (None: "centroids" for partition, else "random").

    Raises:
        UpcycleError: unknown kind, kmeans without calibration data, calibration data without
            kmeans, centroids for a method without neuron clusters, or kmeans for partition.
    """
    is_partition = isinstance(builder, PartitionExperts)
    chosen = router_init or ("centroids" if is_partition else "random")
    if chosen not in ROUTER_INITS:
        raise UpcycleError(f"unknown {flag('router_init')} {chosen!r}; use one of {', '.join(ROUTER_INITS)}")
    if chosen == "kmeans" and calibration is None:
        raise UpcycleError(
            f"{flag('router_init')} kmeans needs {flag('calibration')} DATA "
            "(a text/jsonl/parquet/csv file, a folder, or a Hub dataset id)"
        )
    if chosen != "kmeans" and calibration is not None:
        raise UpcycleError(
            f"{flag('calibration')} is only used by {flag('router_init')} kmeans; "
            f"add it or remove {flag('calibration')}"
        )
    if chosen == "centroids" and not is_partition:
        raise UpcycleError(
            f"{flag('router_init')} centroids needs {flag('method')} partition (it uses the neuron clusters)"
        )
    if chosen == "kmeans" and is_partition:
        raise UpcycleError(
            f"{flag('router_init')} kmeans cannot tell which hidden-state cluster belongs to which neuron partition; "
            f"use {flag('router_init')} centroids (default) or random with {flag('method')} partition"
        )
    return chosen


def calibrated_router_rows(
    checkpoint: SourceCheckpoint,
    family: FamilyPair,
    layers: list[int],
    rows: int,
    std: float,
    seed: int,
    calibration: str | Path,
    *,
    samples: int,
    max_length: int,
    max_tokens: int,
    quiet: bool,
) -> dict[int, torch.Tensor]:
    """Return, per MoE layer, `rows` k-means router rows (rows, hidden) fitted on the FFN inputs the
    dense source produces on the calibration texts.

    The dense model runs once over streamed batches; each layer keeps a sample of at most
    `max_tokens` inputs, and each layer's sample is dropped as soon as its rows are computed.

    Raises:
        UpcycleError: the calibration data cannot be loaded, the source has no tokenizer, or too
            few tokens were seen to fit `rows` clusters.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.calibration import calibration_batches, collect_ffn_inputs, load_calibration_texts

    texts = load_calibration_texts(calibration, samples)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError) as err:
        raise UpcycleError(
            f"{flag('router_init')} kmeans needs the source's tokenizer, which {checkpoint.name} lacks: "
            f"{str(err).splitlines()[0]}"
        ) from None
    with progress_bars(not quiet):
        model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype="auto")
    model.eval()
    gate_module = family.dense_mlp.gate.removesuffix(".weight")
    batch_size = 4
    states = collect_ffn_inputs(
        model,
        calibration_batches(
            tokenizer,
            texts,
            max_length=max_length,
            batch_size=batch_size,
            vocab_size=int(model.get_input_embeddings().num_embeddings),
        ),
        {layer: gate_module.format(layer=layer) for layer in layers},
        max_tokens=max_tokens,
        seed=seed,
        total=-(-len(texts) // batch_size),
        quiet=quiet,
    )
    del model
    router_rows = {}
    for layer in layers:
        layer_states = states.pop(layer)
        if len(layer_states) < rows:
            raise UpcycleError(
                f"calibration gave {len(layer_states)} tokens, fewer than the {rows} router rows to fit; "
                f"use more or longer {flag('calibration_samples')}"
            )
        router_rows[layer] = kmeans_router(layer_states.float(), rows, std, seed, layer)
    return router_rows
