"""Model cards (README.md with Hub YAML front matter) for the checkpoints upcycle writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def upcycle_card(summary: Any, command: str | None = None) -> str:
    """Return the model card text for a dense -> MoE conversion described by a `ConvertSummary`."""
    front = {
        "base_model": summary.source,
        # The Hub's relations are adapter/merge/quantized/finetune; an upcycled model is a derived
        # model of the same weights to be trained further, which the Hub files under finetune.
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "upcycled", "upcycle", summary.target_model_type],
    }
    settings = "\n".join(f"| {key} | {value} |" for key, value in sorted(summary.settings.items()))
    how = f"\n```\n{command}\n```\n" if command else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {Path(str(summary.output)).name}

A sparse Mixture-of-Experts ({summary.target_model_type}) upcycled from the dense
[{summary.source}]({summary.source}) ({summary.source_model_type}) with
[upcycle](https://pypi.org/project/upcycle/) ({summary.family}).
{how}
| | |
|---|---|
| experts per MoE layer | {summary.num_experts} |
| experts per token (top-k) | {summary.top_k} |
| MoE layers | {len(summary.moe_layers)} |
| total parameters | {_human(summary.total_parameters)} ({summary.total_parameters}) |
| active parameters per token | {_human(summary.active_parameters)} ({summary.active_parameters}) |

## Settings

| setting | value |
|---|---|
{settings}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{Path(str(summary.output)).name}")
```

## Limitations

Every expert starts as a copy of the dense FFN, so this model computes exactly what its source
computes until it is trained; it needs continued training before the extra experts help.
"""


def write_model_card(directory: Path, summary: Any, command: str | None = None) -> Path:
    """Write README.md for `summary` into `directory` and return its path."""
    path = Path(directory) / "README.md"
    path.write_text(upcycle_card(summary, command))
    return path
