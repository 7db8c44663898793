"""The training loop's components: the Accelerator, loaders, optimizer and schedule, the batches of
each optimizer step, one optimizer step, the logged records and the progress bar.

`recipes/finetune.py` strings these together; each piece here does one thing the recipe would
otherwise spell out inline, with the numerics unchanged (the recipe tests compare losses and
weights of resumed and DDP runs against an uninterrupted single-process run).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from upcycle.families.moe_fields import biased_routers
from upcycle.training.balancing import RoutingCapture, balance_selection_biases
from upcycle.training.checkpoints import MetricsLog, clear_output, remove_incomplete_checkpoints
from upcycle.training.config import ConfigError, RecipeConfig, TrainSection
from upcycle.training.data import EpochShuffleSampler, PadCollator, count_target_tokens
from upcycle.training.loss import router_aux_terms, token_loss_sum
from upcycle.training.metrics import RouterMetrics, mope_router_layers, native_router_layers
from upcycle.training.model import optimizer_groups


def make_accelerator(config: RecipeConfig, output_dir: Path) -> Any:
    """Return the `accelerate.Accelerator` of a run: gradient accumulation, mixed precision,
    trackers, and numbered checkpoints under ``output_dir/checkpoints`` (``total_limit`` kept)."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    return Accelerator(
        # Gradient sync is decided by the step count alone: the loop fetches the micro-batches of a
        # step before running them (to count the step's target tokens), which would make
        # Accelerate's end-of-dataloader sync fire on the wrong micro-batch.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.train.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        mixed_precision=config.train.mixed_precision,
        log_with=config.logging.report_to or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=str(output_dir / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=config.checkpoint.total_limit,
        ),
    )


def prepare_output_dir(accelerator: Any, output_dir: Path, clear: bool) -> None:
    """On the main process, remove an earlier run (when `clear`: a fresh run with
    ``output.overwrite``) and the checkpoints a killed save left incomplete, and create `output_dir`
    (a run resumed from another run's checkpoint writes to a new one); every process waits."""
    if accelerator.is_main_process:
        if clear:
            clear_output(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_incomplete_checkpoints(output_dir)
        if removed:
            accelerator.print(f"removed {len(removed)} incomplete checkpoint(s) left by a killed save")
    accelerator.wait_for_everyone()


def make_loaders(
    config: RecipeConfig, train_set: Any, eval_set: Any | None, pad_token_id: int
) -> tuple[DataLoader, DataLoader | None]:
    """Return the train loader (seeded `EpochShuffleSampler`, whole batches only) and the eval
    loader (``eval.max_examples`` of the eval set, ``eval.batch_size``), or None without an eval set."""
    collate = PadCollator(pad_token_id)
    train_loader = DataLoader(
        train_set,
        batch_size=config.train.per_device_batch_size,
        sampler=EpochShuffleSampler(len(train_set), config.train.seed),
        collate_fn=collate,
        drop_last=True,
    )
    if eval_set is None:
        return train_loader, None
    if config.eval.max_examples:
        eval_set = eval_set.select(range(min(config.eval.max_examples, len(eval_set))))
    eval_batch_size = config.eval.batch_size or config.train.per_device_batch_size
    return train_loader, DataLoader(eval_set, batch_size=eval_batch_size, collate_fn=collate)


def make_optimizer(model: nn.Module, train: TrainSection) -> torch.optim.AdamW:
    """Return AdamW over `model`'s trainable parameters (no weight decay on biases and norms)."""
    return torch.optim.AdamW(
        optimizer_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
    )


@dataclass(frozen=True)
class StepPlan:
    """The length of a run in optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    global_batch_size: int


def plan_steps(config: RecipeConfig, batches_per_process: int, num_processes: int, examples: int) -> StepPlan:
    """Return the run's `StepPlan` from the prepared train loader's length (batches per process).

    Raises:
        ConfigError: naming ``data.train``, when the data make less than one optimizer step.
    """
    ga_steps = config.train.gradient_accumulation_steps
    global_batch = config.train.per_device_batch_size * num_processes * ga_steps
    steps_per_epoch = batches_per_process // ga_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.train: {examples} examples make less than one optimizer step of {global_batch} "
            "(per_device_batch_size x processes x gradient_accumulation_steps); add data or lower them"
        )
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
    warmup_steps = config.train.warmup_steps or math.ceil(config.train.warmup_ratio * total_steps)
    return StepPlan(steps_per_epoch, total_steps, warmup_steps, global_batch)


def make_scheduler(config: RecipeConfig, optimizer: torch.optim.Optimizer, plan: StepPlan, num_processes: int) -> Any:
    """Return the transformers learning-rate schedule of ``train.lr_scheduler`` over the plan.

    Accelerate steps a prepared scheduler once per process per optimizer step, so the warmup and
    total lengths are multiplied by `num_processes`.
    """
    from transformers import get_scheduler

    return get_scheduler(
        config.train.lr_scheduler,
        optimizer,
        num_warmup_steps=plan.warmup_steps * num_processes,
        num_training_steps=plan.total_steps * num_processes,
    )


def batches_by_step(
    accelerator: Any, loader: Any, ga_steps: int, steps_per_epoch: int, start_step: int
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Yield the `ga_steps` micro-batches of each optimizer step, from `start_step` on, epoch after
    epoch; a resumed epoch skips the batches already trained (`skip_first_batches`). The tail of an
    epoch too short for a whole step is dropped; the next epoch reshuffles."""
    epoch, done = divmod(start_step, steps_per_epoch)
    while True:
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, done * ga_steps) if done else loader
        batches = iter(epoch_loader)
        for _ in range(steps_per_epoch - done):
            yield [next(batches) for _ in range(ga_steps)]
        epoch, done = epoch + 1, 0


@dataclass
class StepResult:
    """One optimizer step, summed over processes: the losses, the mean of each router term per
    micro-batch, the input (non-padding) tokens, the gradient norm before clipping (or None) and
    the loss-free balancing metrics (`balance_selection_biases`; empty when it is off)."""

    lr: float
    lm_loss: float
    aux_loss: float
    aux_parts: dict[str, float] = field(default_factory=dict)
    input_tokens: float = 0.0
    grad_norm: Any = None
    balance: dict[str, float] = field(default_factory=dict)


class TrainStep:
    """One optimizer step over the micro-batches of a global batch (``__call__``).

    Each micro-batch's token-loss sum is divided by the target-token count of the whole global
    batch; x processes x GA undoes DDP's gradient mean and `backward`'s division by GA, so a step is
    the same for any split of the global batch (`upcycle.training.loss`). Router aux terms are added
    as the model (or `mope`) gives them, and router metrics accumulate per micro-batch.

    Models with DeepSeek-V3-style routers (an ``e_score_correction_bias`` buffer, e.g. glm4_moe) have
    their routing recorded by hooks (`upcycle.training.balancing`): the router metrics then count
    the experts actually chosen (the bias and group limit included), and with
    ``moe.bias_update_rate`` > 0 the biases move after each optimizer step.

    Raises:
        ConfigError: ``moe.bias_update_rate`` > 0 and the model has no such router.
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        config: RecipeConfig,
        router_metrics: RouterMetrics | None,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.router_metrics = router_metrics
        self.unwrapped = accelerator.unwrap_model(model)
        self.top_k = getattr(self.unwrapped.config, "num_experts_per_tok", 1)
        self.is_mope = config.model.mode == "mope"
        self.z_loss_coef = config.moe.z_loss_coef
        self.max_grad_norm = config.train.max_grad_norm
        self.ga_steps = config.train.gradient_accumulation_steps
        self.bias_update_rate = config.moe.bias_update_rate
        routers = biased_routers(self.unwrapped)
        if self.bias_update_rate > 0 and not routers:
            raise ConfigError(
                f"moe.bias_update_rate: {type(self.unwrapped).__name__} has no router owning an "
                "e_score_correction_bias buffer (DeepSeek-V3-style, e.g. glm4_moe); set it to 0"
            )
        self.capture = None
        if routers and (self.bias_update_rate > 0 or router_metrics is not None):
            self.capture = RoutingCapture(routers, router_metrics is not None, self.bias_update_rate > 0)

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """Run forward, backward and the optimizer over `micro_batches`; return the `StepResult`."""
        accelerator, model = self.accelerator, self.model
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses; scheduler.step() moves to the next
        target_tokens = accelerator.reduce(
            torch.tensor(sum(count_target_tokens(b["labels"]) for b in micro_batches), device=accelerator.device),
            "sum",
        ).clamp(min=1)
        lm_scale = accelerator.num_processes * self.ga_steps / target_tokens
        lm_sum, aux_sum, aux_parts, input_tokens, grad_norm = 0.0, 0.0, {}, 0.0, None
        for batch in micro_batches:
            with accelerator.accumulate(model):
                with self._recording(batch["attention_mask"]):
                    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                token_loss = token_loss_sum(outputs.logits, batch["labels"])
                aux = router_aux_terms(self.unwrapped, outputs, batch["attention_mask"], self.z_loss_coef, self.is_mope)
                accelerator.backward(token_loss * lm_scale + aux.total)
                if accelerator.sync_gradients and self.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            lm_sum += float(token_loss.detach())
            aux_sum += float(aux.total.detach())
            for name, value in aux.parts.items():
                aux_parts[name] = aux_parts.get(name, 0.0) + value
            input_tokens += float(batch["attention_mask"].sum())
            self._update_router_metrics(outputs, batch["attention_mask"])
        balance = {}
        if self.bias_update_rate > 0:
            balance = balance_selection_biases(accelerator, self.capture, self.bias_update_rate, accelerator.device)
        local = [lm_sum, aux_sum, input_tokens, *aux_parts.values()]
        totals = accelerator.reduce(torch.tensor(local, device=accelerator.device, dtype=torch.float64), "sum").tolist()
        micro_steps = self.ga_steps * accelerator.num_processes
        return StepResult(
            lr=lr,
            lm_loss=totals[0] / float(target_tokens),
            aux_loss=totals[1] / micro_steps,
            aux_parts={name: value / micro_steps for name, value in zip(aux_parts, totals[3:], strict=True)},
            input_tokens=totals[2],
            grad_norm=grad_norm,
            balance=balance,
        )

    def _recording(self, attention_mask: torch.Tensor) -> Any:
        return nullcontext() if self.capture is None else self.capture.recording(attention_mask)

    def _update_router_metrics(self, outputs: Any, attention_mask: torch.Tensor) -> None:
        if self.router_metrics is None:
            return
        if self.is_mope:
            layers = mope_router_layers(self.unwrapped)
        elif self.capture is not None:
            layers = self.capture.routed_layers()
        else:
            layers = native_router_layers(outputs, self.top_k)
        for name, logits, indices in layers:
            self.router_metrics.update(name, logits, indices, attention_mask)


class Throughput:
    """Input tokens per second over a logging interval."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.start = time.perf_counter()

    def add(self, tokens: float) -> None:
        """Count `tokens` more input tokens in this interval."""
        self.tokens += tokens

    def rate(self) -> float:
        """Return the tokens per second since the interval began, and begin the next interval."""
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / max(elapsed, 1e-9)
        self.tokens, self.start = 0.0, time.perf_counter()
        return rate


def step_record(
    accelerator: Any, step: int, result: StepResult, tokens_per_s: float, router_metrics: RouterMetrics | None
) -> dict[str, Any]:
    """Return the logged record of `step`: losses, router terms, lr, gradient norm, throughput and
    the interval's router metrics (summed across processes; every process must call this)."""
    record = {
        "step": step,
        "loss": result.lm_loss + result.aux_loss,
        "lm_loss": result.lm_loss,
        "aux_loss": result.aux_loss,
        **result.aux_parts,
        "lr": result.lr,
        "grad_norm": float(result.grad_norm) if result.grad_norm is not None else None,
        "tokens_per_s": tokens_per_s,
        **result.balance,
    }
    if router_metrics is not None:
        packed = router_metrics.packed()
        record.update(router_metrics.summary(accelerator.reduce(packed, "sum") if packed is not None else None))
    return record


def log_train_record(accelerator: Any, log: MetricsLog, record: dict[str, Any]) -> None:
    """Write a training record to the metrics log and the trackers (under ``train/``)."""
    log.write(record)
    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])


def report_eval(accelerator: Any, log: MetricsLog, step: int, metrics: dict[str, float]) -> None:
    """Write eval metrics to the log, the trackers and the console."""
    from tqdm.auto import tqdm

    log.write({"step": step, **metrics})
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_local_main_process:
        tqdm.write(f"step {step}: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}")


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """Return the training progress bar, shown on the local main process only.

    tqdm reads ``TQDM_DISABLE`` (and every ``TQDM_*`` setting) as the default of its keyword
    arguments, so an explicit ``disable=`` would override it: the keyword is passed only to turn
    the bar off on the other processes.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", **({} if enabled else {"disable": True}))


def tracker_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return the config flattened for trackers, which take scalar hyperparameters only: nested
    keys joined with dots, non-scalars as strings."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(tracker_config(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
