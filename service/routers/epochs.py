"""``/runs/{id}/epochs`` and ``/runs/{id}/metrics``: captured epochs, their files, uploads.

``PUT /runs/{id}/epochs/{epoch}`` takes one HDF5 epoch file as the raw body. It is
streamed to a temporary file of the service's own naming (413 past
``BNN_MAX_UPLOAD_BYTES``), checked against the schema and the run (422 naming the
problem: see :mod:`trainer.store.validate`; limits ``BNN_MAX_UPLOAD_LAYERS`` and
``BNN_MAX_UPLOAD_ELEMENTS``), and stored once: the same bytes again answer 200 with the
stored record, other bytes for a stored epoch 409. The temporary file is always removed.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
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
from trainer.store import EpochInfo, RunStore
from trainer.store._paths import locked_tmp_file
from trainer.store.validate import UploadLimits, check_epoch_file, run_reference

__all__ = ["UPLOAD_DIR", "epoch_out", "router"]

UPLOAD_DIR = "uploads"  # under the data directory: temporary files of uploads in progress
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
    """404 listing the captured epochs when ``epoch`` was not captured."""
    return json_response(epoch_out(store.get_epoch(run.id, epoch)))


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


def _check_upload(
    path: Path, store: RunStore, run_id: str, epoch: int, limits: UploadLimits
) -> None:
    """The upload checked against the run before it is copied anywhere (see
    :mod:`trainer.store.validate`): 422 naming the problem (CORRUPT for a bad file,
    INVALID_ARGUMENT for one that breaks a limit or does not fit the run or the URL).

    ``import_epoch_file`` checks the copy it keeps again; this first pass refuses a hostile
    file before it is copied and fsynced into the run's folder.
    """
    reference = run_reference(store, run_id)
    name = f"uploaded for run {run_id!r} epoch {epoch}"
    check_epoch_file(
        path, run_id=run_id, epoch=epoch, reference=reference, limits=limits, name=name
    )


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
    uploads = settings.data_dir / UPLOAD_DIR
    with locked_tmp_file(uploads, "upload-", ".h5") as (fd, path):
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():  # BodyLimit raises 413 past the limit
                    digest.update(chunk)
                    fh.write(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise BnnError(ErrorCode.STORAGE, f"cannot store the upload: {exc.strerror}") from exc
        if size == 0:
            raise BnnError.invalid("the body is empty; send one HDF5 epoch file")
        stored = await run_in_threadpool(store.find_epoch, run.id, epoch, digest.hexdigest())
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
        limits = settings.upload_limits()
        await run_in_threadpool(_check_upload, path, store, run.id, epoch, limits)
        info = await run_in_threadpool(
            functools.partial(store.import_epoch_file, limits=limits), run.id, epoch, path
        )
        location = str(request.url_for("get_epoch", run_id=run.id, epoch=epoch))
        return json_response(epoch_out(info), 201, headers={"Location": location})
