"""Data-directory layout and the file-system steps of a crash-safe write.

Layout::

    <data_dir>/catalog.db                      # SQLite catalog (unless a db_url is given)
    <data_dir>/runs/<run_id>/epoch_000005.h5   # one immutable HDF5 file per captured epoch

Only run ids that match :data:`RUN_ID_PATTERN` and integer epochs are ever turned
into paths; no name read from an epoch file or a request becomes a path.

Temp files (``<name>.tmp.<pid>.<hex>``) are held under an exclusive ``flock`` by their
writer from creation until they are renamed or removed (:func:`locked_tmp`,
:func:`locked_tmp_file`). A temp file belongs to a dead writer when that lock can be
taken *and* the pid in its name is not a live process that started before the file was
last written (the second test covers a writer between create and lock, writers that do
not lock, and pid reuse). No age limit is involved: :func:`remove_dead_tmp` removes such a
file at once, and never a live writer's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from trainer.errors import BnnError, ErrorCode

try:  # POSIX only; elsewhere the per-run lock is a no-op.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CATALOG_FILE",
    "RUN_ID_PATTERN",
    "TMP_MARK",
    "UPLOAD_DIR",
    "clean_stray_tmp",
    "default_data_dir",
    "ensure_dir",
    "epoch_filename",
    "epoch_relpath",
    "fsync_dir",
    "fsync_file",
    "is_tmp_name",
    "locked_tmp",
    "locked_tmp_file",
    "probe_tmp",
    "remove_dead_tmp",
    "run_lock",
    "sha256_file",
    "tmp_path",
    "validate_epoch",
    "validate_run_id",
]

CATALOG_FILE = "catalog.db"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TMP_MARK = ".tmp."
UPLOAD_DIR = "uploads"  # under the data dir: temp files of uploads in progress (the service's)
_TMP_RE = re.compile(r"\.tmp\.(\d+)\.[0-9a-f]+$")


def default_data_dir() -> Path:
    """``$BNN_DATA_DIR`` or ``./bnn-data``."""
    return Path(os.environ.get("BNN_DATA_DIR", "bnn-data"))


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a safe run id, else raise NOT_FOUND naming it."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise BnnError.not_found(f"unknown run {run_id!r}", run_id=str(run_id))
    return run_id


def validate_epoch(epoch: object) -> int:
    """Return ``epoch`` if it is an int >= 0, else raise INVALID_ARGUMENT naming it."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise BnnError.invalid(f"epoch must be an integer >= 0, got {epoch!r}", epoch=repr(epoch))
    return int(epoch)


def epoch_filename(epoch: int) -> str:
    return f"epoch_{validate_epoch(epoch):06d}.h5"


def epoch_relpath(run_id: str, epoch: int) -> str:
    """Path of an epoch file relative to the data dir, with forward slashes."""
    return f"runs/{validate_run_id(run_id)}/{epoch_filename(epoch)}"


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and check it is writable; STORAGE error naming it if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BnnError(
            ErrorCode.STORAGE,
            f"cannot create directory {str(path)!r}: {exc.strerror or exc}",
            path=str(path),
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise BnnError(
            ErrorCode.STORAGE, f"directory {str(path)!r} is not writable", path=str(path)
        )
    return path


def tmp_path(final: Path) -> Path:
    """A unique temporary name beside ``final``: ``<name>.tmp.<pid>.<hex>``."""
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}.{uuid.uuid4().hex[:8]}")


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` is a temp file name of :func:`tmp_path` (``*.tmp.<pid>.<hex>``)."""
    return _TMP_RE.search(name) is not None


def _tmp_pid(name: str) -> int | None:
    match = _TMP_RE.search(name)
    return int(match.group(1)) if match else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _process_start(pid: int) -> float | None:
    """Wall-clock start of ``pid`` from ``/proc`` (Linux); -1.0 for a zombie, None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):  # exited, not yet reaped: holds no files
            return -1.0
        ticks = int(fields[19])  # field 22 of proc(5): starttime, clock ticks after boot
        boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _writer_alive(pid: int | None, mtime: float) -> bool:
    """Whether process ``pid`` lives and is the one that wrote a file last modified at ``mtime``.

    A process that started after the file's last write cannot have written it: the pid
    was reused after the writer died.
    """
    if pid is None or not _pid_alive(pid):
        return False
    start = _process_start(pid)
    if start is None:  # no /proc: all we know is that the pid is taken
        return True
    return 0 <= start <= mtime + 0.05  # 10 ms clock ticks, a little clock slack


def _lock_nb(fd: int) -> bool:
    """Try to take an exclusive lock on ``fd`` without waiting."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _probe(path: Path) -> tuple[str, int | None]:
    """``("alive" | "dead" | "gone", fd)``; for "dead" the fd holds the file's lock."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return "gone", None
    try:
        st = os.fstat(fd)
        if not _lock_nb(fd) or _writer_alive(_tmp_pid(path.name), st.st_mtime):
            os.close(fd)
            return "alive", None
    except BaseException:
        os.close(fd)
        raise
    return "dead", fd


def probe_tmp(path: Path) -> str:
    """``"alive"`` (its writer holds it or runs), ``"dead"`` or ``"gone"``; changes nothing."""
    state, fd = _probe(path)
    if fd is not None:
        os.close(fd)
    return state


def remove_dead_tmp(path: Path) -> bool:
    """Remove the temp file ``path`` if its writer is dead (see the module docstring).

    The file is unlinked while its lock is held, so a live writer never loses it. Returns
    whether it was removed; OSError when it cannot be.
    """
    _, fd = _probe(path)
    if fd is None:
        return False
    try:
        st, now = os.fstat(fd), os.lstat(path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):  # replaced meanwhile
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


def clean_stray_tmp(directory: Path) -> list[Path]:
    """Remove the temp files (``*.tmp.<pid>.<hex>``) of dead writers in ``directory``.

    Returns what was removed; files that cannot be looked at are left alone.
    """
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if not is_tmp_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if remove_dead_tmp(Path(entry.path)):
                    removed.append(Path(entry.path))
    return removed


def _create_locked(path: Path) -> int:
    """Create ``path`` (it must not exist) and lock it; returns the descriptor (O_RDWR)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a checker holds it
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def _tmp_error(directory: Path, exc: OSError) -> BnnError:
    return BnnError(
        ErrorCode.STORAGE,
        f"cannot create a temp file in {str(directory)!r}: {exc.strerror or exc}",
        path=str(directory),
    )


@contextlib.contextmanager
def locked_tmp(final: Path) -> Iterator[Path]:
    """A new, empty temp file beside ``final`` (:func:`tmp_path`), locked until the block ends.

    Write it by name (the lock is on the file, not on a descriptor the writer uses) and
    rename it into place inside the block; whatever is still at the temp name at the end
    is removed, then the lock is let go. STORAGE error when it cannot be created.
    """
    tmp = tmp_path(final)
    try:
        fd = _create_locked(tmp)
    except OSError as exc:
        raise _tmp_error(final.parent, exc) from exc
    try:
        yield tmp
    finally:
        try:
            tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked_tmp_file(
    directory: Path, prefix: str = "", suffix: str = ""
) -> Iterator[tuple[int, Path]]:
    """Like :func:`tempfile.mkstemp`, for uploads: ``(fd, path)`` of a new file, locked.

    ``fd`` is open for writing and the caller's to close (``os.fdopen(fd, "wb")``); the
    lock lives on a separate descriptor until the block ends, when the file (if still
    there) is removed and the lock let go. The name is
    ``<prefix><hex><suffix>.tmp.<pid>.<hex>``, so a checker can tell that the writer
    died (:func:`remove_dead_tmp`). STORAGE error when it cannot be created.
    """
    path = tmp_path(directory / f"{prefix}{uuid.uuid4().hex[:12]}{suffix}")
    try:
        lock_fd = _create_locked(path)
    except OSError as exc:
        raise _tmp_error(directory, exc) from exc
    try:
        fd = os.dup(lock_fd)  # the same open file: closing one keeps the lock on the other
    except OSError as exc:
        path.unlink(missing_ok=True)
        os.close(lock_fd)
        raise _tmp_error(directory, exc) from exc
    try:
        yield fd, path
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(lock_fd)


def fsync_file(path: Path) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on ``<run_dir>/.lock`` for the place-and-commit step of a write."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
