"""The run pages' live parts: what the script of a page polls while runs train.

``/ui/runs/{id}/progress`` (JSON: status and epoch count, polled every few seconds by the
run's page while the run is active), ``/ui/progress?runs=a,b`` (the same for every active
row of the runs page, in one request) and ``/ui/runs/{id}/metrics`` (the HTML fragment of
a run's metric curves, fetched again when a new epoch arrives). Progress is remembered until
the run's rows change (:mod:`.cache`): a poll of an unchanged run costs no query.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service.dashboard._common import QueryError, parse_query, render_page, series_of
from service.dashboard.cache import GENERATIONS, PAGE_TTL_S, memo, serve_page
from service.dashboard.render import fold_series, line_chart
from service.routers import json_response
from service.routers._results import AppStoreDep, authorized
from trainer.errors import BnnError
from trainer.store import EpochInfo, RunInfo, RunStore

__all__ = ["MAX_POLLED", "metrics_context", "progress", "progresses", "router"]

router = APIRouter(include_in_schema=False)
MAX_POLLED = 100  # runs one /ui/progress request may ask for


def metrics_context(run: RunInfo, epochs: Sequence[EpochInfo]) -> dict[str, Any]:
    """The run's metric charts (series that vary; ``group/part`` series share one), the
    series that are one value (constant, or a single epoch) and the latest epoch."""
    marks = {} if run.diverged_epoch is None else {"diverged": run.diverged_epoch}
    charts, values = fold_series(series_of(epochs))
    return {
        "charts": [
            line_chart(title, lines, width=290, height=170, marks=marks) for title, lines in charts
        ],
        "values": values,
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


def _progress_now(store: RunStore, run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    return progress(run, store.list_epochs(run.id))


async def progresses(
    request: Request, store: RunStore, run_ids: Sequence[str], skip_unknown: bool = False
) -> list[dict[str, Any]]:
    """:func:`progress` of each run: remembered until the run's rows change (no query),
    else read in the threadpool. NOT_FOUND for an unknown run, or left out with
    ``skip_unknown``."""
    values = memo(request, PAGE_TTL_S)
    found: dict[str, dict[str, Any]] = {}
    missing: list[tuple[str, Any]] = []
    for run_id in dict.fromkeys(run_ids):
        generation = GENERATIONS.run(run_id)
        value = values.get(("progress", run_id), generation)
        if value is None:
            missing.append((run_id, generation))
        else:
            found[run_id] = value

    def read() -> None:
        for run_id, generation in missing:
            try:
                value = _progress_now(store, run_id)
            except BnnError:
                if not skip_unknown:
                    raise
                continue
            values.put(("progress", run_id), generation, value)
            found[run_id] = value

    if missing:
        await run_in_threadpool(read)
    return [found[r] for r in dict.fromkeys(run_ids) if r in found]


@router.get("/ui/runs/{run_id}/progress", dependencies=[Depends(authorized)])
async def run_progress(run_id: str, request: Request, store: AppStoreDep) -> Response:
    """JSON for the run page's polling: status, epochs done and planned (404 unknown run)."""
    return json_response((await progresses(request, store, [run_id]))[0])


class ProgressQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: str = Field("", max_length=MAX_POLLED * 65, pattern=r"^[A-Za-z0-9_,-]*$")


@router.get("/ui/progress", dependencies=[Depends(authorized)])
async def runs_progress(request: Request, store: AppStoreDep) -> Response:
    """The runs page's polling, every active row at once: ``?runs=a,b`` ->
    ``{"runs": [progress, ...]}`` (unknown runs left out; 422 for more than 100)."""
    try:
        query = parse_query(request, ProgressQuery)
    except QueryError as exc:
        raise BnnError.invalid(exc.message) from None
    ids = [r for r in query.runs.split(",") if r]
    if len(ids) > MAX_POLLED:
        raise BnnError.invalid(f"runs: at most {MAX_POLLED} runs, got {len(ids)}")
    return json_response({"runs": await progresses(request, store, ids, skip_unknown=True)})


@router.get("/ui/runs/{run_id}/metrics", response_class=HTMLResponse)
async def run_metrics_fragment(run_id: str, request: Request, store: AppStoreDep) -> Response:
    """The run page's metric curves and latest metrics, as an HTML fragment."""

    def make() -> Response:
        run = store.get_run(run_id)
        context = metrics_context(run, store.list_epochs(run.id))
        return render_page(request, "_metrics.html", run=run, **context)

    return await serve_page(request, lambda: GENERATIONS.run(run_id), make)
