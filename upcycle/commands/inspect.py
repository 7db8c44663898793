"""`upcycle inspect`: what a checkpoint or MoPE adapter holds (family, layout, experts, parameters)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "inspect",
        help="show a checkpoint's MoE structure and parameter counts",
        description="Read config files and safetensors headers (no weights are loaded) of a local folder or Hub id "
        "and report family, layout, MoE layers, experts, top-k, shared experts, router, total and active "
        "parameters and upcycle provenance; for a MoPE adapter, its routing, modules and experts.",
    )
    parser.add_argument("source", help="a model or MoPE adapter folder, or a Hub model id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--json", action="store_true", help="print the stable JSON schema documented in README")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the inspection of `args.source` (text or JSON) and return exit code 0."""
    from upcycle.inspection import format_report, inspect_source

    info = inspect_source(args.source, revision=args.revision)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_report(info))
    return 0
