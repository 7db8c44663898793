"""The upcycling study (scripts/experiments/upcycling_study.py): its data split, FLOPs accounting,
report, and a `--quick` run end to end through the recipe and the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "experiments"))

from study_data import SPLITS, split_of, stdlib_sources  # noqa: E402
from study_flops import count_parameters  # noqa: E402
from study_report import DISCUSSION_MARKER, findings, interpolate, write_report  # noqa: E402

TINY = dict(
    vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip


def test_stdlib_split_is_by_file_deterministic_and_excludes_tests_and_site_packages():
    files = stdlib_sources()
    assert len(files) > 300
    assert not any({"site-packages", "test", "tests"} & set(path.parts) for path in files)
    splits = {path: split_of(path) for path in files}
    assert {path: split_of(Path(path.as_posix())) for path in files} == splits  # same answer every time
    counts = {split: sum(value == split for value in splits.values()) for split in SPLITS}
    assert all(count > 0 for count in counts.values())
    assert 0.05 < counts["heldout"] / len(files) < 0.15


def test_moe_active_parameters_count_top_k_of_the_expert_stack_and_the_tied_head():
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
        moe = AutoModelForCausalLM.from_config(MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2))
    dense_count, moe_count = count_parameters(dense, 1), count_parameters(moe, 2)
    ffn = 3 * 16 * 32 * 2  # gate, up, down in two layers
    router = 8 * 16 * 2
    assert dense_count.active == sum(p.numel() for p in dense.parameters())  # tied head counted once, embedding not
    assert moe_count.active == dense_count.active + ffn + router  # two copies of the FFN active, plus the router
    assert moe_count.total == dense_count.total + 7 * ffn + router
    assert moe_count.training_flops(10) == 6 * moe_count.active * 10


def test_frozen_weights_cost_four_flops_and_trained_ones_six():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("mlp" in name)
    count = count_parameters(model, 1)
    assert count.trainable_active == 3 * 16 * 32 * 2
    assert count.training_flops_per_token() == 4 * count.active + 2 * count.trainable_active


def test_interpolation_is_linear_inside_and_refuses_outside():
    assert interpolate([0, 10, 20], [4.0, 3.0, 2.0], 15) == pytest.approx(2.5)
    assert interpolate([0, 10], [4.0, 3.0], 11) is None


def _results(tmp_path: Path) -> dict:
    curve = {"tokens": [0, 100], "flops": [0.0, 600.0], "losses": [4.0, 3.5], "eval_tokens": 10}
    run = {"curve": curve, "tokens": 100, "flops": 600.0, "final_loss": 3.5, "init_loss": 4.0, "wall_seconds": 1.0}
    return {
        "settings": {
            "seeds": [1], "layers": 1, "hidden_size": 8, "intermediate_size": 16, "heads": 1, "vocab_size": 50,
            "continue_steps": 1, "batch_size": 1, "seq_len": 100, "continue_lr": 1e-3, "pretrain_lr": 3e-3,
            "warmup_steps": 0, "eval_every": 1, "eval_batches": 1, "experts": 8, "top_k": 2, "aux_loss_coef": 0.01,
            "drop_ratio": 0.5, "granularity": 2, "mope": {}, "selection_documents": 1,
        },
        "runs": {"dense": {1: run}},
        "parameters": {"dense": {"total": 10, "active": 1, "trainable_active": 1}},
        "flops_per_token": {"dense": 6.0},
        "dense_pretrained_loss": 4.0,
        "pretrain": {"tokens": 1000},
        "corpus": {"documents": {}, "characters": {}},
        "commands": ["python recipes/finetune.py x"],
        "study_command": "python scripts/experiments/upcycling_study.py",
        "wall_seconds": 1.0,
        "machine": "x86_64, CPython 3.11.7, 2 CPUs",
        "load_average": [1.0, 1.0, 1.0],
    }  # fmt: skip


def test_rewriting_the_report_keeps_the_hand_written_discussion(tmp_path):
    report = write_report(_results(tmp_path), tmp_path)
    report.write_text(report.read_text() + "\nDense wins here because the budget is tiny.\n")
    write_report(_results(tmp_path), tmp_path)
    text = report.read_text()
    assert text.count(DISCUSSION_MARKER) == 1
    assert text.endswith("\nDense wins here because the budget is tiny.\n")


def _table_rows(markdown: str) -> dict[str, list[str]]:
    table = markdown.split("## Results", 1)[1].split("\n\n")[1]
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_quick_study_trains_through_the_recipe_converts_and_merges_through_the_cli_and_writes_a_finite_table(
    tmp_path,
):
    out, work = tmp_path / "results", tmp_path / "work"
    command = [
        sys.executable, "scripts/experiments/upcycling_study.py", "--quick", "--methods", "dense", "copy", "merged",
        "--out-dir", str(out), "--work-dir", str(work),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not work.exists()  # checkpoints are removed unless --keep-work

    markdown = (out / "upcycling_study.md").read_text()
    assert (out / "upcycling_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _table_rows(markdown)
    assert set(rows) == {"dense", "copy", "merged", "dense-flops"}
    for method, cells in rows.items():
        numbers = [float(x) for cell in cells for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", cell)]
        assert numbers and all(math.isfinite(x) for x in numbers), (method, cells)
    assert "python recipes/finetune.py" in markdown and "upcycle convert" in markdown and "upcycle merge" in markdown

    results = json.loads((out / "upcycling_study.json").read_text())
    settings = results["settings"]
    budget = settings["continue_steps"] * settings["batch_size"] * settings["seq_len"]
    runs = results["runs"]
    for method in ("dense", "copy", "merged"):
        assert [run["tokens"] for run in runs[method].values()] == [budget] * len(settings["seeds"])
    # The recipe's evaluations of both runs saw the same held-out tokens, and copy upcycling starts
    # exactly where the dense model is (identical experts).
    (dense,), (copy,) = runs["dense"].values(), runs["copy"].values()
    assert dense["curve"]["eval_tokens"] == copy["curve"]["eval_tokens"] > 0
    assert copy["init_loss"] == pytest.approx(dense["init_loss"], abs=1e-5)
    # Equal FLOPs: the dense run went on past the common budget until it had spent the MoE's FLOPs.
    assert runs["copy"]["1"]["flops"] > runs["dense"]["1"]["flops"]
    assert runs["dense-flops"]["1"]["flops"] >= runs["copy"]["1"]["flops"]
    assert runs["dense-flops"]["1"]["tokens"] > budget

    # --rewrite-report trains nothing and rebuilds the same report from the JSON.
    (out / "upcycling_study.md").unlink()
    rewrite = [sys.executable, "scripts/experiments/upcycling_study.py", "--rewrite-report", "--out-dir", str(out)]
    result = subprocess.run(rewrite, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "upcycling_study.md").read_text() == markdown


def test_findings_compare_equal_tokens_with_dense_and_equal_flops_with_the_flop_matched_run():
    def row(method, finals, tokens, flops):
        return {"method": method, "finals": finals, "tokens": tokens, "flops": flops}

    rows = [
        row("dense", [4.0, 4.2], 100, 600.0),
        row("copy", [3.9, 3.95], 100, 900.0),
        row("mope", [4.5, 4.6], 100, 500.0),
        row("dense-flops", [3.8, 3.85], 150, 900.0),
    ]
    for r in rows:
        r["delta"] = sum(r["finals"]) / 2 - 4.1
    lines = findings(rows)
    assert lines[0] == (
        "- **copy**: equal tokens: -0.1750 nats vs dense (lower on every seed); equal FLOPs: +0.1000 nats vs the "
        "FLOP-matched dense run (higher on every seed)."
    )
    assert lines[1] == "- **mope**: equal tokens: +0.4500 nats vs dense (higher on every seed)."  # FLOPs differ
    assert lines[2] == "- **dense-flops**: 1.50x the tokens of `dense`: -0.2750 nats vs `dense` (lower on every seed)."
