"""Writing an epoch file (the layout is described in :mod:`trainer.store.hdf5`)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot, GradLevel

from . import _native
from ._codec import (
    BF16_MANTISSA,
    BFLOAT16,
    ENCODING_ATTR,
    MANTISSA_ATTR,
    blosc_options,
    chunk_shape,
    encode_bf16,
    load_filters,
    round_bf16,
    validate_stat_bits,
)
from ._paths import fsync_file
from ._schema import GRAD_PARAMS, PARAMS, validate_snapshot
from .summaries import Encoded, EpochSummaries, add_gradients, add_params, write_summaries

__all__ = [
    "COMPRESSIONS",
    "COMPRESS_MIN_SIZE",
    "COMPRESS_POSTERIORS_ENV",
    "ENCODED_STATS",
    "SCHEMA_VERSION",
    "SCHEMA_VERSIONS",
    "STAT_BITS_ENV",
    "env_format",
    "write_epoch_file",
]

SCHEMA_VERSION = 2  # what this library writes
SCHEMA_VERSIONS = (1, 2)  # what it reads (and can still write, for tests and benchmarks)
COMPRESS_MIN_SIZE = 1024
#: ``BNN_HDF5_COMPRESSION`` values; the first is the default of schema version 2
COMPRESSIONS = ("blosc", "none", "gzip", "lzf")
#: per-element gradient statistics stored as bfloat16 from schema version 2 on
ENCODED_STATS = ("mean_abs", "max_abs")
#: the environment's defaults of ``write_epoch_file``'s ``stat_bits`` and
#: ``compress_posteriors`` (so a trainer, local or remote, writes the lossy archive form)
STAT_BITS_ENV = "BNN_STAT_BITS"
COMPRESS_POSTERIORS_ENV = "BNN_COMPRESS_POSTERIORS"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_format() -> tuple[int, bool]:
    """``(stat_bits, compress_posteriors)`` as ``BNN_STAT_BITS`` (0-7; unset: 7, lossless)
    and ``BNN_COMPRESS_POSTERIORS`` (1/true/yes/on or 0/false/no/off; unset: off) set them
    for the epoch files this process writes; INVALID_ARGUMENT naming the variable and its
    value otherwise (trainers check it before they start)."""
    raw = os.environ.get(STAT_BITS_ENV, "").strip()
    try:
        bits = validate_stat_bits(int(raw)) if raw else BF16_MANTISSA
    except (ValueError, BnnError):
        raise BnnError.invalid(
            f"{STAT_BITS_ENV} must be an integer from 0 to {BF16_MANTISSA}, got {raw!r}"
        ) from None
    flag = os.environ.get(COMPRESS_POSTERIORS_ENV, "").strip().lower()
    if flag not in _TRUE + _FALSE:
        raise BnnError.invalid(
            f"{COMPRESS_POSTERIORS_ENV} must be one of 1/true/yes/on or 0/false/no/off, "
            f"got {os.environ.get(COMPRESS_POSTERIORS_ENV)!r}"
        )
    return bits, flag in _TRUE


def _compression(version: int) -> str:
    default = "blosc" if version >= 2 else "none"
    choice = os.environ.get("BNN_HDF5_COMPRESSION", "").strip().lower() or default
    if choice not in COMPRESSIONS:
        raise BnnError.invalid(
            f"BNN_HDF5_COMPRESSION must be one of {list(COMPRESSIONS)}, got {choice!r}"
        )
    if choice == "blosc" and version < 2:
        raise BnnError.invalid("BNN_HDF5_COMPRESSION=blosc needs schema version 2")
    return choice


#: all-zero integer arrays (the non-finite counts of a healthy epoch): gzip level 1 stores
#: a 1200x1200 int32 array of zeros in a few KB within a few milliseconds
ZEROS = {"chunks": True, "compression": "gzip", "compression_opts": 1}


class _Writer:
    """Writes the datasets of one file in one schema version and compression."""

    def __init__(self, version: int, stat_bits: int = BF16_MANTISSA) -> None:
        self.version = version
        self.stat_bits = stat_bits
        self.compression = _compression(version)
        blosc = self.compression == "blosc"
        self._blosc = [blosc_options(bitshuffle=b) for b in (False, True)] if blosc else None

    def options(
        self, arr: np.ndarray, compress: bool = True, encoded: bool = False
    ) -> dict[str, Any]:
        """``create_dataset`` keywords for ``arr``: small arrays contiguous, large ones
        compressed (an all-zero integer array always, unless Blosc does it anyway);
        ``compress=False`` (posteriors of version 2): contiguous whatever the size.
        ``encoded``: bfloat16 codes (Blosc bit-shuffles them, like floats)."""
        if arr.ndim < 1 or arr.size < COMPRESS_MIN_SIZE or not compress:
            return {}
        if self._blosc is not None:
            chunks = chunk_shape(arr.shape, arr.dtype.itemsize)
            return {"chunks": chunks, **self._blosc[encoded or arr.dtype.kind == "f"]}
        if arr.dtype.kind in "iu" and not arr.any():
            return ZEROS
        if self.compression == "gzip":
            return {"chunks": True, "compression": "gzip", "compression_opts": 4, "shuffle": True}
        if self.compression == "lzf":
            return {"chunks": True, "compression": "lzf", "shuffle": True}
        return {}

    def put(
        self,
        group: h5py.Group,
        name: str,
        arr: np.ndarray,
        *,
        encode: bool = False,
        compress: bool = True,
        encoded: Encoded | None = None,
    ) -> np.ndarray | Encoded:
        """One array as a dataset, fully written (never left as unwritten chunks read as
        their fill value, which older versions did for all-zero counts: see
        ``EpochFile.validate``). ``encode``: a per-element statistic, stored as bfloat16
        from schema version 2 on (``encoded``: its codes, where already computed). Returns
        the values a reader reads back (as :class:`~trainer.store.summaries.Encoded` where
        encoded)."""
        arr = np.asarray(arr)
        if encode and self.version >= 2 and arr.ndim >= 1:
            out = encoded if encoded is not None else _encode(arr, self.stat_bits)
            ds = group.create_dataset(name, data=out.codes, **self.options(out.codes, encoded=True))
            ds.attrs[ENCODING_ATTR] = BFLOAT16
            if self.stat_bits < BF16_MANTISSA:
                ds.attrs[MANTISSA_ATTR] = np.int8(self.stat_bits)
            return out
        group.create_dataset(name, data=arr, **self.options(arr, compress))
        return arr

    def tree(self, group: h5py.Group, tree: Mapping[str, Any], *, compress: bool = True) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                self.tree(group.create_group(key), value, compress=compress)
            else:
                self.put(group, key, value, compress=compress)

    def gradients(
        self,
        group: h5py.Group,
        grads: Mapping[str, Any],
        encoded: Mapping[tuple[str, str, str, str], Encoded] | None = None,
    ) -> dict[str, Any]:
        """``/gradients``: the statistics of ``weight``/``bias`` per ``mu``/``rho`` (the
        ``mean_abs`` and ``max_abs`` arrays encoded; ``encoded``: their codes by
        ``(layer, param, grad_param, stat)`` where already computed, see
        :func:`_encode_stats`), step norms and prior gradients. Returns
        ``{layer: {param: {grad_param: {stat: values}}}}``: the statistics as a reader reads
        them (:class:`~trainer.store.summaries.Encoded` where encoded), for the summaries."""
        encoded = encoded or {}
        stored: dict[str, Any] = {}
        for layer, g in grads.items():
            lg = group.create_group(layer)
            stored[layer] = {}
            for key, value in g.items():
                if not isinstance(value, Mapping):
                    self.put(lg, key, value)  # step_norm
                elif key not in PARAMS:
                    self.tree(lg.create_group(key), value)  # prior
                else:
                    pg = lg.create_group(key)
                    stored[layer][key] = {}
                    for gp, stats in value.items():
                        sg = pg.create_group(gp)
                        got = stored[layer][key][gp] = {}
                        for stat, arr in stats.items():
                            codes = encoded.get((layer, key, gp, stat))
                            got[stat] = self.put(
                                sg, stat, arr, encode=_encodes(gp, stat), encoded=codes
                            )
        return stored


def _encodes(grad_param: str, stat: str) -> bool:
    """Whether a version 2 file stores this gradient statistic as bfloat16 (per element)."""
    return grad_param in GRAD_PARAMS and stat in ENCODED_STATS


def _encode(arr: np.ndarray, stat_bits: int = BF16_MANTISSA) -> Encoded:
    """bfloat16 codes of a per-element statistic, with their histogram from the same pass
    where the kernels take it; with ``stat_bits`` < 7, rounded to that many mantissa bits
    (:func:`~trainer.store._codec.round_bf16`, in the same pass)."""
    found = _native.bf16_encode(arr, stat_bits)
    if found:
        return Encoded(*found)
    return Encoded(round_bf16(encode_bf16(arr), stat_bits), None)


def _encode_stats(
    grads: Mapping[str, Any], stat_bits: int = BF16_MANTISSA
) -> dict[tuple[str, str, str, str], Encoded]:
    """Every per-element statistic of ``grads`` (the snapshot's ``gradients``) that a
    version 2 file stores as bfloat16, encoded (as :meth:`_Writer.put` would, ``stat_bits``
    mantissa bits), by ``(layer, param, grad_param, stat)``."""
    out: dict[tuple[str, str, str, str], Encoded] = {}
    for layer, g in grads.items():
        for param in PARAMS:
            for gp, stats in g.get(param, {}).items():
                for stat, arr in stats.items():
                    if _encodes(gp, stat) and np.ndim(arr) >= 1:
                        out[(layer, param, gp, stat)] = _encode(np.asarray(arr), stat_bits)
    return out


def _param_summaries(snap: EpochSnapshot) -> EpochSummaries:
    out = EpochSummaries()
    for layer, log in snap.params.items():
        add_params(out, layer, log)
    return out


_cpu_lock = threading.Lock()
_background_cpu = 0.0


def background_cpu() -> float:
    """CPU seconds spent so far by the threads :func:`write_epoch_file` starts beside itself
    (the statistics' encoding, the posteriors' summaries), for benchmarks that charge a write's
    CPU time: add this difference to the writing thread's ``time.thread_time()`` difference."""
    return _background_cpu


class _Background:
    """``fn(*args)`` on a thread of its own (a fresh one per call: a pool's threads would
    not survive a fork); :meth:`result` waits for it and returns it or raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "bnn-epoch-write") -> None:
        self._out: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            global _background_cpu
            start = time.thread_time()
            try:
                self._out = fn(*args)
            except BaseException as exc:  # handed to result()
                self._error = exc
            finally:
                with _cpu_lock:
                    _background_cpu += time.thread_time() - start

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._out


def write_epoch_file(
    path: str | Path,
    snap: EpochSnapshot,
    *,
    run_id: str = "",
    schema_version: int = SCHEMA_VERSION,
    compress_posteriors: bool | None = None,
    summaries: bool = True,
    stat_bits: int | None = None,
) -> None:
    """Write ``snap`` as a complete epoch file at ``path`` (overwriting it) and fsync it.

    Version 2 (the default) stores the per-element gradient statistics as bfloat16 and
    compresses them, the non-finite counts and the other large arrays with
    ``BNN_HDF5_COMPRESSION`` (default Blosc); the posterior arrays stay plain contiguous
    float32, which readers map without a copy, unless ``compress_posteriors`` (13% of a
    784-1200-1200-10 file less, at the cost of decompressing them at every read: see
    ``BENCHMARKS.md``). Version 2 also stores the epoch's summaries (``/summary``,
    :mod:`trainer.store.summaries`: what the analysis's tables and plots need, computed
    here once from the values written), unless ``summaries=False`` (files as older
    versions wrote them). ``stat_bits`` (version 2, lossy, opt-in): keep only that many
    (0-7) of the bfloat16 statistics' 7 mantissa bits, rounded to nearest, ties to even
    (:func:`~trainer.store._codec.round_bf16`; the datasets say so in ``mantissa_bits``):
    at 3 bits, with ``compress_posteriors``, a 784-1200-1200-10 per-element file is 40%
    of version 1's size, each statistic within 6.25% of its bfloat16 value
    (``BENCHMARKS.md``). Either left None takes its value from the environment
    (:func:`env_format`: ``BNN_STAT_BITS``, ``BNN_COMPRESS_POSTERIORS``; unset, 7 bits and
    plain posteriors) for version 2, unless the snapshot sets it (``snap.stat_bits``,
    ``snap.compress_posteriors``: what a run's ``TrainConfig`` asks for); version 1 ignores
    them. ``schema_version=1`` writes
    the previous format (float32 statistics, uncompressed unless ``BNN_HDF5_COMPRESSION``
    says gzip or lzf, no summaries), which older versions of this library read. Raises
    INVALID_ARGUMENT for a bad snapshot, version or option (or environment variable) and
    STORAGE when the file cannot be written.
    """
    if schema_version not in SCHEMA_VERSIONS:
        raise BnnError.invalid(
            f"schema_version must be one of {list(SCHEMA_VERSIONS)}, got {schema_version!r}"
        )
    if stat_bits is not None:
        stat_bits = validate_stat_bits(stat_bits)
    if stat_bits is not None and stat_bits < BF16_MANTISSA and schema_version < 2:
        raise BnnError.invalid(
            f"stat_bits={stat_bits} needs schema version 2 (version 1 stores float32 statistics)"
        )
    snap = validate_snapshot(snap)
    if schema_version >= 2:  # the arguments, else the snapshot's own, else the environment
        stat_bits = snap.stat_bits if stat_bits is None else stat_bits
        if compress_posteriors is None:
            compress_posteriors = snap.compress_posteriors
        if stat_bits is None or compress_posteriors is None:
            env_bits, env_packed = env_format()
            stat_bits = env_bits if stat_bits is None else stat_bits
            compress_posteriors = env_packed if compress_posteriors is None else compress_posteriors
    stat_bits = BF16_MANTISSA if stat_bits is None else stat_bits  # each source checked above
    compress_posteriors = bool(compress_posteriors)
    writer = _Writer(schema_version, stat_bits)
    path = Path(path)
    load_filters()
    # Beside the dataset writes, on threads of their own (the C kernels and numpy's large
    # passes release the GIL): the statistics' bfloat16 encoding, needed once the
    # posteriors are written, and the posteriors' summaries (most of the summaries' work).
    codes = (
        _Background(_encode_stats, snap.gradients, stat_bits, name="bnn-epoch-encode")
        if snap.gradients is not None and schema_version >= 2
        else None
    )
    params = (
        _Background(_param_summaries, snap, name="bnn-epoch-summaries")
        if summaries and schema_version >= 2
        else None
    )
    try:
        with h5py.File(path, "w", locking=False) as f:
            f.attrs["schema_version"] = schema_version
            f.attrs["run_id"] = run_id
            f.attrs["epoch"] = snap.epoch
            f.attrs["grad_level"] = GradLevel(snap.grad_level).value
            f.attrs["layers"] = json.dumps(list(snap.params))
            group = f.create_group("params")
            for layer, log in snap.params.items():
                lg = group.create_group(layer)
                lg.attrs["type"] = snap.layer_types.get(layer, "")
                writer.tree(lg, log, compress=schema_version < 2 or compress_posteriors)
            stored = None
            if snap.gradients is not None:
                encoded = codes.result() if codes is not None else None
                stored = writer.gradients(f.create_group("gradients"), snap.gradients, encoded)
            if params is not None:
                found = params.result()
                for layer in snap.params:
                    add_gradients(found, layer, (stored or {}).get(layer))
                write_summaries(f, found, list(snap.params))
            if snap.evaluation:
                writer.tree(f.create_group("evaluation"), snap.evaluation)
            metrics = f.create_group("metrics", track_order=True)
            for key, value in snap.metrics.items():
                metrics.attrs[key] = np.float64(value)
        fsync_file(path)
    except OSError as exc:
        raise BnnError(
            ErrorCode.STORAGE, f"cannot write epoch file {str(path)!r}: {exc}", path=str(path)
        ) from exc
    finally:
        for job in (codes, params):
            if job is not None:
                job.join()
