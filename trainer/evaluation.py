"""Evaluation of a trained Bayesian network from posterior samples.

Two uses, both built on :func:`predict`:

* :func:`quick_metrics`: the per-epoch validation numbers (``val_nll`` and accuracy or RMSE)
  from a few samples, used for model selection and early stopping;
* :func:`final_evaluation`: the reported test metrics from many samples (100 by default) and the
  per-example arrays a study bootstraps over.

Classification reports NLL, error, ECE, Brier score and, for image sets, the AUROC of telling
out-of-distribution inputs (:func:`trainer.data.ood_inputs`) from test inputs by the predictive
entropy. Regression predicts with the Monte Carlo mixture (1/S) sum_s N(f_s(x), noise^2), whose
noise sigma is refitted on the validation set (:func:`trainer.metrics.fit_noise_sigma`): the
noise learned by the ELBO absorbs epistemic variance, which the mixture then adds a second
time, so its intervals would be too wide. Reported: RMSE, mixture NLL and the coverage of the
central 50/90/95% intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from trainer.data import DataSplits, ood_inputs
from trainer.metrics import (
    classification_example_metrics,
    expected_calibration_error,
    fit_noise_sigma,
    interval_coverage,
    mixture_nll,
    ood_auroc,
    predictive_entropy,
)

__all__ = ["COVERAGE_LEVELS", "Evaluation", "final_evaluation", "predict", "quick_metrics"]

COVERAGE_LEVELS = (0.5, 0.9, 0.95)
_CHUNK = 2048


@torch.no_grad()
def predict(
    model: nn.Module, x: Tensor, samples: int, device: torch.device, *, probs: bool
) -> Tensor:
    """``samples`` stochastic forward passes over ``x`` in chunks, on the CPU.

    ``probs=True``: the mean softmax over samples, (N, C), accumulated without keeping the
    samples. ``probs=False``: every sample's output, (S, N, out).
    """
    model.eval()
    parts = []
    for start in range(0, x.shape[0], _CHUNK):
        xb = x[start : start + _CHUNK].to(device)
        if probs:
            acc = torch.softmax(model(xb).float(), dim=-1)
            for _ in range(samples - 1):
                acc.add_(torch.softmax(model(xb).float(), dim=-1))
            parts.append(acc.div_(samples).cpu())
        else:
            parts.append(torch.stack([model(xb).float() for _ in range(samples)]).cpu())
    return torch.cat(parts, dim=0 if probs else 1)


def quick_metrics(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    classification: bool,
    samples: int,
    device: torch.device,
    noise_sigma: float | None,
    prefix: str = "val_",
) -> dict[str, float]:
    """NLL and accuracy (classification) or RMSE (regression) from ``samples`` passes."""
    if classification:
        p = predict(model, x, samples, device, probs=True)
        ex = classification_example_metrics(p, y)
        return {
            f"{prefix}nll": float(ex["nll"].mean()),
            f"{prefix}acc": float(1 - ex["error"].mean()),
        }
    f = predict(model, x, samples, device, probs=False)
    noise = max(noise_sigma or 0.0, 1e-6)
    return {
        f"{prefix}nll": float(mixture_nll(f, noise, y).mean()),
        f"{prefix}rmse": float(((f.mean(0) - y) ** 2).mean().sqrt()),
    }


@dataclass
class Evaluation:
    """The final test evaluation: scalar metrics and per-test-example arrays (float64, (N,))."""

    metrics: dict[str, float]
    per_example: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def final_evaluation(
    model: nn.Module,
    data: DataSplits,
    *,
    samples: int,
    device: torch.device,
    noise_sigma: float | None,
    ood: bool = True,
) -> Evaluation:
    """Test metrics of ``model`` from ``samples`` posterior samples (see the module docstring)."""
    if data.classification:
        return _classification(model, data, samples, device, ood)
    return _regression(model, data, samples, device, noise_sigma)


def _classification(
    model: nn.Module, data: DataSplits, samples: int, device: torch.device, ood: bool
) -> Evaluation:
    probs = predict(model, data.x_test, samples, device, probs=True)
    y = data.y_test.cpu()
    ex = classification_example_metrics(probs, y)
    metrics = {
        "test_acc": float(1 - ex["error"].mean()),
        "test_error": float(ex["error"].mean()),
        "test_nll": float(ex["nll"].mean()),
        "test_ece": expected_calibration_error(probs, y),
        "test_brier": float(ex["brier"].mean()),
    }
    notes = {}
    if ood:
        name, x_ood = ood_inputs(data)
        probs_ood = predict(model, x_ood, samples, device, probs=True)
        metrics["test_ood_auroc"] = ood_auroc(
            predictive_entropy(probs), predictive_entropy(probs_ood)
        )
        notes["ood_set"] = name
    per_example = {k: v.numpy().astype(np.float64) for k, v in ex.items()}
    return Evaluation(metrics, per_example, notes)


def _regression(
    model: nn.Module,
    data: DataSplits,
    samples: int,
    device: torch.device,
    noise_sigma: float | None,
) -> Evaluation:
    notes = {}
    noise = max(noise_sigma or 0.0, 1e-6)
    if data.has_validation:
        assert data.x_val is not None and data.y_val is not None
        f_val = predict(model, data.x_val, samples, device, probs=False)
        noise = fit_noise_sigma(f_val, data.y_val)
        notes["noise"] = "refitted on the validation set"
    else:
        notes["noise"] = "learned by the ELBO (no validation set)"
    f = predict(model, data.x_test, samples, device, probs=False)
    y = data.y_test.cpu()
    nll = mixture_nll(f, noise, y)
    sq = ((f.mean(0) - y) ** 2).reshape(-1).to(torch.float64)
    covered = interval_coverage(f, noise, y, COVERAGE_LEVELS)
    metrics = {
        "test_rmse": math.sqrt(float(sq.mean())),
        "test_nll": float(nll.mean()),
        "test_noise_sigma": float(noise),
    }
    per_example = {"nll": nll.numpy(), "sq_error": sq.numpy()}
    for level, hits in covered.items():
        key = f"coverage_{round(level * 100)}"
        metrics[f"test_{key}"] = float(hits.mean())
        per_example[key] = hits.numpy()
    return Evaluation(
        metrics, {k: np.asarray(v, np.float64) for k, v in per_example.items()}, notes
    )
