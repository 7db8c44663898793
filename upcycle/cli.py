"""The `upcycle` command line: each subcommand parses its options and calls the library.

Each subcommand lives in `upcycle/commands/<name>.py` with `register(subparsers)` (adds its parser
and sets `run`); adding a subcommand is adding a module and its name to `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from upcycle.errors import Interrupted, UpcycleError, cli_spelling

EXIT_USER_ERROR = 2
COMMANDS = ("convert", "merge", "compose", "export", "inspect", "routes", "push")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the CLI."""

    def error(self, message: str) -> None:
        """Print `upcycle: error: MESSAGE (see ... --help)` and exit with code 2."""
        self.exit(EXIT_USER_ERROR, f"upcycle: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand of `COMMANDS` registered."""
    parser = OneLineParser(prog="upcycle", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMANDS:
        importlib.import_module(f"upcycle.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 on success, 2 on a user error or an interrupt."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed on one line
        return int(exit_request.code or 0)
    try:
        with cli_spelling():
            return args.run(args)
    except UpcycleError as err:
        print(f"upcycle: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("upcycle: error: interrupted; no output was written", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as signal_received:
        print(f"upcycle: error: {signal_received}; no output was written", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
