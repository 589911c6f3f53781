"""Reading runs: :class:`RunReader` and :func:`load_distribution_log`.

Only catalog-committed epochs exist for a reader. Every read opens exactly one epoch
file, and a slice of a layer reads only that slice (HDF5 chunked reads). A missing,
truncated (size differs from the catalog) or unreadable file is a CORRUPT error naming
the file; with ``verify=True`` the sha256 is checked too. Reading never writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot, LayerLog

from . import _paths as paths
from ._records import EpochInfo, RunInfo
from .hdf5 import EpochFile, EpochHeader
from .runstore import RunStore

__all__ = ["RunReader", "load_distribution_log"]


class RunReader:
    """Read-only view of one run.

    Args:
        run_id: the run; NOT_FOUND if the catalog does not know it.
        data_dir: the store's folder (default ``$BNN_DATA_DIR`` or ``./bnn-data``); never created.
        db_url: catalog URL when it is not the folder's SQLite file.
        store: an open :class:`RunStore` to use instead (it is not closed by :meth:`close`).
        verify: check each file's sha256 against the catalog before reading it.
    """

    def __init__(
        self,
        run_id: str,
        data_dir: str | Path | None = None,
        db_url: str | None = None,
        *,
        store: RunStore | None = None,
        verify: bool = False,
    ) -> None:
        self._owns_store = store is None
        self._store = store or RunStore(data_dir or paths.default_data_dir(), db_url, create=False)
        self.verify_checksums = verify
        self._infos: dict[int, EpochInfo] = {}  # committed epochs seen (they never change)
        try:
            self.run_id = self._store.get_run(run_id).id
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._owns_store:
            self._store.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalog only
    @property
    def run(self) -> RunInfo:
        return self._store.get_run(self.run_id)

    @property
    def epochs(self) -> list[int]:
        """Committed epochs, ascending (asked of the catalog each time)."""
        infos = self._store.list_epochs(self.run_id)
        self._infos.update((info.epoch, info) for info in infos)
        return [info.epoch for info in infos]

    def epoch_info(self, epoch: int) -> EpochInfo:
        """NOT_FOUND with ``details["epochs"]`` when the epoch was not captured.

        A committed epoch's content never changes, so one listed or read before is not
        asked again (reading a run's epochs one by one then costs no catalog query per
        epoch); :meth:`open` asks again when the file's size differs (``bnn runs compact``
        rewrote it in the current format).
        """
        info = self._infos.get(epoch) if type(epoch) is int else None
        if info is None:
            info = self._store.get_epoch(self.run_id, epoch)
            self._infos[info.epoch] = info
        return info

    def metrics(self, epoch: int) -> dict[str, float]:
        return self.epoch_info(epoch).metrics

    def metrics_table(self) -> list[dict[str, float]]:
        """One dict per committed epoch, ``{"epoch": e, **metrics}`` (fits ``pandas.DataFrame``)."""
        return [
            {"epoch": info.epoch, **info.metrics} for info in self._store.list_epochs(self.run_id)
        ]

    # -- one file
    def _corrupt(self, info: EpochInfo, reason: str) -> BnnError:
        return BnnError(
            ErrorCode.CORRUPT,
            f"epoch file {info.file} is corrupt: {reason}",
            file=info.file,
            run_id=self.run_id,
            epoch=info.epoch,
        )

    def open(self, epoch: int, *, verify: bool | None = None) -> EpochFile:
        """Open one committed epoch's file (use as a context manager)."""
        info = self.epoch_info(epoch)
        path = self._store.data_dir / paths.epoch_relpath(self.run_id, info.epoch)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise self._corrupt(info, f"cannot be read ({exc.strerror or exc})") from exc
        if size != info.size and self._infos.pop(info.epoch, None) is not None:
            info = self.epoch_info(info.epoch)  # compacted since it was listed?
        if size != info.size:
            raise self._corrupt(info, f"size {size} bytes, the catalog recorded {info.size}")
        if self.verify_checksums if verify is None else verify:
            try:
                digest = paths.sha256_file(path)
            except OSError as exc:
                raise self._corrupt(info, f"cannot be read ({exc})") from exc
            if digest != info.checksum:
                raise self._corrupt(
                    info, f"sha256 {digest} differs from the catalog's {info.checksum}"
                )
        return EpochFile(path, name=info.file)

    def verify(self, epoch: int | None = None) -> None:
        """Check checksums and schema of one epoch, or of all; CORRUPT listing the bad ones."""
        bad: dict[int, str] = {}
        for e in self.epochs if epoch is None else [epoch]:
            try:
                with self.open(e, verify=True) as ef:
                    ef.validate()
            except BnnError as exc:
                if exc.code is not ErrorCode.CORRUPT:
                    raise
                bad[e] = exc.message
        if bad:
            files = [self.epoch_info(e).file for e in bad]
            raise BnnError(
                ErrorCode.CORRUPT,
                f"run {self.run_id!r}: corrupt epoch files {files}: " + "; ".join(bad.values()),
                run_id=self.run_id,
                epochs=sorted(bad),
                files=files,
            )

    def header(self, epoch: int) -> EpochHeader:
        with self.open(epoch) as ef:
            return ef.header

    def layers(self, epoch: int | None = None) -> list[str]:
        """Layer names in model order (of ``epoch``, default the last one; [] without epochs)."""
        if epoch is None:
            epochs = self.epochs
            if not epochs:
                return []
            epoch = epochs[-1]
        return list(self.header(epoch).layers)

    def epoch_params(self, epoch: int, layers: Iterable[str] | None = None) -> dict[str, LayerLog]:
        """One epoch of the seed's ``distribution_log`` (all layers, or only ``layers``)."""
        with self.open(epoch) as ef:
            return ef.params(layers)

    def array(
        self,
        epoch: int,
        layer: str,
        dist: str = "posterior",
        param: str = "weight",
        stat: str = "mu",
        index: Any = None,
    ) -> np.ndarray:
        """One array (default: posterior weight mu); ``index`` (int/slice/tuple) reads only it."""
        with self.open(epoch) as ef:
            return ef.array(layer, dist, param, stat, index)

    def gradients(self, epoch: int, layer: str) -> dict[str, Any]:
        """Gradient statistics of one layer; NOT_FOUND if the epoch has none."""
        with self.open(epoch) as ef:
            return ef.gradients(layer)

    def gradient_array(self, epoch: int, layer: str, *path: str) -> np.ndarray | None:
        """One gradient statistic of a layer, e.g. ``("weight", "mu", "mean_abs")`` or
        ``("step_norm",)``, reading nothing else; None when it was not captured."""
        with self.open(epoch) as ef:
            return ef.gradient_array(layer, *path)

    def evaluation(self, epoch: int | None = None) -> dict[str, np.ndarray] | None:
        """The final test evaluation's per-example arrays (stored with the run's last epoch;
        ``epoch`` defaults to it), or None when the epoch has none."""
        if epoch is None:
            epochs = self.epochs
            if not epochs:
                return None
            epoch = epochs[-1]
        with self.open(epoch) as ef:
            return ef.evaluation()

    def snapshot(
        self, epoch: int, layers: Iterable[str] | None = None, gradients: bool = True
    ) -> EpochSnapshot:
        with self.open(epoch) as ef:
            return ef.snapshot(layers, gradients)

    def distribution_log(
        self, epochs: Iterable[int] | None = None, layers: Iterable[str] | None = None
    ) -> dict[int, dict[str, LayerLog]]:
        """``{epoch: {layer: {...}}}``: the seed's ``distribution_log`` for the chosen epochs."""
        wanted = self.epochs if epochs is None else list(epochs)
        names = None if layers is None else list(layers)
        return {epoch: self.epoch_params(epoch, names) for epoch in wanted}


def load_distribution_log(
    run_id: str,
    data_dir: str | Path | None = None,
    epochs: Iterable[int] | None = None,
    layers: Iterable[str] | None = None,
    db_url: str | None = None,
) -> dict[int, dict[str, LayerLog]]:
    """The seed's ``distribution_log`` of a stored run: ``{epoch: {layer: {"posterior": ...}}}``.

    ``epochs``/``layers`` restrict what is read (NOT_FOUND for ones not captured);
    ``data_dir`` defaults to ``$BNN_DATA_DIR`` or ``./bnn-data``.
    """
    with RunReader(run_id, data_dir, db_url) as reader:
        return reader.distribution_log(epochs, layers)
