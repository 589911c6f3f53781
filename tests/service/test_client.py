"""``service.client.Client`` against a real server: a uvicorn process (tests.service.live_server,
jobs recorded, nothing trains) holding three small runs trained here, with a token for
writes. Tables are checked against the analysis of the same runs computed locally."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from service.client import RUN_COLUMNS, Client, _frame
from tests.service.live_server import LiveServer, free_port, seeded_server, train_seed_runs
from trainer.errors import BnnError, ErrorCode
from trainer.remote import HttpRunSink
from trainer.store import RunStore

REPO = Path(__file__).resolve().parents[2]
TOKEN = "client-test-token"
TINY = {"dataset": "regression", "epochs": 3, "n_train": 64, "n_test": 32, "eval_samples": 2}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store with the seed runs alpha, beta (same architecture) and gamma."""
    return train_seed_runs(tmp_path_factory.mktemp("client") / "local")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, local: Path) -> Iterator[LiveServer]:
    server = seeded_server(tmp_path_factory.mktemp("client_server"), local, token=TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def laptop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Another local store (path under "dir") with the runs "push" and "follow" (2 and 3
    epochs), not on the server."""
    from service.cli import main

    where = tmp_path_factory.mktemp("client") / "laptop"
    args = ["train", "--dataset", "regression", "--n-train", "64", "--n-test", "32"]
    args += ["--eval-samples", "2", "--no-progress", "--data-dir", str(where)]
    assert main([*args, "--epochs", "2", "--name", "push"]) == 0
    assert main([*args, "--epochs", "3", "--name", "follow"]) == 0
    with RunStore(where, create=False) as store:
        return {"dir": str(where), **{run.name or "": run.id for run in store.list_runs()}}


@pytest.fixture(scope="module")
def ids(local: Path) -> dict[str, str]:
    """Run name -> id."""
    with RunStore(local, create=False) as store:
        return {run.name or "": run.id for run in store.list_runs()}


@pytest.fixture
def client(server: LiveServer) -> Iterator[Client]:
    with Client(server.url, token=TOKEN) as client:
        yield client


@pytest.fixture
def reader(server: LiveServer) -> Iterator[Client]:
    """A client without the token: reads only."""
    with Client(server.url, retries=0) as client:
        yield client


def _error(call: Any) -> BnnError:
    with pytest.raises(BnnError) as info:
        call()
    return info.value


def test_import_loads_neither_torch_nor_pandas() -> None:
    code = "import sys, service.client; print(sorted({'torch', 'pandas'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_health_and_the_run_list(reader: Client, ids: dict[str, str]) -> None:
    from service.routers.runs import LIST_COLUMNS

    health = reader.health()
    assert health["status"] == "ok" and health["catalog"] == "sqlite"
    runs = reader.runs()
    assert tuple(runs.columns) == RUN_COLUMNS == LIST_COLUMNS  # as GET /runs?format=csv
    assert set(runs["id"]) >= set(ids.values()) and runs.attrs["total"] >= 3
    assert str(runs["created_at"].dtype).startswith("datetime64")
    gamma = runs[runs["id"] == ids["gamma"]].iloc[0]
    assert gamma["name"] == "gamma" and gamma["widths"] == [8, 8] and gamma["epochs"] == 3
    assert gamma["status"] == "completed" and gamma["prior"] == "learnable"
    assert list(reader.runs(name="ALPH")["id"]) == [ids["alpha"]]  # any case, a part
    one = reader.runs(limit=1, offset=1)
    assert len(one) == 1 and one["id"][0] == runs["id"][1] and one.attrs["total"] == len(runs)
    assert list(reader.runs(limit=None)["id"]) == list(runs["id"])
    fixed = reader.runs(prior="fixed", metrics=["test_rmse < 100"])
    assert list(fixed["id"]) == [ids["beta"]]
    assert reader.runs(metrics="test_rmse < 0").empty
    run = reader.run(ids["alpha"])
    assert run["epochs"] == [0, 1, 2] and "test_rmse" in run["metrics"]


def test_tables_match_the_analysis_of_the_local_run(
    reader: Client, ids: dict[str, str], local: Path
) -> None:
    from service.analysis import (
        compute_layer_kl_divergences,
        get_overall_weight_stats,
        kl_to_prior,
        prior_trajectories,
    )

    alpha = ids["alpha"]
    kl = reader.kl_table(alpha)
    assert kl.attrs == {"run_id": alpha, "epoch": 2, "dist": "posterior"}
    want = compute_layer_kl_divergences(alpha, data_dir=local).reset_index()
    assert list(kl.columns) == [str(c) for c in want.columns]
    pd.testing.assert_frame_equal(kl, want, check_dtype=False, check_names=False)
    assert kl["Bias KL Average"].isna().tolist() == [False, True]  # one bias
    row = reader.kl_table(alpha, epoch=1, layer="layer1")
    assert list(row["layer"]) == ["layer1"] and row.attrs["epoch"] == 1
    want1 = compute_layer_kl_divergences(alpha, epoch=1, data_dir=local)
    assert row["Weight KL Sum"][0] == pytest.approx(want1.loc["layer1", "Weight KL Sum"])

    stats = reader.stats(alpha, epoch=0)
    want_stats = get_overall_weight_stats(alpha, epoch=0, data_dir=local).reset_index()
    assert list(stats.iloc[:, 0]) == ["Overall", "layer1", "layer2"]
    assert stats["Weight mu mean"].to_numpy() == pytest.approx(
        want_stats["Weight mu mean"].to_numpy()
    )
    prior_stats = reader.stats(alpha, dist="prior")
    assert prior_stats.attrs["dist"] == "prior"

    to_prior = reader.kl_prior(alpha, layer="layer2")
    want_prior = kl_to_prior(alpha, [2], data_dir=local).droplevel("epoch")
    assert to_prior["KL"][0] == pytest.approx(want_prior.loc["layer2", "KL"])
    trajectory = reader.kl_trajectory(alpha, of="prior", epochs=[0, 2], layers="layer1")
    assert list(trajectory["epoch"]) == [0, 2] and set(trajectory["layer"]) == {"layer1"}
    priors = reader.priors(alpha, layers=["layer1", "layer2"])
    want_priors = prior_trajectories(alpha, data_dir=local).reset_index()
    assert priors["Weight prior sigma"].to_numpy() == pytest.approx(
        want_priors["Weight prior sigma"].to_numpy()
    )
    bands = reader.percentiles(alpha, "layer1", stat="sigma", epochs=range(3))
    assert list(bands["epoch"]) == [0, 1, 2] and bands.attrs["stat"] == "sigma"
    assert (bands["p100"] >= bands["p0"]).all()
    gradients = reader.gradients(ids["gamma"], epoch=2)
    assert list(gradients["layer"]) == ["layer1", "layer2", "layer3"]


def test_metrics_epochs_and_epoch_files(reader: Client, ids: dict[str, str], local: Path) -> None:
    beta = ids["beta"]
    with RunStore(local, create=False) as store:
        epochs = store.list_epochs(beta)
    metrics = reader.metrics(beta)
    assert list(metrics.index) == [0, 1, 2] and metrics.index.name == "epoch"
    for info in epochs:
        for name, value in info.metrics.items():
            assert metrics.loc[info.epoch, name] == pytest.approx(value, nan_ok=True)
    # the test metrics are recorded at the last epoch only
    assert metrics["test_rmse"].isna().tolist() == [True, True, False]
    two = reader.metrics(beta, ["loss", "test_rmse"])
    assert list(two.columns) == ["loss", "test_rmse"] and two.attrs["run_id"] == beta
    table = reader.epochs(beta)
    assert list(table["epoch"]) == [0, 1, 2]
    assert list(table["checksum"]) == [e.checksum for e in epochs]
    assert table["loss"].to_numpy() == pytest.approx([e.metrics["loss"] for e in epochs])
    data = reader.epoch_file(beta, 1)
    assert data[:8] == b"\x89HDF\r\n\x1a\n" and len(data) == epochs[1].size


def test_comparisons_and_plots(reader: Client, ids: dict[str, str], local: Path) -> None:
    from service.analysis import kl_between_runs

    alpha, beta, gamma = ids["alpha"], ids["beta"], ids["gamma"]
    between = reader.compare_kl(alpha, beta, epoch=2)
    want = kl_between_runs(alpha, beta, 2, data_dir=local).reset_index()
    assert list(between["layer"]) == list(want["layer"])
    assert between["Weight symmetric KL"].to_numpy() == pytest.approx(
        want["Weight symmetric KL"].to_numpy()
    )
    counts = reader.compare_gradients([alpha, beta], table="counts")
    assert list(counts["layer"]) == ["layer1", "layer2"] and counts.attrs["epoch"] == 2
    assert f"exploding ({beta})" in counts.columns and counts.attrs["runs"] == [alpha, beta]
    outliers = reader.compare_gradients([alpha, beta], k=2)
    assert len(outliers) == 4 and "counts" not in outliers.attrs
    width = reader.compare_priors([alpha, gamma])
    assert set(width["run"]) == {alpha, gamma}

    for png in (
        reader.plot(alpha, "kl"),
        reader.plot(alpha, "bands", layer="layer1", epochs=[0, 2], dpi=40),
        reader.plot(alpha, "evolution", params=[("layer1", 3), ("layer2", (0, 1))]),
        reader.compare_plot([alpha, beta], "priors"),
    ):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_errors_name_the_bad_value(reader: Client, ids: dict[str, str]) -> None:
    alpha = ids["alpha"]
    err = _error(lambda: reader.run("nosuchrun"))
    assert err.code is ErrorCode.NOT_FOUND and err.details["http_status"] == 404
    assert "'nosuchrun'" in err.message
    err = _error(lambda: reader.kl_table(alpha, epoch=99))
    assert err.code is ErrorCode.NOT_FOUND and "epoch 99" in err.message
    assert err.details["epochs"] == [0, 1, 2]  # the captured ones, from the service
    for bad in (-1, "2", True, 1.0):
        err = _error(lambda bad=bad: reader.kl_table(alpha, epoch=bad))
        assert err.code is ErrorCode.INVALID_ARGUMENT and repr(bad) in err.message
        assert "epoch" in err.message and "http_status" not in err.details  # no request
    err = _error(lambda: reader.kl_table(alpha, layer="layer9"))
    assert err.code is ErrorCode.NOT_FOUND and "'layer9'" in err.message
    err = _error(lambda: reader.metrics(alpha, "no_such_metric"))
    assert err.code is ErrorCode.NOT_FOUND and "'no_such_metric'" in err.message
    err = _error(lambda: reader.plot(alpha, "pie"))
    assert err.details["http_status"] == 404 and err.details["kinds"][0] == "bands"
    err = _error(lambda: reader.plot(alpha, "kl", colour="red"))
    assert err.details["http_status"] == 422 and "colour" in err.message
    err = _error(lambda: reader.run("../healthz"))  # one path segment, never another path
    assert err.details["http_status"] == 404
    err = _error(lambda: reader.compare_kl(alpha, ids["gamma"]))
    assert err.details["http_status"] == 422 and "layer" in err.message  # architectures
    err = _error(lambda: reader.run(""))
    assert err.code is ErrorCode.INVALID_ARGUMENT and "run_id" in err.message
    assert "k must be" in str(_error(lambda: reader.gradient_outliers(alpha, k=0)))
    assert "'localhost:8000'" in str(_error(lambda: Client("localhost:8000")))
    assert "compare" in str(_error(lambda: reader.compare_priors([alpha])))
    with Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as down:
        err = _error(down.health)
        assert err.code is ErrorCode.UNAVAILABLE and "2 attempts" in err.message


def test_writes_need_the_token(server: LiveServer, reader: Client) -> None:
    err = _error(lambda: reader.start_run(TINY))
    assert err.details["http_status"] == 401 and "missing token" in err.message
    with Client(server.url, token="wrong", retries=0) as wrong:
        err = _error(lambda: wrong.start_run(TINY))
        assert err.details["http_status"] == 401 and "wrong token" in err.message
    assert server.http.get("/runs", params={"name": "tiny"}).json()["total"] == 0


def test_start_wait_rename_cancel_delete(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = client.start_run(TINY, name="tiny start", tags=["client"])
    run = client.run(run_id)
    assert run["status"] == "queued" and run["config"]["epochs"] == 3  # nothing trains here
    assert run["name"] == "tiny start" and run["tags"] == ["client"]
    t0 = time.monotonic()
    err = _error(lambda: client.wait(run_id, timeout=0.6, poll=0.1, progress=True))
    assert 0.5 < time.monotonic() - t0 < 10
    assert err.code is ErrorCode.UNAVAILABLE and repr(run_id) in err.message
    assert "still queued" in err.message and err.details["status"] == "queued"
    assert capsys.readouterr().out == f"run {run_id}: queued, 0/3 epochs\n"  # once: no change
    for bad in (0, -1, math.inf, "5"):
        assert "timeout" in str(_error(lambda bad=bad: client.wait(run_id, timeout=bad)))
    assert "poll" in str(_error(lambda: client.wait(run_id, poll=0)))
    err = _error(lambda: client.start_run(TINY, epochs=-1))
    assert err.details["http_status"] == 422 and "epochs" in err.message
    assert "execute" in str(_error(lambda: client.start_run(TINY, execute=False)))

    renamed = client.update(run_id, name="renamed", tags=["client", "second"])
    assert renamed["name"] == "renamed" and renamed["tags"] == ["client", "second"]
    assert list(client.runs(tags=["client", "second"])["id"]) == [run_id]
    err = _error(lambda: client.delete(run_id))
    assert err.code is ErrorCode.CONFLICT and "cancel it" in err.message
    assert client.cancel(run_id)["status"] == "cancelled"
    assert client.wait(run_id, timeout=5)["status"] == "cancelled"  # at once
    assert _error(lambda: client.cancel(run_id)).code is ErrorCode.CONFLICT
    client.delete(run_id)
    assert _error(lambda: client.run(run_id)).code is ErrorCode.NOT_FOUND


def test_wait_follows_a_run_epoch_by_epoch(
    client: Client, server: LiveServer, laptop: dict[str, str]
) -> None:
    """A run reported epoch by epoch (as a remote trainer does) while ``wait`` polls."""
    run_id = laptop["follow"]
    with RunStore(laptop["dir"], create=False) as store:
        config = store.get_run(run_id).config
        files = [store.data_dir / e.file for e in store.list_epochs(run_id)]
    seen: list[tuple[str, list[int]]] = []
    result: dict[str, Any] = {}

    def follow(run: dict[str, Any]) -> None:
        seen.append((run["status"], run["epochs"]))

    def wait() -> None:
        result["run"] = client.wait(run_id, timeout=60, poll=0.05, progress=follow)

    with HttpRunSink(server.url, token=TOKEN) as sink:
        sink.request("POST", "/runs", json={**config, "execute": False, "run_id": run_id})
        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        for epoch, path in enumerate(files):
            sink.put_epoch_file(run_id, epoch, path)
            deadline = time.monotonic() + 30
            while not seen or len(seen[-1][1]) <= epoch:
                assert time.monotonic() < deadline, seen
                time.sleep(0.02)
        sink.set_status(run_id, "completed")
        thread.join(60)
    assert result["run"]["status"] == "completed" and result["run"]["epochs"] == [0, 1, 2]
    running = [epochs for status, epochs in seen if status == "running"]
    assert running[-3:] == [[0], [0, 1], [0, 1, 2]]
    assert seen[-1] == ("completed", [0, 1, 2])


def test_push_a_local_run(server: LiveServer, laptop: dict[str, str]) -> None:
    run_id, where = laptop["push"], laptop["dir"]
    with Client(server.url, retries=0) as anonymous:
        err = _error(lambda: anonymous.push(run_id, where))
        assert err.details["http_status"] == 401
    with Client(server.url, token=TOKEN) as client:
        out = client.push(run_id, where)
        assert out == {
            "run_id": run_id,
            "url": f"{server.url}/runs/{run_id}",
            "created": True,
            "epochs": 2,
            "status": "completed",
        }
        assert client.push(run_id, where)["created"] is False  # again: nothing new
        remote = client.run(run_id)
        assert remote["name"] == "push" and remote["epochs"] == [0, 1]
        err = _error(lambda: client.push("nosuchrun", where))
        assert err.code is ErrorCode.NOT_FOUND and "nosuchrun" in err.message


def test_sweeps_through_the_client(client: Client) -> None:
    spec = {"kind": "width", "name": "client sweep", "base": TINY, "grid": {"widths": [4, 8]}}
    sweep = client.start_sweep(spec)
    assert sweep["counts"] == {"queued": 2} and not sweep["done"]
    assert client.sweep(sweep["id"])["id"] == sweep["id"]
    assert sweep["id"] in set(client.sweeps()["id"])
    err = _error(lambda: client.sweep_table(sweep["id"]))
    assert err.code is ErrorCode.CONFLICT and "queued" in err.message
    err = _error(lambda: client.wait_sweep(sweep["id"], timeout=0.3, poll=0.1))
    assert err.code is ErrorCode.UNAVAILABLE
    assert client.cancel_sweep(sweep["id"])["counts"] == {"cancelled": 2}
    done = client.wait_sweep(sweep["id"], timeout=10)
    assert done["done"] and done["study"] is None  # no run completed: no study table
    err = _error(lambda: client.sweep(""))
    assert err.code is ErrorCode.INVALID_ARGUMENT
    err = _error(lambda: client.start_sweep({"kind": "depth", "base": TINY}))
    assert err.details["http_status"] == 422 and "kind" in err.message


def test_nonfinite_spellings_become_floats() -> None:
    table = {
        "columns": ["layer", "a", "b", "c", "n"],
        "rows": [
            {"layer": "nan", "a": "inf", "b": None, "c": "x", "n": 1},
            {"layer": "layer2", "a": 1.5, "b": None, "c": None, "n": 2},
        ],
    }
    frame = _frame(table, {"epoch": 3})
    assert list(frame["layer"]) == ["nan", "layer2"]  # a column of text stays text
    assert frame["a"].tolist() == [math.inf, 1.5] and frame["b"].isna().all()
    assert frame["c"][0] == "x" and frame["c"].isna().tolist() == [False, True]
    assert frame["n"].dtype.kind == "i"
    assert frame.attrs == {"epoch": 3}


def test_retried_start_cannot_start_two_runs(server: LiveServer) -> None:
    """The first POST reaches the service but its answer is lost (a 503 here): the retry
    sends the same client-chosen id, gets 409, and start_run returns that one run."""
    calls: list[str] = []

    def lose_first_answer(request: httpx.Request) -> httpx.Response:
        with httpx.Client() as real:
            response = real.send(request)
            response.read()
        calls.append(request.method)
        if request.method == "POST" and calls.count("POST") == 1:
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "x"}})
        media = {"Content-Type": response.headers.get("content-type", "")}
        return httpx.Response(response.status_code, content=response.content, headers=media)

    http = httpx.Client(transport=httpx.MockTransport(lose_first_answer))
    with Client(server.url, token=TOKEN, http=http, backoff=0.01) as client:
        before = client.runs(limit=None).attrs["total"]
        run_id = client.start_run(TINY, name="retried")
        assert calls.count("POST") == 2  # the lost answer, then the retry's 409
        assert client.run(run_id)["name"] == "retried"
        assert client.runs(limit=None).attrs["total"] == before + 1
        client.cancel(run_id)
    http.close()
