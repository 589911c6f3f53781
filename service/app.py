"""The FastAPI application: ``create_app(settings)``.

    uvicorn.run(create_app(), host="127.0.0.1", port=8000)    # what `bnn serve` does

At start the run store opens (Alembic migrations run), what crashes left is recovered
(``RunStore.fsck(repair=True, catalog=False)``: dead writers' temp files in run folders and
uploads removed, orphaned epoch files adopted or set aside; catalogued files are not
re-read, ``bnn runs fsck`` does that) and runs still QUEUED by an earlier process are handed
to Dask again; the Dask cluster
itself starts with the first job. A background thread (every ``BNN_STUDY_POLL_S`` seconds,
and once at start) starts the evaluation runs of studies whose tuning has ended; another,
once per process, draws a small figure (matplotlib's fonts and Agg set up before the first
plot request) and then freezes the objects made so far out of the garbage collector's full
passes (:func:`warm_up`). OpenAPI at
``/openapi.json``, shown by ``/docs`` (Swagger UI) and ``/redoc`` from files shipped in
:mod:`service.apidocs` (no CDN); liveness at ``/healthz``.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from service import apidocs, dashboard
from service.deps import StoreDep
from service.errors import BodyLimit, LastResort, Options, install_error_handlers
from service.jobs import JobRunner
from service.routers import (
    analysis,
    compare,
    complete_openapi,
    epochs,
    error_responses,
    plots,
    runs,
    studies,
    sweeps,
)
from service.routers._results import WarmTables
from service.settings import Settings, get_settings
from trainer.errors import BnnError
from trainer.store import RunStore

__all__ = ["create_app", "warm_up"]

logger = logging.getLogger(__name__)
_warmed = threading.Event()  # warm_up ran in this process


def _version() -> str:
    try:
        return version("bnn-infosharing")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _open_store(settings: Settings) -> RunStore:
    store = RunStore(settings.data_dir, settings.database_url, stale_after_s=settings.stale_after_s)
    try:  # crash leftovers: cheap part only (no checksums of catalogued files)
        report = store.fsck(repair=True, catalog=False, verify=False)
    except (BnnError, OSError) as exc:  # recovery must not keep the service down
        logger.warning("start-up recovery of %s failed: %s", settings.data_dir, exc)
        return store
    done = [f for f in report.findings if f.done]
    if done or report.problems:
        counts = ", ".join(f"{n} {k}" for k, n in report.counts().items() if n)
        logger.warning(
            "start-up recovery of %s (%.1f s): %s; %d repaired, %d left (see `bnn runs fsck`)",
            settings.data_dir,
            report.elapsed_s,
            counts,
            len(done),
            len(report.problems),
        )
    return store


def warm_up() -> None:
    """What the first plot request would otherwise pay (once per process; a few hundred
    ms): matplotlib's fonts and an Agg figure drawn to PNG. Then ``gc.freeze()``: the
    objects alive now (modules, pandas, matplotlib: ~150k) are left out of the collector's
    full passes, which otherwise scan them all every few hundred requests (~0.2 s each)."""
    if _warmed.is_set():
        return
    _warmed.set()
    try:
        from service.analysis._figure import legend_outside, new_figure, to_png

        fig, axes = new_figure(1, 1)
        axes[0][0].plot([0, 1], [1, 10], marker=".", label="warm-up")
        axes[0][0].set_yscale("log")
        axes[0][0].set_title("warm-up", fontsize=9)
        legend_outside(fig, axes[0][0].get_legend_handles_labels()[0])
        to_png(fig)
    except Exception:  # never fatal: the first plot request sets it up instead
        logger.warning("plot warm-up failed", exc_info=True)
    gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service; ``settings`` default to the ``BNN_*`` environment, read now."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await run_in_threadpool(_open_store, settings)
        jobs = JobRunner(settings, store)
        app.state.store, app.state.jobs = store, jobs
        advancer = studies.StudyAdvancer(
            store, lambda: studies.jobs_of(app), studies.poll_seconds(settings)
        )
        app.state.study_advancer = advancer
        try:
            await run_in_threadpool(jobs.resume_queued)
            await run_in_threadpool(advancer.tick)  # studies whose tuning ended while down
            advancer.start()
            threading.Thread(target=warm_up, name="bnn-warm-up", daemon=True).start()
            yield
        finally:
            await run_in_threadpool(advancer.stop)
            await run_in_threadpool(jobs.close)
            store.close()

    app = FastAPI(
        title="bnn-infosharing",
        version=_version(),
        description=(
            "Bayesian neural networks with learnable layer-shared priors: training runs on "
            "Dask, runs pushed from other machines, their captured epochs and metrics. Errors "
            'are `{"error": {"code", "message", "details"}}`. With `BNN_API_TOKEN` set, writes '
            "need `Authorization: Bearer <token>`."
        ),
        lifespan=lifespan,
        docs_url=None,  # served by service.apidocs, from files of this package
        redoc_url=None,
        strict_content_type=False,  # a JSON body without a Content-Type header is JSON
    )
    app.state.settings = settings
    install_error_handlers(app, html_page=_not_found_page)
    app.add_middleware(WarmTables)  # innermost: a table answered before, without routing
    app.add_middleware(
        BodyLimit, json_limit=settings.max_json_bytes, upload_limit=settings.max_upload_bytes
    )
    app.add_middleware(Options)  # OPTIONS: 204 with every method of the path in Allow
    app.add_middleware(LastResort)  # outermost: an unhandled exception is a JSON 500
    app.include_router(runs.router)
    app.include_router(epochs.router)
    app.include_router(analysis.router)
    app.include_router(compare.router)
    app.include_router(plots.router)
    app.include_router(sweeps.router)
    app.include_router(studies.router)
    app.include_router(dashboard.router)  # HTML pages at / and /ui/...
    app.include_router(apidocs.router)  # /docs, /redoc and their scripts

    @app.get(
        "/healthz",
        tags=["service"],
        summary="Liveness and catalog check",
        responses=error_responses((503, "the catalog does not answer")),
    )
    def healthz(request: Request, store: StoreDep) -> dict[str, Any]:
        """200 when the catalog answers (503 otherwise), with the job back end's state."""
        store.list_runs(limit=1)
        jobs: JobRunner = request.app.state.jobs
        return {
            "status": "ok",
            "version": app.version,
            "catalog": store.url.split(":", 1)[0],
            "jobs": jobs.describe(),
        }

    _contract_openapi(app, settings)
    return app


def _not_found_page(request: Request, message: str) -> Response:
    """The dashboard's error page: what a browser gets for a path no route has."""
    from service.dashboard._common import error_page

    return error_page(request, 404, "Not found", message)


def _contract_openapi(app: FastAPI, settings: Settings) -> None:
    """``/openapi.json`` as generated, completed by :func:`complete_openapi` (CSV bodies,
    400/413 of JSON bodies, the training limits of these settings)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete_openapi(generate(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
