"""Data-directory layout and the file-system steps of a crash-safe write.

Layout::

    <data_dir>/catalog.db                      # SQLite catalog (unless a db_url is given)
    <data_dir>/runs/<run_id>/epoch_000005.h5   # one immutable HDF5 file per captured epoch

Only run ids that match :data:`RUN_ID_PATTERN` and integer epochs are ever turned
into paths; no name read from an epoch file or a request becomes a path.
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
    "clean_stray_tmp",
    "default_data_dir",
    "ensure_dir",
    "epoch_filename",
    "epoch_relpath",
    "fsync_dir",
    "fsync_file",
    "run_lock",
    "sha256_file",
    "tmp_path",
    "validate_epoch",
    "validate_run_id",
]

CATALOG_FILE = "catalog.db"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TMP_MARK = ".tmp."
STRAY_TMP_AGE_S = 60.0  # a temp file of a dead writer older than this is removed
STRAY_TMP_MAX_AGE_S = 24 * 3600.0  # any temp file older than this is removed


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


def clean_stray_tmp(directory: Path) -> list[Path]:
    """Remove temp files left by killed writers; returns what was removed.

    A temp file is removed when its writer's pid is gone and it is older than a
    minute, or when it is older than a day (whatever wrote it).
    """
    removed: list[Path] = []
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            name = entry.name
            if TMP_MARK not in name or not entry.is_file(follow_symlinks=False):
                continue
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
                pid_part = name.rsplit(TMP_MARK, 1)[1].split(".", 1)[0]
                dead = not (pid_part.isdigit() and _pid_alive(int(pid_part)))
                if age > STRAY_TMP_MAX_AGE_S or (dead and age > STRAY_TMP_AGE_S):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                continue
    return removed


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
