"""The demo report's figures that put the arms side by side on one shared y scale: KL to the
prior and pairwise KL per layer, per-step gradient norms and per-element |g| per layer, and the
percentile bands of the largest layer (every number from :mod:`service.analysis`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from service.analysis import (
    PERCENTILE_COLUMNS,
    get_overall_weight_stats,
    gradient_norm_series,
    kl_to_prior,
    pairwise_kl_trajectory,
    percentile_bands,
)
from service.demo._plots import plot_side_by_side, style_handle
from trainer.store import RunReader

__all__ = ["band_figures", "gradient_figures", "kl_figures"]

Figure = tuple[str, bytes, str]  # image name, PNG, caption


def _wide(values: np.ndarray, ratio: float = 100.0) -> bool:
    """A log scale: every finite value > 0 and they span more than ``ratio``."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    return bool(v.size and v.min() > 0 and v.max() / v.min() > ratio)


def _layers(frames: Sequence[pd.DataFrame]) -> dict[str, Any]:
    """Layer -> colour (tab10, in model order over all frames)."""
    names = dict.fromkeys(n for f in frames for n in f.index.get_level_values("layer"))
    return {n: colormaps["tab10"](i % 10) for i, n in enumerate(names)}


def _layer_handles(colours: Mapping[str, Any], *styles: Artist) -> list[Artist]:
    return [style_handle(n, color=c) for n, c in colours.items()] + list(styles)


def kl_figures(readers: Mapping[str, RunReader]) -> list[Figure]:
    """KL to the prior per element and mean pairwise KL per layer, arms side by side."""
    out: list[Figure] = []
    for name, compute, suffix, title in (
        ("kl_prior", kl_to_prior, "KL per element", "KL(posterior || layer prior) per element"),
        ("kl_pairwise", pairwise_kl_trajectory, "KL Average", "mean pairwise symmetric KL"),
    ):
        tables = {label: compute(reader) for label, reader in readers.items()}
        colours = _layers(list(tables.values()))
        handles = _layer_handles(
            colours,
            style_handle("weights", linestyle="-", marker="."),
            style_handle("biases", linestyle="--", marker="."),
        )

        def draw(
            table: pd.DataFrame, suffix: str = suffix, colours: dict[str, Any] = colours
        ) -> Callable[[Axes], None]:
            def on(ax: Axes) -> None:
                for layer, c in colours.items():
                    if layer not in table.index.get_level_values("layer"):
                        continue
                    part = table.xs(layer, level="layer")
                    for p, style in (("Weight", "-"), ("Bias", "--")):
                        y = part[f"{p} {suffix}"].to_numpy(np.float64)
                        if np.isfinite(y).any():
                            ax.plot(part.index, y, style, color=c, marker=".")

            return on

        values = np.concatenate(
            [t[[c for c in t.columns if c.endswith(suffix)]].to_numpy() for t in tables.values()]
        )
        png = plot_side_by_side(
            {label: draw(t) for label, t in tables.items()},
            handles,
            title=f"{title}, per layer over epochs (solid: weights, dashed: biases)",
            ylabel="KL (nats)",
            log=_wide(values),
        )
        out.append((name, png, f"{title} per layer over epochs, the arms on one scale"))
    return out


def gradient_figures(
    readers: Mapping[str, RunReader], diags: Mapping[str, pd.DataFrame]
) -> list[Figure]:
    """Per-step gradient norms and median/max |g| per layer, arms side by side."""
    colours = _layers(list(diags.values()))
    norms: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for label, reader in readers.items():
        xs: dict[str, list[np.ndarray]] = {}
        ys: dict[str, list[np.ndarray]] = {}
        for e in diags[label].index.get_level_values("epoch").unique():
            series = gradient_norm_series(reader, int(e))
            k = len(series)
            for layer in series.columns:
                xs.setdefault(layer, []).extend([e + np.arange(k) / max(k, 1), np.array([np.nan])])
                ys.setdefault(layer, []).extend(
                    [series[layer].to_numpy(np.float64), np.array([np.nan])]
                )
        norms[label] = {n: (np.concatenate(xs[n]), np.concatenate(ys[n])) for n in xs}

    def draw_norms(lines: dict[str, tuple[np.ndarray, np.ndarray]]) -> Callable[[Axes], None]:
        def on(ax: Axes) -> None:
            for layer, (x, y) in lines.items():
                ax.plot(x, y, color=colours[layer], linewidth=0.8)

        return on

    def draw_g(diag: pd.DataFrame) -> Callable[[Axes], None]:
        def on(ax: Axes) -> None:
            for layer, c in colours.items():
                if layer not in diag.index.get_level_values("layer"):
                    continue
                part = diag.xs(layer, level="layer")
                ax.plot(part.index, part["median |g|"], "-", color=c, marker=".")
                ax.plot(part.index, part["max |g|"], ":", color=c)

        return on

    all_norms = np.concatenate([y for lines in norms.values() for _, y in lines.values()])
    all_g = np.concatenate(
        [d[["median |g|", "max |g|"]].to_numpy().ravel() for d in diags.values()]
    )
    return [
        (
            "gradient_norms",
            plot_side_by_side(
                {label: draw_norms(lines) for label, lines in norms.items()},
                _layer_handles(colours),
                title="per-step gradient L2 norm of each layer",
                ylabel="||g||",
                xlabel="epoch (+ step fraction)",
                log=_wide(all_norms, 10.0),
            ),
            "per-step gradient L2 norm of each layer at the captured epochs, the arms on one scale",
        ),
        (
            "gradient_magnitudes",
            plot_side_by_side(
                {label: draw_g(diag) for label, diag in diags.items()},
                _layer_handles(
                    colours,
                    style_handle("median |g|", marker="."),
                    style_handle("max |g|", linestyle=":"),
                ),
                title="weight.mu |g| (mean over each epoch's steps) per element",
                ylabel="|g|",
                log=_wide(all_g, 10.0),
            ),
            "median (solid) and largest (dotted) per-element |g| of each layer over epochs, "
            "the arms on one scale",
        ),
    ]


#: (lower, upper) column of PERCENTILE_COLUMNS, shade, label: the bands from outside in
_BANDS: tuple[tuple[int, int, float, str], ...] = (
    (0, 8, 0.15, "min-max"),
    (1, 7, 0.3, "p6.7-p93.3"),
    (2, 6, 0.45, "p16-p84"),
    (3, 5, 0.6, "p31-p69"),
)


def band_figures(readers: Mapping[str, RunReader]) -> list[Figure]:
    """Percentile bands of the largest layer's weight mu and sigma, arms side by side."""
    ref = next(iter(readers.values()))
    sizes = get_overall_weight_stats(ref)["Weight count"].drop("Overall")
    layer = str(sizes.astype(np.int64).idxmax())
    handles: list[Artist] = [
        Patch(facecolor="tab:orange", alpha=shade, label=text) for _, _, shade, text in _BANDS
    ]
    handles.append(style_handle("median", color="tab:red"))
    out: list[Figure] = []
    for stat in ("mu", "sigma"):
        bands = {label: percentile_bands(r, layer, "weight", stat) for label, r in readers.items()}

        def draw(table: pd.DataFrame) -> Callable[[Axes], None]:
            def on(ax: Axes) -> None:
                x = table.index.to_numpy()
                p = table[list(PERCENTILE_COLUMNS)].to_numpy(np.float64).T
                for lo, hi, shade, _ in _BANDS:
                    ax.fill_between(x, p[lo], p[hi], color="tab:orange", alpha=shade, lw=0)
                ax.plot(x, p[4], color="tab:red", linewidth=1.2)

            return on

        values = np.concatenate([b[list(PERCENTILE_COLUMNS)].to_numpy() for b in bands.values()])
        png = plot_side_by_side(
            {label: draw(b) for label, b in bands.items()},
            handles,
            title=f"{layer}.weight posterior {stat}: percentiles over epochs",
            ylabel=stat,
            log=_wide(values),
        )
        caption = f"{layer} (the largest layer) weight {stat}: percentile bands over epochs"
        out.append((f"bands_{stat}", png, caption + ", the arms on one scale"))
    return out
