"""How the upcycling study runs things: training through the Accelerate recipe, conversions and
merges through the `upcycle` CLI, and evaluation with the recipe's own evaluation code.

Nothing here trains or converts by itself: a training run is `python recipes/finetune.py CONFIG
--override ...` in a subprocess (the command a user types, minus `accelerate launch` for one CPU
process), and a conversion is `upcycle.cli.main([...])`, the entry point of the `upcycle` command.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "finetune.py"


@dataclass
class RecipeRun:
    """One finished recipe run: its command, wall time, and what its `metrics.jsonl` says."""

    command: list[str]
    output_dir: Path
    wall_seconds: float
    train_records: list[dict] = field(default_factory=list)
    eval_records: list[dict] = field(default_factory=list)

    @property
    def final_model(self) -> Path:
        """Return the folder of the saved final model (or adapter)."""
        return self.output_dir / "final"


@dataclass
class Command:
    """A command the study ran, as a user would type it, and how long it took."""

    argv: list[str]
    wall_seconds: float

    def text(self) -> str:
        """Return the command as one shell line."""
        return shlex.join(self.argv)


def child_environment(cache_dir: Path) -> dict[str, str]:
    """Return the environment for subprocesses: offline, a private datasets cache, no tokenizer threads
    (they would fight the training threads for the two cores)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(cache_dir),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Return (training records, eval records) of a recipe's `metrics.jsonl`."""
    train, evaluation = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        (evaluation if "eval_loss" in record else train).append(record)
    return train, evaluation


def run_recipe(config: Path, overrides: list[str], output_dir: Path, cache_dir: Path, log_file: Path) -> RecipeRun:
    """Run `recipes/finetune.py CONFIG` with `overrides` (plus `output.dir`) and return what it logged.

    Raises:
        RuntimeError: the recipe exited with an error (the message holds the tail of its log).
    """
    command = [
        sys.executable,
        str(RECIPE.relative_to(REPO)),
        str(config),
        *[part for override in [*overrides, f"output.dir={output_dir}"] for part in ("--override", override)],
    ]
    start = time.perf_counter()
    with log_file.open("w") as log:
        result = subprocess.run(
            command, cwd=REPO, env=child_environment(cache_dir), stdout=log, stderr=subprocess.STDOUT, check=False
        )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise RuntimeError(f"recipe run {output_dir} failed (exit {result.returncode}):\n{tail}")
    train, evaluation = read_metrics(output_dir / "metrics.jsonl")
    command[0] = "python"
    return RecipeRun(command, output_dir, wall, train, evaluation)


def run_cli(argv: list[str]) -> Command:
    """Run `upcycle ARGV` (the CLI's entry point, in this process) and return the command and its time.

    Raises:
        RuntimeError: the command exited non-zero.
    """
    from upcycle.cli import main

    start = time.perf_counter()
    code = main(argv)
    if code:
        raise RuntimeError(f"`upcycle {shlex.join(argv)}` failed with exit code {code}")
    return Command(["upcycle", *argv], time.perf_counter() - start)


class Evaluator:
    """Held-out loss of any checkpoint, computed by the recipe's own data and evaluation code
    (`upcycle.training.data.build_datasets`, `upcycle.training.evaluation.evaluate`) on the same
    blocks the recipe evaluates during training, so points from both line up."""

    def __init__(self, config: Path, overrides: list[str], model_path: Path):
        from accelerate import Accelerator
        from torch.utils.data import DataLoader

        from upcycle.training.config import load_config
        from upcycle.training.data import PadCollator, build_datasets
        from upcycle.training.model import load_tokenizer

        self.config = load_config(config, [*overrides, f"model.path={model_path}", "output.dir=unused"])
        tokenizer = load_tokenizer(self.config, model_path)
        _, eval_set = build_datasets(self.config.data, tokenizer, self.config.train.seed)
        batch_size = self.config.eval.batch_size or self.config.train.per_device_batch_size
        if self.config.eval.max_examples:  # the recipe's own cut
            eval_set = eval_set.select(range(min(self.config.eval.max_examples, len(eval_set))))
        self.accelerator = Accelerator(cpu=True)
        self.loader = self.accelerator.prepare(
            DataLoader(eval_set, batch_size=batch_size, collate_fn=PadCollator(tokenizer.pad_token_id))
        )

    def loss(self, model_path: Path) -> dict:
        """Return `{"eval_loss", "eval_ppl", "eval_tokens"}` of the causal LM (or MoPE adapter) at `model_path`."""
        import torch
        from transformers import AutoModelForCausalLM

        from upcycle.training.evaluation import evaluate

        with torch.no_grad():
            if (model_path / "adapter_config.json").is_file():
                from peft import AutoPeftModelForCausalLM

                import mope  # noqa: F401  (registers the MOPE PEFT type)

                model = AutoPeftModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            return evaluate(self.accelerator.prepare(model), self.loader, self.accelerator)
