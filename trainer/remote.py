"""Reporting a run to the service over HTTP, like MLflow's tracking URI.

    sink = HttpRunSink("http://127.0.0.1:8000", token=os.environ.get("BNN_API_TOKEN"))
    train({"dataset": "regression", "epochs": 5}, sink=sink)      # the run lives on the service
    push_run("3f2a9c1b7d4e", "bnn-data", "http://central:8000")    # upload a local run

Every captured epoch is written to a temporary HDF5 file and sent as
``PUT /runs/{id}/epochs/{epoch}``. Network errors and 5xx answers are retried with
exponential backoff; that is safe because the PUT is idempotent (the same bytes again
are accepted, the service stores them once), and status and heartbeat updates are too.
A run is created with a client-chosen id, so a retried create cannot make two runs.

The service checks every uploaded file against the run (:mod:`trainer.store.validate`):
the file's ``run_id`` attribute (this module writes the run's id; an empty one is
accepted), its epoch, the layers, shapes and dtypes of the run's first epoch (or of the
model its configuration describes), its size limits (``BNN_MAX_UPLOAD_LAYERS``,
``BNN_MAX_UPLOAD_ELEMENTS``), fully written datasets, finite ``mu`` and ``sigma`` > 0. A
refused file is a 422 with the reason, raised here as a BnnError with the service's code
(CORRUPT or INVALID_ARGUMENT) and never retried. :func:`push_run` sends the local run's
configuration, so a local run whose files do not match the model that configuration
describes (e.g. trained on other data than its dataset's) is refused from its first epoch.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot
from trainer.store import RunStatus, RunStore, write_epoch_file

__all__ = ["HttpRunSink", "RemoteRun", "push_run"]

_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 409: ErrorCode.CONFLICT}
_RETRY_STATUS = frozenset({500, 502, 503, 504})


@dataclass(frozen=True)
class RemoteRun:
    """A run on the service: its id and the service's JSON description of it."""

    id: str
    url: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> RunStatus:
        return RunStatus(self.data.get("status", "running"))


class HttpRunSink:
    """A :class:`~trainer.train.RunSink` that reports to a bnn service at ``base_url``.

    Args:
        base_url: the service, e.g. ``http://127.0.0.1:8000``.
        token: sent as ``Authorization: Bearer <token>`` (the service's ``BNN_API_TOKEN``).
        run_id: adopt this existing (queued) run instead of creating one.
        retries: extra attempts after a network error or a 5xx answer.
        backoff: first wait in seconds; doubles each attempt (capped at 30 s).
        stop_poll_s: :meth:`should_stop` asks the service at most this often.
        client: an ``httpx.Client`` to use (tests pass a ``TestClient``).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        run_id: str | None = None,
        *,
        retries: int = 5,
        backoff: float = 0.5,
        timeout: float = 60.0,
        stop_poll_s: float = 1.0,
        client: httpx.Client | None = None,
    ) -> None:
        if retries < 0 or backoff < 0:
            raise BnnError.invalid(f"retries and backoff must be >= 0, got {retries}, {backoff}")
        self.base_url = base_url.rstrip("/")
        self.run_id = run_id
        self.retries, self.backoff, self.stop_poll_s = retries, backoff, stop_poll_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=timeout)
        self._headers = headers
        self._stop_checked = -float("inf")
        self._stop = False

    # -- plumbing
    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> HttpRunSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_url(self, run_id: str) -> str:
        return f"{self.base_url}/runs/{run_id}"

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: Callable[[], Any] | None = None,
        headers: dict[str, str] | None = None,
        ok_on_retry: Iterable[int] = (),
    ) -> httpx.Response:
        """One request, retried on network errors and 5xx; BnnError for other failures.

        ``content`` is a callable giving a fresh body per attempt (e.g. opening a file).
        A status in ``ok_on_retry`` counts as success after a retry (the first try did it).
        """
        url = f"{self.base_url}{path}"
        retry_ok = set(ok_on_retry)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)))
            body = content() if content is not None else None
            try:
                response = self._client.request(
                    method,
                    url,
                    json=json,
                    content=body,
                    headers={**self._headers, **(headers or {})},
                )
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            finally:
                if body is not None and hasattr(body, "close"):
                    body.close()
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code}: {_message(response)}"
                continue
            if response.is_success or (attempt and response.status_code in retry_ok):
                return response
            raise _error(method, url, response)
        raise BnnError(
            ErrorCode.UNAVAILABLE,
            f"{method} {url} failed after {self.retries + 1} attempts: {last}",
            url=url,
        )

    # -- RunSink
    def create_run(self, name: str | None, config: dict[str, Any], tags: Any = ()) -> RemoteRun:
        """Register the run (``POST /runs`` with ``execute: false``), or adopt ``run_id``."""
        if self.run_id is not None:
            self.patch(self.run_id, status=RunStatus.RUNNING.value, train_host=socket.gethostname())
            return self.get_run_info(self.run_id)
        run_id = uuid.uuid4().hex[:12]
        body = {**config, "name": name, "tags": list(tags or []), "execute": False}
        body["run_id"] = run_id
        response = self.request("POST", "/runs", json=body, ok_on_retry=(409,))
        self.run_id = run_id
        if response.status_code == 409:  # the first attempt got through
            return self.get_run_info(run_id)
        self.patch(run_id, train_host=socket.gethostname())
        return RemoteRun(run_id, self.run_url(run_id), response.json())

    def write_epoch(self, run_id: str, snap: EpochSnapshot) -> dict[str, Any] | None:
        """Send one epoch; None if the run was cancelled meanwhile (the epoch is dropped)."""
        fd, name = tempfile.mkstemp(prefix=f"bnn-{run_id}-", suffix=".h5")
        os.close(fd)
        try:
            write_epoch_file(name, snap, run_id=run_id)
            try:
                return self.put_epoch_file(run_id, snap.epoch, name)
            except BnnError as exc:
                if exc.code is ErrorCode.CONFLICT and exc.details.get("status") == "cancelled":
                    self._stop = True
                    return None
                raise
        finally:
            Path(name).unlink(missing_ok=True)

    def put_epoch_file(self, run_id: str, epoch: int, path: str | Path) -> dict[str, Any]:
        """``PUT`` one epoch file; the service's epoch record (retrying is safe)."""
        response = self.request(
            "PUT",
            f"/runs/{run_id}/epochs/{int(epoch)}",
            content=lambda: open(path, "rb"),  # noqa: SIM115 - closed by request()
            headers={"Content-Type": "application/x-hdf5"},
        )
        out: dict[str, Any] = response.json()
        return out

    def heartbeat(self, run_id: str) -> None:
        self.patch(run_id, heartbeat=True)

    def set_status(
        self, run_id: str, status: RunStatus | str, error: str | None = None
    ) -> dict[str, Any]:
        return self.patch(run_id, status=RunStatus.parse(status).value, error=error)

    def set_divergence(
        self, run_id: str, *, step: int, epoch: int, layer: str | None = None
    ) -> dict[str, Any]:
        """Report where the run first became non-finite (before its ``diverged`` status)."""
        return self.patch(
            run_id, diverged_step=int(step), diverged_epoch=int(epoch), diverged_layer=layer
        )

    def should_stop(self, run_id: str) -> bool:
        """True once the run was cancelled (or deleted) on the service; never raises."""
        now = time.monotonic()
        if not self._stop and now - self._stop_checked >= self.stop_poll_s:
            self._stop_checked = now
            try:
                response = self._client.get(self.run_url(run_id), headers=self._headers)
            except httpx.TransportError:
                return False
            if response.status_code == 404:
                self._stop = True
            elif response.is_success:
                self._stop = response.json().get("status") == RunStatus.CANCELLED.value
        return self._stop

    # -- other calls
    def patch(self, run_id: str, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        out: dict[str, Any] = self.request("PATCH", f"/runs/{run_id}", json=body).json()
        return out

    def get_run(self, run_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", f"/runs/{run_id}").json()
        return out

    def get_run_info(self, run_id: str) -> RemoteRun:
        return RemoteRun(run_id, self.run_url(run_id), self.get_run(run_id))


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _error(method: str, url: str, response: httpx.Response) -> BnnError:
    """The service's error answer as a BnnError (its code when it sent one)."""
    code, details = None, {}
    try:
        err = response.json()["error"]
        code, details = ErrorCode(err["code"]), dict(err.get("details") or {})
    except (ValueError, KeyError, TypeError):
        pass
    code = code or _HTTP_CODES.get(response.status_code, ErrorCode.INVALID_ARGUMENT)
    message = f"{method} {url}: HTTP {response.status_code}: {_message(response)}"
    return BnnError(code, message, http_status=response.status_code, **details)


def push_run(
    run_id: str,
    data_dir: str | Path,
    url: str,
    token: str | None = None,
    *,
    db_url: str | None = None,
    sink: HttpRunSink | None = None,
) -> dict[str, Any]:
    """Upload a run of a local store to the service at ``url`` under the same id.

    Safe to repeat: epochs already there with the same bytes are accepted again, and the
    run is created only once. Returns counts and the run's URL on the service.
    """
    with RunStore(data_dir, db_url, create=False) as store:
        run = store.get_run(run_id)
        epochs = store.list_epochs(run.id)
        files = {e.epoch: store.data_dir / e.file for e in epochs}
    remote = sink or HttpRunSink(url, token=token)
    try:
        body = {**run.config, "name": run.name, "tags": run.tags, "execute": False}
        created = True
        try:
            remote.request("POST", "/runs", json={**body, "run_id": run.id})
        except BnnError as exc:
            if exc.code is not ErrorCode.CONFLICT:  # 409: pushed before; upload what is missing
                raise
            created = False
            state = RunStatus(remote.get_run(run.id)["status"])
            if state.terminal and state is not run.status:
                raise BnnError(
                    ErrorCode.CONFLICT,
                    f"run {run.id!r} is {state.value} on {url} but {run.status.value} locally",
                    run_id=run.id,
                ) from None
        for epoch, path in files.items():
            remote.put_epoch_file(run.id, epoch, path)
        remote.patch(
            run.id,
            summary=run.summary or None,
            train_host=run.host or None,
            diverged_step=run.diverged_step,
            diverged_epoch=run.diverged_epoch,
            diverged_layer=run.diverged_layer,
        )
        if run.status.terminal or run.status is RunStatus.INTERRUPTED:
            remote.set_status(run.id, run.status, error=run.error)
    finally:
        if sink is None:
            remote.close()
    return {
        "run_id": run.id,
        "url": remote.run_url(run.id),
        "created": created,
        "epochs": len(files),
        "status": run.status.value,
    }
