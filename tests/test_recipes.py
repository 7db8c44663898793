"""End-to-end runs of recipes/finetune.py on CPU: learning, DDP parity, kill -9 and resume, aux loss.

All runs share one tiny random Llama (2 layers, hidden 64, the shipped tiny-llama tokenizer),
upcycled on the fly into a 4-expert top-2 Mixtral by recipes/configs/smoke_cpu.yaml, and the
shipped docstring corpus. The independent runs start together (the machine has two cores and
each run spends most of its time importing), then the resumed run follows the killed one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune.py"
SMOKE = ROOT / "recipes" / "configs" / "smoke_cpu.yaml"
TOKENIZER = ROOT / "examples" / "tiny-llama"
RUN_TIMEOUT_S = 300  # a run takes 15-60 s on 2 cores; the four start together
TOTAL_STEPS = 12  # smoke_cpu.yaml: max_steps 12, checkpoint every 4, eval every 6, aux_loss_coef 0.01

# Runs the recipe in this process after wrapping save_checkpoint so that the process SIGKILLs
# itself right after the checkpoint of step 4 is complete: a kill -9 at a known point.
KILL_AFTER_CHECKPOINT = """
import os, runpy, signal, sys
import upcycle.training.checkpoints as checkpoints
original = checkpoints.save_checkpoint
def save_then_die(accelerator, output_dir, state):
    folder = original(accelerator, output_dir, state)
    if state["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return folder
checkpoints.save_checkpoint = save_then_die
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_CACHE=str(cache),
        TRANSFORMERS_VERBOSITY="error",
        TQDM_DISABLE="1",
        PYTHONPATH=str(ROOT),
        PYTHONFAULTHANDLER="1",
    )
    return env


def _overrides(model: Path, output: Path, *extra: str) -> list[str]:
    args = [str(SMOKE), "-o", f"model.path={model}", "-o", f"model.tokenizer={TOKENIZER}", "-o", f"output.dir={output}"]
    for item in extra:
        args += ["-o", item]
    return args


def _read_log(output: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def _finish(process: subprocess.Popen, name: str) -> str:
    """Wait for a run and return its output; a run that hangs fails the test with every Python stack
    of its process group (faulthandler prints them on SIGABRT) instead of eating the CI budget."""
    try:
        return process.communicate(timeout=RUN_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        try:
            out = process.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out = process.communicate()[0]
        pytest.fail(f"{name} run hung for {RUN_TIMEOUT_S} s; its output and stacks:\n{out[-12000:]}")


def _check(process: subprocess.Popen, name: str) -> None:
    out = _finish(process, name)
    assert process.returncode == 0, f"{name} run failed:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Start the reference, DDP, no-aux and to-be-killed runs together; then resume the killed one."""
    root = tmp_path_factory.mktemp("recipes")
    tiny = root / "tiny-llama"
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
    env = _env(root / "datasets-cache")
    out = {name: root / name for name in ("reference", "ddp", "no_aux", "killed")}
    python = [sys.executable, str(RECIPE)]
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)
    reference = subprocess.Popen(
        python + _overrides(tiny, out["reference"], "logging.report_to=[tensorboard]", "output.export=dense"), **popen
    )
    # Same global batch of 8: one process x 4 x 2 accumulation steps vs 2 processes x 4 x 1.
    # `accelerate launch --cpu --num_processes 2` starts ONE process (Accelerate's simple launcher,
    # unless MPI is set up); torchrun through `--multi_gpu` plus ACCELERATE_USE_CPU gives DDP over gloo.
    ddp = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        + ["--main_process_port", str(_free_port()), str(RECIPE)]
        + _overrides(tiny, out["ddp"], "train.gradient_accumulation_steps=1", "eval.at_start=false"),
        **{**popen, "env": {**env, "ACCELERATE_USE_CPU": "true"}},
    )
    no_aux = subprocess.Popen(
        python
        + _overrides(
            tiny,
            out["no_aux"],
            "moe.aux_loss_coef=0",
            "train.max_steps=1",
            "eval.at_start=false",
            "checkpoint.every_steps=0",
        ),
        **popen,
    )
    killed = subprocess.Popen(
        [sys.executable, "-c", KILL_AFTER_CHECKPOINT, *python[1:], *_overrides(tiny, out["killed"])], **popen
    )
    killed_output = _finish(killed, "killed")
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed:\n{killed_output[-4000:]}"
    out["killed_log"] = [json.loads(line) for line in (out["killed"] / "metrics.jsonl").read_text().splitlines()]
    resumed = subprocess.Popen(python + _overrides(tiny, out["killed"]) + ["--resume"], **popen)
    for process, name in ((reference, "reference"), (ddp, "ddp"), (no_aux, "no-aux"), (resumed, "resumed")):
        _check(process, name)
    return out


def test_smoke_run_learns_and_saves_a_stock_mixtral(runs):
    from transformers import AutoModelForCausalLM

    train, evals = _read_log(runs["reference"])
    assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1))
    assert [r["step"] for r in evals] == [0, 6, 12]
    start, end = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    assert end < start - 0.5, f"eval loss went from {start:.3f} to {end:.3f}"
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train)
    # Router metrics for both MoE layers, from the router logits.
    assert 0.0 <= train[-1]["moe/layer_1/load_cv"] < 2.0
    assert 0.0 < train[-1]["moe/entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert 0.0 <= train[-1]["moe/dropped_frac"] < 1.0
    assert list((runs["reference"] / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"

    final = runs["reference"] / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["model_type"] == "mixtral" and saved["router_aux_loss_coef"] == 0.01
    assert saved["output_router_logits"] is False
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (final / "tokenizer.json").is_file() and (final / "recipe.yaml").is_file()
    dense = AutoModelForCausalLM.from_pretrained(runs["reference"] / "final-dense")
    assert type(dense).__name__ == "LlamaForCausalLM", "export: dense folds the trained MoE back with upcycle.merge"
    # total_limit 2 keeps the checkpoints of steps 4 and 8.
    assert sorted(p.name for p in (runs["reference"] / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1"]


def test_two_process_ddp_gives_the_losses_of_one_process_with_the_same_global_batch(runs):
    reference, _ = _read_log(runs["reference"])
    ddp, _ = _read_log(runs["ddp"])
    assert json.loads((runs["ddp"] / "run.json").read_text())["processes"] == 2
    assert json.loads((runs["reference"] / "run.json").read_text())["processes"] == 1
    assert [r["step"] for r in ddp] == [r["step"] for r in reference]
    for one, two in zip(reference, ddp, strict=True):
        for key in ("loss", "lm_loss", "aux_loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), f"step {one['step']} {key}"
        assert two["lr"] == pytest.approx(one["lr"], rel=1e-9)


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(runs):
    killed_steps = [r["step"] for r in runs["killed_log"] if "loss" in r]
    assert killed_steps == [1, 2, 3, 4], "the kill did not come right after the step-4 checkpoint"
    train, evals = _read_log(runs["killed"])
    reference_train, reference_evals = _read_log(runs["reference"])
    assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1))
    assert [r["loss"] for r in train] == pytest.approx([r["loss"] for r in reference_train], rel=1e-6)
    assert evals[-1]["eval_loss"] == pytest.approx(reference_evals[-1]["eval_loss"], rel=1e-6)
    resumed = load_file(runs["killed"] / "final" / "model.safetensors")
    reference = load_file(runs["reference"] / "final" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_aux_loss_coefficient_changes_the_loss_by_exactly_the_logged_aux_term(runs):
    with_aux = _read_log(runs["reference"])[0][0]
    without_aux = _read_log(runs["no_aux"])[0][0]
    assert without_aux["aux_loss"] == 0.0 and "router_aux" not in without_aux
    assert with_aux["router_aux"] > 0
    # Same weights and batch at step 1: the language-model term is identical.
    assert with_aux["lm_loss"] == pytest.approx(without_aux["lm_loss"], abs=1e-9)
    assert with_aux["loss"] - without_aux["loss"] == pytest.approx(with_aux["aux_loss"], abs=1e-7)
    assert with_aux["aux_loss"] == pytest.approx(with_aux["router_aux"], abs=1e-12)
