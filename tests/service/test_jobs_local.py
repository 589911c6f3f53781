"""End to end: the real ``bnn serve`` process trains on its Dask LocalCluster of processes."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.service.conftest import TINY, Server
from trainer.store import RunStatus, RunStore


def test_serve_trains_lists_cancels_and_interrupts_runs_on_a_local_cluster(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(BNN_DASK_WORKERS="1", BNN_HEARTBEAT_S="0.5")
    http = server.http
    health = http.get("/healthz").json()
    assert health["jobs"]["started"] is False  # the cluster starts with the first job

    # a tiny regression run: queued -> running -> completed, with its epochs and metrics
    response = http.post("/runs", json={**TINY, "name": "e2e", "tags": ["local"]})
    assert response.status_code == 202
    run_id = response.json()["id"]
    assert http.get(response.headers["location"]).json()["id"] == run_id
    run = server.wait_status(run_id, {"completed", "failed"})
    assert run["status"] == "completed", run["error"]
    assert run["epochs"] == [0, 1, 2] and run["train_host"] and run["finished_at"]
    assert [e["epoch"] for e in http.get(f"/runs/{run_id}/epochs").json()] == [0, 1, 2]
    series = http.get(f"/runs/{run_id}/metrics?names=loss,val_rmse,test_rmse").json()["series"]
    assert len(series["loss"]) == 3 and all(v > 0 for v in series["val_rmse"])
    assert series["test_rmse"][:2] == [None, None] and series["test_rmse"][2] > 0  # once, last
    assert "Dask LocalCluster of 1 processes" in http.get("/healthz").json()["jobs"]["backend"]
    assert http.get("/runs?tag=local").json()["total"] == 1
    # its analysis: the pairwise KL table at an epoch, gradient outliers and a plot as PNG
    kl = http.get(f"/runs/{run_id}/kl?epoch=1").json()
    assert kl["epoch"] == 1 and [r["layer"] for r in kl["table"]["rows"]] == ["layer1", "layer2"]
    outliers = http.get(f"/runs/{run_id}/gradients/outliers?k=3").json()["table"]["rows"]
    assert len(outliers) == 3 and all(r["|g|"] >= 0 for r in outliers)
    png = http.get(f"/runs/{run_id}/plots/kl.png")
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    # a long run, cancelled while it trains: the trainer stops after its epoch
    long = http.post("/runs", json={**TINY, "epochs": 1000}).json()["id"]
    deadline = time.monotonic() + 60
    while len(http.get(f"/runs/{long}").json()["epochs"]) < 2:
        assert time.monotonic() < deadline, server.proc.output()
        time.sleep(0.1)
    cancelled = http.post(f"/runs/{long}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while http.get("/healthz").json()["jobs"]["active_runs"]:  # the job has ended
        assert time.monotonic() < deadline, server.proc.output()
        time.sleep(0.2)
    final = http.get(f"/runs/{long}").json()
    assert final["status"] == "cancelled" and 2 <= len(final["epochs"]) < 1000
    assert http.post(f"/runs/{long}/cancel").status_code == 409
    assert http.delete(f"/runs/{long}").status_code == 204

    # stopping the service while a run trains leaves the run interrupted, not running
    doomed = http.post("/runs", json={**TINY, "epochs": 1000}).json()["id"]
    server.wait_status(doomed, {"running"})
    data_dir = server.proc.log.parent / "data"
    server.stop()
    assert server.proc.popen.returncode in (0, -15), server.proc.output()  # uvicorn re-raises
    with RunStore(data_dir, create=False) as store:
        run_info = store.get_run(doomed)
        assert run_info.status is RunStatus.INTERRUPTED, run_info
        assert store.get_run(run_id).status is RunStatus.COMPLETED
