"""Numerical kernels of the per-epoch summaries (numpy only, no I/O).

The summaries an epoch file keeps (:mod:`trainer.store.summaries`) and the analysis
(:mod:`service.analysis`, which re-exports these) compute with these functions, so a
summary stored when an epoch is written equals the one computed from its arrays later.
Everything is linear time in the number of elements: exact percentiles through a
histogram refinement, centred moments pooled with Chan's formula, and the sufficient
sums of a set of Gaussians (:func:`gaussian_sums`: moments, the exact pairwise symmetric
KL, the KL to any prior). Large float32 arrays go to the C kernels of
:mod:`trainer.store._native` when they are built (one pass for the sums and both arrays'
histograms, one for the values of the wanted ranks: about three times faster), numpy
otherwise; the results are the same (the sums up to their last bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _native

__all__ = [
    "TB_PERCENTILES",
    "GaussianSums",
    "Moments",
    "finite_max",
    "gaussian_summary",
    "gaussian_sums",
    "interpolate",
    "order_statistics",
    "percentiles",
    "rank_pairs",
    "scalar",
    "valid_mask",
    "valid_values",
]

#: TensorBoard's distribution bands: the normal CDF at -inf, -1.5, -1, -0.5, 0, ... sigma.
TB_PERCENTILES = (0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0)

_HIST_BINS = 4096
_SMALL = 4096  # below this many values np.percentile is as fast
_CHUNK = 1 << 16  # float64 temporaries of 512 KiB stay in cache
_SAMPLE = 8192  # strided sample that brackets nearby order statistics


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred sum of squares (``m2``) of a set of finite values."""

    n: int
    mean: float
    m2: float

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        """Moments of ``x`` (already finite), two-pass in float64."""
        n = int(x.size)
        if n == 0:
            return cls(0, float("nan"), 0.0)
        x64 = np.asarray(x, np.float64).ravel()
        mean = float(x64.sum() / n)
        c = x64 - mean
        return cls(n, mean, float(np.einsum("i,i->", c, c)))

    def __add__(self, other: Moments) -> Moments:
        """Pool two sets (Chan et al.'s parallel formula)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * other.n / n
        m2 = self.m2 + other.m2 + delta * delta * self.n * other.n / n
        return Moments(n, mean, m2)

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0, as ``np.std``); NaN when empty."""
        return float(np.sqrt(self.m2 / self.n)) if self.n else float("nan")


def valid_mask(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray | None:
    """``None`` when every (mu, sigma) is finite with sigma > 0, else the boolean mask of those.

    Four SIMD reductions decide the common all-valid case (min/max propagate NaN), about
    seven times faster than building the mask.
    """
    m, s = np.asarray(mu), np.asarray(sigma)
    if (
        m.shape == s.shape
        and m.size
        and np.isfinite(m.min())
        and np.isfinite(m.max())
        and s.min() > 0
        and np.isfinite(s.max())
    ):
        return None
    ok = np.isfinite(m) & np.isfinite(s) & (s > 0)
    return None if bool(ok.all()) else ok


def valid_values(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, nonfinite)``: the elements with finite mu and sigma > 0 (the arrays
    themselves when all are, else flat copies of those) and how many were left out."""
    ok = valid_mask(mu, sigma)
    if ok is None:
        return mu, sigma, 0
    return mu[ok], sigma[ok], int(ok.size - np.count_nonzero(ok))


def scalar(arr: np.ndarray) -> float:
    """The first element of ``arr`` as a float (a shared prior's value); NaN when empty."""
    flat = np.asarray(arr).ravel()
    return float(flat[0]) if flat.size else float("nan")


def finite_max(x: np.ndarray) -> float:
    """Max of the finite values of ``x`` (NaN when none); one pass when all are finite."""
    if not x.size:
        return float("nan")
    top = x.max()
    if np.isfinite(top):  # max propagates NaN and +inf: none is there
        return float(top)
    finite = np.isfinite(x)
    return float(x.max(where=finite, initial=-np.inf)) if finite.any() else float("nan")


def rank_pairs(n: int, qs: tuple[float, ...] | np.ndarray) -> tuple[np.ndarray, ...]:
    """``(ranks, r0, r1, t)`` of numpy's linear interpolation of the percentiles ``qs`` of
    ``n`` values: the sorted unique ranks needed, each percentile's two ranks and weight."""
    q = np.asarray(qs, np.float64)
    pos = (n - 1) * (q / 100.0)
    r0 = np.floor(pos).astype(np.int64)
    r1 = np.minimum(r0 + 1, n - 1)
    return np.unique(np.concatenate([r0, r1])), r0, r1, pos - r0


def interpolate(
    values: np.ndarray, ranks: np.ndarray, r0: np.ndarray, r1: np.ndarray, t: np.ndarray
) -> np.ndarray:
    """The percentiles from the order statistics ``values`` (in the input's dtype) of
    ``ranks``, as numpy interpolates (the difference in the input's dtype), float64."""
    a, b = values[np.searchsorted(ranks, r0)], values[np.searchsorted(ranks, r1)]
    diff = b - a
    out = np.asarray(a + diff * t, np.float64)
    high = t >= 0.5
    out[high] = (b - diff * (1 - t))[high]
    return out


def percentiles(
    x: np.ndarray,
    qs: tuple[float, ...] | np.ndarray = TB_PERCENTILES,
    hist: np.ndarray | None = None,
) -> np.ndarray:
    """Exactly ``np.percentile(x, qs)`` (linear interpolation) of finite ``x``, in O(n).

    Float32 arrays go to the C kernels (``trainer.store._native``: a 65,536-bin histogram of
    the values' bits, then one pass for the values of the wanted bins; ``hist``, that
    histogram when the caller has it); otherwise, or without the kernels, a histogram of
    4096 bins locates the order statistics needed and only the values in those bins are
    looked at again (recursively, so heavy tails cost little). A million float32 values
    take about 1.5 ms in C and a few ms with numpy, instead of ~25 ms for ``np.percentile``.
    Returns float64 (len(qs),); NaNs when ``x`` is empty.
    """
    flat = np.asarray(x).ravel()
    n = flat.size
    if n == 0:
        return np.full(np.shape(qs), np.nan)
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64)
    ranks, r0, r1, t = rank_pairs(n, qs)
    found = _native.select(flat, ranks, hist)
    if found is None:
        found = order_statistics(flat, ranks)
    return interpolate(found.astype(flat.dtype), ranks, r0, r1, t)


def _bracketed(x: np.ndarray, ranks: np.ndarray) -> np.ndarray | None:
    """Order statistics of nearby ``ranks`` (e.g. a median) through a strided sample: its
    order statistics bracket the wanted ones, one pass counts the values below the bracket
    and keeps those inside, and only those are partitioned (about 3x faster than the
    histogram for a million values). None when the bracket misses a rank (then the caller
    uses the histogram): the result is exact either way."""
    n = x.size
    sample = np.sort(x[:: max(1, n // _SAMPLE)])
    m = sample.size
    q = ranks / (n - 1)
    margin = 3.0 * np.sqrt(m * q * (1 - q)) + 2.0  # ~3 standard deviations of a sample rank
    i_lo = int(np.floor(q[0] * (m - 1) - margin[0]))
    i_hi = int(np.ceil(q[-1] * (m - 1) + margin[-1]))
    if i_lo < 0 or i_hi >= m:
        return None
    lo, hi = sample[i_lo], sample[i_hi]
    below = int(np.count_nonzero(x < lo))
    inside = x[(x >= lo) & (x <= hi)]
    if below > ranks[0] or below + inside.size <= ranks[-1]:
        return None
    return np.partition(inside, ranks - below)[ranks - below].astype(np.float64)


def order_statistics(x: np.ndarray, ranks: np.ndarray, depth: int = 0) -> np.ndarray:
    """The values of rank ``ranks`` (sorted, unique, 0-based) of float ``x``, as float64."""
    n = x.size
    if n <= _SMALL or depth >= 4:
        return np.partition(x, ranks)[ranks].astype(np.float64)
    if depth == 0 and n >= 16 * _SAMPLE and ranks[-1] - ranks[0] <= n // 1024:
        found = _bracketed(x, ranks)
        if found is not None:
            return found
    lo, hi = x.min(), x.max()
    with np.errstate(over="ignore"):
        width = hi - lo
    if lo == hi:
        return np.full(ranks.size, float(lo))
    with np.errstate(over="ignore", divide="ignore"):
        scale64 = (_HIST_BINS - 1) / float(width)  # max -> bin 4095 (x - lo >= 0 exactly)
    if not (np.isfinite(width) and 0 < scale64 < float(np.finfo(x.dtype).max)):
        return np.partition(x, ranks)[ranks].astype(np.float64)
    scale = x.dtype.type(scale64)
    # The bin index is a monotone function of the value, so bins order the values exactly.
    # Chunks keep the temporaries in cache (no array of n bin indices).
    buf = np.empty(min(n, _CHUNK), x.dtype)

    def bin_index(i: int) -> tuple[np.ndarray, np.ndarray]:
        part = x[i : i + _CHUNK]
        t = buf[: part.size]
        np.subtract(part, lo, out=t)
        np.multiply(t, scale, out=t)
        return part, t.astype(np.intp)

    counts = np.zeros(_HIST_BINS, np.intp)
    for i in range(0, n, _CHUNK):
        counts += np.bincount(bin_index(i)[1], minlength=_HIST_BINS)
    cum = np.cumsum(counts)
    bins = np.searchsorted(cum, ranks, side="right")
    wanted = np.zeros(_HIST_BINS, bool)
    wanted[bins] = True
    parts = []
    for i in range(0, n, _CHUNK):  # the values of the wanted bins (in file order)
        part, idx = bin_index(i)
        parts.append(part[wanted[idx]])
    chosen = np.concatenate(parts)
    ubins = np.unique(bins)
    # Rank among ``chosen``: values of earlier chosen bins are all smaller.
    offset_in_chosen = np.concatenate([[0], np.cumsum(counts[ubins])[:-1]])
    before_bin = cum[ubins] - counts[ubins]
    where = np.searchsorted(ubins, bins)
    return order_statistics(
        chosen, offset_in_chosen[where] + (ranks - before_bin[where]), depth + 1
    )


@dataclass(frozen=True)
class GaussianSums:
    """Sufficient sums of a set of Gaussians N(mu_i, sigma_i^2), from two chunked passes.

    ``pairwise_kl`` is the exact sum over unordered pairs of the symmetric KL; ``kl_to``
    gives sum_i KL(q_i || N(mu_p, sigma_p^2)) for any prior in O(1).
    """

    mu: Moments
    sigma: Moments
    pairwise_kl: float
    sum_log_sigma: float
    sum_variance: float

    @property
    def n(self) -> int:
        return self.mu.n

    def kl_to(self, mu_p: float, sigma_p: float) -> float:
        """sum_i KL(N(mu_i, sigma_i^2) || N(mu_p, sigma_p^2)); NaN for a non-finite prior."""
        n = self.n
        if n == 0:
            return 0.0
        mp, sp = float(mu_p), float(sigma_p)
        if not (np.isfinite(mp) and np.isfinite(sp) and sp > 0):
            return float("nan")
        sq = self.mu.m2 + n * (self.mu.mean - mp) ** 2  # sum (mu - mp)^2
        return float(
            n * np.log(sp)
            - self.sum_log_sigma
            + (self.sum_variance + sq) / (2.0 * sp * sp)
            - 0.5 * n
        )


def _nearest(x: np.ndarray, target: float, buf: np.ndarray) -> float:
    """The element of ``x`` closest to ``target`` (as float64), one chunked pass."""
    best, best_dist = float(x[0]), np.inf
    for i in range(0, x.size, _CHUNK):
        part = x[i : i + _CHUNK]
        t = buf[: part.size]
        np.subtract(part, target, out=t, dtype=np.float64)
        np.abs(t, out=t)
        j = int(np.argmin(t))
        if t[j] < best_dist:
            best, best_dist = float(part[j]), float(t[j])
    return best


def gaussian_sums(mu: np.ndarray, sigma: np.ndarray) -> GaussianSums:
    """:class:`GaussianSums` of finite ``mu`` and ``sigma`` > 0 (same size), float64, O(n).

    The pairwise sum uses, with v = sigma^2, w = 1/v, each pair's
    0.5 * ((v_i - v_j)^2 w_i w_j + (m_i - m_j)^2 (w_i + w_j)), summed over i < j as

    * ``(sum d^2 w)(sum w) - (sum d w)^2`` with d = v - v_c, v_c the variance nearest the
      harmonic mean of v (where sum d w would be 0: little cancels), and
    * ``n sum c^2 w - 2 (sum c)(sum c w) + (sum c^2)(sum w)`` with c = m - m_c, m_c the mu
      nearest the mean (sum c ~ 0, so the non-negative terms dominate).

    Both identities hold for any centre; taking data values as centres makes identical
    elements contribute exactly 0. The centres come from the first chunk (all of a layer
    up to 65,536 elements), so one pass computes every sum: the C kernel
    (``bnn_gauss_sums``, about 1.2 ms for 940,800 elements) or numpy chunk by chunk, each
    chunk cast to float64 once and every product formed in place (about 5.5 ms; a two-pass
    version with einsum took 9).
    """
    return gaussian_summary(mu, sigma)[0]


def _centres(m: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """Data values near the mean of m and the harmonic mean of v of the first chunk. Being
    data values, they make c and d exactly 0 for identical elements (and exact, by
    Sterbenz's lemma, for near-identical ones); being central, they leave little to cancel."""
    size = min(_CHUNK, m.size)
    head_m, head_s = m[:size], s[:size]
    buf = np.empty(size)
    w = np.asarray(head_s, np.float64)
    w = 1.0 / (w * w)
    m_c = _nearest(head_m, float(head_m.sum(dtype=np.float64)) / size, buf)
    s_c = _nearest(head_s, float(np.sqrt(size / float(w.sum()))), buf)
    return m_c, s_c


def _sums(m: np.ndarray, s: np.ndarray, m_c: float, s_c: float) -> list[float]:
    """The eleven sums of :func:`gaussian_sums` with numpy, chunk by chunk (what the C
    kernel ``bnn_gauss_sums`` computes in one pass)."""
    n = m.size
    size = min(_CHUNK, n)
    bs, bv, bw, bt, bc = (np.empty(size) for _ in range(5))
    v_c = s_c * s_c
    sum_w = sum_v = sum_log = dd = dsum = cc_w = c_sum = cw_sum = cc = u_sum = uu = 0.0
    for i in range(0, n, _CHUNK):
        ms, ss = m[i : i + _CHUNK], s[i : i + _CHUNK]
        k = ms.size
        x, v, w, t, c = bs[:k], bv[:k], bw[:k], bt[:k], bc[:k]
        np.copyto(x, ss)  # sigma, float64
        np.multiply(x, x, out=v)  # v
        np.divide(1.0, v, out=w)  # w = 1/v
        sum_w += float(w.sum())
        sum_v += float(v.sum())
        np.log(v, out=t)
        sum_log += float(t.sum())
        np.subtract(v, v_c, out=v)  # d
        np.multiply(v, w, out=t)  # d w
        dsum += float(t.sum())
        np.multiply(t, v, out=t)  # d^2 w
        dd += float(t.sum())
        np.copyto(c, ms)
        np.subtract(c, m_c, out=c)  # c
        c_sum += float(c.sum())
        np.multiply(c, w, out=t)  # c w
        cw_sum += float(t.sum())
        np.multiply(t, c, out=t)  # c^2 w
        cc_w += float(t.sum())
        np.multiply(c, c, out=t)  # c^2
        cc += float(t.sum())
        np.subtract(x, s_c, out=x)  # u = sigma - s_c
        u_sum += float(x.sum())
        np.multiply(x, x, out=x)
        uu += float(x.sum())
    return [sum_w, sum_v, sum_log, dsum, dd, c_sum, cw_sum, cc_w, cc, u_sum, uu]


def gaussian_summary(
    mu: np.ndarray, sigma: np.ndarray, qs: tuple[float, ...] | None = None
) -> tuple[GaussianSums, np.ndarray | None, np.ndarray | None]:
    """:func:`gaussian_sums` of ``mu`` and ``sigma`` and, with ``qs``, the
    :func:`percentiles` ``qs`` of each: with the C kernels (``trainer.store._native``) one
    pass reads each element once for all of them (plus one pass over each array for the
    values of the wanted ranks), about 5 ms for 1.44 million elements where numpy took 15."""
    m, s = np.asarray(mu).ravel(), np.asarray(sigma).ravel()
    n = m.size
    if n == 0:
        empty = Moments(0, float("nan"), 0.0)
        nan = None if qs is None else np.full(len(qs), np.nan)
        return GaussianSums(empty, empty, 0.0, 0.0, 0.0), nan, nan
    m_c, s_c = _centres(m, s)
    got = _native.gauss_sums(m, s, m_c, s_c, hists=qs is not None)
    if got is None:
        sums, h_mu, h_sigma = _sums(m, s, m_c, s_c), None, None
    else:
        sums, h_mu, h_sigma = got
    sum_w, sum_v, sum_log, dsum, dd, c_sum, cw_sum, cc_w, cc, u_sum, uu = sums
    spread_v = sum_w * dd - dsum * dsum
    spread_m = n * cc_w - 2.0 * c_sum * cw_sum + cc * sum_w
    pairwise = 0.5 * (max(spread_v, 0.0) + max(spread_m, 0.0)) if n > 1 else 0.0
    mu_m = Moments(n, m_c + c_sum / n, max(cc - c_sum * c_sum / n, 0.0))
    sigma_m = Moments(n, s_c + u_sum / n, max(uu - u_sum * u_sum / n, 0.0))
    out = GaussianSums(mu_m, sigma_m, pairwise, 0.5 * sum_log, sum_v)
    if qs is None:
        return out, None, None
    return out, percentiles(m, qs, h_mu), percentiles(s, qs, h_sigma)
