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
from transformers import AutoModelForCausalLM, Glm4MoeConfig, LlamaConfig, MixtralConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "experiments"))

from study_data import SPLITS, split_of, stdlib_sources  # noqa: E402
from study_flops import checkpoint_parameters, count_parameters  # noqa: E402
from study_report import DISCUSSION_MARKER, findings, interpolate, write_report  # noqa: E402
from upcycling_study import add_rows  # noqa: E402

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


def test_glm4_moe_counts_the_shared_expert_always_top_k_routed_experts_and_the_dense_first_layer(tmp_path):
    Glm4MoeConfig(
        **TINY, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=2, topk_group=1,
    ).save_pretrained(tmp_path)  # fmt: skip
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    count, dense_count = checkpoint_parameters(str(tmp_path)), count_parameters(dense, 1)
    ffn, expert, router = 3 * 16 * 32, 3 * 16 * 8, 4 * 16  # one dense FFN, one expert (or the shared one)
    # Layer 0 keeps its dense FFN; layer 1: the shared expert, 2 of the 4 routed experts, the router
    # (the e_score_correction_bias is a buffer: no FLOPs counted).
    assert count.active == dense_count.active - ffn + expert + 2 * expert + router
    assert count.total == dense_count.total - ffn + expert + 4 * expert + router
    assert count.training_flops_per_token() == 6 * count.active


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


def test_add_rows_keeps_the_existing_rows_and_records_the_run_that_added_one(tmp_path):
    base = _results(tmp_path)
    base["methods"], base["balancing"] = ["dense"], {}
    run = {**base["runs"]["dense"][1], "final_loss": 3.4}
    trace = {"first_step": 1, "first_cv": 1.2, "last_step": 1, "last_cv": 1.2, "window": 1, "first_window_cv": 1.2,
             "last_window_cv": 1.2, "final_bias_range": 0.01, "steps_logged": 1}  # fmt: skip
    new = {
        **base, "methods": ["glm4-lossfree"], "runs": {"glm4-lossfree": {1: run}, "dense": {1: {}}},
        "parameters": {"glm4-lossfree": {"total": 30, "active": 2, "trainable_active": 2}, "dense": {}},
        "flops_per_token": {"glm4-lossfree": 12.0}, "balancing": {"glm4-lossfree": {1: trace}},
        "study_command": "upcycling_study.py --add --methods glm4-lossfree", "git_revision": "abc",
    }  # fmt: skip
    merged = add_rows(base, new)
    assert merged["methods"] == ["dense", "glm4-lossfree"]
    assert merged["runs"]["dense"] == json.loads(json.dumps(base["runs"]["dense"]))  # the new run's dense ignored
    assert merged["runs"]["glm4-lossfree"]["1"]["final_loss"] == 3.4
    assert merged["parameters"]["dense"] == base["parameters"]["dense"]
    assert [a["methods"] for a in merged["additions"]] == [["glm4-lossfree"]]
    text = write_report(merged, tmp_path).read_text()
    assert "- Added by `upcycling_study.py --add --methods glm4-lossfree` (glm4-lossfree)" in text
    assert "| glm4-lossfree | 1 | 1.200 (step 1) |" in text
    assert "# added by upcycling_study.py --add --methods glm4-lossfree:" in text


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
        "glm4-lossfree", "--out-dir", str(out), "--work-dir", str(work),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not work.exists()  # checkpoints are removed unless --keep-work

    markdown = (out / "upcycling_study.md").read_text()
    assert (out / "upcycling_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _table_rows(markdown)
    assert set(rows) == {"dense", "copy", "merged", "glm4-lossfree", "dense-flops"}
    for method, cells in rows.items():
        numbers = [float(x) for cell in cells for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", cell)]
        assert numbers and all(math.isfinite(x) for x in numbers), (method, cells)
    assert "python recipes/finetune.py" in markdown and "upcycle convert" in markdown and "upcycle merge" in markdown

    results = json.loads((out / "upcycling_study.json").read_text())
    settings = results["settings"]
    budget = settings["continue_steps"] * settings["batch_size"] * settings["seq_len"]
    runs = results["runs"]
    for method in ("dense", "copy", "merged", "glm4-lossfree"):
        assert [run["tokens"] for run in runs[method].values()] == [budget] * len(settings["seeds"])
    # The recipe's evaluations of both runs saw the same held-out tokens, and copy upcycling starts
    # exactly where the dense model is (identical experts).
    (dense,), (copy,) = runs["dense"].values(), runs["copy"].values()
    assert dense["curve"]["eval_tokens"] == copy["curve"]["eval_tokens"] > 0
    assert copy["init_loss"] == pytest.approx(dense["init_loss"], abs=1e-5)
    # So does the glm4_moe (granular with a shared expert, exact at init), trained with no aux loss and its
    # selection biases moved every step: the load CV of every step is logged.
    assert runs["glm4-lossfree"]["1"]["init_loss"] == pytest.approx(dense["init_loss"], abs=1e-5)
    assert "moe.aux_loss_coef=null --override moe.bias_update_rate=0.01" in runs["glm4-lossfree"]["1"]["command"]
    trace = results["balancing"]["glm4-lossfree"]["1"]
    assert trace["steps_logged"] == settings["continue_steps"] and trace["final_bias_range"] > 0
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
