"""The dashboard's routes: ``/`` (runs), ``/ui/runs/{id}`` (one run) and the static files;
the run pages' live parts (:mod:`.live`), the compare page (:mod:`.compare`), the sweeps
pages (:mod:`.sweeps`) and the login (:mod:`.auth`) are included from their modules.

Pages are HTML for people; the JSON API is unchanged and the pages link its CSV tables,
epoch files and PNG plots. The runs table is one SQL query (:meth:`RunStore.query_runs`):
filtered, sorted and paginated by the catalog. An unknown run is a 404 page saying so, a
bad query value a 422 page naming it, a missing login (``BNN_AUTH_READS``) a 401 page
linking the login form. The run page's forms call the JSON API themselves
(``PATCH /runs/{id}``, ``POST /runs/{id}/cancel``). None of these routes is in the OpenAPI
document.

Pages are served from :mod:`.cache` until the catalog changes (on the event loop: no
thread, no query); a page made anew runs in the threadpool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import pandas as pd
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service import analysis as an
from service.dashboard import auth, compare, live, sweeps
from service.dashboard._common import (
    QueryError,
    cached,
    parse_query,
    render_page,
    root_of,
)
from service.dashboard.cache import GENERATIONS, remembered, serve_page
from service.dashboard.live import metrics_context, progress
from service.dashboard.plots import chosen_plot, is_plot_field, offered, plot_forms
from service.dashboard.render import STATIC_DIR, query_url
from service.deps import MAX_EPOCH
from service.routers._results import AppStoreDep, frame_rows, open_reader
from service.schemas import MAX_TAGS, NO_NUL
from trainer.errors import BnnError
from trainer.store import METRIC_SORT, RUN_SORTS, EpochInfo, RunInfo, RunStatus, RunStore
from trainer.store.catalog import METRIC_NAME, parse_metric_condition

__all__ = ["PAGE_SIZE", "RECENT_EPOCHS", "TABLES", "router"]

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 50
STATIC = StaticFiles(directory=STATIC_DIR)
METRIC_COLUMNS = 4  # last test metrics shown in the runs table
RECENT_EPOCHS = 20  # epoch files listed before "show all"


# ----------------------------------------------------------------------------- queries
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
    """The run page's query: which table at which epoch, which plot (its options are the
    ``<kind>.<option>`` fields of the plot explorer)."""

    model_config = ConfigDict(extra="forbid")

    epoch: int | None = Field(default=None, ge=0, le=MAX_EPOCH)
    table: Literal["stats", "kl", "kl_prior", "gradients", "outliers"] = "stats"
    plot: str | None = Field(default=None, max_length=64)


def metric_conditions(given: Sequence[str]) -> list[tuple[str, str, float]]:
    """``["test_nll < 0.1, test_rmse<=2"]`` -> [("test_nll", "<", 0.1), ("test_rmse", "<=",
    2.0)], parsed as ``GET /runs?metric=`` parses them (:func:`parse_metric_condition`);
    QueryError naming a condition that is not ``name op number``."""
    out = []
    for text in (t for g in given for t in g.split(",") if t.strip()):
        try:
            out.append(parse_metric_condition(text))
        except BnnError:
            raise QueryError(
                f"metric: {text.strip()!r} is not a condition like 'test_nll < 0.1' (a metric "
                "name, then <, <=, > or >=, then a finite number)"
            ) from None
    return out


def check_sort(sort: str) -> None:
    """QueryError unless ``sort`` is a column of the catalog or ``metric:<name>``."""
    metric = sort.removeprefix(METRIC_SORT)
    if sort not in RUN_SORTS and not (sort != metric and METRIC_NAME.fullmatch(metric)):
        raise QueryError(
            f"sort: cannot sort by {sort!r}; one of {list(RUN_SORTS)} or {METRIC_SORT}<metric>"
        )


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


def _runs_csv(query: RunsQuery, tags: list[str], conditions: list[tuple[str, str, float]]) -> str:
    """``GET /runs`` as CSV with the page's filters (its first 1000 runs)."""
    status = query.status.value if query.status else None
    filters = {"name": query.q, "tag": tags, "status": status, "dataset": query.dataset}
    filters |= {"prior": query.prior, "metric": [f"{m}{op}{v!r}" for m, op, v in conditions]}
    return query_url("/runs", {"format": "csv", **filters, "limit": 1000})


def config_values(request: Request, store: RunStore, key: str) -> list[str]:
    """The filter menu of ``config[key]``, queried again once runs are created or deleted
    (or after a few seconds: runs created by another process)."""
    generation = GENERATIONS.runs_set
    found: list[str] = remembered(
        request, ("config_values", key), generation, lambda: store.config_values(key)
    )
    return found


@router.get("/", response_class=HTMLResponse)
async def runs_page(request: Request, store: AppStoreDep) -> Response:
    """The runs table: search by name and tag, filters, sort by column, 50 runs a page."""
    return await serve_page(
        request, lambda: GENERATIONS.catalog, lambda: _runs_page(request, store)
    )


def _runs_page(request: Request, store: RunStore) -> Response:
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
    here = f"{root_of(request)}/"

    def url(**changes: Any) -> str:
        return query_url(here, {**current, "page": None, **changes})

    tag_urls: dict[str, str] = {}

    def tag_url(tag: str) -> str:  # the page's 50 rows share a few tags
        if tag not in tag_urls:
            tag_urls[tag] = url(tag=tag)
        return tag_urls[tag]

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
    return render_page(
        request,
        "runs.html",
        page=page,
        query=query,
        pages=pages,
        columns=_COLUMNS,
        metrics=metrics,
        metric_sort=METRIC_SORT,
        url=url,
        tag_url=tag_url,
        sort_url=sort_url,
        statuses=[s.value for s in RunStatus],
        datasets=config_values(request, store, "dataset"),
        priors=config_values(request, store, "prior"),
        page_size=PAGE_SIZE,
        csv_url=_runs_csv(query, tags, conditions),
    )


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

    key = (table, run_id, epoch.epoch, epoch.checksum)
    value: tuple[list[str], list[dict[str, Any]]] = cached(request, key, rows)
    return value


def _header(
    request: Request, store: RunStore, run_id: str, epoch: EpochInfo
) -> tuple[list[str], bool]:
    """The epoch's layers and whether it holds gradient statistics (its file's header,
    cached by checksum: the page does not open the file each time)."""

    def read() -> tuple[tuple[list[str], bool], int]:
        with open_reader(store, run_id) as reader:
            header = reader.header(epoch.epoch)
        return (list(header.layers), header.has_gradients), 256 + 64 * len(header.layers)

    value: tuple[list[str], bool] = cached(
        request, ("header", run_id, epoch.epoch, epoch.checksum), read
    )
    return value


def divergence(run: RunInfo) -> str | None:
    """Where the run became non-finite, in words (None if it never did)."""
    if run.diverged_step is None:
        return None
    layer = f", parameter {run.diverged_layer}" if run.diverged_layer else " (the loss)"
    return f"non-finite at step {run.diverged_step}, epoch {run.diverged_epoch}{layer}"


def _downloads(
    run_id: str, epoch: int, layers: Sequence[str], grads: bool
) -> list[tuple[str, str]]:
    """(label, URL) of the CSV tables beyond the shown ones: over all epochs, per layer."""
    base = f"/runs/{run_id}"
    out: list[tuple[str, str]] = [
        ("pairwise KL over epochs", f"{base}/kl/trajectory?of=pairwise&format=csv"),
        ("KL to the prior over epochs", f"{base}/kl/trajectory?of=prior&format=csv"),
        ("priors over epochs", f"{base}/priors?format=csv"),
    ]
    for layer in layers:
        for stat in ("mu", "sigma"):
            url = query_url(f"{base}/percentiles", {"layer": layer, "stat": stat, "format": "csv"})
            out.append((f"{layer} {stat} percentiles over epochs", url))
    if grads:
        url = f"{base}/gradients/outliers?epoch={epoch}&kind=vanishing&format=csv"
        out.append(("top vanishing gradient elements", url))
    return out


@router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
async def run_page(run_id: str, request: Request, store: AppStoreDep) -> Response:
    """One run: configuration, metric curves, a table at a chosen epoch, plots with their
    options, downloads, and the forms that rename, tag or cancel it."""
    return await serve_page(
        request, lambda: GENERATIONS.run(run_id), lambda: _run_page(request, store, run_id)
    )


def _run_page(request: Request, store: RunStore, run_id: str) -> Response:
    query = parse_query(request, RunQuery, skip=is_plot_field)
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
    offered_tables = [k for k in TABLES if k not in GRADIENT_TABLES]
    layers: list[str] = []
    has_gradients = False
    if chosen is not None:
        layers, has_gradients = _header(request, store, run.id, chosen)
        offered_tables += list(GRADIENT_TABLES) if has_gradients else []
        columns: list[str] = []
        rows: list[dict[str, Any]] = []
        error = None
        if query.table not in offered_tables:
            error = f"epoch {chosen.epoch} of this run has no gradient statistics"
        else:
            try:
                columns, rows = _table(request, store, run.id, chosen, query.table)
            except BnnError as exc:  # e.g. a table the run's captures cannot give
                error = exc.message
        title = TABLES[query.table][0]
        table = {"title": title, "columns": columns, "rows": rows, "error": error}
    kinds = offered(has_gradients)
    given = {k: request.query_params.getlist(k) for k in request.query_params}
    plot_src = plot_error = None
    if query.plot is not None and epochs:
        try:
            plot_src = chosen_plot(run.id, query.plot, kinds, given, sorted(by_epoch))
        except QueryError as exc:
            plot_error = exc.message
    elif query.plot is not None:
        raise QueryError(f"plot: run {run.id!r} has no captured epoch to plot yet")
    numbers = [e.epoch for e in epochs]
    return render_page(
        request,
        "run.html",
        422 if plot_error else 200,
        run=run,
        epochs=epochs,
        chosen=chosen,
        query=query,
        table=table,
        tables={k: {"title": TABLES[k][0], "path": TABLES[k][1]} for k in offered_tables},
        downloads=_downloads(run.id, chosen.epoch, layers, has_gradients) if chosen else [],
        progress=progress(run, epochs),
        config=sorted(run.config.items()),
        train_host=run.summary.get("train_host"),
        divergence=divergence(run),
        plot_forms=plot_forms(kinds, given, numbers, layers),
        plot_kind=query.plot if query.plot in kinds else kinds[0],
        plot_src=plot_src,
        plot_error=plot_error,
        recent=RECENT_EPOCHS,
        **metrics_context(run, epochs),
    )


# ----------------------------------------------------------------------------- static files
@router.get("/ui/static/{path:path}")
async def static_file(path: str, request: Request) -> Response:
    """The dashboard's CSS and script, from the package (no CDN; no login needed)."""
    return await STATIC.get_response(path, request.scope)


router.include_router(live.router)
router.include_router(compare.router)
router.include_router(sweeps.router)
router.include_router(auth.router)
