"""A real uvicorn server in a subprocess, seeded with small real runs, for contract tests.

    python -m tests.service.live_server --data-dir D --port P [--database-url URL] [--token T]

runs ``create_app`` under uvicorn with the job runner replaced by a recorder (no Dask
cluster, no training: ``POST /runs`` with ``execute: true``, ``POST /sweeps`` and
``POST /studies`` register their runs as QUEUED and nothing trains them). Everything else
is the service as ``bnn serve`` runs it: HTTP/1.1 over loopback, the catalog (SQLite or
PostgreSQL), the data directory, the error handlers and the body limits.

:class:`LiveServer` starts it in its own process group; :func:`seeded_server` pushes tiny
runs trained here (:func:`train_seed_runs`) to it over HTTP, so that path parameters can
name real ids.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


class _RecordingJobs:
    """The job runner's interface; records submissions, trains nothing."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, run_id: str, config: dict[str, Any]) -> None:
        self.submitted.append(run_id)

    def cancel(self, run_id: str, *, started: bool) -> None:
        pass

    def busy(self, run_id: str) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        return {"backend": "recording (contract tests)", "submitted": len(self.submitted)}


def serve(argv: list[str] | None = None) -> None:
    """The server process: ``create_app`` with recorded jobs under uvicorn."""
    import uvicorn

    from service.app import create_app
    from service.deps import get_jobs
    from service.settings import Settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    settings = Settings(
        data_dir=args.data_dir,
        database_url=args.database_url,
        api_token=args.token,
        port=args.port,
        max_upload_bytes=4 * 2**20,
    )
    app = create_app(settings)
    jobs = _RecordingJobs()
    app.dependency_overrides[get_jobs] = lambda: jobs
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """``python -m tests.service.live_server`` on a free loopback port; ``stop()`` kills it."""

    def __init__(
        self, data_dir: Path, database_url: str | None = None, token: str | None = None
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.log = data_dir.parent / f"live_server_{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        args = [sys.executable, "-m", "tests.service.live_server"]
        args += ["--data-dir", str(data_dir), "--port", str(self.port)]
        args += ["--database-url", database_url] if database_url else []
        args += ["--token", token] if token else []
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=60)
        self.run_ids: list[str] = []

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.output()}")
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/healthz").status_code == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.output()}")

    def seed(self, local: Path) -> list[str]:
        """Pushes every run of the local store ``local`` (see :func:`train_seed_runs`)."""
        from trainer.remote import push_run
        from trainer.store import RunStore

        with RunStore(local, create=False) as store:
            ids = [run.id for run in store.list_runs()]
        for run_id in ids:
            push_run(run_id, local, self.url, self.token)
        self.run_ids += ids
        return ids

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._fh.close()


TRAIN = ["--dataset", "regression", "--epochs", "3", "--n-train", "64", "--n-test", "32"]
TRAIN += ["--eval-samples", "2", "--no-progress"]
SEED_RUNS = {  # name -> extra options; alpha and beta share an architecture
    "alpha": ["--prior", "learnable"],
    "beta": ["--prior", "fixed", "--seed", "1"],
    "gamma": ["--prior", "learnable", "--widths", "8,8", "--grad-capture", "layer"],
}


def train_seed_runs(local: Path) -> Path:
    """Trains the :data:`SEED_RUNS` (a few seconds each) into the local store ``local``."""
    from service.cli import main

    if not local.exists() or not any(local.iterdir()):
        local.mkdir(parents=True, exist_ok=True)
        for name, extra in SEED_RUNS.items():
            code = main(["train", *TRAIN, *extra, "--name", name, "--data-dir", str(local)])
            assert code == 0, f"training seed run {name} failed ({code})"
    return local


def seeded_server(
    root: Path, local: Path, database_url: str | None = None, token: str | None = None
) -> LiveServer:
    """A started server holding the runs of ``local`` (see :func:`train_seed_runs`)."""
    server = LiveServer(root / "data", database_url, token).wait_ready()
    try:
        server.seed(local)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class Finding:
    """One schemathesis failure: the operation (or "Stateful tests"), check code, text."""

    operation: str
    code: str
    text: str

    def headline(self) -> str:
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        said = next((line for line in lines if line.startswith("`{")), "")[:160]
        return f"{self.operation} {self.code}: {said}"


@dataclass
class ContractRun:
    """What one ``st run`` found: counts from its JSON report, findings from its JUnit."""

    returncode: int
    cases: int
    operations: int
    findings: list[Finding] = field(default_factory=list)
    errors: list[Finding] = field(default_factory=list)
    output: str = ""

    @property
    def server_errors(self) -> list[Finding]:
        return [f for f in self.findings if f.code == "ST101"]

    @property
    def schema_violations(self) -> list[Finding]:
        return [f for f in self.findings if f.code != "ST101"]


def run_schemathesis(
    server: LiveServer,
    report_dir: Path,
    *,
    max_examples: int,
    seed: int = 20261129,
    phases: str = "examples,coverage,fuzzing,stateful",
    workers: int = 1,
    max_time: int | None = None,
    timeout: float = 1800,
) -> ContractRun:
    """``st run <server>/openapi.json --checks all`` with a fixed seed; the report parsed."""
    import xml.etree.ElementTree as ET

    report_dir.mkdir(parents=True, exist_ok=True)
    args = [str(Path(sys.executable).with_name("st")), "run", f"{server.url}/openapi.json"]
    args += ["--checks", "all", "--seed", str(seed), "--max-examples", str(max_examples)]
    args += ["--phases", phases, "--workers", str(workers), "--no-color"]
    args += ["--generation-database", "none", "--request-timeout", "60"]
    args += ["--report", "junit,json", "--report-dir", str(report_dir)]
    args += ["--max-time", str(max_time)] if max_time else []
    for name, value in server.headers.items():
        args += ["--header", f"{name}: {value}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.contract_hooks"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        args, cwd=report_dir, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    (report_dir / "st_output.txt").write_text(output)
    junit = sorted(report_dir.glob("junit*.xml"))
    summary = sorted(report_dir.glob("json*.json"))
    if not junit or not summary:
        raise RuntimeError(f"schemathesis wrote no report ({done.returncode}):\n{output[-5000:]}")
    report = json.loads(summary[-1].read_text())
    run = ContractRun(
        done.returncode,
        int(report["test_cases"]["generated"]),
        int(report["operations"]["tested"]),
        output=output,
    )
    for case in ET.parse(junit[-1]).getroot().iter("testcase"):
        for element in case:
            finding = Finding(case.get("name", "?"), element.get("message", ""), element.text or "")
            if element.tag == "failure":
                run.findings.append(finding)
            elif element.tag == "error":
                run.errors.append(finding)
    return run


if __name__ == "__main__":
    serve()
