"""``/runs/{id}/epochs`` and ``/runs/{id}/metrics``: captured epochs, their files, uploads.

``PUT /runs/{id}/epochs/{epoch}`` takes one HDF5 epoch file as the raw body. It is
written once: streamed into a temporary file of the store's naming in the run's folder
(:meth:`RunStore.receive_epoch`; 413 past ``BNN_MAX_UPLOAD_BYTES``), checked against the
schema and the run (422 naming the problem: see :mod:`trainer.store.validate`; limits
``BNN_MAX_UPLOAD_LAYERS`` and ``BNN_MAX_UPLOAD_ELEMENTS``), fsynced and renamed into
place. The same bytes again answer 200 with the stored record, other bytes for a stored
epoch 409. A temporary file that is not renamed into place is removed.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from service.deps import EpochPath, RunDep, SettingsDep, StoreDep, require_token
from service.routers import (
    AUTH_RESPONSES,
    Format,
    FormatQuery,
    error_responses,
    json_response,
    table_response,
)
from service.schemas import EpochOut, MetricsOut
from trainer.errors import BnnError, ErrorCode
from trainer.store import EpochFile, EpochInfo

__all__ = ["epoch_out", "router"]

HDF5_TYPES = frozenset({"", "application/x-hdf5", "application/x-hdf", "application/octet-stream"})
router = APIRouter(
    prefix="/runs/{run_id}",
    tags=["epochs"],
    dependencies=[Depends(require_token)],
    responses=AUTH_RESPONSES,
)
UNKNOWN_RUN = (404, "unknown run")
UNKNOWN_EPOCH = (404, "unknown run, or an epoch that was not captured (the details list them)")
EPOCH_COLUMNS = ("epoch", "size", "checksum", "created_at")


def epoch_out(info: EpochInfo) -> dict[str, Any]:
    return {
        "run_id": info.run_id,
        "epoch": info.epoch,
        "metrics": dict(info.metrics),
        "size": info.size,
        "checksum": info.checksum,
        "created_at": info.created_at,
    }


@router.get(
    "/epochs",
    response_model=list[EpochOut],
    responses=error_responses(UNKNOWN_RUN, 422, 503),
    summary="Captured epochs of a run",
)
def list_epochs(run: RunDep, store: StoreDep, fmt: FormatQuery = Format.JSON) -> Response:
    """One row per captured epoch; CSV has the metrics as columns."""
    epochs = [epoch_out(e) for e in store.list_epochs(run.id)]
    rows = [
        {k: v for k, v in e.items() if k not in ("metrics", "run_id")} | e["metrics"]
        for e in epochs
    ]
    columns = list(dict.fromkeys([*EPOCH_COLUMNS, *(k for r in rows for k in r)]))
    return table_response(fmt, epochs, rows, columns, f"{run.id}_epochs.csv")


@router.get(
    "/epochs/{epoch}",
    response_model=EpochOut,
    responses=error_responses(UNKNOWN_EPOCH, 422, 503),
    summary="One captured epoch",
)
def get_epoch(run: RunDep, epoch: EpochPath, store: StoreDep) -> Response:
    """The catalog's record of the epoch and ``storage``, how its file stores it (read from
    the file's metadata). 404 listing the captured epochs when ``epoch`` was not captured."""
    info = store.get_epoch(run.id, epoch)
    with EpochFile(store.epoch_path(run.id, epoch), f"{run.id}/{info.file}") as ef:
        storage = ef.storage()
    return json_response(epoch_out(info) | {"storage": storage})


@router.get(
    "/epochs/{epoch}/file",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/x-hdf5": {}}},
        **error_responses(UNKNOWN_EPOCH, 422, 503),
    },
    summary="Download the epoch's HDF5 file",
)
def get_epoch_file(run: RunDep, epoch: EpochPath, store: StoreDep) -> Response:
    path = store.epoch_path(run.id, epoch)
    name = f"{run.id}_epoch_{epoch:06d}.h5"
    return FileResponse(path, media_type="application/x-hdf5", filename=name)


@router.get(
    "/metrics",
    response_model=MetricsOut,
    responses=error_responses((404, "unknown run, or a metric no epoch of it has"), 422, 503),
    summary="Per-epoch metric series",
)
def get_metrics(
    run: RunDep,
    store: StoreDep,
    fmt: FormatQuery = Format.JSON,
    names: Annotated[str | None, Query(description="comma-separated metric names")] = None,
) -> Response:
    """``series[name][i]`` is the metric at ``epochs[i]``: null (an empty cell in CSV) where
    that epoch lacks it; "nan", "inf" or "-inf" where the trainer recorded a value that is
    not finite (a diverged run). 404 naming a metric that no epoch of the run has."""
    infos = store.list_epochs(run.id)
    known = list(dict.fromkeys(k for e in infos for k in e.metrics))
    wanted = known
    if names is not None:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise BnnError.not_found(
                f"run {run.id!r} has no metric {unknown[0]!r}; its metrics are {known}",
                names=unknown,
                metrics=known,
            )
    epochs = [e.epoch for e in infos]
    series = {n: [e.metrics.get(n) for e in infos] for n in wanted}
    rows = [{"epoch": e.epoch, **{n: e.metrics.get(n) for n in wanted}} for e in infos]
    payload = {"run_id": run.id, "epochs": epochs, "series": series}
    return table_response(fmt, payload, rows, ["epoch", *wanted], f"{run.id}_metrics.csv")


@router.put(
    "/epochs/{epoch}",
    status_code=201,
    response_model=EpochOut,
    responses={
        200: {"model": EpochOut, "description": "the same file was stored before"},
        **error_responses(
            UNKNOWN_RUN,
            (409, "other bytes are stored under this epoch, or the run has finished"),
            (413, "the file is over the limit (BNN_MAX_UPLOAD_BYTES)"),
            (415, "a Content-Type other than application/x-hdf5 or application/octet-stream"),
            (422, "not an epoch file of this run (the message names the problem), or empty"),
            503,
        ),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-hdf5": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "minLength": 1,
                        "description": "one HDF5 epoch file (not empty)",
                    }
                }
            },
        }
    },
    summary="Upload one captured epoch (an HDF5 epoch file)",
)
async def put_epoch(
    run: RunDep, epoch: EpochPath, request: Request, store: StoreDep, settings: SettingsDep
) -> Response:
    """201 when stored, 200 when these bytes were stored before (a retry), 409 for other
    bytes under a stored epoch or a new epoch for a finished run, 422 for a bad file."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in HDF5_TYPES:
        raise HTTPException(415, f"the body must be application/x-hdf5, got {media!r}")
    upload = await run_in_threadpool(store.receive_epoch, run.id, epoch)
    with upload:  # the temp file is removed unless committed
        async for chunk in request.stream():  # BodyLimit raises 413 past the limit
            upload.write(chunk)
        if upload.size == 0:
            raise BnnError.invalid("the body is empty; send one HDF5 epoch file")
        stored = await run_in_threadpool(store.find_epoch, run.id, epoch, upload.checksum)
        if stored is not None:
            return json_response(epoch_out(stored), 200)
        current = await run_in_threadpool(store.get_run, run.id)
        if current.status.terminal:
            raise BnnError(
                ErrorCode.CONFLICT,
                f"run {run.id!r} is {current.status.value}; it takes no new epochs",
                run_id=run.id,
                status=current.status.value,
            )
        info = await run_in_threadpool(
            functools.partial(upload.commit, limits=settings.upload_limits())
        )
        location = str(request.url_for("get_epoch", run_id=run.id, epoch=epoch))
        return json_response(epoch_out(info), 201, headers={"Location": location})
