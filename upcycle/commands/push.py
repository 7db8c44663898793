"""`upcycle push`: upload a finished output folder to a Hub model repo."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `push` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "push",
        help="upload a finished output folder to the Hugging Face Hub",
        description="Create the model repo if needed (create_repo exist_ok) and upload every file of DIR in one "
        "commit (upload_folder). The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT is honoured.",
    )
    parser.add_argument("output", help="a finished output folder (config.json or adapter_config.json inside)")
    parser.add_argument("repo_id", help="Hub model repo, e.g. me/llama-moe")
    parser.add_argument("--private", action="store_true", help="create the repo as private (ignored if it exists)")
    parser.add_argument("--branch", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--revision", dest="branch", help=argparse.SUPPRESS)  # the old spelling of --branch
    parser.add_argument(
        "--commit-message", default=None, help="commit title (default: the operation read from the folder)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Push as `args` say, print where it landed unless quiet, and return exit code 0."""
    from upcycle.hub import push_folder

    result = push_folder(
        args.output,
        args.repo_id,
        private=args.private,
        branch=args.branch,
        commit_message=args.commit_message,
    )
    if not args.quiet:
        print(f"pushed {args.output} to {result.repo_url} ({result.revision}, commit {result.commit_oid[:8]})")
    return 0
