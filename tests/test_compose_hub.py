"""`upcycle compose` with Hub ids for the base and the experts (a fake Hub on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from fake_hub import FakeHub
from test_compose_support import perturbed, read_all, recipe_file

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-llama"


def test_hub_sources_are_pulled_and_named_in_the_card(tmp_path):
    fine_tune = perturbed(EXAMPLE, tmp_path / "ft", 1)
    recipe = {
        "base": "org/base",
        "router_init": "hidden",
        "experts": [
            {"source": "org/code-ft", "positive_prompts": ["def f(x):\n    return x"]},
            {"source": "org/base", "positive_prompts": ["Once upon a time"]},
        ],
    }
    path = recipe_file(tmp_path, recipe)
    with FakeHub() as hub:
        hub.add_model("org/base", EXAMPLE)
        hub.add_model("org/code-ft", fine_tune)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(
            HF_ENDPOINT=hub.endpoint,
            HF_HOME=str(tmp_path / "home"),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TRANSFORMERS_VERBOSITY="error",
        )
        result = subprocess.run(
            [sys.executable, "-m", "upcycle.cli", "compose", str(path), str(tmp_path / "moe"), "--quiet"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "moe" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/code-ft"]
    assert front["base_model_relation"] == "merge"
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["upcycle"]["sources"] == ["org/code-ft", "org/base"]
    assert config["upcycle"]["base"] == "org/base"
    moe, ft = read_all(tmp_path / "moe"), read_all(fine_tune)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(moe["model.layers.0.block_sparse_moe.experts.0.w1.weight"], ft[name])
    assert (tmp_path / "moe" / "tokenizer.json").is_file()
