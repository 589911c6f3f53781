"""The demos' own figures (Agg canvases, no pyplot): training curves, predictive bands,
reliability diagrams, entropy histograms, sweep plots, and arms side by side on one shared
y scale. Each returns PNG bytes.

Sizes: a report page shows figures up to ``report.PAGE_PX`` (1400) pixels wide at their own
size, so figures are drawn at :data:`DPI` (100) and at most 14 inches wide: a 10-point label
is then 14 px on screen, not shrunk."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from service.analysis._figure import (
    integer_ticks,
    legend_outside,
    legend_width,
    new_figure,
    style_handle,
    to_png,
)

__all__ = [
    "DPI",
    "figure",
    "plot_entropy_histograms",
    "plot_regression_fit",
    "plot_reliability",
    "plot_side_by_side",
    "plot_training_curves",
    "png",
    "style_handle",
]

DPI = 100
#: One colour per arm of the standard protocol (and the old fixed/learnable pair), so that an
#: arm looks the same in every demo figure; other labels take tab10 by position.
COLOURS = {
    "fixed": "tab:blue",
    "learnable": "tab:orange",
    "fixed N(0,1)": "tab:blue",
    "fixed tuned": "tab:cyan",
    "fixed mixture": "tab:purple",
    "learnable gradient": "tab:orange",
    "EB burn-in": "tab:red",
    "hierarchical scaled": "tab:green",
    "fan-in learnable": "tab:brown",
}


def figure(
    nrows: int, ncols: int, panel: tuple[float, float] = (4.6, 3.2), *, sharey: bool = False
) -> tuple[Figure, Any]:
    fig = Figure(figsize=(panel[0] * ncols + 0.6, panel[1] * nrows + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    return fig, axes


def png(fig: Figure, dpi: int = DPI) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def colour(label: str, i: int) -> Any:
    return COLOURS.get(label, colormaps["tab10"](i % 10))


def plot_training_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]], keys: Sequence[str]
) -> bytes:
    """One panel per metric key (at most 3 a row; 4 as 2 x 2), one line per run, against
    the epoch."""
    ncols = 2 if len(keys) == 4 else min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = figure(nrows, ncols, panel=(4.2, 3.0))
    for j, key in enumerate(keys):
        ax = axes[j // ncols][j % ncols]
        for i, (label, hist) in enumerate(histories.items()):
            xs = [h["epoch"] for h in hist if key in h]
            ys = [h[key] for h in hist if key in h]
            ax.plot(xs, ys, color=colour(label, i), label=label)
        values = np.array([h[key] for hist in histories.values() for h in hist if key in h])
        if values.size and np.all(values > 0) and values.max() / values.min() > 50:
            ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch")
        integer_ticks(ax)
        ax.legend(fontsize=8)
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    return png(fig)


def plot_side_by_side(
    panels: Mapping[str, Callable[[Axes], object]],
    handles: Sequence[Artist],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "epoch",
    log: bool = False,
    ncols: int = 3,
    panel: tuple[float, float] = (3.4, 2.6),
) -> bytes:
    """One panel per arm (``panels[label](ax)`` draws it), side by side, at most ``ncols`` a
    row, every panel on the same x and y scale (y tick labels in the first column only);
    one legend right of the panels from ``handles``."""
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    labels = [str(h.get_label()) for h in handles]
    fig, axes = new_figure(nrows, ncols, panel=panel, right=legend_width(labels), wgap=0.3)
    first = axes[0][0]
    for i, (label, draw) in enumerate(panels.items()):
        ax = axes[i // ncols][i % ncols]
        if ax is not first:
            ax.sharex(first)
            ax.sharey(first)
        draw(ax)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, linewidth=0.5)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        if xlabel.startswith("epoch"):
            integer_ticks(ax)
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if log:
        first.set_yscale("log")
    for i in range(n):
        if i % ncols:  # after the scale: a log scale brings its own (minor) tick labels
            axes[i // ncols][i % ncols].tick_params(axis="y", which="both", labelleft=False)
    legend_outside(fig, handles)
    fig.suptitle(title)
    return to_png(fig, dpi=DPI)


def plot_regression_fit(
    fits: Mapping[str, Mapping[str, np.ndarray]],
    x_train: np.ndarray,
    y_train: np.ndarray,
    truth: tuple[np.ndarray, np.ndarray],
    train_range: tuple[float, float],
) -> bytes:
    """Per model: data, true function, predictive mean, +-2 sigma total and epistemic bands.

    ``fits[label]`` holds ``x``, ``mean``, ``sigma`` (total) and ``epistemic`` (posterior
    spread without the noise), all 1-D over the evaluation grid.
    """
    fig, axes = figure(1, len(fits), panel=(4.2, 3.6), sharey=True)
    rng = np.random.default_rng(0)
    keep = rng.permutation(x_train.size)[:400]
    lo_all = min(float(f["x"].min()) for f in fits.values())
    hi_all = max(float(f["x"].max()) for f in fits.values())
    for i, (label, f) in enumerate(fits.items()):
        ax = axes[0][i]
        c = colour(label, i)
        ax.axvspan(lo_all, train_range[0], color="0.92", zorder=0)
        ax.axvspan(train_range[1], hi_all, color="0.92", zorder=0, label="outside training range")
        ax.scatter(x_train[keep], y_train[keep], s=4, color="0.35", alpha=0.5, label="train data")
        ax.plot(truth[0], truth[1], "k--", linewidth=1, label="true f(x)")
        ax.fill_between(
            f["x"],
            f["mean"] - 2 * f["sigma"],
            f["mean"] + 2 * f["sigma"],
            color=c,
            alpha=0.2,
            linewidth=0,
            label="+-2 sigma (predictive)",
        )
        ax.fill_between(
            f["x"],
            f["mean"] - 2 * f["epistemic"],
            f["mean"] + 2 * f["epistemic"],
            color=c,
            alpha=0.45,
            linewidth=0,
            label="+-2 sigma (epistemic)",
        )
        ax.plot(f["x"], f["mean"], color=c, linewidth=1.5, label="predictive mean")
        spread = float(np.nanmax(np.abs(truth[1]))) * 1.6 + 1
        ax.set_ylim(-spread, spread)
        ax.set_xlim(lo_all, hi_all)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend(fontsize=7, loc="upper left")
    return png(fig)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Equal-width confidence bins: counts, mean confidence and accuracy per bin."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return {"count": count, "accuracy": acc, "confidence": mean_conf, "n_bins": n_bins}


def plot_reliability(
    models: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int = 15
) -> bytes:
    """Reliability diagrams: accuracy against confidence per bin (bars), the diagonal, the
    gap, and the share of examples per bin; ``models[label] = (probs (N, C), labels (N,))``."""
    fig, axes = figure(1, len(models), panel=(4.0, 3.8))
    for i, (label, (probs, labels)) in enumerate(models.items()):
        ax = axes[0][i]
        b = reliability_bins(probs, labels, n_bins)
        edges = np.linspace(0, 1, n_bins + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        ok = b["count"] > 0
        width = 1.0 / n_bins
        acc = np.nan_to_num(b["accuracy"])
        conf = np.nan_to_num(b["confidence"])
        ax.bar(
            centres[ok],
            acc[ok],
            width=width,
            color=colour(label, i),
            alpha=0.8,
            edgecolor="k",
            linewidth=0.5,
            label="accuracy",
        )
        ax.bar(
            centres[ok],
            (conf - acc)[ok],
            bottom=acc[ok],
            width=width,
            color="tab:red",
            alpha=0.3,
            edgecolor="tab:red",
            linewidth=0.5,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        share = b["count"] / max(1.0, b["count"].sum())
        ax2 = ax.twinx()
        ax2.plot(centres, share, "k.:", linewidth=0.8, markersize=3)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("share of examples", fontsize=8)
        ece = float(np.sum(b["count"][ok] * np.abs(conf - acc)[ok]) / max(1.0, b["count"].sum()))
        ax.set_title(f"{label}: ECE {100 * ece:.2f}%", fontsize=10)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    return png(fig)


def plot_entropy_histograms(entropies: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """Predictive entropy per model (panels) and input set (test first, then OOD sets)."""
    fig, axes = figure(1, len(entropies), panel=(4.2, 3.4), sharey=True)
    top = np.log(10.0)
    bins = np.linspace(0, top, 41)
    for i, (label, sets) in enumerate(entropies.items()):
        ax = axes[0][i]
        for j, (name, h) in enumerate(sets.items()):
            ax.hist(
                h,
                bins=bins,
                density=True,
                histtype="step" if j else "stepfilled",
                alpha=1.0 if j else 0.35,
                linewidth=1.4,
                color=colormaps["tab10"](j),
                label=name,
            )
        ax.set_yscale("log")
        ax.set_title(f"{label}: predictive entropy", fontsize=10)
        ax.set_xlabel("entropy (nats; max log 10 = 2.30)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    return png(fig)
