"""Confidence intervals for comparing model variants ("arms") trained with the same seeds.

Every arm is trained with the same K seeds and evaluated on the same N test examples, so arms
are *paired* twice: by seed and by example. Two kinds of metric:

- per-example means (NLL, 0/1 error, Brier, interval coverage), given as (K, N) arrays: a
  two-level bootstrap resamples seeds, then examples within each drawn seed (percentile
  interval). Comparisons apply the same draws to both arms, i.e. bootstrap the (K, N)
  difference array, which cancels the seed and example effects the arms share.
- per-seed values (ECE, AUROC, ELBO), given as (K,) arrays: Student-t intervals over seeds,
  paired t for differences.

The two-level bootstrap is conservative when within-seed noise dominates (it is counted at
both levels) and, like any bootstrap over a handful of values, optimistic when between-seed
variance dominates and K is small (say K < 5). numpy, float64, reproducible with ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from trainer.errors import BnnError

__all__ = [
    "bootstrap_mean_ci",
    "comparison_table",
    "paired_difference_ci",
    "paired_seed_difference_ci",
    "seed_mean_ci",
    "t_quantile",
]

SeedLike = int | np.random.Generator
_CHUNK_VALUES = 1 << 21  # bootstrap draws per chunk: indices and counts peak near 70 MiB


# --- validation --------------------------------------------------------------------------------


def _check_level(level: float) -> float:
    if not (isinstance(level, int | float) and 0.0 < level < 1.0):
        raise BnnError.invalid(f"level must be strictly between 0 and 1, got {level!r}")
    return float(level)


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise BnnError.invalid(f"n_boot must be an integer >= 1, got {n_boot!r}")
    return int(n_boot)


def _as_matrix(values: np.ndarray, name: str) -> np.ndarray:
    """A non-empty (K seeds, N examples) float64 array."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BnnError.invalid(
            f"{name} must have shape (K seeds, N examples) with K, N >= 1, got {arr.shape}"
        )
    return arr


def _as_vector(values: np.ndarray, name: str) -> np.ndarray:
    """A non-empty (K seeds,) float64 array."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise BnnError.invalid(f"{name} must have shape (K seeds,) with K >= 1, got {arr.shape}")
    return arr


# --- Student t without scipy -------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes)."""
    tiny = 1e-300

    def step(num: float, c: float, d: float) -> tuple[float, float]:
        d = 1.0 + num * d
        c = 1.0 + num / c
        return (c if abs(c) > tiny else tiny), 1.0 / (d if abs(d) > tiny else tiny)

    c, d = step(-(a + b) * x / (a + 1.0), 1.0, 1.0)
    c = 1.0
    h = d
    for m in range(1, 10_000):
        c, d = step(m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m)), c, d)
        h *= c * d
        c, d = step(-(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0)), c, d)
        delta = c * d
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_sf(t: float, df: float) -> float:
    """P(T > t) for t >= 0 under Student t with ``df`` degrees of freedom."""
    return 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` > 0 degrees of freedom (no scipy): bisection on the
    exact CDF through the incomplete beta function, ~1e-12 relative."""
    p = _check_level(p)
    if not (math.isfinite(df) and df > 0):
        raise BnnError.invalid(f"df must be finite and > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    tail = min(p, 1.0 - p)
    lo, hi = 0.0, 1.0
    while _t_sf(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    t = 0.5 * (lo + hi)
    return t if p > 0.5 else -t


# --- bootstrap ---------------------------------------------------------------------------------


def _bootstrap_means(arrays: Sequence[np.ndarray], n_boot: int, seed: SeedLike) -> list[np.ndarray]:
    """Two-level bootstrap replicates (n_boot,) of the grand mean of each (K, N) array.

    Each replicate draws K seeds with replacement and, for each drawn seed, N examples with
    replacement; the same draws serve every array (they must share K and N). The draws become
    counts per (replicate, seed, example), so each array costs one matrix-vector product.
    Chunks of replicates keep memory near 70 MiB (one replicate per chunk once K * N > 2M,
    then ~28 bytes per value); the draws depend only on K, N and ``seed``.
    """
    rng = np.random.default_rng(seed)
    k, n = arrays[0].shape
    kn = k * n
    flats = [arr.reshape(-1) for arr in arrays]
    out = [np.empty(n_boot, dtype=np.float64) for _ in arrays]
    index_type = np.int32 if kn < 2**31 else np.int64
    chunk = max(1, _CHUNK_VALUES // kn)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        seeds = rng.integers(0, k, size=(b, k, 1), dtype=index_type)
        examples = rng.integers(0, n, size=(b, k, n), dtype=index_type)
        cell = np.arange(b, dtype=np.int64)[:, None, None] * kn + seeds.astype(np.int64) * n
        counts = np.bincount((cell + examples).reshape(-1), minlength=b * kn)
        weights = counts.reshape(b, kn).astype(np.float64)
        for flat, reps in zip(flats, out, strict=True):
            # einsum's own loop, not BLAS: threaded gemv stalls on a busy machine
            reps[start : start + b] = np.einsum("bi,i->b", weights, flat) / kn
    return out


def _percentile_ci(reps: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def bootstrap_mean_ci(
    per_example: np.ndarray, *, level: float = 0.95, n_boot: int = 2000, seed: SeedLike = 0
) -> tuple[float, float, float]:
    """(estimate, lo, hi) for the mean over seeds of per-seed means of ``per_example`` (K, N).

    Two-level percentile bootstrap: resample seeds, then examples within each drawn seed.
    """
    values = _as_matrix(per_example, "per_example")
    level, n_boot = _check_level(level), _check_n_boot(n_boot)
    lo, hi = _percentile_ci(_bootstrap_means([values], n_boot, seed)[0], level)
    return float(values.mean()), lo, hi


def paired_difference_ci(
    a: np.ndarray,
    b: np.ndarray,
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: SeedLike = 0,
) -> tuple[float, float, float, float]:
    """(mean(a) - mean(b), lo, hi, p_value) for two arms' (K, N) per-example values.

    The same resampled seeds and examples serve both arms. p-value: two-sided bootstrap,
    2 * min(P(d <= 0), P(d >= 0)) over the replicates, floored at 1 / n_boot, at most 1.
    The difference is significant at ``level`` when [lo, hi] excludes 0.
    """
    a_arr, b_arr = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a_arr.shape != b_arr.shape:
        raise BnnError.invalid(
            f"a and b must have the same shape, got {a_arr.shape} and {b_arr.shape}"
        )
    level, n_boot = _check_level(level), _check_n_boot(n_boot)
    diff = a_arr - b_arr
    return _difference_summary(diff, _bootstrap_means([diff], n_boot, seed)[0], level, n_boot)


def _difference_summary(
    diff: np.ndarray, reps: np.ndarray, level: float, n_boot: int
) -> tuple[float, float, float, float]:
    lo, hi = _percentile_ci(reps, level)
    p = 2.0 * min(float(np.mean(reps <= 0.0)), float(np.mean(reps >= 0.0)))
    return float(diff.mean()), lo, hi, min(1.0, max(p, 1.0 / n_boot))


# --- per-seed metrics: Student t ---------------------------------------------------------------


def seed_mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval over seeds for a (K,) per-seed metric.

    For metrics that are not per-example means (ECE, AUROC, ELBO). K = 1 gives (v, nan, nan).
    """
    v = _as_vector(values, "values")
    level = _check_level(level)
    mean = float(v.mean())
    k = v.shape[0]
    if k == 1:
        return mean, math.nan, math.nan
    half = t_quantile((1.0 + level) / 2.0, k - 1) * float(v.std(ddof=1)) / math.sqrt(k)
    return mean, mean - half, mean + half


def paired_seed_difference_ci(
    a: np.ndarray, b: np.ndarray, level: float = 0.95
) -> tuple[float, float, float, float]:
    """(mean(a - b), lo, hi, p_value) by the paired t test over seeds; a, b: (K,).

    K = 1 gives (d, nan, nan, nan). Zero spread: the interval is the point; p is 1 for a zero
    difference, else 0.
    """
    a_arr, b_arr = _as_vector(a, "a"), _as_vector(b, "b")
    if a_arr.shape != b_arr.shape:
        raise BnnError.invalid(
            f"a and b must have the same shape, got {a_arr.shape} and {b_arr.shape}"
        )
    d = a_arr - b_arr
    mean, lo, hi = seed_mean_ci(d, level)
    k = d.shape[0]
    if k == 1:
        return mean, lo, hi, math.nan
    se = float(d.std(ddof=1)) / math.sqrt(k)
    if se == 0.0:
        return mean, mean, mean, 1.0 if mean == 0.0 else 0.0
    p = min(1.0, 2.0 * _t_sf(abs(mean) / se, k - 1))
    return mean, lo, hi, p


# --- tables ------------------------------------------------------------------------------------


def _check_arms(
    arms: Mapping[str, Mapping[str, np.ndarray]],
    baseline: str,
    per_example: Sequence[str],
    per_seed: Sequence[str],
) -> dict[str, dict[str, np.ndarray]]:
    """Arrays as float64, every arm with every metric, one shared (K, N) / (K,)."""
    if baseline not in arms:
        raise BnnError.invalid(f"baseline {baseline!r} is not an arm; arms: {sorted(arms)}")
    both = set(per_example) & set(per_seed)
    if both:
        raise BnnError.invalid(f"metrics {sorted(both)} are listed as per_example and per_seed")
    shape_2d: tuple[int, ...] | None = None
    k_seeds: int | None = None
    checked: dict[str, dict[str, np.ndarray]] = {}
    for arm, metrics in arms.items():
        checked[arm] = {}
        for metric in [*per_example, *per_seed]:
            if metric not in metrics:
                raise BnnError.invalid(f"arm {arm!r} has no metric {metric!r}")
            where = f"arm {arm!r} metric {metric!r}"
            if metric in per_example:
                arr = _as_matrix(metrics[metric], where)
                shape_2d = arr.shape if shape_2d is None else shape_2d
                if arr.shape != shape_2d:
                    raise BnnError.invalid(f"{where} has shape {arr.shape}, other arms {shape_2d}")
            else:
                arr = _as_vector(metrics[metric], where)
            k_seeds = arr.shape[0] if k_seeds is None else k_seeds
            if arr.shape[0] != k_seeds:
                raise BnnError.invalid(
                    f"{where} has K={arr.shape[0]} seeds, other arms K={k_seeds}"
                )
            checked[arm][metric] = arr
    return checked


def comparison_table(
    arms: Mapping[str, Mapping[str, np.ndarray]],
    baseline: str,
    *,
    per_example: Sequence[str] = (),
    per_seed: Sequence[str] = (),
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, differences) for arms trained with the same seeds on the same test set.

    ``arms``: arm name -> metric name -> (K, N) array for ``per_example`` metrics, (K,) for
    ``per_seed`` ones. ``summary``: one row per arm (index "arm"), columns "<m>", "<m> lo",
    "<m> hi". ``differences``: one row per arm other than ``baseline`` (arm - baseline), columns
    "<m> diff", "<m> lo", "<m> hi", "<m> p", "<m> significant" (CI excludes 0). Every bootstrap
    uses ``seed``, so all arms and metrics share the same resampled seeds and examples, and the
    per-example intervals equal :func:`bootstrap_mean_ci` / :func:`paired_difference_ci`'s.
    """
    level, n_boot = _check_level(level), _check_n_boot(n_boot)
    data = _check_arms(arms, baseline, per_example, per_seed)
    others = [arm for arm in data if arm != baseline]
    # one set of bootstrap draws for every per-example array: each arm, each arm - baseline
    keys: list[tuple[str, str, bool]] = []  # (arm, metric, is a difference to the baseline)
    arrays: list[np.ndarray] = []
    for metric in per_example:
        for arm in data:
            keys.append((arm, metric, False))
            arrays.append(data[arm][metric])
        for arm in others:
            keys.append((arm, metric, True))
            arrays.append(data[arm][metric] - data[baseline][metric])
    reps = dict(zip(keys, _bootstrap_means(arrays, n_boot, seed), strict=True)) if arrays else {}

    summary: dict[str, dict[str, float]] = {}
    for arm in data:
        row: dict[str, float] = {}
        for metric in [*per_example, *per_seed]:
            values = data[arm][metric]
            if metric in per_example:
                est, (lo, hi) = (
                    float(values.mean()),
                    _percentile_ci(reps[arm, metric, False], level),
                )
            else:
                est, lo, hi = seed_mean_ci(values, level)
            row |= {metric: est, f"{metric} lo": lo, f"{metric} hi": hi}
        summary[arm] = row
    differences: dict[str, dict[str, float | bool]] = {}
    for arm in others:
        diff_row: dict[str, float | bool] = {}
        for metric in [*per_example, *per_seed]:
            if metric in per_example:
                diff = data[arm][metric] - data[baseline][metric]
                d, lo, hi, p = _difference_summary(diff, reps[arm, metric, True], level, n_boot)
            else:
                d, lo, hi, p = paired_seed_difference_ci(
                    data[arm][metric], data[baseline][metric], level
                )
            diff_row |= {
                f"{metric} diff": d,
                f"{metric} lo": lo,
                f"{metric} hi": hi,
                f"{metric} p": p,
                f"{metric} significant": bool(lo > 0.0 or hi < 0.0),
            }
        differences[arm] = diff_row

    summary_df = pd.DataFrame.from_dict(summary, orient="index")
    summary_df.index.name = "arm"
    diff_columns = [
        f"{m} {suffix}"
        for m in [*per_example, *per_seed]
        for suffix in ("diff", "lo", "hi", "p", "significant")
    ]
    diff_df = pd.DataFrame.from_dict(differences, orient="index").reindex(columns=diff_columns)
    diff_df.index.name = "arm"
    diff_df.attrs["baseline"] = baseline
    return summary_df, diff_df
