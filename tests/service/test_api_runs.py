"""``/runs`` through the test client, on SQLite and PostgreSQL: happy paths and every error."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from service.analysis.synthetic import synthetic_snapshot
from tests.service.conftest import AUTH, TINY, TOKEN, ClientFactory, TestClient, external_run
from trainer.store import RunStatus
from trainer.store.catalog import parse_metric_condition


def test_post_runs_queues_a_job_with_defaults_and_a_location(client: TestClient) -> None:
    response = client.post(
        "/runs", json={"dataset": "regression", "prior": "learnable", "epochs": 5}
    )
    assert response.status_code == 202
    run = response.json()
    assert run["status"] == "queued" and run["epochs"] == [] and run["metrics"] == {}
    assert run["config"]["epochs"] == 5 and run["config"]["widths"] == [10]  # dataset default
    assert response.headers["location"] == run["url"] == f"http://testserver/runs/{run['id']}"
    assert client.jobs.submitted == [run["id"]]
    again = client.get(f"/runs/{run['id']}").json()
    assert again["id"] == run["id"] and again["status"] == "queued"
    assert client.get("/healthz").json()["status"] == "ok"


def test_execute_false_registers_an_external_run_with_its_id_name_and_tags(
    client: TestClient,
) -> None:
    body = {**TINY, "execute": False, "run_id": "ext-1", "name": "remote", "tags": ["a", "b"]}
    response = client.post("/runs", json=body)
    assert response.status_code == 201
    run = response.json()
    assert (run["id"], run["name"], run["tags"], run["status"]) == (
        "ext-1",
        "remote",
        ["a", "b"],
        "running",
    )
    assert client.jobs.submitted == []
    dup = client.post("/runs", json=body)
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "conflict"
    assert "already exists" in dup.json()["error"]["message"]


def test_bad_bodies_are_422_with_field_messages(client: TestClient) -> None:
    bad = {"epochs": 0, "widths": [4, -1], "prior": "wishful", "bogus": 1}
    err = client.post("/runs", json=bad).json()["error"]
    assert err["code"] == "invalid_argument"
    fields = err["details"]["fields"]
    assert set(fields) == {"epochs", "widths", "prior", "bogus"}
    assert "greater than or equal to 1" in fields["epochs"] and "-1" in fields["widths"]
    assert "'wishful'" in fields["prior"] and "Extra inputs" in fields["bogus"]
    for body, field in [
        ({"name": "x\x00y"}, "name"),
        ({"tags": ["ok", ""]}, "tags"),
        ({"tags": [f"t{i}" for i in range(40)]}, "tags"),
        ({"run_id": "../etc"}, "run_id"),
        ({"model": "cnn"}, "body"),  # cross-field: a CNN needs images
    ]:
        response = client.post("/runs", json=body)
        assert response.status_code == 422, body
        assert field in response.json()["error"]["details"]["fields"], body
    not_json = client.post("/runs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and "invalid JSON" in not_json.json()["error"]["message"]
    assert client.post("/runs", json=[1, 2]).status_code == 422
    assert client.jobs.submitted == []


@pytest.mark.parametrize(
    ("body", "setting"),
    [
        ({"epochs": 11}, "BNN_MAX_EPOCHS"),
        ({"widths": [8, 8, 8]}, "BNN_MAX_LAYERS"),
        ({"widths": [65]}, "BNN_MAX_WIDTH"),
        ({"mc_samples": 5}, "BNN_MAX_MC_SAMPLES"),
        ({"eval_samples": 5}, "BNN_MAX_MC_SAMPLES"),
        ({"val_samples": 5}, "BNN_MAX_MC_SAMPLES"),
        ({"batch_size": 1000}, "BNN_MAX_BATCH_SIZE"),
        ({"n_train": 10_000}, "BNN_MAX_N_TRAIN"),
    ],
)
def test_training_limits_are_422_naming_the_limit(
    make_client: ClientFactory, body: dict, setting: str
) -> None:
    client = make_client(
        max_epochs=10,
        max_layers=2,
        max_width=64,
        max_mc_samples=4,
        max_batch_size=512,
        max_n_train=5000,
    )
    response = client.post(
        "/runs",
        json={"dataset": "regression", "epochs": 5, "eval_samples": 2, "val_samples": 2, **body},
    )
    assert response.status_code == 422
    err = response.json()["error"]
    assert setting in err["message"] and err["details"]["setting"] == setting
    assert client.jobs.submitted == []
    # an external run trains elsewhere: the limits are the service's compute, not its
    assert client.post("/runs", json={**body, "execute": False}).status_code == 201


def test_list_filters_paginates_and_counts(client: TestClient) -> None:
    ids = [
        external_run(client, prior="fixed", tags=["sweep"]),
        external_run(client, prior="learnable", tags=["sweep", "wide"]),
        external_run(client, prior="learnable"),
    ]
    client.post(f"/runs/{ids[0]}/cancel")
    page = client.get("/runs").json()
    assert page["total"] == 3 and [r["id"] for r in page["runs"]] == ids[::-1]  # newest first

    def listed(query: str) -> list[str]:
        return sorted(r["id"] for r in client.get(f"/runs?{query}").json()["runs"])

    assert listed("tag=sweep") == sorted(ids[:2])
    assert listed("tag=sweep&tag=wide") == [ids[1]]
    assert listed("prior=learnable") == sorted(ids[1:])
    assert listed("status=cancelled") == [ids[0]]
    assert listed("dataset=mnist") == []
    second = client.get("/runs?limit=1&offset=1").json()
    assert second["total"] == 3 and [r["id"] for r in second["runs"]] == [ids[1]]
    assert client.get("/runs?offset=10").json() == {
        "total": 3,
        "limit": 50,
        "offset": 10,
        "runs": [],
    }
    for query in ("status=sleeping", "limit=0", "limit=5000", "offset=-1", "format=xml"):
        response = client.get(f"/runs?{query}")
        assert response.status_code == 422, query
        assert response.json()["error"]["details"]["fields"], query


def test_list_as_csv(client: TestClient) -> None:
    run_id = external_run(client, name="with, comma", tags=["a", "b"])
    response = client.get("/runs?format=csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.headers["x-total-count"] == "1"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == run_id and row["name"] == "with, comma" and row["tags"] == "a;b"
    assert (row["dataset"], row["prior"], row["widths"], row["epochs"]) == (
        "regression",
        "learnable",
        "10",
        "3",
    )


def test_unknown_runs_are_404_naming_the_id(client: TestClient) -> None:
    for method, path in [
        ("GET", "/runs/abc123"),
        ("DELETE", "/runs/abc123"),
        ("POST", "/runs/abc123/cancel"),
        ("GET", "/runs/..%2F..%2Fetc"),
        ("GET", "/runs/" + "x" * 300),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert "'abc123'" in client.get("/runs/abc123").json()["error"]["message"]
    assert client.patch("/runs/abc123", json={"heartbeat": True}).status_code == 404
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    assert client.put("/runs").json()["error"]["code"] == "method_not_allowed"


def test_patch_reports_status_summary_heartbeat_and_host(client: TestClient) -> None:
    run_id = external_run(client)
    body = b'{"heartbeat": true, "summary": {"best": 0.5, "diverged": NaN}, "train_host": "gpu-7"}'
    headers = {"Content-Type": "application/json"}
    run = client.patch(f"/runs/{run_id}", content=body, headers=headers).json()
    assert run["summary"] == {"best": 0.5, "diverged": "nan"} and run["train_host"] == "gpu-7"
    assert run["heartbeat_at"] is not None
    done = client.patch(f"/runs/{run_id}", json={"status": "completed"})
    assert done.status_code == 200 and done.json()["status"] == "completed"
    assert done.json()["finished_at"] is not None
    # impossible transitions and heartbeats of finished runs are 409 naming the status
    back = client.patch(f"/runs/{run_id}", json={"status": "running"})
    assert back.status_code == 409 and "completed" in back.json()["error"]["message"]
    assert client.patch(f"/runs/{run_id}", json={"heartbeat": True}).status_code == 409
    same = client.patch(f"/runs/{run_id}", json={"status": "completed"})
    assert same.status_code == 200  # setting the current status again is a no-op
    for bad in ({"status": "done"}, {"extra": 1}, {"error": "a\x00b"}, {"summary": [1]}):
        response = client.patch(f"/runs/{run_id}", json=bad)
        assert response.status_code == 422, bad


def test_failed_status_keeps_the_error(client: TestClient) -> None:
    run_id = external_run(client)
    run = client.patch(f"/runs/{run_id}", json={"status": "failed", "error": "NaN loss"}).json()
    assert run["status"] == "failed" and run["error"] == "NaN loss"


def test_cancel_and_delete(client: TestClient) -> None:
    queued = client.post("/runs", json=TINY).json()["id"]
    # an active run cannot be deleted
    response = client.delete(f"/runs/{queued}")
    assert response.status_code == 409 and "cancel it" in response.json()["error"]["message"]
    cancelled = client.post(f"/runs/{queued}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.jobs.cancelled == [queued]
    again = client.post(f"/runs/{queued}/cancel")
    assert again.status_code == 409 and again.json()["error"]["details"]["status"] == "cancelled"
    assert client.delete(f"/runs/{queued}").status_code == 204
    assert client.get(f"/runs/{queued}").status_code == 404
    assert client.delete(f"/runs/{queued}").status_code == 404


def test_a_cancelled_run_whose_job_is_still_stopping_cannot_be_deleted_yet(
    client: TestClient,
) -> None:
    """A running job is not dropped (Dask cannot stop it; its trainer stops after the epoch):
    deleting the run meanwhile would race its last write, so it is a 409 until the job ends."""
    run_id = client.post("/runs", json=TINY).json()["id"]
    client.patch(f"/runs/{run_id}", json={"status": "running"})
    assert client.post(f"/runs/{run_id}/cancel").status_code == 200
    assert client.jobs.stopping == {run_id}  # cancelled as started: left to finish
    response = client.delete(f"/runs/{run_id}")
    assert response.status_code == 409
    assert "still stopping" in response.json()["error"]["message"]
    assert client.get(f"/runs/{run_id}").json()["status"] == "cancelled"
    client.jobs.stopping.clear()  # the job has ended
    assert client.delete(f"/runs/{run_id}").status_code == 204


def test_cancel_from_every_terminal_status_is_409(client: TestClient) -> None:
    for status in (RunStatus.COMPLETED, RunStatus.FAILED):
        run_id = external_run(client)
        client.patch(f"/runs/{run_id}", json={"status": status.value})
        assert client.post(f"/runs/{run_id}/cancel").status_code == 409


def test_writes_need_the_token_when_one_is_set(make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN)
    assert client.post("/runs", json=TINY).status_code == 401
    wrong = client.post("/runs", json=TINY, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert wrong.json()["error"]["code"] == "unauthenticated"
    basic = client.post("/runs", json=TINY, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    run_id = client.post("/runs", json=TINY, headers=AUTH).json()["id"]
    for method in ("PATCH", "DELETE"):
        assert client.request(method, f"/runs/{run_id}", json={}).status_code == 401
    assert client.post(f"/runs/{run_id}/cancel").status_code == 401
    assert client.put(f"/runs/{run_id}/epochs/0", content=b"x").status_code == 401
    # reads stay open unless auth_reads is set
    assert client.get(f"/runs/{run_id}").status_code == 200
    assert client.get("/runs").status_code == 200
    assert client.get(f"/runs/{run_id}/epochs").status_code == 200


def test_auth_reads_protects_reads_but_not_health_or_docs(make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN, auth_reads=True)
    assert client.get("/runs").status_code == 401
    assert client.get("/runs/x/metrics").status_code == 401
    assert client.get("/runs", headers=AUTH).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_json_bodies_over_the_limit_are_413(make_client: ClientFactory) -> None:
    client = make_client(max_json_bytes=200)
    big = {**TINY, "name": "n" * 300}
    response = client.post("/runs", json=big)
    assert response.status_code == 413
    err = response.json()["error"]
    assert err["code"] == "too_large" and err["details"]["setting"] == "BNN_MAX_JSON_BYTES"

    def chunks():  # no Content-Length: counted while read
        yield b'{"name": "'
        yield b"n" * 400
        yield b'"}'

    response = client.post("/runs", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "200 bytes" in response.json()["error"]["message"]


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"post", "get"} <= set(paths["/runs"])
    assert {"get", "patch", "delete"} <= set(paths["/runs/{run_id}"])
    assert "post" in paths["/runs/{run_id}/cancel"]
    assert {"get", "put"} <= set(paths["/runs/{run_id}/epochs/{epoch}"])
    for path in ("/runs/{run_id}/epochs", "/runs/{run_id}/metrics", "/healthz"):
        assert "get" in paths[path]


# ----------------------------------------------------------------------------- metric filters
def _run_with_metrics(client: TestClient, name: str, *metrics: dict[str, float]) -> str:
    """A run whose epochs 0, 1, ... carry ``metrics`` (the last one counts for filters)."""
    store = client.app.state.store  # type: ignore[attr-defined]
    run_id = str(store.create_run(name, {"dataset": "regression"}, ["m"]).id)
    for epoch, values in enumerate(metrics):
        snap = synthetic_snapshot(epoch, (4, 6, 2))
        snap.metrics.clear()
        snap.metrics.update(values)
        store.write_epoch(run_id, snap)
    return run_id


def test_list_filters_by_metric_conditions_in_the_catalog(client: TestClient) -> None:
    good = _run_with_metrics(client, "good", {"test_nll": 0.5}, {"test_nll": 0.05, "acc": 0.9})
    bad = _run_with_metrics(client, "bad", {"test_nll": 0.01}, {"test_nll": 0.3, "acc": 0.95})
    nan = _run_with_metrics(client, "nan", {"test_nll": float("nan"), "acc": 0.99})
    none = external_run(client, name="no epochs")

    def listed(*conditions: str, **extra: str) -> list[str]:
        params = [("metric", c) for c in conditions] + list(extra.items())
        response = client.get("/runs", params=params)
        assert response.status_code == 200, response.text
        assert response.json()["total"] == len(response.json()["runs"])
        return sorted(r["id"] for r in response.json()["runs"])

    assert listed() == sorted([good, bad, nan, none])
    assert listed("test_nll<0.1") == [good]  # the latest epoch's value, not an earlier one
    assert listed("test_nll <= 0.3") == sorted([good, bad])
    assert listed("test_nll>0.05") == [bad]
    assert listed("test_nll>=0.05") == sorted([good, bad])
    assert listed("test_nll<1", "acc>0.92") == [bad]  # every condition holds
    assert listed(" acc >= 9e-1 ") == sorted([good, bad, nan])  # NaN: no value, no match
    assert listed("test_nll<1", tag="m", name="goo") == [good]
    assert listed("unknown_metric<1") == []
    assert listed("acc>-1E+2") == sorted([good, bad, nan])


@pytest.mark.parametrize(
    "condition", ["test_nll=0.1", "test_nll<", "<0.1", "test_nll<abc", "test_nll<inf",
                  "test_nll<nan", "te'st<1", "a<1,b<2", "test_nll!=1", "x<1e999", ""],
)  # fmt: skip
def test_a_bad_metric_condition_is_422_naming_it(client: TestClient, condition: str) -> None:
    response = client.get("/runs", params={"metric": condition})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert repr(condition) in error["message"] and "'test_nll<0.1'" in error["message"]
    assert error["details"]["fields"] == {"metric": condition}


def test_metric_conditions_are_documented_with_the_servers_own_pattern(
    client: TestClient,
) -> None:
    params = client.get("/openapi.json").json()["paths"]["/runs"]["get"]["parameters"]
    metric = next(p for p in params if p["name"] == "metric")
    assert metric["schema"]["type"] == "array" and metric["schema"]["maxItems"] == 32
    pattern = metric["schema"]["items"]["pattern"]
    for text in ("test_nll<0.1", " a.b-c_d >= -.5e-3 ", "x>1."):
        assert re.fullmatch(pattern, text) and parse_metric_condition(text)
    assert parse_metric_condition(" a.b-c_d >= -.5e-3 ") == ("a.b-c_d", ">=", -0.0005)
    for text in ("x=1", "x<1e999", "x<1_0", "x\t<1", "x<1,y<2"):
        assert not re.fullmatch(pattern, text), text
    tag = next(p for p in params if p["name"] == "tag")
    assert tag["schema"]["type"] == "array"


# ----------------------------------------------------------------------------- bodies
def test_a_json_syntax_error_says_what_and_where(client: TestClient) -> None:
    body = b'{\n  "epochs": 3\n  "prior": "fixed"\n}'
    response = client.post("/runs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    assert error["message"] == "invalid JSON at line 3, column 3: Expecting ',' delimiter"
    assert (error["details"]["line"], error["details"]["column"]) == (3, 3)
    trailing = client.patch("/runs/x", content=b'{"heartbeat": true,}')  # no Content-Type
    assert trailing.status_code == 400
    assert "line 1, column 20" in trailing.json()["error"]["message"]
    assert client.jobs.submitted == []  # type: ignore[attr-defined]


def test_a_json_body_without_content_type_is_json(client: TestClient) -> None:
    body = json.dumps({**TINY, "execute": False, "name": "no header"}).encode()
    response = client.post("/runs", content=body)
    assert "content-type" not in response.request.headers
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "no header"


@pytest.mark.parametrize(
    ("media", "hint"),
    [("text/plain", False), ("application/x-www-form-urlencoded", True)],
)
def test_a_body_of_another_media_type_is_415_saying_which_header(
    client: TestClient, media: str, hint: bool
) -> None:
    body = json.dumps({**TINY, "execute": False}).encode()
    response = client.post("/runs", content=body, headers={"Content-Type": media})
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "'Content-Type: application/json'" in error["message"] and media in error["message"]
    assert ("curl's default for -d" in error["message"]) is hint
    assert client.get("/runs").json()["total"] == 0


def test_a_run_can_ask_for_the_archive_form_of_its_epoch_files(client: TestClient) -> None:
    """``stat_bits`` / ``compress_posteriors`` are part of the run's configuration (the
    job's trainer writes its epochs so); a bad value is a 422 naming it, and no job runs."""
    response = client.post("/runs", json={**TINY, "stat_bits": 3, "compress_posteriors": True})
    assert response.status_code == 202
    config = response.json()["config"]
    assert (config["stat_bits"], config["compress_posteriors"]) == (3, True)
    default = client.post("/runs", json=TINY).json()["config"]
    assert (default["stat_bits"], default["compress_posteriors"]) == (None, None)
    submitted = list(client.jobs.submitted)
    for bad, message in [
        ({"stat_bits": 8}, "less than or equal to 7"),
        ({"stat_bits": -1}, "greater than or equal to 0"),
        ({"stat_bits": 2.5}, "integer"),
        ({"compress_posteriors": "maybe"}, "must be true or false, got 'maybe'"),
    ]:
        err = client.post("/runs", json={**TINY, **bad})
        assert err.status_code == 422, bad
        fields = err.json()["error"]["details"]["fields"]
        (name,) = bad
        assert message in fields[name], (bad, fields)
    assert client.jobs.submitted == submitted
