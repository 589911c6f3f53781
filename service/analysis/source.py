"""Where analysis reads from: the seed's ``distribution_log`` dict or a stored run.

Every public analysis function takes ``run`` as any of

* the seed's ``distribution_log``: ``{epoch: {layer: {"posterior"|"prior": {"weight"|"bias":
  {"mu": ndarray, "sigma": ndarray}}}}}`` (gradient statistics can come beside it in a
  :class:`DictSource` with ``gradient_log={epoch: {layer: {...}}}``);
* a sequence of :class:`~trainer.snapshot.EpochSnapshot` (parameters and gradients);
* a stored run: its id (with ``data_dir=`` and optionally ``db_url=``), or an open
  :class:`~trainer.store.RunReader`;
* a :class:`RunSource` built by :func:`as_source`.

A stored run is read per epoch and per layer, and only the arrays a result needs, so
memory stays at about one layer's arrays whatever the run's length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot
from trainer.store import RunReader
from trainer.store.summaries import EpochSummaries

from ._cache import cached
from ._views import Alloc, DistType, EpochView, ParamKind, RunSource, parse_enum

__all__ = [
    "DictSource",
    "DistType",
    "EpochView",
    "ParamKind",
    "ReaderSource",
    "RunLike",
    "RunSource",
    "as_source",
    "open_source",
    "parse_enum",
]


# ----------------------------------------------------------------------------- dicts
def _grad_level(grads: Mapping[str, Any] | None) -> str:
    if not grads:
        return "none"
    for g in grads.values():
        for key in ("weight", "bias"):
            if key in g:
                for stats in g[key].values():
                    return "layer" if np.ndim(stats["mean_abs"]) == 0 else "element"
    return "layer"


class _DictView(EpochView):
    def __init__(
        self, epoch: int, params: Mapping[str, Any], grads: Mapping[str, Any] | None, name: str
    ) -> None:
        self.epoch = epoch
        self._params = params
        self._grads = grads
        self._name = name

    @property
    def layers(self) -> list[str]:
        return list(self._params)

    def array(
        self,
        layer: str,
        dist: str = "posterior",
        param: str = "weight",
        stat: str = "mu",
        index: Any = None,
        *,
        alloc: Alloc | None = None,
    ) -> np.ndarray:
        self.check_layer(layer)
        try:
            node = self._params[layer][dist][param][stat]
        except (KeyError, TypeError) as exc:
            if (
                dist in ("posterior", "prior")
                and param == "bias"
                and not self.has_param(layer, param)
            ):
                raise BnnError.not_found(
                    f"layer {layer!r} has no bias", layer=layer, param=param
                ) from None
            raise BnnError.invalid(
                f"{self._name}[{self.epoch}][{layer!r}] has no [{dist!r}][{param!r}][{stat!r}] "
                f"array (missing key {exc})",
                layer=layer,
            ) from None
        arr = np.asarray(node)
        return arr if index is None else np.asarray(arr[index])

    def has_param(self, layer: str, param: str) -> bool:
        self.check_layer(layer)
        post = self._params[layer].get("posterior", {})
        return isinstance(post, Mapping) and param in post

    def gradients(self, layer: str) -> dict[str, Any] | None:
        self.check_layer(layer)
        if not self._grads or layer not in self._grads:
            return None
        return dict(self._grads[layer])

    @property
    def grad_level(self) -> str:
        return _grad_level(self._grads)


class DictSource(RunSource):
    """The seed's ``distribution_log`` in memory, optionally with ``{epoch: {layer: grads}}``."""

    def __init__(
        self,
        distribution_log: Mapping[Any, Mapping[str, Any]],
        gradient_log: Mapping[Any, Mapping[str, Any]] | None = None,
        name: str = "distribution_log",
    ) -> None:
        if not isinstance(distribution_log, Mapping):
            raise BnnError.invalid(
                f"distribution_log must be a dict {{epoch: {{layer: ...}}}}, "
                f"got {type(distribution_log).__name__}"
            )
        self.name = name
        self._log: dict[int, Mapping[str, Any]] = {}
        for key, value in distribution_log.items():
            if isinstance(key, bool) or not isinstance(key, int | np.integer):
                raise BnnError.invalid(
                    f"distribution_log keys must be integer epochs, got {key!r}", epoch=str(key)
                )
            if not isinstance(value, Mapping):
                raise BnnError.invalid(
                    f"distribution_log[{key}] must be a dict of layers, got {type(value).__name__}"
                )
            self._log[int(key)] = value
        self._grads = {int(k): v for k, v in (gradient_log or {}).items()}
        self._epochs = sorted(self._log)

    @classmethod
    def from_snapshots(
        cls, snapshots: Sequence[EpochSnapshot], name: str = "snapshots"
    ) -> DictSource:
        """Parameters and gradient statistics of captured :class:`EpochSnapshot` s."""
        log = {s.epoch: s.params for s in snapshots}
        grads = {s.epoch: s.gradients for s in snapshots if s.gradients is not None}
        return cls(log, grads, name=name)

    @property
    def epochs(self) -> list[int]:
        return list(self._epochs)

    def open(self, epoch: int) -> EpochView:
        epoch = self.resolve_epoch(epoch)
        return _DictView(epoch, self._log[epoch], self._grads.get(epoch), self.name)


# ----------------------------------------------------------------------------- stored runs
class _ReaderView(EpochView):
    """Opens the epoch file at the first read, so cached results never touch the disk."""

    def __init__(self, reader: RunReader, epoch: int, key: Hashable | None = None) -> None:
        self.epoch = epoch
        self._key = key
        self._reader = reader
        self._file: Any = None
        self._grads: tuple[str, dict[str, Any] | None] | None = None  # last layer read
        self._stored: EpochSummaries | bool | None = False  # False: not looked at yet

    def _ef(self) -> Any:
        if self._file is None:
            self._file = self._reader.open(self.epoch)
        return self._file

    @property
    def layers(self) -> list[str]:
        key = None if self._key is None else ("layers", self._key)
        return list(cached(key, lambda: tuple(self._ef().header.layers)))

    def array(
        self,
        layer: str,
        dist: str = "posterior",
        param: str = "weight",
        stat: str = "mu",
        index: Any = None,
        *,
        alloc: Alloc | None = None,
    ) -> np.ndarray:
        self.check_layer(layer)
        # ``alloc`` marks a read for temporary use: a view of the mapped file is fine then
        ef = self._ef()
        return np.asarray(
            ef.array(layer, dist, param, stat, index, alloc=alloc, mapped=bool(alloc))
        )

    def stored(self) -> EpochSummaries | None:
        if self._stored is False:
            self._stored = self._ef().summaries()
        return self._stored if isinstance(self._stored, EpochSummaries) else None

    def has_param(self, layer: str, param: str) -> bool:
        stored = self.stored()
        if stored is not None:  # a row for every parameter the layer has
            return (self.check_layer(layer), "prior", param) in stored.params
        try:
            self.array(layer, "prior", param, "mu")
        except BnnError as exc:
            if exc.code is ErrorCode.NOT_FOUND and exc.details.get("param") == param:
                return False
            raise
        return True

    def gradients(self, layer: str) -> dict[str, Any] | None:
        if self._grads is not None and self._grads[0] == layer:
            return self._grads[1]
        self.check_layer(layer)
        ef = self._ef()
        tree: dict[str, Any] | None = None
        if ef.header.has_gradients:
            try:
                tree = dict(ef.gradients(layer))
            except BnnError as exc:
                if exc.code is not ErrorCode.NOT_FOUND:
                    raise
        self._grads = (layer, tree)  # one layer's statistics at most are kept
        return tree

    def gradient_array(
        self, layer: str, *path: str, alloc: Alloc | None = None
    ) -> np.ndarray | None:
        if self._grads is not None and self._grads[0] == layer:
            return super().gradient_array(layer, *path)
        self.check_layer(layer)
        ef = self._ef()
        if not ef.header.has_gradients:
            return None
        arr = ef.gradient_array(layer, *path, alloc=alloc, mapped=True)
        return None if arr is None else np.asarray(arr)

    @property
    def grad_level(self) -> str:
        return str(self._ef().header.grad_level.value)

    def close(self) -> None:
        self._grads = None
        self._stored = False
        if self._file is not None:
            self._file.close()
            self._file = None


class ReaderSource(RunSource):
    """A stored run read through a :class:`~trainer.store.RunReader` (closed only if ``owned``)."""

    def __init__(self, reader: RunReader, *, owned: bool = False) -> None:
        self.reader = reader
        self.name = str(reader.run_id)
        self._owned = owned
        self._epochs: list[int] | None = None
        self._run_key: tuple[str, str] | None = None

    @property
    def epochs(self) -> list[int]:
        if self._epochs is None:  # one catalog query per analysis call
            self._epochs = list(self.reader.epochs)
        return list(self._epochs)

    def open(self, epoch: int) -> EpochView:
        epoch = self.resolve_epoch(epoch)
        return _ReaderView(self.reader, epoch, self.cache_key(epoch))

    def cache_key(self, epoch: int) -> Hashable | None:
        """``(run id, run created_at, epoch)``: a committed epoch never changes (the store
        refuses other content for it), and a run deleted and created again under the same
        id has another ``created_at``. One catalog query per source, none per epoch."""
        if self._run_key is None:
            run = self.reader.run
            self._run_key = (run.id, run.created_at.isoformat())
        return ("run", *self._run_key, int(epoch))

    def close(self) -> None:
        if self._owned:
            self.reader.close()


RunLike = Mapping[Any, Mapping[str, Any]] | Sequence[EpochSnapshot] | RunReader | RunSource | str


def as_source(
    run: RunLike, *, data_dir: str | Path | None = None, db_url: str | None = None
) -> RunSource:
    """Wrap any accepted input (see the module docstring) in a :class:`RunSource`.

    A source built from a run id owns its reader: close it (or use :func:`open_source`).
    """
    if (data_dir is not None or db_url is not None) and not isinstance(run, str):
        raise BnnError.invalid(
            f"data_dir/db_url are only used with a run id, got a {type(run).__name__}"
        )
    if isinstance(run, RunSource):
        return run
    if isinstance(run, RunReader):
        return ReaderSource(run)
    if isinstance(run, str):
        return ReaderSource(RunReader(run, data_dir, db_url), owned=True)
    if isinstance(run, Mapping):
        return DictSource(run)
    if isinstance(run, Sequence) and run and all(isinstance(s, EpochSnapshot) for s in run):
        return DictSource.from_snapshots([s for s in run if isinstance(s, EpochSnapshot)])
    raise BnnError.invalid(
        "run must be a distribution_log dict, a list of EpochSnapshot, a run id, a RunReader "
        f"or a RunSource, got {type(run).__name__}"
    )


@contextlib.contextmanager
def open_source(
    run: RunLike, *, data_dir: str | Path | None = None, db_url: str | None = None
) -> Iterator[RunSource]:
    """:func:`as_source` as a context manager that closes what it opened."""
    src = as_source(run, data_dir=data_dir, db_url=db_url)
    try:
        yield src
    finally:
        if src is not run:
            src.close()
