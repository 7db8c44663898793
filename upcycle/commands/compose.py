"""`upcycle compose`: several dense fine-tunes of one base -> one stock MoE checkpoint."""

from __future__ import annotations

import argparse
import shlex
import sys

from upcycle.commands.output_options import add_push_arguments, check_push_token, push_if_requested


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compose` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "compose",
        help="build one MoE from several dense fine-tunes of one base (mergekit-moe, Branch-Train-MiX)",
        description="Compose a stock transformers MoE checkpoint from a YAML recipe: routed expert i of every MoE "
        "layer is the FFN of the recipe's source i; attention, norms and embeddings come from the base (or their "
        "mean over the sources); routers from prompts (hidden, cheap_embed), per-expert data (kmeans) or random.",
    )
    parser.add_argument("recipe", help="YAML recipe: base, experts (source, positive_prompts, ...), router_init, ...")
    parser.add_argument("output", help="output directory (must not exist unless --force)")
    parser.add_argument(
        "--layout",
        choices=["per-expert", "fused"],
        default=None,
        help="on-disk expert layout (default: the family's Hub layout, per-expert where it exists)",
    )
    parser.add_argument("--dtype", default="auto", help="output dtype: auto (as the base), float32, bfloat16, float16")
    parser.add_argument("--seed", type=int, default=0, help="seed for router_init random")
    parser.add_argument(
        "--moe-layers", default="all", help="all (default), every:N, or indices like 0,4,8 / 0-3 (qwen targets)"
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB = 5e9 bytes; 2GiB = 2^31)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUTPUT if it exists (only once the new one is complete)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_push_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Compose as `args` say, print a one-line summary unless quiet, and return exit code 0."""
    from upcycle.compose import compose

    check_push_token(args)
    summary = compose(
        args.recipe,
        args.output,
        dtype=args.dtype,
        layout=args.layout,
        moe_layers=args.moe_layers,
        seed=args.seed,
        force=args.force,
        quiet=args.quiet,
        max_shard_size=args.max_shard_size,
        command="upcycle " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["compose"] else None,
        card_model_id=args.push_to_hub,
    )
    if not args.quiet:
        distinct = len(set(summary.sources))
        print(
            f"wrote {summary.output}: {summary.family}, {summary.num_experts} experts from {distinct} "
            f"source{'s' if distinct > 1 else ''}, top-{summary.top_k}, router {summary.router_init}, "
            f"{summary.total_parameters:,} parameters ({summary.active_parameters:,} active per token)"
        )
    push_if_requested(args, summary.output, quiet=args.quiet)
    return 0
