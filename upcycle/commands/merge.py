"""`upcycle merge`: MoE checkpoint -> dense checkpoint, or a MoE with fewer experts."""

from __future__ import annotations

import argparse
import shlex
import sys

from upcycle.commands.output_options import add_output_arguments, check_push_token, push_if_requested
from upcycle.merging.method_names import METHODS

METHOD_HELP = (
    "average (uniform mean); frequency (M-SMoE: weighted by how often the router picks each expert on "
    "--calibration); router-weight (weighted by mean routing probability); task-arithmetic, ties, dare "
    "(expert minus --base FFN as task vectors); concat (exact fold of a fixed-weight mixture into one "
    "wider FFN: uniform, or mean routing weights with --calibration); select (the most used expert)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `merge` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "merge",
        help="fold a sparse MoE checkpoint back into a dense model, or into fewer experts",
        description="Merge the experts of a stock transformers MoE checkpoint (local directory or Hub id; "
        "upcycled or foreign: mixtral, qwen2_moe, qwen3_moe, granitemoe, flex_olmo) into the dense model of "
        "its family, or with --experts K into a MoE with K experts per layer (HC-SMoE clustering).",
    )
    parser.add_argument("source", help="MoE checkpoint: a local directory or a Hub model id")
    parser.add_argument("output", help="output directory (must not exist unless --force)")
    parser.add_argument(
        "--method", default="average", choices=METHODS, help=f"merge method (default average): {METHOD_HELP}"
    )
    parser.add_argument(
        "--experts",
        type=int,
        default=None,
        help="merge into a MoE with this many experts per layer (fewer than the source has) instead of a dense model; "
        "experts are clustered by their mean outputs on --calibration data, else by weight similarity",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="calibration text: a .txt/.jsonl/.json/.parquet/.csv file, a folder or a Hub dataset id",
    )
    parser.add_argument("--calibration-samples", type=int, default=128, help="texts to read (default 128)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per calibration text (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    parser.add_argument(
        "--base",
        default=None,
        help="dense checkpoint whose FFN task vectors are measured from (task-arithmetic, ties, dare; default: the "
        "dense source in the MoE's upcycle provenance if it exists locally, else the mean expert; ties needs one)",
    )
    parser.add_argument(
        "--density",
        type=float,
        default=None,
        help="fraction of each task vector kept: ties trims to the largest (default 0.2), dare keeps a random "
        "fraction and rescales it (default 0.5)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="scale of the merged task vector (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for dare's random drops")
    parser.add_argument(
        "--dtype", default="auto", help="output dtype: auto (as the source), float32, bfloat16, float16"
    )
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Merge as `args` say, print a one-line summary unless quiet, and return exit code 0."""
    from upcycle.merge import merge

    check_push_token(args)
    summary = merge(
        args.source,
        args.output,
        method=args.method,
        experts=args.experts,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        base=args.base,
        density=args.density,
        scale=args.scale,
        seed=args.seed,
        dtype=args.dtype,
        force=args.force,
        quiet=args.quiet,
        revision=args.revision,
        max_shard_size=args.max_shard_size,
        command="upcycle " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["merge"] else None,
        card_model_id=args.push_to_hub,
    )
    if not args.quiet:
        shape = (
            f"{summary.experts_out} experts, top-{summary.top_k_out}"
            if summary.experts_out
            else f"dense, FFN width {summary.intermediate_size}"
        )
        print(
            f"wrote {summary.output}: {summary.source_model_type} -> {summary.target_model_type} ({summary.method}), "
            f"{shape}, {summary.total_parameters:,} parameters"
        )
    push_if_requested(args, summary.output, quiet=args.quiet)
    return 0
