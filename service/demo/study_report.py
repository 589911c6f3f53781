"""A study's tables, plots and report: means with 95% CIs and paired differences.

Per-example metrics (test NLL, error, Brier; regression NLL, squared error, interval coverage)
come from the per-test-example arrays stored with each run's last epoch; their intervals are the
two-level bootstrap over seeds and test examples
(:func:`service.analysis.comparison_table`), and differences against the baseline arm are
paired (same seeds, same examples). Per-run metrics (ECE, OOD AUROC, the ELBO, the best
validation NLL) get Student-t intervals over seeds and paired t differences.
RMSE is reported as the square root of the mean squared error and its interval's bounds.

    data = collect_study(store, sweep)
    tables = study_tables(data)
    plots = study_plots(data, tables)
    write_study_report(store, sweep, "out/")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service.analysis import comparison_table
from service.demo._plots import colour, figure, png
from service.demo.report import Report, format_column
from service.demo.study import TUNE_PREFIX, StudySpec, study_phase
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore, SweepInfo

__all__ = ["StudyData", "collect_study", "study_plots", "study_tables", "write_study_report"]

CLASSIFICATION = {
    "per_example": ["nll", "error", "brier"],
    "per_seed": ["test_ece", "test_ood_auroc", "elbo", "best_val_nll"],
    "headline": ["nll", "error", "test_ece", "elbo"],
}
REGRESSION = {
    "per_example": ["nll", "sq_error", "coverage_50", "coverage_90", "coverage_95"],
    "per_seed": ["elbo", "best_val_nll"],
    "headline": ["nll", "sq_error", "coverage_95", "elbo"],
}
LABELS = {
    "nll": "test NLL",
    "error": "test error",
    "brier": "test Brier",
    "sq_error": "test MSE",
    "coverage_50": "coverage 50%",
    "coverage_90": "coverage 90%",
    "coverage_95": "coverage 95%",
    "test_ece": "test ECE",
    "test_ood_auroc": "OOD AUROC",
    "elbo": "ELBO / example",
    "best_val_nll": "best val NLL",
}
HIGHER_IS_BETTER = {"test_ood_auroc", "elbo"}


@dataclass
class StudyData:
    """The evaluation runs of a study, paired by seed: arrays per arm and metric."""

    sweep: SweepInfo
    spec: StudySpec
    classification: bool
    seeds: list[int]
    arrays: dict[str, dict[str, np.ndarray]]  # arm -> metric -> (K, N) or (K,)
    runs: pd.DataFrame
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    tuning: pd.DataFrame | None = None

    @property
    def metrics(self) -> dict[str, list[str]]:
        return CLASSIFICATION if self.classification else REGRESSION


def _selected_metrics(store: RunStore, run_id: str) -> dict[str, float]:
    epochs = store.list_epochs(run_id)
    last = dict(epochs[-1].metrics)
    selected = int(last.get("selected_epoch", epochs[-1].epoch))
    at = next((e.metrics for e in epochs if e.epoch == selected), last)
    vals = [e.metrics.get("val_nll", math.nan) for e in epochs]
    finite = [v for v in vals if math.isfinite(v)]
    last["elbo"] = float(at.get("elbo", last.get("elbo", math.nan)))
    last["best_val_nll"] = min(finite) if finite else math.nan
    return last


def collect_study(store: RunStore, sweep: SweepInfo) -> StudyData:
    """Gather the completed evaluation runs. Only seeds that every arm completed are used (the
    comparison stays paired); CONFLICT when there is none yet."""
    spec = StudySpec.model_validate(sweep.spec)
    labels = sweep.labels
    rows, per_run = [], {}
    for name in spec.arms:
        for seed in spec.seeds:
            run_id = labels.get(f"{name}/s{seed}")
            if run_id is None:
                continue
            run = store.get_run(run_id)
            if run.status is not RunStatus.COMPLETED or not store.list_epochs(run_id):
                continue
            metrics = _selected_metrics(store, run_id)
            with store.reader(run_id) as reader:
                evaluation = reader.evaluation()
            if evaluation is None:
                continue
            per_run[(name, seed)] = (metrics, evaluation)
            rows.append({"arm": name, "seed": seed, "run_id": run_id, **metrics})
    seeds = [s for s in spec.seeds if all((a, s) in per_run for a in spec.arms)]
    if not seeds:
        raise BnnError(
            ErrorCode.CONFLICT,
            f"study {sweep.id!r} has no seed completed by every arm yet "
            f"(phase {study_phase(sweep)}, {len(rows)} evaluation runs done)",
        )
    classification = "error" in next(iter(per_run.values()))[1]
    kinds = CLASSIFICATION if classification else REGRESSION
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for name in spec.arms:
        arm: dict[str, np.ndarray] = {}
        for metric in kinds["per_example"]:
            arm[metric] = np.stack([per_run[(name, s)][1][metric] for s in seeds])
        for metric in kinds["per_seed"]:
            arm[metric] = np.array([per_run[(name, s)][0].get(metric, math.nan) for s in seeds])
        arrays[name] = arm
    tuning_rows = []
    for label, run_id in sweep.runs:
        if label.startswith(TUNE_PREFIX) and store.get_run(run_id).status is RunStatus.COMPLETED:
            _, arm_name, index = label.split("/")
            point = spec.arms[arm_name].grid()[int(index)]
            metrics = _selected_metrics(store, run_id)
            tuning_rows.append(
                {
                    "arm": arm_name,
                    **{k: point[k] for k in point},
                    "best val NLL": metrics["best_val_nll"],
                }
            )
    return StudyData(
        sweep,
        spec,
        classification,
        seeds,
        arrays,
        pd.DataFrame(rows),
        dict(sweep.summary.get("chosen") or {}),
        pd.DataFrame(tuning_rows) if tuning_rows else None,
    )


def study_tables(data: StudyData, *, n_boot: int = 2000, seed: int = 0) -> dict[str, pd.DataFrame]:
    """``summary`` (one row per arm: each metric and its 95% CI), ``differences`` (arm minus
    baseline, CI, p, significant), ``settings`` (tuning budget and chosen values per arm)."""
    kinds = data.metrics
    assert data.spec.baseline is not None
    summary, diffs = comparison_table(
        data.arrays,
        data.spec.baseline,
        per_example=kinds["per_example"],
        per_seed=[m for m in kinds["per_seed"] if _finite_everywhere(data, m)],
        n_boot=n_boot,
        seed=seed,
    )
    if not data.classification:  # RMSE from the MSE and its interval
        for suffix in ("", " lo", " hi"):
            summary[f"rmse{suffix}"] = np.sqrt(summary[f"sq_error{suffix}"])
    settings = pd.DataFrame(
        [
            {
                "arm": name,
                "overrides": _text(arm.config),
                "tuning budget (runs)": arm.budget,
                "grid": _text(arm.tune) if arm.tune else "untuned",
                "chosen on validation": _text(data.chosen.get(name, {})) if arm.tune else "",
            }
            for name, arm in data.spec.arms.items()
        ]
    ).set_index("arm")
    return {"summary": summary, "differences": diffs, "settings": settings}


def _finite_everywhere(data: StudyData, metric: str) -> bool:
    return all(np.isfinite(arm[metric]).all() for arm in data.arrays.values() if metric in arm)


def _text(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "-"


def _num(frame: pd.DataFrame, row: Any, col: str) -> float:
    """One cell as a float (the tables hold numbers only)."""
    return float(frame.loc[row, col])


def display_summary(data: StudyData, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The summary as ``mean [lo, hi]`` strings (error as %), one column per metric."""
    summary = tables["summary"]
    metrics = [*data.metrics["per_example"], *data.metrics["per_seed"]]
    if not data.classification:
        metrics = ["rmse", *[m for m in metrics if m != "sq_error"]]
    out = {}
    for m in metrics:
        if m not in summary:
            continue
        scale = 100.0 if m in ("error", "test_ece") or m.startswith("coverage") else 1.0
        unit = " %" if scale == 100.0 else ""
        # one number format for the column's means and bounds together
        arms = list(summary.index)
        cells = format_column(
            [_num(summary, a, m + k) * scale for k in ("", " lo", " hi") for a in arms]
        )
        n = len(arms)
        out[LABELS.get(m, m) + unit] = [
            f"{cells[i]} [{cells[n + i]}, {cells[2 * n + i]}]" for i in range(n)
        ]
    return pd.DataFrame(out, index=summary.index)


def significance_sentences(data: StudyData, tables: dict[str, pd.DataFrame]) -> list[str]:
    """One plain sentence per (arm, headline metric): better/worse/no significant difference."""
    diffs = tables["differences"]
    base = data.spec.baseline
    out = []
    for arm in diffs.index:
        for m in data.metrics["headline"]:
            if f"{m} diff" not in diffs:
                continue
            d, lo, hi = (_num(diffs, arm, f"{m} {k}") for k in ("diff", "lo", "hi"))
            p, sig = _num(diffs, arm, f"{m} p"), bool(diffs.loc[arm, f"{m} significant"])
            scale = 100.0 if m == "error" else 1.0
            span = f"{d * scale:+.4g} [{lo * scale:+.4g}, {hi * scale:+.4g}]"
            if m == "error":
                span += " points"
            if not sig:
                verdict = "no significant difference"
            else:
                better = (d > 0) == (m in HIGHER_IS_BETTER)
                verdict = "significantly better" if better else "significantly worse"
            out.append(f"**{arm}** vs {base}, {LABELS.get(m, m)}: {span}, p={p:.3g}: {verdict}.")
    return out


def study_plots(data: StudyData, tables: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    """``metrics``: each headline metric per arm with its 95% CI; ``differences``: the paired
    differences to the baseline with CIs (a forest plot; 0 marked)."""
    summary, diffs = tables["summary"], tables["differences"]
    heads = [m for m in data.metrics["headline"] if m in summary]
    if not data.classification:
        heads = ["rmse" if m == "sq_error" else m for m in heads]
    arms = list(summary.index)
    out = {}
    fig, axes = figure(1, len(heads), panel=(3.6, 0.45 * len(arms) + 1.4))
    for ax, m in zip(np.atleast_1d(axes).ravel(), heads, strict=False):
        scale = 100.0 if m in ("error", "test_ece") or m.startswith("coverage") else 1.0
        y = np.arange(len(arms))
        mean = summary[m].to_numpy() * scale
        err = np.stack([mean - summary[m + " lo"] * scale, summary[m + " hi"] * scale - mean])
        for i, arm in enumerate(arms):
            ax.errorbar(
                mean[i], y[i], xerr=err[:, i : i + 1], fmt="o", color=colour(arm, i), capsize=3
            )
        if m == "coverage_95":
            ax.axvline(95.0, color="0.5", ls=":", lw=1)
        ax.set_yticks(y, arms if ax is np.atleast_1d(axes).ravel()[0] else [""] * len(arms))
        ax.invert_yaxis()
        ax.set_xlabel(LABELS.get(m, m) + (" (%)" if scale == 100.0 else ""))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{data.sweep.name}: mean and 95% CI over seeds {data.seeds}")
    out["metrics"] = png(fig)
    dheads = [m for m in data.metrics["headline"] if f"{m} diff" in diffs]
    if len(diffs):
        fig, axes = figure(1, len(dheads), panel=(3.6, 0.45 * len(diffs) + 1.4))
        for ax, m in zip(np.atleast_1d(axes).ravel(), dheads, strict=False):
            scale = 100.0 if m == "error" else 1.0
            d = diffs[f"{m} diff"].to_numpy() * scale
            lo, hi = diffs[f"{m} lo"].to_numpy() * scale, diffs[f"{m} hi"].to_numpy() * scale
            y = np.arange(len(diffs))
            for i, arm in enumerate(diffs.index):
                style = "o"
                face = None if bool(diffs.at[arm, f"{m} significant"]) else "white"
                ax.errorbar(
                    d[i],
                    y[i],
                    xerr=[[d[i] - lo[i]], [hi[i] - d[i]]],
                    fmt=style,
                    color=colour(arm, arms.index(arm)),
                    mfc=face,
                    capsize=3,
                )
            ax.axvline(0.0, color="0.3", lw=1)
            first = ax is np.atleast_1d(axes).ravel()[0]
            ax.set_yticks(y, list(diffs.index) if first else [""] * len(diffs))
            ax.invert_yaxis()
            unit = " (points)" if m == "error" else ""
            ax.set_xlabel(f"{LABELS.get(m, m)} - {data.spec.baseline}{unit}")
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle("paired differences to the baseline, 95% CI (hollow: not significant)")
        out["differences"] = png(fig)
    return out


def write_study_report(
    store: RunStore, sweep: SweepInfo, out_dir: str | Path, *, command: str | None = None
) -> tuple[Path, Path, dict[str, pd.DataFrame]]:
    """report.html / report.md / study_*.csv for the study; returns the paths and tables."""
    data = collect_study(store, sweep)
    tables = study_tables(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(f"Study {sweep.name}", out)
    add_study_sections(report, data, tables, command=command)
    for name, frame in tables.items():
        frame.to_csv(out / f"study_{name}.csv")
    data.runs.to_csv(out / "study_runs.csv", index=False)
    html, md = report.write()
    return html, md, tables


def add_study_sections(
    report: Report, data: StudyData, tables: dict[str, pd.DataFrame], *, command: str | None
) -> None:
    """The protocol, the summary with CIs, the significance statements and the plots."""
    spec = data.spec
    sec = report.section("protocol", "Protocol")
    sec.text(
        f"{len(spec.arms)} arms x {len(data.seeds)} paired seeds {data.seeds} (same data, data "
        "order and initial means per seed across arms). Each tuned arm trained every point of "
        f"its validation grid once with seed {spec.tune_seed}"
        + (f" for {spec.tune_epochs} epochs" if spec.tune_epochs else "")
        + " and kept the point with the lowest validation NLL; every tuned arm had the same "
        "budget. Model selection and early stopping use validation NLL; the test split is "
        "evaluated once per run, on the selected weights, with "
        f"{spec.base.get('eval_samples', 100)} posterior samples."
        + (f"\n\nCommand: `{command}`" if command else "")
    )
    sec.table(tables["settings"], "Arms, tuning budget and the settings chosen on validation")
    if data.tuning is not None:
        sec.table(data.tuning.set_index("arm"), "Tuning runs (validation only)")
    sec = report.section("results", "Results (mean and 95% CI)")
    sec.table(display_summary(data, tables), "Test metrics per arm, mean [95% CI] over seeds")
    plots = study_plots(data, tables)
    sec.image("study_metrics", plots["metrics"], "Mean and 95% CI per arm")
    sec = report.section("significance", f"Differences to {spec.baseline}")
    sec.text(
        "Paired differences (arm minus baseline): bootstrap over seeds and test examples for "
        "per-example metrics, paired t over seeds for ECE, AUROC and ELBO. Significant: the "
        "95% CI excludes 0.\n\n" + "\n".join(f"- {s}" for s in significance_sentences(data, tables))
    )
    if "differences" in plots:
        sec.image("study_differences", plots["differences"], "Paired differences, 95% CI")
    sec = report.section("runs", "Every evaluation run")
    cols = [c for c in data.runs.columns if c in ("arm", "seed", "run_id") or c.startswith("test_")]
    sec.table(
        data.runs[[*cols, "elbo", "best_val_nll", "selected_epoch"]].set_index(["arm", "seed"]),
        "Runs",
    )
