"""End to end: a real ``dask scheduler`` and ``dask worker`` on loopback run a job that
reports back to the service over HTTP, with authentication on."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.service.conftest import TINY, TOKEN, Proc, Server, clean_env, free_port


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """A scheduler and one single-threaded worker process; yields the scheduler address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = clean_env()
    scheduler = Proc(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", str(port), "--no-dashboard"],
        tmp_path / "scheduler.log", env,
    )  # fmt: skip
    worker = Proc(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--host", "127.0.0.1",
         "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--death-timeout", "60"],
        tmp_path / "worker.log", env,
    )  # fmt: skip
    try:
        yield address
    finally:
        worker.stop()
        scheduler.stop()


def test_a_remote_scheduler_and_worker_train_a_run_that_reports_over_http(
    dask_cluster: str, start_server: Callable[..., Server]
) -> None:
    server = start_server(token=TOKEN, BNN_DASK_SCHEDULER=dask_cluster, BNN_DASK_TIMEOUT_S="60")
    http = server.http  # sends the token
    assert http.post("/runs", json=TINY, headers={"Authorization": ""}).status_code == 401
    response = http.post("/runs", json={**TINY, "tags": ["cluster"]})
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    run = server.wait_status(run_id, {"completed", "failed"}, timeout=120)
    assert run["status"] == "completed", run["error"]
    assert run["epochs"] == [0, 1, 2] and run["train_host"]
    jobs = http.get("/healthz").json()["jobs"]
    assert jobs["scheduler"] == dask_cluster and jobs["backend"].startswith("Dask scheduler")
    series = http.get(f"/runs/{run_id}/metrics?names=loss").json()["series"]["loss"]
    assert len(series) == 3
    # the service started no cluster of its own: the only worker is the separate process
    deadline = time.monotonic() + 10
    while http.get("/healthz").json()["jobs"]["active_runs"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
