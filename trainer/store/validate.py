"""Checking an epoch file from elsewhere (an upload, an import) against the run it joins.

    reference = run_reference(store, run_id)          # the layout the run's epochs must have
    header = check_epoch_file(path, run_id=run_id, epoch=5, reference=reference)

:func:`check_epoch_file` refuses, in this order and before reading any array data:

* a file that is not HDF5, of a schema version other than 1 and 2, breaks the schema
  (:meth:`EpochFile.validate`; a bfloat16 encoding is allowed only on the gradient
  statistics of a version 2 file), or lacks the ``/params`` or ``/metrics`` group
  (CORRUPT). Old clients' version 1 files are accepted as before;
* more layers, metrics, groups, array elements or chunks than :class:`UploadLimits` allow
  (INVALID_ARGUMENT naming the limit), checked from metadata before the layers are walked;
* a ``run_id`` attribute naming another run, or an ``epoch`` attribute other than the
  epoch it is stored as (INVALID_ARGUMENT). An empty ``run_id`` is accepted:
  ``write_epoch_file`` writes one unless told the run, and older clients did;
* ``/params`` layer names, arrays, shapes or dtypes other than the run's (the reference,
  below; INVALID_ARGUMENT naming the first difference);
* a dataset that is not fully written inside the file (a small file declaring huge
  arrays), with one tolerated form of older files (see :meth:`EpochFile._check_written`),
  or that needs an HDF5 filter other than deflate, shuffle, fletcher32, lzf and Blosc, or
  Blosc with another filter, or a Blosc chunk whose header does not match the chunk (it
  is read, 16 bytes, before anything is decompressed).

Only then are the ``/params`` arrays read, a block at a time: every ``mu`` must be finite,
every ``sigma`` finite and > 0 (CORRUPT naming the layer and array). Last, a file that
carries summaries (``/summary``, :mod:`trainer.store.summaries`) must carry the ones its
arrays give: they are computed again, a layer at a time, and a summary that differs, is
missing or has no arrays behind it is CORRUPT naming it (:func:`check_summaries`); so is
a summary version this library cannot check. Readers trust stored summaries, so none
planted by an upload gets past this.

The reference (:func:`run_reference`) is the ``/params`` layout of the run's first
catalogued epoch; for a run without epochs, the layout of the model its configuration
describes (:func:`config_layout`: shapes only, as the model fixes shapes and the capture
the dtype), when the configuration is a complete trainer configuration whose model is
small enough to build in a moment; otherwise None, and the first epoch stored pins the
layout for the later ones.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import BnnError, ErrorCode

from ._schema import UploadLimits
from .hdf5 import EpochFile, EpochHeader, Layout
from .summaries import SUMMARY_VERSION, EpochSummaries, add_layer, difference

if TYPE_CHECKING:
    from .runstore import RunStore

__all__ = [
    "MAX_BUILD_PARAMS",
    "Reference",
    "UploadLimits",
    "check_epoch_file",
    "check_layout",
    "check_summaries",
    "config_layout",
    "run_reference",
]

#: a configuration's model is built to read its shapes only up to this many parameters
#: (784-1200-1200-10 has 2.4 million: about 60 ms and 20 MB for a moment)
MAX_BUILD_PARAMS = 5_000_000
# input shape (of an MLP, flattened) and outputs of each dataset the trainer knows
_DATASET_IO: dict[str, tuple[tuple[int, ...], int]] = {
    "regression": ((1,), 1),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "kmnist": ((1, 28, 28), 10),
}


class Reference:
    """The layout a run's epochs must have, and where it comes from (for messages).

    ``dtypes``: False when the layout comes from a configuration (a model fixes shapes;
    the dtype is the capture's, pinned by the first epoch stored).
    """

    def __init__(self, layout: Layout, source: str, *, dtypes: bool = True) -> None:
        self.layout = layout
        self.source = source
        self.dtypes = dtypes

    def __repr__(self) -> str:
        return f"Reference({self.source!r}, layers={list(self.layout)})"


def check_layout(layout: Layout, reference: Reference, name: str) -> None:
    """INVALID_ARGUMENT naming the first difference between a file's layout and the run's."""

    def fail(message: str, **details: Any) -> BnnError:
        return BnnError.invalid(
            f"epoch file {name} does not fit the run: {message} ({reference.source})",
            file=name,
            reference=reference.source,
            **details,
        )

    want = reference.layout
    if list(layout) != list(want):
        raise fail(
            f"its layers are {list(layout)}, the run's are {list(want)}",
            layers=list(layout),
            expected=list(want),
        )
    for layer, arrays in layout.items():
        expected = want[layer]
        if set(arrays) != set(expected):
            extra, missing = (
                sorted(set(arrays) - set(expected)),
                sorted(set(expected) - set(arrays)),
            )
            raise fail(
                f"layer {layer!r} has arrays {extra} the run's epochs lack and lacks {missing}",
                layer=layer,
            )
        for key, (shape, dtype) in arrays.items():
            want_shape, want_dtype = expected[key]
            if shape != want_shape or (reference.dtypes and dtype != want_dtype):
                got = f"{shape} {dtype}" if reference.dtypes else str(shape)
                exp = f"{want_shape} {want_dtype}" if reference.dtypes else str(want_shape)
                raise fail(
                    f"{layer}/{key} has shape {got}, the run's is {exp}",
                    layer=layer,
                    array=f"{layer}/{key}",
                    shape=list(shape),
                    expected_shape=list(want_shape),
                )


def check_epoch_file(
    path: str | Path,
    *,
    run_id: str,
    epoch: int,
    reference: Reference | None = None,
    limits: UploadLimits | None = None,
    name: str | None = None,
) -> EpochHeader:
    """Check a file from elsewhere as epoch ``epoch`` of run ``run_id`` (see the module doc).

    Returns its header. ``name`` is how errors name the file (default its path).
    """
    limits = limits or UploadLimits()
    name = name or str(path)
    with EpochFile(path, name=name, limits=limits) as ef:
        header = ef.header
        if header.run_id and header.run_id != run_id:
            raise BnnError.invalid(
                f"epoch file {name} belongs to run {header.run_id!r}, not {run_id!r}",
                file=name,
                run_id=run_id,
                file_run_id=header.run_id,
            )
        if header.epoch != epoch:
            raise BnnError.invalid(
                f"epoch file {name} holds epoch {header.epoch}, not epoch {epoch}",
                file=name,
                epoch=epoch,
                file_epoch=header.epoch,
            )
        ef.validate(limits)
        if reference is not None:
            check_layout(ef.layout(), reference, name)
        ef.check_values()
        check_summaries(ef, name)
    return header


def check_summaries(ef: EpochFile, name: str) -> None:
    """CORRUPT naming the summary unless the file's stored summaries (if any) are the ones
    its arrays give (:func:`trainer.store.summaries.difference`). Reads one layer's arrays
    at a time; validate the file first."""
    version = ef.summary_version()
    if version is None:
        return
    if version != SUMMARY_VERSION:
        raise BnnError(
            ErrorCode.CORRUPT,
            f"epoch file {name} is corrupt: its /summary is of version {version}; this "
            f"library checks version {SUMMARY_VERSION} (send the file without summaries)",
            file=name,
            summary_version=version,
        )
    stored = ef.summaries()
    assert stored is not None
    computed = EpochSummaries()
    for layer in ef.header.layers:
        grads = None
        if ef.header.has_gradients:
            try:
                grads = ef.gradients(layer)
            except BnnError as exc:
                if exc.code is not ErrorCode.NOT_FOUND:
                    raise
        add_layer(computed, layer, ef.params([layer])[layer], grads)
    found = difference(stored, computed)
    if found is not None:
        summary, what = found
        raise BnnError(
            ErrorCode.CORRUPT,
            f"epoch file {name} is corrupt: its stored summary {summary} does not match its "
            f"arrays: {what}",
            file=name,
            summary=summary,
        )


def run_reference(store: RunStore, run_id: str) -> Reference | None:
    """The layout run ``run_id``'s next epoch must have (see the module doc), or None.

    A first epoch that cannot be read falls back to the configuration.
    """
    epochs = store.list_epochs(run_id)
    if epochs:
        first = epochs[0]
        try:
            with EpochFile(store.data_dir / first.file, name=f"epoch {first.epoch}") as ef:
                return Reference(ef.layout(), f"as epoch {first.epoch} of the run")
        except BnnError:
            pass
    layout = config_layout(store.get_run(run_id).config)
    if layout is None:
        return None
    return Reference(layout, "as the run's configured model", dtypes=False)


def config_layout(config: Mapping[str, Any] | None) -> Layout | None:
    """The ``/params`` layout of the model a run configuration describes, or None.

    None unless ``config`` is a complete trainer configuration (it names ``dataset`` and
    ``model``, as the trainer and the service store them; a hand-made ``{}`` describes no
    model), it parses, its dataset is known here, and its model has at most
    :data:`MAX_BUILD_PARAMS` parameters. Cached per configuration.
    """
    if not isinstance(config, Mapping) or "dataset" not in config or "model" not in config:
        return None
    try:
        key = json.dumps(dict(config), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    return _config_layout(key)


@functools.lru_cache(maxsize=128)
def _config_layout(key: str) -> Layout | None:
    import torch

    from trainer.config import ModelKind, parse_config
    from trainer.data import DataSplits
    from trainer.layers import bayesian_layers
    from trainer.train import build_model

    try:
        config = parse_config(json.loads(key))
    except (BnnError, ValueError, TypeError):
        return None
    io = _DATASET_IO.get(config.dataset.value)
    if io is None:
        return None
    shape, outputs = io
    if config.model is ModelKind.MLP:
        shape = (math.prod(shape),)
        sizes = [shape[0], *config.hidden, outputs]
        n_params = sum((a + 1) * b for a, b in itertools.pairwise(sizes))
        if n_params > MAX_BUILD_PARAMS:
            return None
    x = torch.empty((0, *shape))
    y = torch.empty((0,))
    data = DataSplits(config.dataset.value, x, y, x, y, outputs, config.is_classification)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = build_model(config, data)
    except (BnnError, ValueError, TypeError, RuntimeError):
        return None
    layout: Layout = {}
    for name, layer in bayesian_layers(model):
        entry: dict[str, tuple[tuple[int, ...], str]] = {}
        params = {"weight": layer.weight_mu}
        if layer.bias_mu is not None and layer.bias_prior is not None:  # as the capture
            params["bias"] = layer.bias_mu
        for param, mu in params.items():
            for stat in ("mu", "sigma"):
                entry[f"posterior/{param}/{stat}"] = (tuple(mu.shape), "float32")
                entry[f"prior/{param}/{stat}"] = ((1,), "float32")
        layout[name] = entry
    return layout
