"""The analysis tables of one run over HTTP: values, CSV, epochs, errors, caching.

``stored`` is one app (SQLite) with synthetic runs written straight into its store:
``main`` (3 epochs, element gradients, a stored NaN), ``fixed`` (same architecture,
fixed prior), ``wide`` (another architecture), ``empty`` (no epoch yet) and
``layer_level`` (gradient statistics per tensor only). The compare and plot tests
import it.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from service import analysis as an
from service.analysis.synthetic import synthetic_snapshot
from service.app import create_app
from service.deps import get_jobs
from service.settings import Settings
from tests.service.conftest import ClientFactory, FakeJobs
from trainer.store import RunReader, RunStatus, RunStore

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

EPOCHS = (0, 2, 4)
SIZES = (12, 9, 3)


@dataclass
class Stored:
    client: TestClient
    store: RunStore
    ids: dict[str, str]

    def reader(self, label: str) -> RunReader:
        return RunReader(self.ids[label], store=self.store)


def write_run(
    store: RunStore, name: str, sizes: tuple[int, ...] = SIZES, *, run_id: str | None = None,
    epochs: tuple[int, ...] = EPOCHS, seed: int = 0, **kw: Any,
) -> str:  # fmt: skip
    run = store.create_run(name, {"dataset": "synthetic"}, run_id=run_id).id
    for e in epochs:
        snap = synthetic_snapshot(e, sizes, seed=seed, **{"grad_level": "element", **kw})
        if name == "main" and e == epochs[-1]:
            snap.params["layer1"]["posterior"]["weight"]["mu"][1, 2] = np.nan
        store.write_epoch(run, snap)
    store.set_status(run, RunStatus.COMPLETED)
    return run


def make_stored(tmp: Path) -> Iterator[Stored]:
    app = create_app(Settings(data_dir=tmp / "data"))
    jobs = FakeJobs()
    app.dependency_overrides[get_jobs] = lambda: jobs
    with TestClient(app) as client:
        store: RunStore = app.state.store
        ids = {
            "main": write_run(store, "main"),
            "fixed": write_run(store, "fixed", seed=1, learnable=False),
            "wide": write_run(store, "wide", (12, 20, 3), seed=2),
            "layer_level": write_run(store, "layer_level", grad_level="layer"),
            "empty": store.create_run("empty", {}).id,
        }
        yield Stored(client, store, ids)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    yield from make_stored(tmp_path_factory.mktemp("analysis"))


def frame_of(body: dict[str, Any], name: str = "table") -> pd.DataFrame:
    table = body[name]
    return pd.DataFrame(table["rows"], columns=table["columns"])


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def assert_matches(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The API's rows against the analysis function's DataFrame (index as columns)."""
    exp = expected.reset_index()
    assert list(got.columns) == [str(c) for c in exp.columns]
    for col in exp.columns:
        want, have = exp[col].to_list(), got[str(col)].to_list()
        for w, h in zip(want, have, strict=True):
            if isinstance(w, float | np.floating) and not np.isfinite(w):  # NaN: no value
                assert h == (None if np.isnan(w) else ("inf" if w > 0 else "-inf")), col
            elif isinstance(w, float | np.floating):
                assert math.isclose(float(h), float(w), rel_tol=1e-12, abs_tol=0.0), col
            elif isinstance(w, tuple):
                assert tuple(h) == w, col
            else:
                assert h == w, col


CASES = [
    ("stats", {}, lambda r: an.get_overall_weight_stats(r, 4)),
    ("stats", {"epoch": 2, "dist": "prior"}, lambda r: an.get_overall_weight_stats(r, 2, "prior")),
    ("kl", {}, lambda r: an.compute_layer_kl_divergences(r, 4)),
    ("kl", {"epoch": 0, "dist": "prior"}, lambda r: an.compute_layer_kl_divergences(r, 0, "prior")),
    ("kl/prior", {"epoch": 2}, lambda r: an.kl_to_prior(r, [2]).droplevel("epoch")),
    ("kl/trajectory", {}, lambda r: an.pairwise_kl_trajectory(r)),
    ("kl/trajectory", {"of": "prior", "epochs": "4,0", "layers": "layer2"},
     lambda r: an.kl_to_prior(r, [4, 0], layers=["layer2"])),
    ("priors", {"epochs": "2"}, lambda r: an.prior_trajectories(r, [2])),
    ("percentiles", {"layer": "layer1", "stat": "sigma", "param": "bias"},
     lambda r: an.percentile_bands(r, "layer1", "bias", "sigma")),
    ("gradients", {"epoch": 2}, lambda r: an.gradient_diagnostics(r, [2]).droplevel("epoch")),
    ("gradients", {"grad_param": "rho", "stat": "max_abs", "layer": "layer2", "z_threshold": 2},
     lambda r: an.gradient_diagnostics(
         r, [4], layers="layer2", grad_param="rho", stat="max_abs", z_threshold=2.0
     ).droplevel("epoch")),
    ("gradients/outliers", {}, lambda r: an.gradient_outliers(r, 4)),
    ("gradients/outliers", {"k": 3, "kind": "vanishing", "layer": "layer1", "epoch": 0},
     lambda r: an.gradient_outliers(r, 0, 3, "vanishing", "layer1")),
]  # fmt: skip


@pytest.mark.parametrize(("path", "query", "expected"), CASES)
def test_tables_equal_the_analysis_functions(
    stored: Stored, path: str, query: dict[str, Any], expected: Any
) -> None:
    run_id = stored.ids["main"]
    response = stored.client.get(f"/runs/{run_id}/{path}", params=query)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["run_id"] == run_id
    with stored.reader("main") as reader:
        want = expected(reader)
    assert_matches(frame_of(body), want)
    # the same table as CSV: same columns, same number of rows
    as_csv = stored.client.get(f"/runs/{run_id}/{path}", params={**query, "format": "csv"})
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert ".csv" in as_csv.headers["content-disposition"]
    rows = csv_rows(as_csv.text)
    assert len(rows) == len(want) and list(rows[0]) == body["table"]["columns"]


def test_epoch_defaults_to_the_latest_and_the_stored_nan_is_counted(stored: Stored) -> None:
    run_id = stored.ids["main"]
    body = stored.client.get(f"/runs/{run_id}/kl").json()
    assert body["epoch"] == 4 and body["dist"] == "posterior"
    layer1 = frame_of(body).set_index("layer").loc["layer1"]
    assert layer1["Weight non-finite"] == 1 and math.isfinite(layer1["Weight KL Sum"])
    assert list(body["table"]["columns"][1:5]) == list(an.KL_COLUMNS)
    stats = stored.client.get(f"/runs/{run_id}/stats").json()
    assert frame_of(stats)["layer"].to_list() == ["Overall", "layer1", "layer2"]


def test_csv_leaves_values_that_do_not_exist_empty_and_joins_indices(stored: Stored) -> None:
    run_id = stored.ids["main"]
    text = stored.client.get(f"/runs/{run_id}/kl?epoch=0&dist=prior&format=csv").text
    rows = csv_rows(text)
    assert rows[0]["Weight KL Average"] == ""  # a shared prior has no pairs
    assert "nan" not in text.lower()
    outliers = csv_rows(stored.client.get(f"/runs/{run_id}/gradients/outliers?format=csv").text)
    assert len(outliers) == 10 and ";" in outliers[0]["index"]


def test_a_value_that_does_not_exist_is_json_null(stored: Stored) -> None:
    """A layer with one bias has no pair of biases: its average pairwise KL is null (not
    the string "nan"), in JSON and in the run's tables over epochs; empty in CSV."""
    run_id = write_run(stored.store, "one_bias", (4, 3, 1), epochs=(0,))
    for url in (f"/runs/{run_id}/kl", f"/runs/{run_id}/kl/trajectory"):
        response = stored.client.get(url)
        assert response.status_code == 200, url
        assert "nan" not in response.text.lower(), url
        rows = response.json()["table"]["rows"]
        last = next(r for r in rows if r["layer"] == "layer2")
        assert last["Bias KL Average"] is None and last["Bias KL Sum"] == 0, url
        first = next(r for r in rows if r["layer"] == "layer1")
        assert isinstance(first["Bias KL Average"], float), url  # three biases: three pairs
        text = stored.client.get(url, params={"format": "csv"}).text
        layer2 = next(r for r in csv_rows(text) if r["layer"] == "layer2")
        assert layer2["Bias KL Average"] == "" and "nan" not in text.lower(), url


def test_every_table_says_what_null_means(client: Any) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    tables = [
        path
        for path, item in paths.items()
        if path.startswith(("/runs/{run_id}/", "/compare/"))
        and "/plots/" not in path
        and "/epochs" not in path
        and "get" in item
    ]
    assert len(tables) == 12, tables  # 8 of one run, 3 across runs, and the metrics
    for path in tables:
        assert "null" in paths[path]["get"]["description"].lower(), path


@pytest.mark.parametrize(
    ("url", "status", "needle"),
    [
        ("/runs/nope/kl", 404, "unknown run 'nope'"),
        ("/runs/{main}/kl?epoch=3", 404, "captured epochs: [0, 2, 4]"),
        ("/runs/{main}/stats?epoch=99999", 404, "has no epoch 99999"),
        ("/runs/{main}/kl?epoch=-1", 422, "epoch"),
        ("/runs/{main}/kl?epoch=x", 422, "epoch"),
        ("/runs/{main}/kl?dist=likelihood", 422, "dist"),
        ("/runs/{main}/kl?format=xml", 422, "format"),
        ("/runs/{main}/kl/trajectory?epochs=0,3", 404, "has no epoch 3"),
        ("/runs/{main}/kl/trajectory?epochs=0,x", 422, "epochs"),
        ("/runs/{main}/kl/trajectory?epochs=0,-2", 422, "epochs: String should match pattern"),
        ("/runs/{main}/kl/trajectory?epochs=2," + "9" * 5000, 404, "(5000 digits)"),
        ("/runs/{main}/kl/trajectory?epochs=0 3", 404, "has no epoch 3"),
        ("/runs/{main}/kl/trajectory?of=both", 422, "of"),
        ("/runs/{main}/priors?layers=layer9", 404, "unknown layer 'layer9'"),
        ("/runs/{main}/percentiles", 422, "layer"),
        ("/runs/{main}/percentiles?layer=nope", 404, "unknown layer 'nope'"),
        ("/runs/{main}/gradients/outliers?layer=nope", 404, "unknown layer 'nope'"),
        ("/runs/{main}/gradients/outliers?k=0", 422, "k"),
        ("/runs/{main}/gradients/outliers?kind=huge", 422, "kind"),
        ("/runs/{main}/gradients?z_threshold=0", 422, "z_threshold"),
        ("/runs/{main}/gradients?grad_param=sigma", 422, "grad_param"),
        ("/runs/{empty}/kl", 404, "no captured epochs"),
        ("/runs/{empty}/priors", 404, "no captured epochs"),
        ("/runs/{layer_level}/gradients/outliers", 404, "element-level"),
    ],
)
def test_errors_name_the_problem(stored: Stored, url: str, status: int, needle: str) -> None:
    response = stored.client.get(url.format(**stored.ids))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] + str(error["details"])


@pytest.mark.parametrize("epochs", ["0,4", "0 4", " 0 ,, 4 ", "00004,0", "4 0 4"])
def test_epochs_are_separated_by_commas_or_blanks(stored: Stored, epochs: str) -> None:
    url = f"/runs/{stored.ids['main']}/kl/trajectory"
    table = stored.client.get(url, params={"epochs": epochs})
    assert table.status_code == 200, table.text
    assert sorted(set(frame_of(table.json())["epoch"])) == [0, 4]
    every = frame_of(stored.client.get(url, params={"epochs": " , "}).json())
    assert sorted(set(every["epoch"])) == [0, 2, 4]  # blank: all captured


def test_unknown_epoch_lists_the_captured_epochs(stored: Stored) -> None:
    error = stored.client.get(f"/runs/{stored.ids['main']}/gradients?epoch=1").json()["error"]
    assert error["code"] == "not_found" and error["details"]["epochs"] == [0, 2, 4]


def test_layer_level_gradients_give_diagnostics(stored: Stored) -> None:
    body = stored.client.get(f"/runs/{stored.ids['layer_level']}/gradients").json()
    assert set(frame_of(body)["level"]) == {"layer"}


def test_a_cache_hit_returns_the_identical_body_and_honours_etags(stored: Stored) -> None:
    url = f"/runs/{stored.ids['fixed']}/kl?epoch=2"
    cache = stored.client.app.state.analysis_cache  # type: ignore[attr-defined]
    first = stored.client.get(url)
    misses = cache.misses
    second = stored.client.get(url)
    assert second.content == first.content and cache.misses == misses
    assert second.headers["etag"] == first.headers["etag"]
    again = stored.client.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    # CSV of the cached table is rendered from the same computation
    assert stored.client.get(url + "&format=csv").status_code == 200
    assert cache.misses == misses + 1  # the CSV body only


def test_a_run_deleted_and_created_again_is_not_served_from_the_cache(
    tmp_path: Path,
) -> None:
    for s in make_stored(tmp_path):
        run_id = s.ids["fixed"]
        before = s.client.get(f"/runs/{run_id}/kl").json()
        assert s.client.delete(f"/runs/{run_id}").status_code == 204
        assert s.client.get(f"/runs/{run_id}/kl").status_code == 404
        write_run(s.store, "fixed", run_id=run_id, seed=7, learnable=False)
        after = s.client.get(f"/runs/{run_id}/kl").json()
        assert after["table"] != before["table"]
        with s.reader("fixed") as reader:
            assert_matches(frame_of(after), an.compute_layer_kl_divergences(reader))


def test_a_new_epoch_of_a_running_run_is_seen(tmp_path: Path) -> None:
    for s in make_stored(tmp_path):
        run2 = s.store.create_run("growing", {}).id
        s.store.write_epoch(run2, synthetic_snapshot(0, SIZES))
        assert s.client.get(f"/runs/{run2}/kl").json()["epoch"] == 0
        s.store.write_epoch(run2, synthetic_snapshot(1, SIZES))
        assert s.client.get(f"/runs/{run2}/kl").json()["epoch"] == 1
        assert s.client.get(f"/runs/{run2}/priors").json()["epochs"] == [0, 1]


def test_auth_reads_protect_the_analysis_endpoints(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "d", api_token="tok", auth_reads=True))
    app.dependency_overrides[get_jobs] = FakeJobs
    with TestClient(app) as client:
        run_id = write_run(app.state.store, "x")
        for url in (f"/runs/{run_id}/kl", f"/runs/{run_id}/plots/kl.png",
                    f"/compare/kl?runs={run_id},{run_id}"):  # fmt: skip
            assert client.get(url).status_code == 401
            ok = client.get(url, headers={"Authorization": "Bearer tok"})
            assert ok.status_code == 200, ok.text


def test_tables_and_plots_on_both_catalogs(make_client: ClientFactory) -> None:
    client = make_client()
    run_id = write_run(client.app.state.store, "main")  # type: ignore[attr-defined]
    kl = client.get(f"/runs/{run_id}/kl?epoch=2")
    assert kl.status_code == 200 and kl.json()["epoch"] == 2
    assert client.get(f"/runs/{run_id}/kl?epoch=3").json()["error"]["details"]["epochs"] == [
        0,
        2,
        4,
    ]
    png = client.get(f"/runs/{run_id}/plots/priors.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.get(f"/compare/kl?runs={run_id},{run_id}").status_code == 200
