"""``bnn demo regression``: a fixed-prior and a learnable-prior BNN on the 1-D task.

Both models get the same seed, data, architecture and optimiser; the report compares
their predictive mean and +-2 sigma bands inside the training range x in [-2, 2] and
outside it (evaluated on [-4, 4]), test RMSE / NLL / interval coverage in and out of
range, the learned priors and every diagnostic (:mod:`service.demo.common`).

    from service.demo import run_regression_demo
    result = run_regression_demo("demo-out")          # report.html, report.md, img/, bnn-data/
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from service.demo._plots import plot_regression_fit
from service.demo.common import DemoResult, DemoRun, add_diagnostics, config_table, say, train_pair
from service.demo.report import Report
from trainer.data import (
    REGRESSION_NOISE_SIGMA,
    REGRESSION_RANGE,
    make_regression,
    regression_function,
)
from trainer.store import RunStore

__all__ = ["REGRESSION_DEFAULTS", "predictive", "regression_metrics", "run_regression_demo"]

#: The demo's configuration (the trainer's defaults otherwise); ``--epochs`` etc. override.
REGRESSION_DEFAULTS: dict[str, Any] = {
    "dataset": "regression",
    "widths": [32, 32],
    "epochs": 300,
    "lr": 1e-2,
    "n_train": 1024,
    "n_test": 512,
    "capture_every": 10,
    "grad_capture": "element",
    "eval_samples": 20,
    "seed": 0,
    "name": "demo-regression",
    "tags": ["demo", "demo:regression"],
}
EVAL_RANGE = (-4.0, 4.0)
Z2 = 2.0  # the +-2 sigma interval; its nominal coverage under a Gaussian:
NOMINAL_COVERAGE = math.erf(Z2 / math.sqrt(2.0))


@torch.no_grad()
def predictive(
    model: torch.nn.Module, x: torch.Tensor, samples: int, noise_sigma: float
) -> dict[str, np.ndarray]:
    """MC predictive of a regression BNN at ``x`` (N, 1): ``mean``, ``epistemic`` (std of
    the sampled means) and ``sigma`` (sqrt(epistemic^2 + noise_sigma^2)), each (N,)."""
    model.eval()
    device = next(model.parameters()).device
    xb = x.to(device)
    draws = torch.stack([model(xb) for _ in range(samples)]).squeeze(-1).cpu().double()
    epistemic = draws.std(dim=0, unbiased=False)
    sigma = torch.sqrt(epistemic**2 + noise_sigma**2)
    return {
        "x": x.squeeze(-1).double().numpy(),
        "mean": draws.mean(dim=0).numpy(),
        "epistemic": epistemic.numpy(),
        "sigma": sigma.numpy(),
    }


def regression_metrics(pred: dict[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
    """RMSE, Gaussian NLL, +-2 sigma coverage and mean predictive sigma of ``pred`` on ``y``."""
    y = np.asarray(y, np.float64).ravel()
    err = y - pred["mean"]
    var = pred["sigma"] ** 2
    return {
        "RMSE": float(np.sqrt(np.mean(err**2))),
        "NLL": float(np.mean(0.5 * (np.log(2 * np.pi * var) + err**2 / var))),
        "coverage +-2 sigma": float(np.mean(np.abs(err) <= Z2 * pred["sigma"])),
        "mean sigma": float(np.mean(pred["sigma"])),
        "mean epistemic sigma": float(np.mean(pred["epistemic"])),
    }


def _outside_set(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Noisy points of the same function with x uniform on [-4, -2) and (2, 4]."""
    rng = np.random.default_rng(seed + 10_000)
    lo, hi = REGRESSION_RANGE
    side = rng.random(n) < 0.5
    x = np.where(side, rng.uniform(EVAL_RANGE[0], lo, n), rng.uniform(hi, EVAL_RANGE[1], n))
    y = regression_function(x) + REGRESSION_NOISE_SIGMA * rng.standard_normal(n)
    return torch.tensor(x[:, None], dtype=torch.float32), np.asarray(y)


def run_regression_demo(
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    widths: list[int] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    capture_every: int | None = None,
    eval_samples: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Train both models, evaluate them, write ``report.html``/``report.md`` to ``out_dir``."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    given: dict[str, Any] = {
        "epochs": epochs,
        "widths": widths,
        "n_train": n_train,
        "n_test": n_test,
    }
    given |= {"capture_every": capture_every, "seed": seed}
    base = REGRESSION_DEFAULTS | {k: v for k, v in given.items() if v is not None}
    data = make_regression(base["n_train"], base["n_test"], seed=base["seed"])
    store = RunStore(out / "bnn-data")
    try:
        runs = train_pair(base, data, store, progress=progress)
        t_trained = time.perf_counter()
        say("evaluating and writing the report")
        result = _report(out, store, runs, data, eval_samples, base["seed"])
    finally:
        store.close()
    result.seconds = {
        **{f"train {label}": run.seconds for label, run in runs.items()},
        "train": t_trained - t_start,
        "report": time.perf_counter() - t_trained,
        "total": time.perf_counter() - t_start,
    }
    result.write_summary()
    return result


def _report(
    out: Path, store: RunStore, runs: dict[str, DemoRun], data: Any, samples: int, seed: int
) -> DemoResult:
    x_out, y_out = _outside_set(data.x_test.shape[0], seed)
    grid = torch.linspace(EVAL_RANGE[0], EVAL_RANGE[1], 400).unsqueeze(1)
    fits, rows, learned = {}, {}, {}
    for label, run in runs.items():
        model, noise = run.trainer.model, run.trainer.noise_sigma or 0.0
        torch.manual_seed(seed)
        fits[label] = predictive(model, grid, samples, noise)
        inside = regression_metrics(
            predictive(model, data.x_test, samples, noise), data.y_test.numpy()
        )
        outside = regression_metrics(predictive(model, x_out, samples, noise), y_out)
        for where, m in (("inside [-2, 2]", inside), ("outside [-4, -2) U (2, 4]", outside)):
            rows[(label, where)] = m
        learned[label] = noise
    metrics = pd.DataFrame.from_dict(rows, orient="index")
    metrics.index.names = ["prior", "test inputs"]
    lo, hi = REGRESSION_RANGE
    report = Report(
        "BNN demo: fixed vs learnable shared prior, 1-D regression",
        out,
        intro=(
            f"Task: y = sin(2x) + 0.25x + N(0, {REGRESSION_NOISE_SIGMA}^2), x ~ U({lo:g}, {hi:g}) "
            f"for training ({data.n_train} points). Two BNNs with the **same** seed, data, "
            "architecture and optimiser; one keeps a fixed N(0, 1) prior, the other learns a "
            "shared Gaussian prior per layer (weights and biases apart). Predictions average "
            f"{samples} posterior samples; the noise sigma is learned."
        ),
    )
    sec = report.section("setup", "Setup")
    sec.table(config_table(runs), "configurations")
    sec = report.section("fit", "Predictive fit inside and outside the training range")
    sec.text(
        f"Predictive mean with +-2 sigma bands on [{EVAL_RANGE[0]:g}, {EVAL_RANGE[1]:g}]; the "
        f"grey areas lie outside the training range [{lo:g}, {hi:g}]. Dark band: epistemic "
        "(posterior) spread only; light band: with the learned observation noise."
    )
    truth_x = np.linspace(*EVAL_RANGE, 400)
    png = plot_regression_fit(
        fits,
        data.x_train.numpy().ravel(),
        data.y_train.numpy().ravel(),
        (truth_x, np.asarray(regression_function(truth_x))),
        REGRESSION_RANGE,
    )
    sec.image("regression_fit", png, "predictive mean +- 2 sigma against the data")
    sec = report.section("metrics", "Test metrics")
    sec.text(
        f"Inside: the {data.x_test.shape[0]} test points drawn like the training data. Outside: "
        f"as many fresh points with x in [-4, -2) or (2, 4]. Coverage: share of targets within "
        f"the predictive mean +- 2 sigma (nominal {100 * NOMINAL_COVERAGE:.1f}% if the "
        f"predictive is right). Learned noise sigma: "
        + ", ".join(f"{k} {v:.4f}" for k, v in learned.items())
        + f" (true {REGRESSION_NOISE_SIGMA})."
    )
    sec.table(metrics, "RMSE, NLL (nats), interval coverage and predictive sigma")
    add_diagnostics(report, store, runs, ["loss", "kl", "test_rmse", "test_nll"])
    html, md = report.write()
    return DemoResult(
        out, html, md, {k: r.run_id for k, r in runs.items()}, metrics, sections=report.section_ids
    )
