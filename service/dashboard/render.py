"""What the dashboard's pages are drawn with: the Jinja2 environment, value formatting, and
metric curves as inline SVG (no JavaScript library, nothing fetched from elsewhere).

Curves share one palette (Okabe and Ito's, readable with colour-blind vision); a chart of
several runs draws every run on the same axes, so one quantity has one y scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Undefined
from markupsafe import Markup, escape
from starlette.templating import Jinja2Templates

__all__ = ["PALETTE", "STATIC_DIR", "fmt", "line_chart", "query_url", "templates"]

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def fmt(value: Any) -> str:
    """A cell as text: floats to 4 significant digits, times to the second (UTC), lists
    joined by "-" (widths), None (or a key the config lacks) as an en dash."""
    if value is None or isinstance(value, Undefined):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list | tuple):
        return "-".join(fmt(v) for v in value)
    if hasattr(value, "item"):  # numpy scalars
        return fmt(value.item())
    return str(value)


def query_url(path: str, params: Mapping[str, Any]) -> str:
    """``path?params`` without the params that are None or empty (lists repeated)."""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is not None and str(item) != "":
                pairs.append((key, str(item)))
    return f"{path}?{urlencode(pairs)}" if pairs else path


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def line_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[int, Any]]],
    width: int = 360,
    height: int = 200,
) -> Markup:
    """An SVG chart of ``series`` (label -> (epoch, value) points) on shared axes.

    Non-finite and missing values are left out; the x ticks are whole epochs. A chart
    without any finite value says so instead of drawing empty axes.
    """
    points = {
        label: [(int(x), y) for x, v in pts if (y := _finite(v)) is not None]
        for label, pts in series.items()
    }
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    head = f'<figure class="chart"><figcaption>{escape(title)}</figcaption>'
    if not ys:
        return Markup(f'{head}<p class="muted">no finite values yet</p></figure>')
    left, right, top, bottom = 56, 10, 8, 24
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y0 == y1:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" '
        f'y2="{height - bottom}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}"/>',
    ]
    for y in (y0, (y0 + y1) / 2, y1):
        parts.append(
            f'<text class="tick" x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(y))}</text>"
        )
    step = max(1, math.ceil((x1 - x0) / 6))
    for x in range(math.ceil(x0), math.floor(x1) + 1, step):
        parts.append(
            f'<text class="tick" x="{sx(x):.1f}" y="{height - 6}" text-anchor="middle">{x}</text>'
        )
    legend = []
    for i, (label, pts) in enumerate(points.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            line = f'fill="none" stroke="{colour}" stroke-width="2" points="{coords}"'
            parts.append(f"<polyline {line}/>")
        for x, y in pts:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
        legend.append(
            f'<li><span class="swatch" style="background:{colour}"></span>{escape(label)}</li>'
        )
    parts.append("</svg>")
    keys = f'<ul class="legend">{"".join(legend)}</ul>' if len(points) > 1 else ""
    return Markup(f"{head}{''.join(parts)}{keys}</figure>")


templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["fmt"] = fmt
templates.env.globals["query_url"] = query_url
