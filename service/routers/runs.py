"""``/runs``: start, register (``PUT /runs/{id}``: a run of any training loop), list,
inspect, update, cancel and delete runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from service.columns import RUN_COLUMNS
from service.deps import JobsDep, RunDep, SettingsDep, StoreDep, require_token
from service.routers import (
    AUTH_RESPONSES,
    Format,
    FormatQuery,
    error_responses,
    json_response,
    table_response,
)
from service.schemas import (
    MAX_TAGS,
    RUN_ID,
    RunCreate,
    RunOut,
    RunPage,
    RunPatch,
    TrackedRunCreate,
)
from service.settings import Settings
from trainer.config import TrainConfig, check_device, parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.store import EpochInfo, RunInfo, RunStatus
from trainer.store import RunPage as CatalogPage
from trainer.store._records import encode_json
from trainer.store.catalog import METRIC_CONDITION, parse_metric_condition
from trainer.tracking import TRACKING_KEY

__all__ = ["check_limits", "router", "run_out"]

router = APIRouter(
    prefix="/runs", tags=["runs"], dependencies=[Depends(require_token)], responses=AUTH_RESPONSES
)
UNKNOWN_RUN = (404, "unknown run")
ACTIVE_ONLY = (409, "the run has finished (only queued and running runs can change)")

TRAIN_HOST = "train_host"  # kept in the run's summary: where its trainer runs
LIST_COLUMNS = RUN_COLUMNS  # GET /runs?format=csv (service.columns: shared with the client)


def run_out(request: Request, run: RunInfo, epochs: Sequence[EpochInfo] | None = None) -> dict:
    """A run as the API shows it; with ``epochs``, also the captured epochs and last metrics."""
    out = run.to_dict()
    summary = dict(out.pop("summary"))
    out["train_host"] = summary.pop(TRAIN_HOST, None)
    out["summary"] = summary
    out["url"] = str(request.url_for("get_run", run_id=run.id))
    if epochs is not None:
        out["epochs"] = [e.epoch for e in epochs]
        out["metrics"] = dict(epochs[-1].metrics) if epochs else {}
    return out


def check_limits(config: TrainConfig, settings: Settings) -> None:
    """INVALID_ARGUMENT naming the limit a training request exceeds, or the device that
    the service's own workers lack (a LocalCluster runs on this machine; the workers of a
    remote scheduler check their device when the job starts, and the run fails at once)."""
    checks = [
        ("epochs", config.epochs, settings.max_epochs, "BNN_MAX_EPOCHS"),
        ("widths (layers)", len(config.hidden), settings.max_layers, "BNN_MAX_LAYERS"),
        ("widths", max(config.hidden, default=0), settings.max_width, "BNN_MAX_WIDTH"),
        ("mc_samples", config.mc_samples, settings.max_mc_samples, "BNN_MAX_MC_SAMPLES"),
        ("eval_samples", config.eval_samples, settings.max_mc_samples, "BNN_MAX_MC_SAMPLES"),
        ("val_samples", config.val_samples, settings.max_mc_samples, "BNN_MAX_MC_SAMPLES"),
        ("laplace_examples", config.laplace_examples, settings.max_n_train, "BNN_MAX_N_TRAIN"),
        ("batch_size", config.batch, settings.max_batch_size, "BNN_MAX_BATCH_SIZE"),
        ("n_train", config.n_train or 0, settings.max_n_train, "BNN_MAX_N_TRAIN"),
        ("n_test", config.n_test or 0, settings.max_n_train, "BNN_MAX_N_TRAIN"),
        ("n_val", config.n_val or 0, settings.max_n_train, "BNN_MAX_N_TRAIN"),
    ]
    for field, value, limit, setting in checks:
        if value > limit:
            raise BnnError.invalid(
                f"{field} {value} exceeds this service's limit {limit} ({setting})",
                field=field.split(" ")[0],
                value=value,
                limit=limit,
                setting=setting,
            )
    if not settings.dask_scheduler:
        check_device(config.device)


@router.post(
    "",
    status_code=202,
    response_model=RunOut,
    responses={
        201: {"model": RunOut, "description": "registered (execute: false)"},
        **error_responses(
            (409, "a run with this run_id exists"),
            (
                422,
                "an invalid field, or over one of this service's limits (the message names "
                "the setting)",
            ),
            503,
        ),
    },
    summary="Start a training run, or register one trained elsewhere",
)
def create_run(
    body: RunCreate, request: Request, store: StoreDep, jobs: JobsDep, settings: SettingsDep
) -> Response:
    """``execute: true`` (default): 202, the run is QUEUED and trains on Dask.
    ``execute: false``: 201, a RUNNING run that a remote trainer fills (``PUT`` epochs,
    ``PATCH`` status). Both answer with the run and a ``Location`` header.
    """
    config = parse_config(body.train_config())
    if body.execute:
        check_limits(config, settings)
    status = RunStatus.QUEUED if body.execute else RunStatus.RUNNING
    run = store.create_run(
        config.name, config.to_json_dict(), config.tags, status, run_id=body.run_id
    )
    if body.execute:
        jobs.submit(run.id, run.config)
    out = run_out(request, run, [])
    return json_response(out, 202 if body.execute else 201, headers={"Location": out["url"]})


@router.get(
    "",
    response_model=RunPage,
    responses=error_responses(
        (422, "an invalid parameter, e.g. a metric condition (the message names it)"), 503
    ),
    summary="List runs, newest first",
)
def list_runs(
    store: StoreDep,
    request: Request,
    fmt: FormatQuery = Format.JSON,
    status: RunStatus | None = None,
    tag: Annotated[
        list[str], Query(max_length=MAX_TAGS, description="runs with all these tags (repeated)")
    ] = [],  # noqa: B006 - FastAPI copies a default list
    dataset: str | None = None,
    prior: str | None = None,
    name: Annotated[
        str | None,
        Query(max_length=256, description="runs whose name contains this (any case)"),
    ] = None,
    metric: Annotated[
        list[str],
        Query(
            max_length=MAX_TAGS,
            description="runs whose latest captured epoch has a metric within a bound, e.g. "
            "`test_nll<0.1` or `test_acc >= 0.9` (operators <, <=, >, >=); repeat for several, "
            "all must hold. A run without that metric (or with a non-finite value) is left out",
            json_schema_extra={"items": {"type": "string", "pattern": METRIC_CONDITION}},
        ),
    ] = [],  # noqa: B006 - FastAPI copies a default list
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> Response:
    """Filter by name (substring), status, tags, dataset, prior kind and metric bounds;
    filtered and paginated by the catalog. ``total`` counts all matches. A bad metric
    condition is 422 naming it."""
    conditions = [parse_metric_condition(text) for text in metric]
    given = [name, dataset, prior, *tag]
    if any(v is not None and "\x00" in v for v in given):  # in no run; PostgreSQL refuses NUL
        found = CatalogPage(0, [])
    else:
        found = store.query_runs(
            name=name,
            tags=tag,
            status=status,
            dataset=dataset,
            prior=prior,
            metrics=conditions,
            limit=limit,
            offset=offset,
        )
    page = [run_out(request, r.run) for r in found.runs]
    rows = [{**r["config"], **r} for r in page]
    payload = {"total": found.total, "limit": limit, "offset": offset, "runs": page}
    headers = {"X-Total-Count": str(found.total)}
    return table_response(fmt, payload, rows, LIST_COLUMNS, "runs.csv", headers)


@router.get(
    "/{run_id}",
    response_model=RunOut,
    responses=error_responses(UNKNOWN_RUN, 503),
    summary="One run, its epochs and last metrics",
)
def get_run(run: RunDep, request: Request, store: StoreDep) -> Response:
    return json_response(run_out(request, run, store.list_epochs(run.id)))


@router.put(
    "/{run_id}",
    status_code=201,
    response_model=RunOut,
    responses={
        200: {"model": RunOut, "description": "registered before with this same body (a retry)"},
        **error_responses(
            (409, "another run has this id"),
            (422, "an invalid id or field (the message names it)"),
            503,
        ),
    },
    summary="Register a run of any training loop (trainer.track) under this id",
)
def register_run(
    run_id: Annotated[str, Path(pattern=RUN_ID, description="the client's id for the run")],
    body: TrackedRunCreate,
    request: Request,
    store: StoreDep,
) -> Response:
    """201: a RUNNING run that its trainer (``trainer.track`` in its own loop) fills through
    ``PUT /runs/{id}/epochs/{epoch}`` and ``PATCH``, with a ``Location`` header; 200 with the
    run when this same registration was made before (a retry is safe); 409 when another run
    has the id. The ``config`` is stored as given, with a ``tracking`` key (``{}`` unless
    given): it is not a training configuration, so the run's first epoch fixes the layout of
    the later ones.
    """
    config = {**body.config, TRACKING_KEY: body.config.get(TRACKING_KEY, {})}
    try:
        run = store.create_run(body.name, config, body.tags, RunStatus.RUNNING, run_id=run_id)
    except BnnError as exc:
        if exc.code is not ErrorCode.CONFLICT:
            raise
        existing = store.get_run(run_id)
        same = (existing.name, existing.tags, encode_json(existing.config)) == (
            body.name or run_id,
            body.tags,
            encode_json(config),
        )
        if not same:
            raise BnnError(
                ErrorCode.CONFLICT,
                f"run {run_id!r} exists with another name, tags or config; choose another id",
                run_id=run_id,
            ) from None
        return json_response(run_out(request, existing, store.list_epochs(run_id)))
    out = run_out(request, run, [])
    return json_response(out, 201, headers={"Location": out["url"]})


@router.patch(
    "/{run_id}",
    response_model=RunOut,
    responses=error_responses(
        UNKNOWN_RUN,
        (409, "a status change the run's life cycle forbids, or a heartbeat on a finished run"),
        422,
        503,
    ),
    summary="Report status, metrics, heartbeat",
)
def patch_run(body: RunPatch, run: RunDep, request: Request, store: StoreDep) -> Response:
    """Applied in order: name and tags, heartbeat, summary and train_host, divergence, then
    status/error.

    ``name`` renames the run and ``tags`` replace its tags, in any status (the dashboard's
    edit form). ``heartbeat: true`` records that the trainer is alive now (server time);
    anything but a JSON boolean is 422. Status changes follow the run life cycle (409
    otherwise, e.g. from completed); a heartbeat on a finished run is 409 too.
    """
    if body.name is not None or body.tags is not None:
        store.set_labels(run.id, body.name, body.tags)
    if body.heartbeat:
        store.heartbeat(run.id)
    summary = dict(body.summary or {})
    if body.train_host is not None:
        summary[TRAIN_HOST] = body.train_host
    if summary:
        store.set_summary(run.id, summary)
    divergence = (body.diverged_step, body.diverged_epoch, body.diverged_layer)
    if any(v is not None for v in divergence):
        if body.diverged_step is None or body.diverged_epoch is None:
            raise BnnError.invalid("diverged_step and diverged_epoch are reported together")
        store.set_divergence(run.id, body.diverged_step, body.diverged_epoch, body.diverged_layer)
    if body.status is not None or body.error is not None:
        store.set_status(run.id, body.status or store.get_run(run.id).status, error=body.error)
    return json_response(run_out(request, store.get_run(run.id), store.list_epochs(run.id)))


@router.post(
    "/{run_id}/cancel",
    response_model=RunOut,
    responses=error_responses(UNKNOWN_RUN, ACTIVE_ONLY, 503),
    summary="Cancel a queued or running run",
)
def cancel_run(run: RunDep, request: Request, store: StoreDep, jobs: JobsDep) -> Response:
    """The run becomes CANCELLED at once; its trainer stops after the epoch in progress."""
    if run.status.terminal:
        raise BnnError(
            ErrorCode.CONFLICT,
            f"run {run.id!r} is already {run.status.value}; only active runs can be cancelled",
            run_id=run.id,
            status=run.status.value,
        )
    started = run.status is not RunStatus.QUEUED
    cancelled = store.set_status(run.id, RunStatus.CANCELLED)
    jobs.cancel(run.id, started=started)
    return json_response(run_out(request, cancelled, store.list_epochs(run.id)))


@router.delete(
    "/{run_id}",
    status_code=204,
    responses=error_responses(
        UNKNOWN_RUN,
        (409, "the run is queued or running (cancel it first), or its job is still stopping"),
        503,
    ),
    summary="Delete a run: catalog rows and files",
)
def delete_run(run: RunDep, store: StoreDep, jobs: JobsDep) -> Response:
    """409 while the run is queued or running (cancel it first), and while the training job
    of a cancelled run is still finishing its epoch (retry once it has ended)."""
    if run.status.active:
        raise BnnError(
            ErrorCode.CONFLICT,
            f"run {run.id!r} is {run.status.value}; cancel it before deleting it",
            run_id=run.id,
            status=run.status.value,
        )
    if jobs.busy(run.id):
        raise BnnError(
            ErrorCode.CONFLICT,
            f"run {run.id!r} is {run.status.value} but its training job is still stopping "
            "(it ends after the epoch in progress); retry when it has ended",
            run_id=run.id,
            status=run.status.value,
        )
    store.delete_run(run.id)
    return Response(status_code=204)
