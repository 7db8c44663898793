"""Bad input to `upcycle merge`: one line on stderr, exit code 2, and nothing written."""

import pytest
from test_merge import MIXTRAL, make_moe

from upcycle.cli import main
from upcycle.convert import convert


@pytest.fixture(scope="module")
def sources(dense_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-sources")
    convert(dense_models["llama-gqa"], root / "upcycled", experts=3, top_k=2, quiet=True)
    return {
        "dense": dense_models["llama-gqa"],
        "upcycled": root / "upcycled",
        "foreign": make_moe(root / "foreign", *MIXTRAL),
    }


CASES = {
    "dense-model-given": ("dense", [], "is a dense model, not a MoE"),
    "unknown-method": (
        "upcycled",
        ["--method", "fisher"],
        "argument --method: invalid choice: 'fisher' (choose from 'average', 'frequency'",
    ),
    "experts-not-fewer": ("upcycled", ["--experts", "3"], "--experts must be between 1 and 2"),
    "ties-without-base": ("foreign", ["--method", "ties"], "--method ties needs a base FFN"),
    "missing-calibration-file": (
        "upcycled",
        ["--method", "frequency", "--calibration", "no/such/file.jsonl"],
        "calibration file no/such/file.jsonl does not exist",
    ),
    "frequency-without-data": ("upcycled", ["--method", "frequency"], "needs --calibration DATA"),
    "concat-with-experts": ("upcycled", ["--method", "concat", "--experts", "2"], "cannot keep --experts K"),
    "bad-density": (
        "upcycled",
        ["--method", "dare", "--density", "0"],
        "--density must be above 0 and at most 1, got 0.0",
    ),
    "base-of-another-width": (
        "foreign",
        ["--method", "ties", "--base", "{dense}"],
        "task vectors need a base FFN as wide as one expert",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_merge_input_is_one_line_exit_2_and_writes_nothing(sources, tmp_path, capsys, case):
    source, options, message = CASES[case]
    output = tmp_path / "out"
    options = [option.format(dense=sources["dense"]) for option in options]
    assert main(["merge", str(sources[source]), str(output), *options]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("upcycle: error: ")
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_replaced_without_force(sources, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert main(["merge", str(sources["upcycled"]), str(output)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert main(["merge", str(sources["upcycled"]), str(output), "--force", "--quiet"]) == 0
    assert (output / "config.json").is_file() and not (output / "keep.txt").exists()
