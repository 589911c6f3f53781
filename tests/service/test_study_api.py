"""``/studies``: in-process with FakeJobs (runs trained here as a Dask worker would), the
background advancer and a restart, errors; and end to end on a real ``bnn serve`` process
with its Dask LocalCluster."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from service.app import create_app
from service.demo.sweeps import train_stored_run
from service.deps import get_jobs
from service.routers.studies import EXAMPLE, MAX_STUDY_RUNS
from service.settings import Settings
from tests.service.conftest import AUTH, TOKEN, FakeJobs, Server
from trainer.store import RunStore

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

BASE = {"dataset": "regression", "epochs": 2, "n_train": 64, "n_test": 32, "eval_samples": 5}
BASE |= {"grad_capture": "none"}
GRID = [0.003, 0.01]
SPEC: dict[str, Any] = {
    "name": "priors",
    "base": BASE,
    "arms": {
        "fixed": {"config": {"prior": "fixed"}},
        "learnable": {"config": {"prior": "learnable"}, "tune": {"lr": GRID}},
    },
    "seeds": [0, 1],
    "baseline": "fixed",
    "tune_seed": 100,
}
PNG = b"\x89PNG\r\n\x1a\n"


def _app(settings: Settings, jobs: FakeJobs) -> TestClient:
    app = create_app(settings)
    app.dependency_overrides[get_jobs] = lambda: jobs
    return TestClient(app)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_token=SecretStr(TOKEN))


@pytest.fixture
def api(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, FakeJobs]]:
    monkeypatch.setenv("BNN_STUDY_POLL_S", "0.1")
    jobs = FakeJobs()
    with _app(settings, jobs) as client:
        yield client, jobs


def _train(settings: Settings, run_ids: list[str]) -> None:
    with RunStore(settings.data_dir) as store:
        configs = {rid: store.get_run(rid).config for rid in run_ids}
    for run_id, config in configs.items():
        assert train_stored_run(run_id, config, str(settings.data_dir)) == "completed"


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _check_tables(study: dict[str, Any]) -> None:
    tables = study["tables"]
    summary = tables["summary"]
    assert [r["arm"] for r in summary["rows"]] == ["fixed", "learnable"]
    for metric in ("nll", "sq_error", "rmse", "coverage_95"):
        assert {metric, f"{metric} lo", f"{metric} hi"} <= set(summary["columns"])
        for row in summary["rows"]:
            assert row[f"{metric} lo"] <= row[metric] <= row[f"{metric} hi"], (metric, row)
    diffs = tables["differences"]["rows"]
    assert [r["arm"] for r in diffs] == ["learnable"]
    assert 0 <= diffs[0]["nll p"] <= 1 and isinstance(diffs[0]["nll significant"], bool)
    settings = {r["arm"]: r for r in tables["settings"]["rows"]}
    assert settings["fixed"]["tuning budget (runs)"] == 0
    assert settings["learnable"]["tuning budget (runs)"] == 2
    assert [r["arm"] for r in tables["display"]["rows"]] == ["fixed", "learnable"]
    assert study["statements"] and all("vs fixed" in s for s in study["statements"])


def test_study_tunes_advances_by_itself_and_reports(api: Any, settings: Settings) -> None:
    client, jobs = api
    assert client.post("/studies", json=SPEC).status_code == 401  # writes need the token
    response = client.post("/studies", json=SPEC, headers=AUTH)
    assert response.status_code == 202, response.text
    study = response.json()
    sid = study["id"]
    assert response.headers["location"] == study["url"] and study["phase"] == "tuning"
    assert [r["label"] for r in study["runs"]] == ["tune/learnable/0", "tune/learnable/1"]
    assert [r["settings"] for r in study["runs"]] == [{"lr": v} for v in GRID]
    assert jobs.submitted == [r["run_id"] for r in study["runs"]] and not study["done"]
    run = client.get(study["runs"][0]["url"]).json()
    assert run["config"]["seed"] == 100 and f"study:{sid}" in run["tags"]
    got = client.get(f"/studies/{sid}").json()
    assert got["tables"] is None and got["phase"] == "tuning"
    assert client.get(f"/studies/{sid}?format=csv").status_code == 409
    assert client.get(f"/studies/{sid}/plots/metrics.png").status_code == 409

    _train(settings, list(jobs.submitted))
    # the background advancer (not a GET of this study) registers and submits the evaluation
    listed = _wait(
        lambda: [s for s in client.get("/studies").json()["studies"] if s["phase"] != "tuning"],
        30,
        "the advancer",
    )
    assert listed[0]["phase"] == "evaluation" and listed[0]["counts"] == {
        "completed": 2,
        "queued": 4,
    }
    study = client.get(f"/studies/{sid}").json()
    assert study["chosen"]["learnable"] in [{"lr": v} for v in GRID]
    evaluation = [r for r in study["runs"] if r["phase"] == "evaluation"]
    assert [r["label"] for r in evaluation] == [
        "fixed/s0",
        "learnable/s0",
        "fixed/s1",
        "learnable/s1",
    ]
    assert len(jobs.submitted) == len(set(jobs.submitted)) == 6  # each run handed over once
    learnable = client.get(evaluation[1]["url"]).json()["config"]
    assert learnable["lr"] == study["chosen"]["learnable"]["lr"] and learnable["seed"] == 0

    _train(settings, [r["run_id"] for r in evaluation[:2]])  # seed 0 done for every arm
    partial = client.get(f"/studies/{sid}").json()
    assert not partial["done"] and partial["compared_seeds"] == [0]
    _check_tables(partial)
    _train(settings, [r["run_id"] for r in evaluation[2:]])
    study = client.get(f"/studies/{sid}").json()
    assert study["done"] and study["compared_seeds"] == [0, 1]
    _check_tables(study)
    with RunStore(settings.data_dir) as store:  # cached in the study's summary
        assert store.get_sweep(sid).summary["tables"]["seeds"] == [0, 1]
    assert client.get(f"/studies/{sid}").json()["tables"] == study["tables"]

    heads = {"summary": "arm,nll,", "differences": "arm,nll diff", "settings": "arm,overrides"}
    for table, first in [*heads.items(), ("display", "arm,")]:
        csv = client.get(f"/studies/{sid}", params={"format": "csv", "table": table})
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        assert csv.text.startswith(first), csv.text[:80]
        assert csv.text.count("\n") == (2 if table == "differences" else 3)
    assert client.get(f"/studies/{sid}?format=csv&table=nope").status_code == 422
    assert len(study["plots"]) == 2
    for url in study["plots"]:
        png = client.get(url)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content[:8] == PNG
    missing = client.get(f"/studies/{sid}/plots/nope.png")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    listed = client.get("/studies").json()
    assert [s["id"] for s in listed["studies"]] == [sid] and listed["studies"][0]["done"]
    assert client.get("/studies?phase=tuning").json()["total"] == 0


def test_get_advances_and_a_restart_resumes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BNN_STUDY_POLL_S", "0")  # no loop: GET and the start advance
    first = FakeJobs()
    with _app(settings, first) as client:
        one = client.post("/studies", json=SPEC, headers=AUTH).json()
        two = client.post("/studies", json=SPEC, headers=AUTH).json()
        _train(settings, list(first.submitted))
        assert client.get("/studies").json()["studies"][0]["phase"] == "tuning"
        assert client.get(f"/studies/{one['id']}").json()["phase"] == "evaluation"
        assert len(first.submitted) == 8
        _train(settings, first.submitted[4:])  # nothing left queued for the real runner
    second = FakeJobs()
    with _app(settings, second) as client:  # the restarted service advances the other one
        assert len(second.submitted) == 4
        study = client.get(f"/studies/{two['id']}").json()
        assert study["phase"] == "evaluation" and second.submitted == [
            r["run_id"] for r in study["runs"] if r["phase"] == "evaluation"
        ]
        client.get(f"/studies/{two['id']}")
        assert len(second.submitted) == 4


def test_cancel_and_errors(api: Any, settings: Settings) -> None:
    client, jobs = api
    study = client.post("/studies", json=SPEC, headers=AUTH).json()
    cancelled = client.post(f"/studies/{study['id']}/cancel", headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["phase"] == "cancelled" and body["counts"] == {"cancelled": 2} and body["done"]
    assert sorted(jobs.cancelled) == sorted(jobs.submitted)
    time.sleep(0.3)  # the advancer skips a cancelled study
    again = client.get(f"/studies/{study['id']}").json()
    assert again["phase"] == "cancelled" and len(again["runs"]) == 2 and again["tables"] is None
    assert client.post(f"/studies/{study['id']}/cancel").status_code == 401

    arms = SPEC["arms"]
    bad: list[tuple[dict[str, Any], list[str]]] = [
        ({"arms": {"fixed": {"config": {"depth": 3}}}}, ["arms.fixed.config", "depth"]),
        ({"arms": {"fixed": {"confg": {}}}}, ["arms.fixed.confg"]),
        (
            {"arms": {**arms, "other": {"tune": {"lr": [0.1, 0.2, 0.3]}}}},
            ["same tuning budget"],
        ),
        ({"seeds": [0, 100]}, ["tune_seed 100"]),
        ({"baseline": "nope"}, ["baseline 'nope' is not an arm"]),
        ({"arms": {"fixed": {"config": {"prior": "wide"}}}}, ["arms.fixed.config", "'wide'"]),
        ({"arms": {"fixed": {"config": {"epochs": 5000}}}}, ["arms.fixed.config.epochs", "1000"]),
        ({"arms": {"fixed": {"tune": {"epochs": [2, 5000]}}}}, ["tune/fixed/1", "BNN_MAX_EPOCHS"]),
        (
            {"arms": {**arms, "big": {"tune": {"lr": [1e-3, 1e-2]}, "config": {"widths": [9999]}}}},
            ["arms.big.config.widths", "BNN_MAX_WIDTH"],
        ),
        ({"seeds": list(range(200, 200 + MAX_STUDY_RUNS))}, [f"limit {MAX_STUDY_RUNS}"]),
        ({"arms": {}}, ["at least one arm"]),
    ]
    for change, words in bad:
        response = client.post("/studies", json={**SPEC, **change}, headers=AUTH)
        assert response.status_code == 422, (change, response.text)
        for word in words:
            assert word in response.json()["error"]["message"], (word, response.text)
    response = client.get("/studies/0123456789ab")
    assert response.status_code == 404 and "0123456789ab" in response.json()["error"]["message"]
    assert client.get("/studies/0123456789ab/plots/metrics.png").status_code == 404
    assert client.post("/studies/0123456789ab/cancel", headers=AUTH).status_code == 404
    sweep = client.post(
        "/sweeps", json={"kind": "width", "base": BASE, "grid": {"widths": [4]}}, headers=AUTH
    ).json()
    assert client.get(f"/studies/{sweep['id']}").status_code == 404  # a sweep, not a study
    with RunStore(settings.data_dir) as store:  # a stored spec this version cannot read
        broken = store.create_sweep("study", {"arms": {"a": {"config": {"gone": 1}}}}).id
    listed = {s["id"]: s for s in client.get("/studies").json()["studies"]}
    assert "no longer validates" in listed[broken]["error"] and listed[study["id"]]["done"]
    assert client.get(f"/studies/{broken}").status_code == 409
    assert client.get(f"/studies/{broken}/plots/metrics.png").status_code == 409
    from service.demo.study import StudySpec

    StudySpec.model_validate(EXAMPLE).validate_configs()  # the OpenAPI example is valid
    examples = client.get("/openapi.json").json()["paths"]["/studies"]["post"]["requestBody"]
    assert "three arms" in str(examples)


def test_study_on_a_live_server(start_server: Callable[..., Server]) -> None:
    """Tuning, the advance and evaluation on a real service and its Dask LocalCluster."""
    server = start_server(
        token=TOKEN, BNN_DASK_WORKERS="1", BNN_HEARTBEAT_S="0.5", BNN_STUDY_POLL_S="0.5"
    )
    response = server.http.post("/studies", json=SPEC)
    assert response.status_code == 202, response.text
    url = response.json()["url"]
    phases = ["tuning"]
    deadline = time.monotonic() + 180
    study: dict[str, Any] = {}
    while time.monotonic() < deadline:
        study = server.http.get(url).json()
        if study["phase"] != phases[-1]:
            phases.append(study["phase"])
        if study["done"] and study["tables"] is not None:
            break
        time.sleep(0.5)
    assert study.get("done"), (study.get("counts"), server.proc.output()[-3000:])
    assert phases == ["tuning", "evaluation"], phases
    assert study["counts"] == {"completed": 6}
    assert study["chosen"]["learnable"] in [{"lr": v} for v in GRID]
    _check_tables(study)
    csv = server.http.get(url, params={"format": "csv", "table": "differences"})
    assert csv.headers["content-type"].startswith("text/csv") and "learnable" in csv.text
    for plot in study["plots"]:
        png = server.http.get(plot)
        assert png.headers["content-type"] == "image/png" and png.content[:8] == PNG
    server.stop()  # the advancer thread stops with the service
    assert server.proc.popen.returncode in (0, -15), server.proc.output()[-3000:]
    assert "advance study" not in server.proc.output()
