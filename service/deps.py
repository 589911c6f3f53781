"""Dependencies of the routers, as ``Annotated`` aliases (one place for all of them).

def get_run(run: RunDep) -> ...        # the run, or 404 naming the id
def list_runs(store: StoreDep) -> ...  # the open RunStore
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request

from service.jobs import JobRunner
from service.settings import Settings
from trainer.store import RunInfo, RunStore

__all__ = [
    "EpochPath",
    "JobsDep",
    "RunDep",
    "SettingsDep",
    "StoreDep",
    "get_jobs",
    "get_settings",
    "get_store",
    "load_run",
    "require_token",
]

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_EPOCH = 2**31 - 1


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> RunStore:
    store: RunStore = request.app.state.store
    return store


def get_jobs(request: Request) -> JobRunner:
    jobs: JobRunner = request.app.state.jobs
    return jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[RunStore, Depends(get_store)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]


def require_token(request: Request, settings: SettingsDep) -> None:
    """401 unless the request carries ``Authorization: Bearer <BNN_API_TOKEN>``.

    Only writes need it, and reads too when ``BNN_AUTH_READS`` is set; no token configured
    means no authentication.
    """
    token = settings.token
    if token is None or (request.method not in _WRITES and not settings.auth_reads):
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), token.encode()
    ):
        what = "a missing" if not given else "a wrong"
        raise HTTPException(
            401,
            f"this request needs 'Authorization: Bearer <token>' (BNN_API_TOKEN); got {what} token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def load_run(run_id: str, store: StoreDep) -> RunInfo:
    """The run ``run_id`` (after stale runs are reaped); 404 naming it when unknown."""
    return store.get_run(run_id)


RunDep = Annotated[RunInfo, Depends(load_run)]
EpochPath = Annotated[int, Path(ge=0, le=MAX_EPOCH, description="a captured epoch")]
