"""DeepSeek-V3 auxiliary-loss-free balancing (``moe.bias_update_rate``) of a stock glm4_moe in the recipe.

A tiny random glm4_moe (3 layers, the first dense; 8 routed experts in 4 groups, top-2 of 2 groups,
one shared expert) has its routers skewed: every embedding shares one direction and the router rows
of experts 0 and 1 point along it, so those two take most tokens at the start. The recipe runs
(recipes/finetune.py on the smoke config, overridden) start together as in tests/test_recipes.py: with
balancing, without it, the same global batch on two DDP processes, and a run resumed from the
first one's step-8 checkpoint.
"""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import RECIPE, ROOT, SMOKE, TOKENIZER, _env, _free_port
from torch import nn

from upcycle.families.moe_fields import biased_routers
from upcycle.training.balancing import RoutingCapture, balance_selection_biases
from upcycle.training.config import ConfigError, config_from_dict

RATE = 0.02
STEPS = 16
BIAS = "e_score_correction_bias"
MINIMAL = {"model": {"path": "m"}, "data": {"train": "hub/dataset"}, "output": {"dir": "out"}}


def skewed_glm4_moe() -> nn.Module:
    """Return the tiny glm4_moe whose routers send most tokens to experts 0 and 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "glm4_moe",
        vocab_size=2048,  # the shipped tiny-llama tokenizer
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        direction = torch.randn(config.hidden_size)
        direction /= direction.norm()
        model.model.embed_tokens.weight += 0.05 * direction
        for layer in model.model.layers[config.first_k_dense_replace :]:
            layer.mlp.gate.weight.normal_(0.0, 0.1)
            layer.mlp.gate.weight[:2] += 0.8 * direction
    return model


def _args(model: Path, output: Path, *extra: str) -> list[str]:
    overrides = [
        f"model.path={model}",
        f"model.tokenizer={TOKENIZER}",
        "model.upcycle=null",
        "moe.aux_loss_coef=null",  # glm4_moe has no auxiliary loss; balancing alone
        f"moe.bias_update_rate={RATE}",
        f"output.dir={output}",
        f"train.max_steps={STEPS}",
        "train.lr=1e-3",
        "checkpoint.every_steps=8",
        "eval.every_steps=0",
        "eval.at_start=false",
        *extra,
    ]
    return [str(SMOKE)] + [item for override in overrides for item in ("-o", override)]


def _train_records(output: Path) -> list[dict]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "lm_loss" in record]


def _biases(path: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in load_file(path).items() if name.endswith(BIAS)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Start the balanced, unbalanced and DDP runs together, then resume the balanced one from step 8."""
    root = tmp_path_factory.mktemp("balancing")
    tiny = root / "tiny-glm4-moe"
    skewed_glm4_moe().save_pretrained(tiny)
    env = _env(root / "datasets-cache")
    out = {name: root / name for name in ("balanced", "unbalanced", "ddp", "resumed")}
    popen = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    python = [sys.executable, str(RECIPE)]
    started = {
        "balanced": subprocess.Popen(python + _args(tiny, out["balanced"]), **popen),
        "unbalanced": subprocess.Popen(
            python + _args(tiny, out["unbalanced"], "moe.bias_update_rate=0", "checkpoint.every_steps=0"), **popen
        ),
        # Global batch 8 as above (one process x 4 x 2 accumulation steps): 2 processes x 4 x 1.
        "ddp": subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
            + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            + ["--main_process_port", str(_free_port()), str(RECIPE)]
            + _args(tiny, out["ddp"], "train.gradient_accumulation_steps=1", "checkpoint.every_steps=0"),
            **{**popen, "env": {**env, "ACCELERATE_USE_CPU": "true"}},
        ),
    }
    for name in ("balanced", "unbalanced", "ddp"):
        output, _ = started[name].communicate(timeout=600)
        assert started[name].returncode == 0, f"{name} run failed:\n{output[-4000:]}"
    checkpoint = out["balanced"] / "checkpoints" / "checkpoint_0"
    resumed = subprocess.run(
        python + _args(tiny, out["resumed"]) + ["--resume", str(checkpoint)], timeout=600, check=False, **popen
    )
    assert resumed.returncode == 0, f"resumed run failed:\n{resumed.stdout[-4000:]}"
    return out


def test_balancing_lowers_the_load_cv_of_a_skewed_router(runs):
    balanced, unbalanced = _train_records(runs["balanced"]), _train_records(runs["unbalanced"])
    assert [r["step"] for r in balanced] == list(range(1, STEPS + 1))
    # Same weights, batch and biases (all zero) at step 1: the same skewed routing.
    assert balanced[0]["moe/load_cv"] == unbalanced[0]["moe/load_cv"] > 1.0
    # The per-step load the update used is the one the router metrics count (every step is logged).
    assert [r["moe/step_load_cv"] for r in balanced] == pytest.approx([r["moe/load_cv"] for r in balanced])
    assert "moe/step_load_cv" not in unbalanced[0]

    def late_cv(records: list[dict]) -> float:
        return sum(r["moe/load_cv"] for r in records[-4:]) / 4

    # Measured: 1.12 at step 1; the last four steps average about 0.6 with balancing, 1.4 without.
    assert late_cv(balanced) < 0.7 * balanced[0]["moe/load_cv"]
    assert late_cv(unbalanced) > late_cv(balanced) + 0.4
    # Every step moves each bias by +-rate (or 0): after 16 steps the spread is a multiple of it, at most 2x16x.
    spread = balanced[-1]["moe/bias_range"]
    assert 0 < spread <= 2 * STEPS * RATE + 1e-6
    assert spread / RATE == pytest.approx(round(spread / RATE), abs=1e-3)


def test_biases_are_saved_with_the_checkpoint_and_the_final_model(runs):
    final = _biases(runs["balanced"] / "final" / "model.safetensors")
    assert sorted(final) == [f"model.layers.{i}.mlp.gate.{BIAS}" for i in (1, 2)]
    step_8 = _biases(runs["balanced"] / "checkpoints" / "checkpoint_0" / "model.safetensors")
    assert step_8.keys() == final.keys()
    for name, bias in final.items():
        assert bias.dtype == torch.float32 and bias.abs().max() > 0
        assert not torch.equal(bias, step_8[name]), "the biases kept moving after the checkpoint"
    unbalanced = _biases(runs["unbalanced"] / "final" / "model.safetensors")
    assert all(not bias.any() for bias in unbalanced.values()), "rate 0 leaves the biases at zero"
    saved = json.loads((runs["balanced"] / "final" / "config.json").read_text())
    assert saved["model_type"] == "glm4_moe" and saved["output_router_logits"] is False
    assert "bias_update_rate: 0.02" in (runs["balanced"] / "final" / "recipe.yaml").read_text()


def test_two_processes_update_the_biases_as_one_process_with_the_same_global_batch(runs):
    one, two = _train_records(runs["balanced"]), _train_records(runs["ddp"])
    assert json.loads((runs["ddp"] / "run.json").read_text())["processes"] == 2
    for a, b in zip(one, two, strict=True):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-4), f"step {a['step']}"
        # The load is an all-reduced integer count: the same routing gives the same numbers.
        assert b["moe/step_load_cv"] == pytest.approx(a["moe/step_load_cv"], rel=1e-9), f"step {a['step']}"
        assert b["moe/bias_range"] == pytest.approx(a["moe/bias_range"], rel=1e-9), f"step {a['step']}"
    weights_one = load_file(runs["balanced"] / "final" / "model.safetensors")
    weights_two = load_file(runs["ddp"] / "final" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        atol = 0 if name.endswith(BIAS) else 1e-5
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=atol, msg=name)


def test_resumed_run_reproduces_the_biases_and_weights_of_the_uninterrupted_run(runs):
    resumed_log, reference_log = _train_records(runs["resumed"]), _train_records(runs["balanced"])
    assert [r["step"] for r in resumed_log] == list(range(9, STEPS + 1))
    for a, b in zip(reference_log[8:], resumed_log, strict=True):
        assert b["moe/step_load_cv"] == a["moe/step_load_cv"] and b["moe/bias_range"] == a["moe/bias_range"]
    resumed = load_file(runs["resumed"] / "final" / "model.safetensors")
    reference = load_file(runs["balanced"] / "final" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        atol = 0 if name.endswith(BIAS) else 1e-6
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=atol, msg=name)


class _Router(nn.Module):
    """A router of glm4_moe's shape that sends token t to the experts ``choices[t]``."""

    def __init__(self, choices: list[list[int]], num_experts: int) -> None:
        super().__init__()
        self.choices = torch.tensor(choices)
        self.weight = nn.Parameter(torch.zeros(num_experts, 8))  # the projection a router owns
        self.e_score_correction_bias = nn.Buffer(torch.zeros(num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
        logits = torch.zeros(tokens, self.e_score_correction_bias.numel())
        return logits, torch.ones(tokens, self.choices.shape[1]), self.choices[:tokens]


class _Processes:
    """`Accelerator.reduce` of this process's load with another process's `other` load."""

    def __init__(self, other: torch.Tensor | None = None) -> None:
        self.other = other

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return tensor if self.other is None else tensor + self.other


def test_update_rule_by_hand():
    # 2 sequences of 3 positions, top-2 of 4 experts; the last two positions are padding.
    router = _Router([[0, 1], [0, 2], [0, 1], [0, 2], [3, 2], [3, 2]], num_experts=4)
    router.e_score_correction_bias += torch.tensor([0.5, 0.0, 0.0, 0.0])
    capture = RoutingCapture(biased_routers(router), keep_routing=True, count_load=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    router(torch.zeros(2, 3, 8))  # outside `recording` (an eval forward): not counted
    with capture.recording(mask):
        router(torch.zeros(2, 3, 8))
    # Load without the padding: expert 0: 4, 1: 2, 2: 2, 3: 0; mean 2 -> sign(mean - load) = -1, 0, 0, +1.
    metrics = balance_selection_biases(_Processes(), capture, 0.1, torch.device("cpu"))
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([0.4, 0.0, 0.0, 0.1]))
    assert metrics["moe/step_load_cv"] == pytest.approx(math.sqrt(2) / 2)  # std sqrt(2) / mean 2
    assert metrics["moe/bias_range"] == pytest.approx(0.4)
    name, logits, indices = capture.routed_layers()[0]
    assert name == "" and logits.shape == (6, 4) and indices.tolist() == router.choices.tolist()

    # Two micro-batches accumulate; another process's load (8 on expert 3) is summed before the update.
    for _ in range(2):
        with capture.recording(mask):
            router(torch.zeros(2, 3, 8))
    balance_selection_biases(_Processes(torch.tensor([0, 0, 0, 8])), capture, 0.1, torch.device("cpu"))
    # Load 8, 4, 4, 8; mean 6 -> -1, +1, +1, -1.
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([0.3, 0.1, 0.1, 0.0]))
    # Nothing recorded since: the next update sees zero load everywhere and changes nothing.
    balance_selection_biases(_Processes(), capture, 0.1, torch.device("cpu"))
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([0.3, 0.1, 0.1, 0.0]))


def test_biases_get_no_gradient_and_no_optimizer_slot_and_recomputation_is_not_counted():
    from upcycle.training.config import TrainSection
    from upcycle.training.loop import make_optimizer

    model = skewed_glm4_moe()
    # Its backward runs each layer's forward again, outside `recording`: the load counts once.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    routers = biased_routers(model)
    assert [name for name, _ in routers] == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    optimizer = make_optimizer(model, TrainSection(weight_decay=0.1))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    capture = RoutingCapture(routers, keep_routing=False, count_load=True)
    with capture.recording(None):
        outputs = model(input_ids=torch.randint(3, 2048, (2, 16)))
    outputs.logits.sum().backward()
    for _, router in routers:
        bias = getattr(router, BIAS)
        assert id(bias) not in optimized and not bias.requires_grad and bias.grad is None
        assert f"{BIAS}" in dict(router.named_buffers()) and router.weight.grad is not None
    load = capture.take_load(torch.device("cpu")).view(2, 8)
    assert load.sum(1).tolist() == [2 * 16 * 2] * 2  # 32 tokens x top-2 per layer
    assert (load[:, :2].sum(1) > load.sum(1) / 2).all(), "the toy router is skewed to experts 0 and 1"


@pytest.fixture(scope="module")
def finetune_main():
    return runpy.run_path(str(RECIPE), run_name="finetune_recipe")["main"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["moe.bias_update_rate=-0.001"], "moe.bias_update_rate: must be a finite number >= 0 (0: off), got -0.001"),
        (["moe.bias_update_rate=.nan"], "moe.bias_update_rate: must be a finite number >= 0"),
        (["moe.bias_update_rate=fast"], "moe.bias_update_rate: expected float, got 'fast'"),
        (
            ["moe.bias_update_rate=0.001", "model.mode=lora"],
            "moe.bias_update_rate: the router biases live in the base model, which a lora adapter does not save",
        ),
        # smoke_cpu.yaml upcycles into Mixtral, whose softmax routers have no selection bias.
        (
            ["moe.bias_update_rate=0.001"],
            "moe.bias_update_rate: mixtral has no router owning an e_score_correction_bias",
        ),
        # smoke_cpu.yaml sets moe.aux_loss_coef 0.01, which glm4_moe would silently ignore.
        (
            ["model.upcycle.target=glm4_moe"],
            "moe.aux_loss_coef: glm4_moe computes no load-balancing loss",
        ),
    ],
)
def test_bad_bias_update_rate_fails_before_training(finetune_main, tmp_path, capsys, overrides, message):
    output = tmp_path / "run"
    argv = [str(SMOKE), "-o", f"output.dir={output}"]
    for item in overrides:
        argv += ["-o", item]
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune: error: {message}"), lines
    assert not output.exists()


def test_bias_update_rate_defaults_to_off():
    assert config_from_dict(MINIMAL).moe.bias_update_rate == 0.0
    assert config_from_dict(MINIMAL, ["moe.bias_update_rate=1e-3"]).moe.bias_update_rate == 0.001
    with pytest.raises(ConfigError, match=r"^moe.bias_update_rate: must be a finite number >= 0 \(0: off\), got inf$"):
        config_from_dict(MINIMAL, ["moe.bias_update_rate=.inf"])
