"""The upcycling study's report: a markdown table, PNG plots and the raw results as JSON.

The markdown is regenerated on every run; the hand-written discussion below its marker line
(`DISCUSSION_MARKER`) is carried over from the previous file, so rerunning the study never
erases the analysis (which then has to be re-read against the new numbers).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPORT = "upcycling_study.md"
PLOT = "upcycling_study.png"
RESULTS = "upcycling_study.json"
DISCUSSION_MARKER = "<!-- discussion: hand-written, kept when the study reruns -->"

LABELS = {
    "dense": "dense continuation",
    "copy": "copy upcycling (Komatsuzaki et al. 2022)",
    "drop": "Drop-Upcycling, r=0.5 (Nakamura et al. 2025)",
    "granular": "granular upcycling (He et al. 2024)",
    "glm4-lossfree": "glm4_moe: granular + shared expert, loss-free balancing (DeepSeek-V3 routing)",
    "mope": "MoPE on the dense model (LoRA experts)",
    "merged": "copy upcycling, trained, merged back to dense",
    "dense-flops": "dense continuation, FLOP-matched to the MoEs",
}
COLORS = {
    "dense": "black",
    "copy": "tab:blue",
    "drop": "tab:orange",
    "granular": "tab:green",
    "glm4-lossfree": "tab:brown",
    "mope": "tab:purple",
    "merged": "tab:red",
    "dense-flops": "tab:gray",
}


@dataclass
class Curve:
    """Held-out loss of one run at each evaluation, against continuation tokens and training FLOPs."""

    tokens: list[int]
    flops: list[float]
    losses: list[float]
    eval_tokens: int


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Return ys linearly interpolated at x, or None when x lies outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] - 1e-9 * abs(x) or x > xs[-1] * (1 + 1e-9):
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def spread(values: list[float]) -> str:
    """Return "mean (min-max)" of `values`, or the single value."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def summarize(results: dict) -> list[dict]:
    """Return one row per method: parameter counts, budget, losses over seeds, equal-FLOPs loss."""
    runs = results["runs"]
    dense_flops = statistics.fmean(run["flops"] for run in runs["dense"].values()) if "dense" in runs else None
    dense_final = [run["final_loss"] for run in runs.get("dense", {}).values()]
    rows = []
    for method in LABELS:
        if method not in runs:
            continue
        per_seed = runs[method]
        finals = [run["final_loss"] for run in per_seed.values()]
        at_dense_flops = []
        for run in per_seed.values():
            curve = run["curve"]
            if curve is not None and dense_flops is not None:
                at_dense_flops.append(interpolate(curve["flops"], curve["losses"], dense_flops))
        # A merged model is dense-sized; its training was the copy-upcycled MoE's.
        params = results["parameters"].get("dense" if method == "merged" else method, {})
        rows.append(
            {
                "method": method,
                "label": LABELS[method],
                "total": params.get("total"),
                "active": params.get("active"),
                "flops_per_token": results["flops_per_token"].get("copy" if method == "merged" else method),
                "tokens": statistics.fmean(run["tokens"] for run in per_seed.values()),
                "flops": statistics.fmean(run["flops"] for run in per_seed.values()),
                "init": [run["init_loss"] for run in per_seed.values() if run.get("init_loss") is not None],
                "finals": finals,
                "delta": statistics.fmean(finals) - statistics.fmean(dense_final) if dense_final else None,
                "at_dense_flops": [value for value in at_dense_flops if value is not None],
                "seeds": sorted(per_seed),
                "wall": sum(run["wall_seconds"] for run in per_seed.values()),
            }
        )
    return rows


def _millions(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def results_table(rows: list[dict]) -> str:
    """Return the markdown table of `rows` (numbers only in the numeric columns, '-' where not applicable)."""
    lines = [
        "| method | total params | active params | train FLOPs/token | continuation tokens | continuation FLOPs "
        "| held-out loss at start | held-out loss at end, mean (min-max) | vs dense | loss at dense's FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        init = spread(row["init"]) if row["init"] else "-"
        at_flops = spread(row["at_dense_flops"]) if row["at_dense_flops"] else "-"
        delta = "-" if row["delta"] is None or row["method"] == "dense" else f"{row['delta']:+.4f}"
        lines.append(
            f"| {row['method']} | {_millions(row['total'])} | {_millions(row['active'])} "
            f"| {_millions(row['flops_per_token'])} | {row['tokens']:.0f} | {row['flops']:.3e} | {init} "
            f"| {spread(row['finals'])} | {delta} | {at_flops} |"
        )
    return "\n".join(lines)


def merge_table(merges: dict) -> str:
    """Return a markdown table of every merge method's losses, per seed."""
    if not merges:
        return "_no merge was run_"
    lines = ["| seed | merge method | loss on selection text (training split) | held-out loss |", "|---|---|---|---|"]
    for seed, rows in merges.items():
        best = min(rows, key=lambda row: row["selection_loss"])
        for row in rows:
            mark = " (picked)" if row is best else ""
            lines.append(
                f"| {seed} | {row['method']}{mark} | {row['selection_loss']:.4f} | {row['heldout_loss']:.4f} |"
            )
    return "\n".join(lines)


def balancing_table(balancing: dict) -> str:
    """Return a markdown table of each loss-free-balanced run's per-step expert-load CV, per seed."""
    lines = [
        "| method | seed | load CV, first step | mean, first steps | mean, last steps | load CV, last step "
        "| bias spread at end |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, per_seed in balancing.items():
        for seed, trace in per_seed.items():
            window = trace["window"]
            lines.append(
                f"| {method} | {seed} | {trace['first_cv']:.3f} (step {trace['first_step']}) "
                f"| {trace['first_window_cv']:.3f} (steps 1-{window}) "
                f"| {trace['last_window_cv']:.3f} (last {window}) "
                f"| {trace['last_cv']:.3f} (step {trace['last_step']}) | {trace['final_bias_range']:.3f} |"
            )
    return "\n".join(lines)


def additions_lines(results: dict) -> list[str]:
    """Return a header line for every later run that added rows (`--add`) to these results."""
    lines = []
    for addition in results.get("additions", []):
        lines.append(
            f"- Added by `{addition['study_command']}` ({', '.join(addition['methods'])}): "
            f"{addition['wall_seconds']:.0f} s on {addition['machine']}, load average at the end "
            f"{', '.join(f'{x:.1f}' for x in addition['load_average'])}, commit {addition['git_revision']}; "
            f"pretraining rerun first: its held-out loss {addition['dense_pretrained_loss']:.6f}, recorded "
            f"{results['dense_pretrained_loss']:.6f} (difference "
            f"{addition['dense_pretrained_loss'] - results['dense_pretrained_loss']:+.1e})."
        )
    return lines


def plot(results: dict, path: Path) -> None:
    """Write the PNG of held-out loss against continuation tokens and against training FLOPs
    (mean over seeds as a line, the seeds' min-max as a band; merged models as markers)."""
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for method, per_seed in results["runs"].items():
        curves = [run["curve"] for run in per_seed.values() if run["curve"] is not None]
        color = COLORS.get(method, None)
        for axis, key in zip(axes, ("tokens", "flops"), strict=True):
            if not curves:  # a merged model: one point per seed, at the budget of the run it came from
                xs = [run[key] for run in per_seed.values()]
                ys = [run["final_loss"] for run in per_seed.values()]
                axis.scatter(xs, ys, marker="*", s=120, color=color, label=method, zorder=5)
                continue
            length = min(len(curve[key]) for curve in curves)
            xs = [statistics.fmean(curve[key][i] for curve in curves) for i in range(length)]
            losses = [[curve["losses"][i] for curve in curves] for i in range(length)]
            axis.plot(xs, [statistics.fmean(values) for values in losses], color=color, marker=".", label=method)
            if len(curves) > 1:
                axis.fill_between(xs, [min(v) for v in losses], [max(v) for v in losses], color=color, alpha=0.2)
    axes[0].set_xlabel("continuation tokens")
    axes[1].set_xlabel("continuation training FLOPs")
    for axis in axes:
        axis.set_ylabel("held-out loss (nats/token)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    seeds = ", ".join(str(seed) for seed in results["settings"]["seeds"])
    figure.suptitle(f"Upcycling study: held-out loss on unseen stdlib files (seeds {seeds}; band = min-max)")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _verdict(values: list[float], reference: list[float]) -> str:
    """Return how `values` (one per seed) sit against `reference`'s: below all, above all, or overlapping."""
    if max(values) < min(reference):
        return "lower on every seed"
    if min(values) > max(reference):
        return "higher on every seed"
    return "within the seed spread"


def findings(rows: list[dict]) -> list[str]:
    """Return one sentence per method comparing it with dense continuation at equal tokens and, where its
    training FLOPs match the FLOP-matched dense run's (within 2%), at equal FLOPs; computed from the numbers."""
    by_method = {row["method"]: row for row in rows}
    dense, matched = by_method.get("dense"), by_method.get("dense-flops")
    if dense is None:
        return []
    sentences = []
    for row in rows:
        if row["method"] == "dense":
            continue
        if row["method"] == "dense-flops":
            sentences.append(
                f"- **dense-flops**: {row['tokens'] / dense['tokens']:.2f}x the tokens of `dense`: "
                f"{row['delta']:+.4f} nats vs `dense` ({_verdict(row['finals'], dense['finals'])})."
            )
            continue
        sentence = (
            f"- **{row['method']}**: equal tokens: {row['delta']:+.4f} nats vs dense "
            f"({_verdict(row['finals'], dense['finals'])})"
        )
        if matched is not None and abs(row["flops"] / matched["flops"] - 1) <= 0.02:
            delta = statistics.fmean(row["finals"]) - statistics.fmean(matched["finals"])
            sentence += (
                f"; equal FLOPs: {delta:+.4f} nats vs the FLOP-matched dense run "
                f"({_verdict(row['finals'], matched['finals'])})"
            )
        sentences.append(sentence + ".")
    return sentences


def glm4_lines(settings: dict) -> list[str]:
    """Return the settings line of the glm4-lossfree row, or nothing when the study has none."""
    glm4 = settings.get("glm4")
    if glm4 is None:
        return []
    routed = glm4["experts"] * (glm4["granularity"] - glm4["shared_experts"])
    return [
        f"- glm4-lossfree: `--target glm4_moe --method granular`, granularity {glm4['granularity']}, "
        f"{glm4['experts']} copies, {glm4['shared_experts']} shared shard(s): {routed} routed experts and one "
        f"shared expert, each 1/{glm4['granularity']} of the FFN; routed top-{glm4['top_k']} among the best "
        f"{glm4['top_groups']} of {glm4['expert_groups']} groups, sigmoid scores, routed scaling "
        f"{glm4['routed_scaling']}; no aux loss, selection biases moved by `moe.bias_update_rate` "
        f"{glm4['bias_update_rate']} a step (DeepSeek-V3 loss-free balancing).",
    ]


def write_report(results: dict, out_dir: Path) -> Path:
    """Write the markdown report, the plot and the JSON results under `out_dir`; return the report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / REPORT
    kept = ""
    if report.is_file() and DISCUSSION_MARKER in report.read_text():
        kept = report.read_text().split(DISCUSSION_MARKER, 1)[1]
    (out_dir / RESULTS).write_text(json.dumps(results, indent=1))
    plot(results, out_dir / PLOT)
    rows = summarize(results)
    settings = results["settings"]
    missing = [method for method in results.get("missing_methods", [])]
    minutes = results["wall_seconds"] / 60
    text = [
        "# Upcycling study: does upcycling pay off at small scale?",
        "",
        "Generated by `scripts/experiments/upcycling_study.py`; every number below comes from the run described "
        "here (raw data: "
        f"[{RESULTS}]({RESULTS})).",
        "",
        f"- Command: `{results['study_command']}`",
        f"- Code: commit {results.get('git_revision', 'unknown')}.",
        f"- Wall time: {results['wall_seconds']:.0f} s ({minutes:.1f} min) on {results['machine']}; "
        f"load average at the end {', '.join(f'{x:.1f}' for x in results['load_average'])} "
        "(the machine's two cores were shared with other jobs, so the time is an upper bound).",
        *additions_lines(results),
        f"- Seeds: continuation seeds {settings['seeds']} (data order, router init, Drop-Upcycling's neuron draw, "
        "MoPE init); the dense model is pretrained once with seed 0 and shared by all.",
        f"- Corpus: Python {results['machine'].split(' ')[2]} standard library `.py` files, split by a hash of each "
        f"file's path: {results['corpus']['documents']} files, {results['corpus']['characters']} characters per split.",
        f"- Dense model: Llama, {settings['layers']} layers, hidden {settings['hidden_size']}, FFN "
        f"{settings['intermediate_size']}, {settings['heads']} heads, BPE vocabulary {settings['vocab_size']} (tied "
        f"embeddings), pretrained {results['pretrain']['tokens']} tokens, lr {settings['pretrain_lr']} cosine "
        f"(held-out loss "
        f"{results['dense_pretrained_loss']:.4f}).",
        f"- Continuation: {settings['continue_steps']} steps x {settings['batch_size']} x {settings['seq_len']} "
        "tokens, "
        f"AdamW lr {settings['continue_lr']} held constant after {settings['warmup_steps']} warmup steps, weight decay "
        "0.1, "
        f"eval every {settings['eval_every']} steps on {settings['eval_batches']} x {settings['batch_size']} held-out "
        f"blocks; MoEs: {settings['experts']} experts top-{settings['top_k']}, router aux loss "
        f"{settings['aux_loss_coef']}; Drop-Upcycling ratio {settings['drop_ratio']}; granular: granularity "
        f"{settings['granularity']} ({settings['experts']} copies x {settings['granularity']} shards, top-"
        f"{settings['top_k'] * settings['granularity']}: same total and active parameters as copy); MoPE "
        f"{json.dumps(settings['mope'])}.",
        *glm4_lines(settings),
        "- FLOPs: 2 per active weight forward, 2 backward, 2 more when the weight is trained (6N for full "
        "training, 4N + 2N_trainable for MoPE's frozen base); active = every matrix a token passes through, LM "
        "head included, input embedding (a lookup) excluded, top_k/E of each expert stack; attention-score "
        "FLOPs left out (identical for every method). Pretraining FLOPs are shared by all and not counted.",
        "",
        "## Results",
        "",
        results_table(rows),
        "",
        "Columns: *at start* is the held-out loss of the continuation's starting checkpoint (copy upcycling, "
        "glm4-lossfree and MoPE start exactly at the dense model; drop and granular do not); *at end* is after the "
        "full token budget; *vs dense* is the difference of means at equal tokens (negative = better); *loss at "
        "dense's FLOPs* is each run's curve interpolated at the FLOPs dense continuation spent on the common token "
        "budget (`-` where a run never reached it). "
        "The `dense-flops` row is the equal-FLOPs comparison: the same dense run, "
        "continued until it had spent as many training FLOPs as the most expensive upcycled MoE (the LR is constant "
        "after warmup, so the `dense` row is exactly this run's curve at the common token budget).",
        "",
        f"![held-out loss vs tokens and FLOPs]({PLOT})",
        "",
        "### What the table says (computed)",
        "",
        *findings(rows),
        "",
        "### Merging the trained copy-upcycled MoE back to dense",
        "",
        "Every available `upcycle merge` method was run; the one reported as `merged` is picked by its loss on "
        f"{settings['selection_documents']} files of the continuation's *training* split, never on held-out data.",
        "",
        merge_table(results.get("merges", {})),
        "",
    ]
    if results.get("balancing"):
        text += [
            "### Expert load under loss-free balancing",
            "",
            "`moe/step_load_cv`: the coefficient of variation of the tokens each routed expert received in one "
            "optimizer step (the load the selection biases are updated from, before the update), averaged over "
            "the MoE layers; 0 is a perfectly even load. Bias spread: max - min of `e_score_correction_bias`, "
            "averaged over layers.",
            "",
            balancing_table(results["balancing"]),
            "",
        ]
    if missing:
        text += ["### Not run", "", *[f"- {line}" for line in missing], ""]
    text += [
        "<details><summary>Every command the study ran</summary>",
        "",
        "```",
        *results["commands"],
        *[
            line
            for addition in results.get("additions", [])
            for line in (f"# added by {addition['study_command']}:", *addition["commands"])
        ],
        "```",
        "",
        "</details>",
        "",
        DISCUSSION_MARKER,
    ]
    report.write_text("\n".join(text) + (kept if kept else "\n"))
    return report
