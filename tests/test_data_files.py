"""`upcycle.data_files`: calibration and training accept the same kinds of data, and a hostile file
(empty, binary, Latin-1, unknown extension) is one line naming the file and the fix, no traceback."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from upcycle.calibration import load_calibration_texts
from upcycle.cli import main as upcycle_main
from upcycle.data_files import DataFileError, load_error_detail, resolve_data_source
from upcycle.errors import UpcycleError
from upcycle.training.config import ConfigError, DataSection
from upcycle.training.data import check_data_sources, load_raw

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "configs" / "smoke_cpu.yaml"
TEXTS = ["the first document", "a second one", "and a third"]


def _write_kind(kind: str, root: Path) -> Path:
    """Write `TEXTS` as data of `kind` under `root`; return the path a user would give."""
    rows = [{"text": text} for text in TEXTS]
    if kind in ("txt", "text", "md"):
        path = root / f"corpus.{kind}"
        path.write_text("\n\n".join(TEXTS) + "\n")
    elif kind == "jsonl":
        path = root / "corpus.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "json":
        path = root / "corpus.json"
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        path = root / "corpus.csv"
        path.write_text("text\n" + "".join(f"{text}\n" for text in TEXTS))
    elif kind == "parquet":
        from datasets import Dataset

        path = root / "corpus.parquet"
        Dataset.from_list(rows).to_parquet(str(path))
    else:  # a directory of data files
        path = root / "corpus"
        path.mkdir()
        (path / "part-0.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


KINDS = ["txt", "text", "md", "jsonl", "json", "csv", "parquet", "directory"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_loads_for_calibration_and_training(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = _write_kind(kind, tmp_path)
    assert load_calibration_texts(path, samples=10) == TEXTS
    dataset = load_raw(str(path), "data.train", DataSection(train=str(path)), "train")
    assert [str(row["text"]).strip() for row in dataset] == TEXTS


def test_a_hub_id_goes_to_datasets_unchanged_for_both_callers(monkeypatch):
    from datasets import Dataset

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, kwargs.get("data_files")))
        return Dataset.from_list([{"text": text} for text in TEXTS])

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    assert resolve_data_source("org/corpus") == ("org/corpus", {})
    assert load_calibration_texts("org/corpus") == TEXTS
    assert len(load_raw("org/corpus", "data.train", DataSection(train="org/corpus"), "train")) == len(TEXTS)
    assert calls == [("org/corpus", None), ("org/corpus", None)]


def _hostile(kind: str, root: Path) -> Path:
    files = {
        "empty": ("empty.txt", b""),
        "whitespace": ("blank.jsonl", b"\n  \n"),
        "binary": ("weights.txt", bytes(range(256)) * 4),
        "latin-1": ("notes.csv", "text\ncafé crème\n".encode("latin-1")),
        "utf-16": ("notes.txt", "some text".encode("utf-16")),
        "not-parquet": ("table.parquet", b"text\nhello\n"),
        "unknown-extension": ("corpus.docx", b"PK\x03\x04"),
        "missing": ("nowhere/corpus.jsonl", None),
    }
    name, content = files[kind]
    path = root / name
    if content is not None:
        path.write_bytes(content)
    return path


HOSTILE = {
    "empty": "is empty: it holds no text; add data or give another file",
    "whitespace": "holds no text (whitespace only)",
    "binary": "is not UTF-8 text (it holds NUL bytes: binary or UTF-16); save it as UTF-8 text",
    "latin-1": "is not UTF-8 text (byte 0xe9 at offset 8); re-encode it as UTF-8",
    "utf-16": "is not UTF-8 text (it holds NUL bytes",
    "not-parquet": "is not a Parquet file (no PAR1 header)",
    "unknown-extension": "has extension '.docx'; use one of .txt, .text, .md, .jsonl, .json, .parquet, .csv",
    "missing": "does not exist",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_file_is_one_line_for_both_callers(kind, tmp_path):
    path = _hostile(kind, tmp_path)
    with pytest.raises(DataFileError) as resolved:
        resolve_data_source(path)
    assert str(resolved.value).startswith(f"file {path} {HOSTILE[kind]}")
    assert "\n" not in str(resolved.value)

    with pytest.raises(UpcycleError) as calibration:
        load_calibration_texts(path)
    assert str(calibration.value) == f"calibration {resolved.value}"

    data = DataSection(train=str(path))
    with pytest.raises(ConfigError) as training:
        check_data_sources(data)
    assert str(training.value) == f"data.train: {resolved.value}"
    with pytest.raises(ConfigError, match="^data.train: file "):
        load_raw(str(path), "data.train", data, "train")


def test_an_empty_directory_is_refused(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataFileError, match=r"^directory .*corpus holds no files; put the data files in it"):
        resolve_data_source(tmp_path / "corpus")


def test_a_bad_byte_past_the_sniffed_prefix_is_still_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "late.txt"
    path.write_bytes(b"hello world\n\n" * 1000 + "café\n".encode("latin-1"))
    resolve_data_source(path)  # the first 4 KB are clean UTF-8
    with pytest.raises(UpcycleError) as calibration:
        load_calibration_texts(path, samples=5000)
    assert str(calibration.value).startswith(f"cannot load calibration data {path}: it is not UTF-8 text (")
    with pytest.raises(ConfigError) as training:
        load_raw(str(path), "data.train", DataSection(train=str(path)), "train")
    assert str(training.value).startswith(f"data.train: cannot load {path}: it is not UTF-8 text (")
    assert "\n" not in str(calibration.value) + str(training.value)


def test_load_error_detail_is_the_first_line_without_a_decode_error():
    assert load_error_detail(FileNotFoundError("no such dataset\nmore detail")) == "no such dataset"
    assert load_error_detail(RuntimeError()) == "RuntimeError"


@pytest.mark.parametrize("kind", ["empty", "binary", "latin-1", "unknown-extension"])
def test_hostile_calibration_file_is_one_cli_line(kind, dense_models, tmp_path, capsys):
    path = _hostile(kind, tmp_path)
    output = tmp_path / "out"
    args = ["convert", str(dense_models["llama-gqa"]), str(output), "--experts", "2", "--top-k", "1"]
    args += ["--router-init", "kmeans", "--calibration", str(path), "--quiet"]
    capsys.readouterr()
    assert upcycle_main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"upcycle: error: calibration file {path} {HOSTILE[kind]}"), lines
    assert not output.exists()


@pytest.mark.parametrize("kind", ["empty", "binary", "latin-1", "unknown-extension"])
def test_hostile_training_file_is_one_recipe_line(kind, tmp_path, capsys):
    path = _hostile(kind, tmp_path)
    finetune_main = runpy.run_path(str(ROOT / "recipes" / "finetune.py"), run_name="finetune_recipe")["main"]
    with pytest.raises(SystemExit) as exit_info:
        finetune_main([str(SMOKE), "-o", f"output.dir={tmp_path / 'run'}", "-o", f"data.train={path}"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune: error: data.train: file {path} {HOSTILE[kind]}"), lines
    assert not (tmp_path / "run").exists()
