"""``bnn demo regression``: the seven-arm comparison of priors on the 1-D task, as one report.

The study (:func:`service.demo.protocol.protocol_spec`, ``"regression"``): fixed N(0, 1),
fixed tuned, fixed scale mixture, learnable by gradient, empirical Bayes after a burn-in, the
hierarchical prior and the fan-in prior; every tuned arm gets the same validation budget; 5
paired seeds by default; test metrics with 95% CIs and paired differences to fixed N(0, 1).
Then, for the first seed's runs, the predictive fit of up to three arms inside the training
range x in [-2, 2] and outside it (models rebuilt from their stored posteriors) and every
diagnostic of :mod:`service.demo.common`.

    from service.demo import run_regression_demo
    result = run_regression_demo("demo-out")     # report.html, report.md, img/, bnn-data/
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from service.demo._plots import plot_regression_fit
from service.demo.common import (
    DemoResult,
    burnin_note,
    data_for_run,
    demo_spec,
    model_from_run,
    pick_arms,
    plot_epoch,
    run_protocol_demo,
)
from service.demo.protocol import PROTOCOL_BASE
from service.demo.report import Report
from trainer.data import (
    REGRESSION_NOISE_SIGMA,
    REGRESSION_RANGE,
    regression_function,
)
from trainer.store import RunStore

__all__ = [
    "FIT_ARMS",
    "REGRESSION_DEFAULTS",
    "REGRESSION_TUNE_EPOCHS",
    "predictive",
    "regression_metrics",
    "run_regression_demo",
]

#: The demo's changes to the protocol's regression preset (``--epochs`` etc. override):
#: 100 epochs instead of 150 and 50-epoch tuning runs (:data:`REGRESSION_TUNE_EPOCHS`) keep
#: 5 seeds x 7 arms (18 tuning + 35 evaluation runs) within 5 minutes on 2 cores;
#: per-element gradient statistics (no measurable cost at this size) for the outlier tables.
REGRESSION_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "grad_capture": "element",
    "name": "demo-regression",
    "tags": ["demo", "demo:regression"],
}
#: Epochs of each tuning run (every tuned arm the same; ``--tune-epochs`` overrides).
REGRESSION_TUNE_EPOCHS = 50
#: Arms whose predictive fit is drawn (those in the study, at most three).
FIT_ARMS = ("fixed N(0,1)", "learnable gradient", "fan-in learnable")
EVAL_RANGE = (-4.0, 4.0)
Z2 = 2.0  # the +-2 sigma interval; its nominal coverage under a Gaussian:
NOMINAL_COVERAGE = math.erf(Z2 / math.sqrt(2.0))
CURVES = ["loss", "kl", "val_nll", "val_rmse"]


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
    seeds: Sequence[int] | None = None,
    arms: Sequence[str] | None = None,
    epochs: int | None = None,
    widths: list[int] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    capture_every: int | None = None,
    eval_samples: int | None = None,
    tune_epochs: int | None = None,
    temper: bool = False,
    device: str | None = None,
    fit_samples: int = 200,
    workers: int = 2,
    progress: bool = True,
    command: str | None = None,
) -> DemoResult:
    """Run the regression protocol (5 seeds by default) into ``<out>/bnn-data`` and write
    ``report.html``/``report.md``/``summary.json`` to ``out_dir``."""
    given = {
        "epochs": epochs,
        "widths": widths,
        "n_train": n_train,
        "n_test": n_test,
        "capture_every": capture_every,
        "eval_samples": eval_samples,
        "device": device,
    }
    base = REGRESSION_DEFAULTS | {k: v for k, v in given.items() if v is not None}
    if tune_epochs is None:
        tune_epochs = REGRESSION_TUNE_EPOCHS
    tune_epochs = min(tune_epochs, base["epochs"])
    spec = demo_spec(
        "regression",
        seeds=list(seeds) if seeds else None,
        base=base,
        arms=list(arms) if arms else None,
        temper=temper,
        tune_epochs=tune_epochs,
        name=base["name"],
    )
    sizes = PROTOCOL_BASE["regression"] | {k: v for k, v in spec.base.items() if k != "tags"}
    lo, hi = REGRESSION_RANGE
    intro = (
        f"Task: y = sin(2x) + 0.25x + N(0, {REGRESSION_NOISE_SIGMA}^2), x ~ U({lo:g}, {hi:g}), "
        f"{sizes['n_train']} training, 256 validation and {sizes['n_test']} test points per "
        f"seed; a Bayesian MLP 1-{'-'.join(map(str, sizes['widths']))}-1, {sizes['epochs']} "
        f"epochs of Adam (lr {sizes['lr']}), a learned noise sigma. {len(spec.arms)} priors "
        f"(arms) x {len(spec.seeds)} paired seeds {spec.seeds}, each tuned arm tuned on the "
        "validation split with the same budget "
        + (f"({spec.tune_epochs}-epoch tuning runs)" if spec.tune_epochs else "(full-length runs)")
        + ". The demo's sizes differ from the protocol preset "
        f"({PROTOCOL_BASE['regression']['epochs']} epochs) only in: "
        + (", ".join(f"{k}={v}" for k, v in base.items() if k not in ("name", "tags")) or "-")
        + "."
        + burnin_note(spec)
        + " Results first (every test metric with its 95% CI and the paired differences to "
        f"{spec.baseline}), then the predictive fit and the diagnostics of seed "
        f"{spec.seeds[0]}'s runs."
    )

    def extra(report: Report, store: RunStore, runs: dict[str, str]) -> dict[str, pd.DataFrame]:
        shown = pick_arms(list(runs), FIT_ARMS, 3)
        return {"fit": _fit_section(report, store, {a: runs[a] for a in shown}, fit_samples)}

    return run_protocol_demo(
        out_dir,
        spec,
        title="BNN demo: seven priors compared, 1-D regression",
        intro=intro,
        curve_keys=CURVES,
        extra=extra,
        workers=workers,
        progress=progress,
        command=command,
        info={"task": "regression", "sizes": sizes, "fit_samples": fit_samples},
    )


def _fit_section(
    report: Report, store: RunStore, runs: dict[str, str], samples: int
) -> pd.DataFrame:
    """The predictive fit of ``runs`` (one seed) on [-4, 4] and its metrics in and out of
    the training range, from models rebuilt from the stored posteriors."""
    grid = torch.linspace(EVAL_RANGE[0], EVAL_RANGE[1], 400).unsqueeze(1)
    fits, rows, notes = {}, {}, []
    data = None
    for label, run_id in runs.items():
        data = data_for_run(store, run_id)
        seed = int(store.get_run(run_id).config["seed"])
        with store.reader(run_id) as reader:
            epoch = plot_epoch(reader)
            last = reader.metrics(reader.epochs[-1])
        noise = float(last.get("test_noise_sigma", last.get("noise_sigma", 0.0)))
        model = model_from_run(store, run_id, data, epoch=epoch)
        torch.manual_seed(seed)
        fits[label] = predictive(model, grid, samples, noise)
        x_out, y_out = _outside_set(data.x_test.shape[0], seed)
        inside = regression_metrics(
            predictive(model, data.x_test, samples, noise), data.y_test.numpy()
        )
        outside = regression_metrics(predictive(model, x_out, samples, noise), y_out)
        for where, m in (("inside [-2, 2]", inside), ("outside [-4, -2) U (2, 4]", outside)):
            rows[(label, where)] = m
        notes.append(f"{label}: epoch {epoch}, noise sigma {noise:.4f}")
    assert data is not None
    metrics = pd.DataFrame.from_dict(rows, orient="index")
    metrics.index.names = ["arm", "test inputs"]
    lo, hi = REGRESSION_RANGE
    sec = report.section("fit", "Predictive fit inside and outside the training range")
    sec.text(
        f"Seed {seed}'s runs of {', '.join(runs)}, each network rebuilt from its stored "
        "posteriors (the validation-selected epoch when it was captured, else the last "
        f"captured epoch; {'; '.join(notes)}; the noise sigma refitted on validation). "
        f"Predictive mean with +-2 sigma bands on [{EVAL_RANGE[0]:g}, {EVAL_RANGE[1]:g}] from "
        f"{samples} posterior samples; the grey areas lie outside the training range "
        f"[{lo:g}, {hi:g}]. Dark band: epistemic (posterior) spread only; light band: with the "
        "observation noise. One seed, no intervals: the study's tables above carry the CIs."
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
    sec.text(
        f"Inside: the {data.x_test.shape[0]} test points. Outside: as many fresh points with x "
        "in [-4, -2) or (2, 4]. Gaussian predictive N(mean, epistemic^2 + noise^2); coverage: "
        f"share of targets within mean +- 2 sigma (nominal {100 * NOMINAL_COVERAGE:.1f}%)."
    )
    sec.table(metrics, "RMSE, NLL (nats), interval coverage and predictive sigma, one seed")
    return metrics
