"""Fixtures for the API tests: apps on SQLite and PostgreSQL, fake jobs, real server processes.

The PostgreSQL fixtures and ``make_snapshot`` are the run-store tests' (tests/trainer).
Real processes (``bnn serve``, ``dask scheduler``/``worker``) bind 127.0.0.1 only, run in
their own process group, and that group is killed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.deps import get_jobs
from service.settings import Settings
from tests.trainer.conftest import _snapshot, pg_database, pg_url  # noqa: F401 - fixtures
from trainer.snapshot import EpochSnapshot
from trainer.store import write_epoch_file

with warnings.catch_warnings():  # starlette asks for httpx2; httpx is what the project uses
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {"dataset": "regression", "prior": "learnable", "epochs": 3, "n_train": 64, "n_test": 32}
TINY |= {"eval_samples": 2}


class FakeJobs:
    """Records what the API hands to the job runner instead of starting Dask."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.stopping: set[str] = set()  # cancelled while started, job not ended yet

    def submit(self, run_id: str, config: dict[str, Any]) -> None:
        self.submitted.append(run_id)

    def cancel(self, run_id: str, *, started: bool) -> None:
        self.cancelled.append(run_id)
        if started:  # a started job goes on until its trainer sees the cancellation
            self.stopping.add(run_id)

    def busy(self, run_id: str) -> bool:
        return run_id in self.stopping

    def describe(self) -> dict[str, Any]:
        return {"backend": "fake"}


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest) -> str | None:
    """The app's ``database_url``: None (SQLite in the data dir) or a PostgreSQL schema."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_url"))


ClientFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(tmp_path: Path, catalog_url: str | None) -> Iterator[ClientFactory]:
    """``make_client(**settings)``: a started TestClient; ``client.jobs`` is its FakeJobs."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = Settings(
            data_dir=tmp_path / f"data{len(clients)}", database_url=catalog_url, **overrides
        )
        app = create_app(settings)
        jobs = FakeJobs()
        app.dependency_overrides[get_jobs] = lambda: jobs
        client = TestClient(app)
        client.__enter__()
        client.jobs = jobs  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    """An app without authentication on this test's catalog."""
    return make_client()


@pytest.fixture
def epoch_file(tmp_path: Path) -> Callable[..., Path]:
    """``epoch_file(epoch, seed=0, **snapshot_options)``: path of a valid HDF5 epoch file."""

    def make(epoch: int, seed: int = 0, **kwargs: Any) -> Path:
        path = tmp_path / f"upload_{epoch}_{seed}.h5"
        snap: EpochSnapshot = _snapshot(epoch, seed=seed, **kwargs)
        write_epoch_file(path, snap, run_id="x")
        return path

    return make


def external_run(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> str:
    response = client.post("/runs", json={**TINY, "execute": False, **body}, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without BNN_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


class Proc:
    """A child process in its own process group, logging to a file; ``stop`` kills the group."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(args), cwd=REPO, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # the group: cluster workers too
        self.popen.wait(10)
        self._fh.close()


class Server:
    """A real ``python -m service.cli serve`` process on a free loopback port."""

    def __init__(self, data_dir: Path, env: dict[str, str], token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        env = clean_env(**env, **({"BNN_API_TOKEN": token} if token else {}))
        args = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--data-dir", str(data_dir), "--log-level", "warning"]
        self.proc = Proc(args, data_dir.parent / f"server_{self.port}.log", env)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=30)

    def wait_ready(self, timeout: float = 60.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise AssertionError(f"server exited:\n{self.proc.output()}")
            try:
                if self.http.get("/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.proc.output()}")

    def wait_status(self, run_id: str, statuses: set[str], timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        run: dict = {}
        while time.monotonic() < deadline:
            run = self.http.get(f"/runs/{run_id}").json()
            if run.get("status") in statuses:
                return run
            time.sleep(0.3)
        raise AssertionError(f"run {run_id} still {run.get('status')}:\n{self.proc.output()}")

    def stop(self) -> None:
        self.http.close()
        self.proc.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(token=None, **env)``: a ready server, stopped (group killed) afterwards."""
    servers: list[Server] = []

    def start(token: str | None = None, **env: str) -> Server:
        data = tmp_path / f"server{len(servers)}" / "data"
        data.parent.mkdir()
        server = Server(data, env, token)
        servers.append(server)
        return server.wait_ready()

    yield start
    for server in servers:
        server.stop()
