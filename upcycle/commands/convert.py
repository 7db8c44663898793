"""`upcycle convert`: dense checkpoint -> stock MoE checkpoint."""

from __future__ import annotations

import argparse
import shlex
import sys

from upcycle.commands.output_options import add_output_arguments, check_push_token, push_if_requested
from upcycle.families import TARGETS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "convert",
        help="turn a dense checkpoint into a sparse MoE checkpoint",
        description="Upcycle a dense Hugging Face causal LM (local directory or Hub id) into a stock "
        "transformers MoE checkpoint whose experts are copies of the dense FFN.",
    )
    parser.add_argument("source", help="dense checkpoint: a local directory or a Hub model id")
    parser.add_argument("output", help="output directory (must not exist unless --force)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument(
        "--target",
        default="auto",
        choices=["auto", *TARGETS, "generic"],
        help="target MoE family; generic: any architecture with upcycle's MoE block (auto falls back to it)",
    )
    generic = parser.add_argument_group("generic format (README: The generic format)")
    generic.add_argument("--router", default="topk", help="router kind of upcycle.moe.ROUTERS (default topk)")
    generic.add_argument(
        "--router-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="router option (VALUE read as JSON, else text), e.g. softmax_order=after; repeatable",
    )
    generic.add_argument("--ffn-pattern", default=None, help="regex over module names locating the FFNs to replace")
    parser.add_argument(
        "--layout",
        choices=["per-expert", "fused"],
        default=None,
        help="on-disk expert layout (default: the family's Hub layout, per-expert where it exists); fused Mixtral is "
        "read by transformers only, not by llama.cpp's converter or vLLM (README: Supported pairs)",
    )
    parser.add_argument(
        "--dtype", default="auto", help="output dtype: auto (as the source), float32, bfloat16, float16"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for router initialisation")
    parser.add_argument("--router-std", type=float, default=None, help="router init std (default: initializer_range)")
    methods = parser.add_argument_group("expert construction and router initialisation (README: Expert methods)")
    methods.add_argument(
        "--method",
        choices=["copy", "drop", "granular", "partition"],
        default="copy",
        help="copy: Sparse Upcycling (exact); drop: Drop-Upcycling; granular: He et al. 2024 fine-grained "
        "shards (--experts/--top-k count FFN copies; output has x G); partition: MoEfication neuron split",
    )
    methods.add_argument("--noise", type=float, default=0.0, help="copy: Gaussian noise, relative to each weight's std")
    methods.add_argument("--drop-ratio", type=float, default=None, help="drop: share of neurons re-drawn (default 0.5)")
    methods.add_argument("--granularity", type=int, default=None, help="granular: shards per FFN (default 2)")
    methods.add_argument(
        "--granular-scaling",
        choices=["paper", "down"],
        default="paper",
        help="granular: paper = all weights x a^(1/3) (approximate); down = down_proj x a (exact)",
    )
    methods.add_argument(
        "--partition-method", choices=["random", "kmeans"], default=None, help="partition: neuron grouping"
    )
    methods.add_argument(
        "--shared-experts",
        type=int,
        default=0,
        help="always-on shared experts carved from the FFN (qwen2_moe, glm4_moe)",
    )
    methods.add_argument(
        "--router-init",
        choices=["random", "kmeans", "centroids"],
        default=None,
        help="random (default), kmeans (needs --calibration), centroids (partition's default)",
    )
    methods.add_argument(
        "--calibration", default=None, help="kmeans: .txt/.jsonl/.json/.parquet/.csv file, folder or Hub dataset id"
    )
    methods.add_argument("--calibration-samples", type=int, default=128, help="kmeans: texts to run (default 128)")
    methods.add_argument(
        "--moe-layers",
        default="all",
        help="all (default), every:N, or indices like 0,4,8 / 0-3 / 2- (qwen targets; glm4_moe: N- only)",
    )
    grouped = parser.add_argument_group("grouped sigmoid router, DeepSeek-V3 style (glm4_moe; README: Supported pairs)")
    grouped.add_argument(
        "--expert-groups",
        type=int,
        default=None,
        help="groups of routed experts (n_group, default 1); granular: each group holds whole FFN copies",
    )
    grouped.add_argument(
        "--top-groups", type=int, default=None, help="groups a token's experts come from (topk_group, default all)"
    )
    grouped.add_argument(
        "--routed-scaling",
        type=float,
        default=None,
        help="routed_scaling_factor (default 1); routed experts' down_proj is divided by it, so it stays exact",
    )
    parser.add_argument(
        "--from-mope",
        metavar="ADAPTER",
        default=None,
        help="the older spelling of `upcycle export ADAPTER OUTPUT --base-model SOURCE`",
    )
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def parse_router_options(pairs: list[str]) -> dict:
    """Return ``{key: value}`` from ``KEY=VALUE`` strings, each value parsed as JSON when it is JSON.

    Raises:
        UpcycleError: an entry has no ``=``.
    """
    import json

    from upcycle.errors import UpcycleError

    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UpcycleError(f"--router-option {pair!r} is not KEY=VALUE; e.g. --router-option softmax_order=after")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def run(args: argparse.Namespace) -> int:
    """Convert as `args` say, print a one-line summary unless quiet, and return exit code 0."""
    from upcycle.convert import convert

    if args.from_mope:
        return _run_from_mope(args)
    check_push_token(args)
    summary = convert(
        args.source,
        args.output,
        experts=args.experts,
        top_k=args.top_k,
        target=args.target,
        layout=args.layout,
        dtype=args.dtype,
        seed=args.seed,
        router_std=args.router_std,
        force=args.force,
        quiet=args.quiet,
        revision=args.revision,
        max_shard_size=args.max_shard_size,
        command="upcycle " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["convert"] else None,
        card_model_id=args.push_to_hub,
        method=args.method,
        noise=args.noise,
        drop_ratio=args.drop_ratio,
        granularity=args.granularity,
        granular_scaling=args.granular_scaling,
        partition_method=args.partition_method,
        shared_experts=args.shared_experts,
        router_init=args.router_init,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        moe_layers=args.moe_layers,
        router=args.router,
        router_options=parse_router_options(args.router_option),
        ffn_pattern=args.ffn_pattern,
        expert_groups=args.expert_groups,
        top_groups=args.top_groups,
        routed_scaling=args.routed_scaling,
    )
    if not args.quiet:
        print(
            f"wrote {summary.output}: {summary.family}, {summary.num_experts} experts, top-{summary.top_k}, "
            f"{summary.total_parameters:,} parameters ({summary.active_parameters:,} active per token)"
        )
    push_if_requested(args, summary.output, quiet=args.quiet)
    return 0


def _run_from_mope(args: argparse.Namespace) -> int:
    """`convert SOURCE OUTPUT --from-mope ADAPTER`, the older spelling of `upcycle export ADAPTER OUTPUT
    --base-model SOURCE`; return its exit code.

    Raises:
        UpcycleError: an expert-construction option was given (the adapter already decides the
            experts and the router), or the adapter cannot be exported exactly.
    """
    from upcycle.commands.export import export_from_args
    from upcycle.errors import UpcycleError
    from upcycle.options import given_options

    given = given_options(
        {
            "method": args.method != "copy",
            "target": args.target != "auto",
            "shared_experts": bool(args.shared_experts),
            "router_init": args.router_init is not None,
            "calibration": args.calibration is not None,
            "moe_layers": args.moe_layers != "all",
            "router": args.router != "topk",
            "router_option": bool(args.router_option),
            "ffn_pattern": args.ffn_pattern is not None,
            "expert_groups": args.expert_groups is not None,
            "top_groups": args.top_groups is not None,
            "routed_scaling": args.routed_scaling is not None,
        }
    )
    if given:
        raise UpcycleError(
            f"{', '.join(given)} cannot be combined with --from-mope: the adapter's experts and router are exported "
            "as they are; drop those options"
        )
    return export_from_args(args.from_mope, args.output, args.source, args, "convert")
