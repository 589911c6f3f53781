"""HttpRunSink and push_run against the app in-process: reporting, retries, cancellation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from service.jobs import run_training_job
from tests.service.conftest import AUTH, TINY, TOKEN, ClientFactory, TestClient, external_run
from trainer.config import parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.remote import HttpRunSink, push_run
from trainer.store import RunStore
from trainer.train import Trainer

pytestmark = pytest.mark.parametrize("catalog_url", [None])  # SQLite is enough here
BASE = "http://testserver"


class Flaky(httpx.BaseTransport):
    """Forwards to the app, but first fails requests as planned, per method.

    Actions: "connect" (refused, nothing sent), "503" (answered without reaching the
    app), "lose" (the app handles it, then the answer is lost).
    """

    def __init__(self, inner: httpx.BaseTransport, **plan: list[str]) -> None:
        self.inner, self.plan = inner, plan
        self.calls: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.method)
        actions = self.plan.get(request.method) or []
        action = actions.pop(0) if actions else None
        if action == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if action == "503":
            request.read()
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "busy"}})
        response = self.inner.handle_request(request)
        if action == "lose":
            response.read()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


def flaky_sink(client: TestClient, token: str | None = None, **plan: list[str]) -> HttpRunSink:
    transport = Flaky(client._transport, **plan)
    http = httpx.Client(transport=transport, base_url=BASE)
    sink = HttpRunSink(BASE, token=token, client=http, backoff=0, stop_poll_s=0)
    sink.transport = transport  # type: ignore[attr-defined]
    return sink


def fit(sink: HttpRunSink, **overrides: Any) -> Any:
    config = parse_config({**TINY, **overrides})
    return Trainer(config, sink=sink, progress=False, heartbeat_interval=60).fit()


def test_a_trainer_reports_its_run_over_http(client: TestClient) -> None:
    sink = HttpRunSink(BASE, client=client)
    result = fit(sink, name="remote", tags=["http"])
    run = client.get(f"/runs/{result.run_id}").json()
    assert run["status"] == "completed" and run["name"] == "remote" and run["tags"] == ["http"]
    assert run["epochs"] == result.captured_epochs == [0, 1, 2]
    assert run["train_host"] and run["config"]["n_train"] == 64
    assert run["metrics"]["loss"] == pytest.approx(result.history[-1]["loss"])
    assert not result.cancelled


def test_network_errors_and_5xx_are_retried_and_every_write_lands_once(
    client: TestClient,
) -> None:
    sink = flaky_sink(
        client, POST=["lose"], PUT=["connect", "503", "lose"], PATCH=["503", "connect"]
    )
    result = fit(sink)
    runs = client.get("/runs").json()
    assert runs["total"] == 1  # the lost POST answer did not make a second run
    assert runs["runs"][0]["id"] == result.run_id and runs["runs"][0]["status"] == "completed"
    assert client.get(f"/runs/{result.run_id}/epochs").json()[0]["epoch"] == 0
    assert [e["epoch"] for e in client.get(f"/runs/{result.run_id}/epochs").json()] == [0, 1, 2]
    calls = sink.transport.calls  # type: ignore[attr-defined]
    assert calls.count("POST") == 2 and calls.count("PUT") == 3 + 3


def test_retries_run_out_as_unavailable(client: TestClient) -> None:
    sink = flaky_sink(client, GET=["connect"] * 3)
    sink.retries = 2
    with pytest.raises(BnnError) as info:
        sink.get_run("anything")
    assert info.value.code is ErrorCode.UNAVAILABLE and "after 3 attempts" in info.value.message


def test_service_errors_come_back_with_their_codes(make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN)
    with pytest.raises(BnnError) as info:
        HttpRunSink(BASE, client=client).get_run("nobody")
    assert info.value.code is ErrorCode.NOT_FOUND and "unknown run" in info.value.message
    with pytest.raises(BnnError) as info:
        HttpRunSink(BASE, client=client, retries=0).create_run("x", dict(TINY))
    assert "HTTP 401" in info.value.message and "Bearer" in info.value.message
    run_id = external_run(client, headers=AUTH)
    sink = HttpRunSink(BASE, token=TOKEN, client=client)
    sink.set_status(run_id, "completed")
    with pytest.raises(BnnError) as info:
        sink.set_status(run_id, "running")
    assert info.value.code is ErrorCode.CONFLICT and info.value.details["status"] == "completed"


@pytest.mark.parametrize("background", [False, True])
def test_cancelling_stops_the_trainer_after_the_epoch(client: TestClient, background: bool) -> None:
    sink = HttpRunSink(BASE, client=client, stop_poll_s=0)
    trained: list[int] = []

    def cancel_at_1(epoch: int, _metrics: dict) -> None:
        trained.append(epoch)
        if epoch == 1:
            assert client.post(f"/runs/{sink.run_id}/cancel").status_code == 200

    config = parse_config({**TINY, "epochs": 20})
    trainer = Trainer(
        config, sink=sink, progress=False, on_epoch=cancel_at_1, background_writes=background
    )
    result = trainer.fit()
    assert result.cancelled and result.captured_epochs == [0, 1] and trained == [0, 1]
    run = client.get(f"/runs/{result.run_id}").json()
    assert run["status"] == "cancelled"
    if background:  # epoch 1 was still being sent when the cancel came: it may be dropped
        assert run["epochs"] in ([0], [0, 1])
    else:
        assert run["epochs"] == [0, 1]


def test_an_epoch_in_flight_at_cancel_time_is_dropped(client: TestClient) -> None:
    sink = HttpRunSink(BASE, client=client, stop_poll_s=3600)  # asks once, after epoch 0

    def cancel_at_1(epoch: int, _metrics: dict) -> None:
        if epoch == 1:
            client.post(f"/runs/{sink.run_id}/cancel")

    config = parse_config({**TINY, "epochs": 20})
    trainer = Trainer(
        config, sink=sink, progress=False, on_epoch=cancel_at_1, background_writes=False
    )
    result = trainer.fit()
    # epoch 2 was sent after the cancel: refused (409), dropped, and the trainer stopped
    assert result.cancelled and result.captured_epochs == [0, 1, 2]
    run = client.get(f"/runs/{result.run_id}").json()
    assert run["status"] == "cancelled" and run["epochs"] == [0, 1]


def test_the_dask_job_function_trains_a_queued_run_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.remote

    monkeypatch.setattr(
        trainer.remote, "HttpRunSink", lambda url, **kw: HttpRunSink(url, client=client, **kw)
    )
    run = client.post("/runs", json=TINY).json()
    assert run_training_job(run["id"], run["config"], BASE) == "completed"
    done = client.get(f"/runs/{run['id']}").json()
    assert done["status"] == "completed" and done["epochs"] == [0, 1, 2]
    # a second delivery of the same job does not train again
    assert run_training_job(run["id"], run["config"], BASE) == "completed"
    # a job restarted after its worker died (the run is still running) fails the run
    orphan = client.post("/runs", json=TINY).json()["id"]
    client.patch(f"/runs/{orphan}", json={"status": "running"})
    assert run_training_job(orphan, dict(TINY), BASE) == "failed"
    assert "restarted" in client.get(f"/runs/{orphan}").json()["error"]
    # a configuration that cannot be built fails the run with the reason
    bad = client.post("/runs", json={**TINY, "dataset": "kmnist"}).json()["id"]
    monkeypatch.setenv("BNN_DATASETS_DIR", "/nonexistent-bnn-datasets")
    with pytest.raises(BnnError):
        run_training_job(bad, {**TINY, "dataset": "kmnist"}, BASE, data_root="/nonexistent")
    failed = client.get(f"/runs/{bad}").json()
    assert failed["status"] == "failed" and failed["error"]


def test_push_uploads_a_local_run_once_and_can_be_repeated(
    client: TestClient, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    with RunStore(local) as store:
        result = Trainer(parse_config({**TINY, "name": "laptop"}), sink=store, progress=False).fit()
        store.set_summary(result.run_id, {"note": "from a laptop"})
        checksums = {e.epoch: e.checksum for e in store.list_epochs(result.run_id)}
    sink = flaky_sink(client, PUT=["lose"])
    out = push_run(result.run_id, local, BASE, sink=sink)
    assert out["created"] and out["epochs"] == 3 and out["status"] == "completed"
    run = client.get(f"/runs/{result.run_id}").json()
    assert run["status"] == "completed" and run["name"] == "laptop"
    assert run["summary"] == {"note": "from a laptop"}
    remote = {e["epoch"]: e["checksum"] for e in client.get(f"/runs/{result.run_id}/epochs").json()}
    assert remote == checksums
    again = push_run(result.run_id, local, BASE, sink=HttpRunSink(BASE, client=client))
    assert not again["created"] and again["epochs"] == 3
    with pytest.raises(BnnError) as info:
        push_run("nothere", local, BASE, sink=HttpRunSink(BASE, client=client))
    assert info.value.code is ErrorCode.NOT_FOUND
