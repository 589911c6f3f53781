"""Figure plumbing: Agg canvases without pyplot (thread-safe), deterministic PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from trainer.errors import BnnError, ErrorCode

__all__ = [
    "EVOLUTION_CMAP",
    "EVOLUTION_CMAP_TEXT",
    "LINESTYLES",
    "MARKERS",
    "gaussian_pdf",
    "histogram_bins",
    "integer_ticks",
    "legend_outside",
    "legend_width",
    "log_if_wide",
    "new_figure",
    "style_handle",
    "to_png",
]

#: Epoch colours of evolution plots: viridis, readable with every common colour-vision
#: deficiency and in greyscale (its lightness rises monotonically).
EVOLUTION_CMAP = colormaps["viridis"]
EVOLUTION_CMAP_TEXT = "dark purple = early, yellow = late"
#: Line styles and markers that tell runs apart when colours tell layers apart.
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
LEGEND_FONTSIZE = 7
_CHAR_IN = 0.062  # inches per character of a legend label at LEGEND_FONTSIZE
_HANDLE_EM = 3.5  # legend handle length (in font sizes): long enough to show a dash pattern


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
    # zlib level 1: 15% faster than the default 6 for 10-15% larger files (plots are
    # flat colour, they compress well either way)
    fig.savefig(
        buf,
        format="png",
        dpi=dpi,
        metadata={"Software": None},
        pil_kwargs={"compress_level": 1},
    )
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


def integer_ticks(ax: Axes, axis: str = "x") -> None:
    """Whole-number ticks on an epoch axis (never 0.5 epochs)."""
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def histogram_bins(n: int, most: int = 100) -> int:
    """Bins for a histogram of ``n`` values: about 2 sqrt(n), at least 5 (1 for at most one
    value) and at most ``most``; so 10 values get 6 bins, not 100 mostly empty ones."""
    if n <= 1:
        return 1
    return max(1, min(int(most), max(5, 2 * math.isqrt(int(n)))))


def style_handle(
    label: str,
    *,
    color: Any = "0.25",
    linestyle: Any = "-",  # a matplotlib line style ("-", "--", ":", "-.", "none")
    marker: str | None = None,
    linewidth: float = 1.5,
    filled: bool = True,
) -> Line2D:
    """A legend entry (not drawn) that shows a colour, a line style and a marker (hollow
    unless ``filled``)."""
    return Line2D(
        [],
        [],
        color=color,
        linestyle=linestyle,
        marker=marker,
        markerfacecolor=None if filled else "none",
        linewidth=linewidth,
        markersize=5,
        label=label,
    )


def legend_width(labels: Sequence[str], ncol: int = 1) -> float:
    """Inches a :func:`legend_outside` legend with these labels needs right of the axes."""
    longest = max((len(t) for t in labels), default=0)
    handle = _HANDLE_EM * LEGEND_FONTSIZE / 72
    return ncol * (handle + 0.25 + _CHAR_IN * longest) + 0.2


def legend_outside(
    fig: Figure,
    handles: Sequence[Artist],
    *,
    title: str | None = None,
    ncol: int = 1,
) -> Legend:
    """One legend for the whole figure, right of the rightmost axes (never over the data;
    make room with ``new_figure(right=legend_width(labels))``). Handles carry their line
    style and marker, drawn long enough to show a dash pattern."""
    visible = [ax for ax in fig.axes if ax.get_visible()]
    x0 = max(ax.get_position().x1 for ax in visible) + 0.1 / fig.get_figwidth()
    y1 = max(ax.get_position().y1 for ax in visible)
    return fig.legend(
        handles=list(handles),
        loc="upper left",
        bbox_to_anchor=(x0, y1),
        bbox_transform=fig.transFigure,
        fontsize=LEGEND_FONTSIZE,
        title=title,
        title_fontsize=LEGEND_FONTSIZE,
        handlelength=_HANDLE_EM,
        ncol=ncol,
        frameon=False,
        borderaxespad=0.0,
    )
