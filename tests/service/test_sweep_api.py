"""``/sweeps`` on SQLite and PostgreSQL: the jobs are recorded (FakeJobs) and then trained
in-process as a Dask worker would, so the study appears."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from service.demo.sweeps import train_stored_run
from service.deps import get_jobs
from service.routers import sweeps
from service.settings import Settings
from tests.service.conftest import AUTH, TOKEN, FakeJobs

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

TINY = {"dataset": "regression", "epochs": 2, "n_train": 64, "n_test": 32, "eval_samples": 2}


@pytest.fixture
def api(tmp_path: Path, catalog_url: str | None) -> Iterator[tuple[TestClient, FakeJobs, Settings]]:
    settings = Settings(data_dir=tmp_path / "data", database_url=catalog_url, api_token=TOKEN)
    app = create_app(settings)
    if not any(getattr(r, "path", "") == "/sweeps" for r in app.routes):
        app.include_router(sweeps.router)  # until service/app.py registers it
    jobs = FakeJobs()
    app.dependency_overrides[get_jobs] = lambda: jobs
    with TestClient(app) as client:
        yield client, jobs, settings


def _train_all(settings: Settings, sweep: dict[str, Any]) -> None:
    for run in sweep["runs"]:
        config = sweep_run_config(settings, run["run_id"])
        train_stored_run(run["run_id"], config, str(settings.data_dir), settings.database_url)


def sweep_run_config(settings: Settings, run_id: str) -> dict[str, Any]:
    from trainer.store import RunStore

    with RunStore(settings.data_dir, settings.database_url) as store:
        return store.get_run(run_id).config


def test_width_sweep_post_get_study_csv_and_plots(api: Any) -> None:
    client, jobs, settings = api
    body = {"kind": "width", "name": "widths", "base": TINY, "grid": {"widths": [4, 8]}}
    assert client.post("/sweeps", json=body).status_code == 401  # writes need the token
    response = client.post("/sweeps", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    sweep = response.json()
    assert response.headers["location"] == sweep["url"]
    assert [r["label"] for r in sweep["runs"]] == ["w4", "w8"]
    assert jobs.submitted == [r["run_id"] for r in sweep["runs"]]
    assert sweep["counts"] == {"queued": 2} and not sweep["done"] and sweep["study"] is None
    run = client.get(f"/runs/{sweep['runs'][0]['run_id']}").json()
    assert run["config"]["widths"] == [4] and f"sweep:{sweep['id']}" in run["tags"]
    assert run["name"] == "widths/w4"
    assert client.get(f"/sweeps/{sweep['id']}?format=csv").status_code == 409
    assert client.get(f"/sweeps/{sweep['id']}/plots/width_posteriors.png").status_code == 409

    _train_all(settings, sweep)
    got = client.get(f"/sweeps/{sweep['id']}").json()
    assert got["done"] and got["counts"] == {"completed": 2}
    study = got["study"]
    assert study["columns"][:3] == ["run", "layer", "width"]
    assert [(r["run"], r["layer"]) for r in study["rows"]] == [
        ("w4", "layer1"),
        ("w4", "layer2"),
        ("w8", "layer1"),
        ("w8", "layer2"),
    ]
    assert all(r["Weight prior sigma"] > 0 for r in study["rows"])
    assert client.get(f"/sweeps/{sweep['id']}").json()["study"] == study  # cached
    csv = client.get(f"/sweeps/{sweep['id']}", params={"format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.count("\n") == 5
    for url in got["plots"]:
        png = client.get(url)
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n", url
    assert client.get(f"/sweeps/{sweep['id']}/plots/nope.png").status_code == 404
    listed = client.get("/sweeps").json()
    assert [s["id"] for s in listed["sweeps"]] == [sweep["id"]] and listed["sweeps"][0]["done"]
    assert client.get("/sweeps?kind=optim").json()["total"] == 0


def test_optim_sweep_cancel_limits_and_errors(api: Any) -> None:
    client, jobs, _ = api
    body = {"kind": "optim", "base": TINY, "grid": {"optimizer": ["adam", "sgd"]}}
    sweep = client.post("/sweeps", json=body, headers=AUTH).json()
    assert len(sweep["runs"]) == 16 and len(jobs.submitted) == 16
    cancelled = client.post(f"/sweeps/{sweep['id']}/cancel", headers=AUTH).json()
    assert cancelled["counts"] == {"cancelled": 16} and cancelled["done"]
    assert sorted(jobs.cancelled) == sorted(jobs.submitted)
    assert client.get(f"/sweeps/{sweep['id']}").json()["study"] is None  # nothing completed
    bad = [
        ({"kind": "depth"}, "kind"),
        ({"kind": "width", "grid": {"widths": [0]}}, "widths"),
        ({"kind": "width", "grid": {"depth": [1]}}, "unknown grid factors"),
        ({"kind": "width", "base": {**TINY, "epochs": 5000}}, "BNN_MAX_EPOCHS"),
        (
            {"kind": "optim", "base": TINY, "grid": {"lr_schedule": ["none", "cosine", "step"]}},
            "design 'half'",
        ),
    ]
    for body, words in bad:
        response = client.post("/sweeps", json=body, headers=AUTH)
        assert response.status_code == 422, (body, response.text)
        assert words in response.text, response.text
    response = client.get("/sweeps/0123456789ab")
    assert response.status_code == 404 and "0123456789ab" in response.json()["error"]["message"]


class InlineJobs(FakeJobs):
    """Trains each submitted run at once, in the request's thread (as a worker would)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def submit(self, run_id: str, config: dict[str, Any]) -> None:
        super().submit(run_id, config)
        s = self.settings
        train_stored_run(run_id, config, str(s.data_dir), s.database_url)


def test_bnn_sweep_command_through_a_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import client as client_module
    from service.cli import main

    settings = Settings(data_dir=tmp_path / "data")
    app = create_app(settings)
    if not any(getattr(r, "path", "") == "/sweeps" for r in app.routes):
        app.include_router(sweeps.router)
    jobs = InlineJobs(settings)
    app.dependency_overrides[get_jobs] = lambda: jobs

    real = client_module.Client
    with TestClient(app) as client:
        # the command's service.client.Client sends its requests through the app's TestClient
        monkeypatch.setattr(client_module, "Client", lambda u, t=None, **_: real(u, t, http=client))
        out = tmp_path / "out"
        args = ["sweep", "width", "--widths", "4,8", "--epochs", "2", "--n-train", "64",
                "--n-test", "32", "--eval-samples", "2", "--service", "http://testserver",
                "--out", str(out)]  # fmt: skip
        assert main(args) == 0
    sweep_id = capsys.readouterr().out.strip()
    assert len(jobs.submitted) == 2
    assert (out / "study.csv").read_text().startswith("run,layer,width")
    assert (out / "width_posteriors.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "width_priors_learnable.png").exists()
    assert json.loads((out / "sweep.json").read_text())["id"] == sweep_id
