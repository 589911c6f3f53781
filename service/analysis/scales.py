"""Why a learnable prior underfits: the prior's scale against the posteriors' scales.

Fitting one prior N(mu_p, sigma_p^2) per layer by the ELBO under a mean-field posterior
drives sigma_p towards the empirical-Bayes value sqrt(mean(sigma_i^2 + (mu_i - mu_p)^2)),
which the posterior noise sigma_i soon dominates; the KL then pulls the means mu_i to
zero like strong weight decay. :func:`scale_diagnostics` tabulates, per layer and epoch,
the prior sigma, the posterior sigmas (RMS and median), the RMS of the means and the
ratio of the prior sigma to its empirical-Bayes value (1.0 = the fixed point);
:func:`plot_scale_diagnostics` draws the first three, one panel per layer, for one run or
several overlaid.

Statistics are exact, in float64, over all valid elements (finite mu and sigma, sigma > 0;
the others are counted in ``non-finite``), one layer's arrays in memory at a time.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from trainer.errors import BnnError

from ._figure import check_count, new_figure, to_png
from ._multi import open_sources
from ._numeric import TB_PERCENTILES
from .plots_runs import _as_group, _colours
from .source import ParamKind, RunLike, open_source, parse_enum
from .summary import PERCENTILES, SUMS, ParamSummary, frame_from_rows, iter_summaries

__all__ = ["SCALE_COLUMNS", "plot_scale_diagnostics", "scale_diagnostics"]

#: Columns of :func:`scale_diagnostics`.
SCALE_COLUMNS = (
    "prior sigma",
    "posterior sigma (RMS)",
    "posterior sigma (median)",
    "mean RMS",
    "prior / EB sigma",
    "non-finite",
)
_MEDIAN = TB_PERCENTILES.index(50.0)
_NAN = float("nan")
# (column, legend text, line style, marker) of the plotted quantities
_LINES: tuple[tuple[str, str, Literal["-", "--", ":"], str], ...] = (
    ("prior sigma", "prior sigma", "-", "o"),
    ("posterior sigma (RMS)", "posterior sigma (RMS)", "--", "s"),
    ("mean RMS", "RMS of posterior means", ":", "^"),
)


def _scale_row(s: ParamSummary) -> dict[str, Any]:
    n = s.n
    if n == 0:
        values = (s.prior_sigma, _NAN, _NAN, _NAN, _NAN, s.nonfinite)
        return dict(zip(SCALE_COLUMNS, values, strict=True))
    sums = s.sums
    assert sums is not None and s.sigma_percentiles is not None
    mean_variance = sums.sum_variance / n  # mean sigma_i^2
    mean_mu_sq = sums.mu.m2 / n + sums.mu.mean**2  # mean mu_i^2
    # the empirical-Bayes prior: mu_p = mean mu_i, sigma_p^2 = mean sigma_i^2 + var mu_i
    eb_sigma = math.sqrt(mean_variance + sums.mu.m2 / n)
    return {
        "prior sigma": s.prior_sigma,
        "posterior sigma (RMS)": math.sqrt(mean_variance),
        "posterior sigma (median)": float(s.sigma_percentiles[_MEDIAN]),
        "mean RMS": math.sqrt(mean_mu_sq),
        "prior / EB sigma": s.prior_sigma / eb_sigma if eb_sigma > 0 else _NAN,
        "non-finite": s.nonfinite,
    }


def scale_diagnostics(
    run: RunLike,
    epochs: Sequence[int] | None = None,
    *,
    param: str = "weight",
    layers: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """Prior and posterior scales of each layer's ``param`` ("weight" or "bias") over epochs.

    Returns a DataFrame indexed by (layer, epoch) with :data:`SCALE_COLUMNS`:
    ``prior sigma`` (the layer's shared prior), ``posterior sigma (RMS)`` =
    sqrt(mean sigma_i^2), ``posterior sigma (median)``, ``mean RMS`` = sqrt(mean mu_i^2),
    ``prior / EB sigma`` = prior sigma / sqrt(mean(sigma_i^2 + (mu_i - mean mu)^2)) (1.0:
    the empirical-Bayes fixed point, as ``trainer.priors.GaussianPrior.empirical_bayes_``;
    with means centred on 0 the denominator is sqrt(mean(sigma_i^2 + mu_i^2))) and
    ``non-finite`` (elements left out). Layers without ``param`` are skipped unless named
    (then NOT_FOUND).

    >>> scale_diagnostics(distribution_log, layers="layer1")        # doctest: +SKIP
    """
    kind = parse_enum(ParamKind, param, "param").value
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        for epoch, layer, sums in iter_summaries(
            src, src.resolve_epochs(epochs), layers, parts=(SUMS, PERCENTILES), params=(kind,)
        ):
            s = sums[kind]
            if s is None:
                if layers is not None:
                    raise BnnError.not_found(
                        f"layer {layer!r} has no {kind}", layer=layer, param=kind
                    )
                continue
            rows.setdefault(layer, {})[epoch] = _scale_row(s)
        if not rows:
            raise BnnError.not_found(f"run {src.name!r} has no layer with a {kind}", param=kind)
    ordered = {(layer, e): row for layer, per in rows.items() for e, row in sorted(per.items())}
    return frame_from_rows(ordered, ["layer", "epoch"])


def _limits(tables: list[tuple[str, pd.DataFrame]], headroom: float) -> tuple[float, float] | None:
    """Common log-axis limits of the plotted columns (positive finite values) of all runs,
    the top ``headroom`` fraction of the axis left free for the ratio's text."""
    cols = [c for c, *_ in _LINES]
    values = np.concatenate([t[cols].to_numpy(np.float64).ravel() for _, t in tables])
    values = values[np.isfinite(values) & (values > 0)]
    if not values.size:
        return None
    lo, hi = math.log(float(values.min()) / 1.5), math.log(float(values.max()) * 1.5)
    return math.exp(lo), math.exp(hi + (hi - lo) * headroom / (1 - headroom))


def _ratio_text(tables: list[tuple[str, pd.DataFrame]], layer: str) -> str:
    """prior / EB sigma at each run's last epoch of ``layer``, wrapped for a panel."""
    multi = len(tables) > 1
    ratios = []
    for label, table in tables:
        if layer in table.index.get_level_values("layer"):
            part = table.xs(layer, level="layer")
            ratio = float(part["prior / EB sigma"].iloc[-1])
            ratios.append(f"{label} {ratio:.3g}" if multi else f"{ratio:.3g}")
    return textwrap.fill("prior / EB sigma at the last epoch: " + ", ".join(ratios), 52)


def plot_scale_diagnostics(
    runs: RunLike | Mapping[str, RunLike] | Sequence[RunLike],
    epochs: Sequence[int] | None = None,
    *,
    param: str = "weight",
    layers: str | Sequence[str] | None = None,
    title: str | None = None,
    save: str | Path | None = None,
    dpi: int = 100,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> bytes:
    """Prior sigma, posterior sigma (RMS) and RMS of the means over epochs, one panel per
    layer, log y axis shared by all panels (the table is :func:`scale_diagnostics`).

    ``runs`` is one run, or ``{label: run}`` / a list of runs to overlay: line style and
    marker per quantity, colour per run. Each panel states prior / EB sigma at the
    last epoch (1.0: the empirical-Bayes fixed point, where the KL acts as weight decay).
    """
    group = _as_group(runs)
    with open_sources(group, data_dir=data_dir, db_url=db_url) as named:
        tables = [
            (label, scale_diagnostics(src, epochs, param=param, layers=layers))
            for label, src in named
        ]
    names = list(dict.fromkeys(n for _, t in tables for n in t.index.get_level_values("layer")))
    check_count(len(names), 16, "layers", "choose some with layers=")
    ncols = min(len(names), 3)
    nrows = -(-len(names) // ncols)
    fig, axes = new_figure(nrows, ncols, panel=(4.2, 3.0), right=2.1)
    multi = len(tables) > 1
    colours = _colours(max(len(tables), len(_LINES)))
    texts = [_ratio_text(tables, layer) for layer in names]
    lines = max(t.count("\n") + 1 for t in texts)
    limits = _limits(tables, min(0.05 + 0.05 * lines, 0.6))
    for k, layer in enumerate(names):
        ax = axes[k // ncols][k % ncols]
        for r, (_, table) in enumerate(tables):
            if layer not in table.index.get_level_values("layer"):
                continue
            part = table.xs(layer, level="layer")
            for q, (col, _, style, marker) in enumerate(_LINES):
                ax.plot(
                    part.index,
                    part[col].to_numpy(np.float64),
                    style,
                    color=colours[r if multi else q],
                    marker=marker,
                    markersize=4,
                    linewidth=1.4,
                )
        ax.set_yscale("log")
        if limits is not None:
            ax.set_ylim(*limits)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
        ax.text(0.02, 0.97, texts[k], transform=ax.transAxes, va="top", fontsize=8)
        ax.set_title(f"{layer}.{param}", fontsize=9)
        ax.set_xlabel("epoch")
        if k % ncols == 0:
            ax.set_ylabel(f"{param} scale: sigma or RMS(mu)")
    for k in range(len(names), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    handles: list[Any] = [
        Line2D([], [], linestyle=style, marker=marker, color="black" if multi else colours[q])
        for q, (_, _, style, marker) in enumerate(_LINES)
    ]
    if multi:
        handles += [Line2D([], [], color=colours[r], linewidth=3) for r in range(len(tables))]
    labels = [text for _, text, *_ in _LINES] + ([label for label, _ in tables] if multi else [])
    width, height = fig.get_size_inches()
    fig.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1 - 2.0 / width, 1 - 0.65 / height),
        fontsize=8,
        frameon=False,
        title="line: quantity" + ("\ncolour: run" if multi else ""),
        title_fontsize=8,
    )
    if title is None:
        who = "runs overlaid" if multi else tables[0][0]
        title = f"{who}: learned prior sigma vs posterior scales ({param})"
    fig.suptitle(title)
    return to_png(fig, save, dpi)
