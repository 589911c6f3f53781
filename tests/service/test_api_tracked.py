"""Runs of any training loop (``trainer.track``) on the service: ``PUT /runs/{id}``, the
HTTP sink's upload path, and every view of a run (API tables, plots, compare, dashboard)
on them, on SQLite and PostgreSQL; then against a real server process, where a SIGKILLed
tracked process ends ``interrupted``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import trainer
from tests.service.conftest import TINY, TestClient
from tests.service.live_server import LiveServer
from trainer.config import parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.remote import HttpRunSink
from trainer.train import Trainer, build_model

REPO = Path(__file__).resolve().parents[2]
BASE = "http://testserver"


def tracked_loop(sink: Any, epochs: int = 3, name: str = "tracked", **kwargs: Any) -> Any:
    """The TINY configuration's model trained by hand, tracked into ``sink``."""
    config = parse_config(TINY)
    data = Trainer(config, progress=False).data
    torch.manual_seed(1)
    model = build_model(config, data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    user = {"dataset": "regression", "lr": 1e-2, "loop": "own"}
    with trainer.track(model, name=name, config=user, sink=sink, epochs=epochs, **kwargs) as run:
        for epoch in range(epochs):
            loss = F.mse_loss(model(data.x_train), data.y_train) + trainer.model_kl(model) / 64
            loss.backward()
            run.step(loss)
            opt.step()
            opt.zero_grad()
            run.log_epoch(epoch, {"loss": loss.item(), "val_nll": 1.0 / (epoch + 1)})
    return run


def test_a_tracked_run_is_served_like_any_run(client: TestClient) -> None:
    run = tracked_loop(HttpRunSink(BASE, client=client), tags=["own-loop"])
    trained = Trainer(
        parse_config({**TINY, "name": "trained"}), sink=HttpRunSink(BASE, client=client),
        progress=False,
    ).fit()  # fmt: skip
    assert run.status == "completed" and run.url == f"{BASE}/runs/{run.id}"
    got = client.get(f"/runs/{run.id}").json()
    assert got["status"] == "completed" and got["epochs"] == [0, 1, 2]
    assert got["name"] == "tracked" and got["tags"] == ["own-loop"] and got["train_host"]
    assert got["config"]["loop"] == "own" and got["config"]["prior"] == "learnable"
    assert got["config"]["tracking"]["grad_level"] == "element"
    assert got["metrics"]["val_nll"] == pytest.approx(1 / 3)
    listed = client.get("/runs", params={"dataset": "regression", "prior": "learnable"}).json()
    assert {r["id"] for r in listed["runs"]} == {run.id, trained.run_id}
    for path in (
        "stats",
        "kl",
        "kl/prior",
        "kl/trajectory",
        "priors",
        "gradients",
        "gradients/outliers?k=3",
        "percentiles?layer=layer1",
        "metrics",
    ):
        answer = client.get(f"/runs/{run.id}/{path}")
        assert answer.status_code == 200, (path, answer.text)
    outliers = client.get(f"/runs/{run.id}/gradients/outliers?k=3").json()["table"]["rows"]
    assert len(outliers) == 3
    for kind in ("kl", "priors", "gradients", "bands", "evolution", "epoch"):
        params = {"layer": "layer1"} if kind in ("bands", "epoch") else {}
        png = client.get(f"/runs/{run.id}/plots/{kind}.png", params=params)
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG", (kind, png.text[:300])
    pair = f"{run.id},{trained.run_id}"
    assert client.get(f"/compare/kl?runs={pair}").status_code == 200
    compared = client.get(f"/compare/gradients?runs={pair}&k=2&format=csv").text
    assert f"\n{run.id}," in compared and f"\n{trained.run_id}," in compared
    assert client.get(f"/compare/plots/priors.png?runs={pair}").status_code == 200
    # the dashboard: listing (sorted by the planned epochs, a cast in SQL), run page, compare
    for page in ("/", "/?sort=epochs", "/?sort=prior", f"/ui/runs/{run.id}"):
        html = client.get(page)
        assert html.status_code == 200 and "tracked" in html.text, page
    html = client.get(f"/ui/runs/{run.id}").text
    assert "own-loop" in html and "trainer.track" in html  # tags, the tracking settings
    html = client.get(f"/ui/compare?runs={pair}")
    assert html.status_code == 200 and "trained" in html.text


def test_an_upload_fits_the_tracked_model_whatever_the_config_says(client: TestClient) -> None:
    """A config naming a dataset and model is not a training configuration here: the
    first epoch, not a model built from the config, pins the layout."""
    from trainer import PriorSpec, mlp

    model = mlp(1, [7], 1, PriorSpec())  # not the MLP that dataset and model describe
    config = {"dataset": "regression", "model": "mlp", "widths": [10]}
    with trainer.track(model, config=config, sink=HttpRunSink(BASE, client=client)) as run:
        run.log_epoch(0)
        run.log_epoch(1)
    assert client.get(f"/runs/{run.id}").json()["epochs"] == [0, 1]


def test_cancelling_on_the_service_stops_the_loop(client: TestClient) -> None:
    model = build_model(parse_config(TINY), Trainer(parse_config(TINY), progress=False).data)
    sink = HttpRunSink(BASE, client=client, stop_poll_s=0)
    with trainer.track(model, sink=sink) as run:
        assert run.log_epoch(0)
        run.flush()
        assert run.captured_epochs == [0] and not run.should_stop
        assert client.post(f"/runs/{run.id}/cancel").status_code == 200
        assert run.should_stop
        run.log_epoch(1)
        run.flush()
        assert run.captured_epochs == [0]  # the service dropped epoch 1
    assert run.status == "cancelled" and run.captured_epochs == [0]
    got = client.get(f"/runs/{run.id}").json()
    assert got["status"] == "cancelled" and got["epochs"] == [0]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": {"epochs": "ten"}}, "config['epochs'] must be an integer >= 0"),
        ({"config": {"epochs": True}}, "config['epochs'] must be an integer >= 0"),
        ({"config": {"epochs": 2**31}}, "config['epochs'] must be an integer >= 0"),
        ({"config": {"prior": 1}}, "config['prior'] must be a string"),
        ({"config": {"a": "\x00"}}, "must not contain NUL"),
        ({"config": []}, "config"),
        ({"name": " "}, "name must not be blank"),
        ({"tags": ["x"] * 33}, "at most 32 tags"),
        ({"run_id": "x"}, "run_id"),
        ({"execute": True}, "execute"),
    ],
)
def test_bad_registrations_are_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    answer = client.put("/runs/mine-0", json=body)
    assert answer.status_code == 422, answer.text
    assert field in answer.text
    assert client.get("/runs/mine-0").status_code == 404


def test_a_bad_run_id_is_422(client: TestClient) -> None:
    answer = client.put("/runs/-x", json={})
    assert answer.status_code == 422 and "run_id" in answer.text, answer.text


def test_registration_is_idempotent_by_run_id(client: TestClient) -> None:
    body = {"name": "mine", "tags": ["a"], "config": {"epochs": 3.0, "x": [1, {"y": None}]}}
    first = client.put("/runs/mine-1", json=body)
    assert first.status_code == 201 and first.headers["location"].endswith("/runs/mine-1")
    run = first.json()
    assert run["status"] == "running" and run["name"] == "mine" and run["tags"] == ["a"]
    assert run["config"] == {"epochs": 3, "x": [1, {"y": None}], "tracking": {}}
    again = client.put("/runs/mine-1", json=body)  # a retry: the same run
    assert again.status_code == 200 and again.json()["id"] == "mine-1"
    assert len(client.get("/runs").json()["runs"]) == 1
    other = client.put("/runs/mine-1", json={**body, "name": "someone else"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "conflict"
    assert "choose another id" in other.text
    trained = client.post("/runs", json={**TINY, "execute": False, "run_id": "mine-2"})
    assert trained.status_code == 201
    assert client.put("/runs/mine-2", json=body).status_code == 409  # a training run


def test_a_service_without_the_endpoint_is_a_clear_error(client: TestClient) -> None:
    model = trainer.mlp(1, [4], 1, trainer.PriorSpec())
    with (
        mock.patch.object(HttpRunSink, "request", side_effect=_http_error(405)),
        pytest.raises(BnnError, match=r"does not take tracked runs.*405.*update it") as caught,
    ):
        trainer.track(model, sink=HttpRunSink(BASE, client=client))
    assert caught.value.code is ErrorCode.UNAVAILABLE


def _http_error(status: int) -> BnnError:
    return BnnError(ErrorCode.INVALID_ARGUMENT, "method not allowed", http_status=status)


KILLED = """
import sys, time, torch
import trainer
model = trainer.mlp(1, [8], 1, trainer.PriorSpec())
with trainer.track(model, name="killed", heartbeat_interval=0.2) as run:  # BNN_TRACKING_URL
    for epoch in range(10**6):
        model(torch.randn(4, 1)).sum().backward()
        run.step()
        run.log_epoch(epoch)
        print(f"epoch {epoch}", flush=True)
        time.sleep(0.05)
"""


@pytest.fixture
def live(tmp_path: Path) -> Any:
    """A real server (uvicorn in a process, no Dask) that reaps runs silent for 2 s."""
    popen = subprocess.Popen

    def with_stale_setting(args: Any, **kwargs: Any) -> Any:
        return popen(args, **{**kwargs, "env": {**kwargs["env"], "BNN_STALE_AFTER_S": "2"}})

    with mock.patch("tests.service.live_server.subprocess.Popen", with_stale_setting):
        server = LiveServer(tmp_path / "server" / "data")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_against_a_real_server_and_a_killed_tracked_process(
    live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BNN_TRACKING_URL", live.url)
    run = tracked_loop(None, name="over-http")  # the URL from the environment
    got = live.http.get(f"/runs/{run.id}").json()
    assert got["status"] == "completed" and got["epochs"] == [0, 1, 2]
    assert live.http.get(f"/runs/{run.id}/kl").status_code == 200
    assert "over-http" in live.http.get("/").text

    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "BNN_TRACKING_URL": live.url}
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for _ in range(2):
            assert proc.stdout.readline().startswith("epoch")
        (killed,) = live.http.get("/runs", params={"name": "killed"}).json()["runs"]
        deadline = time.monotonic() + 60  # stored: epochs are uploaded in the background
        while len(live.http.get(f"/runs/{killed['id']}").json()["epochs"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 30
    while killed["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        killed = live.http.get(f"/runs/{killed['id']}").json()
    assert killed["status"] == "interrupted" and "no heartbeat since" in killed["error"]
    assert killed["epochs"][:2] == [0, 1]
