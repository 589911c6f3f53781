"""A real dashboard to point a browser at: ``bnn serve`` on a free loopback port, its data
directory holding small runs trained here, and headless Chromium driven by Playwright.

Used by the browser tests (``test_dashboard_browser.py``) and by the screenshot script
(``python -m tests.browser.screenshots``). Chromium is the system's (``/usr/bin/chromium``,
or ``BNN_CHROMIUM=/path``), not Playwright's own download; Playwright's bundled Chromium
is used when it happens to be installed and no system one is found.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.service.conftest import Server

__all__ = [
    "CI",
    "SEED_RUNS",
    "TOKEN",
    "Site",
    "find_chromium",
    "missing",
    "train_runs",
]

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
TOKEN = "browser-token"  # writes need it (as in production); reads stay open
# name the user gave -> `bnn train` options (a few seconds each, 4 epochs, two widths)
TINY = ["--dataset", "regression", "--epochs", "4", "--n-train", "64", "--n-test", "32"]
TINY += ["--eval-samples", "2", "--no-progress"]
SEED_RUNS: dict[str, list[str]] = {
    "learnable prior, narrow": ["--prior", "learnable", "--widths", "8", "--tag", "browser"],
    "fixed prior, wide": ["--prior", "fixed", "--widths", "16", "--seed", "1", "--tag", "browser"],
}


def find_chromium() -> str | None:
    """A Chromium (or Chrome) executable: ``$BNN_CHROMIUM``, else the first on PATH, else
    Playwright's own download if installed; None when there is none."""
    given = os.environ.get("BNN_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    with contextlib.suppress(Exception):  # Playwright missing, or its browser not downloaded
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            path = pw.chromium.executable_path
        if Path(path).is_file():
            return path
    return None


def missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (it is in the dev extra)"
    if find_chromium() is None:
        return "no Chromium found (apt-get install chromium, or set BNN_CHROMIUM=/path)"
    return None


def train_runs(data_dir: Path, runs: dict[str, list[str]], common: list[str] = TINY) -> None:
    """Trains ``runs`` (name -> extra ``bnn train`` options) into ``data_dir``, in this
    process (the server is not started yet: nothing else writes there)."""
    from service.cli import main

    data_dir.mkdir(parents=True, exist_ok=True)
    for name, extra in runs.items():
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(["train", *common, *extra, "--name", name, "--data-dir", str(data_dir)])
        assert code == 0, f"training {name!r} failed ({code}):\n{out.getvalue()}"


@dataclass
class Site:
    """``bnn serve`` (token for writes, a Dask LocalCluster of one process) on ``root/data``
    with ``runs`` trained there first, then ``prepare(data_dir)`` (more runs written
    straight into the store, say); ``ids`` maps each run's name to its id."""

    root: Path
    runs: dict[str, list[str]] = field(default_factory=lambda: dict(SEED_RUNS))
    common: list[str] = field(default_factory=lambda: list(TINY))
    prepare: Callable[[Path], None] | None = None
    server: Server | None = None
    ids: dict[str, str] = field(default_factory=dict)
    sweeps: dict[str, str] = field(default_factory=dict)  # name -> id

    def start(self) -> Site:
        data = self.root / "data"
        train_runs(data, self.runs, self.common)
        if self.prepare is not None:
            self.prepare(data)
        env = {"BNN_DASK_WORKERS": "1", "BNN_HEARTBEAT_S": "1", "OMP_NUM_THREADS": "1"}
        self.server = Server(data, env, TOKEN).wait_ready()
        listed = self.http.get("/runs", params={"limit": 100}).json()
        self.ids = {r["name"]: r["id"] for r in listed["runs"]}
        assert set(self.runs) <= set(self.ids), (listed, self.runs)
        self.sweeps = {s["name"]: s["id"] for s in self.http.get("/sweeps").json()["sweeps"]}
        return self

    @property
    def url(self) -> str:
        assert self.server is not None, "Site.start() first"
        return self.server.url

    @property
    def http(self) -> Any:  # httpx.Client with the token
        assert self.server is not None, "Site.start() first"
        return self.server.http

    def output(self) -> str:
        return self.server.proc.output() if self.server else ""

    def submit(self, **config: Any) -> str:
        """``POST /runs`` (trained by the server's Dask cluster): the new run's id."""
        response = self.http.post("/runs", json=config)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def wait_status(self, run_id: str, statuses: set[str], timeout: float = 120) -> dict:
        assert self.server is not None
        return self.server.wait_status(run_id, statuses, timeout)

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no run is queued or running."""
        deadline = time.monotonic() + timeout
        while self.http.get("/healthz").json()["jobs"].get("active_runs"):
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.5)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
