"""``/sweeps``: a width or optimiser study as a group of training runs on Dask.

``POST /sweeps`` expands the grid into runs (each checked against the service's limits),
records the sweep and its runs (QUEUED, tagged ``sweep:<id>``) and hands every run to the
job runner: 202 with the sweep. ``GET /sweeps/{id}`` shows its runs and their statuses and,
once no run is queued or running, the study table of the completed runs (also as
``?format=csv``); ``GET /sweeps/{id}/plots/{name}.png`` its plots.
"""

from __future__ import annotations

from typing import Annotated, Any

import pandas as pd
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from service.demo.studies import study_plots, study_table, sweep_status
from service.demo.sweeps import SweepSpec, expand, register_sweep
from service.deps import JobsDep, SettingsDep, StoreDep, require_token
from service.errors import json_safe
from service.routers import (
    AUTH_RESPONSES,
    CSV_RESPONSES,
    Format,
    FormatQuery,
    csv_response,
    error_responses,
    json_response,
)
from service.routers.runs import check_limits
from trainer.config import parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore, SweepInfo

__all__ = ["MAX_SWEEP_RUNS", "router", "sweep_out"]

MAX_SWEEP_RUNS = 256
_UNKNOWN = (404, "unknown sweep (or a study's id: see /studies)")
_AUTH = AUTH_RESPONSES
_PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}}
router = APIRouter(
    prefix="/sweeps",
    tags=["sweeps"],
    dependencies=[Depends(require_token)],
    responses=AUTH_RESPONSES,
)
SweepPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
KINDS = ("width", "optim")  # the catalog's other sweeps are studies, served by /studies


def _load(store: RunStore, sweep_id: str) -> SweepInfo:
    """The sweep ``sweep_id``; 404 for an unknown id and for a study's (see /studies)."""
    sweep = store.get_sweep(sweep_id)
    if sweep.kind not in KINDS:
        raise BnnError.not_found(
            f"unknown sweep {sweep_id!r} (a {sweep.kind}: see /studies/{sweep_id})"
            if sweep.kind == "study"
            else f"unknown sweep {sweep_id!r}",
            sweep_id=sweep_id,
        )
    return sweep


def _study(store: RunStore, sweep: SweepInfo) -> dict[str, Any]:
    """The study table as ``{"columns", "rows", "runs"}``, cached in the sweep's summary."""
    cached = sweep.summary.get("study")
    if cached is not None:
        return dict(cached)
    table = study_table(store, sweep).reset_index()
    study = {
        "columns": [str(c) for c in table.columns],
        "rows": json_safe(table.to_dict(orient="records")),
    }
    store.set_sweep_summary(sweep.id, {"study": study})
    return study


def sweep_out(request: Request, store: RunStore, sweep: SweepInfo, study: bool = True) -> dict:
    """The sweep as the API shows it: spec, runs with statuses, counts, ``done``, and the
    study table when done (``None`` before, or when no run completed)."""
    out = sweep.to_dict()
    out.pop("summary")
    out["url"] = str(request.url_for("get_sweep", sweep_id=sweep.id))
    status = sweep_status(store, sweep)
    out |= status
    for run in out["runs"]:
        run["url"] = str(request.url_for("get_run", run_id=run["run_id"]))
    out["study"] = None
    if study and status["done"] and status["counts"].get(RunStatus.COMPLETED.value):
        out["study"] = _study(store, sweep)
        out["plots"] = [
            str(request.url_for("get_sweep_plot", sweep_id=sweep.id, name=name))
            for name in _plot_names(sweep)
        ]
    return out


def _plot_names(sweep: SweepInfo) -> list[str]:
    if sweep.kind == "optim":
        return ["optim"]
    priors = dict.fromkeys(SweepSpec.model_validate(sweep.spec).factor("prior"))
    return ["width_posteriors", *(f"width_priors_{p}" for p in priors)]


@router.post(
    "",
    status_code=202,
    summary="Start a sweep: a width or optimiser study",
    responses=error_responses(413, 422, 503),
)
def create_sweep(
    body: SweepSpec, request: Request, store: StoreDep, jobs: JobsDep, settings: SettingsDep
) -> Response:
    """Expands ``grid`` over ``base`` (see the ``SweepSpec`` schema), checks every run
    against the limits (422 naming the first violation), then 202 with the sweep and a
    ``Location`` header; its runs train on the service's Dask cluster."""
    configs = expand(body)
    if len(configs) > MAX_SWEEP_RUNS:
        raise BnnError.invalid(
            f"the sweep has {len(configs)} runs, more than the limit {MAX_SWEEP_RUNS}",
            runs=len(configs),
            limit=MAX_SWEEP_RUNS,
        )
    for _, cfg in configs:
        check_limits(parse_config(cfg), settings)
    sweep, runs = register_sweep(store, body)
    for _, run_id, config in runs:
        jobs.submit(run_id, config)
    out = sweep_out(request, store, sweep, study=False)
    return json_response(out, 202, headers={"Location": out["url"]})


@router.get("", summary="List sweeps, newest first", responses=error_responses(422, 503))
def list_sweeps(
    store: StoreDep,
    request: Request,
    kind: Annotated[str | None, Query(pattern="^(width|optim)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Response:
    """Each sweep with its run counts per status (no study tables)."""
    if kind is None:  # width and optim sweeps; studies are listed by /studies
        sweeps = [s for s in store.list_sweeps() if s.kind in KINDS][:limit]
    else:
        sweeps = store.list_sweeps(kind=kind, limit=limit)
    # the statuses of every listed sweep's runs in one query, not two per run
    statuses = store.run_statuses([run_id for sweep in sweeps for _, run_id in sweep.runs])
    page = []
    for sweep in sweeps:
        out = sweep.to_dict()
        out.pop("summary")
        out["url"] = str(request.url_for("get_sweep", sweep_id=sweep.id))
        known = [statuses[run_id] for _, run_id in sweep.runs if run_id in statuses]
        counts: dict[str, int] = {}
        for status in known:
            counts[status.value] = counts.get(status.value, 0) + 1
        out |= {"counts": counts, "done": bool(known) and not any(s.active for s in known)}
        out["study"] = None
        page.append(out)
    return json_response({"total": len(page), "sweeps": page})


@router.get(
    "/{sweep_id}",
    name="get_sweep",
    summary="A sweep: runs, statuses, study table",
    responses=CSV_RESPONSES | error_responses(_UNKNOWN, 409, 422, 503),
)
def get_sweep(
    sweep_id: SweepPath, store: StoreDep, request: Request, fmt: FormatQuery = Format.JSON
) -> Response:
    """``study`` is null until no run is queued or running; ``?format=csv`` gives the study
    table alone (409 before it exists)."""
    sweep = _load(store, sweep_id)
    out = sweep_out(request, store, sweep)
    if fmt is Format.CSV:
        if out["study"] is None:
            raise BnnError(
                ErrorCode.CONFLICT,
                f"sweep {sweep_id!r} has no study table yet (runs: {out['counts']})",
                counts=out["counts"],
            )
        study = out["study"]
        return csv_response(study["rows"], study["columns"], f"sweep_{sweep_id}.csv")
    return json_response(out)


@router.get(
    "/{sweep_id}/plots/{name}.png",
    name="get_sweep_plot",
    summary="A plot of the study",
    responses=_PNG | error_responses(_UNKNOWN, 409, 422, 503),
)
def get_sweep_plot(sweep_id: SweepPath, name: str, store: StoreDep) -> Response:
    """``optim``, or ``width_posteriors`` and ``width_priors_<prior>``; 409 while runs are
    queued or running or before any run completed."""
    sweep = _load(store, sweep_id)
    names = _plot_names(sweep)
    if name not in names:
        raise BnnError.not_found(f"sweep {sweep_id!r} has no plot {name!r}; plots: {names}")
    status = sweep_status(store, sweep)
    if not status["done"]:
        raise BnnError(
            ErrorCode.CONFLICT,
            f"sweep {sweep_id!r} is still training (runs: {status['counts']})",
            counts=status["counts"],
        )
    rows = _study(store, sweep)
    table = pd.DataFrame(rows["rows"], columns=rows["columns"])
    index = ["run", "layer"] if sweep.kind == "width" else ["run"]
    plots = study_plots(store, sweep, table.set_index(index))
    if name not in plots:
        raise BnnError.not_found(f"sweep {sweep_id!r} has no plot {name!r}; plots: {list(plots)}")
    return Response(plots[name], media_type="image/png")


@router.post(
    "/{sweep_id}/cancel",
    summary="Cancel the sweep's queued and running runs",
    responses=error_responses(_UNKNOWN, 409, 422, 503),
)
def cancel_sweep(sweep_id: SweepPath, store: StoreDep, jobs: JobsDep, request: Request) -> Response:
    sweep = _load(store, sweep_id)
    for _, run_id in sweep.runs:
        status = store.get_run(run_id).status
        if status.active:
            store.set_status(run_id, RunStatus.CANCELLED)
            jobs.cancel(run_id, started=status is not RunStatus.QUEUED)
    return json_response(sweep_out(request, store, _load(store, sweep_id), study=False))
