"""``/ui/compare?runs=a,b``: 2 to 16 runs side by side.

Every table has one column per run (settings, last metrics, each layer's learned prior and
posterior scales); each metric is one chart with every run on the same axes (one y scale
per quantity); the gradient outliers of the runs are compared element by element
(:func:`~service.analysis.compare_gradient_outliers`) when they captured gradients and
share an architecture; runs of two widths or more form a width study
(:func:`~service.analysis.width_study`: its table and plot). Tables are computed by the
analysis functions, through the service's result cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import pandas as pd
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service import analysis as an
from service.dashboard._common import (
    QueryError,
    cached,
    parse_query,
    render_page,
    series_of,
)
from service.dashboard.cache import GENERATIONS, serve_page
from service.dashboard.render import fold_series, line_chart
from service.routers._results import AppStoreDep, frame_rows, open_reader
from service.routers.compare import MAX_RUNS
from service.run_labels import run_labels
from service.schemas import NO_NUL
from trainer.errors import BnnError
from trainer.store import EpochInfo, RunInfo, RunReader, RunStore

__all__ = ["CompareQuery", "labels", "router"]

router = APIRouter(include_in_schema=False)
RunId = Annotated[str, StringConstraints(max_length=100, pattern=NO_NUL)]
Table = tuple[list[str], list[dict[str, Any]]]


class CompareQuery(BaseModel):
    """The compare page's query: ``runs=a,b`` and/or ``run=a&run=b`` (the runs page's form)."""

    model_config = ConfigDict(extra="forbid")

    runs: str | None = Field(default=None, max_length=2000)
    run: list[RunId] = Field(default_factory=list, max_length=MAX_RUNS)


def labels(runs: Sequence[RunInfo]) -> list[str]:
    """The names the user gave; ``name (id)`` only where names collide (the rule of
    :func:`service.run_labels.run_labels`, which the PNG plots follow too)."""
    return run_labels([r.id for r in runs], [r.name for r in runs])


_SUMMARY_ROWS = ("dataset", "prior", "prior_mode", "widths", "epochs", "optimizer", "lr", "seed")


def _differing(runs: Sequence[RunInfo]) -> list[str]:
    """Config keys (other than the summary rows, name and tags) whose values differ."""
    keys = dict.fromkeys(k for r in runs for k in r.config)
    skip = {*_SUMMARY_ROWS, "name", "tags"}
    return [k for k in keys if k not in skip and len({repr(r.config.get(k)) for r in runs}) > 1]


@contextlib.contextmanager
def _readers(store: RunStore, runs: Sequence[RunInfo], names: Sequence[str]) -> Iterator[dict]:
    with contextlib.ExitStack() as stack:
        opened: dict[str, RunReader] = {
            name: stack.enter_context(open_reader(store, run.id))
            for name, run in zip(names, runs, strict=True)
        }
        yield opened


def _per_run(frame: pd.DataFrame, names: Sequence[str]) -> list[dict[str, Any]]:
    """A (run, layer)-indexed frame turned around: one row per (layer, quantity), with the
    value of each run in ``values`` (None where a run lacks the layer)."""
    layers = list(dict.fromkeys(frame.index.get_level_values("layer")))
    rows = []
    for layer in layers:
        for column in (c for c in frame.columns if c != "epoch"):
            values = [
                frame.at[(n, layer), column] if (n, layer) in frame.index else None for n in names
            ]
            rows.append({"layer": layer, "quantity": str(column), "values": values})
    return rows


def _studies(
    request: Request,
    store: RunStore,
    runs: Sequence[RunInfo],
    names: Sequence[str],
    epochs: Sequence[Sequence[EpochInfo]],
) -> dict[str, Any]:
    """The layer table (one column per run), the width study when the runs have two widths
    or more, and the compared gradient outliers (or why there are none), cached."""

    def compute() -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {"layers": [], "width": None, "outliers": None, "counts": None}
        with _readers(store, runs, names) as readers:
            study = an.width_study(readers, None, min_widths=1)
            out["layers"] = _per_run(study, names)
            if study["width"].nunique() >= 2:
                out["width"] = frame_rows(study.sort_values("width", kind="stable"))
            common = set.intersection(*({e.epoch for e in es} for es in epochs))
            try:
                if not common:
                    raise BnnError.not_found("the runs have no captured epoch in common")
                out["epoch"] = max(common)
                found = an.compare_gradient_outliers(readers, out["epoch"], 10)
                out["outliers"] = frame_rows(found.table)
                out["counts"] = frame_rows(found.counts)
            except BnnError as exc:  # no gradients, no common epoch, other architectures
                out["outliers_error"] = exc.message
        return out, 4096 * (1 + len(out["layers"]))

    key = ("compare", tuple((r.id, tuple((e.epoch, e.checksum) for e in es))
                            for r, es in zip(runs, epochs, strict=True)))  # fmt: skip
    value: dict[str, Any] = cached(request, key, compute)
    return value


def _plots(joined: str, width_study: bool) -> list[tuple[str, str]]:
    plots = [
        ("Layer priors over epochs", f"/compare/plots/priors.png?runs={joined}"),
        ("Prior vs posterior scales", f"/compare/plots/scales.png?runs={joined}"),
    ]
    if width_study:
        plots.append(("Width study", f"/compare/plots/width.png?runs={joined}"))
    return plots


def compare_context(request: Request, store: RunStore) -> dict[str, Any]:
    """Everything the compare page shows; QueryError for a bad selection of runs."""
    query = parse_query(request, CompareQuery, multi=("run",))
    given = [r.strip() for r in (query.runs or "").split(",") if r.strip()]
    ids = list(dict.fromkeys([*given, *query.run]))
    if not 2 <= len(ids) <= MAX_RUNS:
        raise QueryError(
            f"runs: select 2 to {MAX_RUNS} runs to compare, got {len(ids)} "
            "(e.g. /ui/compare?runs=RUN_A,RUN_B)"
        )
    runs = [store.get_run(run_id) for run_id in ids]
    names = labels(runs)
    epochs = [store.list_epochs(r.id) for r in runs]
    series = [series_of(es) for es in epochs]
    metric_names = list(dict.fromkeys(m for s in series for m in s))
    # a metric that is one value in every run (constant, or one epoch) is a row of the
    # table, not a chart; "constant" where every run has it at several epochs
    single = [{name: where for name, _, where in fold_series(s)[1]} for s in series]
    flat = set.intersection(*(set(one) for one in single))
    constant = {m for m in flat if all(one[m].startswith("all ") for one in single)}
    charts = [
        line_chart(m, {n: s[m] for n, s in zip(names, series, strict=True) if m in s})
        for m in metric_names
        if m not in flat
    ]
    joined = ",".join(r.id for r in runs)
    studies: dict[str, Any] = {}
    if all(epochs):
        studies = _studies(request, store, runs, names, epochs)
    return {
        "runs": runs,
        "names": names,
        "rows": [*_SUMMARY_ROWS, *_differing(runs)],
        "done": [len(e) for e in epochs],
        "metric_names": metric_names,
        "flat": flat,
        "constant": constant,
        "last": [dict(e[-1].metrics) if e else {} for e in epochs],
        "charts": charts,
        "plots": _plots(joined, studies.get("width") is not None) if studies else [],
        "joined": joined,
        "studies": studies,
    }


@router.get("/ui/compare", response_class=HTMLResponse)
async def compare_page(request: Request, store: AppStoreDep) -> Response:
    """2 to 16 runs side by side (see the module's docstring)."""
    return await serve_page(
        request,
        lambda: GENERATIONS.catalog,
        lambda: render_page(request, "compare.html", **compare_context(request, store)),
    )
