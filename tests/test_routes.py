"""`upcycle routes`: routing statistics of a tiny Mixtral and a generic model, checked against an
independent token-by-token computation from hooks on the routers."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, MixtralConfig

import upcycle
from upcycle.calibration import calibration_batches, load_calibration_texts
from upcycle.cli import main
from upcycle.errors import UpcycleError
from upcycle.moe import moe_modules
from upcycle.routes import analyze_routing

TINY_LLAMA = Path(__file__).parent.parent / "examples" / "tiny-llama"
EXPERTS, TOP_K, MAX_LENGTH, BUCKETS, CAPACITY = 4, 2, 24, 4, 0.75


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("routes") / "tiny-mixtral"
    config = MixtralConfig(
        vocab_size=2048,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY_LLAMA / name, path / name)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    # Paragraphs of the standard library's own source: text every Python install has.
    source = Path(json.__file__).read_text().split("\n\n")
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(paragraph for paragraph in source[:12] if paragraph.strip()))
    return path


def independent_statistics(model, path: Path, text_file: Path) -> list[dict]:
    """Per layer, from hooks on each Mixtral router, with plain Python loops over tokens."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = load_calibration_texts(text_file)
    captured: dict[int, torch.Tensor] = {}
    gates = [layer.mlp.gate for layer in model.model.layers]
    handles = [
        gate.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, torch.as_tensor(a[0]).detach()))
        for i, gate in enumerate(gates)
    ]
    stats = [
        {"counts": [0] * EXPERTS, "entropy": 0.0, "tokens": 0, "pairs": [0] * BUCKETS, "dropped": [0] * BUCKETS,
         "ids": defaultdict(Counter)}
        for _ in gates
    ]  # fmt: skip
    with torch.no_grad():
        for batch in calibration_batches(tokenizer, texts, max_length=MAX_LENGTH, batch_size=3):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            batch_size, seq_len = batch["input_ids"].shape
            for layer, gate in enumerate(gates):
                logits = (captured[layer].reshape(-1, 32) @ gate.weight.T).view(batch_size, seq_len, EXPERTS)
                s = stats[layer]
                for b in range(batch_size):
                    real = [p for p in range(seq_len) if batch["attention_mask"][b, p]]
                    capacity = math.ceil(CAPACITY * len(real) * TOP_K / EXPERTS)
                    fill = [0] * EXPERTS
                    choices = {}
                    for p in real:
                        probs = torch.softmax(logits[b, p].double(), -1)
                        choices[p] = probs.topk(TOP_K).indices.tolist()
                        s["tokens"] += 1
                        s["entropy"] += float(-(probs * probs.log()).sum())
                        s["ids"][int(batch["input_ids"][b, p])][choices[p][0]] += 1
                        for expert in choices[p]:
                            s["counts"][expert] += 1
                    for rank in range(TOP_K):  # first choices of every token before second choices
                        for p in real:
                            expert = choices[p][rank]
                            bucket = p * BUCKETS // MAX_LENGTH
                            s["pairs"][bucket] += 1
                            if fill[expert] < capacity:
                                fill[expert] += 1
                            else:
                                s["dropped"][bucket] += 1
    for handle in handles:
        handle.remove()
    return stats


def test_routes_numbers_match_an_independent_token_by_token_computation(mixtral, text_file, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["routes", str(mixtral), str(out), "--calibration", str(text_file), "--json", "--batch-size", "3"]
    args += ["--max-length", str(MAX_LENGTH), "--position-buckets", str(BUCKETS), "--capacity-factor", str(CAPACITY)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "routes.json").read_text())
    assert (out / "expert_load.png").read_bytes()[:4] == b"\x89PNG" and (out / "drop_by_position.png").is_file()
    assert report["kind"] == "stock" and len(report["layers"]) == 2

    expected = independent_statistics(AutoModelForCausalLM.from_pretrained(mixtral).eval(), mixtral, text_file)
    for layer, s in zip(report["layers"], expected, strict=True):
        counts = torch.tensor(s["counts"], dtype=torch.float64)
        assert layer["tokens"] == s["tokens"] and layer["expert_counts"] == s["counts"]
        assert layer["load_cv"] == pytest.approx(float(counts.std(unbiased=False) / counts.mean()))
        assert layer["router_entropy"] == pytest.approx(s["entropy"] / s["tokens"], rel=1e-5)
        assert layer["normalized_entropy"] == pytest.approx(s["entropy"] / s["tokens"] / math.log(EXPERTS), rel=1e-5)
        assert layer["dropped_fraction"] == pytest.approx(sum(s["dropped"]) / sum(s["pairs"]))
        assert layer["drop_rate_by_position"] == pytest.approx(
            [d / p for d, p in zip(s["dropped"], s["pairs"], strict=True)]
        )
        repeated = [c for c in s["ids"].values() if sum(c.values()) >= 2]
        consistency = sum(max(c.values()) for c in repeated) / sum(sum(c.values()) for c in repeated)
        assert layer["token_consistency"] == pytest.approx(consistency)
    assert any(layer["dropped_fraction"] > 0 for layer in report["layers"]), "capacity 0.75 must drop something"


def test_routes_reads_generic_models_from_their_moe_blocks(text_file, tmp_path):
    generic = tmp_path / "generic-llama"
    upcycle.convert(TINY_LLAMA, generic, experts=4, top_k=1, target="generic", quiet=True)
    model = upcycle.load(generic)
    tokenizer = AutoTokenizer.from_pretrained(generic)
    texts = load_calibration_texts(text_file, samples=4)
    report = analyze_routing(model, calibration_batches(tokenizer, texts, max_length=16), max_length=16)
    assert report.kind == "generic"
    assert [layer.name for layer in report.layers] == [name for name, _ in moe_modules(model)]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in calibration_batches(tokenizer, texts, max_length=16))
    for layer in report.layers:
        assert layer.tokens == real_tokens and sum(layer.expert_counts) == real_tokens
        assert sum(layer.expert_load) == pytest.approx(1.0)


def test_routes_refuses_a_dense_model_and_an_existing_output(text_file, tmp_path, capsys):
    assert main(["routes", str(TINY_LLAMA), "--data", str(text_file), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "returns no router logits" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    (tmp_path / "exists").mkdir()
    assert main(["routes", str(TINY_LLAMA), "--data", str(text_file), "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(UpcycleError, match="capacity_factor must be positive"):
        analyze_routing(torch.nn.Linear(2, 2), [], capacity_factor=0)


def test_routes_reads_the_experts_a_biased_group_limited_router_picks(text_file, tmp_path, capsys):
    """glm4_moe (DeepSeek-V3 style): the counts are the experts its router chose, selection bias and
    group limit included, not a softmax top-k of its logits."""
    config = AutoConfig.for_model(
        "glm4_moe", vocab_size=2048, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
        routed_scaling_factor=2.5, initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # a bias that changes what softmax top-k would pick
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.6, 0.6, 8))
    path = tmp_path / "glm4"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY_LLAMA / name, path / name)
    args = ["routes", str(path), str(tmp_path / "report"), "--calibration", str(text_file), "--json"]
    assert main([*args, "--batch-size", "3", "--max-length", str(MAX_LENGTH)]) == 0
    report = json.loads(capsys.readouterr().out)

    tokenizer = AutoTokenizer.from_pretrained(path)
    counts = [torch.zeros(8, dtype=torch.long) for _ in range(2)]
    picked: dict[int, torch.Tensor] = {}
    gates = [layer.mlp.gate for layer in model.model.layers]
    handles = [
        g.register_forward_hook(lambda m, a, out, i=i: picked.__setitem__(i, out[2])) for i, g in enumerate(gates)
    ]
    texts = load_calibration_texts(text_file)
    with torch.no_grad():
        for batch in calibration_batches(tokenizer, texts, max_length=MAX_LENGTH, batch_size=3):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            real = batch["attention_mask"].reshape(-1).bool()
            for layer in range(2):
                counts[layer] += torch.bincount(picked[layer][real].reshape(-1), minlength=8)
    for handle in handles:
        handle.remove()
    assert [layer["expert_counts"] for layer in report["layers"]] == [c.tolist() for c in counts]
