"""The pieces of the recipes, in process: config errors, SFT masks, router metrics, modes, checkpoints."""

from __future__ import annotations

import json
import random
import runpy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from upcycle.training.checkpoints import STATE_FILE, find_resume_checkpoint, remove_incomplete_checkpoints
from upcycle.training.config import ConfigError, config_from_dict
from upcycle.training.data import IGNORE_INDEX, chat_example, completion_example, pack_texts
from upcycle.training.metrics import RouterMetrics
from upcycle.training.model import apply_mode

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "configs" / "smoke_cpu.yaml"
TINY_LLAMA = ROOT / "examples" / "tiny-llama"
MINIMAL = {"model": {"path": "m"}, "data": {"train": "hub/dataset"}, "output": {"dir": "out"}}


@pytest.fixture(scope="module")
def finetune_main():
    return runpy.run_path(str(ROOT / "recipes" / "finetune.py"), run_name="finetune_recipe")["main"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_LLAMA)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1e-4"], "train.lrr: unknown key; known keys here: seed, lr,"),
        (["data.train=recipes/data/missing.jsonl"], "data.train: file recipes/data/missing.jsonl does not exist"),
        (["model.upcycle=null", "model.mode=router_only"], "model.mode: 'router_only' needs a MoE model but"),
        (
            ["model.upcycle=null", "model.mode=lora", "model.lora.target_parameters=[mlp.experts.down_proj]"],
            "model.lora.target_parameters: fused expert parameters exist only in MoE models",
        ),
        (["model.path=/nowhere/model"], "model.path: directory /nowhere/model does not exist"),
        (["train.mixed_precision=fp8"], "train.mixed_precision: 'fp8' is not one of no, fp16, bf16"),
    ],
)
def test_bad_config_fails_before_training_with_one_line_naming_the_key(
    finetune_main, tmp_path, capsys, overrides, message
):
    output = tmp_path / "run"
    argv = [str(SMOKE), "-o", f"output.dir={output}"]
    for item in overrides:
        argv += ["-o", item]
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune: error: {message}"), lines
    assert not output.exists(), "nothing may be written before the config is accepted"


def test_fresh_run_refuses_an_output_dir_holding_checkpoints(finetune_main, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        finetune_main([str(SMOKE), "-o", f"output.dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.startswith("finetune: error: output.dir: ") and "pass --resume to continue it" in error


def test_overrides_and_yaml_numbers_are_typed():
    config = config_from_dict(
        {**MINIMAL, "train": {"lr": "1e-4"}},
        ["train.max_steps=3", "model.upcycle.experts=4", "logging.report_to=[wandb]", "train.max_grad_norm=null"],
    )
    assert config.train.lr == 1e-4 and config.train.max_steps == 3 and config.train.max_grad_norm is None
    assert config.model.upcycle.experts == 4 and config.model.upcycle.top_k == 2
    assert config.logging.report_to == ["wandb"]
    with pytest.raises(ConfigError, match=r"^train.max_steps: expected int, got 'many'$"):
        config_from_dict(MINIMAL, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"^model.mope.aux_loss_coef: set the router losses"):
        config_from_dict(MINIMAL, ["model.mode=mope", "model.mope={aux_loss_coef: 0.1}"])


def test_packing_concatenates_documents_with_eos_into_full_blocks(tokenizer):
    texts = ["one two three", "four five six seven"]
    blocks = pack_texts(tokenizer, texts, seq_len=4)
    # This tokenizer adds no bos, so a document is its ids and eos.
    expected = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [2]]
    assert tokenizer.eos_token_id == 2 and all(len(block) == 4 for block in blocks)
    assert [t for block in blocks for t in block] == expected[: len(expected) // 4 * 4]


def test_completion_loss_is_masked_to_the_completion(tokenizer):
    example = completion_example(tokenizer, "Add 2 and 3. Answer:", " 5", seq_len=64)
    prompt_length = len(tokenizer("Add 2 and 3. Answer:", add_special_tokens=False)["input_ids"])  # no bos here
    assert example["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_chat_loss_covers_the_assistant_turns_only(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    example = chat_example(tokenizer, messages, seq_len=256)
    trained = tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    )
    assert trained.replace(" ", "") == "hellothere</s>seeyou</s>"


def test_router_metrics_of_a_known_routing():
    metrics = RouterMetrics(capacity_factor=1.0)
    # 4 tokens, 2 experts, top-1: three tokens pick expert 0, one picks expert 1.
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    metrics.update("layer_0", logits, logits.argmax(-1, keepdim=True), None)
    summary = metrics.summary()
    assert summary["moe/layer_0/load/expert_0"] == 0.75
    assert summary["moe/layer_0/load_cv"] == pytest.approx(0.5)  # std 0.25 / mean 0.5
    assert summary["moe/layer_0/dropped_frac"] == pytest.approx(0.25)  # capacity 2: one of three dropped
    p = torch.softmax(torch.tensor([5.0, 0.0]), 0)
    assert summary["moe/layer_0/entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert metrics.summary() == {}, "summary resets the interval"


def _tiny_mixtral():
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("mode", "trainable_suffixes"),
    [("router_only", {"mlp.gate.weight"}), ("experts_only", {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"})],
)
def test_freezing_modes_train_exactly_the_routers_or_the_experts(mode, trainable_suffixes):
    config = config_from_dict(MINIMAL, [f"model.mode={mode}"])
    model = apply_mode(_tiny_mixtral(), config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name.split("layers.")[1].split(".", 1)[1] for name in trainable} == trainable_suffixes
    assert len(trainable) == 2 * len(trainable_suffixes)


def test_lora_reaches_fused_experts_through_target_parameters():
    config = config_from_dict(
        MINIMAL,
        [
            "model.mode=lora",
            "model.lora.target_modules=[q_proj]",
            "model.lora.target_parameters=[mlp.experts.down_proj]",
        ],
    )
    model = apply_mode(_tiny_mixtral(), config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("experts" in name for name in trainable) and any("q_proj" in name for name in trainable)


def test_resume_ignores_and_removes_a_checkpoint_a_kill_left_half_written(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint_0").mkdir(parents=True)
    (checkpoints / "checkpoint_0" / STATE_FILE).write_text(json.dumps({"step": 4}))
    (checkpoints / "checkpoint_1").mkdir()  # killed during save_state: no state file
    assert find_resume_checkpoint(tmp_path, "latest") == checkpoints / "checkpoint_0"
    assert remove_incomplete_checkpoints(tmp_path) == [checkpoints / "checkpoint_1"]
    assert not (checkpoints / "checkpoint_1").exists()
    with pytest.raises(ConfigError, match="^--resume: "):
        find_resume_checkpoint(tmp_path, str(checkpoints / "checkpoint_1"))


def test_moe_blocks_are_found_for_zero3_leaf_modules():
    from upcycle.training.model import moe_block_classes

    assert [cls.__name__ for cls in moe_block_classes(_tiny_mixtral())] == ["MixtralSparseMoeBlock"]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_opens_with_its_command_and_validates(path):
    from upcycle.training.config import load_config

    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# accelerate launch ") and f"recipes/configs/{path.name}" in first_line
    load_config(path)


def test_push_to_hub_without_a_token_fails_before_training(finetune_main, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # neither HF_TOKEN nor a stored login
    with pytest.raises(SystemExit) as exit_info:
        finetune_main([str(SMOKE), "-o", f"output.dir={tmp_path / 'run'}", "-o", "output.push_to_hub=me/model"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("finetune: error: output.push_to_hub: pushing to me/model needs a token")
    assert not (tmp_path / "run").exists()


def test_resume_without_a_checkpoint_says_training_starts_from_step_0(tmp_path, capsys):
    """The run goes as far as the Accelerator (in this process) and stops where the model would load."""
    import numpy as np
    from accelerate.state import AcceleratorState

    recipe = runpy.run_path(str(ROOT / "recipes" / "finetune.py"), run_name="finetune_recipe")

    class ModelStepReached(Exception):
        pass

    def stop(run):
        raise ModelStepReached

    recipe["train"].__globals__["build_model"] = stop  # run_path returns a copy of the module's globals
    output = tmp_path / "run"
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), pytest.raises(ModelStepReached):
            recipe["main"]([str(SMOKE), "-o", f"output.dir={output}", "--resume"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"--resume: no checkpoint found under output.dir {output}; training starts from step 0"]


def test_progress_bar_honours_tqdm_disable():
    """tqdm reads TQDM_* into its keyword defaults when imported; an explicit disable= would override them."""
    import os
    import subprocess
    import sys

    probe = (
        "from upcycle.training.loop import progress_bar; "
        "print(progress_bar(10, 0, enabled=True).disable, progress_bar(10, 0, enabled=False).disable)"
    )
    shown = {}
    for value in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        if value is not None:
            env["TQDM_DISABLE"] = value
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        shown[value] = done.stdout.split()
    assert shown == {"1": ["True", "True"], None: ["False", "True"]}


def test_a_worker_of_a_multi_process_run_leaves_with_os_exit_and_a_single_process_returns(monkeypatch):
    """After `end_training` has destroyed the process group, a worker must not unwind `train`'s frame
    (freeing DDP's reducer and its gloo group deadlocked one rank); a single process returns."""
    recipe = runpy.run_path(str(ROOT / "recipes" / "finetune.py"), run_name="finetune_recipe")
    leave = recipe["leave_distributed_run"]
    exits = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(leave.__globals__["os"], "_exit", fake_exit)
    assert leave(type("OneProcess", (), {"num_processes": 1})()) is None
    assert exits == []
    with pytest.raises(Exited):
        leave(type("TwoProcesses", (), {"num_processes": 2})())
    assert exits == [0]
