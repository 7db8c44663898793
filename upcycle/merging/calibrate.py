"""Calibration for `upcycle merge`: run the MoE once over text and record each MoE layer's routing."""

from __future__ import annotations

from upcycle.calibration import MoELayerProbe, RoutingStatistics, calibration_batches, collect_routing_statistics
from upcycle.errors import UpcycleError
from upcycle.merging.source import MoESource
from upcycle.progress import progress_bars


def calibrate(
    moe: MoESource, texts: list[str], expert_outputs: bool, max_length: int, batch_size: int, quiet: bool
) -> dict[int, RoutingStatistics]:
    """Run the MoE over `texts` once and return routing statistics per MoE layer.

    `expert_outputs` also records every expert's mean output (what HC-SMoE groups experts by).

    Raises:
        UpcycleError: the checkpoint has no tokenizer that loads.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(moe.checkpoint.path)
    except (OSError, ValueError) as err:
        raise UpcycleError(
            f"calibration needs a tokenizer and {moe.name} has none that loads ({str(err).splitlines()[0]}); "
            "save one next to the weights"
        ) from None
    with progress_bars(not quiet):
        model = AutoModelForCausalLM.from_pretrained(moe.checkpoint.path, dtype="auto")
    model.eval()
    probes = {
        layer: MoELayerProbe(moe.module_name(layer), moe.router(layer), moe.shared_gate(layer))
        for layer in moe.moe_layers
    }
    batches = calibration_batches(
        tokenizer,
        texts,
        max_length=max_length,
        batch_size=batch_size,
        vocab_size=int(model.get_input_embeddings().num_embeddings),
    )
    stats = collect_routing_statistics(
        model,
        batches,
        probes,
        top_k=moe.top_k,
        normalize_top_k=bool(moe.config.get("norm_topk_prob", True)),
        expert_outputs=expert_outputs,
        total=-(-len(texts) // batch_size),
        quiet=quiet,
    )
    del model
    return stats
