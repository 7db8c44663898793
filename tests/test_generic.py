"""The generic format: any architecture upcycled with upcycle's MoE block, saved, and loaded back both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

import upcycle
from upcycle.cli import main
from upcycle.commands.convert import parse_router_options
from upcycle.errors import UpcycleError
from upcycle.moe import MoE, moe_modules

VOCAB = 128
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)

# name -> (model_type, config fields, Auto class of the source)
CASES = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64), AutoModelForCausalLM),
    "phi": ("phi", SMALL, AutoModelForCausalLM),
    "phi3-fused-gate-up": ("phi3", dict(SMALL, pad_token_id=0), AutoModelForCausalLM),
    "gemma": ("gemma", dict(SMALL, num_key_value_heads=2, head_dim=8), AutoModelForCausalLM),
    "bert-encoder": ("bert", SMALL, AutoModelForMaskedLM),
    # transformers renames GPT-NeoX's lm_head to embed_out on save for the stock class only.
    "gpt-neox-renamed-head": ("gpt_neox", dict(SMALL, rotary_pct=1.0), AutoModelForCausalLM),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generic-sources")
    paths = {}
    for name, (model_type, fields, auto_class) in CASES.items():
        torch.manual_seed(0)
        model = auto_class.from_config(AutoConfig.for_model(model_type, initializer_range=0.2, **fields))
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def token_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result = model.eval()(token_ids())
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


@pytest.mark.parametrize("name", sorted(CASES))
def test_generic_upcycle_reproduces_the_source_after_save_with_both_loaders(name, sources, tmp_path):
    _, _, auto_class = CASES[name]
    output = tmp_path / f"moe-{name}"
    summary = upcycle.convert(sources[name], output, experts=4, top_k=2, target="generic", quiet=True)
    assert summary.family == "generic" and summary.num_experts == 4
    config = json.loads((output / "config.json").read_text())
    assert config["upcycle"]["format"] == "generic" and config["upcycle"]["num_moe_layers"] == 2
    assert config["auto_map"][auto_class.__name__].startswith("modeling_upcycle.Upcycled")
    assert (output / "modeling_upcycle.py").is_file()
    assert f'upcycle.load("{output}")' in (output / "README.md").read_text()

    source = outputs(auto_class.from_pretrained(sources[name]))
    ours = upcycle.load(output)
    remote = auto_class.from_pretrained(output, trust_remote_code=True)
    for model in (ours, remote):
        blocks = moe_modules(model)
        assert len(blocks) == 2 and all(block.num_experts == 4 for _, block in blocks)
        torch.testing.assert_close(outputs(model), source, atol=1e-5, rtol=0)


def test_generic_bert_loads_as_a_base_model_with_automodel(sources, tmp_path):
    output = tmp_path / "moe-bert-base"
    upcycle.convert(sources["bert-encoder"], output, experts=3, top_k=2, target="generic", quiet=True)
    source = outputs(AutoModel.from_pretrained(sources["bert-encoder"]))
    base = AutoModel.from_pretrained(output, trust_remote_code=True)
    assert type(base).__name__ == "UpcycledBertModel" and len(moe_modules(base)) == 2
    torch.testing.assert_close(outputs(base), source, atol=1e-5, rtol=0)


def test_auto_target_falls_back_to_generic_with_a_notice(sources, tmp_path, capsys):
    summary = upcycle.convert(sources["gpt2"], tmp_path / "moe-auto-gpt2", experts=2, top_k=1)
    assert summary.family == "generic"
    assert "no exact stock MoE counterpart for model_type 'gpt2'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "router,options",
    [("topk", ["softmax_order=after"]), ("dselect_k", ["gamma=2.0"]), ("hash", ["num_bits=8"])],
)
def test_cli_router_and_options_round_trip_and_stay_exact(router, options, sources, tmp_path):
    output = tmp_path / f"moe-cli-{router}"
    args = ["convert", str(sources["gpt2"]), str(output), "--target", "generic", "--experts", "4", "--quiet"]
    args += ["--router", router] + [f"--router-option={option}" for option in options]
    assert main(args) == 0
    section = json.loads((output / "config.json").read_text())["upcycle"]
    expected = parse_router_options(options)
    assert section["router"] == router and section["router_options"] == expected
    model = upcycle.load(output)
    block = moe_modules(model)[0][1]
    assert {key: getattr(block.router, key) for key in expected} == expected
    # These routers' weights sum to 1 per token, so identical experts still reproduce the source.
    source = outputs(AutoModelForCausalLM.from_pretrained(sources["gpt2"]))
    torch.testing.assert_close(outputs(model), source, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs(AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)), source)


def test_ffn_pattern_chooses_which_ffns_become_moe(sources, tmp_path):
    output = tmp_path / "moe-gpt2-first-layer"
    upcycle.convert(sources["gpt2"], output, experts=2, top_k=2, ffn_pattern=r"\.h\.0\.mlp$", quiet=True)
    model = upcycle.load(output)
    assert [name for name, _ in moe_modules(model)] == ["transformer.h.0.mlp"]
    assert not isinstance(model.transformer.h[1].mlp, MoE)
    source = outputs(AutoModelForCausalLM.from_pretrained(sources["gpt2"]))
    torch.testing.assert_close(outputs(model), source, atol=1e-5, rtol=0)


def test_ffn_pattern_matching_nothing_is_an_error_and_leaves_no_output(sources, tmp_path, capsys):
    output = tmp_path / "moe-nothing"
    code = main(["convert", str(sources["phi"]), str(output), "--target", "generic", "--ffn-pattern", "nope$"])
    assert code == 2
    err = capsys.readouterr().err
    assert "matches the FFN pattern 'nope$'" in err and "model.layers.0.mlp" in err
    assert not output.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(target="mixtral", router="cosine"), "router need the generic format"),
        (dict(target="generic", layout="fused"), "layout apply to stock MoE targets only"),
        (dict(target="generic", router="nope"), "unknown router kind 'nope'"),
    ],
)
def test_conflicting_generic_options_are_rejected(options, message, sources, tmp_path):
    with pytest.raises(UpcycleError, match=message):
        upcycle.convert(sources["gemma"], tmp_path / "out", experts=2, top_k=1, quiet=True, **options)
    assert not (tmp_path / "out").exists()
