"""The epoch file: one immutable HDF5 file per captured epoch (schema versions 1 and 2).

Layout (any HDF5 tool can read it; version 2 needs the Blosc filter, below)::

    /                     attrs: schema_version (2; 1 in older files), run_id, epoch,
                                 grad_level, layers (JSON list: the model's layer order)
    /params/<layer>       attrs: type ("BayesLinear" | "BayesConv2d" | "")
        /<posterior|prior>/<weight|bias>/<mu|sigma>     float32; prior arrays shape (1,)
    /gradients/<layer>    (absent when no gradient statistics were captured)
        /<weight|bias>/<mu|rho>/<mean_abs|max_abs|nonfinite>   param shape or () per grad_level
        /step_norm                                    (steps,) float
        /prior/<weight|bias>/<mu|rho>                 (steps,) float, learnable priors only
    /metrics              attrs: one float64 per metric (NaN/Inf kept), in insertion order
    /evaluation/<name>    (last epoch only) per-test-example float64 arrays, all (N,)
    /summary              attrs: version (1); version 2 files written by this version only
        /params           float64 (rows, 31): per layer, posterior|prior, weight|bias
        /gradients        float64 (rows, 12): per layer, weight|bias, mu|rho, mean_abs|max_abs

**Schema version 2** (what :func:`write_epoch_file` writes) stores:

* the posterior and prior arrays as captured: float32, contiguous, uncompressed, so a
  reader maps them from the OS cache without a copy (:meth:`EpochFile.array`). Lossless
  compression (Blosc, below) saves only 12-30% of them (trained weights have about 20
  bits of entropy per float32 ``mu``, 18 per ``sigma``) and every read then decompresses
  them; ``write_epoch_file(..., compress_posteriors=True)`` and ``bnn runs compact
  --compress-posteriors`` do it for runs kept for the record (see ``BENCHMARKS.md``);
* the per-element gradient statistics ``mean_abs`` and ``max_abs`` as **bfloat16**:
  ``uint16`` datasets with the attribute ``encoding = "bfloat16"``, holding the upper 16
  bits of the float32 value rounded to nearest; float32 again is
  ``(codes.astype(uint32) << 16).view(float32)`` (readers here decode them: they read back
  as float32). bfloat16 keeps float32's exponent range with 8 significant bits: relative
  error at most 2^-8 (0.39%) for |g| >= 1.2e-38, absolute at most 2^-134 below. float16
  was not enough: it flushes |g| < 6e-8 to zero and rounds |g| > 65504 to Inf, and the
  gradient diagnostics (:mod:`service.analysis.gradients`, ``docs/gradients.md``) call an
  element *vanishing* when |g| is exactly 0 (healthy layers have |g| down to 1e-41) and
  *exploding* when it is non-finite. The encoding therefore also keeps zero as zero, never
  turns a non-zero value into zero (it becomes 9.2e-41) nor a finite one into Inf (it
  becomes 3.39e38), and keeps Inf and NaN. So every count of zeros and non-finite values
  is exact, medians and maxima of |g| agree within 2^-8, and a flag can differ only for an
  element within that rounding of the threshold it is compared with (none under the
  default thresholds: ``tests/trainer/test_compact_analysis.py``). Opt-in and lossy,
  ``bnn runs compact --stat-bits N`` (``write_epoch_file(..., stat_bits=N)``, or
  ``BNN_STAT_BITS=N`` in the environment of a process that writes epochs) keeps only
  ``N`` (0-7) of the 7 mantissa bits, rounded to nearest, ties to even, the same
  guarantees kept (``_codec.round_bf16``), and marks the dataset ``mantissa_bits = N``
  (int8; absent means 7): relative error at most 2^-(N+1) more (6.25% at 3 bits). Readers
  decode such codes as any others; :meth:`EpochFile.stat_bits` tells the precision, and a
  file from elsewhere whose codes hold more bits than it claims is refused. Layer-level (0-d)
  statistics, counts, step norms and prior gradients keep their dtype;
* arrays of at least :data:`COMPRESS_MIN_SIZE` elements other than the posteriors --
  the statistics, the non-finite counts, long step-norm series, evaluation arrays --
  chunked in C-order row blocks of about 256 KB (``_codec.chunk_shape``: reading a
  row range decompresses only its chunks) and compressed with the **Blosc** filter (HDF5
  filter id 32001, c-blosc 1.x: LZ4, bit shuffle, level 5), or with what
  ``BNN_HDF5_COMPRESSION`` names (``blosc``, the default, ``gzip``, ``lzf`` or ``none``).
  h5py reads Blosc once ``hdf5plugin`` is imported (``pip install hdf5plugin``;
  ``import hdf5plugin`` before opening the file; this module does it before it opens or
  writes one); other HDF5 tools find it with ``HDF5_PLUGIN_PATH=$(python -c "import
  hdf5plugin; print(hdf5plugin.PLUGIN_PATH)")``. Files from elsewhere may use Blosc only
  as the one filter of a dataset, and each chunk's Blosc header must match the chunk
  before anything is decompressed (:meth:`EpochFile.validate`).

**Summaries** (``/summary``, optional, :mod:`trainer.store.summaries` describes the
tables): what the analysis's tables and trajectory plots need of the epoch -- per
parameter tensor the moments, pairwise-KL and KL-to-prior sums and the exact percentiles
of mu and sigma; per gradient statistic the counts, median and maxima -- computed by
:func:`write_epoch_file` from the values it writes (the functions of
:mod:`trainer.store.numeric`, which the analysis uses on arrays too, so the stored numbers
are bit for bit the ones the arrays give on the same machine), a few KB. Readers use them when their
``version`` is :data:`~trainer.store.summaries.SUMMARY_VERSION` and compute from the
arrays otherwise (version 1 files, version 2 files written before, another summary
version): the first plot of a run then reads a few hundred numbers per epoch instead of
its arrays. A file from elsewhere must carry the summaries its arrays give (recomputed on
receipt, ``trainer.store.validate``); ``bnn runs compact`` adds them to files without.
The group is the only root object added: older versions of this library read such files
(their analysis ignores it), but their schema check refuses them ("unexpected root
objects"): a service older than its trainer client refuses the client's uploads.

A 784-1200-1200-10 epoch with per-element statistics, trained values: 57.7 MB in version
1, 32.2 MB (56%) in version 2 (the statistics 38.3 MB -> 12.7 MB; 27.8 MB with compressed
posteriors), written in about the time version 1 takes, summaries included (0.90-1.05x by
median on the 2-core VMs measured: ``benchmarks/epoch_file_size.py``, ``BENCHMARKS.md``; the
statistics' bfloat16 encoding and the summaries' C kernels, about 30 ms of CPU per epoch of
that model, run on threads beside the dataset writes; the ``/summary`` tables themselves take
about 8 KB).

**Schema version 1** (older files): every float array float32 (or as given),
uncompressed unless ``BNN_HDF5_COMPRESSION`` was ``gzip`` or ``lzf``. These files are still
read, validated and accepted as uploads from older clients; ``bnn runs compact RUN_ID``
(:mod:`trainer.store.compact`) rewrites a run's files in version 2. All-zero integer
arrays (the non-finite counts) are gzip-compressed unless Blosc compresses them. (Older
versions stored those as never-written chunked datasets read as their fill value 0; such
files are still read, and still accepted from elsewhere: see :meth:`EpochFile.validate`.)

:func:`write_epoch_file` (in ``_write``) writes a complete file at a path
(``schema_version=1`` still writes the old format); crash safety (temp name, fsync,
rename) is the caller's (see ``RunStore.write_epoch``). :class:`EpochFile` reads one file
lazily: a slice of one layer reads only that slice.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5g, h5l, h5o, h5s, h5z

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot, GradLevel, LayerLog

from ._codec import (
    BF16_MANTISSA,
    BFLOAT16,
    BLOSC_FILTER,
    ENCODING_ATTR,
    MANTISSA_ATTR,
    blosc_header_problem,
    decode_bf16,
    first_unrounded,
    load_filters,
)
from ._schema import (
    DISTS,
    GRAD_PARAMS,
    PARAMS,
    STATS,
    UploadLimits,
    check_evaluation_meta,
    check_gradients,
    check_name,
    check_params,
    clean_metrics,
    validate_snapshot,
)
from ._write import (
    COMPRESS_MIN_SIZE,
    ENCODED_STATS,
    SCHEMA_VERSION,
    SCHEMA_VERSIONS,
    write_epoch_file,
)
from .summaries import SUMMARY_VERSION, EpochSummaries, read_summaries

__all__ = [
    "COMPRESS_MIN_SIZE",
    "DISTS",
    "PARAMS",
    "SCHEMA_VERSION",
    "SCHEMA_VERSIONS",
    "STATS",
    "EpochFile",
    "EpochHeader",
    "Layout",
    "UploadLimits",
    "read_epoch_file",
    "validate_snapshot",
    "write_epoch_file",
]

# HDF5 lists names alphabetically; read back in the seed's order (posterior before prior, ...)
_ORDER = ("posterior", "weight", "bias", "mu", "rho", "sigma", "mean_abs", "max_abs", "nonfinite")
_KEY_RANK = {key: i for i, key in enumerate((*_ORDER, "step_norm", "prior"))}
_UNSET = object()
Alloc = Callable[[tuple[int, ...], Any], np.ndarray]  # (shape, dtype) -> array to read into
#: layer -> "posterior/weight/mu" (dist/param/stat) -> (shape, dtype name), in layer order
Layout = dict[str, dict[str, tuple[tuple[int, ...], str]]]
ROOT_OBJECTS = ("params", "gradients", "metrics", "evaluation", "summary")
MAX_ROOT_ATTRS = 32
MAX_DEPTH = 6  # /gradients/<layer>/prior/<param>/<gp> is the deepest dataset
#: filters a reader here can decode: deflate (gzip), shuffle, fletcher32, lzf (schema
#: version 1, ``BNN_HDF5_COMPRESSION``) and Blosc (version 2, alone in its pipeline)
READABLE_FILTERS = frozenset(
    {h5z.FILTER_DEFLATE, h5z.FILTER_SHUFFLE, h5z.FILTER_FLETCHER32, 32000, BLOSC_FILTER}
)
VALUE_BLOCK = 1 << 20  # elements read at a time when checking values


_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class _Decoded:
    """The metadata of a bfloat16-encoded dataset as the schema checks see it: float32."""

    shape: tuple[int, ...]
    name: str
    dtype: np.dtype[Any] = _FLOAT32
    external: Any = None
    is_virtual: bool = False


@dataclass(frozen=True)
class EpochHeader:
    """What the root of an epoch file says, read without touching any array."""

    schema_version: int
    run_id: str
    epoch: int
    layers: list[str]
    layer_types: dict[str, str]
    grad_level: GradLevel
    metrics: dict[str, float]
    has_gradients: bool


# ----------------------------------------------------------------------------- read
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _attr(attrs: Any, name: str, default: Any) -> Any:
    """``attrs.get(name, default)`` in one HDF5 look-up instead of two."""
    try:
        return attrs[name]
    except KeyError:
        return default


class EpochFile:
    """One epoch file opened read-only; every failure is CORRUPT naming the file.

    Use as a context manager. ``header`` is read at open; arrays only when asked.
    ``limits`` (for a file from elsewhere) bounds what opening it may cost: the layer count
    and the metric count are checked before any layer or metric is looked at.
    """

    def __init__(
        self, path: str | Path, name: str | None = None, *, limits: UploadLimits | None = None
    ) -> None:
        self.path = Path(path)
        self.name = name or str(path)
        self.limits = limits
        self._nodes: dict[tuple[str, ...], Any] = {}
        self._mm: Any = None  # the file memory-mapped on first use (False: cannot be)
        self._summaries: Any = _UNSET  # /summary, parsed on first use
        load_filters()  # Blosc, before any chunk of a version 2 file is read
        try:
            self._f = h5py.File(self.path, "r", locking=False)
        except (OSError, ValueError) as exc:
            raise self._corrupt(f"cannot be opened as HDF5 ({exc})") from exc
        self._nodes[()] = self._f
        try:
            self.header = self._read_header()
        except BaseException:
            self._f.close()
            raise

    def _corrupt(self, reason: str) -> BnnError:
        return BnnError(
            ErrorCode.CORRUPT, f"epoch file {self.name} is corrupt: {reason}", file=self.name
        )

    def __enter__(self) -> EpochFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._nodes.clear()
        self._mm = None  # unmapped when the last view of it is gone
        self._f.close()

    def _child(self, group: h5py.Group, name: str) -> Any:
        """Follow hard links only (never into another file); None when absent.

        Low-level link calls: a few microseconds where ``name in group`` and
        ``group.get(name, getlink=True)`` cost tens each.
        """
        if not isinstance(group, h5py.Group) or "/" in name or name in ("", ".", ".."):
            return None
        key = name.encode()
        links = group.id.links
        if not links.exists(key):
            return None
        if links.get_info(key).type != h5l.TYPE_HARD:
            raise self._corrupt(f"{group.name}/{name} is a link, not an object")
        oid = h5o.open(group.id, key)
        if isinstance(oid, h5g.GroupID):
            return h5py.Group(oid)
        if isinstance(oid, h5d.DatasetID):
            return h5py.Dataset(oid)
        return group[name]

    def _node(self, *names: str) -> Any:
        """The object at /names[0]/names[1]/... or None; resolved once per open file."""
        node = self._nodes.get(names, _UNSET)
        if node is _UNSET:
            node = self._child(self._node(*names[:-1]), names[-1])
            self._nodes[names] = node
        return node

    def _read(
        self, ds: h5py.Dataset, mapped: bool = False, alloc: Alloc | None = None
    ) -> np.ndarray:
        """The whole dataset; one never written (e.g. all-zero counts) is its fill value.

        ``mapped``: a read-only result without a copy where possible: a broadcast fill value,
        or a view into the file's memory map for a contiguous uncompressed dataset.
        ``alloc(shape, dtype)`` provides the array to read into otherwise (a reused buffer).
        A bfloat16-encoded statistic is decoded: float32 (into ``alloc``'s array if given).
        """
        if ds.dtype == np.uint16 and self._encoding(ds) is not None:
            return self._decode(ds, alloc)
        if ds.size and ds.id.get_storage_size() == 0:
            fill = np.asarray(ds.fillvalue, ds.dtype)
            if mapped:
                return np.broadcast_to(fill, ds.shape)
            return np.full(ds.shape, fill, ds.dtype)
        if mapped and ds.size and ds.chunks is None and ds.dtype.isnative:
            view = self._view(ds)
            if view is not None:
                return view
        if alloc is None or not ds.size:
            return np.asarray(ds[()])
        out = alloc(ds.shape, ds.dtype)
        ds.id.read(h5s.ALL, h5s.ALL, out)  # the whole dataset, without h5py's selections
        return out

    def _encoding(self, ds: h5py.Dataset) -> str | None:
        """A uint16 dataset's ``encoding`` attribute: ``"bfloat16"`` or None (plain integers,
        e.g. non-finite counts); CORRUPT for any other value."""
        value = _attr(ds.attrs, ENCODING_ATTR, None)
        if value is None:
            return None
        if _text(value) != BFLOAT16:
            raise self._corrupt(f"{ds.name} has an unknown encoding {_text(value)!r}")
        return BFLOAT16

    def _mantissa(self, ds: h5py.Dataset) -> int:
        """An encoded dataset's ``mantissa_bits`` (7 when absent); CORRUPT unless an integer
        from 0 to 7."""
        value = _attr(ds.attrs, MANTISSA_ATTR, None)
        if value is None:
            return BF16_MANTISSA
        arr = np.asarray(value)
        if arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
            raise self._corrupt(f"{ds.name} has a {MANTISSA_ATTR} that is not an integer")
        if not 0 <= int(arr) <= BF16_MANTISSA:
            raise self._corrupt(
                f"{ds.name} has {MANTISSA_ATTR}={int(arr)}, not from 0 to {BF16_MANTISSA}"
            )
        return int(arr)

    def _encoded_stats(self) -> Iterator[tuple[str, h5py.Dataset]]:
        """Every bfloat16-encoded gradient statistic of the file, by path."""
        if not self.header.has_gradients:
            return
        for layer in self.header.layers:
            for param in PARAMS:
                for gp in GRAD_PARAMS:
                    for stat in ENCODED_STATS:
                        ds = self._node("gradients", layer, param, gp, stat)
                        if (
                            isinstance(ds, h5py.Dataset)
                            and ds.dtype == np.uint16
                            and self._encoding(ds) is not None
                        ):
                            yield f"{layer}/{param}/{gp}/{stat}", ds

    def stat_bits(self) -> int:
        """The mantissa bits the file keeps of its per-element gradient statistics: 7 (all
        of bfloat16's) unless they were rounded to fewer (``bnn runs compact --stat-bits``;
        the least of its datasets' ``mantissa_bits``); 7 for a file without encoded
        statistics. Reads metadata only; CORRUPT for a malformed attribute."""

        def read() -> int:
            return min(
                (self._mantissa(ds) for _, ds in self._encoded_stats()), default=BF16_MANTISSA
            )

        found: int = self._guard(read)
        return found

    def posteriors_compressed(self) -> bool:
        """Whether the file's posterior arrays pass through a compression filter (version 1
        files written with ``BNN_HDF5_COMPRESSION``; version 2 with ``compress_posteriors``),
        so that a read decompresses them instead of mapping the file. Metadata only."""

        def read() -> bool:
            for layer in self.header.layers:
                for param in PARAMS:
                    for stat in STATS:
                        ds = self._node("params", layer, "posterior", param, stat)
                        if (
                            isinstance(ds, h5py.Dataset)
                            and ds.id.get_create_plist().get_nfilters() > 0
                        ):
                            return True
            return False

        found: bool = self._guard(read)
        return found

    def storage(self) -> dict[str, Any]:
        """How the file stores its epoch: ``schema_version``, ``stat_bits`` (see
        :meth:`stat_bits`) and ``posteriors_compressed``. Metadata only."""
        return {
            "schema_version": self.header.schema_version,
            "stat_bits": self.stat_bits(),
            "posteriors_compressed": self.posteriors_compressed(),
        }

    def _decode(self, ds: h5py.Dataset, alloc: Alloc | None = None) -> np.ndarray:
        """A bfloat16-encoded dataset as float32 (see :mod:`trainer.store._codec`)."""
        codes = np.empty(ds.shape, np.uint16)
        if ds.size:
            ds.id.read(h5s.ALL, h5s.ALL, codes)  # chunks never written read as 0
        out = alloc(tuple(ds.shape), _FLOAT32) if alloc and ds.size else None
        return decode_bf16(codes, out)

    def _view(self, ds: h5py.Dataset) -> np.ndarray | None:
        """A contiguous dataset as a read-only view of the memory-mapped file (no copy: the
        pages come straight from the OS cache; the file never changes once committed)."""
        offset = ds.id.get_offset()
        if offset is None:
            return None
        if self._mm is None:
            try:
                with open(self.path, "rb") as fh:
                    self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                self._mm = False
        if self._mm is False:
            return None
        nbytes = ds.size * ds.dtype.itemsize
        if offset + nbytes > len(self._mm):
            raise self._corrupt(f"{ds.name} lies beyond the end of the file")
        return np.frombuffer(self._mm, ds.dtype, ds.size, offset).reshape(ds.shape)

    def _over(self, what: str, count: int, limit: int, setting: str | None = None) -> BnnError:
        """INVALID_ARGUMENT: the file holds more of ``what`` than ``limit`` allows."""
        where = f" ({setting})" if setting else ""
        details: dict[str, Any] = {"file": self.name, "limit": limit, "count": count}
        if setting:
            details["setting"] = setting
        return BnnError.invalid(
            f"epoch file {self.name} holds {count} {what}, more than the limit of {limit}{where}",
            **details,
        )

    def _read_header(self) -> EpochHeader:
        try:
            attrs = self._f.attrs
            limits = self.limits
            if limits is not None:
                n_attrs = h5o.get_info(self._f.id).num_attrs
                if n_attrs > MAX_ROOT_ATTRS:
                    raise self._over("root attributes", n_attrs, MAX_ROOT_ATTRS)
            version = _attr(attrs, "schema_version", None)
            if version is None or not np.issubdtype(np.asarray(version).dtype, np.integer):
                raise self._corrupt("no integer schema_version attribute")
            if int(version) not in SCHEMA_VERSIONS:
                known = " and ".join(map(str, SCHEMA_VERSIONS))
                raise self._corrupt(
                    f"schema_version {int(version)} is not supported (this library reads {known})"
                )
            layers = json.loads(_text(attrs["layers"]))
            if not isinstance(layers, list):
                raise self._corrupt(f"layers attribute {layers!r} is not a list of unique names")
            if limits is not None and len(layers) > limits.max_layers:
                raise self._over("layers", len(layers), limits.max_layers, "BNN_MAX_UPLOAD_LAYERS")
            if len(set(map(str, layers))) != len(layers):
                raise self._corrupt(f"layers attribute {layers!r} is not a list of unique names")
            for layer in layers:
                check_name(layer, "layer", self._corrupt)
            params = self._node("params")
            if isinstance(params, h5py.Group) and len(params) != len(layers):
                raise self._corrupt(
                    f"/params holds {len(params)} groups, the layers attribute names {len(layers)}"
                )
            if not isinstance(params, h5py.Group) or set(params) != set(layers):
                raise self._corrupt(f"/params groups do not match the layers attribute {layers}")
            # the layer groups through _node: checked once as hard links, then reused
            types = {
                layer: _text(_attr(self._node("params", layer).attrs, "type", ""))
                for layer in layers
            }
            metrics_group = self._node("metrics")
            if limits is not None and metrics_group is not None:
                n_metrics = h5o.get_info(metrics_group.id).num_attrs
                if n_metrics > limits.max_metrics:
                    raise self._over("metrics", n_metrics, limits.max_metrics)
            metrics = {} if metrics_group is None else dict(metrics_group.attrs)
            epoch = attrs["epoch"]
            if not np.issubdtype(np.asarray(epoch).dtype, np.integer) or int(epoch) < 0:
                raise self._corrupt(f"epoch attribute {epoch!r} is not an integer >= 0")
            return EpochHeader(
                int(version),
                _text(_attr(attrs, "run_id", "")),
                int(epoch),
                layers,
                types,
                GradLevel(_text(attrs["grad_level"])),
                clean_metrics(metrics, self._corrupt),
                self._node("gradients") is not None,
            )
        except BnnError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise self._corrupt(f"bad root attributes ({exc})") from exc

    def _layer(self, layer: str) -> h5py.Group:
        if layer not in self.header.layers:
            raise BnnError.not_found(
                f"unknown layer {layer!r}; layers are {self.header.layers}",
                layer=layer,
                layers=self.header.layers,
            )
        return self._node("params", layer)

    def _read_tree(self, node: Any) -> Any:
        if isinstance(node, h5py.Group):
            keys = sorted(node, key=lambda k: _KEY_RANK.get(k, len(_KEY_RANK)))
            return {key: self._read_tree(self._child(node, key)) for key in keys}
        if not isinstance(node, h5py.Dataset) or node.external or node.is_virtual:
            raise self._corrupt(
                f"{getattr(node, 'name', node)} is not a dataset stored in the file"
            )
        return self._read(node)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except BnnError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise self._corrupt(str(exc)) from exc

    def params(self, layers: Iterable[str] | None = None) -> dict[str, LayerLog]:
        """``{layer: {"posterior"|"prior": {"weight"|"bias": {"mu"|"sigma": arr}}}}`` in order."""
        names = self.header.layers if layers is None else list(layers)
        groups = {layer: self._layer(layer) for layer in names}
        order = [layer for layer in self.header.layers if layer in groups]
        out = self._guard(lambda: {layer: self._read_tree(groups[layer]) for layer in order})
        check_params(out, self._corrupt)
        return out

    def gradients(self, layer: str) -> dict[str, Any]:
        """Gradient statistics of one layer (snapshot structure); NOT_FOUND if none captured."""
        self._layer(layer)
        node = self._node("gradients", layer)
        if node is None:
            raise BnnError.not_found(
                f"epoch {self.header.epoch} has no gradient statistics for layer {layer!r} "
                f"(grad_level {self.header.grad_level.value!r})",
                layer=layer,
            )
        return self._guard(lambda: self._read_tree(node))

    def gradient_array(
        self, layer: str, *path: str, alloc: Alloc | None = None, mapped: bool = False
    ) -> np.ndarray | None:
        """One array of a layer's gradient statistics, reading nothing else; None if absent.

        ``path`` below ``/gradients/<layer>``: e.g. ``("weight", "mu", "mean_abs")``,
        ``("step_norm",)`` or ``("prior", "bias", "rho")``. ``alloc`` and ``mapped`` as for
        :meth:`array` (mapped, an array never written, such as the non-finite counts of a
        healthy epoch, is a broadcast of its fill value that takes no memory).
        """
        self._layer(layer)
        node = self._guard(lambda: self._node("gradients", layer, *path))
        if node is None:
            return None
        if not isinstance(node, h5py.Dataset) or node.external or node.is_virtual:
            where = "/".join(("/gradients", layer, *path))
            raise self._corrupt(f"{where} is not a dataset stored in the file")
        return self._guard(lambda: self._read(node, mapped, alloc))

    def array(
        self,
        layer: str,
        dist: str = "posterior",
        param: str = "weight",
        stat: str = "mu",
        index: Any = None,
        *,
        alloc: Alloc | None = None,
        mapped: bool = False,
    ) -> np.ndarray:
        """One array, or only ``index`` (int/slice/tuple) of it: reads just that part.

        For a whole array, ``mapped=True`` gives a read-only view of the memory-mapped file
        where the dataset allows it (no copy), and ``alloc(shape, dtype)`` says where to
        read it otherwise (default a new array).
        """
        for value, allowed, what in (
            (dist, DISTS, "dist"),
            (param, PARAMS, "param"),
            (stat, STATS, "stat"),
        ):
            if value not in allowed:
                raise BnnError.invalid(f"{what} must be one of {list(allowed)}, got {value!r}")
        group = self._layer(layer)
        ds = self._guard(lambda: self._node("params", layer, dist, param, stat))
        if ds is None and self._node("params", layer, "posterior", param) is None:
            raise BnnError.not_found(f"layer {layer!r} has no {param}", layer=layer, param=param)
        if not isinstance(ds, h5py.Dataset) or ds.external or ds.is_virtual or ds.dtype.kind != "f":
            raise self._corrupt(
                f"{group.name}/{dist}/{param}/{stat} is missing or not a float dataset"
            )
        if index is None:
            return self._guard(lambda: self._read(ds, mapped, alloc))
        try:
            return np.asarray(ds[index])
        except (ValueError, TypeError, IndexError) as exc:
            raise BnnError.invalid(
                f"bad index {index!r} for {layer}/{dist}/{param}/{stat} of shape {ds.shape}: {exc}"
            ) from exc
        except OSError as exc:
            raise self._corrupt(str(exc)) from exc

    def summary_version(self) -> int | None:
        """The ``version`` of the file's ``/summary`` group; None without one (CORRUPT when
        it is not a group with an integer version)."""

        def read() -> int | None:
            node = self._node("summary")
            if node is None:
                return None
            version = _attr(node.attrs, "version", None) if isinstance(node, h5py.Group) else None
            if version is None or not np.issubdtype(np.asarray(version).dtype, np.integer):
                raise self._corrupt("/summary is not a group with an integer version attribute")
            return int(version)

        found: int | None = self._guard(read)
        return found

    def summaries(self) -> EpochSummaries | None:
        """The epoch's stored summaries (:mod:`trainer.store.summaries`), read once; None
        for a file without them (older files) or with another summary version, whose
        readers compute from the arrays. CORRUPT when they are malformed."""
        if self._summaries is _UNSET:
            found = None
            if self.summary_version() == SUMMARY_VERSION:
                found = self._guard(
                    lambda: read_summaries(
                        self._node("summary", "params"),
                        self._node("summary", "gradients"),
                        self.header.layers,
                        self._corrupt,
                    )
                )
            self._summaries = found
        out: EpochSummaries | None = self._summaries
        return out

    def validate(self, limits: UploadLimits | None = None) -> None:
        """Full schema check from metadata (names, shapes, dtypes, links); reads no array data
        but the small ``/summary`` tables (parsed last; their values are checked against the
        arrays only on receipt, by ``trainer.store.validate``).

        The required groups ``/params`` and ``/metrics`` must be there. With ``limits`` (a
        file from elsewhere; ``self.limits`` when not given) the walk is bounded (members
        per group, objects in all, :class:`UploadLimits`), the array elements of all
        datasets are summed against ``max_elements``, and every dataset must be fully
        written inside the file (:meth:`_check_written`): a file cannot declare arrays that
        cost far more to read than it took to send.
        """
        limits = limits or self.limits
        self._guard(lambda: self._validate(limits))

    def _validate(self, limits: UploadLimits | None) -> None:
        root = len(self._f)
        names = set(self._f) if root <= len(ROOT_OBJECTS) else set()
        extra = names - set(ROOT_OBJECTS)
        if root > len(ROOT_OBJECTS) or extra:
            shown = sorted(extra) if extra else f"{root} objects"
            raise self._corrupt(f"unexpected root objects {shown}")
        for required in ("params", "metrics"):
            if not isinstance(self._node(required), h5py.Group):
                raise self._corrupt(f"no /{required} group")
        if len(self._node("metrics")):
            raise self._corrupt("/metrics must hold attributes only, not groups or datasets")
        datasets: list[tuple[str, h5py.Dataset]] = []
        budget = [0]

        def tree(node: Any, where: str, depth: int) -> Any:
            if isinstance(node, h5py.Group):
                n = len(node)
                if limits is not None:
                    if n > limits.max_members:
                        raise self._over(f"members in {where}", n, limits.max_members)
                    budget[0] += n
                    if budget[0] > limits.max_objects:
                        raise self._over("groups and datasets", budget[0], limits.max_objects)
                if depth >= MAX_DEPTH and n:
                    raise self._corrupt(f"{where} is nested deeper than the schema allows")
                return {
                    key: tree(self._child(node, key), f"{where}/{key}", depth + 1) for key in node
                }
            if isinstance(node, h5py.Dataset):
                datasets.append((where, node))
                if node.dtype == np.uint16 and self._encoding(node) is not None:
                    return self._encoded(where, node)
                return node
            raise self._corrupt(f"{where} is neither a group nor a dataset")

        shapes = check_params(tree(self._node("params"), "/params", 1), self._corrupt)
        evaluation = self._node("evaluation")
        if evaluation is not None:
            check_evaluation_meta(tree(evaluation, "/evaluation", 1), self._corrupt)
        if self.header.has_gradients:
            check_gradients(
                tree(self._node("gradients"), "/gradients", 1),
                shapes,
                self.header.grad_level,
                self._corrupt,
            )
        summary = self._node("summary")
        if summary is not None:
            if self.summary_version() == SUMMARY_VERSION and set(summary) - {"params", "gradients"}:
                raise self._corrupt(f"/summary holds {sorted(summary)}, not params, gradients")
            tree(summary, "/summary", 1)
        if limits is not None:
            self._check_storage(datasets, limits)
        if summary is not None:
            self.summaries()  # parsed (small tables) once the storage is known to be sound

    def _encoded(self, where: str, ds: h5py.Dataset) -> _Decoded:
        """What the schema checks see of a bfloat16-encoded dataset (float32 of its shape);
        CORRUPT unless the file is of schema version 2 or later and ``where`` is a gradient
        statistic that the format encodes (``/gradients/<layer>/<param>/<mu|rho>/<stat>``)."""
        parts = where.split("/")
        if self.header.schema_version < 2:
            raise self._corrupt(
                f"{where} is bfloat16-encoded, which schema_version "
                f"{self.header.schema_version} does not allow"
            )
        if not (
            len(parts) == 6
            and parts[1] == "gradients"
            and parts[3] in PARAMS
            and parts[4] in GRAD_PARAMS
            and parts[5] in ENCODED_STATS
        ):
            raise self._corrupt(
                f"{where} is bfloat16-encoded; only the gradient statistics "
                f"{list(ENCODED_STATS)} may be"
            )
        self._mantissa(ds)
        return _Decoded(tuple(ds.shape), where)

    def _check_storage(
        self, datasets: list[tuple[str, h5py.Dataset]], limits: UploadLimits
    ) -> None:
        """Element and chunk totals within ``limits``; every dataset fully written in the file."""
        total = sum(ds.size for _, ds in datasets)
        if total > limits.max_elements:
            raise self._over(
                "array elements", total, limits.max_elements, "BNN_MAX_UPLOAD_ELEMENTS"
            )
        file_size = self.path.stat().st_size
        chunks = 0
        for where, ds in datasets:
            chunks += self._check_written(where, ds, file_size, limits)
            if chunks > limits.max_chunks:
                raise self._over("stored chunks", chunks, limits.max_chunks)

    def _check_written(
        self, where: str, ds: h5py.Dataset, file_size: int, limits: UploadLimits
    ) -> int:
        """CORRUPT unless all of ``ds`` is stored in this file; returns its stored chunks.

        Contiguous: ``get_storage_size()`` is the whole array and it ends inside the file.
        Chunked: every chunk the shape needs is allocated (``get_num_chunks()``), inside
        the file, at most ``max_chunk_bytes`` uncompressed, through filters this reader has;
        a Blosc-compressed dataset has no other filter, and each chunk's Blosc header says
        the chunk's size and its stored length (:func:`~trainer.store._codec.blosc_header_problem`),
        read before anything is decompressed.
        One exception, for files written by older versions of this project: an integer
        ``/gradients/.../nonfinite`` array with no filter, fill value 0 and no chunk at all
        (all-zero counts were stored that way) is accepted and reads as zeros; its elements
        count against ``max_elements`` like any other, and its shape is the parameter's.
        """
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        if dcpl.get_external_count() or layout == h5d.VIRTUAL:
            raise self._corrupt(f"{where} refers to data outside the file")
        filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
        unknown = sorted(set(filters) - READABLE_FILTERS)
        if unknown:
            raise self._corrupt(
                f"{where} needs HDF5 filter(s) {unknown}, which cannot be read here"
            )
        blosc = BLOSC_FILTER in filters
        if blosc and len(filters) != 1:
            raise self._corrupt(f"{where} combines Blosc with other filters {filters}")
        nbytes = ds.size * ds.dtype.itemsize
        if ds.size == 0:
            return 0
        declared = f"{where} declares {tuple(ds.shape)} {ds.dtype} ({nbytes} bytes)"
        if layout == h5d.COMPACT:
            if ds.id.get_storage_size() < nbytes:
                raise self._corrupt(f"{declared} but stores fewer")
            return 0
        if layout == h5d.CONTIGUOUS:
            stored, offset = ds.id.get_storage_size(), ds.id.get_offset()
            if stored < nbytes or offset is None:
                raise self._corrupt(f"{declared} but only {stored} bytes are written")
            if offset + nbytes > file_size:
                raise self._corrupt(f"{where} lies beyond the end of the file")
            return 0
        if layout != h5d.CHUNKED or ds.chunks is None:
            raise self._corrupt(f"{where} has an unknown storage layout {layout}")
        chunk_bytes = math.prod(ds.chunks) * ds.dtype.itemsize
        if chunk_bytes > limits.max_chunk_bytes:
            raise self._corrupt(
                f"{where} has chunks of {chunk_bytes} bytes, more than {limits.max_chunk_bytes}"
            )
        needed = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks, strict=True))
        have = ds.id.get_num_chunks()
        if have == 0 and self._legacy_zeros(where, ds, filters):
            return 0
        if have != needed:
            raise self._corrupt(f"{declared} but only {have} of its {needed} chunks are written")
        if have > limits.max_chunks:
            raise self._over("stored chunks", have, limits.max_chunks)
        bad: list[Any] = []
        packed: list[Any] = []

        def visit(info: Any) -> None:
            offset, size = info.byte_offset, info.size
            outside = offset is None or size <= 0 or offset + size > file_size
            raw = not filters or (blosc and info.filter_mask & 1)  # the filter skipped
            if outside or (raw and size != chunk_bytes):
                bad.append(info.chunk_offset)
            elif blosc and not raw:
                packed.append(info)

        ds.id.chunk_iter(visit)
        if bad:
            raise self._corrupt(f"{where}: the chunk at {bad[0]} lies outside the file or is cut")
        if packed:
            self._check_blosc(where, ds, packed, chunk_bytes)
        return int(have)

    def _check_blosc(self, where: str, ds: h5py.Dataset, chunks: list[Any], nbytes: int) -> None:
        """CORRUPT unless every Blosc chunk's header fits the chunk (16 bytes read each)."""
        try:
            with open(self.path, "rb") as fh:
                for info in chunks:
                    fh.seek(info.byte_offset)
                    header = fh.read(16)
                    problem = blosc_header_problem(header, ds.dtype.itemsize, nbytes, info.size)
                    if problem:
                        raise self._corrupt(f"{where}: the chunk at {info.chunk_offset} {problem}")
        except OSError as exc:
            raise self._corrupt(f"{where}: cannot read its chunks ({exc})") from exc

    @staticmethod
    def _legacy_zeros(where: str, ds: h5py.Dataset, filters: list[int]) -> bool:
        """An older version's all-zero non-finite counts (see :meth:`_check_written`)."""
        return (
            where.startswith("/gradients/")
            and where.endswith("/nonfinite")
            and ds.dtype.kind in "iu"
            and not filters
            and ds.fillvalue == 0
        )

    def layout(self) -> Layout:
        """Names, shapes and dtypes of the ``/params`` arrays (metadata only; validate first)."""

        def read() -> Layout:
            out: Layout = {}
            for layer in self.header.layers:
                entry: dict[str, tuple[tuple[int, ...], str]] = {}
                for dist in DISTS:
                    for param in PARAMS:
                        for stat in STATS:
                            ds = self._node("params", layer, dist, param, stat)
                            if isinstance(ds, h5py.Dataset):
                                key = f"{dist}/{param}/{stat}"
                                entry[key] = (tuple(ds.shape), ds.dtype.name)
                out[layer] = entry
            return out

        layout: Layout = self._guard(read)
        return layout

    def check_values(self, block: int = VALUE_BLOCK) -> None:
        """CORRUPT naming the layer and array unless every ``mu`` of ``/params`` is finite
        and every ``sigma`` finite and > 0 (posterior and prior), and every gradient
        statistic that claims fewer mantissa bits (``mantissa_bits``) holds no more. Reads
        ``block`` elements at a time (validate first: this trusts the storage checks)."""
        for where, ds in self._guard(lambda: list(self._encoded_stats())):
            bits = self._guard(functools.partial(self._mantissa, ds))
            if bits < BF16_MANTISSA:
                self._guard(functools.partial(self._check_rounded, ds, where, bits, block))
        for layer in self.header.layers:
            for dist in DISTS:
                for param in PARAMS:
                    for stat in STATS:
                        ds = self._node("params", layer, dist, param, stat)
                        if isinstance(ds, h5py.Dataset):
                            where = f"{layer}/{dist}/{param}/{stat}"
                            self._guard(functools.partial(self._check_finite, ds, where, block))

    def _bad_value(self, array: str, layer: str, what: str, index: int, shape: Any) -> BnnError:
        """CORRUPT for the value at flat ``index`` of ``array`` (of ``shape``)."""
        at = tuple(int(i) for i in np.unravel_index(index, shape)) if shape else ()
        return BnnError(
            ErrorCode.CORRUPT,
            f"epoch file {self.name} is corrupt: {array} {what} at index {at}",
            file=self.name,
            layer=layer,
            array=array,
        )

    def _check_rounded(self, ds: h5py.Dataset, where: str, bits: int, block: int) -> None:
        start = 0
        for codes in self._blocks(ds, block):
            first = first_unrounded(codes, bits)
            if first is not None:
                code = int(codes.reshape(-1)[first])
                raise self._bad_value(
                    f"gradients/{where}",
                    where.split("/")[0],
                    f"claims {MANTISSA_ATTR}={bits}, but holds code {code:#06x} of more bits",
                    start + first,
                    ds.shape,
                )
            start += codes.size

    def _check_finite(self, ds: h5py.Dataset, where: str, block: int) -> None:
        sigma = where.endswith("/sigma")
        start = 0
        for values in self._blocks(ds, block):
            flat = values.reshape(-1)
            ok = (flat > 0) & (flat < np.inf) if sigma else np.isfinite(flat)
            if not ok.all():
                first = int(np.argmin(ok))
                want = "finite and > 0" if sigma else "finite"
                raise self._bad_value(
                    where,
                    where.split("/")[0],
                    f"must be {want} everywhere, found {flat[first].item()}",
                    start + first,
                    ds.shape,
                )
            start += flat.size

    def _blocks(self, ds: h5py.Dataset, block: int) -> Iterator[np.ndarray]:
        """The dataset's values in C order, at most ``block`` elements (or one row) at a time."""
        if ds.size == 0:
            return
        if ds.id.get_storage_size() == 0:  # never written: its fill value
            yield np.asarray(ds.fillvalue, ds.dtype).reshape(1)
            return
        offset = ds.id.get_offset() if ds.chunks is None else None
        if offset is not None:  # contiguous: straight from the file, no HDF5 buffers
            with open(self.path, "rb") as fh:
                for first in range(0, ds.size, block):
                    count = min(block, ds.size - first)
                    fh.seek(offset + first * ds.dtype.itemsize)
                    raw = fh.read(count * ds.dtype.itemsize)
                    if len(raw) != count * ds.dtype.itemsize:
                        raise self._corrupt(f"{ds.name} lies beyond the end of the file")
                    yield np.frombuffer(raw, ds.dtype)
            return
        for sel in _slabs(tuple(ds.shape), block, ds.chunks):
            yield np.asarray(ds[sel])

    def evaluation(self) -> dict[str, np.ndarray] | None:
        """The per-test-example arrays of the final evaluation, or None when absent."""

        def read() -> dict[str, np.ndarray] | None:
            node = self._node("evaluation")
            if node is None:
                return None
            return {key: np.asarray(self._child(node, key)[()]) for key in node}

        out: dict[str, np.ndarray] | None = self._guard(read)
        return out

    def snapshot(
        self, layers: Iterable[str] | None = None, gradients: bool = True
    ) -> EpochSnapshot:
        """The whole epoch (or some layers) as an :class:`EpochSnapshot`; from a file whose
        statistics keep fewer than 7 mantissa bits, with that ``stat_bits`` (so that writing
        the snapshot again does not claim bits its values lack)."""
        params = self.params(layers)
        grads: dict[str, Any] | None = None
        if gradients and self.header.has_gradients:
            node = self._node("gradients")
            grads = {layer: self.gradients(layer) for layer in params if layer in node}
        h = self.header
        bits = self.stat_bits() if grads is not None else BF16_MANTISSA
        return EpochSnapshot(
            h.epoch,
            params,
            dict(h.metrics),
            grads,
            h.grad_level,
            {k: v for k, v in h.layer_types.items() if k in params},
            self.evaluation(),
            stat_bits=bits if bits < BF16_MANTISSA else None,
        )


def _slabs(
    shape: tuple[int, ...], block: int, chunks: tuple[int, ...] | None = None
) -> Iterator[tuple[Any, ...]]:
    """Index tuples covering an array of ``shape`` in C order, each of about ``block``
    elements at most (at least one element of the split axis; a multiple of its chunk
    length where that fits, so no chunk is decompressed twice for one block)."""
    if not shape:
        yield ()
        return
    inner, k = 1, len(shape)
    while k > 0 and inner * shape[k - 1] <= block:
        inner *= shape[k - 1]
        k -= 1
    if k == 0:
        yield tuple(slice(None) for _ in shape)
        return
    axis = k - 1
    step = max(1, block // inner)
    if chunks is not None and step >= chunks[axis]:
        step -= step % chunks[axis]
    for outer in np.ndindex(*shape[:axis]):
        for i in range(0, shape[axis], step):
            yield (*outer, slice(i, i + step))


def read_epoch_file(
    path: str | Path,
    *,
    layers: Iterable[str] | None = None,
    gradients: bool = True,
    validate: bool = True,
) -> EpochSnapshot:
    """Read an epoch file into an :class:`EpochSnapshot`; CORRUPT naming the file if it is bad."""
    with EpochFile(path) as ef:
        if validate:
            ef.validate()
        return ef.snapshot(layers, gradients)
