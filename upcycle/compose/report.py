"""What a compose reports: its summary, and the model card naming the base and every source."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from upcycle.card import TOKENIZER_MARKERS, CardFacts, is_hub_id, write_card

ROUTER_DESCRIPTIONS = {
    "hidden": "rows from the base model's hidden states on each expert's prompts (mergekit-moe's hidden gates)",
    "cheap_embed": "rows from the base's token embeddings of each expert's prompts",
    "random": "random rows",
    "kmeans": "rows from the base model's mean hidden state on each expert's data (BTX)",
}


@dataclass
class ComposeSummary:
    """What a compose produced."""

    output: Path
    family: str
    base: str
    sources: list[str]  # one per routed expert, in order (a source may repeat)
    source_model_type: str
    target_model_type: str
    layout: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    non_expert: str
    router_init: str
    shared_expert: str
    total_parameters: int
    active_parameters: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the summary as JSON-ready data."""
        data = asdict(self)
        data["output"] = str(self.output)
        return data


def _link(name: str) -> str:
    return f"[{name}](https://huggingface.co/{name})" if is_hub_id(name) else f"`{name}`"


def compose_facts(
    summary: ComposeSummary, command: str | None = None, model_id: str | None = None, has_tokenizer: bool = False
) -> CardFacts:
    """Return the card facts of a compose: every source in `base_model`, relation "merge"."""
    non_expert = (
        f"from {_link(summary.base)}"
        if summary.non_expert == "base"
        else "averaged elementwise over the experts' sources (Branch-Train-MiX)"
    )
    experts = "\n".join(f"- expert {index}: {_link(source)}" for index, source in enumerate(summary.sources))
    distinct = len(set(summary.sources))
    shared = " The base's FFN is the always-on shared expert." if summary.shared_expert == "base" else ""
    return CardFacts(
        title=Path(str(summary.output)).name,
        operation="compose",
        model_id=model_id or str(summary.output),
        summary=(
            f"A sparse Mixture-of-Experts ({summary.target_model_type}, {summary.family}, {summary.layout} layout) "
            f"composed from {distinct} dense checkpoint{'s' if distinct > 1 else ''} sharing the architecture of "
            f"{_link(summary.base)}: routed expert i of "
            f"every MoE layer is the FFN of source i; attention, norms and embeddings are {non_expert}. "
            f"Top-{summary.top_k} router with {ROUTER_DESCRIPTIONS[summary.router_init]}.{shared}\n\n{experts}"
        ),
        base_models=list(dict.fromkeys([summary.base, *summary.sources])),
        base_model_relation="merge",
        tags=["moe", "mixture-of-experts", "merge", "compose", summary.target_model_type],
        command=command,
        model_type=summary.target_model_type,
        num_experts=summary.num_experts,
        top_k=summary.top_k,
        moe_layers=len(summary.moe_layers),
        total_parameters=summary.total_parameters,
        active_parameters=summary.active_parameters,
        settings={key: value for key, value in summary.settings.items() if key != "experts"},
        limitations=(
            "Each expert keeps what its fine-tune learned only as far as the router sends it the right tokens; "
            "prompt- or data-initialised routers are a starting point, and a short training of the routers "
            "(or the whole model) usually helps.",
            "Attention and embeddings come from one model (or an average), which the experts' FFNs were not "
            "trained with; quality can fall below each fine-tune's on its own task.",
            "Biases, safety behaviour and knowledge are those of the source models.",
        ),
        has_tokenizer=has_tokenizer,
    )


def write_compose_card(
    directory: Path, summary: ComposeSummary, command: str | None = None, model_id: str | None = None
) -> Path:
    """Write README.md for the compose `summary` into `directory` and return its path."""
    directory = Path(directory)
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_MARKERS)
    return write_card(directory, compose_facts(summary, command, model_id, has_tokenizer))
