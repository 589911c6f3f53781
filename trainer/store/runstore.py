"""RunStore: a data directory of immutable HDF5 epoch files plus its :class:`Catalog`.

Layout: ``<data_dir>/catalog.db`` (unless ``db_url`` is given) and
``<data_dir>/runs/<run_id>/epoch_000005.h5``.

Writing an epoch: the HDF5 file is written to a temp name in the run's folder, flushed
and fsynced, renamed into place, the folder fsynced, and only then is the catalog row
committed. Readers list epochs from the catalog, so they never see a partial file; a
crash loses at most the epoch in flight (its temp file is removed by a later write).
The place-and-commit step holds a per-run file lock, so concurrent writers of one epoch
on one machine cannot replace each other's committed file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot

from . import _paths as paths
from ._records import EpochInfo, RunInfo, RunStatus
from .catalog import Catalog
from .hdf5 import EpochFile, validate_snapshot, write_epoch_file
from .sweeps import SweepCatalog

if TYPE_CHECKING:
    from .reader import RunReader

__all__ = ["RunStore"]


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
        tmp = paths.tmp_path(run_dir / paths.epoch_filename(epoch))
        try:
            write_epoch_file(tmp, snap, run_id=run_id)
            return self._place(run_id, epoch, tmp, dict(snap.metrics))
        finally:
            tmp.unlink(missing_ok=True)

    def import_epoch_file(self, run_id: str, epoch: int, path: str | Path) -> EpochInfo:
        """Validate an epoch file from elsewhere (e.g. an upload) and store a copy as ``epoch``.

        CORRUPT naming ``path`` if it is not a valid epoch file; INVALID_ARGUMENT if it holds
        another epoch. The source file is never modified.
        """
        epoch = paths.validate_epoch(epoch)
        source = Path(path)
        if not source.is_file():
            raise BnnError.not_found(f"no epoch file at {str(source)!r}", path=str(source))
        run_dir = self._writable_run_dir(run_id)
        tmp = paths.tmp_path(run_dir / paths.epoch_filename(epoch))
        try:
            try:
                shutil.copyfile(source, tmp)
                paths.fsync_file(tmp)
            except OSError as exc:
                raise BnnError(
                    ErrorCode.STORAGE, f"cannot copy {str(source)!r} into {str(run_dir)!r}: {exc}"
                ) from exc
            # validate the copy that is kept, not the source (which could still change)
            with EpochFile(tmp, name=str(source)) as ef:
                ef.validate()
                header = ef.header
            if header.epoch != epoch:
                raise BnnError.invalid(
                    f"{str(source)!r} holds epoch {header.epoch}, not {epoch}", epoch=epoch
                )
            return self._place(run_id, epoch, tmp, header.metrics)
        finally:
            tmp.unlink(missing_ok=True)

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
            return self.add_epoch(run_id, epoch, metrics, rel, size, checksum)

    def reader(self, run_id: str, *, verify: bool = False) -> RunReader:
        """A :class:`~trainer.store.reader.RunReader` on this store (the store stays open)."""
        from .reader import RunReader

        return RunReader(run_id, store=self, verify=verify)
