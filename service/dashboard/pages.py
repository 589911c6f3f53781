"""The dashboard's routes: ``/`` (runs), ``/ui/runs/{id}`` (one run), ``/ui/compare`` (runs
side by side), the run page's live parts and the static files.

Pages are HTML for people; the JSON API is unchanged and the pages link its CSV tables,
epoch files and PNG plots. The runs table is one SQL query (:meth:`RunStore.query_runs`):
filtered, sorted and paginated by the catalog. An unknown run is a 404 page saying so, a
bad query value a 422 page naming it. Two routes answer for the run page's script: the
JSON ``/ui/runs/{id}/progress`` (status and epoch count, polled every few seconds while
the run is active) and the HTML fragment ``/ui/runs/{id}/metrics`` (its metric curves,
fetched again when a new epoch arrives). None of these routes is in the OpenAPI document.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, TypeVar

import pandas as pd
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from service import analysis as an
from service.dashboard.render import STATIC_DIR, line_chart, query_url, templates
from service.deps import MAX_EPOCH, StoreDep
from service.errors import STATUS
from service.routers import json_response
from service.routers._results import authorized, frame_rows, open_reader, result_cache
from service.routers.compare import MAX_RUNS
from service.schemas import MAX_TAGS, NO_NUL
from trainer.errors import BnnError
from trainer.store import METRIC_SORT, RUN_SORTS, EpochInfo, RunInfo, RunStatus, RunStore
from trainer.store.catalog import METRIC_NAME

__all__ = ["PAGE_SIZE", "TABLES", "router"]

router = APIRouter(include_in_schema=False, dependencies=[Depends(authorized)])
PAGE_SIZE = 50
STATIC = StaticFiles(directory=STATIC_DIR)
METRIC_COLUMNS = 4  # last test metrics shown in the runs table


# ----------------------------------------------------------------------------- queries
class QueryError(Exception):
    """A bad query value: the page answers 422 with ``message``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# text that reaches SQL: no NUL (PostgreSQL refuses it in strings), bounded
Tag = Annotated[str, StringConstraints(max_length=100, pattern=NO_NUL)]
Text = Annotated[str, StringConstraints(max_length=256, pattern=NO_NUL)]


class RunsQuery(BaseModel):
    """The runs page's query: search, filters, sort and page."""

    model_config = ConfigDict(extra="forbid")

    q: Text | None = Field(default=None, description="name contains")
    tag: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    status: RunStatus | None = None
    dataset: Tag | None = None
    prior: Tag | None = None
    metric: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    sort: Tag = "created_at"
    order: Literal["asc", "desc"] = "desc"
    page: int = Field(default=1, ge=1, le=1_000_000)


class RunQuery(BaseModel):
    """The run page's query: which table at which epoch."""

    model_config = ConfigDict(extra="forbid")

    epoch: int | None = Field(default=None, ge=0, le=MAX_EPOCH)
    table: Literal["stats", "kl", "kl_prior", "gradients", "outliers"] = "stats"


class CompareQuery(BaseModel):
    """The compare page's query: ``runs=a,b`` and/or ``run=a&run=b`` (the runs page's form)."""

    model_config = ConfigDict(extra="forbid")

    runs: str | None = Field(default=None, max_length=2000)
    run: list[Tag] = Field(default_factory=list, max_length=MAX_RUNS)


M = TypeVar("M", bound=BaseModel)


def parse_query(request: Request, model: type[M], multi: Sequence[str] = ()) -> M:
    """The request's query as ``model``; blank values count as not given. QueryError naming
    each unknown, repeated or bad parameter."""
    params = request.query_params
    data: dict[str, Any] = {}
    problems: list[str] = []
    for key in params.keys():  # noqa: SIM118 - a multi-dict: keys once each
        values = [v for v in params.getlist(key) if v.strip()]
        if key not in model.model_fields:
            known = sorted(model.model_fields)
            problems.append(f"{key}: unknown query parameter; known are {known}")
        elif key in multi:
            data[key] = values
        elif len(values) > 1:
            problems.append(f"{key}: given more than once")
        elif values:
            data[key] = values[0]
    if not problems:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                problems.append(f"{where}: {err['msg']} (got {err.get('input')!r:.100})")
    raise QueryError("; ".join(problems))


_CONDITION = re.compile(r"\s*([^<>=\s]+)\s*(<=|>=|<|>)\s*(\S+)\s*")


def metric_conditions(given: Sequence[str]) -> list[tuple[str, str, float]]:
    """``["test_nll < 0.1, test_rmse<=2"]`` -> [("test_nll", "<", 0.1), ("test_rmse", "<=",
    2.0)]; QueryError naming a condition that is not ``name op finite-number``."""
    out = []
    for text in (t for g in given for t in g.split(",") if t.strip()):
        found = _CONDITION.fullmatch(text)
        try:
            value = float(found.group(3)) if found else math.nan
        except ValueError:
            value = math.nan
        if found is None or not METRIC_NAME.fullmatch(found.group(1)) or not math.isfinite(value):
            raise QueryError(
                f"metric: {text.strip()!r} is not a condition like 'test_nll < 0.1' (a metric "
                "name, then <, <=, > or >=, then a finite number)"
            )
        out.append((found.group(1), found.group(2), value))
    return out


def check_sort(sort: str) -> None:
    """QueryError unless ``sort`` is a column of the catalog or ``metric:<name>``."""
    metric = sort.removeprefix(METRIC_SORT)
    if sort not in RUN_SORTS and not (sort != metric and METRIC_NAME.fullmatch(metric)):
        raise QueryError(
            f"sort: cannot sort by {sort!r}; one of {list(RUN_SORTS)} or {METRIC_SORT}<metric>"
        )


# ----------------------------------------------------------------------------- responses
def _page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return templates.TemplateResponse(
        request, name, {"root": root, **context}, status_code=status_code
    )


def error_page(request: Request, status_code: int, title: str, message: str) -> HTMLResponse:
    """The HTML error page (404 unknown run, 422 bad query value, ...)."""
    return _page(request, "error.html", status_code, title=title, message=message, code=status_code)


def _guarded(request: Request, make: Callable[[], Response]) -> Response:
    """``make()``, with a bad query and the library's errors as HTML error pages."""
    try:
        return make()
    except QueryError as exc:
        return error_page(request, 422, "Bad query", exc.message)
    except BnnError as exc:
        status = STATUS.get(str(exc.code), 500)
        title = {404: "Not found", 422: "Bad request", 409: "Conflict"}.get(status, "Error")
        return error_page(request, status, title, exc.message)


# ----------------------------------------------------------------------------- runs page
_COLUMNS = [  # (label, sort key or None)
    ("name", "name"),
    ("status", "status"),
    ("dataset", "dataset"),
    ("prior", "prior"),
    ("mode", "prior_mode"),
    ("widths", None),
    ("captured / epochs", "epochs_done"),
    ("host", "host"),
    ("started", "created_at"),
    ("tags", None),
]


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, store: StoreDep) -> Response:
    """The runs table: search by name and tag, filters, sort by column, 50 runs a page."""

    def make() -> Response:
        query = parse_query(request, RunsQuery, multi=("tag", "metric"))
        tags = [t.strip() for given in query.tag for t in given.split(",") if t.strip()]
        conditions = metric_conditions(query.metric)
        check_sort(query.sort)
        page = store.query_runs(
            name=query.q,
            tags=tags,
            status=query.status,
            dataset=query.dataset,
            prior=query.prior,
            metrics=conditions,
            sort=query.sort,
            descending=query.order == "desc",
            limit=PAGE_SIZE,
            offset=(query.page - 1) * PAGE_SIZE,
        )
        pages = max(1, math.ceil(page.total / PAGE_SIZE))
        current = query.model_dump(mode="json")
        here = f"{request.scope.get('root_path', '')}/"

        def url(**changes: Any) -> str:
            return query_url(here, {**current, "page": None, **changes})

        def sort_url(key: str) -> str:
            if key == query.sort:
                return url(sort=key, order="asc" if query.order == "desc" else "desc")
            first = "desc" if key in ("created_at", "epochs_done") else "asc"
            return url(sort=key, order=first)

        asked = [c[0] for c in conditions]  # columns of the metrics filtered or sorted by
        if query.sort.startswith(METRIC_SORT):
            asked.append(query.sort.removeprefix(METRIC_SORT))
        shown = [m for r in page.runs for m in r.last_metrics if m.startswith("test_")]
        metrics = list(dict.fromkeys([*asked, *shown]))[: max(METRIC_COLUMNS, len(set(asked)))]
        return _page(
            request,
            "runs.html",
            page=page,
            query=query,
            pages=pages,
            columns=_COLUMNS,
            metrics=metrics,
            metric_sort=METRIC_SORT,
            url=url,
            sort_url=sort_url,
            statuses=[s.value for s in RunStatus],
            datasets=store.config_values("dataset"),
            priors=store.config_values("prior"),
            page_size=PAGE_SIZE,
        )

    return _guarded(request, make)


# ----------------------------------------------------------------------------- run page
TABLES: dict[str, tuple[str, str, Callable[[Any, int], pd.DataFrame]]] = {
    # name -> (title, API path under /runs/{id}, the analysis function)
    "stats": ("Posterior statistics", "stats", lambda r, e: an.get_overall_weight_stats(r, e)),
    "kl": ("Pairwise KL within each layer", "kl", an.compute_layer_kl_divergences),
    "kl_prior": (
        "KL to the layer prior",
        "kl/prior",
        lambda r, e: an.kl_to_prior(r, [e]).droplevel("epoch"),
    ),
    "gradients": (
        "Gradient diagnostics per layer",
        "gradients",
        lambda r, e: an.gradient_diagnostics(r, [e]).droplevel("epoch"),
    ),
    "outliers": (
        "Top exploding gradient elements",
        "gradients/outliers",
        lambda r, e: an.gradient_outliers(r, e, 10, "exploding"),
    ),
}
GRADIENT_TABLES = ("gradients", "outliers")  # offered for epochs with gradient statistics


def _table(
    request: Request, store: RunStore, run_id: str, epoch: EpochInfo, table: str
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of ``table`` at ``epoch``, cached like the API's results (the
    epoch's checksum in the key: a committed epoch never changes)."""
    compute = TABLES[table][2]

    def rows() -> tuple[tuple[list[str], list[dict[str, Any]]], int]:
        with open_reader(store, run_id) as reader:
            columns, found = frame_rows(compute(reader, epoch.epoch))
        return (columns, found), 64 * (len(found) + 1) * max(1, len(columns))

    key = ("dashboard", table, run_id, epoch.epoch, epoch.checksum)
    value: tuple[list[str], list[dict[str, Any]]] = result_cache(request).get_or_compute(key, rows)
    return value


def _series(epochs: Sequence[EpochInfo]) -> dict[str, list[tuple[int, Any]]]:
    """Each metric over the epochs: name -> [(epoch, value)], names first seen first."""
    names = dict.fromkeys(k for e in epochs for k in e.metrics)
    return {n: [(e.epoch, e.metrics[n]) for e in epochs if n in e.metrics] for n in names}


def _metrics_context(run: RunInfo, epochs: Sequence[EpochInfo]) -> dict[str, Any]:
    series = _series(epochs)
    return {
        "charts": [line_chart(name, {run.name: points}) for name, points in series.items()],
        "last": epochs[-1] if epochs else None,
    }


def progress(run: RunInfo, epochs: Sequence[EpochInfo]) -> dict[str, Any]:
    """What the run page polls: status, epochs captured and planned, the latest epoch."""
    planned = run.config.get("epochs")
    return {
        "run_id": run.id,
        "status": run.status.value,
        "active": run.status.active,
        "epochs_done": len(epochs),
        "epochs_planned": planned if isinstance(planned, int) else None,
        "last_epoch": epochs[-1].epoch if epochs else None,
    }


@router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str, request: Request, store: StoreDep) -> Response:
    """One run: configuration, metric curves, a table at a chosen epoch, plots, downloads."""

    def make() -> Response:
        query = parse_query(request, RunQuery)
        run = store.get_run(run_id)
        epochs = store.list_epochs(run.id)
        by_epoch = {e.epoch: e for e in epochs}
        chosen: EpochInfo | None = epochs[-1] if epochs else None
        if query.epoch is not None:
            if query.epoch not in by_epoch:
                raise BnnError.not_found(
                    f"run {run.name!r} ({run.id}) has no epoch {query.epoch}; "
                    f"captured epochs: {sorted(by_epoch)}"
                )
            chosen = by_epoch[query.epoch]
        table: dict[str, Any] | None = None
        offered = [k for k in TABLES if k not in GRADIENT_TABLES]
        if chosen is not None:
            with open_reader(store, run.id) as reader:
                has_gradients = reader.header(chosen.epoch).has_gradients
            offered += list(GRADIENT_TABLES) if has_gradients else []
            title = TABLES[query.table][0]
            columns: list[str] = []
            rows: list[dict[str, Any]] = []
            error = None
            if query.table not in offered:
                error = f"epoch {chosen.epoch} of this run has no gradient statistics"
            else:
                try:
                    columns, rows = _table(request, store, run.id, chosen, query.table)
                except BnnError as exc:  # e.g. a table the run's captures cannot give
                    error = exc.message
            table = {"title": title, "columns": columns, "rows": rows, "error": error}
        return _page(
            request,
            "run.html",
            run=run,
            epochs=epochs,
            chosen=chosen,
            query=query,
            table=table,
            tables={k: {"title": TABLES[k][0], "path": TABLES[k][1]} for k in offered},
            progress=progress(run, epochs),
            config=sorted(run.config.items()),
            train_host=run.summary.get("train_host"),
            **_metrics_context(run, epochs),
        )

    return _guarded(request, make)


@router.get("/ui/runs/{run_id}/progress")
def run_progress(run_id: str, store: StoreDep) -> Response:
    """JSON for the run page's polling: status, epochs done and planned (404 unknown run)."""
    run = store.get_run(run_id)
    return json_response(progress(run, store.list_epochs(run.id)))


@router.get("/ui/runs/{run_id}/metrics", response_class=HTMLResponse)
def run_metrics_fragment(run_id: str, request: Request, store: StoreDep) -> Response:
    """The run page's metric curves and latest metrics, as an HTML fragment."""

    def make() -> Response:
        run = store.get_run(run_id)
        context = _metrics_context(run, store.list_epochs(run.id))
        return _page(request, "_metrics.html", run=run, **context)

    return _guarded(request, make)


# ----------------------------------------------------------------------------- compare page
def labels(runs: Sequence[RunInfo]) -> list[str]:
    """The names the user gave; ``name (id)`` only where names collide."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    return [r.name if counts[r.name] == 1 else f"{r.name} ({r.id})" for r in runs]


_SUMMARY_ROWS = ("dataset", "prior", "prior_mode", "widths", "epochs", "optimizer", "lr", "seed")


def _differing(runs: Sequence[RunInfo]) -> list[str]:
    """Config keys (other than the summary rows, name and tags) whose values differ."""
    keys = dict.fromkeys(k for r in runs for k in r.config)
    skip = {*_SUMMARY_ROWS, "name", "tags"}
    return [k for k in keys if k not in skip and len({repr(r.config.get(k)) for r in runs}) > 1]


@router.get("/ui/compare", response_class=HTMLResponse)
def compare_page(request: Request, store: StoreDep) -> Response:
    """2 to 16 runs side by side: settings and last metrics one column per run, the metric
    curves of all runs on shared axes, and the API's compare plots."""

    def make() -> Response:
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
        series = [_series(e) for e in epochs]
        metric_names = list(dict.fromkeys(m for s in series for m in s))
        charts = [
            line_chart(m, {n: s[m] for n, s in zip(names, series, strict=True) if m in s})
            for m in metric_names
        ]
        last = [dict(e[-1].metrics) if e else {} for e in epochs]
        joined = ",".join(r.id for r in runs)
        plots: list[tuple[str, str]] = []
        if all(epochs):
            plots = [
                ("Layer priors over epochs", f"/compare/plots/priors.png?runs={joined}"),
                ("Prior vs posterior scales", f"/compare/plots/scales.png?runs={joined}"),
            ]
            widths = {tuple(w) for r in runs if isinstance(w := r.config.get("widths"), list)}
            if len(widths) >= 2:  # the width study needs two widths or more
                plots.append(("Width study", f"/compare/plots/width.png?runs={joined}"))
        return _page(
            request,
            "compare.html",
            runs=runs,
            names=names,
            rows=[*_SUMMARY_ROWS, *_differing(runs)],
            done=[len(e) for e in epochs],
            metric_names=metric_names,
            last=last,
            charts=charts,
            plots=plots,
            joined=joined,
        )

    return _guarded(request, make)


# ----------------------------------------------------------------------------- static files
@router.get("/ui/static/{path:path}")
async def static_file(path: str, request: Request) -> Response:
    """The dashboard's CSS and script, from the package (no CDN)."""
    return await STATIC.get_response(path, request.scope)
