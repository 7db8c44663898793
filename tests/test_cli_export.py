"""`upcycle export ADAPTER OUTPUT` writes the same checkpoint as its older spelling
`upcycle convert BASE OUTPUT --from-mope ADAPTER`, and takes the base from the adapter by default."""

from __future__ import annotations

import json

import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import make_dense
from transformers import AutoModelForCausalLM

import mope
from upcycle.cli import main


def _saved_adapter(tmp_path):
    base_dir = make_dense(tmp_path / "base", "llama")
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = mope.MoPEConfig(
        num_experts=4, top_k=2, r=2, routing="block", target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    config.init_weights = False
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    return base_dir, tmp_path / "adapter"


def test_export_equals_convert_from_mope_and_reads_the_base_from_the_adapter(tmp_path, capsys):
    base_dir, adapter = _saved_adapter(tmp_path)
    assert main(["export", str(adapter), str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["convert", str(base_dir), str(tmp_path / "b"), "--from-mope", str(adapter), "--quiet"]) == 0
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    provenance = json.loads((tmp_path / "a" / "config.json").read_text())["upcycle"]
    assert provenance["operation"] == "mope-export" and provenance["source"] == str(base_dir)


def test_export_refuses_upcycling_options_on_the_old_spelling(tmp_path, capsys):
    base_dir, adapter = _saved_adapter(tmp_path)
    capsys.readouterr()
    code = main(["convert", str(base_dir), str(tmp_path / "b"), "--from-mope", str(adapter), "--method", "drop"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upcycle: error: --method cannot be combined with --from-mope") and "\n" not in err
    assert not (tmp_path / "b").exists()
