"""The model card (README.md with Hub YAML front matter) of a merged checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

METHOD_DESCRIPTIONS = {
    "average": "uniform mean of the experts",
    "frequency": "mean weighted by how often the router picked each expert on calibration data (M-SMoE)",
    "router-weight": "mean weighted by each expert's mean routing probability on calibration data",
    "task-arithmetic": "base FFN plus the weighted mean of the experts' task vectors (expert minus base)",
    "ties": "TIES-Merging of the experts' task vectors (trim, elect sign, disjoint mean) added to the base FFN",
    "dare": "DARE: task vectors randomly dropped and rescaled, then averaged and added to the base FFN",
    "concat": "exact fold of a fixed-weight mixture of all experts into one wider FFN",
    "select": "the single most used expert",
}


def merge_card(summary: Any, command: str | None = None, model_id: str | None = None) -> str:
    """Return the model card text for a merge described by a `MergeSummary`."""
    front = {
        "base_model": summary.source,
        "base_model_relation": "merge",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["upcycle", "merge", f"merge-{summary.method}", summary.target_model_type],
    }
    if summary.calibration:
        front["datasets"] = [summary.calibration["data"]]
    what = (
        f"a {summary.target_model_type} MoE with {summary.experts_out} experts per layer (top-{summary.top_k_out}), "
        "each a merge of a cluster of similar experts"
        if summary.experts_out
        else f"a dense {summary.target_model_type} model"
    )
    data = (
        f"{summary.calibration['samples']} samples of `{summary.calibration['data']}` "
        f"({summary.calibration['tokens']} tokens per MoE layer)"
        if summary.calibration
        else "none"
    )
    settings = "\n".join(f"| {key} | {value} |" for key, value in sorted(summary.settings.items()))
    how = f"\n```\n{command}\n```\n" if command else ""
    name = Path(str(summary.output)).name
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {name}

{what[0].upper() + what[1:]}, merged from the sparse Mixture-of-Experts
[{summary.source}]({summary.source}) ({summary.source_model_type}, {summary.num_experts} experts per layer)
with [upcycle](https://pypi.org/project/upcycle/) ({summary.family}, run in reverse).
{how}
| | |
|---|---|
| method | `{summary.method}`: {METHOD_DESCRIPTIONS[summary.method]} |
| calibration data | {data} |
| base FFN for task vectors | {summary.base or "not used"} |
| MoE layers merged | {len(summary.moe_layers)} |
| FFN width | {summary.intermediate_size} |
| parameters | {summary.total_parameters} |

## Settings

| setting | value |
|---|---|
{settings}

The per-layer expert weights{" and groups" if summary.groups else ""} are recorded under `upcycle` in config.json.

## Usage

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{model_id or summary.output}")
```

## Limitations

Apart from `concat` (exact for a fixed-weight mixture), a merge approximates the MoE it came from:
token-dependent routing is replaced by fixed weights. Evaluate it, and fine-tune briefly if needed.
"""


def write_merge_card(directory: Path, summary: Any, command: str | None = None, model_id: str | None = None) -> Path:
    """Write README.md for `summary` into `directory` and return its path; the usage snippet loads
    `model_id` (the Hub repo it will be pushed to), else the output path."""
    path = Path(directory) / "README.md"
    path.write_text(merge_card(summary, command, model_id))
    return path
