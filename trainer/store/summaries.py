"""Per-epoch summaries kept in the epoch file (``/summary``), computed once when it is written.

What the analysis's tables and trajectory plots need of an epoch -- per parameter tensor
the sums of its Gaussians (moments, the exact pairwise symmetric KL, the sums that give
the KL to any prior) and the exact percentiles of mu and sigma; per gradient statistic the
counts, median and maxima the gradient tables and plots show -- is a few hundred numbers,
while computing it reads and passes over every element (about 20 ms per epoch of a
940,800-weight layer). :func:`~trainer.store.write_epoch_file` computes it from the values
it writes and stores it beside the arrays, so the first plot of a run reads tables
instead of arrays (``service.analysis`` falls back to the arrays for files without them).

Layout (schema version 2 files written by this version; older files have none)::

    /summary               attrs: version (SUMMARY_VERSION)
        /params            float64 (rows, len(PARAM_COLUMNS)), attrs: columns (JSON list of
                           PARAM_COLUMNS), shapes (JSON: each row's array shape)
        /gradients         float64 (rows, len(GRAD_COLUMNS)), attrs: columns (JSON list of
                           GRAD_COLUMNS); absent when the epoch has no gradient statistics

A ``/params`` row per layer, distribution (posterior, prior) and parameter (weight, bias):
``layer`` (index into the root ``layers`` attribute), ``dist`` (index into ``("posterior",
"prior")``), ``param`` (index into ``("weight", "bias")``), ``nonfinite`` (elements left
out: mu or sigma not finite, or sigma <= 0), the layer's shared ``prior_mu`` and
``prior_sigma`` for that parameter, the :class:`~trainer.store.numeric.GaussianSums` of the
valid elements (``mu_mean``, ``mu_m2``, ``sigma_mean``, ``sigma_m2``, ``pairwise_kl``,
``sum_log_sigma``, ``sum_variance``; the count is the shape's size less ``nonfinite``) and
the :data:`~trainer.store.numeric.TB_PERCENTILES` of mu and of sigma (``mu_p0`` ...
``sigma_p100``). A ``/gradients`` row per layer, parameter, ``grad_param`` (``mu``,
``rho``) and ``stat`` (``mean_abs``, ``max_abs``) captured with its non-finite counts: the
:class:`GradStats` of the values a reader reads (bfloat16-rounded in version 2).

Every number is computed by the functions the analysis uses on the arrays (one
implementation, :mod:`trainer.store.numeric`) from exactly the values stored, and kept as
float64, so a summary read back equals the one computed from the arrays bit for bit.
Where a C compiler is at hand those functions run one-pass C kernels
(:mod:`trainer.store._native`; the gradient statistics straight from the bfloat16 codes'
histogram, the posteriors' on a thread of their own while the writer writes the datasets):
counts, percentiles and medians are then identical to numpy's, the float sums equal up to
their last bits (which is what :data:`SUM_RTOL` allows a file from elsewhere).
A version other than :data:`SUMMARY_VERSION` is ignored by readers (they compute from the
arrays). Files from elsewhere (uploads) cannot plant summaries: the receiving store
recomputes them from the file's arrays and refuses the file unless they agree
(:func:`difference`, ``trainer.store.validate``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
from h5py import h5s

from trainer.errors import BnnError

from . import _native
from ._codec import decode_bf16
from .numeric import (
    TB_PERCENTILES,
    GaussianSums,
    Moments,
    finite_max,
    gaussian_summary,
    interpolate,
    percentiles,
    rank_pairs,
    scalar,
    valid_values,
)

__all__ = [
    "GRAD_COLUMNS",
    "GRAD_STATS",
    "PARAM_COLUMNS",
    "SUMMARY_VERSION",
    "Encoded",
    "EpochSummaries",
    "GradStats",
    "ParamStats",
    "add_gradients",
    "add_layer",
    "add_params",
    "difference",
    "grad_stats",
    "param_stats",
    "read_summaries",
    "write_summaries",
]

SUMMARY_VERSION = 1
DISTS = ("posterior", "prior")
PARAMS = ("weight", "bias")
GRAD_PARAMS = ("mu", "rho")
#: the gradient statistics summarised (each with the non-finite counts beside it)
GRAD_STATS = ("mean_abs", "max_abs")
_PCT = tuple(f"{q:g}" for q in TB_PERCENTILES)
PARAM_COLUMNS = (
    "layer",
    "dist",
    "param",
    "nonfinite",
    "prior_mu",
    "prior_sigma",
    "mu_mean",
    "mu_m2",
    "sigma_mean",
    "sigma_m2",
    "pairwise_kl",
    "sum_log_sigma",
    "sum_variance",
    *(f"mu_p{q}" for q in _PCT),
    *(f"sigma_p{q}" for q in _PCT),
)
GRAD_COLUMNS = (
    "layer",
    "param",
    "grad_param",
    "stat",
    "element_level",
    "elements",
    "nonfinite_elements",
    "nonfinite_steps",
    "zeros",
    "median",
    "max",
    "peak",
)
_NPCT = len(TB_PERCENTILES)
_P0 = PARAM_COLUMNS.index("mu_p0")
#: the ``shapes`` attribute stays well inside HDF5's 64 KB attribute message; a model
#: whose shapes need more (thousands of layers) is written without summaries
MAX_SHAPES_BYTES = 48 * 1024
#: relative tolerance of the float sums when a file from elsewhere is checked (another
#: machine's numpy may round a logarithm differently; everything else must be identical)
SUM_RTOL = 1e-9
Fail = Callable[[str], BnnError]
ParamKey = tuple[str, str, str]  # (layer, dist, param)
GradKey = tuple[str, str, str, str]  # (layer, param, grad_param, stat)


@dataclass(frozen=True)
class ParamStats:
    """One parameter tensor's summary (posterior or the layer's shared prior)."""

    shape: tuple[int, ...]
    nonfinite: int  # elements left out: mu or sigma not finite, or sigma <= 0
    prior_mu: float  # the layer's shared prior of this parameter
    prior_sigma: float
    sums: GaussianSums  # of the valid elements
    mu_percentiles: np.ndarray  # TB_PERCENTILES of the valid mu, float64 (NaN when none)
    sigma_percentiles: np.ndarray


@dataclass(frozen=True)
class GradStats:
    """One gradient statistic of a parameter (e.g. ``weight``/``mu``/``mean_abs``) at one
    epoch. An element is *non-finite* when its count of non-finite steps is > 0 or its
    statistic is not finite."""

    element_level: bool  # per element (else one value per tensor)
    elements: int
    nonfinite_elements: int
    nonfinite_steps: int  # sum of the non-finite step counts
    zeros: int  # elements whose statistic is exactly 0
    median: float  # of the statistic over the elements that are not non-finite
    max: float  # the largest of those
    peak: float  # the largest finite value of the statistic over all elements


@dataclass
class EpochSummaries:
    """An epoch's summaries by ``(layer, dist, param)`` and ``(layer, param, grad_param,
    stat)``."""

    params: dict[ParamKey, ParamStats] = field(default_factory=dict)
    gradients: dict[GradKey, GradStats] = field(default_factory=dict)


# ----------------------------------------------------------------------------- computing
def param_stats(
    mu: np.ndarray, sigma: np.ndarray, prior_mu: float, prior_sigma: float
) -> ParamStats:
    """The summary of one tensor's ``mu`` and ``sigma`` (same shape)."""
    shape = tuple(int(d) for d in np.shape(mu))
    mu_ok, sigma_ok, nonfinite = valid_values(np.asarray(mu), np.asarray(sigma))
    sums, mu_pct, sigma_pct = gaussian_summary(mu_ok, sigma_ok, TB_PERCENTILES)
    assert mu_pct is not None and sigma_pct is not None
    return ParamStats(shape, nonfinite, prior_mu, prior_sigma, sums, mu_pct, sigma_pct)


@dataclass(frozen=True)
class Encoded:
    """A per-element statistic as the writer stores it: its bfloat16 ``codes`` and their
    histogram (``hist[code]``, from the same pass), which give its :class:`GradStats`
    without decoding the codes (:func:`grad_stats` takes it in place of the values)."""

    codes: np.ndarray
    hist: np.ndarray | None  # None: computed from the decoded values

    def values(self) -> np.ndarray:
        return decode_bf16(self.codes)


def _from_codes(stat: Encoded, nonfinite: np.ndarray, nf_elements: int) -> GradStats | None:
    """:class:`GradStats` of an encoded statistic whose non-finite step counts are all 0
    (the usual case: ``nf_elements``, the count of elements with some, is 0), from its
    codes' histogram; None otherwise (or without the kernels)."""
    if stat.hist is None or np.ndim(nonfinite) == 0 or nf_elements:
        return None
    counts = _native.bf16_counts(stat.hist)
    if counts is None:
        return None
    bad, zeros, finite, top = counts
    median = float("nan")
    if finite:
        ranks, r0, r1, t = rank_pairs(finite, (50.0,))
        values = _native.bf16_values(stat.hist, ranks)
        if values is None:
            return None
        median = float(interpolate(values.astype(np.float32), ranks, r0, r1, t)[0])
    return GradStats(True, int(stat.codes.size), bad, 0, zeros, median, top, top)


def grad_stats(
    stat: np.ndarray | Encoded, nonfinite: np.ndarray, nf_elements: int | None = None
) -> GradStats:
    """The summary of one gradient statistic (read as float32, or as the writer encoded it)
    and its non-finite counts; ``nf_elements``: ``np.count_nonzero(nonfinite)`` where the
    caller has it (the statistics of one gradient share their counts)."""
    nf = np.asarray(nonfinite)
    if nf_elements is None:
        nf_elements = int(np.count_nonzero(nf))  # nearly always 0: then one pass each
    if isinstance(stat, Encoded):
        found = _from_codes(stat, nf, nf_elements)
        if found is not None:
            return found
        stat = stat.values()
    g = np.asarray(stat).astype(np.float32, copy=False).ravel()  # statistics of |g|: >= 0
    if nf_elements == 0 and (not g.size or np.isfinite(g.max())):
        n_bad, finite_g = 0, g
    else:
        bad = ~np.isfinite(g)
        if nf_elements:
            bad |= np.greater(nf, 0).ravel()
        n_bad = int(np.count_nonzero(bad))
        finite_g = g[~bad] if n_bad else g
    top = float(finite_g.max()) if finite_g.size else float("nan")
    return GradStats(
        nf.ndim != 0,
        int(g.size),
        n_bad,
        int(nf.sum()) if nf_elements else 0,
        int(np.count_nonzero(g == 0)),
        float(percentiles(finite_g, (50.0,))[0]),
        top,
        top if n_bad == 0 else finite_max(g),  # all finite: the peak is the max
    )


def add_params(out: EpochSummaries, layer: str, log: Mapping[str, Any]) -> None:
    """Add one layer's parameter summaries to ``out`` (``log`` in the ``distribution_log``
    layout)."""
    for param in log["posterior"]:
        prior = log["prior"][param]
        prior_mu, prior_sigma = scalar(prior["mu"]), scalar(prior["sigma"])
        for dist in DISTS:
            arrays = log[dist][param]
            out.params[(layer, dist, param)] = param_stats(
                arrays["mu"], arrays["sigma"], prior_mu, prior_sigma
            )


def add_gradients(out: EpochSummaries, layer: str, grads: Mapping[str, Any] | None) -> None:
    """Add one layer's gradient summaries to ``out``: ``grads`` its gradient statistics in
    the snapshot layout (as a reader reads them: bfloat16-rounded where the file stores
    bfloat16, or :class:`Encoded`), or None."""
    for param in PARAMS:
        for gp, stats in (grads or {}).get(param, {}).items():
            if "nonfinite" not in stats:
                continue  # no row: a reader computes (and reports) from the arrays
            nf = np.asarray(stats["nonfinite"])
            nf_elements = int(np.count_nonzero(nf))  # once for the gradient's statistics
            for stat in GRAD_STATS:
                if stat in stats:
                    out.gradients[(layer, param, gp, stat)] = grad_stats(
                        stats[stat], nf, nf_elements
                    )


def add_layer(
    out: EpochSummaries, layer: str, log: Mapping[str, Any], grads: Mapping[str, Any] | None
) -> None:
    """Add one layer's summaries to ``out``: :func:`add_params` and :func:`add_gradients`."""
    add_params(out, layer, log)
    add_gradients(out, layer, grads)


# ----------------------------------------------------------------------------- writing
def _param_row(index: Sequence[int], s: ParamStats) -> list[float]:
    m = s.sums
    return [
        *index,
        s.nonfinite,
        s.prior_mu,
        s.prior_sigma,
        m.mu.mean,
        m.mu.m2,
        m.sigma.mean,
        m.sigma.m2,
        m.pairwise_kl,
        m.sum_log_sigma,
        m.sum_variance,
        *s.mu_percentiles.tolist(),
        *s.sigma_percentiles.tolist(),
    ]


def _grad_row(index: Sequence[int], s: GradStats) -> list[float]:
    return [*index, *(float(getattr(s, name)) for name in GRAD_COLUMNS[4:])]


def write_summaries(f: h5py.File, summaries: EpochSummaries, layers: Sequence[str]) -> bool:
    """``/summary`` of ``summaries`` in ``f`` (``layers``: the root ``layers`` attribute);
    False, and nothing written, when the shapes would not fit an attribute."""
    at = {name: i for i, name in enumerate(layers)}
    keys = list(summaries.params)
    shapes = json.dumps([list(summaries.params[k].shape) for k in keys], separators=(",", ":"))
    if len(shapes) > MAX_SHAPES_BYTES:
        return False
    group = f.create_group("summary")
    group.attrs["version"] = SUMMARY_VERSION
    rows = [
        _param_row((at[k[0]], DISTS.index(k[1]), PARAMS.index(k[2])), summaries.params[k])
        for k in keys
    ]
    ds = group.create_dataset("params", data=np.array(rows, np.float64))
    ds.attrs["columns"] = json.dumps(PARAM_COLUMNS)
    ds.attrs["shapes"] = shapes
    if summaries.gradients:
        rows = [
            _grad_row(
                (at[layer], PARAMS.index(param), GRAD_PARAMS.index(gp), GRAD_STATS.index(stat)),
                s,
            )
            for (layer, param, gp, stat), s in summaries.gradients.items()
        ]
        ds = group.create_dataset("gradients", data=np.array(rows, np.float64))
        ds.attrs["columns"] = json.dumps(GRAD_COLUMNS)
    return True


# ----------------------------------------------------------------------------- reading
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _table(ds: Any, columns: tuple[str, ...], max_rows: int, where: str, fail: Fail) -> np.ndarray:
    """A summary table's values, after checking its metadata (nothing huge is read)."""
    if not isinstance(ds, h5py.Dataset) or ds.external or ds.is_virtual:
        raise fail(f"{where} is not a dataset stored in the file")
    shape = tuple(ds.shape)
    if ds.dtype != np.float64 or len(shape) != 2 or shape[1] != len(columns):
        raise fail(
            f"{where} must be float64 of shape (rows, {len(columns)}), got {ds.dtype} {shape}"
        )
    if shape[0] > max_rows:
        raise fail(f"{where} has {shape[0]} rows, more than the {max_rows} its layers allow")
    try:
        names = json.loads(_text(ds.attrs["columns"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise fail(f"{where} has no JSON columns attribute ({exc})") from exc
    if names != list(columns):
        raise fail(f"{where} has columns {names}, version {SUMMARY_VERSION} has {list(columns)}")
    out = np.empty(shape, np.float64)
    if out.size:
        ds.id.read(h5s.ALL, h5s.ALL, out)
    return out


def _indices(
    table: np.ndarray, sizes: Sequence[int], names: Sequence[str], where: str, fail: Fail
) -> np.ndarray:
    """The leading index columns as integers, each within its range, no row twice."""
    index = table[:, : len(sizes)]
    ok = np.isfinite(index).all() and (index == np.floor(index)).all()
    ok = ok and (index >= 0).all() and (index < np.asarray(sizes, np.float64)).all()
    if not ok:
        raise fail(f"{where}: the {'/'.join(names)} columns must be indices within range")
    out = index.astype(np.int64)
    if len({tuple(row) for row in out.tolist()}) != len(out):
        raise fail(f"{where} names a row twice")
    return out


def _shapes(ds: Any, rows: int, where: str, fail: Fail) -> list[tuple[int, ...]]:
    try:
        shapes = json.loads(_text(ds.attrs["shapes"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise fail(f"{where} has no JSON shapes attribute ({exc})") from exc
    if not isinstance(shapes, list) or len(shapes) != rows:
        raise fail(f"{where}: the shapes attribute must list one shape per row")
    out = []
    for shape in shapes:
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise fail(f"{where}: bad shape {shape!r}")
        out.append(tuple(shape))
    return out


def read_summaries(
    params: Any, gradients: Any, layers: Sequence[str], fail: Fail
) -> EpochSummaries:
    """Parse the ``/summary/params`` and ``/summary/gradients`` (or None) datasets of a
    version :data:`SUMMARY_VERSION` summary; ``fail(reason)`` (CORRUPT) when malformed."""
    table = _table(params, PARAM_COLUMNS, 4 * len(layers), "/summary/params", fail)
    index = _indices(table, (len(layers), 2, 2), PARAM_COLUMNS[:3], "/summary/params", fail)
    shapes = _shapes(params, len(table), "/summary/params", fail)
    out = EpochSummaries()
    for row, (i, d, p), shape in zip(table, index.tolist(), shapes, strict=True):
        v = row.tolist()
        nonfinite = int(v[3])
        n = math.prod(shape) - nonfinite
        if v[3] != nonfinite or n < 0:
            raise fail(f"/summary/params: bad nonfinite count {v[3]!r} for shape {shape}")
        sums = GaussianSums(Moments(n, v[6], v[7]), Moments(n, v[8], v[9]), v[10], v[11], v[12])
        out.params[(layers[i], DISTS[d], PARAMS[p])] = ParamStats(
            shape,
            nonfinite,
            v[4],
            v[5],
            sums,
            row[_P0 : _P0 + _NPCT].copy(),
            row[_P0 + _NPCT : _P0 + 2 * _NPCT].copy(),
        )
    if gradients is None:
        return out
    table = _table(gradients, GRAD_COLUMNS, 8 * len(layers), "/summary/gradients", fail)
    index = _indices(table, (len(layers), 2, 2, 2), GRAD_COLUMNS[:4], "/summary/gradients", fail)
    for row, (i, p, gp, st) in zip(table.tolist(), index.tolist(), strict=True):
        counts = row[4:9]
        if not all(math.isfinite(c) and c == int(c) and c >= 0 for c in counts):
            raise fail(f"/summary/gradients: counts must be integers >= 0, got {counts}")
        level, elements, bad, steps, zeros = (int(c) for c in counts)
        out.gradients[(layers[i], PARAMS[p], GRAD_PARAMS[gp], GRAD_STATS[st])] = GradStats(
            level != 0, elements, bad, steps, zeros, row[9], row[10], row[11]
        )
    return out


# ----------------------------------------------------------------------------- checking
def _same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def _close(a: float, b: float, scale: float) -> bool:
    """Equal, or within :data:`SUM_RTOL` of the larger of |a|, |b| and ``scale``."""
    if _same(a, b):
        return True
    bound = max(abs(a), abs(b), scale if math.isfinite(scale) else 0.0)
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= SUM_RTOL * bound


def _param_difference(got: ParamStats, want: ParamStats) -> tuple[str, Any, Any] | None:
    """The first field where a stored summary differs from the one of the arrays."""
    exact = (
        ("shape", got.shape, want.shape),
        ("nonfinite", got.nonfinite, want.nonfinite),
        ("prior_mu", got.prior_mu, want.prior_mu),
        ("prior_sigma", got.prior_sigma, want.prior_sigma),
    )
    for name, a, b in exact:
        if not _same(a, b):
            return name, a, b
    for stat, a_pct, b_pct in (
        ("mu", got.mu_percentiles, want.mu_percentiles),
        ("sigma", got.sigma_percentiles, want.sigma_percentiles),
    ):
        for q, a, b in zip(_PCT, a_pct.tolist(), b_pct.tolist(), strict=True):
            if not _same(a, b):
                return f"{stat}_p{q}", a, b
    n = want.sums.n
    mu_lo, mu_hi = want.mu_percentiles[0], want.mu_percentiles[-1]
    s_lo, s_hi = want.sigma_percentiles[0], want.sigma_percentiles[-1]
    log_sigma = max(abs(math.log(s_lo)), abs(math.log(s_hi))) if n else 0.0
    g, w = got.sums, want.sums
    close = (  # each with the size of what it sums, so that values near 0 compare sensibly
        ("mu_mean", g.mu.mean, w.mu.mean, max(abs(mu_lo), abs(mu_hi))),
        ("mu_m2", g.mu.m2, w.mu.m2, n * (mu_hi - mu_lo) ** 2),
        ("sigma_mean", g.sigma.mean, w.sigma.mean, s_hi),
        ("sigma_m2", g.sigma.m2, w.sigma.m2, n * (s_hi - s_lo) ** 2),
        ("pairwise_kl", g.pairwise_kl, w.pairwise_kl, 0.0),
        ("sum_log_sigma", g.sum_log_sigma, w.sum_log_sigma, n * log_sigma),
        ("sum_variance", g.sum_variance, w.sum_variance, 0.0),
    )
    for name, a, b, scale in close:
        if not _close(a, b, float(scale)):
            return name, a, b
    return None


def _grad_difference(got: GradStats, want: GradStats) -> tuple[str, Any, Any] | None:
    for name in GRAD_COLUMNS[4:]:
        a, b = getattr(got, name), getattr(want, name)
        if not _same(a, b):
            return name, a, b
    return None


def _first(
    kind: str,
    got_all: Mapping[Any, Any],
    want_all: Mapping[Any, Any],
    compare: Callable[[Any, Any], tuple[str, Any, Any] | None],
) -> tuple[str, str] | None:
    for key in want_all.keys() - got_all.keys():
        return f"{kind}/{'/'.join(key)}", "missing, though the file has its arrays"
    for key in got_all.keys() - want_all.keys():
        return f"{kind}/{'/'.join(key)}", "present, though the file lacks its arrays"
    for key, got in got_all.items():
        found = compare(got, want_all[key])
        if found is not None:
            name, a, b = found
            return f"{kind}/{'/'.join(key)}", f"{name} is {a!r}, its arrays give {b!r}"
    return None


def difference(stored: EpochSummaries, computed: EpochSummaries) -> tuple[str, str] | None:
    """``(summary, what differs)`` for the first summary of ``stored`` that is not the one
    ``computed`` from the arrays (or that only one of them has), else None. Counts, shapes,
    priors, percentiles and gradient statistics must be identical, the float sums equal
    within :data:`SUM_RTOL` of their size (another numpy may round a log differently)."""
    return _first("params", stored.params, computed.params, _param_difference) or _first(
        "gradients", stored.gradients, computed.gradients, _grad_difference
    )
