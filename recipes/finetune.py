"""Fine-tune a dense model, an upcycled MoE, a MoPE or LoRA adapter with Accelerate; resumable.

    accelerate launch recipes/finetune.py recipes/configs/upcycle_sft.yaml
    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/finetune.py \\
        recipes/configs/mope_sft.yaml --override train.lr=1e-4
    accelerate launch recipes/finetune.py CONFIG --resume            # continue from the latest checkpoint

`train` reads top to bottom, one named step per stage, each defined below it in that order:
1. `setup` (config, checks, Accelerator), 2. `build_model`, 3. `build_data`, 4. `build_optimizer`
(and schedule), 5. `resume`, 6. the loop itself (one `TrainStep` per optimizer step, then logging,
evaluation and checkpoints), 7. `save`. Every reusable piece lives in `upcycle.training` (the loop's
in `upcycle.training.loop`); a config key is documented in `upcycle/training/config.py` and the YAML
files under recipes/configs/.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from upcycle.errors import UpcycleError
from upcycle.training.checkpoints import (
    FINAL,
    LOG_FILE,
    MetricsLog,
    check_fresh_output,
    find_resume_checkpoint,
    next_checkpoint_index,
    read_state,
    save_checkpoint,
    write_json_atomic,
)
from upcycle.training.config import RecipeConfig, load_config
from upcycle.training.data import build_datasets, check_data_sources
from upcycle.training.evaluation import evaluate
from upcycle.training.loop import (
    StepPlan,
    Throughput,
    TrainStep,
    batches_by_step,
    log_train_record,
    make_accelerator,
    make_loaders,
    make_optimizer,
    make_scheduler,
    plan_steps,
    prepare_output_dir,
    progress_bar,
    report_eval,
    step_record,
    tracker_config,
)
from upcycle.training.metrics import RouterMetrics
from upcycle.training.model import (
    ModelFacts,
    apply_mode,
    check_mode_fits,
    load_model,
    load_tokenizer,
    mark_zero3_leaf_modules,
    model_facts,
    parameter_counts,
    upcycle_model,
)
from upcycle.training.save import check_push_token, export_mope_to_moe, merge_to_dense, push_final, save_final


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the command line: the config path, ``--override`` items and ``--resume``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="recipe YAML (recipes/configs/*.yaml)")
    parser.add_argument(
        "--override", "-o", action="append", default=[], metavar="KEY=VALUE", help="e.g. train.lr=1e-4 (repeatable)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest complete checkpoint in output.dir (or this checkpoint folder)",
    )
    return parser.parse_args(argv)


@dataclass
class Run:
    """What every step of the recipe shares: the validated config, the Accelerator, where the run
    writes, the checkpoint it resumes from (or None) and the facts about the model it trains."""

    config: RecipeConfig
    accelerator: Any
    output_dir: Path
    resume_from: Path | None
    facts: ModelFacts


def train(args: argparse.Namespace) -> None:
    """Run the recipe the parsed command line describes.

    Raises:
        UpcycleError: a config, data or model problem (before training where it can be detected).
    """
    run = setup(args)
    config, accelerator = run.config, run.accelerator
    model, tokenizer, trainable, total = build_model(run)
    train_loader, eval_loader, train_examples = build_data(run, tokenizer)
    model, optimizer, scheduler, train_loader, eval_loader, plan = build_optimizer(
        run, model, train_loader, eval_loader, train_examples
    )
    start_step, log = resume(run, plan, trainable, total)

    # 6. Train: one optimizer step per global batch, then logging, evaluation and checkpoints. --
    routed = run.facts.is_moe or config.model.mode == "mope"
    router_metrics = RouterMetrics(config.moe.capacity_factor) if routed and config.logging.router_metrics else None
    train_step = TrainStep(accelerator, model, optimizer, scheduler, config, router_metrics)
    ga_steps = config.train.gradient_accumulation_steps
    step_batches = batches_by_step(accelerator, train_loader, ga_steps, plan.steps_per_epoch, start_step)
    progress = progress_bar(plan.total_steps, start_step, accelerator.is_local_main_process)
    if eval_loader is not None and config.eval.at_start and start_step == 0:
        report_eval(accelerator, log, 0, evaluate(model, eval_loader, accelerator))
    throughput = Throughput()
    model.train()
    for step in range(start_step + 1, plan.total_steps + 1):
        result = train_step(next(step_batches))
        throughput.add(result.input_tokens)
        progress.update(1)
        if step % config.logging.every_steps == 0 or step == plan.total_steps:
            record = step_record(accelerator, step, result, throughput.rate(), router_metrics)
            log_train_record(accelerator, log, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if eval_loader is not None and config.eval.every_steps and step % config.eval.every_steps == 0:
            report_eval(accelerator, log, step, evaluate(model, eval_loader, accelerator))
        if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step < plan.total_steps:
            save_checkpoint(accelerator, run.output_dir, {"step": step, "epoch": (step - 1) // plan.steps_per_epoch})
    progress.close()

    # 7. Evaluate and save. -----------------------------------------------------------------------
    if eval_loader is not None and not (config.eval.every_steps and plan.total_steps % config.eval.every_steps == 0):
        report_eval(accelerator, log, plan.total_steps, evaluate(model, eval_loader, accelerator))
    save(run, model, tokenizer)
    leave_distributed_run(accelerator)


def setup(args: argparse.Namespace) -> Run:
    """1. Setup: every check that can fail runs before any model is loaded or step is taken; then
    the Accelerator, the seed, and an output dir cleared of an overwritten run or a killed save.

    Raises:
        UpcycleError: a config, data, model or output.dir problem (one line naming the key).
    """
    config = load_config(args.config, args.override)
    check_data_sources(config.data)
    facts = model_facts(config)
    check_mode_fits(config, facts)
    check_push_token(config.output.push_to_hub)
    output_dir = Path(config.output.dir)
    resume_from = find_resume_checkpoint(output_dir, args.resume) if args.resume else None
    if resume_from is None:
        check_fresh_output(output_dir, config.output.overwrite)
    accelerator = make_accelerator(config, output_dir)
    set_seed(config.train.seed)
    prepare_output_dir(accelerator, output_dir, clear=resume_from is None and config.output.overwrite)
    if args.resume and resume_from is None:
        accelerator.print(f"--resume: no checkpoint found under output.dir {output_dir}; training starts from step 0")
    return Run(config, accelerator, output_dir, resume_from, facts)


def build_model(run: Run) -> tuple[nn.Module, Any, int, int]:
    """2. Model: converted on the fly if asked (by the main process; the others load its output),
    loaded, and set up for the training mode. Return the model, the tokenizer and the trainable
    and total parameter counts."""
    config, accelerator = run.config, run.accelerator
    source = config.model.path
    if config.model.upcycle is not None:
        source = run.output_dir / "upcycled"
        if accelerator.is_main_process:
            upcycle_model(config, source, reuse=run.resume_from is not None)
        accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(config, source)
    model = apply_mode(load_model(config, source), config)
    trainable, total = parameter_counts(model)
    accelerator.print(
        f"model {source} ({run.facts.model_type}, mode {config.model.mode}): "
        f"{trainable:,} trainable of {total:,} parameters"
    )
    return model, tokenizer, trainable, total


def build_data(run: Run, tokenizer: Any) -> tuple[DataLoader, DataLoader | None, int]:
    """3. Data: tokenized once on the main process (datasets caches it), batched in a seeded order.
    Return the train and eval loaders (None without an eval set) and the number of train examples."""
    with run.accelerator.main_process_first():
        train_set, eval_set = build_datasets(run.config.data, tokenizer, run.config.train.seed)
    train_loader, eval_loader = make_loaders(run.config, train_set, eval_set, tokenizer.pad_token_id)
    return train_loader, eval_loader, len(train_set)


def build_optimizer(
    run: Run, model: nn.Module, train_loader: DataLoader, eval_loader: DataLoader | None, train_examples: int
) -> tuple[nn.Module, Any, Any, Any, Any, StepPlan]:
    """4. Optimizer and schedule, in optimizer steps, everything prepared by Accelerate; trackers
    started. Return the prepared model, optimizer, scheduler, loaders and the `StepPlan`.

    Raises:
        ConfigError: the data make less than one optimizer step.
    """
    config, accelerator = run.config, run.accelerator
    optimizer = make_optimizer(model, config.train)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None and deepspeed.zero_stage == 3:
        accelerator.print(f"ZeRO-3 leaf modules: {[cls.__name__ for cls in mark_zero3_leaf_modules(model)]}")
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    plan = plan_steps(config, len(train_loader), accelerator.num_processes, train_examples)
    scheduler = accelerator.prepare(make_scheduler(config, optimizer, plan, accelerator.num_processes))
    if config.logging.report_to:
        accelerator.init_trackers(
            config.logging.project,
            config=tracker_config(config.to_dict()),
            init_kwargs={"wandb": {"name": config.logging.run_name}} if config.logging.run_name else {},
        )
    return model, optimizer, scheduler, train_loader, eval_loader, plan


def resume(run: Run, plan: StepPlan, trainable: int, total: int) -> tuple[int, MetricsLog]:
    """5. Resume: model, optimizer, scheduler and RNG states from the checkpoint (the data order
    resumes by skipping batches in `batches_by_step`); write run.json. Return the step to continue
    after (0 for a fresh run) and the metrics log (cut back to that step)."""
    accelerator, resume_from = run.accelerator, run.resume_from
    start_step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        start_step = read_state(resume_from)["step"]
        accelerator.project_configuration.iteration = next_checkpoint_index(run.output_dir)
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    log = MetricsLog(run.output_dir / LOG_FILE, accelerator.is_main_process, start_step if resume_from else None)
    if accelerator.is_main_process:
        run_facts = {
            "processes": accelerator.num_processes,
            "global_batch_size": plan.global_batch_size,
            "steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "resumed_from": str(resume_from) if resume_from else None,
        }
        write_json_atomic(run.output_dir / "run.json", run_facts)
    return start_step, log


def save(run: Run, model: nn.Module, tokenizer: Any) -> None:
    """7. Save the final model, export it (MoPE -> MoE, or MoE -> dense) and push it if asked.

    Raises:
        UpcycleError: a failed export, merge or push (the final model is saved by then).
    """
    config, accelerator, output_dir = run.config, run.accelerator, run.output_dir
    final = save_final(accelerator, model, tokenizer, output_dir / FINAL, config.to_dict())
    accelerator.print(f"saved {final}")
    if config.output.export == "moe":
        accelerator.print(f"exported {export_mope_to_moe(accelerator, model, tokenizer, output_dir / f'{FINAL}-moe')}")
    if config.output.export == "dense":
        accelerator.print(
            f"merged {merge_to_dense(accelerator, final, output_dir / f'{FINAL}-dense', config.output.merge)}"
        )
    if config.output.push_to_hub:
        pushed = final if config.output.export == "none" else output_dir / f"{FINAL}-{config.output.export}"
        accelerator.print(f"pushed {push_final(accelerator, pushed, config.output.push_to_hub, config.output.private)}")
    accelerator.end_training()


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user mistake prints ``finetune: error: <key>: ...`` on one line and exits 2."""
    args = parse_args(argv)
    try:
        train(args)
    except UpcycleError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        sys.exit(2)


def leave_distributed_run(accelerator: Any) -> None:
    """End a worker of a multi-process run with ``os._exit(0)``; return at once in a single process.

    Called last in `train`, while its frame still holds the DDP model: ``end_training`` has closed
    the trackers and destroyed the process group, and what was left was freeing DDP's reducer and
    the gloo group it still references when `train` returns. That teardown deadlocked one rank in
    about one `tests/test_recipes.py` run in ten on 2 cores (py-spy: rank 0 blocked on `train`'s
    return with its output saved, rank 1 gone; pytorch#56297). Every file is written and closed
    by then, so there is nothing for the interpreter's teardown to do.
    """
    if accelerator.num_processes > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
