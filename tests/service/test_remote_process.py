"""End to end across processes: ``bnn train --tracking-url`` and ``bnn push`` against a real
server, with authentication on (SQLite catalog) and off (PostgreSQL catalog)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.cli import main
from tests.service.conftest import REPO, TOKEN, Server, clean_env
from trainer.store import RunStore

TRAIN_ARGS = ["--dataset", "regression", "--prior", "learnable", "--epochs", "3"]
TRAIN_ARGS += ["--n-train", "64", "--n-test", "32", "--eval-samples", "2", "--no-progress"]


def bnn(*args: str, token: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m service.cli ARGS`` in its own process (killed after 120 s)."""
    extra = {**env, **({"BNN_API_TOKEN": token} if token else {})}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO, env=clean_env(**extra), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(
    params=[("sqlite", TOKEN), ("postgresql", None)], ids=["sqlite-auth", "postgresql-no-auth"]
)
def server(request: pytest.FixtureRequest, start_server: Callable[..., Server]) -> Server:
    catalog, token = request.param
    env = {"BNN_DASK_WORKERS": "1", "BNN_MAX_UPLOAD_BYTES": str(2**20)}
    if catalog == "postgresql":
        env["BNN_DATABASE_URL"] = str(request.getfixturevalue("pg_url"))
    return start_server(token=token, **env)


def test_a_trainer_process_and_a_push_report_over_http(server: Server, tmp_path: Path) -> None:
    http, token = server.http, server.token
    # a separate trainer process reports its run (BNN_TRACKING_URL, token from BNN_API_TOKEN)
    out = bnn("train", *TRAIN_ARGS, "--name", "proc", token=token, BNN_TRACKING_URL=server.url)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    run = http.get(f"/runs/{run_id}").json()
    assert run["status"] == "completed" and run["name"] == "proc" and run["epochs"] == [0, 1, 2]
    assert server.url in out.stderr

    # a retried epoch: the same bytes again are accepted once more, other bytes refused
    one = http.get(f"/runs/{run_id}/epochs/1/file").content
    h5 = {"Content-Type": "application/x-hdf5"}
    retry = http.put(f"/runs/{run_id}/epochs/1", content=one, headers=h5)
    assert retry.status_code == 200 and retry.json()["epoch"] == 1
    zero = http.get(f"/runs/{run_id}/epochs/0/file").content
    assert http.put(f"/runs/{run_id}/epochs/1", content=zero, headers=h5).status_code == 409
    assert [e["epoch"] for e in http.get(f"/runs/{run_id}/epochs").json()] == [0, 1, 2]
    huge = http.put(f"/runs/{run_id}/epochs/3", content=b"\0" * 2**22, headers=h5)
    assert huge.status_code == 413 and huge.json()["error"]["details"]["limit"] == 2**20

    # bnn push: a run trained into a local directory goes up under its own id
    local = tmp_path / "laptop"
    assert main(["train", *TRAIN_ARGS, "--data-dir", str(local), "--name", "laptop"]) == 0
    with RunStore(local, create=False) as store:
        (pushed,) = store.list_runs()
        checksums = {e.epoch: e.checksum for e in store.list_epochs(pushed.id)}
    out = bnn("push", pushed.id, "--to", server.url, "--data-dir", str(local), token=token)
    assert out.returncode == 0, out.stderr  # (pushing again is tested in test_remote.py)
    assert out.stdout.strip().splitlines()[-1] == f"{server.url}/runs/{pushed.id}"
    remote = http.get(f"/runs/{pushed.id}").json()
    assert remote["status"] == "completed" and remote["name"] == "laptop"
    epochs = http.get(f"/runs/{pushed.id}/epochs").json()
    assert {e["epoch"]: e["checksum"] for e in epochs} == checksums
    assert http.get("/runs").json()["total"] == 2

    if token is None:
        return
    # with BNN_API_TOKEN on the service, writes without it are refused (exit status 2)
    anonymous = httpx.get(f"{server.url}/runs")
    assert anonymous.status_code == 200  # reads stay open
    denied = bnn("train", *TRAIN_ARGS, "--tracking-url", server.url)
    assert denied.returncode == 2 and "401" in denied.stderr
    denied = bnn("push", pushed.id, "--to", server.url, "--data-dir", str(local))
    assert denied.returncode == 2 and "401" in denied.stderr
    assert http.get("/runs").json()["total"] == 2
