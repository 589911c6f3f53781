"""The seed's plots, made to scale: chosen parameters' evolution, one epoch's distributions,
and percentile bands over epochs. Each returns PNG bytes (and saves them on request).

Whole layers are never drawn one figure per weight: evolution plots show chosen elements
(explicit ``(layer, index)`` or the top-k by a criterion); epoch plots draw a stated random
subset of curves beside histograms of all mu's and sigma's; bands summarise every element.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from trainer.errors import BnnError

from ._cache import cached
from ._figure import (
    EVOLUTION_CMAP,
    EVOLUTION_CMAP_TEXT,
    check_count,
    gaussian_pdf,
    histogram_bins,
    integer_ticks,
    legend_outside,
    legend_width,
    log_if_wide,
    new_figure,
    to_png,
)
from ._numeric import top_k as top_k_indices
from ._numeric import valid_mask
from .outliers import gradient_outliers
from .source import DistType, EpochView, RunLike, RunSource, open_source, parse_enum
from .stats import PERCENTILE_COLUMNS, percentile_bands
from .summary import PARAMS, select_layers

__all__ = ["plot_epoch_distributions", "plot_params_log_distributions", "plot_percentile_bands"]

_CRITERIA = ("mu_change", "sigma", "gradient")
_CURVE_COLOUR = "tab:blue"
# Percentile bands, outside in: (low, high) columns of PERCENTILE_COLUMNS, and their names.
_BANDS = ((0, 8), (1, 7), (2, 6), (3, 5))
_BAND_LABELS = tuple(
    f"p{PERCENTILE_COLUMNS[lo][1:]}-p{PERCENTILE_COLUMNS[hi][1:]}" for lo, hi in _BANDS
)
Element = tuple[str, tuple[int, ...]]


def _check_param(param: str) -> str:
    if param not in PARAMS:
        raise BnnError.invalid(
            f"param must be one of {list(PARAMS)}, got {param!r}", param=str(param)
        )
    return param


def _valid_indices(shape: tuple[int, ...]) -> str:
    """What indices of an array of ``shape`` look like, for an error message."""
    size = int(np.prod(shape, dtype=np.int64))
    if size == 0:
        return "it has no elements"
    flat = f"a flat index 0..{size - 1}"
    if len(shape) < 2:
        return f"give {flat}"
    names = "ijklmn"[: len(shape)]
    ranges = ", ".join(f"{n} < {d}" for n, d in zip(names, shape, strict=False))
    return f"give {flat} or a tuple ({', '.join(names)}) with {ranges}"


def _explicit(view: EpochView, params: Sequence[Any], param: str) -> list[Element]:
    out: list[Element] = []
    for item in params:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise BnnError.invalid(f"params entries must be (layer, index), got {item!r}")
        layer, index = item
        view.check_layer(layer)
        shape = np.shape(view.array(layer, "posterior", param, "mu"))
        try:
            idx = np.unravel_index(int(index), shape) if np.ndim(index) == 0 else tuple(index)
            np.ravel_multi_index(tuple(int(i) for i in idx), shape)
        except (ValueError, TypeError) as exc:
            raise BnnError.invalid(
                f"index {index!r} is not in {layer}.{param} of shape {shape}: "
                f"{_valid_indices(shape)}",
                layer=layer,
                index=str(index),
            ) from exc
        out.append((layer, tuple(int(i) for i in idx)))
    return out


def _by_criterion(
    src: RunSource, epochs: list[int], layers: list[str], param: str, criterion: str, k: int
) -> list[Element]:
    if criterion == "gradient":
        for e in reversed(epochs):  # the last epoch with gradient statistics
            with src.open(e) as view:
                if any(view.gradients(name) is not None for name in layers):
                    break
        else:
            raise BnnError.not_found(f"run {src.name!r} has no gradient statistics to rank by")
        one = layers[0] if len(layers) == 1 else None
        table = gradient_outliers(src, e, k, "exploding", one, param=param)
        return [(str(r["layer"]), tuple(r["index"])) for _, r in table.iterrows()]
    cands: list[tuple[float, int, str, tuple[int, ...]]] = []
    with src.open(epochs[-1]) as last, src.open(epochs[0]) as first:
        for order, layer in enumerate(layers):
            if not last.has_param(layer, param):
                continue
            if criterion == "sigma":
                score = last.array(layer, "posterior", param, "sigma").astype(np.float64)
            else:
                after = last.array(layer, "posterior", param, "mu").astype(np.float64)
                score = np.abs(after - first.array(layer, "posterior", param, "mu"))
            shape = score.shape
            for i in top_k_indices(score, k):
                idx = tuple(int(v) for v in np.unravel_index(int(i), shape))
                cands.append((float(score.ravel()[i]), order, layer, idx))
    cands.sort(key=lambda c: (-c[0] if np.isfinite(c[0]) else np.inf, c[1], c[3]))
    return [(c[2], c[3]) for c in cands[:k]]


def _element(
    src: RunSource, view: EpochView, layer: str, dist: str, param: str, idx: tuple[int, ...]
) -> tuple[float, float]:
    """(mu, sigma) of one element (of the shared prior when ``dist`` is "prior"), cached."""
    base = src.cache_key(view.epoch)

    def read() -> tuple[float, float]:
        index = idx if dist == "posterior" else None
        mu, sigma = (view.array(layer, dist, param, s, index=index) for s in ("mu", "sigma"))
        return float(np.asarray(mu).ravel()[0]), float(np.asarray(sigma).ravel()[0])

    return cached(None if base is None else ("elem", base, layer, dist, param, idx), read)


def _draw_evolution(ax: Any, epochs: list[int], mu: np.ndarray, sigma: np.ndarray, n: int) -> int:
    ok = np.isfinite(mu) & np.isfinite(sigma) & (sigma > 0)
    if not ok.any():
        ax.text(0.5, 0.5, "no finite values", ha="center", transform=ax.transAxes)
        return int(ok.size)
    lo, hi = float(np.min((mu - 4 * sigma)[ok])), float(np.max((mu + 4 * sigma)[ok]))
    x = np.linspace(lo, hi, n)
    pdf = gaussian_pdf(x, mu[ok], sigma[ok])
    segs = np.stack([np.broadcast_to(x, pdf.shape), pdf], axis=-1)
    lc = LineCollection(
        list(segs), cmap=EVOLUTION_CMAP, norm=Normalize(epochs[0], max(epochs[-1], epochs[0] + 1))
    )
    lc.set_array(np.asarray(epochs, np.float64)[ok])
    lc.set_linewidth(1.2)
    ax.add_collection(lc)
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, float(pdf.max()) * 1.05)
    return int(ok.size - np.count_nonzero(ok))


def plot_params_log_distributions(
    distribution_log: RunLike,
    num_points: int = 200,
    dist_type: str = "posterior",
    *,
    params: Sequence[tuple[str, int | Sequence[int]]] | None = None,
    top_k: int = 4,
    criterion: str = "mu_change",
    layer: str | None = None,
    param: str = "weight",
    epochs: Sequence[int] | None = None,
    save: str | Path | None = None,
    dpi: int = 100,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> bytes:
    """How chosen parameters' Gaussians evolve over epochs (the seed's evolution plot).

    One panel per chosen element, each epoch's N(mu, sigma^2) coloured by epoch with
    viridis (dark purple early, yellow late: colour-blind safe), with an epoch colour bar.
    Elements are ``params`` (explicit ``(layer, flat or tuple index)``, at most 16; an index
    outside the layer is an INVALID_ARGUMENT naming it and the valid range), or the
    ``top_k`` (<= 16) of ``layer``
    (default all layers) by ``criterion``: ``"mu_change"`` (largest |mu_last - mu_first|),
    ``"sigma"`` (largest sigma at the last epoch) or ``"gradient"`` (top exploding gradient
    outliers at the last epoch with gradient statistics). ``dist_type="prior"`` draws each
    layer's shared prior instead (one panel per layer). Returns PNG bytes.
    """
    dist = parse_enum(DistType, dist_type, "dist_type").value
    param = _check_param(param)
    if criterion not in _CRITERIA:
        raise BnnError.invalid(f"criterion must be one of {list(_CRITERIA)}, got {criterion!r}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise BnnError.invalid(f"num_points must be an integer >= 2, got {num_points!r}")
    with open_source(distribution_log, data_dir=data_dir, db_url=db_url) as src:
        eps = src.resolve_epochs(epochs)
        with src.open(eps[-1]) as view:
            layers = select_layers(view, layer)
            chosen: list[Element]
            if dist == "prior":
                chosen = [(name, (0,)) for name in layers if view.has_param(name, param)]
                check_count(len(chosen), 16, "layers", "choose one with layer=")
            elif params is not None:
                check_count(len(params), 16, "params", "choose fewer")
                chosen = _explicit(view, params, param)
            else:
                check_count(top_k, 16, "top_k elements", "ask for fewer")
                chosen = _by_criterion(src, eps, layers, param, criterion, top_k)
        if not chosen:
            raise BnnError.not_found(f"no {param} elements to plot in layers {layers}")
        values = np.full((2, len(chosen), len(eps)), np.nan)
        for j, e in enumerate(eps):
            with src.open(e) as view:
                for i, (name, idx) in enumerate(chosen):
                    values[:, i, j] = _element(src, view, name, dist, param, idx)
        name = src.name
    ncols = min(4, len(chosen))
    nrows = -(-len(chosen) // ncols)
    fig, axes = new_figure(nrows, ncols, right=0.9)
    for i, (lay, idx) in enumerate(chosen):
        ax = axes[i // ncols][i % ncols]
        skipped = _draw_evolution(ax, eps, values[0, i], values[1, i], num_points)
        label = f"{lay}.{param} prior" if dist == "prior" else f"{lay}.{param}{list(idx)}"
        extra = f" ({skipped} non-finite epochs)" if skipped else ""
        ax.set_title(f"{label}{extra}", fontsize=9)
        ax.set_xlabel("value")
        ax.set_ylabel("density")
    for j in range(len(chosen), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    how = (
        "explicit" if params is not None or dist == "prior" else f"top {len(chosen)} by {criterion}"
    )
    fig.suptitle(f"{name}: {dist} of {param}s over epochs {eps[0]}-{eps[-1]} ({how})")
    sm = ScalarMappable(norm=Normalize(eps[0], max(eps[-1], eps[0] + 1)), cmap=EVOLUTION_CMAP)
    fig.colorbar(
        sm,
        ax=axes,
        fraction=0.03,
        pad=0.02,
        ticks=MaxNLocator(integer=True),
        label=f"epoch ({EVOLUTION_CMAP_TEXT})",
    )
    return to_png(fig, save, dpi)


def _epoch_row(axes: Any, view: EpochView, layer: str, param: str, opts: dict[str, Any]) -> None:
    mu = view.array(layer, "posterior", param, "mu").ravel()
    sigma = view.array(layer, "posterior", param, "sigma").ravel()
    ok = valid_mask(mu, sigma)
    flat = np.arange(mu.size) if ok is None else np.flatnonzero(ok)
    bad = mu.size - flat.size
    n, m = flat.size, min(opts["max_curves"], flat.size)
    pick = (
        np.sort(np.random.default_rng(opts["seed"]).choice(flat, m, replace=False))
        if m < n
        else flat
    )
    ax = axes[0]
    if m:
        pm, ps = mu[pick].astype(np.float64), sigma[pick].astype(np.float64)
        lo, hi = float((pm - 4 * ps).min()), float((pm + 4 * ps).max())
        x = np.linspace(lo, hi, opts["num_points"])
        pdf = gaussian_pdf(x, pm, ps)
        # One colour: an element's position in the layer means nothing on this axis, and
        # overlapping translucent curves show where the posteriors concentrate.
        lc = LineCollection(
            list(np.stack([np.broadcast_to(x, pdf.shape), pdf], -1)),
            colors=_CURVE_COLOUR,
            alpha=opts["alpha"],
            linewidths=0.8,
        )
        ax.add_collection(lc)
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, float(pdf.max()) * 1.05)
    subset = f"random {m} of {n} (seed {opts['seed']})" if m < n else f"all {n}"
    ax.set_title(f"{layer}.{param}: {subset} curves (alpha {opts['alpha']:g})", fontsize=9)
    ax.set_xlabel("value")
    ax.set_ylabel("density")
    note = f", {bad} non-finite left out" if bad else ""
    for ax, vals, label in (
        (axes[1], mu[flat], "mu"),
        (axes[2], np.log10(sigma[flat]), "log10 sigma"),
    ):
        nbins = histogram_bins(vals.size, opts["bins"])
        if vals.size:
            counts, edges = np.histogram(vals, bins=nbins)
            width = np.diff(edges)
            ax.stairs(
                counts / max(vals.size, 1) / np.where(width > 0, width, 1),
                edges,
                fill=True,
                alpha=0.7,
            )
        ax.set_title(f"{layer}.{param}: {label} of all {vals.size}{note}, {nbins} bins", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("density")


def plot_epoch_distributions(
    distribution_log: RunLike,
    epoch: int | None = None,
    num_points: int = 200,
    alpha: float = 0.6,
    dist_type: str = "posterior",
    *,
    layer: str | None = None,
    param: str = "weight",
    max_curves: int = 200,
    bins: int = 100,
    seed: int = 0,
    save: str | Path | None = None,
    dpi: int = 100,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> bytes:
    """All distributions of each layer at one epoch (the seed's overlay).

    Per layer (or only ``layer``; at most 8 rows): the Gaussian curves of at most
    ``max_curves`` elements in one colour with transparency ``alpha`` (a random subset drawn
    with ``seed`` when the layer is larger, stated in the title), and histograms of all mu's
    and of all log10 sigma's with about 2 sqrt(n) bins for n values (at least 5, at most
    ``bins``; the title states the count).
    ``dist_type="prior"``: every layer's shared weight and bias prior in one panel.
    ``epoch=None``: the latest captured epoch. Returns PNG bytes.
    """
    dist = parse_enum(DistType, dist_type, "dist_type").value
    param = _check_param(param)
    if isinstance(max_curves, bool) or not isinstance(max_curves, int) or max_curves < 1:
        raise BnnError.invalid(f"max_curves must be an integer >= 1, got {max_curves!r}")
    opts = {
        "num_points": num_points,
        "alpha": alpha,
        "max_curves": max_curves,
        "bins": bins,
        "seed": seed,
    }
    with open_source(distribution_log, data_dir=data_dir, db_url=db_url) as src:
        e = src.resolve_epoch(epoch)
        with src.open(e) as view:
            layers = [
                n for n in select_layers(view, layer) if dist == "prior" or view.has_param(n, param)
            ]
            if dist == "prior":
                fig = _prior_figure(view, layers, num_points)
            else:
                check_count(len(layers), 8, "layers", "choose one with layer=")
                fig, axes = new_figure(len(layers), 3, wgap=1.0)
                for row, name in enumerate(layers):
                    _epoch_row(axes[row], view, name, param, opts)
        fig.suptitle(f"{src.name}: {dist} distributions at epoch {e}")
    return to_png(fig, save, dpi)


def _prior_figure(view: EpochView, layers: list[str], num_points: int) -> Figure:
    """Every layer's shared weight (solid) and bias (dashed) prior in one panel, the legend
    right of it."""
    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(layers), 1)))
    priors = []
    for i, name in enumerate(layers):
        for p, style in zip(PARAMS, ("-", "--"), strict=True):
            if view.has_param(name, p):
                m = float(view.array(name, "prior", p, "mu").ravel()[0])
                s = float(view.array(name, "prior", p, "sigma").ravel()[0])
                priors.append((name, p, style, colours[i], m, s))
    labels = [f"{name}.{p}: mu={m:.3g}, sigma={s:.3g}" for name, p, _, _, m, s in priors]
    fig, axes = new_figure(1, 1, panel=(6.0, 4.0), right=legend_width(labels))
    ax = axes[0][0]
    good = [(m, s) for *_, m, s in priors if np.isfinite(m) and np.isfinite(s) and s > 0]
    if good:
        lo = min(m - 4 * s for m, s in good)
        hi = max(m + 4 * s for m, s in good)
        x = np.linspace(lo, hi, num_points)
        for (_, _, style, colour, m, s), label in zip(priors, labels, strict=True):
            if np.isfinite(m) and np.isfinite(s) and s > 0:
                ax.plot(
                    x,
                    gaussian_pdf(x, np.array([m]), np.array([s]))[0],
                    style,
                    color=colour,
                    label=label,
                )
        legend_outside(fig, ax.get_legend_handles_labels()[0])
    ax.set_title("shared layer priors (solid: weight, dashed: bias)", fontsize=9)
    ax.set_xlabel("value")
    ax.set_ylabel("density")
    return fig


def plot_percentile_bands(
    run: RunLike,
    layer: str | None = None,
    param: str = "weight",
    epochs: Sequence[int] | None = None,
    dist_type: str = "posterior",
    *,
    save: str | Path | None = None,
    dpi: int = 100,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> bytes:
    """Percentile bands of mu and sigma per layer over epochs (TensorBoard's distributions).

    Bands from outside in: min-max, 6.68-93.32, 15.87-84.13, 30.85-69.15 percentiles, and
    the median line, all exact over every element. One row per layer (at most 8).
    """
    dist = parse_enum(DistType, dist_type, "dist_type").value
    param = _check_param(param)
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        eps = src.resolve_epochs(epochs)
        with src.open(eps[-1]) as view:
            layers = [n for n in select_layers(view, layer) if view.has_param(n, param)]
        check_count(len(layers), 8, "layers", "choose one with layer=")
        labels = [*_BAND_LABELS, "median"]
        fig, axes = new_figure(len(layers), 2, panel=(5.0, 3.0), right=legend_width(labels))
        for row, name in enumerate(layers):
            for col, stat in enumerate(("mu", "sigma")):
                bands = percentile_bands(src, name, param, stat, eps, dist)
                _draw_bands(axes[row][col], bands, f"{name}.{param} {stat}")
        fig.suptitle(f"{src.name}: {dist} percentiles over epochs")
    legend_outside(fig, axes[0][0].get_legend_handles_labels()[0])
    return to_png(fig, save, dpi)


def _draw_bands(ax: Any, bands: Any, title: str) -> None:
    x = bands.index.to_numpy()
    p = bands[list(PERCENTILE_COLUMNS)].to_numpy().T
    for (lo, hi), shade, label in zip(_BANDS, (0.15, 0.3, 0.45, 0.6), _BAND_LABELS, strict=True):
        ax.fill_between(x, p[lo], p[hi], color="tab:orange", alpha=shade, linewidth=0, label=label)
    ax.plot(x, p[4], color="tab:red", linewidth=1.2, label="median")
    log_if_wide(ax, p)
    bad = int(bands["non-finite"].max()) if len(bands) else 0
    ax.set_title(title + (f" ({bad} non-finite at most)" if bad else ""), fontsize=9)
    ax.set_xlabel("epoch")
    integer_ticks(ax)
    ax.set_ylabel(title.split()[-1])
