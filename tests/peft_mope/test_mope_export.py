"""A block-routed MoPE adapter exports into a stock MoE checkpoint that computes the same logits."""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from mope_testlib import FFN, randomize_routers  # noqa: E402
from tiny_models import DENSE_CASES, make_dense  # noqa: E402

import mope  # noqa: E402
from upcycle.cli import main as upcycle_main  # noqa: E402

EXPORT_CASES = ["llama-tied", "mistral-sliding", "qwen2", "qwen3-head-dim", "granite", "olmo2"]


def _ids() -> torch.Tensor:
    return torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(5))


def _adapted(base_dir: Path, **options):
    options.setdefault("target_modules", FFN)
    options.setdefault("routing", "block")
    options.setdefault("num_experts", 4)
    options.setdefault("top_k", 2)
    options.setdefault("r", 2)
    options.setdefault("init_weights", False)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, mope.MoPEConfig(**options))
    randomize_routers(model)
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _stock_logits(directory: Path) -> torch.Tensor:
    return _logits(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval())


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.parent.iterdir() if ".tmp-" in path.name or ".old-" in path.name)


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_exported_moe_reloads_in_stock_transformers_with_the_adapted_logits(case, tmp_path):
    model_type, fields = DENSE_CASES[case]
    base_dir = make_dense(tmp_path / "base", model_type, **fields)
    model = _adapted(base_dir, shared_expert=True, share_a=case == "qwen2")
    summary = mope.export(model, tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == summary.target_model_type != model_type
    torch.testing.assert_close(_stock_logits(tmp_path / "moe"), _logits(model), rtol=0, atol=1e-5)
    assert config["upcycle"]["operation"] == "mope-export" and config["upcycle"]["num_experts"] == 4
    assert config["upcycle"]["adapted_projections"] == sorted(FFN)


def test_fused_layout_dense_router_attention_experts_and_unadapted_layers_export_exactly(tmp_path):
    base_dir = make_dense(tmp_path / "base", "llama")
    model = _adapted(
        base_dir,
        top_k=0,
        num_experts=3,
        target_modules=["gate_proj", "down_proj", "q_proj"],
        num_experts_pattern={r".*q_proj": 1},
        layers_to_transform=[1],
        layers_pattern="layers",
    )
    summary = mope.export(model, tmp_path / "moe", layout="fused")
    assert (summary.num_experts, summary.top_k, summary.layout) == (3, 3, "fused")
    assert summary.settings["merged_modules"] == ["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(_stock_logits(tmp_path / "moe"), _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"routing": "linear"}, r"only routing='block' adapters are MoE models"),
        ({"router": "switch", "top_k": 1}, r"the SwitchRouter of adapter 'default' is not a stock MoE router"),
        ({"num_experts_pattern": {r".*layers\.1\.mlp": 6}}, r"different \(num_experts, top_k\) \[\(4, 2\), \(6, 2\)\]"),
        ({"target_modules": [*FFN, "k_proj"]}, r"k_proj has a per-token-routed MoPE adapter outside the FFN"),
    ],
)
def test_a_non_exportable_adapter_is_refused_and_nothing_is_written(options, message, tmp_path):
    base_dir = make_dense(tmp_path / "base", "llama")
    with pytest.raises(mope.MoPEExportError, match=message):
        mope.export(_adapted(base_dir, **options), tmp_path / "moe")
    assert not (tmp_path / "moe").exists() and _leftovers(tmp_path / "moe") == []


def test_an_existing_output_is_kept_unless_forced(tmp_path):
    model = _adapted(make_dense(tmp_path / "base", "llama"))
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "keep.txt").write_text("mine")
    with pytest.raises(
        mope.MoPEExportError, match=r"already exists; choose another output or pass force to replace it"
    ):
        mope.export(model, tmp_path / "moe")
    assert (tmp_path / "moe" / "keep.txt").read_text() == "mine"
    mope.export(model, tmp_path / "moe", force=True)
    assert not (tmp_path / "moe" / "keep.txt").exists() and _leftovers(tmp_path / "moe") == []


def test_cli_converts_a_saved_adapter_with_tokenizer_files_card_and_provenance(tmp_path, capsys):
    base_dir = make_dense(tmp_path / "base", "llama")
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    model = _adapted(base_dir, shared_expert=True)
    model.save_pretrained(tmp_path / "adapter")
    expected = _logits(model)
    capsys.readouterr()

    code = upcycle_main(
        ["convert", str(base_dir), str(tmp_path / "moe"), "--from-mope", str(tmp_path / "adapter"), "--quiet"]
    )
    assert code == 0
    assert "Loading weights" not in capsys.readouterr().err  # --quiet silences transformers' bar too
    torch.testing.assert_close(_stock_logits(tmp_path / "moe"), expected, rtol=0, atol=1e-5)
    provenance = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycle"]
    assert provenance["source"] == str(base_dir) and provenance["adapter"] == str(tmp_path / "adapter")
    assert (tmp_path / "moe" / "tokenizer_config.json").is_file()
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "mope-export" not in card.split("---")[1] and "mope" in card and "block-routed MoPE adapter" in card


def test_cli_refuses_a_linear_routed_adapter_with_one_line_and_no_output(tmp_path, capsys):
    base_dir = make_dense(tmp_path / "base", "llama")
    _adapted(base_dir, routing="linear").save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    code = upcycle_main(["convert", str(base_dir), str(tmp_path / "moe"), "--from-mope", str(tmp_path / "adapter")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("upcycle: error: only routing='block' adapters are MoE models") and error.count("\n") == 1
    assert not (tmp_path / "moe").exists() and _leftovers(tmp_path / "moe") == []


def test_cli_refuses_an_adapter_that_is_not_mope(tmp_path, capsys):
    from peft import LoraConfig

    base_dir = make_dense(tmp_path / "base", "llama")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(base, LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    capsys.readouterr()
    code = upcycle_main(["convert", str(base_dir), str(tmp_path / "moe"), "--from-mope", str(tmp_path / "lora")])
    assert code == 2 and "holds a LORA adapter, not MoPE" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize(
    ("model_type", "fields", "message"),
    [
        ("gemma", {"head_dim": 8}, r"no exact stock MoE counterpart for model_type 'gemma'"),
        ("llama", {"attention_bias": True}, r"llama with attention_bias=True cannot become mixtral"),
    ],
)
def test_a_base_without_an_exact_stock_moe_twin_is_refused(model_type, fields, message, tmp_path):
    base_dir = make_dense(tmp_path / "base", model_type, **fields)
    with pytest.raises(mope.MoPEExportError, match=message):
        mope.export(_adapted(base_dir), tmp_path / "moe")
    assert not (tmp_path / "moe").exists() and _leftovers(tmp_path / "moe") == []


@pytest.mark.parametrize("share_a", [False, True])
def test_one_experts_delta_is_that_expert_of_all_deltas_bitwise(share_a):
    """The exporter computes each expert's weights alone (it computed all E for each one): the same bits."""
    from mope_testlib import mope_model

    model = mope_model(routing="block", num_experts=4, share_a=share_a, shared_expert=True)
    blocks = [module for module in model.modules() if hasattr(module, "expert_delta_weights")]
    assert blocks
    for block in blocks:
        for projection in block.adapted_projections("default"):
            every = block.expert_delta_weights("default", projection)
            for expert in range(4):
                assert torch.equal(block.expert_delta_weights("default", projection, expert), every[expert])
