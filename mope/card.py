"""The model card facts of a MoE checkpoint exported from a MoPE adapter (rendered by `upcycle.card`)."""

from __future__ import annotations

from pathlib import Path

from upcycle.card import TOKENIZER_MARKERS, CardFacts, is_hub_id, write_card
from upcycle.summaries import ConvertSummary

MOPE_EXPORT_LIMITATIONS = (
    "Layers the adapter left out hold identical copies of the dense FFN behind a zero router; they compute the "
    "dense FFN exactly.",
    "Training-time router jitter (router_noise) is not part of the exported model, as it is not part of the "
    "adapted model at inference.",
    "Biases, safety behaviour and knowledge are those of the base model and of the adapter's training data.",
)


def mope_export_facts(
    summary: ConvertSummary, command: str | None = None, model_id: str | None = None, has_tokenizer: bool = False
) -> CardFacts:
    """Return the card facts of a MoPE adapter exported into a stock MoE checkpoint; the usage snippet
    loads `model_id` (the Hub repo when pushing), else the output path."""
    source = summary.source
    source_link = f"[{source}](https://huggingface.co/{source})" if is_hub_id(source) else f"`{source}`"
    adapter = summary.settings.get("adapter", "adapter")
    return CardFacts(
        title=Path(str(summary.output)).name,
        operation="mope-export",
        model_id=model_id or str(summary.output),
        summary=(
            f"A sparse Mixture-of-Experts ({summary.target_model_type}) exported from the block-routed MoPE "
            f"adapter `{adapter}` (a mixture of LoRA experts) on the dense {source_link} "
            f"({summary.source_model_type}), {summary.family}, {summary.layout} layout. Expert i of each MoE "
            "layer is the dense FFN plus the adapter's LoRA expert i (W + (alpha / r) B_i A_i, the shared LoRA "
            "expert included) and the router is the adapter's, so this checkpoint computes what the adapted "
            "model computes (float32 logits within 1e-5)."
        ),
        base_models=[source],
        base_model_relation="finetune",
        tags=["moe", "mope", "mixture-of-lora-experts", "mixture-of-experts", summary.target_model_type],
        command=command,
        model_type=summary.target_model_type,
        num_experts=summary.num_experts,
        top_k=summary.top_k,
        moe_layers=len(summary.moe_layers),
        total_parameters=summary.total_parameters,
        active_parameters=summary.active_parameters,
        settings=dict(summary.settings),
        limitations=MOPE_EXPORT_LIMITATIONS,
        has_tokenizer=has_tokenizer,
    )


def write_mope_export_card(
    directory: Path, summary: ConvertSummary, command: str | None = None, model_id: str | None = None
) -> Path:
    """Write README.md for the exported checkpoint `summary` into `directory` and return its path."""
    has_tokenizer = any((Path(directory) / name).is_file() for name in TOKENIZER_MARKERS)
    return write_card(directory, mope_export_facts(summary, command, model_id, has_tokenizer))
