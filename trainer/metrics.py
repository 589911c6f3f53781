"""Evaluation metrics for MC-averaged predictions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["expected_calibration_error", "gaussian_nll", "predictive_gaussian"]


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
