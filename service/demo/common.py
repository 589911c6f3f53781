"""What both demos share: training the fixed/learnable pair on the same data and seed, and
the diagnostic sections of the report (priors, stats, KL, evolution, gradients)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from service.analysis import (
    compare_gradient_outliers,
    compute_layer_kl_divergences,
    get_overall_weight_stats,
    gradient_diagnostics,
    kl_between_runs,
    kl_to_prior,
    plot_epoch_distributions,
    plot_gradient_magnitudes,
    plot_kl_over_epochs,
    plot_params_log_distributions,
    plot_percentile_bands,
    plot_prior_trajectories,
    prior_trajectories,
)
from service.demo._plots import plot_training_curves
from service.demo.report import Report
from trainer.config import TrainConfig, parse_config
from trainer.data import DataSplits
from trainer.store import RunReader, RunStore
from trainer.train import Trainer

__all__ = ["PRIORS", "DemoResult", "DemoRun", "add_diagnostics", "config_table", "train_pair"]

PRIORS = ("fixed", "learnable")
DPI = 80
GRAD_COLUMNS = [
    "elements",
    "exploding",
    "vanishing",
    "non-finite elements",
    "median |g|",
    "max |g|",
    "step norm mean",
    "step norm max",
    "first/last norm ratio",
]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class DemoRun:
    """One trained model of a demo: its stored run and the live trainer (model, data)."""

    label: str
    run_id: str
    config: TrainConfig
    trainer: Trainer
    history: list[dict[str, float]]
    seconds: float


@dataclass
class DemoResult:
    """What a demo wrote and measured."""

    out_dir: Path
    html: Path
    markdown: Path
    runs: dict[str, str]
    metrics: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)

    def write_summary(self, **extra: Any) -> Path:
        """``summary.json`` beside the report: runs, timings, metric tables, sections."""

        def rows(frame: pd.DataFrame) -> dict[str, Any]:
            out = frame.to_dict(orient="index")
            return {
                " / ".join(map(str, k)) if isinstance(k, tuple) else str(k): v
                for k, v in out.items()
            }

        summary = {
            "runs": self.runs,
            "seconds": self.seconds,
            "metrics": rows(self.metrics),
            **{name: rows(frame) for name, frame in self.tables.items()},
            "sections": self.sections,
            **extra,
        }
        path = self.out_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2, default=str))
        return path


def train_pair(
    base: Mapping[str, Any],
    data: DataSplits,
    store: RunStore,
    *,
    progress: bool = True,
    log: Callable[[str], None] = say,
) -> dict[str, DemoRun]:
    """Train ``base`` once with a fixed and once with a learnable prior: same data, seed,
    architecture and optimiser; both runs stored in ``store``."""
    runs: dict[str, DemoRun] = {}
    for prior in PRIORS:
        cfg = parse_config(dict(base), prior=prior, name=f"{base.get('name', 'demo')}-{prior}")
        log(
            f"training the {prior}-prior BNN: {cfg.dataset.value}, widths {cfg.hidden}, "
            f"{cfg.epochs} epochs, {data.n_train} examples"
        )
        trainer = Trainer(cfg, sink=store, data=data, progress=progress)
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        assert result.run_id is not None
        log(f"  {prior}: run {result.run_id}, {seconds:.1f} s")
        runs[prior] = DemoRun(prior, result.run_id, cfg, trainer, result.history, seconds)
    return runs


def config_table(runs: Mapping[str, DemoRun]) -> pd.DataFrame:
    """The fields of the two configurations side by side (they differ only in the prior)."""
    keys = [
        "dataset",
        "widths",
        "prior",
        "prior_mode",
        "prior_mu0",
        "prior_sigma0",
        "posterior_sigma_init",
        "optimizer",
        "lr",
        "epochs",
        "batch_size",
        "mc_samples",
        "eval_samples",
        "kl_weight",
        "capture_every",
        "grad_capture",
        "n_train",
        "n_test",
        "seed",
    ]
    rows = {}
    for label, run in runs.items():
        cfg = run.config.to_json_dict()
        rows[label] = {k: str(cfg.get(k)) for k in keys} | {"run id": run.run_id}
        rows[label]["train time (s)"] = f"{run.seconds:.1f}"
    frame = pd.DataFrame(rows)
    frame.index.name = "setting"
    return frame


def _readers(store: RunStore, runs: Mapping[str, DemoRun]) -> dict[str, RunReader]:
    return {label: store.reader(run.run_id) for label, run in runs.items()}


def add_diagnostics(
    report: Report, store: RunStore, runs: Mapping[str, DemoRun], curve_keys: list[str]
) -> None:
    """The sections every demo has: training curves, learned priors, posterior statistics,
    KL tables, parameter evolution and gradient outliers of the two runs compared."""
    readers = _readers(store, runs)
    last = {label: r.epochs[-1] for label, r in readers.items()}

    sec = report.section("training", "Training curves")
    sec.text(
        "Per-epoch loss (the ELBO: NLL + KL/N), its KL term and the test metrics of both "
        "models, from the trainer's history."
    )
    sec.image(
        "training_curves",
        plot_training_curves({k: r.history for k, r in runs.items()}, curve_keys),
        "training curves (blue: fixed prior, orange: learnable prior)",
    )

    sec = report.section("priors", "Learned priors")
    sec.text(
        "Each layer's weights share one Gaussian prior and its biases another. The fixed "
        "model keeps N(mu0, sigma0^2); the learnable model learns mu and sigma per layer "
        "jointly with the posteriors by the ELBO gradient."
    )
    for label, reader in readers.items():
        traj = prior_trajectories(reader)
        first, final = traj.xs(traj.index[0][0], level="epoch"), traj.xs(last[label], level="epoch")
        table = final.add_suffix(" (last)").join(first.add_suffix(" (first)"))
        sec.table(table, f"{label} prior: shared priors per layer, last vs first captured epoch")
    sec.image(
        "prior_trajectories",
        plot_prior_trajectories(readers, dpi=DPI),
        "learned prior mu and sigma per layer over epochs (line style: run)",
    )

    sec = report.section("stats", "Posterior statistics")
    sec.text(
        "The seed's table: mean and std of the posterior mu's and sigma's, overall and per "
        "layer, at the last epoch."
    )
    for label, reader in readers.items():
        sec.table(get_overall_weight_stats(reader), f"{label} prior, epoch {last[label]}")

    sec = report.section("kl", "KL divergences")
    sec.text(
        "Pairwise: the seed's table, the symmetric KL summed over all pairs of posteriors "
        "within a layer (exact, linear time) and its average per pair; a small average means "
        "the layer's posteriors are alike. To the prior: KL(q || p) per layer, the ELBO's KL "
        "term split up. Between runs: KL between the two models' posteriors element by "
        "element (same architecture)."
    )
    for label, reader in readers.items():
        sec.table(compute_layer_kl_divergences(reader), f"{label} prior: pairwise symmetric KL")
    for label, reader in readers.items():
        table = kl_to_prior(reader, [last[label]]).xs(last[label], level="epoch")
        sec.table(table, f"{label} prior: KL(posterior || layer prior), epoch {last[label]}")
    if set(readers) >= {"fixed", "learnable"}:
        sec.table(
            kl_between_runs(readers["learnable"], readers["fixed"]),
            "between runs: learnable (a) vs fixed (b) posteriors",
        )
    for label, reader in readers.items():
        sec.image(
            f"kl_{label}", plot_kl_over_epochs(reader, dpi=DPI), f"{label} prior: KL over epochs"
        )

    sec = report.section("evolution", "Parameter evolution")
    sec.text(
        "The seed's plots. Evolution: the four weights whose posterior mean moved most, each "
        "epoch's Gaussian from dark red (early) to neon green (late). Epoch overlay: every "
        "layer's posteriors at the last epoch (a stated random subset of curves, histograms "
        "of all). Percentile bands: min-max and the 7/16/31 % bands of mu and sigma over epochs."
    )
    for label, reader in readers.items():
        sec.image(
            f"evolution_{label}",
            plot_params_log_distributions(reader, top_k=4, criterion="mu_change", dpi=DPI),
            f"{label} prior: evolution of the 4 weights that moved most",
        )
        sec.image(
            f"overlay_{label}",
            plot_epoch_distributions(reader, max_curves=60, dpi=DPI),
            f"{label} prior: posteriors at epoch {last[label]}",
        )
        sec.image(
            f"bands_{label}",
            plot_percentile_bands(reader, dpi=DPI),
            f"{label} prior: percentile bands over epochs",
        )

    sec = report.section("gradients", "Gradient outliers compared")
    sec.text(
        "Per-element gradient statistics of the last epoch. An element is flagged exploding "
        "(vanishing) when its robust z-score of log10 mean |g| within its layer is above "
        "(below) the threshold, when |g| > 1e2 (< 1e-10), or when a step's gradient was "
        "non-finite (exactly zero). The table ranks each model's top exploding candidates "
        "and shows the same weights in the other model."
    )
    for label, reader in readers.items():
        diag = gradient_diagnostics(reader, [last[label]]).xs(last[label], level="epoch")
        sec.table(
            diag[[c for c in GRAD_COLUMNS if c in diag.columns]],
            f"{label} prior: gradient diagnostics",
        )
    if len(readers) >= 2:
        cmp = compare_gradient_outliers(readers, k=5)
        sec.table(cmp.counts, "flagged elements per layer and run")
        sec.table(
            cmp.table.drop(columns=["flat index"]),
            "top-5 exploding candidates of each run, beside the other run",
        )
    for label, reader in readers.items():
        sec.image(
            f"gradients_{label}",
            plot_gradient_magnitudes(reader, dpi=DPI),
            f"{label} prior: gradient magnitudes",
        )
    for reader in readers.values():
        reader.close()
