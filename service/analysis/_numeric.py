"""Numerical kernels shared by the analysis modules (numpy only, no I/O).

Everything here is linear time in the number of elements. The kernels of the per-epoch
summaries -- exact percentiles through a histogram refinement, centred moments pooled
with Chan's formula, the sums of a set of Gaussians -- live in
:mod:`trainer.store.numeric` (the epoch writer stores those summaries) and are
re-exported here; this module adds a robust z-score, top-k through ``np.argpartition``,
threshold comparisons that cannot overflow and the KL kernels built on the sums.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trainer.store.numeric import (
    TB_PERCENTILES,
    GaussianSums,
    Moments,
    finite_max,
    gaussian_summary,
    gaussian_sums,
    order_statistics,
    percentiles,
    scalar,
    valid_mask,
    valid_values,
)

__all__ = [
    "TB_PERCENTILES",
    "GaussianSums",
    "Moments",
    "finite_max",
    "gaussian_summary",
    "gaussian_sums",
    "greater_than",
    "kl_normal_elementwise",
    "less_than",
    "order_statistics",
    "pairwise_symmetric_kl",
    "pairwise_symmetric_kl_reference",
    "percentiles",
    "pow10",
    "robust_log_scale",
    "robust_z",
    "scalar",
    "top_k",
    "valid_mask",
    "valid_values",
]


def robust_z(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Modified z-score 0.6745 (x - median) / MAD of finite ``x`` (Iglewicz and Hoaglin).

    When the MAD is 0 the mean absolute deviation (times 1.2533) is used; when that is 0
    too, every z is 0. Non-finite entries of ``x`` keep their sign as +-inf (NaN -> +inf).
    Returns ``(z (float64, x's shape), median, scale)``.
    """
    flat = np.asarray(x).ravel()
    finite = np.isfinite(flat)
    med, scale = _location_scale(flat[finite])
    z = np.zeros(flat.shape, np.float64)
    if scale > 0:
        z = (flat.astype(np.float64) - med) / scale
    bad = ~finite
    z[bad] = np.where(np.isnan(flat[bad]), np.inf, np.sign(flat[bad]) * np.inf)
    return z.reshape(np.shape(x)), med, scale


def _location_scale(vals: np.ndarray) -> tuple[float, float]:
    """Median and robust scale (MAD / 0.6745, else 1.2533 x mean absolute deviation)."""
    if vals.size == 0:
        return float("nan"), float("nan")
    med = float(percentiles(vals, (50.0,))[0])
    dev = np.abs(vals - vals.dtype.type(med))
    mad = float(percentiles(dev, (50.0,))[0])
    if mad > 0:
        return med, mad / 0.6745
    return med, float(dev.mean(dtype=np.float64)) * 1.253314


def robust_log_scale(g: np.ndarray) -> tuple[float, float, int]:
    """Median and robust scale of log10 g over the finite g > 0, and how many there are."""
    pos = g[np.isfinite(g) & (g > 0)]
    med, scale = _location_scale(np.log10(pos))
    return med, scale, int(pos.size)


def pow10(x: float) -> float:
    """10**x as a float that saturates instead of raising ``OverflowError``: +inf above the
    float range, 0.0 below it (NaN stays NaN). Thresholds are added up in log10 space and
    only the scalar result goes through here."""
    try:
        return float(10.0**x)
    except OverflowError:
        return math.inf


def _in_dtype(x: np.ndarray, threshold: float) -> tuple[np.ndarray, Any]:
    """``x`` as an array and ``threshold`` rounded to its float type (no overflowing cast:
    beyond the finite range the threshold becomes +-inf)."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    limit = float(np.finfo(arr.dtype).max)
    t = float(threshold)
    if math.isfinite(t) and abs(t) > limit:
        t = math.copysign(math.inf, t)
    return arr, arr.dtype.type(t)


def greater_than(x: np.ndarray, threshold: float) -> np.ndarray:
    """Exactly ``x > threshold`` elementwise, compared in ``x``'s float type (no float64
    copy of ``x``, and no overflow warning for a threshold beyond that type's range)."""
    arr, t = _in_dtype(x, threshold)
    t_f = float(t)
    if math.isinf(t_f) and not math.isinf(float(threshold)):  # beyond the type's range
        return np.isposinf(arr) if t_f > 0 else ~np.isneginf(arr) & ~np.isnan(arr)
    # rounded up: values equal to the rounded threshold are above the exact one
    return np.asarray(arr >= t) if t_f > threshold else np.asarray(arr > t)


def less_than(x: np.ndarray, threshold: float) -> np.ndarray:
    """Exactly ``x < threshold`` elementwise, compared in ``x``'s float type (as
    :func:`greater_than`)."""
    arr, t = _in_dtype(x, threshold)
    t_f = float(t)
    if math.isinf(t_f) and not math.isinf(float(threshold)):
        return np.isneginf(arr) if t_f < 0 else ~np.isposinf(arr) & ~np.isnan(arr)
    return np.asarray(arr <= t) if t_f < threshold else np.asarray(arr < t)


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest scores, largest first (ties: lower index first).

    ``np.argpartition`` selects in linear time; only the k chosen are sorted. NaN scores
    rank last.
    """
    flat = np.asarray(score, np.float64).ravel()
    flat = np.where(np.isnan(flat), -np.inf, flat)
    k = min(int(k), flat.size)
    if k <= 0:
        return np.zeros(0, np.intp)
    cand = np.argpartition(-flat, k - 1)[:k] if k < flat.size else np.arange(flat.size)
    order = np.lexsort((cand, -flat[cand]))
    return cand[order]


# ----------------------------------------------------------------------------- KL kernels
def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64).ravel()


def pairwise_symmetric_kl(mu: np.ndarray, sigma: np.ndarray) -> float:
    """Sum over all unordered pairs i < j of KL(q_i||q_j) + KL(q_j||q_i), exactly, in O(n).

    float64; ``mu`` and ``sigma`` finite with sigma > 0. 0.0 for fewer than two elements.
    See :func:`gaussian_sums` for the reduction.
    """
    return gaussian_sums(mu, sigma).pairwise_kl


def pairwise_symmetric_kl_reference(mu: np.ndarray, sigma: np.ndarray) -> float:
    """The same sum by brute force over the n(n-1)/2 pairs (O(n^2) time, O(n) memory)."""
    m, s = _f64(mu), _f64(sigma)
    v = s * s
    total = 0.0
    for i in range(m.size - 1):
        vj, mj = v[i + 1 :], m[i + 1 :]
        dv, dm = v[i] - vj, m[i] - mj
        total += float(np.sum(0.5 * (dv * dv / (v[i] * vj) + dm * dm * (1.0 / v[i] + 1.0 / vj))))
    return total


def kl_normal_elementwise(
    mu_q: np.ndarray, sigma_q: np.ndarray, mu_p: np.ndarray, sigma_p: np.ndarray
) -> np.ndarray:
    """Elementwise KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) in float64 (broadcasting)."""
    mq, sq = np.asarray(mu_q, np.float64), np.asarray(sigma_q, np.float64)
    mp, sp = np.asarray(mu_p, np.float64), np.asarray(sigma_p, np.float64)
    return np.asarray(np.log(sp / sq) + (sq * sq + (mq - mp) ** 2) / (2.0 * sp * sp) - 0.5)
