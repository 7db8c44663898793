"""Model cards (README.md with Hub YAML front matter) for everything upcycle writes.

One builder, `render_card(CardFacts)`, serves converts, merges, MoPE exports and adapters and
recipe outputs: each caller fills a `CardFacts` with what it knows. `upcycle_card` /
`write_model_card` build the facts of a dense -> MoE conversion from its `ConvertSummary`.

Front matter follows the Hub's model-card metadata. `base_model_relation` takes one of the four
values the Hub defines (adapter, merge, quantized, finetune); per operation:
- upcycle (dense -> MoE) and MoPE export: "finetune". The output is a new set of weights derived
  from one base model and meant to be trained further; it is not an adapter (it loads alone),
  not a merge of several models, and not a quantization.
- merge (MoE -> dense, or fewer experts): "merge", weights of several experts combined.
- MoPE adapter folder: "adapter" (a PEFT adapter on top of the base).
`base_model` is written only for Hub ids: a local path would not resolve on the Hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
UPCYCLE_URL = "https://pypi.org/project/upcycle/"
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

METHOD_DESCRIPTIONS = {
    "copy": "copying its FFN into each expert",
    "drop": "copying its FFN into each expert and re-initialising part of each expert's neurons (Drop-Upcycling)",
    "granular": "splitting its FFN into fine-grained expert shards (granular upcycling)",
    "partition": "partitioning its FFN's neurons among the experts",
}
EXACT_LIMITATION = (
    "It computes what its source computes (up to float rounding) until it is trained: it needs continued "
    "pre-training or fine-tuning before the extra experts make it better than its source."
)
INEXACT_LIMITATION = (
    "Its experts were perturbed or split at construction, so it does not compute what its source computes: "
    "it must be trained (continued pre-training) before use."
)
UPCYCLE_LIMITATIONS = (
    "It costs more memory than its source (all experts are stored) for the same quality until trained.",
    "Biases, safety behaviour and knowledge are those of the source model.",
)


@dataclass
class CardFacts:
    """What a model card says about one output folder; every field optional but the first three.

    `operation` names what was done ("upcycle", "merge", "mope-export", "mope-adapter",
    "finetune"); `model_id` is what the usage snippet loads (a Hub repo id, or the local folder).
    """

    title: str
    operation: str
    model_id: str
    summary: str = ""
    base_models: list[str] = field(default_factory=list)
    base_model_relation: str = "finetune"
    library_name: str = "transformers"
    pipeline_tag: str = "text-generation"
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    command: str | None = None
    model_type: str | None = None
    num_experts: int | None = None
    top_k: int | None = None
    moe_layers: int | None = None
    total_parameters: int | None = None
    active_parameters: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    limitations: tuple[str, ...] = ()
    usage: str | None = None
    has_tokenizer: bool = False


def is_hub_id(name: str) -> bool:
    """Return True if `name` is a Hub repo id (not an existing local path)."""
    from upcycle.checkpoint import looks_like_hub_id

    return looks_like_hub_id(name) and not os.path.exists(name) and not name.startswith((".", "~", "/"))


def human_count(count: int) -> str:
    """Return a parameter count as "1.23B" / "4.56M" / "7.89K" / "12"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def front_matter(facts: CardFacts) -> dict[str, Any]:
    """Return the card's YAML metadata as a dict (only keys that have a value).

    Raises:
        ValueError: `base_model_relation` is not one the Hub defines.
    """
    if facts.base_model_relation not in BASE_MODEL_RELATIONS:
        raise ValueError(f"base_model_relation must be one of {BASE_MODEL_RELATIONS}, got {facts.base_model_relation}")
    hub_bases = [name for name in facts.base_models if is_hub_id(name)]
    front: dict[str, Any] = {}
    if hub_bases:
        front["base_model"] = hub_bases[0] if len(hub_bases) == 1 else hub_bases
        front["base_model_relation"] = facts.base_model_relation
    front["library_name"] = facts.library_name
    front["pipeline_tag"] = facts.pipeline_tag
    front["tags"] = list(dict.fromkeys(["upcycle", *facts.tags]))
    if facts.datasets:
        front["datasets"] = list(facts.datasets)
    return front


def default_usage(facts: CardFacts) -> str:
    """Return a transformers snippet that loads `facts.model_id` (and generates, if it has a tokenizer)."""
    lines = [
        "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if facts.has_tokenizer else ""),
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{facts.model_id}")',
    ]
    if facts.has_tokenizer:
        lines += [
            f'tokenizer = AutoTokenizer.from_pretrained("{facts.model_id}")',
            'inputs = tokenizer("The capital of France is", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        ]
    return "\n".join(lines)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def render_card(facts: CardFacts) -> str:
    """Return the full README.md text (YAML front matter and body) for `facts`.

    Raises:
        ValueError: `base_model_relation` is not one the Hub defines.
    """
    front = yaml.safe_dump(front_matter(facts), sort_keys=False).strip()
    parts = [f"---\n{front}\n---\n", f"# {facts.title}\n"]
    if facts.summary:
        parts.append(facts.summary.strip() + "\n")
    if facts.command:
        parts.append(f"Made with [upcycle]({UPCYCLE_URL}):\n\n```bash\n{facts.command}\n```\n")
    rows: list[tuple[str, Any]] = []
    if facts.model_type:
        rows.append(("architecture (model_type)", facts.model_type))
    if facts.num_experts is not None:
        rows.append(("experts per MoE layer", facts.num_experts))
    if facts.top_k is not None:
        rows.append(("experts per token (top-k)", facts.top_k))
    if facts.moe_layers is not None:
        rows.append(("MoE layers", facts.moe_layers))
    if facts.total_parameters is not None:
        rows.append(("total parameters", f"{human_count(facts.total_parameters)} ({facts.total_parameters:,})"))
    if facts.active_parameters is not None:
        rows.append(
            ("active parameters per token", f"{human_count(facts.active_parameters)} ({facts.active_parameters:,})")
        )
    if rows:
        parts.append(_table(rows) + "\n")
    if facts.settings:
        settings = "\n".join(f"| {key} | {value} |" for key, value in sorted(facts.settings.items()))
        parts.append(f"## Settings\n\n| setting | value |\n|---|---|\n{settings}\n")
    parts.append(f"## Usage\n\n```python\n{facts.usage or default_usage(facts)}\n```\n")
    if facts.limitations:
        parts.append("## Limitations\n\n" + "\n".join(f"- {line}" for line in facts.limitations) + "\n")
    return "\n".join(parts)


def write_card(directory: str | Path, facts: CardFacts) -> Path:
    """Write README.md for `facts` into `directory` and return its path."""
    path = Path(directory) / "README.md"
    path.write_text(render_card(facts))
    return path


def convert_facts(
    summary: Any, command: str | None = None, model_id: str | None = None, has_tokenizer: bool = False
) -> CardFacts:
    """Return the card facts of a dense -> MoE conversion described by a `ConvertSummary`."""
    source = summary.source
    calibration = str(summary.settings.get("calibration") or "")
    source_link = f"[{source}](https://huggingface.co/{source})" if is_hub_id(source) else f"`{source}`"
    method = str(summary.settings.get("method", "copy"))
    construction = METHOD_DESCRIPTIONS.get(method, f"the {method!r} expert construction")
    router_init = str(summary.settings.get("router_init", "random"))
    exact = bool(summary.settings.get("exact_at_init", method == "copy"))
    router = f"{router_init}-initialised top-{summary.top_k} router"
    if "expert_groups" in summary.settings:
        settings = summary.settings
        router = (
            f"{router_init}-initialised sigmoid top-{summary.top_k} router over the best {settings['top_groups']} "
            f"of {settings['expert_groups']} expert groups, with routed scaling {settings['routed_scaling']:g} "
            "(cancelled in the routed experts' down_proj) and a zero selection bias (e_score_correction_bias)"
        )
    return CardFacts(
        title=Path(str(summary.output)).name,
        operation="upcycle",
        model_id=model_id or str(summary.output),
        summary=(
            f"A sparse Mixture-of-Experts ({summary.target_model_type}) upcycled from the dense {source_link} "
            f"({summary.source_model_type}) by {construction} ({summary.num_experts} experts) and adding a "
            f"{router} ({summary.family}, {summary.layout} layout)."
        ),
        base_models=[source],
        base_model_relation="finetune",
        tags=["moe", "upcycled", "mixture-of-experts", summary.target_model_type],
        # Calibration data from a Hub dataset is named; a local file would not resolve on the Hub.
        datasets=[calibration] if calibration and is_hub_id(calibration) else [],
        command=command,
        model_type=summary.target_model_type,
        num_experts=summary.num_experts,
        top_k=summary.top_k,
        moe_layers=len(summary.moe_layers),
        total_parameters=summary.total_parameters,
        active_parameters=summary.active_parameters,
        settings=dict(summary.settings),
        limitations=((EXACT_LIMITATION if exact else INEXACT_LIMITATION), *UPCYCLE_LIMITATIONS),
        has_tokenizer=has_tokenizer,
    )


def upcycle_card(summary: Any, command: str | None = None, model_id: str | None = None) -> str:
    """Return the model card text for a dense -> MoE conversion described by a `ConvertSummary`."""
    return render_card(convert_facts(summary, command, model_id))


def write_model_card(directory: Path, summary: Any, command: str | None = None, model_id: str | None = None) -> Path:
    """Write README.md for the conversion `summary` into `directory` and return its path.

    The usage snippet loads `model_id` (the Hub repo when pushing), else the output path.
    """
    directory = Path(directory)
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_MARKERS)
    return write_card(directory, convert_facts(summary, command, model_id, has_tokenizer))
