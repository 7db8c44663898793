"""Fine-tune a dense model, an upcycled MoE, a MoPE or LoRA adapter with Accelerate; resumable.

    accelerate launch recipes/finetune.py recipes/configs/upcycle_sft.yaml
    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/finetune.py \\
        recipes/configs/mope_sft.yaml --override train.lr=1e-4
    accelerate launch recipes/finetune.py CONFIG --resume            # continue from the latest checkpoint

The script reads top to bottom: 1. setup (config, checks, Accelerator), 2. model, 3. data,
4. optimizer and schedule, 5. resume, 6. train loop with evaluation and checkpoints, 7. save.
Every reusable piece lives in `upcycle.training`; a config key is documented in
`upcycle/training/config.py` and the YAML files under recipes/configs/.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from upcycle.errors import UpcycleError
from upcycle.training.checkpoints import (
    FINAL,
    LOG_FILE,
    MetricsLog,
    check_fresh_output,
    clear_output,
    find_resume_checkpoint,
    next_checkpoint_index,
    read_state,
    remove_incomplete_checkpoints,
    save_checkpoint,
    write_json_atomic,
)
from upcycle.training.config import ConfigError, load_config
from upcycle.training.data import (
    EpochShuffleSampler,
    PadCollator,
    build_datasets,
    check_data_sources,
    count_target_tokens,
)
from upcycle.training.evaluation import evaluate
from upcycle.training.loss import router_aux_terms, token_loss_sum
from upcycle.training.metrics import RouterMetrics, mope_router_layers, native_router_layers
from upcycle.training.model import (
    apply_mode,
    check_mode_fits,
    load_model,
    load_tokenizer,
    mark_zero3_leaf_modules,
    model_facts,
    optimizer_groups,
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


def train(args: argparse.Namespace) -> None:
    """Run the recipe the parsed command line describes.

    Raises:
        UpcycleError: a config, data or model problem (before training where it can be detected).
    """
    # 1. Setup: every check that can fail runs before any model is loaded or step is taken. -----
    config = load_config(args.config, args.override)
    check_data_sources(config.data)
    facts = model_facts(config)
    check_mode_fits(config, facts)
    check_push_token(config.output.push_to_hub)
    output_dir = Path(config.output.dir)
    resume_from = find_resume_checkpoint(output_dir, args.resume) if args.resume else None
    if resume_from is None:
        check_fresh_output(output_dir, config.output.overwrite)
    is_mope = config.model.mode == "mope"
    routed = facts.is_moe or is_mope
    ga_steps = config.train.gradient_accumulation_steps

    accelerator = Accelerator(
        # Gradient sync is decided by the step count alone: the loop fetches the micro-batches of a
        # step before running them (to count the step's target tokens), which would make
        # Accelerate's end-of-dataloader sync fire on the wrong micro-batch.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=ga_steps, sync_with_dataloader=False),
        mixed_precision=config.train.mixed_precision,
        log_with=config.logging.report_to or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=str(output_dir / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=config.checkpoint.total_limit,
        ),
    )
    set_seed(config.train.seed)
    if accelerator.is_main_process:
        if resume_from is None and config.output.overwrite:
            clear_output(output_dir)
        removed = remove_incomplete_checkpoints(output_dir)
        if removed:
            accelerator.print(f"removed {len(removed)} incomplete checkpoint(s) left by a killed save")
    accelerator.wait_for_everyone()

    # 2. Model: converted on the fly if asked (by the main process; the others load its output). --
    source = config.model.path
    if config.model.upcycle is not None:
        source = output_dir / "upcycled"
        if accelerator.is_main_process:
            upcycle_model(config, source, reuse=resume_from is not None)
        accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(config, source)
    model = apply_mode(load_model(config, source), config)
    trainable, total = parameter_counts(model)
    accelerator.print(
        f"model {source} ({facts.model_type}, mode {config.model.mode}): "
        f"{trainable:,} trainable of {total:,} parameters"
    )

    # 3. Data: tokenized once on the main process (datasets caches it), batched in a seeded order. --
    with accelerator.main_process_first():
        train_set, eval_set = build_datasets(config.data, tokenizer, config.train.seed)
    collate = PadCollator(tokenizer.pad_token_id)
    train_loader = DataLoader(
        train_set,
        batch_size=config.train.per_device_batch_size,
        sampler=EpochShuffleSampler(len(train_set), config.train.seed),
        collate_fn=collate,
        drop_last=True,
    )
    eval_loader = None
    if eval_set is not None:
        if config.eval.max_examples:
            eval_set = eval_set.select(range(min(config.eval.max_examples, len(eval_set))))
        eval_batch_size = config.eval.batch_size or config.train.per_device_batch_size
        eval_loader = DataLoader(eval_set, batch_size=eval_batch_size, collate_fn=collate)

    # 4. Optimizer and schedule, in optimizer steps. ------------------------------------------
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, config.train.weight_decay),
        lr=config.train.lr,
        betas=(config.train.adam_beta1, config.train.adam_beta2),
        eps=config.train.adam_epsilon,
    )
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None and deepspeed.zero_stage == 3:
        accelerator.print(f"ZeRO-3 leaf modules: {[cls.__name__ for cls in mark_zero3_leaf_modules(model)]}")
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = len(train_loader) // ga_steps
    if steps_per_epoch == 0:
        global_batch = config.train.per_device_batch_size * accelerator.num_processes * ga_steps
        raise ConfigError(
            f"data.train: {len(train_set)} examples make less than one optimizer step of {global_batch} "
            "(per_device_batch_size x processes x gradient_accumulation_steps); add data or lower them"
        )
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
    warmup_steps = config.train.warmup_steps or math.ceil(config.train.warmup_ratio * total_steps)
    # Accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler(
        config.train.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    scheduler = accelerator.prepare(scheduler)
    if config.logging.report_to:
        accelerator.init_trackers(
            config.logging.project,
            config=tracker_config(config.to_dict()),
            init_kwargs={"wandb": {"name": config.logging.run_name}} if config.logging.run_name else {},
        )

    # 5. Resume: model, optimizer, scheduler and RNG states from the checkpoint; data by skipping. --
    start_step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        start_step = read_state(resume_from)["step"]
        accelerator.project_configuration.iteration = next_checkpoint_index(output_dir)
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    log = MetricsLog(output_dir / LOG_FILE, accelerator.is_main_process, start_step if resume_from else None)
    if accelerator.is_main_process:
        run_facts = {
            "processes": accelerator.num_processes,
            "global_batch_size": config.train.per_device_batch_size * accelerator.num_processes * ga_steps,
            "steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "resumed_from": str(resume_from) if resume_from else None,
        }
        write_json_atomic(output_dir / "run.json", run_facts)

    # 6. Train. ----------------------------------------------------------------------------------
    unwrapped = accelerator.unwrap_model(model)
    router_metrics = RouterMetrics(config.moe.capacity_factor) if routed and config.logging.router_metrics else None
    top_k = getattr(unwrapped.config, "num_experts_per_tok", 1)
    step_batches = batches_by_step(accelerator, train_loader, ga_steps, steps_per_epoch, start_step)
    progress = tqdm(total=total_steps, initial=start_step, desc="train", disable=not accelerator.is_local_main_process)
    if eval_loader is not None and config.eval.at_start and start_step == 0:
        report_eval(accelerator, log, 0, evaluate(model, eval_loader, accelerator))
    interval_tokens, interval_start = 0.0, time.perf_counter()
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        micro_batches = next(step_batches)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses; scheduler.step() moves to the next
        # Each micro-batch's loss sum is divided by the target-token count of the whole global
        # batch; x processes x GA undoes DDP's gradient mean and `backward`'s division by GA.
        target_tokens = accelerator.reduce(
            torch.tensor(sum(count_target_tokens(b["labels"]) for b in micro_batches), device=accelerator.device),
            "sum",
        ).clamp(min=1)
        lm_scale = accelerator.num_processes * ga_steps / target_tokens
        lm_sum, aux_sum, aux_parts, input_tokens, grad_norm = 0.0, 0.0, {}, 0.0, None
        for batch in micro_batches:
            with accelerator.accumulate(model):
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                token_loss = token_loss_sum(outputs.logits, batch["labels"])
                aux = router_aux_terms(unwrapped, outputs, batch["attention_mask"], config.moe.z_loss_coef, is_mope)
                accelerator.backward(token_loss * lm_scale + aux.total)
                if accelerator.sync_gradients and config.train.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            lm_sum += float(token_loss.detach())
            aux_sum += float(aux.total.detach())
            for name, value in aux.parts.items():
                aux_parts[name] = aux_parts.get(name, 0.0) + value
            input_tokens += float(batch["attention_mask"].sum())
            if router_metrics is not None:
                layers = mope_router_layers(unwrapped) if is_mope else native_router_layers(outputs, top_k)
                for name, logits, indices in layers:
                    router_metrics.update(name, logits, indices, batch["attention_mask"])
        local = [lm_sum, aux_sum, input_tokens, *aux_parts.values()]
        totals = accelerator.reduce(torch.tensor(local, device=accelerator.device, dtype=torch.float64), "sum").tolist()
        micro_steps = ga_steps * accelerator.num_processes
        lm_loss, aux_loss = totals[0] / float(target_tokens), totals[1] / micro_steps
        interval_tokens += totals[2]
        progress.update(1)

        if step % config.logging.every_steps == 0 or step == total_steps:
            elapsed = time.perf_counter() - interval_start
            record = {
                "step": step,
                "loss": lm_loss + aux_loss,
                "lm_loss": lm_loss,
                "aux_loss": aux_loss,
                **{name: value / micro_steps for name, value in zip(aux_parts, totals[3:], strict=True)},
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": interval_tokens / max(elapsed, 1e-9),
            }
            if router_metrics is not None:
                packed = router_metrics.packed()
                record.update(router_metrics.summary(accelerator.reduce(packed, "sum") if packed is not None else None))
            log.write(record)
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step" and v is not None}, step=step)
            progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            interval_tokens, interval_start = 0.0, time.perf_counter()

        if eval_loader is not None and config.eval.every_steps and step % config.eval.every_steps == 0:
            report_eval(accelerator, log, step, evaluate(model, eval_loader, accelerator))
        if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step < total_steps:
            save_checkpoint(accelerator, output_dir, {"step": step, "epoch": (step - 1) // steps_per_epoch})
    progress.close()

    # 7. Evaluate and save. -----------------------------------------------------------------------
    if eval_loader is not None and not (config.eval.every_steps and total_steps % config.eval.every_steps == 0):
        report_eval(accelerator, log, total_steps, evaluate(model, eval_loader, accelerator))
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


def batches_by_step(accelerator, loader, ga_steps: int, steps_per_epoch: int, start_step: int):
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


def report_eval(accelerator, log: MetricsLog, step: int, metrics: dict) -> None:
    """Write eval metrics to the log, the trackers and the console."""
    log.write({"step": step, **metrics})
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_local_main_process:
        tqdm.write(f"step {step}: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}")


def tracker_config(values: dict, prefix: str = "") -> dict:
    """Flatten the config for trackers, which take scalar hyperparameters only."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(tracker_config(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user mistake prints ``finetune: error: <key>: ...`` on one line and exits 2."""
    args = parse_args(argv)
    try:
        train(args)
    except UpcycleError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
