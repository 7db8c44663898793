"""The README's first command on the shipped example checkpoint."""

import json
import subprocess
from pathlib import Path

import torch
import yaml
from tiny_models import logits

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-llama"


def test_readme_command_converts_the_shipped_example(tmp_path):
    out = tmp_path / "tiny-moe"
    result = subprocess.run(
        ["upcycle", "convert", str(EXAMPLE), str(out), "--experts", "8", "--top-k", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "llama->mixtral, 8 experts, top-2" in result.stdout
    assert "writing tensors" in result.stderr  # the progress bar
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (EXAMPLE / name).read_bytes()
    input_ids = torch.randint(3, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    assert (logits(out, input_ids) - logits(EXAMPLE, input_ids)).abs().max() <= 1e-5


def test_model_card_front_matter_omits_a_local_source_the_hub_would_reject(tmp_path):
    from upcycle import convert

    summary = convert(EXAMPLE, tmp_path / "moe", experts=4, top_k=1, quiet=True, command="upcycle convert x y")
    card = (tmp_path / "moe" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front  # the Hub accepts only repo ids there; the path is in the body
    assert str(EXAMPLE) in card
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation"
    assert {"moe", "upcycled", "mixtral"} <= set(front["tags"])
    assert "base_model_relation" not in front  # only meaningful next to base_model
    assert f"{summary.active_parameters:,}" in card and "upcycle convert x y" in card
    provenance = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycle"]
    assert provenance["source"] == str(EXAMPLE) and provenance["num_experts"] == 4


def test_quiet_prints_nothing(tmp_path):
    result = subprocess.run(
        [
            "upcycle",
            "convert",
            str(EXAMPLE),
            str(tmp_path / "q"),
            "--experts",
            "2",
            "--top-k",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout == "" and "writing tensors" not in result.stderr
