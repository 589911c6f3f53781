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

Test hook: ``BNN_CRASH_AT=<point>[:<n>]`` SIGKILLs the process the ``n``-th time (default
the first) a write reaches ``point``: ``write`` (temp file complete, not yet renamed),
``rename`` (renamed into place, catalog row not committed) or ``commit`` (row committed).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

__all__ = ["CRASH_ENV", "CRASH_POINTS", "RunStore"]

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
        """Validate an epoch file from elsewhere (e.g. an upload) and store a copy as ``epoch``.

        The copy that is kept is checked against the run by
        :func:`~trainer.store.validate.check_epoch_file`: the schema, ``limits`` (default
        :class:`~trainer.store.validate.UploadLimits`), a ``run_id`` attribute naming no
        other run, the ``epoch`` attribute, the layout of the run's first epoch (or of its
        configured model), fully written datasets, finite ``mu`` and ``sigma`` > 0.
        CORRUPT or INVALID_ARGUMENT naming ``path`` otherwise (INVALID_ARGUMENT "holds
        epoch N" for another epoch). The source file is never modified.
        """
        from .validate import UploadLimits, check_epoch_file, run_reference

        epoch = paths.validate_epoch(epoch)
        source = Path(path)
        if not source.is_file():
            raise BnnError.not_found(f"no epoch file at {str(source)!r}", path=str(source))
        run_dir = self._writable_run_dir(run_id)
        reference = run_reference(self, run_id)
        with paths.locked_tmp(run_dir / paths.epoch_filename(epoch)) as tmp:
            try:
                shutil.copyfile(source, tmp)
                paths.fsync_file(tmp)
            except OSError as exc:
                raise BnnError(
                    ErrorCode.STORAGE, f"cannot copy {str(source)!r} into {str(run_dir)!r}: {exc}"
                ) from exc
            # validate the copy that is kept, not the source (which could still change)
            header = check_epoch_file(
                tmp,
                run_id=run_id,
                epoch=epoch,
                reference=reference,
                limits=limits or UploadLimits(),
                name=str(source),
            )
            return self._place(run_id, epoch, tmp, header.metrics)

    def _writable_run_dir(self, run_id: str) -> Path:
        with self._session() as s:
            self._row(s, run_id)
        run_dir = paths.ensure_dir(self.run_dir(run_id))
        paths.clean_stray_tmp(run_dir)
        return run_dir

    def _place(self, run_id: str, epoch: int, tmp: Path, metrics: dict[str, float]) -> EpochInfo:
        """Rename a complete, fsynced temp file into place and commit its catalog row."""
        size, checksum = tmp.stat().st_size, paths.sha256_file(tmp)
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
