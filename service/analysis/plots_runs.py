"""Trajectory and cross-run plots: KL over epochs, prior trajectories, gradient magnitudes,
the width study. Each returns PNG bytes (and saves them on request)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.ticker import NullFormatter

from trainer.errors import BnnError
from trainer.snapshot import EpochSnapshot

from ._figure import (
    LINESTYLES,
    MARKERS,
    integer_ticks,
    legend_outside,
    legend_width,
    log_if_wide,
    new_figure,
    style_handle,
    to_png,
)
from ._multi import open_sources
from .compare import width_study
from .gradients import GradThresholds, iter_grad_summaries
from .kl import kl_tables
from .source import RunLike, open_source
from .stats import prior_trajectories
from .summary import PARAMS

__all__ = [
    "plot_gradient_magnitudes",
    "plot_kl_over_epochs",
    "plot_prior_trajectories",
    "plot_width_study",
]


def _colours(n: int) -> Any:
    return colormaps["tab10"](np.arange(n) % 10)


def plot_kl_over_epochs(
    run: RunLike,
    epochs: Sequence[int] | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    save: str | Path | None = None,
    dpi: int = 100,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> bytes:
    """Left: KL(posterior || layer prior) per element, per layer over epochs; right: the
    average pairwise symmetric KL within each layer. Colour: layer; solid: weights, dashed:
    biases (the legend, right of the panels, shows both)."""
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        prior, pair = kl_tables(src, epochs, layers=layers)
        name = src.name
    names = list(dict.fromkeys(prior.index.get_level_values("layer")))
    colours = _colours(len(names))
    handles = [style_handle(layer, color=colours[i]) for i, layer in enumerate(names)]
    handles += [
        style_handle(text, linestyle=style, marker=".")
        for text, style in zip(("weights", "biases"), LINESTYLES, strict=False)
    ]
    fig, axes = new_figure(
        1, 2, panel=(5.2, 3.6), right=legend_width([str(h.get_label()) for h in handles])
    )
    for ax, table, suffix, title in (
        (axes[0][0], prior, "KL per element", "KL(posterior || layer prior) per element"),
        (axes[0][1], pair, "KL Average", "mean pairwise symmetric KL within the layer"),
    ):
        for i, layer in enumerate(names):
            part = table.xs(layer, level="layer")
            for p, style in zip(PARAMS, LINESTYLES, strict=False):
                y = part[f"{p.capitalize()} {suffix}"].to_numpy(np.float64)
                if np.isfinite(y).any():
                    ax.plot(
                        part.index, y, style, color=colours[i], marker=".", label=f"{layer}.{p}"
                    )
        log_if_wide(
            ax, table[[c for c in table.columns if c.endswith(suffix)]].to_numpy(np.float64)
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        integer_ticks(ax)
        ax.set_ylabel("KL (nats)")
    legend_outside(fig, handles)
    fig.suptitle(f"{name}: KL over epochs (solid: weights, dashed: biases)")
    return to_png(fig, save, dpi)


def plot_prior_trajectories(
    runs: RunLike | Mapping[str, RunLike] | Sequence[RunLike],
    epochs: Sequence[int] | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    param: str = "weight",
    save: str | Path | None = None,
    dpi: int = 100,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> bytes:
    """The learned prior mu (left) and sigma (right) of each layer over epochs.

    ``runs`` is one run, or ``{label: run}`` / a list of runs to overlay (one colour per
    layer; one line style and marker per run, later runs drawn on top and translucent so
    that equal trajectories, such as a fixed prior and a learnable one that has not moved
    yet, stay visible). The legend, right of the panels, shows the colours and the runs'
    line styles; the title names the runs.
    """
    group = _as_group(runs)
    col = param.capitalize()
    with open_sources(group, data_dir=data_dir, db_url=db_url) as named:
        tables = [(label, prior_trajectories(src, epochs, layers=layers)) for label, src in named]
    names = list(dict.fromkeys(n for _, t in tables for n in t.index.get_level_values("layer")))
    colours = _colours(len(names))
    many = len(tables) > 1
    handles = [style_handle(layer, color=colours[i]) for i, layer in enumerate(names)]
    if many:
        handles += [
            style_handle(label, linestyle=LINESTYLES[r % 4], marker=MARKERS[r % 4], filled=r == 0)
            for r, (label, _) in enumerate(tables)
        ]
    fig, axes = new_figure(
        1, 2, panel=(5.2, 3.6), right=legend_width([str(h.get_label()) for h in handles])
    )
    for ax, stat in ((axes[0][0], "mu"), (axes[0][1], "sigma")):
        for r, (label, table) in enumerate(tables):
            for i, layer in enumerate(names):
                if layer not in table.index.get_level_values("layer"):
                    continue
                part = table.xs(layer, level="layer")
                ax.plot(
                    part.index,
                    part[f"{col} prior {stat}"],
                    LINESTYLES[r % 4],
                    color=colours[i],
                    marker=MARKERS[r % 4] if many else ".",
                    markersize=5 if many else 6,
                    markerfacecolor="none" if r else colours[i],
                    alpha=0.75 if r else 1.0,
                    zorder=2 + r,
                    label=f"{label}/{layer}" if many else layer,
                )
        if stat == "sigma":
            log_if_wide(
                ax,
                np.concatenate([t[f"{col} prior sigma"].to_numpy(np.float64) for _, t in tables]),
            )
        ax.set_title(f"{param} prior {stat} per layer", fontsize=9)
        ax.set_xlabel("epoch")
        integer_ticks(ax)
        ax.set_ylabel(f"prior {stat}")
    legend_outside(fig, handles, title="line style: run" if many else None)
    runs_txt = ", ".join(label for label, _ in tables)
    fig.suptitle(f"{runs_txt}: layer priors over epochs")
    return to_png(fig, save, dpi)


def _as_group(runs: Any) -> Mapping[str, RunLike] | Sequence[RunLike]:
    """``{label: run}`` (string keys) and lists of runs stay groups; anything else is one run."""
    if isinstance(runs, Mapping):
        return runs if runs and all(isinstance(k, str) for k in runs) else [runs]
    if isinstance(runs, list | tuple) and not all(isinstance(r, EpochSnapshot) for r in runs):
        return runs
    return [runs]


def plot_gradient_magnitudes(
    run: RunLike,
    epochs: Sequence[int] | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    param: str = "weight",
    grad_param: str = "mu",
    stat: str = "mean_abs",
    save: str | Path | None = None,
    dpi: int = 100,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> bytes:
    """Gradient magnitude per layer over epochs.

    Left: each layer's gradient L2 norm at every recorded step (x = epoch + step fraction).
    Right: median (solid) and max (dotted) of the per-element |g| statistic per layer and
    epoch; red crosses mark epochs where some element had a non-finite gradient.
    """
    th = GradThresholds(param, grad_param, stat)
    series: dict[str, list[tuple[int, Any]]] = {}
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        # peak=False: the largest single-step |g| is not drawn, so max_abs is not read
        for e, layer, s, _ in iter_grad_summaries(
            src, src.resolve_epochs(epochs), layers, th, flags=False, peak=False
        ):
            series.setdefault(layer, []).append((e, s))
        name = src.name
        if not series:
            raise BnnError.not_found(f"run {name!r} has no gradient statistics in those epochs")
    colours = _colours(len(series))
    handles = [style_handle(layer, color=colours[i]) for i, layer in enumerate(series)]
    handles += [
        style_handle("median |g| (right)", marker="."),
        style_handle("max |g| (right)", linestyle=":"),
    ]
    if any(s.nonfinite_elements > 0 for items in series.values() for _, s in items):
        handles.append(
            style_handle("non-finite (right)", color="red", linestyle="none", marker="x")
        )
    fig, axes = new_figure(
        1, 2, panel=(5.2, 3.6), right=legend_width([str(h.get_label()) for h in handles])
    )
    left, right = axes[0][0], axes[0][1]
    for i, (layer, items) in enumerate(series.items()):
        xs, ys = [], []
        for e, s in items:
            k = s.step_norm.size
            xs += [e + np.arange(k) / max(k, 1), [np.nan]]  # NaN: no line across epochs
            ys += [s.step_norm, [np.nan]]
        if xs:
            left.plot(
                np.concatenate(xs), np.concatenate(ys), color=colours[i], linewidth=0.8, label=layer
            )
        es = np.array([e for e, _ in items])
        right.plot(
            es,
            [s.median_abs for _, s in items],
            "-",
            color=colours[i],
            marker=".",
            label=f"{layer} median",
        )
        right.plot(es, [s.max_stat for _, s in items], ":", color=colours[i], label=f"{layer} max")
        bad = np.array([s.nonfinite_elements > 0 for _, s in items])
        if bad.any():
            right.plot(
                es[bad],
                [s.max_stat for _, s in np.array(items, dtype=object)[bad]],
                "x",
                color="red",
                markersize=8,
                label=f"{layer} non-finite",
            )
    left.set_yscale("log")
    right.set_yscale("log")
    left.set_title("per-step gradient L2 norm of each layer", fontsize=9)
    left.set_xlabel("epoch (+ step fraction)")
    left.set_ylabel("||g||")
    right.set_title(f"{param}.{grad_param} |g| ({stat}) per element", fontsize=9)
    right.set_xlabel("epoch")
    right.set_ylabel("|g|")
    for ax in (left, right):
        integer_ticks(ax)
    legend_outside(fig, handles)
    fig.suptitle(f"{name}: gradient magnitudes")
    return to_png(fig, save, dpi)


def plot_width_study(
    runs: Mapping[str, RunLike] | Sequence[RunLike],
    epoch: int | None = None,
    *,
    widths: Mapping[str, float] | None = None,
    param: str = "weight",
    save: str | Path | None = None,
    dpi: int = 100,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> bytes:
    """Learned prior sigma (left) and mu (right) against network width, one line per layer
    (the table is :func:`~service.analysis.compare.width_study`, which needs runs of at least
    two different widths)."""
    table = width_study(runs, epoch, widths=widths, data_dir=data_dir, db_url=db_url)
    col = param.capitalize()
    names = list(dict.fromkeys(table.index.get_level_values("layer")))
    colours = _colours(len(names))
    handles = [style_handle(layer, color=colours[i], marker="o") for i, layer in enumerate(names)]
    fig, axes = new_figure(
        1,
        2,
        panel=(5.2, 3.6),
        right=legend_width([str(h.get_label()) for h in handles]),
        wgap=1.2,  # room for the right panel's tick labels of small prior means
    )
    for ax, stat in ((axes[0][0], "sigma"), (axes[0][1], "mu")):
        for i, layer in enumerate(names):
            part = table[table.index.get_level_values("layer") == layer].sort_values("width")
            ax.plot(part["width"], part[f"{col} prior {stat}"], "-o", color=colours[i], label=layer)
        ax.set_xscale("log")
        ticks = sorted({int(w) for w in table["width"] if np.isfinite(w) and w > 0})
        if ticks:  # the widths themselves as plain numbers, no log-scale minor labels
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"learned {param} prior {stat} vs width", fontsize=9)
        ax.set_xlabel("network width (hidden units)")
        ax.set_ylabel(f"prior {stat}")
    legend_outside(fig, handles)
    runs_txt = ", ".join(dict.fromkeys(table.index.get_level_values("run")))
    fig.suptitle(f"width study: {runs_txt}")
    return to_png(fig, save, dpi)
