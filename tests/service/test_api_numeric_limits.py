"""Numeric limits of the API: extreme gradient thresholds answer (no ``OverflowError``),
out-of-range query values, training configurations and PATCH bodies are 422 naming the
value, and a device the service's workers lack is refused (or fails the run at once)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service import analysis as an
from service.analysis._numeric import greater_than, less_than, pow10
from service.analysis.gradients import GradKind, GradThresholds, layer_scores
from service.jobs import run_training_job
from tests.service.conftest import TINY, ClientFactory, TestClient, external_run
from tests.service.test_api_analysis import Stored, frame_of, make_stored
from trainer.errors import BnnError
from trainer.remote import HttpRunSink

BASE = "http://testserver"


@pytest.fixture
def catalog_url() -> None:
    """SQLite is enough here (overrides the SQLite/PostgreSQL parametrisation)."""
    return None


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    yield from make_stored(tmp_path_factory.mktemp("limits"))


# ----------------------------------------------------------------------------- kernels
def test_pow10_saturates_instead_of_raising() -> None:
    assert pow10(2.0) == 100.0
    assert pow10(959.0 * 0.3) == 10.0 ** (959.0 * 0.3)
    assert pow10(1e6) == math.inf and pow10(math.inf) == math.inf
    assert pow10(-1e6) == 0.0 and pow10(-math.inf) == 0.0
    assert math.isnan(pow10(math.nan))


@pytest.mark.parametrize(
    "threshold", [0.0, 1e-50, 1e-40, 0.1, 1.0, 2.5, 3e38, 1e39, 1e300, math.inf, -1e39, math.nan]
)
def test_comparisons_are_exact_and_never_overflow_a_cast(threshold: float) -> None:
    g = np.array([0, 1e-45, 1e-40, 0.1, 1, 2.5, 3e38, np.inf, -np.inf, np.nan], np.float32)
    with np.errstate(all="raise"):
        above, below = greater_than(g, threshold), less_than(g, threshold)
    wide = g.astype(np.float64)
    with np.errstate(invalid="ignore"):
        assert (above == (wide > threshold)).all()
        assert (below == (wide < threshold)).all()


def test_comparisons_round_thresholds_between_float32_values_exactly() -> None:
    rng = np.random.default_rng(0)
    x = rng.random(10_000).astype(np.float32)
    a = np.float32(1.0)
    halfway = (float(a) + float(np.nextafter(a, np.float32(2)))) / 2  # a tie in float32
    for t in [*rng.random(50).tolist(), halfway, float(x[17])]:
        assert (greater_than(x, t) == (x.astype(np.float64) > t)).all()
        assert (less_than(x, t) == (x.astype(np.float64) < t)).all()


def _tree(g: np.ndarray) -> dict[str, Any]:
    stats = {"mean_abs": g, "nonfinite": np.zeros(g.shape, np.int64)}
    return {"weight": {"mu": stats}}


@pytest.mark.parametrize("z", [959.0, 388_730.99, 1e6, math.inf])
def test_layer_scores_take_any_threshold(z: float) -> None:
    # a wide spread of log10 |g| (scale ~ 20): 10^(median + z * scale) overflowed before
    g = np.array([1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 0.0, 1e30], np.float32)
    th = GradThresholds(z_threshold=z, explode_abs=None, vanish_abs=None)
    sc = layer_scores(_tree(g), th)
    assert sc.scale > 10 and sc.log_bound(GradKind.EXPLODING) > 308
    assert not sc.exploding(th).any()
    assert sc.vanishing(th).tolist() == [False] * 6 + [True, False]  # only the zero
    assert np.isfinite(sc.z(np.arange(6))).all()


def test_a_tiny_threshold_flags_everything_above_or_below_the_median() -> None:
    g = np.array([1e-3, 2e-3, 4e-3, 8e-3], np.float32)
    th = GradThresholds(z_threshold=1e-300, explode_abs=None, vanish_abs=None)
    sc = layer_scores(_tree(g), th)
    assert sc.exploding(th).tolist() == [False, False, True, True]
    assert sc.vanishing(th).tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"z_threshold": 0.0}, "z_threshold"),
        ({"z_threshold": math.nan}, "z_threshold"),
        ({"explode_abs": math.nan}, "explode_abs"),
        ({"vanish_abs": -1.0}, "vanish_abs"),
    ],
)
def test_thresholds_name_a_bad_value(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(BnnError, match=needle):
        GradThresholds(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- analysis API
@pytest.mark.parametrize("z", ["959", "388730.99", "1e6"])
def test_extreme_z_thresholds_answer_with_the_absolute_flags_only(stored: Stored, z: str) -> None:
    run_id = stored.ids["main"]
    response = stored.client.get(f"/runs/{run_id}/gradients", params={"z_threshold": z})
    assert response.status_code == 200, response.text
    table = frame_of(response.json())
    assert (table["z threshold"] == float(z)).all()
    # |g| ~ 1e-3 with no non-finite gradient: nothing is that far out, nor beyond 1e2 / 1e-10
    assert (table["exploding"] == 0).all() and (table["vanishing"] == 0).all()
    expected = an.gradient_diagnostics(stored.reader("main"), [4], z_threshold=float(z))
    assert table["exploding"].tolist() == expected["exploding"].tolist()


@pytest.mark.parametrize("kind", ["exploding", "vanishing"])
@pytest.mark.parametrize("z", ["388730.99", "1e6"])
def test_extreme_z_thresholds_rank_outliers_unflagged(stored: Stored, kind: str, z: str) -> None:
    run_id = stored.ids["main"]
    query = {"z_threshold": z, "kind": kind, "layer": "layer1", "k": "5"}
    response = stored.client.get(f"/runs/{run_id}/gradients/outliers", params=query)
    assert response.status_code == 200, response.text
    table = frame_of(response.json())
    assert len(table) == 5 and not table["flagged"].any()
    expected = an.gradient_outliers(stored.reader("main"), 4, 5, kind, "layer1", z_threshold=1e6)
    assert table["flat index"].tolist() == expected["flat index"].tolist()


def test_a_tiny_z_threshold_flags_nearly_everything(stored: Stored) -> None:
    run_id = stored.ids["main"]
    query = {"z_threshold": "1e-300", "explode_abs": "1e38", "vanish_abs": "0"}
    table = frame_of(stored.client.get(f"/runs/{run_id}/gradients", params=query).json())
    flagged = table["exploding"] + table["vanishing"]
    assert (flagged >= table["elements"] - 1).all()


Z_CASES = [
    ("z_threshold", "1e7", "less than or equal to 1000000"),
    ("z_threshold", "inf", "finite number"),
    ("z_threshold", "nan", "finite number"),
    ("z_threshold", "1e400", "finite number"),
    ("z_threshold", "-3", "greater than 0"),
]
ABS_CASES = [
    ("explode_abs", "1e39", "less than or equal to"),
    ("explode_abs", "inf", "finite number"),
    ("explode_abs", "0", "greater than 0"),
    ("vanish_abs", "nan", "finite number"),
    ("vanish_abs", "-1e-3", "greater than or equal to 0"),
    ("vanish_abs", "1e300", "less than or equal to"),
]
OUT_OF_RANGE = [("gradients", *case) for case in Z_CASES + ABS_CASES]
OUT_OF_RANGE += [("gradients/outliers", *case) for case in Z_CASES]


@pytest.mark.parametrize(("path", "field", "value", "needle"), OUT_OF_RANGE)
def test_out_of_range_thresholds_are_422_naming_the_value(
    stored: Stored, path: str, field: str, value: str, needle: str
) -> None:
    query = {field: value}
    response = stored.client.get(f"/runs/{stored.ids['main']}/{path}", params=query)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_argument"
    assert needle in error["details"]["fields"][field]
    assert repr(value) in error["details"]["fields"][field]


# ----------------------------------------------------------------------------- POST /runs
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"lr": 1e308}, "lr"),
        ({"lr": "inf"}, "lr"),
        ({"kl_weight": 1e4}, "kl_weight"),
        ({"prior_sigma0": "nan"}, "prior_sigma0"),
        ({"prior_mu0": "-inf"}, "prior_mu0"),
        ({"grad_clip": "Infinity"}, "grad_clip"),
        ({"posterior_sigma_init": 100}, "posterior_sigma_init"),
        ({"weight_decay": 11}, "weight_decay"),
        ({"prior_lr": 1e3}, "prior_lr"),
        ({"hyper_alpha": "inf"}, "hyper_alpha"),
    ],
)
@pytest.mark.parametrize("execute", [True, False])
def test_post_runs_refuses_non_finite_and_out_of_range_floats(
    client: TestClient, body: dict[str, Any], field: str, execute: bool
) -> None:
    response = client.post("/runs", json={**TINY, "execute": execute, **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert field in error["details"]["fields"]
    assert repr(body[field]) in error["details"]["fields"][field]
    assert client.jobs.submitted == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", [b"1e400", b"NaN", b"Infinity", b"-Infinity"])
def test_post_runs_refuses_non_finite_json_numbers(client: TestClient, raw: bytes) -> None:
    body = b'{"dataset": "regression", "epochs": 2, "lr": ' + raw + b"}"
    response = client.post("/runs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    fields = response.json()["error"]["details"]["fields"]
    assert "finite number" in fields["lr"]


def test_post_runs_refuses_a_device_this_machine_lacks(client: TestClient) -> None:
    import torch

    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 99}"
    response = client.post("/runs", json={**TINY, "device": missing})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert missing in error["message"] and error["details"]["device"] == missing
    assert client.jobs.submitted == []  # type: ignore[attr-defined]
    # ill-formed device names are refused whatever the machine
    bad = client.post("/runs", json={**TINY, "device": "cudafoo"})
    assert bad.status_code == 422 and "cudafoo" in bad.json()["error"]["message"]
    # a run trained elsewhere may use a device this machine lacks; cpu always queues
    assert external_run(client, device=missing)
    assert client.post("/runs", json={**TINY, "device": "cpu"}).status_code == 202


def test_a_remote_worker_without_the_device_fails_the_run_at_once(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.remote

    client = make_client(dask_scheduler="tcp://gpu-cluster.invalid:8786")
    response = client.post("/runs", json={**TINY, "device": "cuda:99"})
    assert response.status_code == 202, response.text  # the workers are elsewhere
    run = response.json()
    monkeypatch.setattr(
        trainer.remote, "HttpRunSink", lambda url, **kw: HttpRunSink(url, client=client, **kw)
    )
    with pytest.raises(BnnError, match="cuda:99"):
        run_training_job(run["id"], run["config"], BASE)
    failed = client.get(f"/runs/{run['id']}").json()
    assert failed["status"] == "failed" and failed["epochs"] == []
    assert "cannot start training" in failed["error"] and "cuda:99" in failed["error"]


# ----------------------------------------------------------------------------- PATCH
@pytest.mark.parametrize("value", [0, 1, "true", "yes", 1.5, None, "2024-01-01T00:00:00Z", {}])
def test_patch_heartbeat_must_be_a_boolean(client: TestClient, value: Any) -> None:
    run_id = external_run(client)
    response = client.patch(f"/runs/{run_id}", json={"heartbeat": value})
    assert response.status_code == 422, response.text
    assert "heartbeat" in response.json()["error"]["details"]["fields"]


def test_patch_heartbeat_true_records_and_false_does_nothing(client: TestClient) -> None:
    run_id = external_run(client)
    before = client.get(f"/runs/{run_id}").json()["heartbeat_at"]
    off = client.patch(f"/runs/{run_id}", json={"heartbeat": False})
    assert off.status_code == 200 and off.json()["heartbeat_at"] == before
    on = client.patch(f"/runs/{run_id}", json={"heartbeat": True})
    assert on.status_code == 200 and on.json()["heartbeat_at"] is not None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"skip_test": 0}, "skip_test must be true or false, got 0"),
        ({"local_reparam": "true"}, "local_reparam must be true or false"),
        ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
        ({"epochs": True}, "epochs must be an integer, got True"),
        ({"lr": False}, "lr must be a number, got False"),
        ({"widths": [4, 2.5]}, "widths must be an array of integers"),
    ],
)
def test_post_runs_takes_json_types_exactly(
    client: TestClient, body: dict[str, Any], needle: str
) -> None:
    """The schema says boolean / integer / number: lax coercions are 422 naming the field."""
    response = client.post("/runs", json={**TINY, **body})
    assert response.status_code == 422, response.text
    assert needle in response.text
    assert client.jobs.submitted == []  # type: ignore[attr-defined]
    assert client.post("/runs", json={**TINY, "lr": 1, "skip_test": True}).status_code == 202
    # JSON Schema's integer is a number without a fraction: 2.0 is one (stored as 2)
    accepted = client.post("/runs", json={**TINY, "epochs": 2.0, "widths": [4.0]})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["config"]["epochs"] == 2 and accepted.json()["config"]["widths"] == [4]


def test_study_and_sweep_specs_take_json_types_exactly(client: TestClient) -> None:
    study = {"base": {**TINY, "skip_test": 1}, "arms": {"a": {}}, "seeds": [0]}
    response = client.post("/studies", json=study)
    assert response.status_code == 422 and "base.skip_test" in response.text, response.text
    study = {"base": TINY, "arms": {"a": {"tune": {"epochs": [1, 2.5]}}}, "seeds": [0]}
    response = client.post("/studies", json=study)
    assert response.status_code == 422 and "tune.epochs" in response.text, response.text
    sweep = {"kind": "width", "base": {**TINY, "epochs": 1.5}}
    response = client.post("/sweeps", json=sweep)
    assert response.status_code == 422 and "base.epochs" in response.text, response.text
