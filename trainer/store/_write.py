"""Writing an epoch file (the layout is described in :mod:`trainer.store.hdf5`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot, GradLevel

from ._paths import fsync_file
from ._schema import validate_snapshot

__all__ = ["COMPRESS_MIN_SIZE", "SCHEMA_VERSION", "write_epoch_file"]

SCHEMA_VERSION = 1
COMPRESS_MIN_SIZE = 1024


def _compression() -> dict[str, Any]:
    choice = os.environ.get("BNN_HDF5_COMPRESSION", "none").strip().lower()
    if choice in ("", "none"):
        return {}
    if choice == "gzip":
        return {"chunks": True, "compression": "gzip", "compression_opts": 4, "shuffle": True}
    if choice == "lzf":
        return {"chunks": True, "compression": "lzf", "shuffle": True}
    raise BnnError.invalid(f"BNN_HDF5_COMPRESSION must be none, gzip or lzf, got {choice!r}")


#: all-zero integer arrays (the non-finite counts of a healthy epoch): gzip level 1 stores
#: a 1200x1200 int32 array of zeros in a few KB within a few milliseconds
ZEROS = {"chunks": True, "compression": "gzip", "compression_opts": 1}


def _put(group: h5py.Group, name: str, arr: np.ndarray) -> None:
    """One array as a dataset. Every dataset is fully written: an all-zero integer array is
    gzip-compressed, not left as unwritten chunks read as their fill value (which older
    versions did, and which an upload may no longer do: see ``EpochFile.validate``)."""
    big = arr.ndim >= 1 and arr.size >= COMPRESS_MIN_SIZE
    if big and arr.dtype.kind in "iu" and not arr.any():
        group.create_dataset(name, data=arr, **ZEROS)
    else:
        group.create_dataset(name, data=arr, **(_compression() if big else {}))


def _put_tree(group: h5py.Group, tree: Mapping[str, Any]) -> None:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _put_tree(group.create_group(key), value)
        else:
            _put(group, key, value)


def write_epoch_file(path: str | Path, snap: EpochSnapshot, *, run_id: str = "") -> None:
    """Write ``snap`` as a complete epoch file at ``path`` (overwriting it) and fsync it.

    Raises INVALID_ARGUMENT for a bad snapshot and STORAGE when the file cannot be written.
    """
    snap = validate_snapshot(snap)
    path = Path(path)
    try:
        with h5py.File(path, "w", locking=False) as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["run_id"] = run_id
            f.attrs["epoch"] = snap.epoch
            f.attrs["grad_level"] = GradLevel(snap.grad_level).value
            f.attrs["layers"] = json.dumps(list(snap.params))
            params = f.create_group("params")
            for layer, log in snap.params.items():
                group = params.create_group(layer)
                group.attrs["type"] = snap.layer_types.get(layer, "")
                _put_tree(group, log)
            if snap.gradients is not None:
                _put_tree(f.create_group("gradients"), snap.gradients)
            if snap.evaluation:
                _put_tree(f.create_group("evaluation"), snap.evaluation)
            metrics = f.create_group("metrics", track_order=True)
            for key, value in snap.metrics.items():
                metrics.attrs[key] = np.float64(value)
        fsync_file(path)
    except OSError as exc:
        raise BnnError(
            ErrorCode.STORAGE, f"cannot write epoch file {str(path)!r}: {exc}", path=str(path)
        ) from exc
