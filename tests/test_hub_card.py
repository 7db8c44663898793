"""Model cards: valid Hub metadata, the facts of the run, and a usage snippet that runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from upcycle import convert
from upcycle.card import CardFacts, render_card

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-llama"


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_usage_snippet_of_a_local_conversion_loads_and_generates(tmp_path):
    out = tmp_path / "tiny-moe"
    summary = convert(EXAMPLE, out, experts=2, top_k=1, quiet=True)
    card = (out / "README.md").read_text()
    snippet = re.search(r"## Usage\n\n```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    assert f'from_pretrained("{out}")' in snippet

    torch.manual_seed(0)
    namespace: dict = {}
    exec(snippet.replace("max_new_tokens=20", "max_new_tokens=2"), namespace)  # noqa: S102 - our own card
    assert sum(p.numel() for p in namespace["model"].parameters()) == summary.total_parameters
    assert "## Limitations" in card and "needs continued pre-training or fine-tuning" in card


def test_card_names_hub_sources_and_datasets_but_never_local_paths(tmp_path):
    facts = CardFacts(
        title="merged",
        operation="merge",
        model_id="me/merged",
        base_models=["org/moe", str(tmp_path)],
        base_model_relation="merge",
        tags=["merge"],
        datasets=["org/calibration-text"],
        command="upcycle merge org/moe merged",
        total_parameters=1_500_000,
        active_parameters=1_500_000,
    )
    card = render_card(facts)
    front = front_matter(card)
    assert front["base_model"] == "org/moe" and front["base_model_relation"] == "merge"
    assert front["datasets"] == ["org/calibration-text"]
    assert front["tags"] == ["upcycle", "merge"]
    assert "upcycle merge org/moe merged" in card and "1.50M (1,500,000)" in card
    assert 'from_pretrained("me/merged")' in card


def test_card_without_hub_base_has_no_relation_and_refuses_unknown_relations(tmp_path):
    front = front_matter(render_card(CardFacts(title="x", operation="upcycle", model_id="x", base_models=["/a/b"])))
    assert "base_model" not in front and "base_model_relation" not in front
    with pytest.raises(ValueError, match="base_model_relation must be one of"):
        render_card(CardFacts(title="x", operation="upcycle", model_id="x", base_model_relation="upcycled"))
