"""`upcycle export`: a block-routed MoPE adapter -> the stock MoE checkpoint that computes the same.

`upcycle convert BASE OUTPUT --from-mope ADAPTER` is the older spelling of the same command.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from upcycle.commands.output_options import add_output_arguments, check_push_token, push_if_requested


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "export",
        help="export a block-routed MoPE adapter as a stock MoE checkpoint",
        description="Load a MoPE adapter (directory or Hub id) onto its dense base model and write the stock "
        "transformers MoE that computes the same: expert i = W + (alpha/r) B_i A_i, the adapter's router "
        "(README: MoPE). The adapter sets the experts and top-k.",
    )
    parser.add_argument("adapter", help="MoPE adapter: a directory or Hub id with adapter_config.json")
    parser.add_argument("output", help="output directory (must not exist unless --force)")
    parser.add_argument(
        "--base-model", default=None, help="dense base model (default: the adapter's base_model_name_or_path)"
    )
    add_export_arguments(parser)
    parser.set_defaults(run=run)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options `export` shares with `convert` (layout, dtype, shards, revision, force, quiet, push)."""
    parser.add_argument(
        "--layout",
        choices=["per-expert", "fused"],
        default=None,
        help="on-disk expert layout (default per-expert where the family has it; fused Mixtral: transformers only)",
    )
    parser.add_argument(
        "--dtype", default="auto", help="output dtype: auto (as the source), float32, bfloat16, float16"
    )
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Export as `args` say, print a one-line summary unless quiet, and return exit code 0."""
    return export_from_args(args.adapter, args.output, args.base_model, args, "export")


def export_from_args(adapter: str, output: str, base_model: str | None, args: argparse.Namespace, command: str) -> int:
    """Run `mope.export_adapter` with the shared options in `args`; print, push, and return exit code 0.

    Raises:
        UpcycleError: no push token, or the adapter cannot be exported exactly.
    """
    from mope.export import export_adapter  # the mope package is needed only for this command

    check_push_token(args)
    summary = export_adapter(
        adapter,
        output,
        base_model=base_model,
        revision=args.revision,
        force=args.force,
        layout=args.layout,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        command="upcycle " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == [command] else None,
        card_model_id=args.push_to_hub,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(
            f"wrote {summary.output}: MoPE adapter -> {summary.family}, {summary.num_experts} experts, "
            f"top-{summary.top_k}, {summary.total_parameters:,} parameters "
            f"({summary.active_parameters:,} active per token)"
        )
    push_if_requested(args, summary.output, quiet=args.quiet)
    return 0
