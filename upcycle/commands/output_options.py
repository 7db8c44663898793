"""The options every subcommand that writes a checkpoint shares: `--revision` (of the source),
`--max-shard-size`, `--force`, `--quiet` and `--push-to-hub REPO_ID [--private]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.hub import PushResult, push_folder, require_token


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the source's `--revision`, `--max-shard-size`, `--force`, `--quiet` and the push options."""
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the source")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB = 5e9 bytes; 2GiB = 2^31)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUTPUT if it exists (only once the new one is complete)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_push_arguments(parser)


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--push-to-hub REPO_ID` and `--private` to a subcommand that writes an output folder."""
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="after writing the output, upload it to this Hub model repo (token from HF_TOKEN or `hf auth login`)",
    )
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private (with --push-to-hub)")


def check_push_token(args: argparse.Namespace) -> None:
    """Fail before any work when `--push-to-hub` is asked for but no token is available.

    Raises:
        UpcycleError: --push-to-hub without a token, or --private without --push-to-hub.
    """
    if getattr(args, "push_to_hub", None):
        require_token(None)
    elif getattr(args, "private", False):
        raise UpcycleError("--private only applies with --push-to-hub REPO_ID")


def push_if_requested(args: argparse.Namespace, directory: str | Path, quiet: bool = False) -> PushResult | None:
    """Push the finished `directory` when `args.push_to_hub` is set; return the result or None.

    Raises:
        UpcycleError: as `push_folder`, saying that the output is complete and how to push it again.
    """
    if not getattr(args, "push_to_hub", None):
        return None
    try:
        result = push_folder(directory, args.push_to_hub, private=args.private)
    except UpcycleError as err:
        raise UpcycleError(
            f"{err}; the output {directory} is complete, push it again with `upcycle push {directory} "
            f"{args.push_to_hub}`"
        ) from None
    if not quiet:
        print(f"pushed {directory} to {result.repo_url} ({result.revision}, commit {result.commit_oid[:8]})")
    return result
