"""Training jobs on Dask ``distributed``.

:class:`JobRunner` hands queued runs to a Dask cluster: a ``LocalCluster`` of worker
processes (started on the first job), or the scheduler at ``BNN_DASK_SCHEDULER``. Each job
runs :func:`run_training_job` on a worker, which trains with an
:class:`~trainer.remote.HttpRunSink` reporting to the service's public URL, so a worker
on another machine needs nothing but that URL (and the token).

Statuses: the service creates the run QUEUED; the job moves it to RUNNING, then
COMPLETED, FAILED or CANCELLED (``POST /runs/{id}/cancel`` sets CANCELLED and the trainer,
polling ``should_stop`` each epoch, stops). A job whose worker died is marked FAILED by
the runner; a trainer that stops heartbeating is reaped to INTERRUPTED by the store.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from typing import Any

from service.settings import Settings
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore

__all__ = ["JobRunner", "run_training_job"]

log = logging.getLogger("bnn.jobs")


def run_training_job(
    run_id: str,
    config: dict[str, Any],
    report_url: str,
    token: str | None = None,
    data_root: str | None = None,
    heartbeat_s: float = 5.0,
) -> str:
    """Train the queued run ``run_id`` on this worker, reporting to ``report_url``.

    Returns the run's final status. A run that is no longer queued (cancelled before it
    started, or left running by a worker that died) is not trained again. Without
    ``token``, the worker's own ``BNN_API_TOKEN`` is used.
    """
    from trainer.config import parse_config
    from trainer.remote import HttpRunSink
    from trainer.train import Trainer

    token = token or os.environ.get("BNN_API_TOKEN") or None
    with HttpRunSink(report_url, token=token, run_id=run_id) as sink:
        status = RunStatus(sink.get_run(run_id)["status"])
        if status.terminal:
            return status.value
        if status is not RunStatus.QUEUED:
            message = f"the job was restarted after its worker was lost (run was {status.value})"
            sink.set_status(run_id, RunStatus.FAILED, error=message)
            return RunStatus.FAILED.value
        try:
            trainer = Trainer(
                parse_config(config),
                sink=sink,
                progress=False,
                data_root=data_root,
                heartbeat_interval=heartbeat_s,
            )
        except BaseException as exc:  # e.g. a device this worker lacks: the run fails at once
            if isinstance(exc, BnnError):
                detail = f"cannot start training on {socket.gethostname()}: {exc.message}"
            else:
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            with suppress(Exception):
                sink.set_status(run_id, RunStatus.FAILED, error=detail)
            raise
        result = trainer.fit()
        return result.status


class JobRunner:
    """Submits runs to Dask; the cluster (or client) starts with the first job.

    Every Dask call happens on one background thread, so requests never wait for a
    cluster to start: :meth:`submit` returns at once, and a run that cannot be handed to
    Dask is marked FAILED with the reason.
    """

    def __init__(self, settings: Settings, store: RunStore) -> None:
        self.settings = settings
        self.store = store
        self._client: Any = None
        self._cluster: Any = None
        self._futures: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bnn-jobs")
        self._closed = False

    # -- public
    def submit(self, run_id: str, config: dict[str, Any]) -> None:
        """Queue ``run_id`` for training (returns at once)."""
        self._executor.submit(self._submit, run_id, dict(config))

    def cancel(self, run_id: str, *, started: bool) -> None:
        """Drop the run's Dask task if it has not ``started`` (its run was still QUEUED).

        A started task is left to finish: Dask cannot stop a running function, and cancelling
        its future would only forget it while the trainer goes on writing its epoch until it
        sees the cancellation (after the epoch in progress); the job stays in
        :meth:`describe`'s ``active_runs`` (and the run cannot be deleted, :meth:`busy`)
        until it has really ended."""
        if started:
            return
        with self._lock:
            future = self._futures.get(run_id)
        if future is not None:
            self._executor.submit(future.cancel)

    def busy(self, run_id: str) -> bool:
        """Whether the run's training job has not ended yet (queued, running or stopping)."""
        with self._lock:
            return run_id in self._futures

    def resume_queued(self) -> list[str]:
        """Submit runs left QUEUED by an earlier service process; returns their ids."""
        ids = [run.id for run in self.store.list_runs(status=RunStatus.QUEUED)]
        for run_id in ids:
            self.submit(run_id, self.store.get_run(run_id).config)
        return ids

    @property
    def started(self) -> bool:
        return self._client is not None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            active = sorted(self._futures)
        info: dict[str, Any] = {"backend": self.settings.describe_jobs(), "started": self.started}
        if self._client is not None:
            with suppress(Exception):
                info["scheduler"] = self._client.scheduler.address
        info["active_runs"] = active
        return info

    def close(self) -> None:
        """Stop submitting, mark runs still training INTERRUPTED, close the client and cluster."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            running = list(self._futures)
            self._futures.clear()
        for run_id in running:
            with suppress(BnnError):
                if self.store.get_run(run_id).status is RunStatus.RUNNING:
                    self.store.set_status(
                        run_id, RunStatus.INTERRUPTED, error="the service stopped during training"
                    )
        for thing in (self._client, self._cluster):
            if thing is not None:
                with suppress(Exception):
                    thing.close()
        self._client = self._cluster = None

    # -- on the job thread
    def _ensure_client(self) -> Any:
        if self._client is not None:
            return self._client
        from distributed import Client, LocalCluster

        s = self.settings
        if s.dask_scheduler:
            log.info("connecting to the Dask scheduler at %s", s.dask_scheduler)
            self._client = Client(
                s.dask_scheduler, timeout=f"{s.dask_timeout_s}s", set_as_default=False
            )
        else:
            log.info("starting a Dask LocalCluster of %d processes", s.dask_workers)
            self._cluster = LocalCluster(
                n_workers=s.dask_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                scheduler_port=0,
                # Dask's scheduler always serves HTTP (health, metrics); without a dashboard
                # address it would take :8787, so it gets a free loopback port instead
                dashboard_address=s.dask_dashboard or "127.0.0.1:0",
                scheduler_kwargs={"dashboard": bool(s.dask_dashboard)},
                silence_logs=logging.WARNING,
            )
            self._client = Client(self._cluster, set_as_default=False)
        return self._client

    def _submit(self, run_id: str, config: dict[str, Any]) -> None:
        try:
            if self.store.get_run(run_id).status is not RunStatus.QUEUED:
                return  # cancelled (or deleted) while waiting here
            client = self._ensure_client()
            s = self.settings
            data_root = None if s.dask_scheduler else str((s.data_dir / "datasets").resolve())
            future = client.submit(
                run_training_job,
                run_id,
                config,
                s.report_url,
                s.token,
                data_root,
                s.heartbeat_s,
                key=f"bnn-train-{run_id}",
                pure=False,
            )
            with self._lock:
                self._futures[run_id] = future
            future.add_done_callback(partial(self._done, run_id))
        except BnnError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:  # a deleted run needs nothing
                self._fail(run_id, f"cannot submit the training job: {exc}")
        except Exception as exc:
            log.exception("cannot submit run %s", run_id)
            where = self.settings.describe_jobs()
            self._fail(run_id, f"cannot hand the run to {where}: {type(exc).__name__}: {exc}")

    def _done(self, run_id: str, future: Any) -> None:
        with self._lock:
            if self._futures.get(run_id) is future:
                del self._futures[run_id]
        if future.status != "error":
            return
        try:
            exc = future.exception()
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as err:  # the client is closing
            reason = f"unknown ({type(err).__name__})"
        self._fail(run_id, f"training job failed: {reason}")

    def _fail(self, run_id: str, message: str) -> None:
        """Mark the run FAILED unless it already ended (its trainer may have said why)."""
        with suppress(BnnError):
            if not self.store.get_run(run_id).status.terminal:
                self.store.set_status(run_id, RunStatus.FAILED, error=message)
