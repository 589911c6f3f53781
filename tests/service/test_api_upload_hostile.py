"""Hostile uploads: ``PUT /runs/{id}/epochs/{epoch}`` answers 4xx with a JSON error naming the
problem, stores nothing, leaves the run's files as they were and removes its temp file.

The checks do not depend on the catalog, so these tests run on SQLite only. How fast and
how cheaply the refusals come: benchmarks/hostile_uploads.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.hostile_files import FLIP_CASES, HOSTILE, TRUNCATIONS, Builder, truncate
from tests.service.conftest import ClientFactory, TestClient, external_run
from tests.trainer.conftest import _snapshot
from trainer.store import write_epoch_file

H5 = {"Content-Type": "application/x-hdf5"}
TINY_LAYERS = {"layer1": (10, 1), "layer2": (1, 10)}  # the TINY runs' model (regression)


@pytest.fixture
def catalog_url() -> str | None:
    """SQLite only (overrides the conftest's two catalogs)."""
    return None


def _valid(path: Path, run_id: str, epoch: int, **kwargs: Any) -> Path:
    kwargs.setdefault("layers", TINY_LAYERS)
    kwargs.setdefault("no_bias", ())
    write_epoch_file(path, _snapshot(epoch, **kwargs), run_id=run_id)
    return path


class Run:
    """A TINY run with a stored epoch 0, and what must not change."""

    def __init__(self, client: TestClient, tmp_path: Path) -> None:
        self.client = client
        self.tmp = tmp_path
        self.id = external_run(client)
        first = _valid(tmp_path / "e0.h5", self.id, 0)
        response = client.put(f"/runs/{self.id}/epochs/0", content=first.read_bytes(), headers=H5)
        assert response.status_code == 201, response.text
        self.base = _valid(tmp_path / "e1.h5", self.id, 1)
        self.data = tmp_path / "data0"
        self.before = self.files()

    def files(self) -> dict[str, str]:
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((self.data / "runs" / self.id).iterdir())
        }

    def refused(self, path: Path, epoch: int = 1) -> dict[str, Any]:
        """PUT ``path``; asserts a 4xx JSON error and an untouched run; returns the error."""
        url = f"/runs/{self.id}/epochs/{epoch}"
        response = self.client.put(url, content=path.read_bytes(), headers=H5)
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/json")
        error: dict[str, Any] = response.json()["error"]
        assert error["code"] in ("corrupt", "invalid_argument"), error
        assert str(self.tmp) not in response.text  # no server path leaked
        assert self.files() == self.before
        assert [e["epoch"] for e in self.client.get(f"/runs/{self.id}/epochs").json()] == [0]
        assert not list(self.data.rglob("*.tmp.*"))  # the temp file is gone
        return error


@pytest.fixture
def run(client: TestClient, tmp_path: Path) -> Run:
    return Run(client, tmp_path)


def _case(run: Run, name: str, build: Builder, word: str) -> dict[str, Any]:
    error = run.refused(build(run.base, run.tmp / f"{name}.h5"))
    assert word in error["message"], error
    # the valid file still goes in afterwards
    ok = run.client.put(f"/runs/{run.id}/epochs/1", content=run.base.read_bytes(), headers=H5)
    assert ok.status_code == 201, ok.text
    return error


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_uploads_are_refused(run: Run, case: str) -> None:
    error = _case(run, case, *HOSTILE[case])
    if case.startswith(("sigma", "mu")):
        array = "layer1/posterior/weight/" + case.split("_")[0]
        assert error["details"] == {
            "file": error["details"]["file"],
            "layer": "layer1",
            "array": array,
        }
        assert error["message"].startswith(f"epoch file uploaded for run '{run.id}' epoch 1")


@pytest.mark.parametrize("case", sorted(FLIP_CASES))
def test_bit_flips_are_refused(run: Run, case: str) -> None:
    _case(run, case, *FLIP_CASES[case])


@pytest.mark.parametrize("fraction", TRUNCATIONS)
def test_truncated_uploads_are_refused(run: Run, fraction: float) -> None:
    cut = truncate(run.base, run.tmp / "cut.h5", int(run.base.stat().st_size * fraction))
    error = run.refused(cut)
    assert error["code"] == "corrupt" and "cannot be opened as HDF5" in error["message"]


def test_shapes_differing_from_the_stored_epochs_are_named(run: Run) -> None:
    """The issue's case: 201 then a 500 from plots/evolution.png. Now 422, and the plot works."""
    wide = _valid(run.tmp / "wide.h5", run.id, 1, layers={"layer1": (20, 3), "layer2": (1, 20)})
    error = run.refused(wide)
    assert error["code"] == "invalid_argument"
    assert "layer1/posterior/weight/mu has shape (20, 3) float32" in error["message"]
    assert "the run's is (10, 1) float32 (as epoch 0 of the run)" in error["message"]
    assert error["details"]["expected_shape"] == [10, 1]


def test_the_configured_model_pins_the_first_upload(client: TestClient, tmp_path: Path) -> None:
    run_id = external_run(client)
    wide = _valid(tmp_path / "wide.h5", run_id, 0, layers={"layer1": (20, 1), "layer2": (1, 20)})
    response = client.put(f"/runs/{run_id}/epochs/0", content=wide.read_bytes(), headers=H5)
    assert response.status_code == 422
    assert "(as the run's configured model)" in response.json()["error"]["message"]
    # a run registered with a CNN: MLP-shaped files are refused, the CNN's accepted
    cnn = external_run(client, dataset="mnist", model="cnn")
    mlp = _valid(tmp_path / "mlp.h5", cnn, 0)
    response = client.put(f"/runs/{cnn}/epochs/0", content=mlp.read_bytes(), headers=H5)
    err = response.json()["error"]
    assert response.status_code == 422 and "['conv1', 'conv2', 'fc1', 'fc2']" in err["message"]
    layers = {"conv1": (16, 1, 3, 3), "conv2": (32, 16, 3, 3), "fc1": (128, 1568), "fc2": (10, 128)}
    good = _valid(tmp_path / "cnn.h5", cnn, 0, layers=layers)
    response = client.put(f"/runs/{cnn}/epochs/0", content=good.read_bytes(), headers=H5)
    assert response.status_code == 201, response.text


def test_limits_come_from_the_settings(make_client: ClientFactory, tmp_path: Path) -> None:
    client = make_client(max_upload_layers=1, max_upload_elements=10_000)
    run_id = external_run(client)
    path = _valid(tmp_path / "e0.h5", run_id, 0)
    response = client.put(f"/runs/{run_id}/epochs/0", content=path.read_bytes(), headers=H5)
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert details["setting"] == "BNN_MAX_UPLOAD_LAYERS" and details["limit"] == 1
    client = make_client(max_upload_elements=100)
    run_id = external_run(client)
    path = _valid(tmp_path / "e0b.h5", run_id, 0)
    response = client.put(f"/runs/{run_id}/epochs/0", content=path.read_bytes(), headers=H5)
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert details["setting"] == "BNN_MAX_UPLOAD_ELEMENTS" and details["limit"] == 100
