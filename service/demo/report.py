"""A small report: sections of text, tables and PNG plots, written as HTML and Markdown.

    report = Report("Regression demo", out_dir)
    sec = report.section("fit", "Predictive fit")
    sec.text("Both models, **same** seed and data.")
    sec.table(frame, "Test metrics")
    sec.image("fit", png_bytes, "Predictive mean +- 2 sigma")
    html_path, md_path = report.write()

``report.html`` embeds every PNG (base64, one self-contained file); ``report.md`` links
to ``img/<name>.png`` beside it. Each section is an ``<h2 id=...>`` / ``## `` heading,
so tests can check that every section is present. The page is :data:`PAGE_PX` wide, so
figures up to that width are shown at their own size. Tables print one number format per
column (:func:`format_column`).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["PAGE_PX", "Report", "Section", "format_column", "format_value", "markdown_table"]

#: Width of the page's content in CSS pixels: figures up to this wide are not shrunk.
PAGE_PX = 1400

_CSS = """
body { font-family: system-ui, sans-serif; max-width: PAGE_PXpx; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
p, ul { max-width: 60em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
td { font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
caption { caption-side: top; text-align: left; font-weight: bold; padding: 4px 0; }
figure { margin: 0.5em 0 1.5em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f4f4f4; padding: 0 3px; }
nav li { display: inline; margin-right: 1em; }
""".replace("PAGE_PX", str(PAGE_PX))


def format_value(value: Any) -> str:
    """Numbers with 4 significant digits; NaN as ``nan``; the rest as ``str``."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    return str(value)


def _number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(
        v, bool | np.bool_
    )


def _special(v: float) -> str | None:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return None


def format_column(values: Sequence[Any]) -> list[str]:
    """One column's cells in one number format: integers as integers; otherwise fixed
    decimals (4 significant digits for the largest |value|, at least 2 for the smallest
    non-zero one) or, when the values reach 1e5 or fall below 1e-3 or need more than 9
    digits, scientific with 4 significant digits for every value. NaN/inf as ``nan``/``inf``;
    columns that are not all numbers (text, tuples, booleans) cell by cell."""
    vals = list(values)
    if not vals or not all(_number(v) for v in vals):
        return [format_value(v) for v in vals]
    floats = [float(v) for v in vals]
    finite = [v for v in floats if math.isfinite(v)]
    if all(v == int(v) and abs(v) < 1e15 for v in finite):
        return [_special(v) or str(int(v)) for v in floats]
    nonzero = [abs(v) for v in finite if v != 0]
    hi, lo = max(nonzero), min(nonzero)
    hi_exp, lo_exp = math.floor(math.log10(hi)), math.floor(math.log10(lo))
    decimals = max(0, 3 - hi_exp, 1 - lo_exp)
    if hi >= 1e5 or lo < 1e-3 or max(hi_exp, 0) + decimals > 9:
        return [_special(v) or f"{v:.3e}" for v in floats]
    return [_special(v) or f"{v:.{decimals}f}" for v in floats]


def _flat(frame: pd.DataFrame) -> pd.DataFrame:
    """Index levels as leading columns, so that both renderers show them."""
    if frame.index.names == [None] and isinstance(frame.index, pd.RangeIndex):
        return frame
    return frame.reset_index()


def _cells(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Column names and the formatted rows (one format per column) of ``frame``."""
    flat = _flat(frame)
    columns = [format_column(flat.iloc[:, j].tolist()) for j in range(flat.shape[1])]
    return [str(c) for c in flat.columns], [list(r) for r in zip(*columns, strict=True)]


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``frame`` (index levels as columns)."""
    cols, rows = _cells(frame)
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |"]
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame, caption: str) -> str:
    cols, rows = _cells(frame)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    cap = f"<caption>{_inline(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """Markdown's inline ``code`` and **bold** as HTML (everything else escaped)."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _paragraphs(text: str) -> str:
    parts = []
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = para.strip().splitlines()
        if lines and all(line.lstrip().startswith("- ") for line in lines):
            items = "".join(f"<li>{_inline(line.lstrip()[2:])}</li>" for line in lines)
            parts.append(f"<ul>{items}</ul>")
        elif para.strip():
            parts.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(parts)


@dataclass
class _Block:
    kind: str  # text | table | image
    text: str = ""
    frame: pd.DataFrame | None = None
    name: str = ""
    png: bytes = b""


@dataclass
class Section:
    """One ``##`` section: text paragraphs, tables and images, in the order added."""

    id: str
    title: str
    blocks: list[_Block] = field(default_factory=list)

    def text(self, text: str) -> Section:
        self.blocks.append(_Block("text", text=text))
        return self

    def table(self, frame: pd.DataFrame | pd.Series, caption: str = "") -> Section:
        if isinstance(frame, pd.Series):
            frame = frame.to_frame()
        self.blocks.append(_Block("table", text=caption, frame=frame))
        return self

    def image(self, name: str, png: bytes, caption: str = "") -> Section:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"image name must be letters, digits, '_', '.', '-': {name!r}")
        self.blocks.append(_Block("image", text=caption, name=name, png=png))
        return self


@dataclass
class Report:
    """Sections in order; :meth:`write` renders ``report.html``, ``report.md`` and ``img/``."""

    title: str
    out_dir: Path
    intro: str = ""
    sections: list[Section] = field(default_factory=list)

    def section(self, id: str, title: str) -> Section:
        if any(s.id == id for s in self.sections):
            raise ValueError(f"duplicate section id {id!r}")
        sec = Section(id, title)
        self.sections.append(sec)
        return sec

    @property
    def section_ids(self) -> list[str]:
        return [s.id for s in self.sections]

    def images(self) -> list[str]:
        return [b.name for s in self.sections for b in s.blocks if b.kind == "image"]

    def write(self) -> tuple[Path, Path]:
        """Write the images, ``report.md`` and ``report.html``; returns the two paths."""
        out = Path(self.out_dir)
        img = out / "img"
        img.mkdir(parents=True, exist_ok=True)
        names = self.images()
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate image names in {names}")
        md = [f"# {self.title}", ""]
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        if self.intro:
            md += [self.intro.strip(), ""]
            body.append(_paragraphs(self.intro))
        toc = "".join(
            f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in self.sections
        )
        body.append(f"<nav><ul>{toc}</ul></nav>")
        for sec in self.sections:
            md += [f'## {sec.title} <a id="{sec.id}"></a>', ""]
            body.append(f'<h2 id="{sec.id}">{html.escape(sec.title)}</h2>')
            for block in sec.blocks:
                if block.kind == "text":
                    md += [block.text.strip(), ""]
                    body.append(_paragraphs(block.text))
                elif block.kind == "table":
                    assert block.frame is not None
                    if block.text:
                        md += [f"**{block.text}**", ""]
                    md += [markdown_table(block.frame), ""]
                    body.append(_html_table(block.frame, block.text))
                else:
                    (img / f"{block.name}.png").write_bytes(block.png)
                    md += [f"![{block.text or block.name}](img/{block.name}.png)", ""]
                    if block.text:
                        md += [f"*{block.text}*", ""]
                    data = base64.b64encode(block.png).decode("ascii")
                    body.append(
                        f'<figure id="img-{block.name}"><img alt="{html.escape(block.name)}" '
                        f'src="data:image/png;base64,{data}"><figcaption>{_inline(block.text)}'
                        "</figcaption></figure>"
                    )
        md_path, html_path = out / "report.md", out / "report.html"
        md_path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
        page = (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>"
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n"
        )
        html_path.write_text(page, encoding="utf-8")
        return html_path, md_path
