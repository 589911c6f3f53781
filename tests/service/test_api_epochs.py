"""Epoch uploads, epoch and metric tables (JSON and CSV), file downloads, on both catalogs.

Uploads must fit the run: the runs here are TINY (regression, one hidden layer of 10), so
the files are built with that model's layers (hostile uploads: test_api_upload_hostile.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import pytest
from httpx import Response

from tests.service.conftest import AUTH, TOKEN, ClientFactory, TestClient, external_run
from tests.trainer.conftest import _snapshot
from trainer.store import write_epoch_file

H5 = {"Content-Type": "application/x-hdf5"}
EpochFile = Callable[..., Path]
#: the layers of the TINY runs' model (regression: 1 -> 10 -> 1)
TINY_LAYERS = {"layer1": (10, 1), "layer2": (1, 10)}


@pytest.fixture
def epoch_file(tmp_path: Path) -> EpochFile:
    """``epoch_file(epoch, seed=0, run_id="", **snapshot_options)``: a valid epoch file of
    the TINY model (the conftest's has other layers and another run's id)."""

    def make(epoch: int, seed: int = 0, run_id: str = "", **kwargs: Any) -> Path:
        path = tmp_path / f"upload_{epoch}_{seed}.h5"
        kwargs.setdefault("layers", TINY_LAYERS)
        kwargs.setdefault("no_bias", ())
        write_epoch_file(path, _snapshot(epoch, seed=seed, **kwargs), run_id=run_id)
        return path

    return make


def put(client: TestClient, run_id: str, epoch: int, path: Path, **headers: str) -> Response:
    return client.put(
        f"/runs/{run_id}/epochs/{epoch}", content=path.read_bytes(), headers={**H5, **headers}
    )


def test_upload_is_validated_stored_once_and_idempotent(
    client: TestClient, epoch_file: EpochFile
) -> None:
    run_id = external_run(client)
    path = epoch_file(0)
    first = put(client, run_id, 0, path)
    assert first.status_code == 201, first.text
    record = first.json()
    assert record["epoch"] == 0 and record["size"] == path.stat().st_size
    assert record["checksum"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["metrics"]["loss"] == pytest.approx(1.5)
    assert first.headers["location"].endswith(f"/runs/{run_id}/epochs/0")
    # a retry with the same bytes: 200 and the same record
    retry = put(client, run_id, 0, path)
    assert retry.status_code == 200 and retry.json() == record
    # other content for a stored epoch: 409, the stored file untouched
    other = put(client, run_id, 0, epoch_file(0, seed=7))
    assert other.status_code == 409 and "other content" in other.json()["error"]["message"]
    download = client.get(f"/runs/{run_id}/epochs/0/file")
    assert download.status_code == 200 and download.content == path.read_bytes()
    assert download.headers["content-type"] == "application/x-hdf5"
    assert client.get(f"/runs/{run_id}").json()["epochs"] == [0]


def test_upload_errors(client: TestClient, epoch_file: EpochFile, tmp_path: Path) -> None:
    run_id = external_run(client)
    # the URL's epoch must be the file's
    wrong = put(client, run_id, 3, epoch_file(2))
    assert wrong.status_code == 422 and "holds epoch 2" in wrong.json()["error"]["message"]
    # not HDF5 at all, or HDF5 that breaks the schema: 422 naming the problem, no path leaked
    junk = client.put(f"/runs/{run_id}/epochs/0", content=b"not hdf5" * 100, headers=H5)
    assert junk.status_code == 422 and junk.json()["error"]["code"] == "corrupt"
    assert "cannot be opened as HDF5" in junk.json()["error"]["message"]
    assert str(tmp_path) not in junk.text
    bad = epoch_file(1)
    with h5py.File(bad, "a") as f:
        del f["params/layer1/posterior/weight/sigma"]
    broken = put(client, run_id, 1, bad)
    assert broken.status_code == 422 and "sigma" in broken.json()["error"]["message"]
    with h5py.File(bad, "a") as f:
        f["params/layer1/posterior/weight/sigma"] = h5py.ExternalLink("/etc/passwd", "/x")
    assert put(client, run_id, 1, bad).status_code == 422
    empty = client.put(f"/runs/{run_id}/epochs/0", content=b"", headers=H5)
    assert empty.status_code == 422 and "empty" in empty.json()["error"]["message"]
    media = client.put(
        f"/runs/{run_id}/epochs/0", content=b"{}", headers={"Content-Type": "application/json"}
    )
    assert media.status_code == 415 and media.json()["error"]["code"] == "unsupported_media_type"
    for path, code in [
        (f"/runs/{run_id}/epochs/-1", 422),
        (f"/runs/{run_id}/epochs/x", 422),
        (f"/runs/{run_id}/epochs/{2**40}", 422),
        ("/runs/nobody/epochs/0", 404),
    ]:
        response = client.put(path, content=epoch_file(0).read_bytes(), headers=H5)
        assert response.status_code == code, path
    assert client.get(f"/runs/{run_id}").json()["epochs"] == []
    assert not list((tmp_path / "data0").rglob("*.tmp.*"))  # temp files removed


def test_finished_runs_take_no_new_epochs_but_accept_retries(
    client: TestClient, epoch_file: EpochFile
) -> None:
    run_id = external_run(client)
    assert put(client, run_id, 0, epoch_file(0)).status_code == 201
    client.patch(f"/runs/{run_id}", json={"status": "completed"})
    assert put(client, run_id, 0, epoch_file(0)).status_code == 200
    late = put(client, run_id, 1, epoch_file(1))
    assert late.status_code == 409 and late.json()["error"]["details"]["status"] == "completed"


def test_uploads_over_the_limit_are_413(make_client: ClientFactory, epoch_file: EpochFile) -> None:
    client = make_client(max_upload_bytes=1000)
    run_id = external_run(client)
    data = epoch_file(0).read_bytes()
    assert len(data) > 1000
    declared = client.put(f"/runs/{run_id}/epochs/0", content=data, headers=H5)
    assert declared.status_code == 413
    err = declared.json()["error"]
    assert err["code"] == "too_large" and err["details"]["setting"] == "BNN_MAX_UPLOAD_BYTES"
    assert err["details"]["limit"] == 1000 and err["details"]["size"] == len(data)

    def streamed():  # chunked, no Content-Length: stopped while streaming
        for start in range(0, len(data), 256):
            yield data[start : start + 256]

    chunked = client.put(f"/runs/{run_id}/epochs/0", content=streamed(), headers=H5)
    assert chunked.status_code == 413 and "1000 bytes" in chunked.json()["error"]["message"]
    assert client.get(f"/runs/{run_id}/epochs").json() == []


def test_upload_needs_the_token(make_client: ClientFactory, epoch_file: EpochFile) -> None:
    client = make_client(api_token=TOKEN)
    run_id = external_run(client, headers=AUTH)
    assert put(client, run_id, 0, epoch_file(0)).status_code == 401
    assert put(client, run_id, 0, epoch_file(0), **AUTH).status_code == 201


def test_epochs_and_metrics_tables(client: TestClient, epoch_file: EpochFile) -> None:
    run_id = external_run(client)
    for epoch in (0, 5, 10):
        assert put(client, run_id, epoch, epoch_file(epoch)).status_code == 201
    epochs = client.get(f"/runs/{run_id}/epochs").json()
    assert [e["epoch"] for e in epochs] == [0, 5, 10]
    assert set(epochs[0]) == {"run_id", "epoch", "metrics", "size", "checksum", "created_at"}
    rows = list(csv.DictReader(io.StringIO(client.get(f"/runs/{run_id}/epochs?format=csv").text)))
    assert [r["epoch"] for r in rows] == ["0", "5", "10"]
    assert list(rows[0])[:4] == ["epoch", "size", "checksum", "created_at"]
    assert float(rows[1]["loss"]) == pytest.approx(1.5 / 6)
    metrics = client.get(f"/runs/{run_id}/metrics").json()
    assert metrics["epochs"] == [0, 5, 10]
    assert metrics["series"]["loss"] == pytest.approx([1.5, 1.5 / 6, 1.5 / 11])
    assert set(metrics["series"]) == {"loss", "nll", "kl", "kl/layer1"}
    only = client.get(f"/runs/{run_id}/metrics?names=loss,kl").json()
    assert list(only["series"]) == ["loss", "kl"]
    text = client.get(f"/runs/{run_id}/metrics?format=csv&names=loss").text
    assert text.splitlines()[0] == "epoch,loss" and len(text.splitlines()) == 4
    unknown = client.get(f"/runs/{run_id}/metrics?names=loss,accuracy")
    assert unknown.status_code == 404  # not a metric of this run
    assert "'accuracy'" in unknown.json()["error"]["message"]
    assert "loss" in unknown.json()["error"]["details"]["metrics"]
    one = client.get(f"/runs/{run_id}/epochs/5").json()
    assert one["epoch"] == 5 and one["metrics"]["loss"] == pytest.approx(0.25)
    assert client.get(f"/runs/{run_id}").json()["metrics"]["loss"] == pytest.approx(1.5 / 11)


def test_unknown_epochs_are_404_listing_the_captured_ones(
    client: TestClient, epoch_file: EpochFile
) -> None:
    run_id = external_run(client)
    for epoch in (0, 4):
        put(client, run_id, epoch, epoch_file(epoch))
    for path in (f"/runs/{run_id}/epochs/3", f"/runs/{run_id}/epochs/3/file"):
        response = client.get(path)
        assert response.status_code == 404
        err = response.json()["error"]
        assert err["details"]["epochs"] == [0, 4] and "[0, 4]" in err["message"]
    for path in ("/runs/zz/epochs", "/runs/zz/metrics", "/runs/zz/epochs/0"):
        assert client.get(path).status_code == 404


def test_non_finite_metrics_survive_as_strings(client: TestClient, epoch_file: EpochFile) -> None:
    run_id = external_run(client)
    path = epoch_file(0, metrics={"loss": float("nan"), "kl": float("inf")})
    assert put(client, run_id, 0, path).status_code == 201
    series = client.get(f"/runs/{run_id}/metrics").json()["series"]
    assert series == {"loss": ["nan"], "kl": ["inf"]}
    assert "nan" in client.get(f"/runs/{run_id}/metrics?format=csv").text


def test_one_epoch_says_how_its_file_stores_it(client: TestClient, tmp_path: Path) -> None:
    """``GET /runs/{id}/epochs/{epoch}`` adds ``storage`` (read from the file): format
    version, the statistics' mantissa bits and whether the posteriors are compressed; the
    list of epochs stays the catalog's alone."""
    run_id = external_run(client)
    forms = {0: {"schema_version": 1}, 1: {}, 2: {"stat_bits": 3}}
    for epoch, options in forms.items():
        path = tmp_path / f"e{epoch}.h5"
        snap = _snapshot(epoch, layers=TINY_LAYERS, no_bias=())
        write_epoch_file(path, snap, run_id=run_id, **options)
        assert put(client, run_id, epoch, path).status_code == 201
    got = {e: client.get(f"/runs/{run_id}/epochs/{e}").json()["storage"] for e in forms}
    assert got == {
        0: {"schema_version": 1, "stat_bits": 7, "posteriors_compressed": False},
        1: {"schema_version": 2, "stat_bits": 7, "posteriors_compressed": False},
        2: {"schema_version": 2, "stat_bits": 3, "posteriors_compressed": False},
    }
    listed = client.get(f"/runs/{run_id}/epochs").json()
    assert [e.get("storage") for e in listed] == [None, None, None]
