"""The embedded LocalCluster's Dask HTTP server: no dashboard and no fixed port unless
``BNN_DASK_DASHBOARD`` asks for one (Dask's scheduler serves HTTP whatever it is told, and
took :8787 before, warning "Port 8787 is already in use" when two services ran)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service.jobs import JobRunner
from service.settings import Settings
from trainer.store import RunStore


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize("dashboard", [None, "127.0.0.1:0"])
def test_local_cluster_dashboard_only_when_asked(tmp_path: Path, dashboard: str | None) -> None:
    settings = Settings(data_dir=tmp_path, dask_workers=1, dask_dashboard=dashboard)
    store = RunStore(tmp_path)
    runner = JobRunner(settings, store)
    try:
        runner._ensure_client()
        server = runner._cluster.scheduler.http_server
        host, port = next(iter(server._sockets.values())).getsockname()[:2]
        assert host == "127.0.0.1" and port != 8787
        assert _status(port, "/health") == 200
        assert _status(port, "/status") == (200 if dashboard else 404)
    finally:
        runner.close()
        store.close()
