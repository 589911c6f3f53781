"""What the dashboard's pages are drawn with: the Jinja2 environment, value formatting, and
metric curves as inline SVG (no JavaScript library, nothing fetched from elsewhere).

Curves share one palette (Okabe and Ito's, readable with colour-blind vision); a chart of
several runs draws every run on the same axes, so one quantity has one y scale.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Undefined
from markupsafe import Markup, escape
from starlette.templating import Jinja2Templates

__all__ = [
    "PALETTE",
    "STATIC_DIR",
    "cell",
    "fmt",
    "fold_series",
    "line_chart",
    "nice_step",
    "nice_ticks",
    "query_url",
    "short_time",
    "templates",
    "tick_label",
]

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def fmt(value: Any) -> str:
    """A cell as text: floats to 4 significant digits, times to the second (UTC), lists of
    numbers or words joined by "-" (widths), other lists and dicts as compact JSON, None (or
    a key the config lacks) as an en dash."""
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
    if isinstance(value, list | tuple) and not any(isinstance(v, _NESTED) for v in value):
        return "-".join(fmt(v) for v in value)
    if isinstance(value, _NESTED):
        return json.dumps(value, default=str, ensure_ascii=False, allow_nan=True)
    if hasattr(value, "item"):  # numpy scalars
        return fmt(value.item())
    return str(value)


_NESTED = (dict, list, tuple)


def cell(value: Any) -> Markup:
    """A table cell: :func:`fmt`, except a dict, which is one ``key: value`` line per key
    (a configuration's ``resolved_priors``)."""
    if isinstance(value, Mapping) and value:
        lines = (f"{escape(str(k))}: {escape(fmt(v))}" for k, v in value.items())
        return Markup(f'<span class="lines">{"<br>".join(lines)}</span>')
    return Markup(escape(fmt(value)))


def short_time(value: Any) -> str:
    """A time to the minute (UTC), for narrow columns (the full time goes in a title)."""
    return value.strftime("%Y-%m-%d %H:%M") if isinstance(value, datetime) else fmt(value)


Points = list[tuple[int, Any]]


def _same(a: Any, b: Any) -> bool:
    return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def fold_series(
    series: Mapping[str, Points],
) -> tuple[list[tuple[str, dict[str, Points]]], list[tuple[str, Any, str]]]:
    """Metric series split into what is worth a chart and what is one value.

    Returns ``charts``: (title, {label: points}), where the series named ``group/part``
    (``kl/layer1``, ``kl/layer2``) share one chart ``group/*`` labelled by part; and
    ``values``: (name, value, at which epochs) of the series with one point or whose
    values are all equal (``kl_weight``, ``lr``, ``steps``): no chart of a flat line.
    """
    values: list[tuple[str, Any, str]] = []
    varying: dict[str, Points] = {}
    for name, points in series.items():
        first = points[0][1] if points else None
        if len(points) == 1:
            values.append((name, first, f"epoch {points[0][0]} only"))
        elif points and all(_same(v, first) for _, v in points):
            values.append((name, first, f"all {len(points)} epochs"))
        else:
            varying[name] = list(points)
    groups: dict[str, list[str]] = {}
    for name in varying:
        group = name.partition("/")[0] + "/" if "/" in name else name
        groups.setdefault(group, []).append(name)
    charts: list[tuple[str, dict[str, Points]]] = []
    for group, names in groups.items():
        if len(names) > 1:  # names group/part
            charts.append((f"{group}*", {n.partition("/")[2]: varying[n] for n in names}))
        else:
            charts.extend((n, {n: varying[n]}) for n in names)
    return charts, values


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


def nice_step(span: float, target: int = 5, integer: bool = False) -> float:
    """A step of 1, 2 or 5 x 10^k giving about ``target`` intervals over ``span`` (whole
    numbers, at least 1, with ``integer``)."""
    rough = span / max(1, target) if span > 0 and math.isfinite(span) else 1.0
    magnitude = 10.0 ** math.floor(math.log10(rough))
    residual = rough / magnitude
    step = magnitude * (1 if residual < 1.5 else 2 if residual < 3 else 5 if residual < 7 else 10)
    return float(max(1, round(step))) if integer else step


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """Ticks at multiples of :func:`nice_step` from ``lo`` to ``hi`` (both included when on a
    step): ``nice_ticks(0, 102)`` is 0, 20, ..., 100, never 0, 17, 34."""
    step = nice_step(hi - lo, target, integer)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def tick_label(value: float, step: float) -> str:
    """``value`` (a multiple of ``step``) with as many decimals as the step needs."""
    if abs(value) < step / 2:
        return "0"
    if 1e-4 <= step < 1e5:
        return f"{value:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"
    digits = math.floor(math.log10(abs(value))) - math.floor(math.log10(step) + 1e-9) + 1
    return f"{value:.{max(1, digits)}g}"


def line_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[int, Any]]],
    width: int = 360,
    height: int = 200,
    marks: Mapping[str, int] | None = None,
) -> Markup:
    """An SVG chart of ``series`` (label -> (epoch, value) points) on shared axes.

    Non-finite and missing values are left out. Ticks are at 1, 2 or 5 x 10^k (epochs
    whole numbers); the y axis reaches the ticks below and above the values. ``marks``
    (label -> epoch) draws a dashed vertical line at each epoch (where a run diverged). A
    chart without any finite value says so instead of drawing empty axes.
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
    marked = [(label, int(x)) for label, x in (marks or {}).items()]
    x_lo, x_hi = min(xs + [x for _, x in marked]), max(xs + [x for _, x in marked])
    x0, x1 = (x_lo - 1, x_hi + 1) if x_lo == x_hi else (x_lo, x_hi)
    y0, y1 = min(ys), max(ys)
    if y0 == y1:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    y_step = nice_step(y1 - y0)
    y0 = math.floor(y0 / y_step + 1e-9) * y_step
    y1 = math.ceil(y1 / y_step - 1e-9) * y_step

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
    for y in nice_ticks(y0, y1):
        parts.append(
            f'<line class="grid" x1="{left}" y1="{sy(y):.1f}" x2="{width - right}" '
            f'y2="{sy(y):.1f}"/><text class="tick y-tick" x="{left - 4}" y="{sy(y) + 4:.1f}" '
            f'text-anchor="end">{escape(tick_label(y, y_step))}</text>'
        )
    for x in nice_ticks(x_lo, x_hi, integer=True):
        parts.append(
            f'<text class="tick x-tick" x="{sx(x):.1f}" y="{height - 6}" '
            f'text-anchor="middle">{int(x)}</text>'
        )
    for label, x in marked:
        parts.append(
            f'<line class="mark" x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" '
            f'y2="{height - bottom}"><title>{escape(label)}</title></line>'
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
templates.env.auto_reload = False  # compiled once: no stat of the files per page
templates.env.filters["fmt"] = fmt
templates.env.filters["cell"] = cell
templates.env.filters["short_time"] = short_time
templates.env.globals["query_url"] = query_url
