"""Run store: immutable per-epoch HDF5 files plus a SQLAlchemy catalog.

    store = RunStore("bnn-data")                     # or RunStore(dir, db_url="postgresql+psycopg://...")
    run = store.create_run("demo", config={...})
    store.write_epoch(run.id, snapshot)              # crash-safe; the catalog row comes last
    log = load_distribution_log(run.id, data_dir="bnn-data")   # the seed's distribution_log

Public names:
    RunStore, RunReader, load_distribution_log  -- write / read runs
    RunInfo, EpochInfo, RunStatus               -- plain records and the run life cycle
    RunListing, RunPage, RUN_SORTS, METRIC_SORT -- RunStore.query_runs(): filtered, sorted pages
    SweepInfo                                   -- a sweep: a named group of runs
    FsckReport, Finding                         -- RunStore.fsck(): recovery after crashes
    SCHEMA_VERSION, write_epoch_file, read_epoch_file, EpochFile, EpochHeader, validate_snapshot
        -- the epoch file format on its own (no catalog), e.g. for uploads

Each epoch file written now also holds the summaries the analysis needs (``/summary``,
:mod:`trainer.store.summaries`; ``EpochFile.summaries()``), computed once at write time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer._lazy import lazy_exports

if TYPE_CHECKING:
    from ._records import EpochInfo, RunInfo, RunStatus
    from .catalog import METRIC_SORT, RUN_SORTS, RunListing, RunPage
    from .fsck import Finding, FsckReport
    from .hdf5 import (
        SCHEMA_VERSION,
        EpochFile,
        EpochHeader,
        read_epoch_file,
        validate_snapshot,
        write_epoch_file,
    )
    from .reader import RunReader, load_distribution_log
    from .runstore import RunStore
    from .sweeps import SweepInfo

__all__ = [
    "METRIC_SORT",
    "RUN_SORTS",
    "SCHEMA_VERSION",
    "EpochFile",
    "EpochHeader",
    "EpochInfo",
    "Finding",
    "FsckReport",
    "RunInfo",
    "RunListing",
    "RunPage",
    "RunReader",
    "RunStatus",
    "RunStore",
    "SweepInfo",
    "load_distribution_log",
    "read_epoch_file",
    "validate_snapshot",
    "write_epoch_file",
]

# Each public name loads its submodule on first use (PEP 562): ``from trainer.store import
# RunStatus`` does not import SQLAlchemy, h5py or the recovery code.
_LAZY = {
    "EpochFile": ".hdf5",
    "EpochHeader": ".hdf5",
    "EpochInfo": "._records",
    "Finding": ".fsck",
    "FsckReport": ".fsck",
    "METRIC_SORT": ".catalog",
    "RUN_SORTS": ".catalog",
    "RunInfo": "._records",
    "RunListing": ".catalog",
    "RunPage": ".catalog",
    "RunReader": ".reader",
    "RunStatus": "._records",
    "RunStore": ".runstore",
    "SCHEMA_VERSION": ".hdf5",
    "SweepInfo": ".sweeps",
    "load_distribution_log": ".reader",
    "read_epoch_file": ".hdf5",
    "validate_snapshot": ".hdf5",
    "write_epoch_file": ".hdf5",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
