"""Comparisons across runs over HTTP: two really trained runs (fixed vs learnable prior, same
seed) and the synthetic runs of ``test_api_analysis``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service import analysis as an
from tests.service.test_api_analysis import (
    Stored,
    assert_matches,
    csv_rows,
    frame_of,
    make_stored,
    write_run,
)
from trainer.train import train

TRAIN = {"dataset": "regression", "epochs": 2, "n_train": 64, "n_test": 32, "eval_samples": 2}
TRAIN |= {"seed": 3, "widths": [16]}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    """The synthetic runs plus ``learnable`` and ``fixed_trained`` (2-epoch regression runs)
    and ``late`` (its only epoch is 5)."""
    for s in make_stored(tmp_path_factory.mktemp("compare")):
        for label, prior in (("learnable", "learnable"), ("fixed_trained", "fixed")):
            result = train({**TRAIN, "prior": prior, "name": label}, sink=s.store, progress=False)
            s.ids[label] = result.run_id
        s.ids["late"] = write_run(s.store, "late", epochs=(5,))
        yield s


def runs(stored: Stored, *labels: str) -> str:
    return ",".join(stored.ids[label] for label in labels)


def test_kl_between_the_fixed_and_the_learnable_prior_run(stored: Stored) -> None:
    response = stored.client.get(f"/compare/kl?runs={runs(stored, 'learnable', 'fixed_trained')}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["runs"] == [stored.ids["learnable"], stored.ids["fixed_trained"]]
    assert body["epoch_a"] == body["epoch_b"] == 1
    with stored.reader("learnable") as a, stored.reader("fixed_trained") as b:
        expected = an.kl_between_runs(a, b, 1, 1)
    assert_matches(frame_of(body), expected)
    table = frame_of(body).set_index("layer")
    assert list(table.index) == ["layer1", "layer2"]
    assert (table["Weight symmetric KL"] > 0).all()  # the learnable prior moved the solution
    same = stored.client.get(f"/compare/kl?runs={runs(stored, 'learnable', 'learnable')}").json()
    assert np.allclose(frame_of(same)["Weight symmetric KL"].astype(float), 0.0)


def test_kl_between_chosen_epochs_and_as_csv(stored: Stored) -> None:
    pair = runs(stored, "main", "fixed")
    body = stored.client.get(f"/compare/kl?runs={pair}&epoch=4&epoch_b=0").json()
    assert (body["epoch_a"], body["epoch_b"]) == (4, 0)
    with stored.reader("main") as a, stored.reader("fixed") as b:
        assert_matches(frame_of(body), an.kl_between_runs(a, b, 4, 0))
    rows = csv_rows(stored.client.get(f"/compare/kl?runs={pair}&format=csv&layers=layer2").text)
    assert [r["layer"] for r in rows] == ["layer2"]


def test_gradient_outliers_side_by_side_with_counts(stored: Stored) -> None:
    pair = runs(stored, "learnable", "fixed_trained")
    response = stored.client.get(f"/compare/gradients?runs={pair}&k=3")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["epoch"] == 1 and body["k"] == 3
    with stored.reader("learnable") as a, stored.reader("fixed_trained") as b:
        expected = an.compare_gradient_outliers([a, b], 1, 3)
    assert_matches(frame_of(body, "outliers"), expected.table.set_index("run"))
    assert_matches(frame_of(body, "counts"), expected.counts)
    outliers = frame_of(body, "outliers")
    assert sorted(set(outliers["run"])) == sorted(body["runs"]) and len(outliers) == 6
    for run_id in body["runs"]:
        assert f"|g| ({run_id})" in outliers.columns
    url = f"/compare/gradients?runs={pair}"
    counts = csv_rows(stored.client.get(url + "&table=counts&format=csv").text)
    assert [r["layer"] for r in counts] == ["layer1", "layer2"]
    vanishing = stored.client.get(url + "&kind=vanishing&layer=layer2")
    assert vanishing.status_code == 200
    assert set(frame_of(vanishing.json(), "outliers")["layer"]) == {"layer2"}


def test_width_study_table(stored: Stored) -> None:
    three = runs(stored, "main", "wide", "learnable")
    body = stored.client.get(f"/compare/priors?runs={three}").json()
    assert body["epochs"] == [4, 4, 1]
    table = frame_of(body)
    widths = dict(zip(table["run"], table["width"], strict=False))
    assert widths[stored.ids["main"]] == 9 and widths[stored.ids["wide"]] == 20
    assert widths[stored.ids["learnable"]] == 16
    with stored.reader("main") as a, stored.reader("wide") as b, stored.reader("learnable") as c:
        assert_matches(table, an.width_study([a, b, c]))
    assert stored.client.get(f"/compare/priors?runs={three}&epoch=4").status_code == 404


@pytest.mark.parametrize(
    ("url", "status", "needle"),
    [
        ("/compare/kl?runs={main},{wide}", 422, "do not have the same architecture"),
        ("/compare/gradients?runs={main},{wide}", 422, "do not have the same architecture"),
        ("/compare/kl?runs={main}", 422, "exactly 2 runs"),
        ("/compare/kl?runs={main},{fixed},{wide}", 422, "exactly 2 runs"),
        ("/compare/gradients?runs={main}", 422, "2 to 16 runs"),
        ("/compare/priors?runs=,,", 422, "2 to 16 runs"),
        ("/compare/priors", 422, "runs"),
        ("/compare/kl?runs={main},nope", 404, "unknown run 'nope'"),
        ("/compare/kl?runs={main},{fixed}&epoch=3", 404, "captured epochs: [0, 2, 4]"),
        ("/compare/gradients?runs={main},{late}", 404, "no captured epoch in common"),
        ("/compare/gradients?runs={main},{learnable}&epoch=1", 404, "has no epoch 1"),
        ("/compare/gradients?runs={main},{fixed}&k=0", 422, "k"),
        ("/compare/gradients?runs={main},{fixed}&table=both", 422, "table"),
        ("/compare/gradients?runs={main},{fixed}&layer=nope", 404, "unknown layer 'nope'"),
        ("/compare/kl?runs={main},{empty}", 404, "no captured epochs"),
        ("/compare/gradients?runs={layer_level},{main}", 404, "element-level"),
    ],
)
def test_compare_errors(stored: Stored, url: str, status: int, needle: str) -> None:
    response = stored.client.get(url.format(**stored.ids))
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert needle in error["message"] + str(error["details"])


def test_compare_results_are_cached(stored: Stored) -> None:
    url = f"/compare/priors?runs={runs(stored, 'main', 'fixed')}"
    first = stored.client.get(url)
    cache = stored.client.app.state.analysis_cache  # type: ignore[attr-defined]
    misses = cache.misses
    assert stored.client.get(url).content == first.content and cache.misses == misses
