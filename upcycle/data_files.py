"""Data files: one resolver from a local file, a local directory or a Hub dataset id to the
`datasets.load_dataset` call that reads it, shared by calibration (`upcycle.calibration`) and
training (`upcycle.training.data`), so both accept the same kinds of input:

==========================  ======================================================
``.txt`` ``.text`` ``.md``  plain text, one example per paragraph (``text`` field)
``.jsonl`` ``.json``        JSON lines or a JSON document (``json`` builder)
``.parquet``                Parquet (``parquet`` builder)
``.csv``                    CSV with a header row (``csv`` builder)
a directory                 whatever `datasets` infers from the files in it
anything else               a Hub dataset id such as ``org/name``
==========================  ======================================================

A local file is checked before `datasets` sees it (the first `SNIFF_BYTES` bytes only, so a large
corpus costs nothing): an empty file, a text file that is not UTF-8 (Latin-1, UTF-16, a binary
renamed .txt) or a Parquet file without the Parquet magic each raise one `DataFileError` line that
names the file, the problem and the fix, instead of a traceback from deep inside `datasets`.
`load_error_detail` turns an error `datasets` raises later (a bad byte past the sniffed prefix, an
unknown Hub id) into one line as well. Depends on `upcycle.errors` only; `datasets` is not imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from upcycle.errors import UpcycleError

LOCAL_BUILDERS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
SNIFF_BYTES = 4096
PARQUET_MAGIC = b"PAR1"
_REENCODE = "re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`)"


class DataFileError(UpcycleError):
    """A local data file or directory that cannot be read; the message starts with ``file <path>``
    or ``directory <path>`` so a caller can prefix what the data is for (``calibration``, ``data.train:``)."""


def resolve_data_source(source: str | Path, split: str = "train") -> tuple[str, dict[str, Any]]:
    """Return ``(builder, load_dataset kwargs)`` that load `source`: a local data file (its builder,
    ``data_files={split: path}``, ``sample_by="paragraph"`` for text), a local directory (the
    directory, no kwargs) or a Hub dataset id (the id, no kwargs).

    A source that does not exist is read as a Hub id unless it looks like a path: a data-file
    extension, a leading ``.``, ``/`` or ``~``, or more than one ``/``.

    Raises:
        DataFileError: a path that does not exist, an unknown extension, an empty directory, an
            empty file, a text file that is not UTF-8, or a Parquet file that is not Parquet.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataFileError(
                f"file {text} has extension {path.suffix!r}; use one of {', '.join(LOCAL_BUILDERS)}, "
                "a directory or a Hub dataset id"
            )
        check_data_file(path, builder, text)
        kwargs: dict[str, Any] = {"data_files": {split: str(path)}}
        if builder == "text":
            kwargs["sample_by"] = "paragraph"
        return builder, kwargs
    if path.is_dir():
        if not any(path.iterdir()):
            raise DataFileError(f"directory {text} holds no files; put the data files in it or give a file")
        return str(path), {}
    if path.suffix.lower() in LOCAL_BUILDERS or text.startswith((".", "/", "~")) or text.count("/") > 1:
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise DataFileError(f"file {text} does not exist{where}; check the path")
    return text, {}


def is_local_file(kwargs: dict[str, Any]) -> bool:
    """Return whether `resolve_data_source` gave these kwargs for a local file (one split only)."""
    return "data_files" in kwargs


def check_data_file(path: Path, builder: str, name: str | None = None) -> None:
    """Check the first `SNIFF_BYTES` bytes of the local file `path` that `builder` will read.

    Raises:
        DataFileError: the file is empty (or whitespace only), a Parquet file lacks the Parquet
            magic, or a text file (text, json, csv) is not UTF-8 or holds NUL bytes.
    """
    name = name or str(path)
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
        complete = not handle.read(1)
    if not head:
        raise DataFileError(f"file {name} is empty: it holds no text; add data or give another file")
    if builder == "parquet":
        if not head.startswith(PARQUET_MAGIC):
            raise DataFileError(
                f"file {name} is not a Parquet file (no PAR1 header); convert it to Parquet or fix its extension"
            )
        return
    if b"\x00" in head:
        raise DataFileError(
            f"file {name} is not UTF-8 text (it holds NUL bytes: binary or UTF-16); save it as UTF-8 text"
        )
    try:
        decoded = head.decode("utf-8") if complete else _decode_prefix(head)
    except UnicodeDecodeError as err:
        raise DataFileError(
            f"file {name} is not UTF-8 text (byte 0x{head[err.start]:02x} at offset {err.start}); {_REENCODE}"
        ) from None
    if complete and not decoded.strip():
        raise DataFileError(f"file {name} holds no text (whitespace only); add data or give another file")


def _decode_prefix(head: bytes) -> str:
    """Decode a prefix that may end inside a multi-byte character (only the cut is tolerated)."""
    import codecs

    return codecs.getincrementaldecoder("utf-8")().decode(head, final=False)


def load_error_detail(err: BaseException) -> str:
    """Return one line describing an exception `datasets.load_dataset` (or iterating its result)
    raised: "it is not UTF-8 text ..." when a UnicodeDecodeError is in its chain (a bad byte past
    the sniffed prefix), else the first line of its message (or its type name)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, UnicodeDecodeError):
            return f"it is not UTF-8 text ({cause.reason} at byte 0x{cause.object[cause.start]:02x}); {_REENCODE}"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
