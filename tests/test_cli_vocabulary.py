"""One vocabulary: SOURCE OUTPUT positionals, --calibration/--calibration-samples, --branch for push;
the older spellings still parse to the same options; messages spell options as the caller does."""

from __future__ import annotations

import pytest

from upcycle.cli import build_parser, main
from upcycle.convert import convert
from upcycle.errors import UpcycleError

EXAMPLE = "examples/tiny-llama"


def test_routes_old_and_new_spellings_parse_alike():
    parser = build_parser()
    new = parser.parse_args(["routes", "moe", "report", "--calibration", "c.txt", "--calibration-samples", "7"])
    old = parser.parse_args(["routes", "moe", "--out", "report", "--data", "c.txt", "--samples", "7"])
    assert (new.source, new.output, new.calibration, new.calibration_samples) == ("moe", "report", "c.txt", 7)
    assert (old.source, old.output_option, old.calibration, old.calibration_samples) == ("moe", "report", "c.txt", 7)


def test_push_branch_and_its_old_spelling():
    parser = build_parser()
    assert parser.parse_args(["push", "out", "me/repo", "--branch", "dev"]).branch == "dev"
    assert parser.parse_args(["push", "out", "me/repo", "--revision", "dev"]).branch == "dev"


def test_every_writing_command_takes_the_shared_output_options():
    parser = build_parser()
    for argv in (["convert", "a", "b"], ["merge", "a", "b"], ["export", "a", "b"]):
        args = parser.parse_args([*argv, "--max-shard-size", "2GiB", "--force", "--quiet", "--revision", "r1"])
        assert (args.max_shard_size, args.force, args.quiet, args.revision) == ("2GiB", True, True, "r1")


def test_usage_errors_are_one_line(capsys):
    assert main(["merge", "a", "b", "--method", "fisher"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("upcycle: error: argument --method: invalid choice: 'fisher'")


def test_messages_name_cli_flags_from_the_cli_and_keywords_from_python(tmp_path, capsys):
    assert main(["convert", EXAMPLE, str(tmp_path / "a"), "--router-std", "nan"]) == 2
    assert capsys.readouterr().err.strip() == "upcycle: error: --router-std must be a finite number, got nan"
    with pytest.raises(UpcycleError, match=r"^router_std must be a finite number, got nan$"):
        convert(EXAMPLE, tmp_path / "b", router_std=float("nan"))
    assert list(tmp_path.iterdir()) == []
