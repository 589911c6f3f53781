"""Study tables and plots of a finished sweep (width or optimiser), from its stored runs.

status = sweep_status(store, sweep)          # runs, statuses, counts, done
table = study_table(store, sweep)            # DataFrame; completed runs only
plots = study_plots(store, sweep, table)     # {name: PNG bytes}
write_study_report(store, sweep, "out/")     # report.html/.md, study.csv, img/
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps

from service.analysis import (
    compute_layer_kl_divergences,
    gradient_diagnostics,
    plot_width_study,
    width_study,
)
from service.demo._plots import colour, figure, png
from service.demo.report import Report
from service.demo.sweeps import SweepKind, SweepSpec
from trainer.config import parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore, SweepInfo

__all__ = ["study_plots", "study_table", "sweep_status", "write_study_report"]

FACTORS = ["optimizer", "grad_clip", "kl_anneal_epochs", "lr_schedule", "prior"]


def sweep_status(store: RunStore, sweep: SweepInfo) -> dict[str, Any]:
    """Each run's label, id, status, error and last metrics; counts per status; ``done``
    when no run is queued or running."""
    runs: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for label, run_id in sweep.runs:
        try:
            run = store.get_run(run_id)
        except BnnError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
            continue
        epochs = store.list_epochs(run_id)
        runs.append(
            {
                "label": label,
                "run_id": run_id,
                "status": run.status.value,
                "error": run.error,
                "epochs": len(epochs),
                "metrics": dict(epochs[-1].metrics) if epochs else {},
            }
        )
        counts[run.status.value] = counts.get(run.status.value, 0) + 1
    done = bool(runs) and not any(RunStatus(r["status"]).active for r in runs)
    return {"runs": runs, "counts": counts, "done": done}


def _completed(store: RunStore, sweep: SweepInfo) -> dict[str, str]:
    done = {
        label: run_id
        for label, run_id in sweep.runs
        if store.get_run(run_id).status is RunStatus.COMPLETED and store.list_epochs(run_id)
    }
    if not done:
        raise BnnError(ErrorCode.CONFLICT, f"sweep {sweep.id!r} has no completed run yet")
    return done


def _main_metric(store: RunStore, run_id: str) -> tuple[str, float, str]:
    cfg = parse_config(store.get_run(run_id).config)
    key = "test_acc" if cfg.is_classification else "test_rmse"
    last = store.list_epochs(run_id)[-1].metrics
    return key, float(last.get(key, math.nan)), cfg.prior.value


def width_table(store: RunStore, sweep: SweepInfo) -> pd.DataFrame:
    """:func:`~service.analysis.width_study` of the completed runs, with the prior, the
    layer's average pairwise KL and the final test metric; indexed by (run, layer)."""
    runs = _completed(store, sweep)
    readers = {label: store.reader(run_id) for label, run_id in runs.items()}
    try:
        table = width_study(readers, min_widths=1)  # runs of one width completed: still a table
        extra = {}
        for label, reader in readers.items():
            key, value, prior = _main_metric(store, runs[label])
            kl = compute_layer_kl_divergences(reader)
            for layer in kl.index:
                extra[(label, layer)] = {
                    "prior": prior,
                    "Weight KL Average (pairwise)": kl.loc[layer, "Weight KL Average"],
                    key: value,
                }
    finally:
        for reader in readers.values():
            reader.close()
    table = table.join(pd.DataFrame.from_dict(extra, orient="index").rename_axis(table.index.names))
    return table.sort_values(["prior", "width"], kind="stable")


def _epochs_to(store: RunStore, run_id: str, key: str, target: float) -> float:
    """First epoch (1-based) whose validation metric reaches the target (the test split is
    evaluated once, at the end, so the per-epoch curve is the validation one)."""
    better = (lambda v: v >= target) if key.endswith("acc") else (lambda v: v <= target)
    for info in store.list_epochs(run_id):
        value = info.metrics.get(key)
        if value is not None and math.isfinite(value) and better(value):
            return float(info.epoch + 1)
    return math.nan


def optim_table(store: RunStore, sweep: SweepInfo) -> pd.DataFrame:
    """One row per completed run: its factors, final metrics, epochs to the target and the
    flagged gradient elements per layer at the last epoch."""
    spec = SweepSpec.model_validate(sweep.spec)
    target = spec.target_value()
    rows: dict[str, dict[str, Any]] = {}
    for label, run_id in _completed(store, sweep).items():
        cfg = store.get_run(run_id).config
        key, value, _ = _main_metric(store, run_id)
        last = store.list_epochs(run_id)[-1].metrics
        row = {f: cfg.get(f) for f in FACTORS} | {"lr": cfg.get("lr"), key: value}
        row |= {m: last.get(m, math.nan) for m in ("test_nll", "test_ece", "loss") if m in last}
        val_key = key.replace("test_", "val_")
        sign = ">=" if key == "test_acc" else "<="
        row[f"epochs to {val_key} {sign} {target:g}"] = _epochs_to(store, run_id, val_key, target)
        row["grad_clip"] = "off" if row["grad_clip"] is None else row["grad_clip"]
        if cfg.get("grad_capture", "element") != "none":
            with store.reader(run_id) as reader:
                diag = gradient_diagnostics(reader, [reader.epochs[-1]]).droplevel("epoch")
            for layer, d in diag.iterrows():
                row[f"exploding {layer}"] = int(d["exploding"])
            row["vanishing (all layers)"] = int(diag["vanishing"].sum())
            row["non-finite steps"] = int(diag["non-finite steps"].sum())
        rows[label] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "run"
    return frame


def study_table(store: RunStore, sweep: SweepInfo) -> pd.DataFrame:
    """The study table of a sweep's completed runs (CONFLICT when none has completed)."""
    if sweep.kind == SweepKind.WIDTH.value:
        return width_table(store, sweep)
    return optim_table(store, sweep)


def main_effects(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean of ``metric`` per level of each factor (what a fractional design estimates)."""
    rows = {}
    for factor in FACTORS:
        for level, part in table.groupby(table[factor].astype(str)):
            rows[(factor, level)] = {metric: part[metric].mean(), "runs": len(part)}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.names = ["factor", "level"]
    return frame


def _metric_of(table: pd.DataFrame) -> str:
    return "test_acc" if "test_acc" in table.columns else "test_rmse"


def _optim_plot(table: pd.DataFrame) -> bytes:
    metric = _metric_of(table)
    cells = [label.rsplit("/", 1)[0] for label in table.index]
    order = list(dict.fromkeys(cells))
    target_col = next(c for c in table.columns if c.startswith("epochs to"))
    explode = table[[c for c in table.columns if c.startswith("exploding ")]].sum(axis=1)
    panels = [
        (metric, table[metric]),
        (target_col, table[target_col]),
        ("exploding elements (all layers)", explode),
    ]
    fig, axes = figure(len(panels), 1, panel=(max(6.0, 0.45 * len(order)), 2.6))
    x = np.arange(len(order))
    for ax, (title, values) in zip(axes[:, 0], panels, strict=True):
        for i, prior in enumerate(("fixed", "learnable")):
            sel = (table["prior"] == prior).to_numpy()
            pos = x[[order.index(c) for c, s in zip(cells, sel, strict=True) if s]]
            y = values[sel].to_numpy(np.float64)
            ax.bar(pos + (i - 0.5) * 0.4, np.nan_to_num(y), width=0.4, color=colour(prior, i),
                   label=f"{prior} prior")  # fmt: skip
            missing = ~np.isfinite(y)
            if missing.any():
                ax.plot(pos[missing] + (i - 0.5) * 0.4, np.zeros(missing.sum()), "kx",
                        label="not reached" if i == 0 else None)  # fmt: skip
        finite = values.to_numpy(np.float64)[np.isfinite(values.to_numpy(np.float64))]
        if title == metric and finite.size and finite.min() > 0:
            spread = max(float(finite.max() - finite.min()), 1e-3 * float(finite.max()))
            ax.set_ylim(max(0.0, float(finite.min()) - spread), float(finite.max()) + 0.3 * spread)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, order, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    return png(fig)


def _width_plot(table: pd.DataFrame) -> bytes:
    metric = _metric_of(table)
    cols = ["Weight sigma mean", "Weight KL per element", "Weight KL Average (pairwise)", metric]
    fig, axes = figure(1, len(cols), panel=(3.6, 3.0))
    flat = table.reset_index()
    layers = list(dict.fromkeys(flat["layer"]))
    widths = sorted(set(flat["width"]))
    for ax, col in zip(axes[0], cols, strict=True):
        if col == metric:  # one value per run: one line per prior kind
            for i, (prior, part) in enumerate(flat.groupby("prior")):
                part = part.drop_duplicates("run").sort_values("width")
                ax.plot(
                    part["width"],
                    part[col],
                    "-o",
                    color=colour(str(prior), i),
                    label=f"{prior} prior",
                    markersize=3,
                )
        else:
            for (kind, layer), group in flat.groupby(["prior", "layer"]):
                part = group.sort_values("width")
                ax.plot(
                    part["width"],
                    part[col],
                    "-o" if kind == "learnable" else "--s",
                    color=colormaps["tab10"](layers.index(layer) % 10),
                    label=f"{layer} ({kind})",
                    markersize=3,
                )
        ax.set_xscale("log")
        ax.set_xticks(widths, [f"{w:g}" for w in widths], fontsize=7)
        ax.minorticks_off()
        ax.set_title(f"{col} vs width", fontsize=9)
        ax.set_xlabel("width")
        ax.legend(fontsize=6)
    return png(fig)


def study_plots(store: RunStore, sweep: SweepInfo, table: pd.DataFrame) -> dict[str, bytes]:
    """``width_priors`` (learned prior vs width, per prior kind) and ``width_posteriors``, or
    ``optim`` (final metric, epochs to target, exploding counts; fixed vs learnable)."""
    if sweep.kind == SweepKind.OPTIM.value:
        return {"optim": _optim_plot(table)}
    runs = dict(sweep.runs)
    plots = {"width_posteriors": _width_plot(table)}
    for prior, part in table.reset_index().groupby("prior"):
        if part["width"].nunique() < 2:
            continue  # a line against width needs two widths
        labels = list(dict.fromkeys(part["run"]))
        readers = {label: store.reader(runs[label]) for label in labels}
        try:
            plots[f"width_priors_{prior}"] = plot_width_study(readers, dpi=80)
        finally:
            for reader in readers.values():
                reader.close()
    return plots


def write_study_report(store: RunStore, sweep: SweepInfo, out_dir: str | Path) -> Report:
    """``report.html``/``report.md`` with the status, the study table and plots, plus
    ``study.csv``, in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    status = sweep_status(store, sweep)
    spec = SweepSpec.model_validate(sweep.spec)
    report = Report(f"Sweep {sweep.name} ({sweep.kind})", out, intro=_intro(spec, sweep, status))
    sec = report.section("runs", "Runs")
    sec.table(
        pd.DataFrame(status["runs"]).drop(columns=["metrics"]).set_index("label"),
        "runs and statuses",
    )
    table = study_table(store, sweep)
    table.to_csv(out / "study.csv")
    sec = report.section("study", "Study table")
    sec.table(table, "completed runs")
    if sweep.kind == SweepKind.OPTIM.value:
        metric = _metric_of(table)
        sec.table(main_effects(table, metric), f"main effects: mean {metric} per factor level")
        sec.table(_prior_deltas(table, metric), f"learnable minus fixed {metric}, per cell")
    sec = report.section("plots", "Plots")
    for name, data in study_plots(store, sweep, table).items():
        sec.image(name, data, name.replace("_", " "))
    report.write()
    return report


def _prior_deltas(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    cells: dict[str, dict[str, float]] = {}
    for label, value in table[metric].items():
        cell, prior = str(label).rsplit("/", 1)
        cells.setdefault(cell, {})[prior] = float(value)
    rows = {
        c: v | {"learnable - fixed": v.get("learnable", math.nan) - v.get("fixed", math.nan)}
        for c, v in cells.items()
    }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "cell"
    return frame


def _intro(spec: SweepSpec, sweep: SweepInfo, status: Mapping[str, Any]) -> str:
    base = spec.base_config()
    counts = ", ".join(f"{n} {s}" for s, n in sorted(status["counts"].items()))
    text = (
        f"Sweep `{sweep.id}`: {len(sweep.runs)} runs ({counts}) of {base.dataset.value}, "
        f"{base.epochs} epochs, base widths {base.hidden}."
    )
    if spec.kind is SweepKind.OPTIM:
        text += (
            f" Design: {spec.design} factorial over optimizer x grad clipping x KL annealing x "
            f"lr schedule x prior; target {spec.target_value():g}."
        )
    return text
