"""Structure checks shared by the writer (bad snapshot: INVALID_ARGUMENT) and the reader
(bad file: CORRUPT). They look at names, shapes and dtypes only, so an h5py Dataset works
as well as an ndarray and validating a file reads no array data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.errors import BnnError
from trainer.snapshot import EpochSnapshot, GradLevel

from ._codec import validate_compress_posteriors, validate_stat_bits
from ._paths import validate_epoch

__all__ = [
    "DISTS",
    "GRAD_PARAMS",
    "GRAD_STATS",
    "PARAMS",
    "STATS",
    "UploadLimits",
    "check_evaluation",
    "check_evaluation_meta",
    "check_gradients",
    "check_name",
    "check_params",
    "clean_metrics",
    "validate_snapshot",
]

DISTS = ("posterior", "prior")
PARAMS = ("weight", "bias")
STATS = ("mu", "sigma")
GRAD_PARAMS = ("mu", "rho")
#: learnable prior parameters: Gaussian (mu, rho) and scale mixture (logit_pi, rho1, rho2)
PRIOR_GRAD_PARAMS = ("mu", "rho", "logit_pi", "rho1", "rho2")
GRAD_STATS = ("mean_abs", "max_abs", "nonfinite")
Fail = Callable[[str], BnnError]


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on an epoch file that comes from elsewhere (an upload, an import).

    The defaults fit a 784-1200-1200-10 MLP capture with per-element gradient statistics
    and a 10k-example final evaluation (3 layers, 19.2 million elements, 77 MB of arrays)
    with room to spare. The service sets the first two from ``BNN_MAX_UPLOAD_LAYERS`` and
    ``BNN_MAX_UPLOAD_ELEMENTS``.

    Attributes:
        max_layers: layers (``/params`` groups) in one file.
        max_elements: array elements of all datasets together (fill-value datasets too).
        max_chunks: stored chunks of all chunked datasets together (many tiny chunks make
            a small file slow to read).
        max_chunk_bytes: uncompressed size of one chunk (what reading it allocates).
        max_metrics: metric attributes of ``/metrics``.
    """

    max_layers: int = 64
    max_elements: int = 50_000_000
    max_chunks: int = 65_536
    max_chunk_bytes: int = 16 * 2**20
    max_metrics: int = 1024

    @property
    def max_objects(self) -> int:
        """Groups and datasets in one file: a layer has at most 48 (15 under ``/params``,
        33 under ``/gradients``), plus the root groups and evaluation arrays."""
        return 64 + 64 * self.max_layers

    @property
    def max_members(self) -> int:
        """Members of one group (``/params`` and ``/gradients`` hold one per layer)."""
        return max(self.max_layers, 32)


def check_name(name: object, what: str, fail: Fail) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\x00" in name
        or name in (".", "..")
    ):
        raise fail(f"bad {what} name {name!r}: must be a non-empty string without '/'")
    return name


def _check_keys(
    node: object, allowed: Iterable[str], required: Iterable[str], where: str, fail: Fail
) -> None:
    if not isinstance(node, Mapping):
        raise fail(f"{where} must be a group/dict, got {type(node).__name__}")
    extra = sorted(set(node) - set(allowed))
    missing = sorted(set(required) - set(node))
    if extra or missing:
        raise fail(f"{where}: unexpected keys {extra}, missing keys {missing}")


def _check_array(
    arr: Any, where: str, kind: str, shape: tuple[int, ...] | None, fail: Fail
) -> None:
    """``arr`` is an ndarray or an h5py Dataset (only metadata is looked at)."""
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype") or isinstance(arr, Mapping):
        raise fail(f"{where} must be an array, got {type(arr).__name__}")
    if np.dtype(arr.dtype).kind not in kind:
        raise fail(
            f"{where} has dtype {arr.dtype}, expected {'float' if kind == 'f' else 'integer'}"
        )
    if shape is not None and tuple(arr.shape) != shape:
        raise fail(f"{where} has shape {tuple(arr.shape)}, expected {shape}")
    if getattr(arr, "external", None) or getattr(arr, "is_virtual", False):
        raise fail(f"{where} refers to data outside the file")


def check_params(params: Mapping[str, Any], fail: Fail) -> dict[str, dict[str, tuple[int, ...]]]:
    """Validate a distribution_log epoch; returns layer -> param -> posterior shape."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    if not isinstance(params, Mapping) or not params:
        raise fail("params must hold at least one layer")
    for layer, log in params.items():
        check_name(layer, "layer", fail)
        _check_keys(log, DISTS, DISTS, f"layer {layer!r}", fail)
        post = log["posterior"]
        _check_keys(post, PARAMS, ("weight",), f"{layer}/posterior", fail)
        _check_keys(log["prior"], post.keys(), post.keys(), f"{layer}/prior", fail)
        shapes[layer] = {}
        for param in post:
            for dist in DISTS:
                _check_keys(log[dist][param], STATS, STATS, f"{layer}/{dist}/{param}", fail)
            mu = post[param]["mu"]
            _check_array(mu, f"{layer}/posterior/{param}/mu", "f", None, fail)
            _check_array(
                post[param]["sigma"], f"{layer}/posterior/{param}/sigma", "f", tuple(mu.shape), fail
            )
            for stat in STATS:
                _check_array(
                    log["prior"][param][stat], f"{layer}/prior/{param}/{stat}", "f", (1,), fail
                )
            shapes[layer][param] = tuple(mu.shape)
    return shapes


def check_gradients(
    grads: Mapping[str, Any],
    shapes: dict[str, dict[str, tuple[int, ...]]],
    level: GradLevel,
    fail: Fail,
) -> None:
    if level is GradLevel.NONE:
        raise fail("gradient statistics are present but grad_level is 'none'")
    for layer, g in grads.items():
        if layer not in shapes:
            raise fail(f"gradients for unknown layer {layer!r}; layers are {list(shapes)}")
        params = list(shapes[layer])
        _check_keys(g, [*params, "step_norm", "prior"], (), f"gradients/{layer}", fail)
        for param in params:
            if param not in g:
                continue
            _check_keys(g[param], GRAD_PARAMS, (), f"gradients/{layer}/{param}", fail)
            want = shapes[layer][param] if level is GradLevel.ELEMENT else ()
            for gp, stats in g[param].items():
                _check_keys(stats, GRAD_STATS, (), f"gradients/{layer}/{param}/{gp}", fail)
                for stat, arr in stats.items():
                    kind = "iu" if stat == "nonfinite" else "f"
                    _check_array(arr, f"gradients/{layer}/{param}/{gp}/{stat}", kind, want, fail)
        if "step_norm" in g:
            _check_array(g["step_norm"], f"gradients/{layer}/step_norm", "f", None, fail)
            if len(g["step_norm"].shape) != 1:
                shape = tuple(g["step_norm"].shape)
                raise fail(f"gradients/{layer}/step_norm must be 1-D, got shape {shape}")
        prior = g.get("prior", {})
        _check_keys(prior, params, (), f"gradients/{layer}/prior", fail)
        for param, pg in prior.items():
            _check_keys(pg, PRIOR_GRAD_PARAMS, (), f"gradients/{layer}/prior/{param}", fail)
            for gp, arr in pg.items():
                _check_array(arr, f"gradients/{layer}/prior/{param}/{gp}", "f", None, fail)
                if len(arr.shape) != 1:
                    where = f"gradients/{layer}/prior/{param}/{gp}"
                    raise fail(f"{where} must be 1-D, got shape {tuple(arr.shape)}")


def check_evaluation(evaluation: Mapping[str, Any], fail: Fail) -> dict[str, np.ndarray]:
    """Per-example evaluation arrays: names are plain, arrays 1-D float of one length."""
    out: dict[str, np.ndarray] = {}
    lengths = set()
    for key, value in evaluation.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise fail(f"bad evaluation name {key!r}")
        arr = np.asarray(value)
        if arr.ndim != 1 or arr.dtype.kind not in "fiub":
            raise fail(f"evaluation/{key} must be a 1-D numeric array, got {arr.dtype} {arr.shape}")
        lengths.add(arr.shape[0])
        out[key] = arr.astype(np.float64, copy=False)
    if len(lengths) > 1:
        raise fail(f"evaluation arrays must have one length, got {sorted(lengths)}")
    return out


def check_evaluation_meta(evaluation: Mapping[str, Any], fail: Fail) -> None:
    """:func:`check_evaluation` from shapes and dtypes only (h5py Datasets: no data read)."""
    lengths = set()
    for key, value in evaluation.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise fail(f"bad evaluation name {key!r}")
        if isinstance(value, Mapping) or not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise fail(f"evaluation/{key} must be an array, got {type(value).__name__}")
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        if len(shape) != 1 or dtype.kind not in "fiub":
            raise fail(f"evaluation/{key} must be a 1-D numeric array, got {dtype} {shape}")
        lengths.add(shape[0])
    if len(lengths) > 1:
        raise fail(f"evaluation arrays must have one length, got {sorted(lengths)}")


def clean_metrics(metrics: Mapping[str, Any], fail: Fail) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise fail(f"bad metric name {key!r}")
        if isinstance(value, bool | np.bool_) or not isinstance(
            value, int | float | np.integer | np.floating
        ):
            raise fail(f"metric {key!r} must be a number, got {value!r}")
        out[key] = float(value)
    return out


def _as_arrays(node: Any) -> Any:
    """Nested dicts with ndarray leaves; size-1 prior values become shape (1,)."""
    if isinstance(node, Mapping):
        return {k: _as_arrays(v) for k, v in node.items()}
    return np.asarray(node)


def validate_snapshot(snap: EpochSnapshot) -> EpochSnapshot:
    """Check a snapshot before writing; returns a normalised copy. INVALID_ARGUMENT if bad."""

    def fail(msg: str) -> BnnError:
        return BnnError.invalid(f"bad snapshot for epoch {snap.epoch!r}: {msg}")

    validate_epoch(snap.epoch)
    params = _as_arrays(snap.params)
    with contextlib.suppress(AttributeError, TypeError, KeyError):  # bad structure: reported below
        for log in params.values():
            for stats in log["prior"].values():
                for stat, arr in stats.items():
                    stats[stat] = arr.reshape(1) if arr.size == 1 else arr
    shapes = check_params(params, fail)
    try:
        level = GradLevel(snap.grad_level)
    except ValueError:
        raise fail(
            f"grad_level must be one of {[g.value for g in GradLevel]}, got {snap.grad_level!r}"
        ) from None
    grads = None if snap.gradients is None else _as_arrays(snap.gradients)
    if grads is not None:
        check_gradients(grads, shapes, level, fail)
    types = dict(snap.layer_types)
    if set(types) - set(shapes) or not all(isinstance(t, str) for t in types.values()):
        raise fail(f"layer_types {types!r} must map known layers {list(shapes)} to strings")
    evaluation = None if snap.evaluation is None else check_evaluation(snap.evaluation, fail)
    metrics = clean_metrics(snap.metrics, fail)
    try:
        stat_bits = None if snap.stat_bits is None else validate_stat_bits(snap.stat_bits)
        packed = validate_compress_posteriors(snap.compress_posteriors)
    except BnnError as exc:
        raise fail(exc.message) from None
    return EpochSnapshot(
        snap.epoch,
        params,
        metrics,
        grads,
        level,
        types,
        evaluation,
        stat_bits=stat_bits,
        compress_posteriors=packed,
    )
