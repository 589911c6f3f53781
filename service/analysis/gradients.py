"""Gradient diagnostics from the captured gradient statistics.

The trainer records per epoch, for each posterior parameter (``mu`` and ``rho``) of each
layer, the mean and max of |g| over the epoch's steps and the count of non-finite steps
(per element at ``grad_level="element"``, per tensor at ``"layer"``), plus each layer's
gradient L2 norm per step (see :mod:`trainer.snapshot`).

Robust z = (x - median) / max(MAD / 0.6745, :data:`MIN_LOG_SCALE`) of x = log10 |g| within
the layer. *Exploding*: non-finite at some step, |g| > ``explode_abs``, or z above the
exploding threshold; *vanishing*: |g| exactly 0, |g| < ``vanish_abs``, or z below minus the
vanishing threshold. Defaults (``z_threshold=None``), calibrated on healthy runs
(``benchmarks/gradient_false_alarms.py``, ``docs/gradients.md``): exploding
``max(Z_EXPLODING, Phi^-1(1 - 0.005/n))`` in layers of at least :data:`MIN_Z_ELEMENTS`
finite |g| > 0, none in smaller ones; vanishing by exact zeros only, since a healthy ReLU
network's left tail holds weights that only the KL pulls (|g| down to 1e-41, z to -45).
An explicit ``z_threshold`` applies to both sides in layers of any size. At
``grad_level="layer"`` only the absolute thresholds and non-finite counts apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from trainer.errors import BnnError
from trainer.store.summaries import EpochSummaries, GradStats, grad_stats

from ._cache import cached, store
from ._numeric import finite_max, greater_than, less_than, pow10, robust_log_scale
from ._scratch import Scratch
from ._views import Alloc
from .source import EpochView, RunLike, RunSource, open_source, parse_enum
from .summary import PARAMS, frame_from_rows, prefetch, select_layers

__all__ = [
    "MIN_LOG_SCALE",
    "MIN_Z_ELEMENTS",
    "Z_EXPLODING",
    "GradKind",
    "GradStat",
    "GradThresholds",
    "grad_tree",
    "gradient_diagnostics",
    "iter_grad_summaries",
    "layer_scores",
]


#: Calibrated defaults (see the module docstring and ``docs/gradients.md``).
Z_EXPLODING = 6.0  # floor of the default exploding threshold (robust z)
MIN_Z_ELEMENTS = 100  # fewer finite |g| > 0 in a layer: no default z-score flags
MIN_LOG_SCALE = 0.5  # decades: floor of the robust scale of log10 |g|


class GradKind(StrEnum):
    EXPLODING = "exploding"
    VANISHING = "vanishing"


class GradStat(StrEnum):
    """Which per-element statistic of |g| over the epoch's steps is examined."""

    MEAN_ABS = "mean_abs"
    MAX_ABS = "max_abs"


@dataclass(frozen=True)
class GradThresholds:
    """What is examined and when it is flagged (see the module docstring)."""

    param: str = "weight"
    grad_param: str = "mu"
    stat: str = "mean_abs"
    z_threshold: float | None = None  # None: the calibrated defaults (module docstring)
    explode_abs: float | None = 1e2
    vanish_abs: float | None = None

    def __post_init__(self) -> None:
        if self.param not in PARAMS:
            raise BnnError.invalid(f"param must be one of {list(PARAMS)}, got {self.param!r}")
        if self.grad_param not in ("mu", "rho"):
            raise BnnError.invalid(
                f"grad_param must be one of ['mu', 'rho'], got {self.grad_param!r}"
            )
        parse_enum(GradStat, self.stat, "stat")
        if self.z_threshold is not None and not self.z_threshold > 0:
            raise BnnError.invalid(
                f"z_threshold must be > 0 (inf: no z-score flags), got {self.z_threshold!r}",
                z_threshold=str(self.z_threshold),
            )
        for name in ("explode_abs", "vanish_abs"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise BnnError.invalid(
                    f"{name} must be >= 0 or None, got {value!r}", **{name: str(value)}
                )

    def z_for(self, n: int) -> tuple[float, float]:
        """(exploding, vanishing) z thresholds for a layer of ``n`` finite |g| > 0."""
        if self.z_threshold is not None:
            return float(self.z_threshold), float(self.z_threshold)
        if n < MIN_Z_ELEMENTS:
            return math.inf, math.inf
        return max(Z_EXPLODING, NormalDist().inv_cdf(1.0 - 0.005 / n)), math.inf


@dataclass(frozen=True)
class LayerScores:
    """One layer's gradient statistic with its robust location and scale (flat arrays).

    z = (log10 |g| - median) / scale is computed only where asked (:meth:`z`); flags
    compare |g| with 10^(median +- threshold * scale) instead, which is the same test. The
    bound is summed in log10 space and saturates (+inf / 0) where 10^bound leaves the float
    range, so any threshold up to +inf gives finite work and no ``OverflowError``.
    """

    g: np.ndarray  # |g| statistic, float32
    nonfinite: np.ndarray  # bool: non-finite at some step, or a non-finite stored value
    z_threshold: float  # exploding (inf: no z-score flags)
    median: float  # of log10 |g| over finite |g| > 0 (NaN at layer level)
    scale: float  # robust scale of log10 |g|, at least MIN_LOG_SCALE (NaN: no z-score)
    z_vanishing: float = math.inf  # vanishing threshold (inf: no z-score flags)
    # bool: |g| exactly 0 at every step of the epoch (from the max |g|, which takes every
    # step even where the mean samples them, and which no division rounds to 0); None: g == 0
    zero: np.ndarray | None = None

    @property
    def _z_ok(self) -> bool:
        return bool(np.isfinite(self.median) and self.scale > 0)

    def z(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Robust z of the elements ``idx`` (all when None): +inf non-finite, -inf for an
        element whose |g| was 0 at every step; a zero statistic whose max says otherwise (a
        sampled mean) takes the z of the smallest float32, 1.4e-45, after those."""
        g = self.g if idx is None else self.g[idx]
        nf = self.nonfinite if idx is None else self.nonfinite[idx]
        zero = (g == 0) if self.zero is None else self.zero if idx is None else self.zero[idx]
        tiny = float(np.finfo(np.float32).smallest_subnormal)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (np.log10(np.where(g == 0, tiny, g.astype(np.float64))) - self.median) / self.scale
        z = np.where(zero, -np.inf, z if self._z_ok else 0.0)
        return np.where(nf, np.inf, z)

    def _zero(self) -> np.ndarray:
        """Whether each element's |g| was 0 at every step (see ``zero``)."""
        return (self.g == 0) if self.zero is None else self.zero

    def log_bound(self, kind: GradKind) -> float:
        """log10 of the |g| beyond which the z-score flags ``kind``: median +- z * scale
        (+-inf for an infinite threshold; NaN when there is no z-score)."""
        if not self._z_ok:
            return float("nan")
        if kind is GradKind.EXPLODING:
            return self.median + self.z_threshold * self.scale
        return self.median - self.z_vanishing * self.scale

    def exploding(self, th: GradThresholds) -> np.ndarray:
        hit = self.nonfinite.copy()
        if self._z_ok:
            hit |= greater_than(self.g, pow10(self.log_bound(GradKind.EXPLODING)))
        if th.explode_abs is not None:
            hit |= greater_than(self.g, th.explode_abs)
        return hit

    def vanishing(self, th: GradThresholds) -> np.ndarray:
        hit = self._zero().copy()
        if self._z_ok:
            hit |= less_than(self.g, pow10(self.log_bound(GradKind.VANISHING)))
        if th.vanish_abs is not None:
            hit |= less_than(self.g, th.vanish_abs)
        return hit & ~self.nonfinite

    def score(self, kind: GradKind) -> np.ndarray:
        """Larger is more suspicious; within a layer it orders like z (non-finite first for
        exploding, zeros first for vanishing)."""
        g = self.g.astype(np.float64)
        if kind is GradKind.EXPLODING:
            return np.where(self.nonfinite, np.inf, g)
        return np.where(self.nonfinite, -np.inf, np.where(self._zero(), np.inf, -g))


def stat_arrays(
    tree: dict[str, Any], th: GradThresholds, where: str
) -> tuple[np.ndarray, np.ndarray]:
    try:
        stats = tree[th.param][th.grad_param]
        return np.asarray(stats[th.stat]), np.asarray(stats["nonfinite"])
    except KeyError as exc:
        raise BnnError.not_found(
            f"{where}: no gradient statistics for {th.param}/{th.grad_param} (missing {exc})"
        ) from None


def layer_scores(tree: dict[str, Any], th: GradThresholds, where: str = "layer") -> LayerScores:
    """Score one layer's elements (0-d layer-level statistics get no z-score)."""
    g_arr, nf_arr = stat_arrays(tree, th, where)
    g = np.abs(g_arr.astype(np.float32, copy=False).ravel())
    nonfinite = np.greater(nf_arr, 0).ravel() | ~np.isfinite(g)
    zero = None
    if th.stat != "max_abs":  # exactly 0 at every step: the max says it (mean: sampled?)
        peak = tree[th.param][th.grad_param].get("max_abs")
        if peak is not None and np.shape(peak) == g_arr.shape:
            zero = np.asarray(peak).ravel() == 0
    if g_arr.ndim == 0:
        return LayerScores(g, nonfinite, np.inf, float("nan"), float("nan"), zero=zero)
    med, scale, n_pos = robust_log_scale(g)
    if math.isfinite(scale):
        scale = max(scale, MIN_LOG_SCALE)
    z_explode, z_vanish = th.z_for(n_pos)
    return LayerScores(g, nonfinite, z_explode, med, scale, z_vanish, zero=zero)


def grad_tree(
    view: EpochView,
    layer: str,
    th: GradThresholds,
    alloc: Alloc | None = None,
    *,
    peak: bool = True,
) -> dict[str, Any] | None:
    """What the diagnostics of ``th`` read of a layer's gradient statistics, in the snapshot
    layout: the examined statistic, ``max_abs`` (not with ``peak=False``, unless it is the
    examined one), ``nonfinite`` and ``step_norm`` (3-4 of its up to 17 arrays). None when
    the examined statistic was not captured. ``alloc`` holds the statistics (not the step
    norms, which summaries keep)."""
    stats: dict[str, np.ndarray] = {}
    wanted = (th.stat, "max_abs", "nonfinite") if peak else (th.stat, "nonfinite")
    for key in dict.fromkeys(wanted):
        arr = view.gradient_array(layer, th.param, th.grad_param, key, alloc=alloc)
        if arr is not None:
            stats[key] = arr
    if th.stat not in stats:
        return None
    tree: dict[str, Any] = {th.param: {th.grad_param: stats}}
    norms = view.gradient_array(layer, "step_norm")
    if norms is not None:
        tree["step_norm"] = norms
    return tree


@dataclass(frozen=True)
class GradSummary:
    """One layer's gradient statistic at one epoch; the flag counts only when asked for."""

    level: str
    elements: int
    nonfinite_elements: int
    nonfinite_steps: int
    zeros: int
    median_abs: float  # of the examined statistic (finite elements)
    max_stat: float  # max of the examined statistic
    max_abs: float  # max of the ``max_abs`` statistic: the largest single-step |g|
    step_norm: np.ndarray
    exploding: int = -1
    vanishing: int = -1
    z_threshold: float = float("nan")  # exploding
    z_vanishing: float = float("nan")
    has_peak: bool = True  # False: ``max_abs`` was not read (NaN), see ``grad_summary``


def _summary(s: GradStats, peak: float, norms: Any, has_peak: bool) -> GradSummary:
    return GradSummary(
        "element" if s.element_level else "layer",
        s.elements,
        s.nonfinite_elements,
        s.nonfinite_steps,
        s.zeros,
        s.median,
        s.max,
        peak,
        np.asarray(norms, np.float64).ravel(),
        has_peak=has_peak,
    )


def _basic(tree: dict[str, Any], th: GradThresholds, where: str, peak: bool) -> GradSummary:
    s = grad_stats(*stat_arrays(tree, th, where))
    stats = tree[th.param][th.grad_param]
    peak_abs = float("nan")
    if peak:  # the largest single-step |g|: the finite max of max_abs (of the stat without)
        has_max = "max_abs" in stats and th.stat != "max_abs"
        peak_abs = (
            finite_max(np.asarray(stats["max_abs"], np.float32).ravel()) if has_max else s.peak
        )
    return _summary(s, peak_abs, tree.get("step_norm", np.zeros(0)), peak)


def _stored_basic(
    view: EpochView, layer: str, th: GradThresholds, stored: EpochSummaries
) -> GradSummary | None:
    """:func:`_basic` from the summaries stored with the epoch (the step norms are read);
    None when they have none of the examined statistic (then the arrays decide)."""
    key = (layer, th.param, th.grad_param)
    s = stored.gradients.get((*key, th.stat))
    if s is None:
        return None
    peak = stored.gradients.get((*key, "max_abs"), s).peak
    norms = view.gradient_array(layer, "step_norm")
    return _summary(s, peak, np.zeros(0) if norms is None else norms, True)


def grad_summary(
    src: RunSource,
    view: EpochView,
    layer: str,
    th: GradThresholds,
    *,
    flags: bool = True,
    peak: bool = True,
) -> GradSummary | None:
    """Cached :class:`GradSummary` of one layer at one epoch; None without statistics.

    An epoch file that keeps summaries (:mod:`trainer.store.summaries`) gives it, peak
    included, without reading any statistic (only the step norms); otherwise it is
    computed from the arrays. ``flags=False`` skips the robust scale (exploding/vanishing
    counts stay -1; the flags always need the arrays); ``peak=False`` does not read
    ``max_abs`` (``max_abs`` NaN, ``has_peak`` False) unless the cached or stored summary
    has it. A summary cached without it gets it when asked for later.
    """
    with Scratch() as scratch:  # the statistics read are not kept, only what is computed
        return _grad_summary(src, view, layer, th, flags, scratch, peak)


def _grad_summary(
    src: RunSource,
    view: EpochView,
    layer: str,
    th: GradThresholds,
    flags: bool,
    sc: Scratch,
    peak: bool = True,
) -> GradSummary | None:
    base = src.cache_key(view.epoch)
    where = f"epoch {view.epoch} layer {layer!r}"
    read: list[dict[str, Any] | None] = []

    def tree(with_peak: bool) -> dict[str, Any] | None:
        """The arrays, read once (``max_abs`` only for a summary computed from them)."""
        if not read:
            read.append(grad_tree(view, layer, th, sc.alloc, peak=with_peak))
        return read[0]

    def basic() -> GradSummary | None:
        stored = view.stored()
        found = None if stored is None else _stored_basic(view, layer, th, stored)
        if found is not None:
            return found
        t = tree(peak)
        return None if t is None else _basic(t, th, where, peak)

    key = None if base is None else ("grad", base, layer, th.param, th.grad_param, th.stat)
    summary = cached(key, basic)
    if summary is not None and peak and not summary.has_peak:  # cached by a peak=False call
        arr = view.gradient_array(layer, th.param, th.grad_param, "max_abs", alloc=sc.alloc)
        if arr is None:  # no max_abs: the examined statistic stands in, as in _basic
            arr = view.gradient_array(layer, th.param, th.grad_param, th.stat, alloc=sc.alloc)
        assert arr is not None  # the summary exists: its statistic was read before
        peak_abs = finite_max(np.asarray(arr, np.float32).ravel())
        summary = replace(summary, max_abs=peak_abs, has_peak=True)
        store(key, summary)
    if summary is None or not flags:
        return summary

    def flag_counts() -> tuple[int, int, float, float]:
        t = tree(False)  # the flags read the examined statistic and the counts
        assert t is not None
        stats = t[th.param][th.grad_param]
        if "max_abs" not in stats and th.stat != "max_abs" and np.any(stats[th.stat] == 0):
            # whether a zero was 0 at every step is the max's to say (a sampled mean's
            # zero may not be; element_every), read only for a layer with zeros
            peak = view.gradient_array(layer, th.param, th.grad_param, "max_abs")
            if peak is not None:
                t = {**t, th.param: {th.grad_param: {**stats, "max_abs": peak}}}
        sc = layer_scores(t, th, where)
        explode, vanish = sc.exploding(th), sc.vanishing(th)
        e, v = int(np.count_nonzero(explode)), int(np.count_nonzero(vanish))
        return e, v, sc.z_threshold, sc.z_vanishing

    e, v, z, zv = cached(None if base is None else ("gradflags", base, layer, th), flag_counts)
    return replace(summary, exploding=e, vanishing=v, z_threshold=z, z_vanishing=zv)


def _mean_step_norm(
    src: RunSource, view: EpochView, layer: str, known: GradSummary | None
) -> float:
    base = src.cache_key(view.epoch)

    def compute() -> float:
        if known is not None:
            norms = known.step_norm
        else:
            found = view.gradient_array(layer, "step_norm")
            norms = np.zeros(0) if found is None else np.asarray(found, np.float64).ravel()
        return float(norms.mean()) if norms.size else float("nan")

    return cached(None if base is None else ("stepnorm", base, layer), compute)


def _norm_ratios(
    src: RunSource, view: EpochView, known: dict[str, GradSummary]
) -> dict[str, float]:
    """Per layer in ``known``: its mean step norm over the last (output) layer's mean step
    norm (NaN when either is missing; the last layer's step norms are read if not known)."""
    if not known:
        return {}
    last = view.layers[-1]
    ref = np.float64(_mean_step_norm(src, view, last, known.get(last)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            name: float(np.float64(_mean_step_norm(src, view, name, s)) / ref)
            for name, s in known.items()
        }


def iter_grad_summaries(
    src: RunSource,
    epochs: Sequence[int],
    layers: str | Sequence[str] | None,
    th: GradThresholds,
    *,
    flags: bool = True,
    peak: bool = True,
) -> Iterator[tuple[int, str, GradSummary, float]]:
    """``(epoch, layer, summary, step norm ratio)`` for layers with statistics; the ratio
    is the layer's mean step norm over the last layer's (see :func:`gradient_diagnostics`).
    ``flags`` and ``peak``: see :func:`grad_summary`.

    Stored runs are summarised in a thread pool first (one epoch per thread at a time).
    """

    def summaries(view: EpochView) -> tuple[dict[str, GradSummary], dict[str, float]]:
        found: dict[str, GradSummary] = {}
        for name in select_layers(view, layers):
            s = grad_summary(src, view, name, th, flags=flags, peak=peak)
            if s is not None:
                found[name] = s
        return found, _norm_ratios(src, view, found)

    prefetch(src, epochs, summaries)
    for epoch in epochs:
        with src.open(epoch) as view:
            found, ratios = summaries(view)
            for layer, s in found.items():
                yield epoch, layer, s, ratios[layer]


def gradient_diagnostics(
    run: RunLike,
    epochs: Sequence[int] | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    param: str = "weight",
    grad_param: str = "mu",
    stat: str = "mean_abs",
    z_threshold: float | None = None,
    explode_abs: float | None = 1e2,
    vanish_abs: float | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """Exploding/vanishing flags, non-finite counts and step norms per (epoch, layer).

    Columns: ``level``, ``elements``, ``non-finite elements`` (non-finite at some step),
    ``non-finite steps``, ``zero`` (elements whose examined ``stat`` is 0; ``vanishing``
    counts those 0 at every step, by the max), ``median |g|`` and ``max |g|`` (of ``stat``),
    ``peak |g|`` (largest single-step |g|, from ``max_abs``),
    ``exploding``/``vanishing`` (element counts), ``exploding flag``/``vanishing flag``,
    ``z threshold`` (exploding) and ``vanishing z threshold`` (inf: no z-score flags; the
    defaults are in the module docstring), ``steps``, ``step norm mean``/``max``/``non-finite`` and
    ``step norm / last layer`` (this layer's mean step norm over the last layer's: 1 in
    the last layer; far below 1 in the first layers when gradients shrink on their way back
    to the input, far above when they grow).
    Epochs without gradient statistics are skipped; NOT_FOUND when none has any.
    """
    th = GradThresholds(param, grad_param, stat, z_threshold, explode_abs, vanish_abs)
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        eps = src.resolve_epochs(epochs)
        for epoch, layer, s, ratio in iter_grad_summaries(src, eps, layers, th):
            finite = s.step_norm[np.isfinite(s.step_norm)]
            rows[(epoch, layer)] = {
                "level": s.level,
                "elements": s.elements,
                "non-finite elements": s.nonfinite_elements,
                "non-finite steps": s.nonfinite_steps,
                "zero": s.zeros,
                "median |g|": s.median_abs,
                "max |g|": s.max_stat,
                "peak |g|": s.max_abs,
                "exploding": s.exploding,
                "vanishing": s.vanishing,
                "exploding flag": s.exploding > 0,
                "vanishing flag": s.vanishing > 0,
                "z threshold": s.z_threshold,
                "vanishing z threshold": s.z_vanishing,
                "steps": int(s.step_norm.size),
                "step norm mean": float(finite.mean()) if finite.size else float("nan"),
                "step norm max": float(finite.max()) if finite.size else float("nan"),
                "step norm non-finite": int(s.step_norm.size - finite.size),
                "step norm / last layer": ratio,
            }
        if not rows:
            raise BnnError.not_found(
                f"run {src.name!r} has no gradient statistics for {param}/{grad_param} in epochs "
                f"{src.resolve_epochs(epochs)} (captured with grad_level 'none'?)"
            )
    return frame_from_rows(rows, ["epoch", "layer"])
