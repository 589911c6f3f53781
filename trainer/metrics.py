"""Evaluation metrics for MC-averaged predictions.

Classification: per-example NLL / 0-1 error / Brier, ECE, predictive entropy and an OOD AUROC.
Regression: the Gaussian mixture predictive (1/S) sum_s N(y | f_s, noise_sigma^2) built from S
function samples, its per-example NLL, quantiles and central-interval coverage, and the noise
sigma that fits it on validation data. Sums run in float64; inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.errors import BnnError

__all__ = [
    "brier_score",
    "classification_example_metrics",
    "expected_calibration_error",
    "fit_noise_sigma",
    "gaussian_nll",
    "interval_coverage",
    "mixture_nll",
    "mixture_quantiles",
    "ood_auroc",
    "predictive_entropy",
    "predictive_gaussian",
]

_PROB_FLOOR = 1e-12  # probabilities are clamped here before a log
_BRACKET_SIGMAS = 10.0  # quantile bracket: min/max sample -/+ this many noise sigmas
_BISECT_STEPS = 24  # 2^-24 ~ 6e-8 of the bracket width
_GOLDEN_STEPS = 60
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins. ``probs``: (N, C) probabilities; ``labels``: (N,)."""
    if probs.numel() == 0:
        return float("nan")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).to(torch.float64)
    conf = conf.to(torch.float64)
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return float((conf_sum - acc_sum).abs().sum() / probs.shape[0])


def gaussian_nll(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    """Per-element negative log-likelihood of ``target`` under N(mean, variance)."""
    return 0.5 * (torch.log(2 * math.pi * variance) + (target - mean) ** 2 / variance)


def predictive_gaussian(samples: Tensor, noise_sigma: float) -> tuple[Tensor, Tensor]:
    """Moment-matched predictive N(mean, variance) from MC samples (S, N, 1) and the noise sigma."""
    mean = samples.mean(dim=0)
    variance = samples.var(dim=0, unbiased=False) + noise_sigma**2
    return mean, variance


# --- classification ----------------------------------------------------------------------------


def _check_probs(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``probs`` (N, C) as float64 and ``labels`` (N,) as int64, or BnnError naming the shapes."""
    if probs.dim() != 2:
        raise BnnError.invalid(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        raise BnnError.invalid(
            f"labels must have shape ({probs.shape[0]},) to match probs, got {tuple(labels.shape)}"
        )
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise BnnError.invalid(f"label {bad} is outside 0..{probs.shape[1] - 1}")
    return probs.to(torch.float64), labels


def classification_example_metrics(probs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-example float64 arrays (N,): ``nll`` (-log p_true, p clamped at 1e-12), ``error``
    (0/1, arg-max prediction) and ``brier`` (sum_c (p_c - onehot_c)^2).

    ``probs``: (N, C) predictive probabilities; ``labels``: (N,) class indices.
    """
    p, labels = _check_probs(probs, labels)
    p_true = p.gather(1, labels[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(labels, p.shape[1]).to(torch.float64)
    return {
        "nll": -torch.log(p_true.clamp_min(_PROB_FLOOR)),
        "error": (p.argmax(dim=1) != labels).to(torch.float64),
        "brier": ((p - onehot) ** 2).sum(dim=1),
    }


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean multi-class Brier score; ``probs`` (N, C), ``labels`` (N,); NaN when N = 0."""
    brier = classification_example_metrics(probs, labels)["brier"]
    return float(brier.mean()) if brier.numel() else float("nan")


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy -sum_c p_c log p_c (nats) of each row of ``probs`` (N, C): float64 (N,)."""
    if probs.dim() != 2:
        raise BnnError.invalid(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    p = probs.to(torch.float64)
    return -torch.special.xlogy(p, p).sum(dim=1)


def ood_auroc(score_in: Tensor, score_out: Tensor) -> float:
    """AUROC of ``score`` (larger = more out-of-distribution) for telling OOD (positive) from
    in-distribution inputs: P(s_out > s_in) + P(s_out == s_in) / 2, the Mann-Whitney U / (n m).

    Exact, with ties counted 1/2, in O(n log n) through mid-ranks. Scores: any shape, flattened.
    """
    s_in = score_in.detach().reshape(-1).to(torch.float64).cpu()
    s_out = score_out.detach().reshape(-1).to(torch.float64).cpu()
    for name, s in (("score_in", s_in), ("score_out", s_out)):
        if s.numel() == 0:
            raise BnnError.invalid(f"{name} is empty")
        if not bool(torch.isfinite(s).all()):
            bad = s[~torch.isfinite(s)][0].item()
            raise BnnError.invalid(f"{name} has a non-finite score {bad}")
    both = torch.cat([s_in, s_out])
    _, inverse, counts = torch.unique(both, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    mid_rank = torch.cumsum(counts, 0) - (counts - 1.0) / 2.0  # 1-based mean rank of each tie group
    n_in, n_out = s_in.numel(), s_out.numel()
    rank_sum_out = float(mid_rank[inverse[n_in:]].sum())
    u = rank_sum_out - n_out * (n_out + 1) / 2.0
    return u / (n_in * n_out)


# --- regression: the Gaussian mixture predictive -----------------------------------------------


def _as_samples(samples: Tensor) -> Tensor:
    """(S, N) or (S, N, 1) function samples as float64 (S, N)."""
    if samples.dim() == 3 and samples.shape[2] == 1:
        samples = samples[..., 0]
    if samples.dim() != 2:
        raise BnnError.invalid(
            f"samples must have shape (S, N) or (S, N, 1), got {tuple(samples.shape)}"
        )
    if samples.shape[0] < 1:
        raise BnnError.invalid(f"samples need S >= 1 function samples, got S={samples.shape[0]}")
    return samples.detach().to(torch.float64)


def _as_target(target: Tensor, n: int) -> Tensor:
    """(N,) or (N, 1) targets as float64 (N,)."""
    flat = target.detach().to(torch.float64)
    if flat.dim() == 2 and flat.shape[1] == 1:
        flat = flat[:, 0]
    if flat.dim() != 1 or flat.shape[0] != n:
        raise BnnError.invalid(
            f"target must have shape ({n},) or ({n}, 1) to match samples, got {tuple(target.shape)}"
        )
    return flat


def _as_noise(noise_sigma: float | Tensor, n: int, device: torch.device) -> Tensor:
    """A positive finite noise sigma: scalar, or one per example (N,)/(N, 1); float64 ()/(N,)."""
    sigma = torch.as_tensor(noise_sigma, dtype=torch.float64, device=device).detach()
    if sigma.numel() == 1:
        sigma = sigma.reshape(())
    elif sigma.numel() == n:
        sigma = sigma.reshape(n)
    else:
        raise BnnError.invalid(
            f"noise_sigma must be a scalar or have {n} values, got shape {tuple(sigma.shape)}"
        )
    bad = ~torch.isfinite(sigma) | (sigma <= 0)
    if bool(bad.any()):
        raise BnnError.invalid(
            f"noise_sigma must be finite and > 0, got {sigma[bad].reshape(-1)[0].item()}"
        )
    return sigma


def mixture_nll(samples: Tensor, noise_sigma: float | Tensor, target: Tensor) -> Tensor:
    """Per-example NLL of ``target`` under (1/S) sum_s N(f_s, noise_sigma^2): float64 (N,).

    ``samples``: (S, N) or (S, N, 1); ``target``: (N,) or (N, 1); ``noise_sigma``: a float or
    a tensor with one value or one per example. Log-sum-exp over samples, so it stays finite
    far in the tails.
    """
    f = _as_samples(samples)
    y = _as_target(target, f.shape[1])
    sigma = _as_noise(noise_sigma, f.shape[1], f.device)
    z = (y - f) / sigma
    log_pdf = -0.5 * z**2 - torch.log(sigma) - _HALF_LOG_2PI
    return math.log(f.shape[0]) - torch.logsumexp(log_pdf, dim=0)


def _quantiles(f: Tensor, sigma: Tensor, probs: Sequence[float]) -> Tensor:
    """Mixture quantiles (P, N) by bisection on the mixture CDF, vectorised over examples."""
    lo0 = f.min(dim=0).values - _BRACKET_SIGMAS * sigma
    hi0 = f.max(dim=0).values + _BRACKET_SIGMAS * sigma
    # Phi((q - f) / sigma) = erfc((f - q) / (sigma sqrt 2)) / 2: scale once, then one erfc a step
    # (erfc is accurate in the lower tail, where torch.special.ndtr's 1 + erf cancels; faster too)
    scale = 1.0 / (sigma * math.sqrt(2.0))
    f_scaled = f * scale
    out = torch.empty((len(probs), f.shape[1]), dtype=torch.float64, device=f.device)
    for row, p in enumerate(probs):
        lo, hi = lo0.clone(), hi0.clone()
        for _ in range(_BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            below = torch.erfc(f_scaled - mid * scale).mean(dim=0) < 2.0 * p
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        out[row] = 0.5 * (lo + hi)
    return out


def _check_probability(p: float, name: str) -> float:
    if not (isinstance(p, int | float) and 0.0 < p < 1.0):
        raise BnnError.invalid(f"{name} must be strictly between 0 and 1, got {p!r}")
    return float(p)


def mixture_quantiles(
    samples: Tensor, noise_sigma: float | Tensor, probs: Sequence[float]
) -> Tensor:
    """Quantiles of each example's mixture predictive: float64 (len(probs), N).

    Bisection on the mixture CDF (1/S) sum_s Phi((q - f_s) / noise_sigma), bracketed by the
    smallest/largest sample -/+ 10 noise sigmas, to ~6e-8 of that bracket's width.
    ``samples``: (S, N) or (S, N, 1); ``probs``: levels strictly inside (0, 1).
    """
    f = _as_samples(samples)
    sigma = _as_noise(noise_sigma, f.shape[1], f.device)
    levels = [_check_probability(p, "quantile level") for p in probs]
    return _quantiles(f, sigma, levels)


def interval_coverage(
    samples: Tensor,
    noise_sigma: float | Tensor,
    target: Tensor,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
) -> dict[float, Tensor]:
    """Per level, float64 (N,) 0/1 indicators that ``target`` lies in the mixture's central
    interval [q((1 - level) / 2), q((1 + level) / 2)]. Their mean is the empirical coverage.
    """
    f = _as_samples(samples)
    y = _as_target(target, f.shape[1])
    sigma = _as_noise(noise_sigma, f.shape[1], f.device)
    checked = [_check_probability(level, "coverage level") for level in levels]
    ends = [p for level in checked for p in ((1.0 - level) / 2.0, (1.0 + level) / 2.0)]
    q = _quantiles(f, sigma, ends)
    return {
        level: ((q[2 * i] <= y) & (y <= q[2 * i + 1])).to(torch.float64)
        for i, level in enumerate(checked)
    }


def fit_noise_sigma(
    samples: Tensor, target: Tensor, *, lo: float = 1e-4, hi: float | None = None
) -> float:
    """The homoscedastic noise sigma minimising the mean :func:`mixture_nll` on (validation) data.

    Golden-section search over log sigma in [lo, hi] (60 steps, so the bracket shrinks by
    ~3e-13). ``hi`` defaults to 10 * std(target - mean sample) + 1e-3. Evaluating with this
    sigma instead of the ELBO-trained one avoids counting the epistemic spread twice.
    ``samples``: (S, N) or (S, N, 1); ``target``: (N,) or (N, 1).
    """
    f = _as_samples(samples)
    y = _as_target(target, f.shape[1])
    if f.shape[1] == 0:
        raise BnnError.invalid("fit_noise_sigma needs at least one example, got N=0")
    if hi is None:
        hi = 10.0 * float((y - f.mean(dim=0)).std(unbiased=False)) + 1e-3
    if not (math.isfinite(lo) and lo > 0):
        raise BnnError.invalid(f"lo must be finite and > 0, got {lo}")
    if not (math.isfinite(hi) and hi > lo):
        raise BnnError.invalid(f"hi must be finite and > lo={lo}, got {hi}")

    # per evaluation only exp and a sum: -log p(y_n) = log S + log sigma + m_n / sigma^2
    # - log sum_s exp(-excess_sn / sigma^2) (+ const), with m_n = min_s (y_n - f_sn)^2 / 2.
    # numpy: 62 small single-threaded passes; torch threads stall on a loaded machine.
    half_sq = (0.5 * (y - f) ** 2).cpu().numpy()
    m = half_sq.min(axis=0)
    excess = half_sq - m
    mean_m, log_s = float(m.mean()), math.log(f.shape[0])

    def loss(log_sigma: float) -> float:
        inv_var = math.exp(-2.0 * log_sigma)
        log_sum = np.log(np.exp(-inv_var * excess).sum(axis=0))
        return log_s + log_sigma + mean_m * inv_var - float(log_sum.mean())

    a, b = math.log(lo), math.log(hi)
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(_GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = loss(d)
    return math.exp(0.5 * (a + b))
