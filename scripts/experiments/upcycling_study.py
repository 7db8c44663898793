"""Does upcycling pay off? Dense continuation vs copy / Drop- / granular upcycling vs MoPE vs merged-back.

    python scripts/experiments/upcycling_study.py            # the committed study (~30 min on 2 cores)
    python scripts/experiments/upcycling_study.py --quick    # a smoke run of every step (~1-2 min)
    python scripts/experiments/upcycling_study.py --rewrite-report   # the report again from its JSON, no training
    python scripts/experiments/upcycling_study.py --add --methods glm4-lossfree   # one more row, the rest kept

1. Corpus: the Python standard library's sources, split by file into pretrain / continue / held-out.
2. A byte-level BPE tokenizer trained on the two training splits; a small dense Llama pretrained
   on the pretrain split through the recipe (`recipes/finetune.py`).
3. From that checkpoint, every method continues on the continue split with the same schedule,
   token budget and data order (per seed): dense; `upcycle convert --method copy|drop|granular`;
   MoPE on the dense model (`model.mode: mope`); the trained copy-upcycled MoE merged back to dense
   with `upcycle merge` (the method picked on training text, not on the held-out split); a glm4_moe
   (DeepSeek-V3 routing: fine-grained granular experts, a shared expert, grouped sigmoid router)
   trained with auxiliary-loss-free balancing (`moe.bias_update_rate`) instead of an aux loss; and
   a dense run given as many training FLOPs as the upcycled MoEs (more tokens).
4. Held-out loss after equal tokens and after equal training FLOPs (study_flops.py says how they
   are counted), over every seed, written to docs/results/ as a markdown table and PNG plots.

`--add` runs only the methods named and adds their rows to the existing results JSON: pretraining
(seed 0, same corpus) is rerun first and must reproduce the recorded pretrained held-out loss
within `--pretrain-tolerance` (bit for bit only while the training code is unchanged).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# OpenMP threads that spin while waiting make every torch op crawl when the cores are shared
# (measured: a 4-layer h64 Llama step took 18 s with 2 spinning threads, 0.2 s passive); it must be
# set before torch loads OpenMP; the recipe subprocesses inherit it. Results do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from study_data import train_tokenizer, write_corpus  # noqa: E402
from study_flops import checkpoint_parameters  # noqa: E402
from study_report import RESULTS, Curve, write_report  # noqa: E402
from study_runs import REPO, Evaluator, run_cli, run_recipe  # noqa: E402

UPCYCLED = ("copy", "drop", "granular", "glm4-lossfree")
# By default, reproduced pretraining must match the recorded held-out loss this closely for --add to go on.
PRETRAIN_TOLERANCE = 1e-5


@dataclass(frozen=True)
class StudySettings:
    """Every size, budget and hyperparameter of one study (the defaults are the committed study)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    seq_len: int = 128
    batch_size: int = 32
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    continue_steps: int = 300
    continue_lr: float = 1e-3
    warmup_steps: int = 5
    eval_every: int = 20
    eval_batches: int = 8
    seeds: tuple[int, ...] = (1, 2)
    experts: int = 8
    top_k: int = 2
    drop_ratio: float = 0.5
    granularity: int = 2
    aux_loss_coef: float = 0.01
    # glm4-lossfree: 16 FFN copies at granularity 2 with 1 shared shard, so 16 routed experts half
    # the FFN wide (granular's count and width) plus one always-on shared expert as wide; top-3
    # routed + shared = 4 half-FFN experts a token, granular's top-4 (equal active parameters).
    # 4 groups of 4 experts, the best 2 groups eligible (DeepSeek-V3's half). No aux loss: the
    # selection biases move by bias_update_rate a step (the report's discussion says why 0.01).
    glm4: dict = field(
        default_factory=lambda: {
            "experts": 16,
            "top_k": 3,
            "granularity": 2,
            "shared_experts": 1,
            "expert_groups": 4,
            "top_groups": 2,
            "routed_scaling": 1.0,
            "bias_update_rate": 0.01,
        }
    )
    mope: dict = field(
        default_factory=lambda: {
            "num_experts": 8,
            "top_k": 2,
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["gate_proj", "up_proj", "down_proj"],
        }
    )
    merge_methods: tuple[str, ...] = ("average", "frequency", "task-arithmetic", "ties", "dare")
    selection_documents: int = 16
    max_characters: dict | None = None

    def tokens_per_step(self) -> int:
        """Return the tokens one optimizer step trains on (packed blocks, no padding)."""
        return self.batch_size * self.seq_len


QUICK = StudySettings(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=64,
    layers=2,
    heads=2,
    kv_heads=2,
    seq_len=64,
    batch_size=8,
    pretrain_steps=12,
    continue_steps=6,
    warmup_steps=1,
    eval_every=3,
    eval_batches=2,
    seeds=(1,),
    merge_methods=("average", "frequency"),
    selection_documents=4,
    max_characters={"pretrain": 150_000, "continue": 150_000, "heldout": 40_000},
)


def recipe_config(settings: StudySettings, corpus) -> dict:
    """Return the recipe YAML (as data) every training run of the study shares; runs differ only by overrides."""
    return {
        "model": {"path": "", "mode": "full", "dtype": "float32"},
        "data": {
            "train": str(corpus.files["continue"]),
            "eval": str(corpus.files["heldout"]),
            "format": "text",
            "seq_len": settings.seq_len,
            "packing": True,
        },
        "train": {
            "seed": settings.seeds[0],
            "lr": settings.continue_lr,
            "weight_decay": 0.1,
            "lr_scheduler": "constant_with_warmup",
            "warmup_steps": settings.warmup_steps,
            "max_steps": settings.continue_steps,
            "per_device_batch_size": settings.batch_size,
            "max_grad_norm": 1.0,
        },
        "eval": {
            "every_steps": settings.eval_every,
            "at_start": True,
            "max_examples": settings.eval_batches * settings.batch_size,
        },
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": settings.eval_every, "report_to": []},
        "output": {"dir": "", "overwrite": True},
    }


def write_recipe_config(path: Path, config: dict) -> None:
    """Write the shared recipe config, opening with the command that runs it (as recipes/configs/ do)."""
    import yaml

    header = (
        f"# python recipes/finetune.py {path} --override model.path=MODEL --override output.dir=OUT\n"
        "# Written by scripts/experiments/upcycling_study.py: the settings every run of the study shares.\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))


def build_dense_init(folder: Path, settings: StudySettings, tokenizer) -> Path:
    """Save a randomly initialised dense Llama (seed 0) with `tokenizer` under `folder` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=max(512, settings.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def curve_of(run, params, settings: StudySettings, init_loss: float | None, max_tokens: int | None = None) -> Curve:
    """Return the held-out loss curve of a recipe run against continuation tokens and FLOPs, up to
    `max_tokens` if given; `init_loss` is the step-0 point when the recipe did not evaluate at step 0.

    Raises:
        RuntimeError: `max_tokens` falls between two evaluations (the curve would end off its budget).
    """
    points = [(record["step"], record["eval_loss"]) for record in run.eval_records]
    if max_tokens is not None:
        steps = max_tokens // settings.tokens_per_step()
        if steps not in {step for step, _ in points}:
            raise RuntimeError(f"{run.output_dir} has no evaluation at step {steps}; make eval_every divide it")
        points = [(step, loss) for step, loss in points if step <= steps]
    if init_loss is not None and (not points or points[0][0] != 0):
        points.insert(0, (0, init_loss))
    steps = [step for step, _ in points]
    tokens = [step * settings.tokens_per_step() for step in steps]
    return Curve(
        tokens=tokens,
        flops=[params.training_flops(count) for count in tokens],
        losses=[loss for _, loss in points],
        eval_tokens=run.eval_records[-1]["eval_tokens"] if run.eval_records else 0,
    )


def available(methods: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """Return (the requested methods this checkout can run, a line for each one it cannot)."""
    from upcycle.cli import COMMANDS

    missing = []
    if "merged" in methods and "merge" not in COMMANDS:
        missing.append("merged: this checkout has no `upcycle merge` command")
    kept = tuple(method for method in methods if not (method == "merged" and "merge" not in COMMANDS))
    return kept, missing


def convert_argv(method: str, dense: Path, folder: Path, seed: int, settings: StudySettings) -> list[str]:
    """Return the `upcycle convert` arguments that upcycle `dense` into `folder` with `method`."""
    if method == "glm4-lossfree":
        glm4 = settings.glm4
        argv = ["convert", str(dense), str(folder), "--target", "glm4_moe", "--method", "granular"]
        argv += ["--granularity", str(glm4["granularity"]), "--granular-scaling", "down"]
        argv += ["--experts", str(glm4["experts"]), "--top-k", str(glm4["top_k"])]
        argv += ["--shared-experts", str(glm4["shared_experts"]), "--expert-groups", str(glm4["expert_groups"])]
        argv += ["--top-groups", str(glm4["top_groups"]), "--routed-scaling", str(glm4["routed_scaling"])]
        return [*argv, "--seed", str(seed), "--force", "--quiet"]
    argv = ["convert", str(dense), str(folder), "--experts", str(settings.experts), "--top-k", str(settings.top_k)]
    argv += ["--method", method, "--seed", str(seed), "--force", "--quiet"]
    if method == "drop":
        argv += ["--drop-ratio", str(settings.drop_ratio)]
    if method == "granular":
        argv += ["--granularity", str(settings.granularity)]
    return argv


def balancing_overrides(method: str, settings: StudySettings) -> list[str]:
    """Return the recipe overrides that balance `method`'s experts: the aux loss, or for glm4-lossfree
    no aux loss (glm4_moe has none), the selection-bias rate, and a log record every step (for the load CV)."""
    if method == "glm4-lossfree":
        return [
            "moe.aux_loss_coef=null",
            f"moe.bias_update_rate={settings.glm4['bias_update_rate']}",
            "logging.every_steps=1",
        ]
    return [f"moe.aux_loss_coef={settings.aux_loss_coef}"]


def load_balance(train_records: list[dict], window: int = 20) -> dict:
    """Return the loss-free balancing trace of a run: the per-step load CV (`moe/step_load_cv`, the
    step's expert-load coefficient of variation averaged over layers) at the first and last logged
    steps, its means over the first and last `window` steps, and the final selection-bias spread."""
    logged = [record for record in train_records if record.get("moe/step_load_cv") is not None]
    if not logged:
        return {}
    cvs = [record["moe/step_load_cv"] for record in logged]
    window = min(window, len(cvs))
    return {
        "first_step": logged[0]["step"],
        "first_cv": cvs[0],
        "last_step": logged[-1]["step"],
        "last_cv": cvs[-1],
        "window": window,
        "first_window_cv": sum(cvs[:window]) / window,
        "last_window_cv": sum(cvs[-window:]) / window,
        "final_bias_range": logged[-1].get("moe/bias_range"),
        "steps_logged": len(logged),
    }


def add_rows(base: dict, new: dict) -> dict:
    """Return `base` (a study's results) with the methods of `new` (an --add run of the same settings
    from rerun pretraining) added: their runs, parameter counts and balancing traces, and
    the run itself described under "additions" (command, commands, time, machine, code)."""
    merged, new = json.loads(json.dumps(base)), json.loads(json.dumps(new))  # deep copies, seed keys as in the file
    added = [method for method in new["methods"] if method not in merged["methods"]]
    merged["methods"] = [*merged["methods"], *added]
    merged["settings"] = {**merged["settings"], **new["settings"]}
    for key in ("parameters", "flops_per_token", "runs", "balancing"):
        merged.setdefault(key, {}).update({name: value for name, value in new[key].items() if name in added})
    described = ("study_command", "commands", "wall_seconds", "machine", "load_average", "git_revision")
    addition = {key: new[key] for key in described}
    addition.update(methods=added, dense_pretrained_loss=new["dense_pretrained_loss"])
    merged["additions"] = [*base.get("additions", []), addition]
    return merged


def run_study(
    settings: StudySettings,
    work: Path,
    out_dir: Path,
    methods: tuple[str, ...],
    study_argv: list[str],
    missing: list[str],
    base: dict | None = None,
    pretrain_tolerance: float = PRETRAIN_TOLERANCE,
) -> dict:
    """Run the study and return its results (also written to `out_dir`); with `base` (existing results
    of the same settings), only `methods` run and their rows are added to it (`add_rows`), once the
    rerun pretraining's held-out loss is within `pretrain_tolerance` of the recorded one.

    Raises:
        RuntimeError: pretraining was not reproduced within `pretrain_tolerance`, or a run failed.
    """
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    cache, logs = work / "datasets_cache", work / "logs"
    logs.mkdir(exist_ok=True)
    commands: list[str] = []

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    # 1-2. Corpus, tokenizer, pretrained dense model. ------------------------------------------------
    corpus = write_corpus(work / "corpus", settings.max_characters)
    selection = work / "corpus" / "selection.jsonl"  # training text the merge method is picked on
    selection.write_text("".join(corpus.files["continue"].read_text().splitlines(True)[: settings.selection_documents]))
    tokenizer = train_tokenizer(corpus.texts("pretrain") + corpus.texts("continue"), settings.vocab_size)
    dense_init = build_dense_init(work / "dense-init", settings, tokenizer)
    config_path = work / "study_recipe.yaml"
    write_recipe_config(config_path, recipe_config(settings, corpus))
    log(f"corpus {corpus.documents} files, {corpus.characters} characters; tokenizer {len(tokenizer)} entries")

    def recipe(name: str, overrides: list[str]):
        run = run_recipe(config_path, overrides, work / name, cache, logs / f"{name}.log")
        commands.append(relative(shlex.join(run.command)))
        log(
            f"{name}: {len(run.eval_records)} evals, final eval loss {run.eval_records[-1]['eval_loss']:.4f}, "
            f"{run.wall_seconds:.0f}s"
        )
        return run

    def cli(argv: list[str]):
        command = run_cli(argv)
        commands.append(relative(command.text()))
        return command

    pretrain = recipe(
        "pretrain",
        [
            f"model.path={dense_init}",
            f"data.train={corpus.files['pretrain']}",
            f"train.max_steps={settings.pretrain_steps}",
            f"train.lr={settings.pretrain_lr}",
            "train.lr_scheduler=cosine",
            f"train.warmup_steps={max(settings.warmup_steps, settings.pretrain_steps // 20)}",
            "train.seed=0",
            f"eval.every_steps={max(settings.eval_every, settings.pretrain_steps // 5)}",
        ],
    )
    dense = pretrain.final_model
    base_overrides = [f"data.train={selection}", f"data.eval={corpus.files['heldout']}"]
    heldout = Evaluator(config_path, base_overrides, dense)
    picker = Evaluator(config_path, [f"data.train={selection}", f"data.eval={selection}"], dense)
    dense_loss = heldout.loss(dense)["eval_loss"]
    recipe_loss = pretrain.eval_records[-1]["eval_loss"]
    log(f"pretrained dense: held-out loss {dense_loss:.4f} (the recipe's own evaluation: {recipe_loss:.4f})")
    if base is not None and abs(dense_loss - base["dense_pretrained_loss"]) > pretrain_tolerance:
        raise RuntimeError(
            f"pretraining did not reproduce the recorded model: held-out loss {dense_loss!r}, "
            f"{RESULTS} has {base['dense_pretrained_loss']!r}; rerun the whole study instead of --add "
            "(or accept the difference with --pretrain-tolerance)"
        )

    params = {"dense": checkpoint_parameters(str(dense)), "mope": checkpoint_parameters(str(dense), settings.mope)}
    runs: dict[str, dict[int, dict]] = {}
    balancing: dict[str, dict[int, dict]] = {}
    merge_details: dict[int, list[dict]] = {}

    def convert(method: str, seed: int) -> Path:
        folder = work / f"s{seed}-{method}-init"
        cli(convert_argv(method, dense, folder, seed, settings))
        return folder

    def record(method: str, seed: int, run, init_loss: float | None, max_tokens: int | None = None) -> None:
        curve = curve_of(run, params[method], settings, init_loss, max_tokens)
        runs.setdefault(method, {})[seed] = {
            "curve": asdict(curve),
            "tokens": curve.tokens[-1],
            "flops": curve.flops[-1],
            "final_loss": curve.losses[-1],
            "init_loss": curve.losses[0] if curve.tokens[0] == 0 else None,
            "wall_seconds": run.wall_seconds,
            "command": relative(shlex.join(run.command)),
        }

    def results_so_far() -> dict:
        new = {
            "settings": {**asdict(settings), "seeds": list(settings.seeds)},
            "methods": list(methods),
            "missing_methods": missing,
            "parameters": {name: asdict(count) for name, count in params.items()},
            "flops_per_token": {name: count.training_flops_per_token() for name, count in params.items()},
            "dense_pretrained_loss": dense_loss,
            "pretrain": {
                "tokens": settings.pretrain_steps * settings.tokens_per_step(),
                "wall_seconds": pretrain.wall_seconds,
                "final_loss": pretrain.eval_records[-1]["eval_loss"],
            },
            "corpus": {"documents": corpus.documents, "characters": corpus.characters},
            "runs": runs,
            "balancing": balancing,
            "merges": {str(seed): rows for seed, rows in merge_details.items()},
            "commands": commands,
            "study_command": shlex.join(["python", "scripts/experiments/upcycling_study.py", *study_argv]),
            "wall_seconds": time.perf_counter() - started,
            "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, torch {importlib.metadata.version('torch')}",
            "load_average": list(os.getloadavg()),
            "git_revision": git_revision(),
        }
        return new if base is None else add_rows(base, new)

    # 3. Continuations, seed by seed. ---------------------------------------------------------------
    # The continuation LR is constant after warmup, so a run's loss after N tokens does not depend on
    # how long it goes on: one dense run, long enough to spend as many FLOPs as the upcycled MoEs,
    # gives both dense continuation at equal tokens (its curve at the common budget) and at equal FLOPs.
    for seed in settings.seeds:
        common = [f"train.seed={seed}"]
        converted = {method: convert(method, seed) for method in UPCYCLED if method in methods}
        for method, folder in converted.items():
            params.setdefault(method, checkpoint_parameters(str(folder)))
        if "dense" in methods:
            sparse = [params[method].training_flops_per_token() for method in converted] or [0.0]
            ratio = max(1.0, max(sparse) / params["dense"].training_flops_per_token())
            steps = math.ceil(settings.continue_steps * ratio)
            run = recipe(f"s{seed}-dense", [f"model.path={dense}", f"train.max_steps={steps}", *common])
            params["dense-flops"] = params["dense"]
            record("dense", seed, run, dense_loss, max_tokens=settings.continue_steps * settings.tokens_per_step())
            if ratio > 1.0:
                record("dense-flops", seed, run, dense_loss)
        for method, folder in converted.items():
            run = recipe(f"s{seed}-{method}", [f"model.path={folder}", *balancing_overrides(method, settings), *common])
            record(method, seed, run, None)  # the recipe evaluates at step 0
            if method == "glm4-lossfree":
                balancing.setdefault(method, {})[seed] = load_balance(run.train_records)
            if method == "copy" and "merged" in methods:
                merge_details[seed] = merge_back(run.final_model, work, seed, settings, cli, heldout, picker, selection)
                best = min(merge_details[seed], key=lambda row: row["selection_loss"])
                runs.setdefault("merged", {})[seed] = {
                    **{key: value for key, value in runs["copy"][seed].items() if key != "curve"},
                    "curve": None,
                    "final_loss": best["heldout_loss"],
                    "init_loss": None,
                    "merge_method": best["method"],
                    "command": best["command"],
                }
        if "mope" in methods:
            mope_options = json.dumps(settings.mope)
            run = recipe(
                f"s{seed}-mope",
                [
                    f"model.path={dense}",
                    "model.mode=mope",
                    f"model.mope={mope_options}",
                    f"moe.aux_loss_coef={settings.aux_loss_coef}",
                    *common,
                ],
            )
            record("mope", seed, run, dense_loss)  # LoRA B starts at zero: MoPE at init is the dense model

        write_report(results_so_far(), out_dir)  # a seed's results survive a later crash
        log(f"seed {seed} done; report written to {out_dir}")

    results = results_so_far()
    write_report(results, out_dir)
    log(f"wrote {out_dir}")
    return results


def relative(command: str) -> str:
    """Return `command` with this checkout's absolute path removed (the commands run from the repo root)."""
    return command.replace(f"{REPO}/", "")


def git_revision() -> str:
    """Return the checkout's commit, with "+ local changes" when the tree differs from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    # The study's own outputs (docs/results, the ignored runs/) are not local changes to the code.
    changed = git("status", "--porcelain", "--", ".", ":(exclude)docs/results")
    return git("rev-parse", "--short", "HEAD") + (" + local changes" if changed else "")


def merge_back(moe: Path, work: Path, seed: int, settings, cli, heldout, picker, selection: Path) -> list[dict]:
    """Merge the trained MoE back to dense with every method in `settings.merge_methods` and return
    each one's loss on the selection text (training data, used to pick) and on the held-out split."""
    rows = []
    for method in settings.merge_methods:
        merged = work / f"s{seed}-merged-{method}"
        argv = ["merge", str(moe), str(merged), "--method", method, "--force", "--quiet"]
        if method in ("frequency", "router-weight"):
            argv += ["--calibration", str(selection), "--calibration-samples", str(settings.selection_documents)]
        command = cli(argv)
        rows.append(
            {
                "method": method,
                "command": relative(command.text()),
                "selection_loss": picker.loss(merged)["eval_loss"],
                "heldout_loss": heldout.loss(merged)["eval_loss"],
            }
        )
    return rows


METHODS = ("dense", "copy", "drop", "granular", "glm4-lossfree", "mope", "merged")
# Rows --add can put beside existing ones: `dense` fixes the FLOP-matched run's length from every MoE, and
# `merged` needs the trained copy MoE.
ADDABLE = ("copy", "drop", "granular", "glm4-lossfree", "mope")


def base_results(out_dir: Path, settings: StudySettings, methods: tuple[str, ...]) -> dict:
    """Return the results --add adds `methods` to: `out_dir`'s JSON, checked to be of `settings`.

    Raises:
        SystemExit: no results there, different settings, or a method already in them or not addable.
    """
    path = out_dir / RESULTS
    if not path.is_file():
        raise SystemExit(f"--add: {path} does not exist; run the study first")
    base = json.loads(path.read_text())
    current = json.loads(json.dumps({**asdict(settings), "seeds": list(settings.seeds)}))  # as in the file
    differing = sorted(key for key, value in base["settings"].items() if current.get(key) != value)
    if differing:
        raise SystemExit(f"--add: {path} was run with other settings ({', '.join(differing)}); rerun the study")
    refused = [method for method in methods if method not in ADDABLE or method in base["runs"]]
    if refused:
        raise SystemExit(f"--add: cannot add {', '.join(refused)} (already there, or not one of {', '.join(ADDABLE)})")
    return base


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the study and return its results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets: a smoke test of every step")
    parser.add_argument("--out-dir", default=None, help="where the table and plots go (default docs/results)")
    parser.add_argument("--work-dir", default=None, help="checkpoints and logs (default runs/upcycling_study[-quick])")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="continuation seeds (default 1 2)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--keep-work", action="store_true", help="keep checkpoints after the study")
    parser.add_argument(
        "--add",
        action="store_true",
        help="run only --methods and add their rows to --out-dir's upcycling_study.json (same settings; "
        "pretraining is rerun and must reproduce the recorded pretrained loss)",
    )
    parser.add_argument(
        "--pretrain-tolerance",
        type=float,
        default=PRETRAIN_TOLERANCE,
        help="with --add: how far (nats) the rerun pretrained model's held-out loss may be from the recorded one; "
        "the report states the difference (default %(default)s)",
    )
    parser.add_argument(
        "--rewrite-report",
        action="store_true",
        help="train nothing: rewrite the markdown and plots of --out-dir from its upcycling_study.json",
    )
    args = parser.parse_args(argv)
    raw_argv = sys.argv[1:] if argv is None else argv
    settings = QUICK if args.quick else StudySettings()
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    name = "upcycling_study-quick" if args.quick else "upcycling_study"
    # --quick never overwrites the committed results unless told to.
    out_dir = Path(args.out_dir or (REPO / "runs" / f"{name}-results" if args.quick else REPO / "docs" / "results"))
    if args.rewrite_report:
        results = json.loads((out_dir / RESULTS).read_text())
        print(f"rewrote {write_report(results, out_dir)}")
        return results
    work = Path(args.work_dir or REPO / "runs" / name)
    if work.exists():
        shutil.rmtree(work)
    methods, missing = available(tuple(args.methods))
    if "merged" in methods and "copy" not in methods:
        parser.error("--methods merged needs copy (it merges the trained copy-upcycled MoE)")
    if args.add and args.methods == list(METHODS):
        parser.error("--add needs --methods: the ones to add")
    base = base_results(out_dir, settings, methods) if args.add else None
    results = run_study(settings, work, out_dir, methods, raw_argv, missing, base, args.pretrain_tolerance)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    if not all(math.isfinite(run["final_loss"]) for per_seed in results["runs"].values() for run in per_seed.values()):
        raise SystemExit("a run ended with a non-finite loss; see the table")
    return results


if __name__ == "__main__":
    main()
