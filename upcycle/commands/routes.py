"""`upcycle routes`: routing analysis of a MoE on some text (expert load, entropy, drops, specialisation)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `routes` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "routes",
        help="analyse how a MoE routes tokens: expert load heatmap, load CV, entropy, drops",
        description="Run text through a stock transformers MoE or a generic upcycle model and report, per MoE "
        "layer: expert load (heatmap PNG), its coefficient of variation, router entropy, tokens dropped at a "
        "capacity factor, the drop rate by position in the sequence and how consistently a token id goes to "
        "the same expert. Writes routes.json, expert_load.png and drop_by_position.png into OUTPUT.",
    )
    parser.add_argument("source", help="MoE model: a local folder or Hub id (stock MoE or upcycle generic format)")
    parser.add_argument("output", nargs="?", help="report directory (must not exist unless --force)")
    parser.add_argument("--out", dest="output_option", help=argparse.SUPPRESS)  # the old spelling of OUTPUT
    parser.add_argument(
        "--calibration",
        "--data",
        dest="calibration",
        required=True,
        help="text to route: a .txt/.jsonl/.json/.parquet/.csv file, a folder, or a Hub dataset id",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or id (default: the model's)")
    parser.add_argument(
        "--calibration-samples", "--samples", dest="calibration_samples", type=int, default=128, help="texts to read"
    )
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="texts per forward (default 4)")
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="simulated expert capacity (default 1.0)")
    parser.add_argument("--position-buckets", type=int, default=8, help="buckets of the drop-by-position curve")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Analyse, write the report directory, print the numbers, and return exit code 0."""
    from upcycle.checkpoint import check_output_dir
    from upcycle.errors import UpcycleError
    from upcycle.routes import routing_report, write_report

    if (args.output is None) == (args.output_option is None):
        raise UpcycleError("give the report directory once: upcycle routes SOURCE OUTPUT --calibration DATA")
    output = args.output or args.output_option
    check_output_dir(Path(output), args.force)
    report = routing_report(
        args.source,
        args.calibration,
        tokenizer=args.tokenizer,
        calibration_samples=args.calibration_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        capacity_factor=args.capacity_factor,
        num_buckets=args.position_buckets,
        quiet=args.quiet or args.json,
    )
    write_report(report, output, force=args.force)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"{report.model} ({report.kind}), {report.layers[0].tokens} tokens, capacity factor {report.capacity_factor}")
    print(f"  {'layer':<28} {'load CV':>8} {'entropy/logE':>12} {'dropped':>8} {'last drop':>10} {'id->expert':>10}")
    for layer in report.layers:
        print(
            f"  {layer.name:<28} {layer.load_cv:8.3f} {layer.normalized_entropy:12.3f} {layer.dropped_fraction:8.1%} "
            f"{layer.drop_rate_by_position[-1]:10.1%} {_percent(layer.token_consistency):>10}"
        )
    print(f"wrote {output}/routes.json, expert_load.png, drop_by_position.png")
    return 0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
