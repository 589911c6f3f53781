"""The epoch file: one immutable HDF5 file per captured epoch (schema version 1).

Layout (any HDF5 tool can read it)::

    /                     attrs: schema_version=1, run_id, epoch, grad_level,
                                 layers (JSON list: the model's layer order)
    /params/<layer>       attrs: type ("BayesLinear" | "BayesConv2d" | "")
        /<posterior|prior>/<weight|bias>/<mu|sigma>     float; prior arrays shape (1,)
    /gradients/<layer>    (absent when no gradient statistics were captured)
        /<weight|bias>/<mu|rho>/<mean_abs|max_abs|nonfinite>   param shape or () per grad_level
        /step_norm                                    (steps,) float
        /prior/<weight|bias>/<mu|rho>                 (steps,) float, learnable priors only
    /metrics              attrs: one float64 per metric (NaN/Inf kept), in insertion order
    /evaluation/<name>    (last epoch only) per-test-example float64 arrays, all (N,)

Arrays are stored uncompressed by default: on float32 weights gzip+shuffle saves only
15-20% of the size but made the write of a 784-1200-1200-10 epoch with per-element
gradients 11x slower (0.76 s against 0.07 s), which the trainer pays every captured epoch.
``BNN_HDF5_COMPRESSION=gzip`` (or ``lzf``) compresses arrays of at least
:data:`COMPRESS_MIN_SIZE` elements. All-zero integer arrays (the non-finite counts, nearly
always zero) are stored as HDF5 fill values, which take neither space nor write time.

:func:`write_epoch_file` (in ``_write``) writes a complete file at a path; crash safety
(temp name, fsync, rename) is the caller's (see ``RunStore.write_epoch``).
:class:`EpochFile` reads one file lazily: a slice of one layer reads only that slice.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5g, h5l, h5o, h5s

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot, GradLevel, LayerLog

from ._schema import (
    DISTS,
    PARAMS,
    STATS,
    check_evaluation,
    check_gradients,
    check_name,
    check_params,
    clean_metrics,
    validate_snapshot,
)
from ._write import COMPRESS_MIN_SIZE, SCHEMA_VERSION, write_epoch_file

__all__ = [
    "COMPRESS_MIN_SIZE",
    "DISTS",
    "PARAMS",
    "SCHEMA_VERSION",
    "STATS",
    "EpochFile",
    "EpochHeader",
    "read_epoch_file",
    "validate_snapshot",
    "write_epoch_file",
]

# HDF5 lists names alphabetically; read back in the seed's order (posterior before prior, ...)
_ORDER = ("posterior", "weight", "bias", "mu", "rho", "sigma", "mean_abs", "max_abs", "nonfinite")
_KEY_RANK = {key: i for i, key in enumerate((*_ORDER, "step_norm", "prior"))}
_UNSET = object()
Alloc = Callable[[tuple[int, ...], Any], np.ndarray]  # (shape, dtype) -> array to read into


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
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or str(path)
        self._nodes: dict[tuple[str, ...], Any] = {}
        self._mm: Any = None  # the file memory-mapped on first use (False: cannot be)
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
        """
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

    def _read_header(self) -> EpochHeader:
        try:
            attrs = self._f.attrs
            version = _attr(attrs, "schema_version", None)
            if version is None or not np.issubdtype(np.asarray(version).dtype, np.integer):
                raise self._corrupt("no integer schema_version attribute")
            if int(version) != SCHEMA_VERSION:
                raise self._corrupt(
                    f"schema_version {int(version)} is not supported (this library reads 1)"
                )
            layers = json.loads(_text(attrs["layers"]))
            if not isinstance(layers, list) or len(set(layers)) != len(layers):
                raise self._corrupt(f"layers attribute {layers!r} is not a list of unique names")
            for layer in layers:
                check_name(layer, "layer", self._corrupt)
            params = self._node("params")
            if not isinstance(params, h5py.Group) or set(params) != set(layers):
                raise self._corrupt(f"/params groups do not match the layers attribute {layers}")
            # the layer groups through _node: checked once as hard links, then reused
            types = {
                layer: _text(_attr(self._node("params", layer).attrs, "type", ""))
                for layer in layers
            }
            metrics_group = self._node("metrics")
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

    def validate(self) -> None:
        """Full schema check from metadata (names, shapes, dtypes, links); reads no array data."""

        def tree(node: Any) -> Any:
            if isinstance(node, h5py.Group):
                return {key: tree(self._child(node, key)) for key in node}
            return node

        extra = set(self._f) - {"params", "gradients", "metrics", "evaluation"}
        if extra:
            raise self._corrupt(f"unexpected root objects {sorted(extra)}")
        params = self._guard(lambda: tree(self._node("params")))
        shapes = check_params(params, self._corrupt)
        if "evaluation" in self._f:
            check_evaluation(self._guard(lambda: tree(self._node("evaluation"))), self._corrupt)
        if self.header.has_gradients:
            check_gradients(
                self._guard(lambda: tree(self._node("gradients"))),
                shapes,
                self.header.grad_level,
                self._corrupt,
            )

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
        """The whole epoch (or some layers) as an :class:`EpochSnapshot`."""
        params = self.params(layers)
        grads: dict[str, Any] | None = None
        if gradients and self.header.has_gradients:
            node = self._node("gradients")
            grads = {layer: self.gradients(layer) for layer in params if layer in node}
        h = self.header
        return EpochSnapshot(
            h.epoch,
            params,
            dict(h.metrics),
            grads,
            h.grad_level,
            {k: v for k, v in h.layer_types.items() if k in params},
            self.evaluation(),
        )


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
