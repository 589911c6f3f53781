"""JobRunner without a cluster: failures to reach Dask become failed runs, never lost ones."""

from __future__ import annotations

import time
from pathlib import Path

from service.jobs import JobRunner
from service.settings import Settings
from tests.service.conftest import TINY, free_port
from trainer.store import RunStatus, RunStore


def wait_for(store: RunStore, run_id: str, status: RunStatus, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run.status is status:
            return run.error or ""
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} is {store.get_run(run_id).status}, not {status}")


def test_an_unreachable_scheduler_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    settings = Settings(data_dir=tmp_path, dask_scheduler=address, dask_timeout_s=1)
    with RunStore(tmp_path) as store:
        queued = [store.create_run(config=TINY, status="queued").id for _ in range(2)]
        running = store.create_run(config=TINY, status="running").id
        runner = JobRunner(settings, store)
        try:
            assert sorted(runner.resume_queued()) == sorted(queued)  # left by an earlier process
            for run_id in queued:
                error = wait_for(store, run_id, RunStatus.FAILED)
                assert address in error and "cannot hand the run" in error
            assert runner.describe()["active_runs"] == []
            assert store.get_run(running).status is RunStatus.RUNNING  # not a job of ours
        finally:
            runner.close()
        runner.close()  # twice is fine


def test_cancelled_or_deleted_runs_are_not_submitted(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    settings = Settings(data_dir=tmp_path, dask_scheduler=address, dask_timeout_s=1)
    with RunStore(tmp_path) as store:
        cancelled = store.create_run(config=TINY, status="queued").id
        store.set_status(cancelled, "cancelled")
        runner = JobRunner(settings, store)
        runner.submit(cancelled, TINY)
        runner.submit("deleted-run", TINY)
        runner.close()  # waits for the submissions
        assert not runner.started  # nothing needed a client
        assert store.get_run(cancelled).status is RunStatus.CANCELLED


def test_report_url_defaults_to_this_server(tmp_path: Path) -> None:
    assert Settings(host="0.0.0.0", port=9000).report_url == "http://127.0.0.1:9000"
    assert Settings(host="::1", port=9000).report_url == "http://[::1]:9000"
    assert Settings(public_url="http://api:8000/").report_url == "http://api:8000"
    assert Settings(api_token="  ").token is None  # compose passes an empty variable
