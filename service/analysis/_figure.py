"""Figure plumbing: Agg canvases without pyplot (thread-safe), deterministic PNG bytes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from trainer.errors import BnnError, ErrorCode

__all__ = ["EVOLUTION_CMAP", "LINESTYLES", "gaussian_pdf", "log_if_wide", "new_figure", "to_png"]

#: Epoch colours of evolution plots: dark red (early) to neon green (late).
EVOLUTION_CMAP = LinearSegmentedColormap.from_list("dark_red_to_neon_green", ["#8b0000", "#39ff14"])
LINESTYLES = ("-", "--", ":", "-.")


def new_figure(
    nrows: int,
    ncols: int,
    *,
    panel: tuple[float, float] = (4.2, 3.0),
    right: float = 0.3,
    wgap: float = 0.8,
) -> tuple[Figure, Any]:
    """A figure with an Agg canvas and a 2-D array of axes (``squeeze=False``).

    Margins are fixed in inches (no constrained layout: it costs ~0.3 s per figure);
    ``right`` leaves room for a colour bar when one is added.
    """
    left, bottom, top, hgap = 1.0, 0.6, 0.65, 0.75
    width = left + ncols * panel[0] + (ncols - 1) * wgap + right
    height = bottom + nrows * panel[1] + (nrows - 1) * hgap + top
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wgap / panel[0],
        hspace=hgap / panel[1],
    )
    return fig, axes


def to_png(fig: Figure, save: str | Path | None = None, dpi: int = 100) -> bytes:
    """PNG bytes of ``fig`` (no version metadata, so equal inputs give equal bytes); saved
    to ``save`` too when given (STORAGE error naming the path if it cannot be written)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    data = buf.getvalue()
    if save is not None:
        try:
            Path(save).write_bytes(data)
        except OSError as exc:
            raise BnnError(ErrorCode.STORAGE, f"cannot save plot to {str(save)!r}: {exc}") from exc
    return data


def gaussian_pdf(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Densities (len(mu), len(x)) of N(mu_i, sigma_i^2) on the grid ``x`` (float64)."""
    m = np.asarray(mu, np.float64)[:, None]
    s = np.asarray(sigma, np.float64)[:, None]
    return np.asarray(np.exp(-0.5 * ((x[None, :] - m) / s) ** 2) / (s * np.sqrt(2 * np.pi)))


def log_if_wide(ax: Axes, values: np.ndarray, axis: str = "y", ratio: float = 100.0) -> None:
    """Use a log scale when the positive finite ``values`` span more than ``ratio``."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and v.max() / v.min() > ratio and np.all(np.asarray(values)[np.isfinite(values)] > 0):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def check_count(n: int, limit: int, what: str, hint: str) -> None:
    """INVALID_ARGUMENT when a plot would need more than ``limit`` panels."""
    if n > limit:
        raise BnnError.invalid(
            f"{n} {what} is more than one figure shows (at most {limit}); {hint}"
        )
