"""RunStore: a data directory of immutable HDF5 epoch files plus its :class:`Catalog`.

Layout: ``<data_dir>/catalog.db`` (unless ``db_url`` is given) and
``<data_dir>/runs/<run_id>/epoch_000005.h5``.

Writing an epoch: the HDF5 file is written to a temp name in the run's folder, flushed
and fsynced, renamed into place, the folder fsynced, and only then is the catalog row
committed. Readers list epochs from the catalog, so they never see a partial file; a
crash loses at most the epoch in flight. The place-and-commit step holds a per-run file
lock, so concurrent writers of one epoch on one machine cannot replace each other's
committed file.

What a crash leaves behind -- a temp file (its writer held a lock on it; see
:mod:`trainer.store._paths`), or a complete file renamed into place whose catalog row was
never committed -- is recovered by :meth:`RunStore.fsck` (``bnn runs fsck``; the service
runs the cheap part at start) and, for one run, :meth:`RunStore.recover_run`.

Receiving an epoch file from elsewhere (:meth:`RunStore.receive_epoch`, used by the
service's upload and by :meth:`RunStore.import_epoch_file`): the bytes are written once,
as they arrive, into a locked temp file in the run's folder (sha256 and size counted on
the way), that very file is validated, fsynced and renamed into place like any epoch; a
refused or abandoned upload's temp file is removed (a crashed one's by the next write to
the run or by ``fsck``).

Test hook: ``BNN_CRASH_AT=<point>[:<n>]`` SIGKILLs the process the ``n``-th time (default
the first) a write reaches ``point``: ``write`` (temp file complete, not yet renamed),
``rename`` (renamed into place, catalog row not committed) or ``commit`` (row committed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot

from . import _paths as paths
from ._records import EpochInfo, RunInfo, RunStatus
from .catalog import Catalog
from .hdf5 import validate_snapshot, write_epoch_file
from .sweeps import SweepCatalog

if TYPE_CHECKING:
    from .fsck import FsckReport
    from .reader import RunReader
    from .validate import UploadLimits

__all__ = ["CRASH_ENV", "CRASH_POINTS", "EpochUpload", "RunStore"]

CRASH_ENV = "BNN_CRASH_AT"
CRASH_POINTS = ("write", "rename", "commit")
_crash_counts: dict[str, int] = {}


def crash_point(point: str) -> None:
    """Test hook: SIGKILL this process if ``$BNN_CRASH_AT`` names ``point`` (module doc)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name.strip() != point:
        return
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] >= (int(nth) if nth.strip().isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)


class RunStore(Catalog, SweepCatalog):
    """Runs and their epochs in ``data_dir`` and a catalog (``data_dir/catalog.db`` or ``db_url``).

    Args:
        data_dir: folder for the catalog and ``runs/``; created unless ``create=False``
            (then a missing folder or catalog is NOT_FOUND). STORAGE error naming the
            folder when it cannot be created or written.
        db_url: SQLAlchemy URL of the catalog, e.g. ``postgresql+psycopg://user@host/db``.
        stale_after_s: see :class:`Catalog` (default ``$BNN_STALE_AFTER_S`` or 60 s).

    Sweeps (named groups of runs) come from :class:`~trainer.store.sweeps.SweepCatalog`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        db_url: str | None = None,
        *,
        stale_after_s: float | None = None,
        create: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        if create:
            paths.ensure_dir(self.data_dir)
        elif not self.data_dir.is_dir():
            raise BnnError.not_found(
                f"no run store at {str(self.data_dir)!r}", data_dir=str(self.data_dir)
            )
        if db_url is None:
            db_file = (self.data_dir / paths.CATALOG_FILE).resolve()
            if not create and not db_file.exists():
                raise BnnError.not_found(
                    f"no catalog at {str(db_file)!r}", data_dir=str(self.data_dir)
                )
            db_url = f"sqlite:///{db_file}"
        super().__init__(db_url, stale_after_s=stale_after_s)

    def run_dir(self, run_id: str) -> Path:
        return self.data_dir / "runs" / paths.validate_run_id(run_id)

    def create_run(
        self,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        status: RunStatus | str = RunStatus.RUNNING,
        *,
        run_id: str | None = None,
    ) -> RunInfo:
        """Register a new run and create its folder (see :meth:`Catalog.create_run`).

        If the folder cannot be created the run is unregistered again (STORAGE error).
        """
        run = super().create_run(name, config, tags, status, run_id=run_id)
        try:
            paths.ensure_dir(self.run_dir(run.id))
        except BnnError:
            super().delete_run(run.id)
            raise
        return run

    def delete_run(self, run_id: str) -> None:
        """Remove the run's catalog rows (epochs cascade), then its folder."""
        super().delete_run(run_id)
        try:
            shutil.rmtree(self.run_dir(run_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BnnError(
                ErrorCode.STORAGE, f"cannot remove {str(self.run_dir(run_id))!r}: {exc}"
            ) from exc

    # -- epoch files
    def epoch_path(self, run_id: str, epoch: int) -> Path:
        """Absolute path of a committed epoch's file."""
        self.get_epoch(run_id, epoch)
        return self.data_dir / paths.epoch_relpath(run_id, epoch)

    def write_epoch(self, run_id: str, snap: EpochSnapshot) -> EpochInfo:
        """Store one captured epoch crash-safely (see the module docstring).

        Writing an epoch again with identical bytes returns the existing record; with
        different content it is a CONFLICT and the stored file is left untouched.
        """
        snap = validate_snapshot(snap)  # INVALID_ARGUMENT before anything is touched
        epoch = snap.epoch
        run_dir = self._writable_run_dir(run_id)
        with paths.locked_tmp(run_dir / paths.epoch_filename(epoch)) as tmp:
            write_epoch_file(tmp, snap, run_id=run_id)
            crash_point("write")
            return self._place(run_id, epoch, tmp, dict(snap.metrics))

    def import_epoch_file(
        self, run_id: str, epoch: int, path: str | Path, *, limits: UploadLimits | None = None
    ) -> EpochInfo:
        """Validate an epoch file from elsewhere and store a copy as ``epoch``.

        The copy is written once, into the run's folder (:meth:`receive_epoch`), and that
        copy is what is checked and kept (see :meth:`EpochUpload.commit`); CORRUPT or
        INVALID_ARGUMENT naming ``path`` for a bad file. The source is never modified.
        """
        epoch = paths.validate_epoch(epoch)
        source = Path(path)
        if not source.is_file():
            raise BnnError.not_found(f"no epoch file at {str(source)!r}", path=str(source))
        with self.receive_epoch(run_id, epoch) as upload:
            try:
                with open(source, "rb") as fh:
                    while block := fh.read(1 << 20):
                        upload.write(block)
            except OSError as exc:
                raise BnnError(
                    ErrorCode.STORAGE, f"cannot read {str(source)!r}: {exc.strerror or exc}"
                ) from exc
            return upload.commit(limits=limits, name=str(source))

    def receive_epoch(self, run_id: str, epoch: int) -> EpochUpload:
        """An :class:`EpochUpload`: a new temp file for ``epoch`` in the run's folder, to
        write the file's bytes into as they arrive, then :meth:`~EpochUpload.commit`.

        Use it as a context manager (or call ``close()``): the temp file is removed unless
        it was committed. NOT_FOUND for an unknown run, INVALID_ARGUMENT for a bad epoch,
        STORAGE when the folder cannot be written.
        """
        return EpochUpload(self, run_id, paths.validate_epoch(epoch))

    def _writable_run_dir(self, run_id: str) -> Path:
        with self._session() as s:
            self._row(s, run_id)
        run_dir = paths.ensure_dir(self.run_dir(run_id))
        paths.clean_stray_tmp(run_dir)
        return run_dir

    def _place(
        self,
        run_id: str,
        epoch: int,
        tmp: Path,
        metrics: dict[str, float],
        checksum: str | None = None,
    ) -> EpochInfo:
        """Rename a complete, fsynced temp file into place and commit its catalog row.

        ``checksum``: the file's sha256 when the writer counted it (else it is read)."""
        size, checksum = tmp.stat().st_size, checksum or paths.sha256_file(tmp)
        rel = paths.epoch_relpath(run_id, epoch)
        final = self.data_dir / rel
        with paths.run_lock(final.parent):
            existing = self.find_epoch(run_id, epoch, checksum)
            if existing is not None:
                return existing
            try:
                os.replace(tmp, final)
                paths.fsync_dir(final.parent)
            except OSError as exc:
                raise BnnError(
                    ErrorCode.STORAGE, f"cannot move epoch file into {str(final)!r}: {exc}"
                ) from exc
            crash_point("rename")
            info = self.add_epoch(run_id, epoch, metrics, rel, size, checksum)
            crash_point("commit")
            return info

    # -- recovery after crashes
    def fsck(
        self,
        *,
        repair: bool = False,
        verify: bool = True,
        catalog: bool = True,
        run_ids: Iterable[str] | None = None,
        uploads: bool = True,
    ) -> FsckReport:
        """Check the data directory against the catalog; see :func:`trainer.store.fsck.fsck`."""
        from .fsck import fsck

        return fsck(
            self, repair=repair, verify=verify, catalog=catalog, run_ids=run_ids, uploads=uploads
        )

    def recover_run(self, run_id: str) -> FsckReport:
        """Repair what crashes left in one run's folder: dead writers' temp files are
        removed and complete epoch files without a catalog row adopted (or moved to
        ``lost+found``). Cheap (one folder, no checksums of catalogued files); a trainer
        calls it when it starts or resumes a run. NOT_FOUND for an unknown run.
        """
        with self._session() as s:
            self._row(s, run_id)  # NOT_FOUND for an unknown run (without reaping stale runs)
        return self.fsck(repair=True, catalog=False, verify=False, run_ids=[run_id], uploads=False)

    def reader(self, run_id: str, *, verify: bool = False) -> RunReader:
        """A :class:`~trainer.store.reader.RunReader` on this store (the store stays open)."""
        from .reader import RunReader

        return RunReader(run_id, store=self, verify=verify)


class EpochUpload:
    """One epoch file being received (:meth:`RunStore.receive_epoch`): its bytes go once,
    as they arrive, into a temp file in the run's folder held under the writer's lock
    (:func:`~trainer.store._paths.locked_tmp`), with their sha256 and size counted.

        with store.receive_epoch(run_id, 5) as upload:
            for chunk in chunks:
                upload.write(chunk)              # STORAGE error when the disk refuses it
            if store.find_epoch(run_id, 5, upload.checksum) is None:   # not a retry
                info = upload.commit(limits=limits)

    :meth:`commit` validates and places that very file; leaving the block otherwise (a
    refusal, an error, a client gone) removes it. A crashed writer's temp file is removed
    by the next write to the run (or ``fsck``): its lock is gone with the process.
    """

    def __init__(self, store: RunStore, run_id: str, epoch: int) -> None:
        self.run_id, self.epoch, self.size = run_id, epoch, 0
        self._store = store
        self._digest = hashlib.sha256()
        self._placed = False
        self._stack = contextlib.ExitStack()
        try:
            run_dir = store._writable_run_dir(run_id)
            self.path: Path = self._stack.enter_context(
                paths.locked_tmp(run_dir / paths.epoch_filename(epoch))
            )
            try:
                self._fh: BinaryIO = self._stack.enter_context(open(self.path, "wb"))  # noqa: SIM115
            except OSError as exc:
                raise self._storage_error(exc) from exc
        except BaseException:
            self._stack.close()
            raise

    def _storage_error(self, exc: OSError) -> BnnError:
        where = str(self._store.run_dir(self.run_id))
        return BnnError(
            ErrorCode.STORAGE,
            f"cannot store epoch {self.epoch} in {where!r}: {exc.strerror or exc}",
            run_id=self.run_id,
        )

    @property
    def checksum(self) -> str:
        """Hex sha256 of the bytes written so far."""
        return self._digest.hexdigest()

    def write(self, data: bytes) -> None:
        """Append ``data`` to the temp file (STORAGE error when it cannot be written)."""
        if self._fh.closed:
            raise RuntimeError("this upload was committed or closed")
        try:
            self._fh.write(data)
        except OSError as exc:
            raise self._storage_error(exc) from exc
        self._digest.update(data)
        self.size += len(data)

    def commit(self, *, limits: UploadLimits | None = None, name: str | None = None) -> EpochInfo:
        """Close the file, check it against the run, fsync it, rename it into place and
        commit its catalog row; the stored :class:`EpochInfo` (the existing one when these
        bytes are stored already: see :meth:`RunStore._place`).

        The check is :func:`~trainer.store.validate.check_epoch_file` on the file that is
        kept: the schema, ``limits`` (default :class:`~trainer.store.validate.UploadLimits`),
        a ``run_id`` attribute naming no other run, the ``epoch`` attribute, the layout of
        the run's first epoch (or of its configured model), fully written datasets, finite
        ``mu`` and ``sigma`` > 0. CORRUPT or INVALID_ARGUMENT naming ``name`` (default
        "uploaded for run R epoch E") otherwise, and the temp file goes on closing.
        """
        from .validate import UploadLimits, check_epoch_file, run_reference

        if self._placed or self._fh.closed:
            raise RuntimeError("this upload was committed or closed")
        try:
            self._fh.close()  # flushed: the checks read the file
        except OSError as exc:
            raise self._storage_error(exc) from exc
        header = check_epoch_file(
            self.path,
            run_id=self.run_id,
            epoch=self.epoch,
            reference=run_reference(self._store, self.run_id),
            limits=limits or UploadLimits(),
            name=name or f"uploaded for run {self.run_id!r} epoch {self.epoch}",
        )
        try:  # durable before the rename; a refused file was never worth the disk flush
            paths.fsync_file(self.path)
        except OSError as exc:
            raise self._storage_error(exc) from exc
        info = self._store._place(
            self.run_id, self.epoch, self.path, header.metrics, checksum=self.checksum
        )
        self._placed = True
        return info

    def close(self) -> None:
        """Remove the temp file unless it was committed, and let go of its lock."""
        self._stack.close()

    def __enter__(self) -> EpochUpload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
