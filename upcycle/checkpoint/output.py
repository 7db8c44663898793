"""Where a writer's output goes, and what it never does to what is already there.

A run writes into `OUT.tmp-*` next to `OUT` and renames it to `OUT` only when complete:
- one run at a time per output: an exclusive `flock` on `.OUT.upcycle-lock` (next to `OUT`) for the
  whole run; a second run into the same `OUT` stops at once with one line;
- the final move never replaces what it did not check: without `force` it is a rename that fails if
  `OUT` exists (`renameat2(RENAME_NOREPLACE)`), so a folder that appeared at `OUT` meanwhile is kept;
- SIGTERM and SIGHUP (`timeout`, `docker stop`, schedulers, a closed terminal) are handled like
  Ctrl-C: the temporary directory is removed and the run stops with a clear message; during the
  final move they are held, and one that came before the move stops the run as before (one that
  came during the rename itself is delivered after it, as if it had come after the run);
- a temporary directory holds an owner file (`.upcycle-owner`: pid and host), so one left by SIGKILL
  is recognised, and removed with a notice, by the next run into the same output (which holds the
  lock, so no live run can own it);
- every OSError while writing (a full disk, a read-only folder) becomes one line naming the path;
- the output's permissions follow the umask, as `save_pretrained`'s do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from upcycle.errors import Interrupted, UpcycleError, flag

OWNER_FILE = ".upcycle-owner"
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def check_output_dir(output: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless `force`.

    Raises:
        UpcycleError: `output` exists and `force` is False.
    """
    if Path(output).exists() and not force:
        raise UpcycleError(f"{output} already exists; choose another output or pass {flag('force')} to replace it")


def _lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.upcycle-lock"


@contextlib.contextmanager
def _exclusive_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on `output` for the block; removed (under the lock) on the way out.

    Raises:
        UpcycleError: another run holds it.
    """
    import fcntl

    path = _lock_path(output)
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _one_line(err, output) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise UpcycleError(
                f"another upcycle run (pid {holder}) is writing {output}; "
                "wait for it to finish or choose another output"
            ) from None
        try:
            same_file = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the previous holder removed it between our open and our lock: take the new one
            break
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(descriptor)


def _sweep_stale_temporaries(output: Path) -> None:
    """Remove temporary directories of `output` that a killed run left (they carry our owner file;
    the caller holds the output's lock, so no live run owns them), with a notice on stderr."""
    for candidate in output.parent.glob(f"{output.name}.tmp-*"):
        owner = candidate / OWNER_FILE
        if candidate.is_dir() and owner.is_file():
            left_by = owner.read_text().strip()
            shutil.rmtree(candidate, ignore_errors=True)
            print(f"upcycle: notice: removed {candidate}, left by a run that was killed ({left_by})", file=sys.stderr)


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing (FileExistsError) rather than replacing anything at `target`."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # not Linux (or an old libc): check, then rename (a narrow race, on non-empty folders only)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        os.rename(source, target)
        return
    result = renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
    if result != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS):  # a file system without RENAME_NOREPLACE
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
            os.rename(source, target)
            return
        raise OSError(code, os.strerror(code), str(target))


_TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _TerminationSignals:
    """Within the block, SIGTERM and SIGHUP raise `Interrupted` (main thread only; elsewhere a no-op).

    After `defer()` (the final move), they are recorded instead: `raise_if_pending()` raises one
    that came before anything irrevocable; one that came during the move itself is delivered again
    on the way out, to the handler in place then, as if it had come just after the run.
    """

    def __init__(self) -> None:
        self.deferring = False
        self.pending: int | None = None
        self.previous: dict[int, object] = {}

    def _handler(self, signal_number: int, frame: object) -> None:
        if self.deferring:
            self.pending = self.pending or signal_number
            return
        raise Interrupted(signal_number)

    def __enter__(self) -> _TerminationSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handler) for number in _TERMINATION_SIGNALS}
        return self

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        for number, old in self.previous.items():
            if old is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(number, old)
        if self.pending is not None and kind is None:
            signal.raise_signal(self.pending)

    def defer(self) -> None:
        self.deferring = True

    def raise_if_pending(self) -> None:
        if self.pending is not None:
            number, self.pending = self.pending, None
            raise Interrupted(number)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_files(directory: Path) -> None:
    """Flush every file below `directory` (config, tokenizer, card; shards are flushed as they close),
    then the directory itself, so a completed output survives a power loss once renamed."""
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _one_line(err: OSError, output: Path) -> UpcycleError:
    where = err.filename or output
    if err.errno == errno.ENOSPC:
        return UpcycleError(
            f"no space left on the device while writing {where}; nothing was written at {output} "
            "(free space or choose another output)"
        )
    return UpcycleError(f"cannot write {where}: {err.strerror or err} (nothing was written at {output})")


@contextlib.contextmanager
def atomic_output_dir(output: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `output`; on success move it to `output`.

    The run holds `output`'s lock throughout. On any exception (KeyboardInterrupt, SIGTERM and
    SIGHUP included) the temporary directory is removed and `output` is left as it was. With
    `force`, an existing `output` is replaced only after success; without it, the final move fails
    rather than replace a folder that appeared at `output` during the run.

    Raises:
        UpcycleError: `output` exists and `force` is False, another run is writing `output`, or the
            file system refused a write (one line naming the path).
        Interrupted: SIGTERM or SIGHUP arrived.
    """
    output = Path(output).absolute()
    check_output_dir(output, force)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _one_line(err, output) from None
    with _TerminationSignals() as signals, _exclusive_lock(output):
        check_output_dir(output, force)  # again, under the lock
        try:
            _sweep_stale_temporaries(output)
            temporary = Path(tempfile.mkdtemp(prefix=f"{output.name}.tmp-", dir=output.parent))
        except OSError as err:
            raise _one_line(err, output) from None
        try:
            temporary.chmod(0o777 & ~_umask())
            (temporary / OWNER_FILE).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
            yield temporary
            signals.defer()
            (temporary / OWNER_FILE).unlink()
            _fsync_files(temporary)
            signals.raise_if_pending()
            _move_into_place(temporary, output, force)
            _fsync_directory(output.parent)
        except OSError as err:
            shutil.rmtree(temporary, ignore_errors=True)
            raise _one_line(err, output) from None
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise


def _move_into_place(temporary: Path, output: Path, force: bool) -> None:
    """Rename the complete `temporary` to `output`; with `force`, an existing `output` is replaced
    (and put back if the new one cannot take its place).

    Raises:
        UpcycleError: without `force`, something appeared at `output`.
        OSError: a rename failed.
    """
    if force and os.path.lexists(output):
        backup = Path(tempfile.mkdtemp(prefix=f"{output.name}.old-", dir=output.parent))
        os.replace(output, backup / output.name)
        try:
            os.replace(temporary, output)
        except BaseException:
            os.replace(backup / output.name, output)
            backup.rmdir()
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return
    try:
        _rename_no_replace(temporary, output)
    except FileExistsError:
        raise UpcycleError(
            f"{output} appeared while this run was writing; it was left as it is and nothing was "
            f"written (choose another output, or pass {flag('force')} to replace it)"
        ) from None
