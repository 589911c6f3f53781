"""No input to the analysis, compare and plot endpoints gives a 500: random run ids, kinds,
query names and values (the test client re-raises what the app does not handle)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.routers.plots import COMPARE_PLOTS, RUN_PLOTS
from tests.service.test_api_analysis import Stored, make_stored

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TABLES = ["stats", "kl", "kl/prior", "kl/trajectory", "priors", "percentiles", "gradients",
          "gradients/outliers"]  # fmt: skip
OPTIONS = sorted(
    {"epoch", "epochs", "dist", "format", "layer", "layers", "of", "k", "kind", "param", "stat",
     "grad_param", "z_threshold", "explode_abs", "vanish_abs", "table", "epoch_b", "runs",
     "download", "bogus"}
    | {name for spec in RUN_PLOTS.values() for name in spec.options.model_fields}
)  # fmt: skip
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # httpx encodes UTF-8
VALUES = st.one_of(
    st.sampled_from(["0", "2", "4", "-1", "1e3", "nan", "inf", "-inf", "layer1", "layer2",
                     "layer1:3", "layer1:1.2", "bias", "sigma", "prior", "csv", "1", "true",
                     "0,2", ",", "", "99999999999999999999", "1" * 400, "\x00"]),
    TEXT,
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True).map(str),
)  # fmt: skip


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    yield from make_stored(tmp_path_factory.mktemp("fuzz"))


def _check(stored: Stored, path: str, query: dict[str, str]) -> None:
    response = stored.client.get(path, params=query)
    assert response.status_code < 500, (path, query, response.text)
    if response.status_code >= 400:
        assert "error" in response.json()


def _run(stored: Stored, choice: str) -> str:
    return stored.ids.get(choice, quote(choice, safe=""))


RUN_CHOICES = st.sampled_from(["main", "fixed", "empty", "layer_level", "wide"]) | TEXT


@FUZZ
@given(
    run=RUN_CHOICES,
    table=st.sampled_from(TABLES),
    query=st.dictionaries(st.sampled_from(OPTIONS), VALUES, max_size=4),
)
def test_random_table_queries(stored: Stored, run: str, table: str, query: dict) -> None:
    _check(stored, f"/runs/{_run(stored, run)}/{table}", query)


@FUZZ
@given(
    run=RUN_CHOICES,
    kind=st.sampled_from([*RUN_PLOTS, "x", "kl.png", "%2e%2e"]) | TEXT,
    query=st.dictionaries(st.sampled_from(OPTIONS), VALUES, max_size=4),
)
def test_random_plot_queries(stored: Stored, run: str, kind: str, query: dict) -> None:
    _check(stored, f"/runs/{_run(stored, run)}/plots/{quote(kind, safe='')}.png", query)


@FUZZ
@given(
    runs=st.lists(RUN_CHOICES, min_size=0, max_size=4),
    path=st.sampled_from(["kl", "gradients", "priors", *(f"plots/{k}.png" for k in COMPARE_PLOTS)]),
    query=st.dictionaries(st.sampled_from(OPTIONS), VALUES, max_size=4),
)
def test_random_comparisons(stored: Stored, runs: list[str], path: str, query: dict) -> None:
    ids = ",".join(stored.ids.get(r, r) for r in runs)
    _check(stored, f"/compare/{path}", {"runs": ids, **query})


def test_bytes_that_are_not_utf8(stored: Stored) -> None:
    main = stored.ids["main"]
    for url in (
        f"/runs/{main}/kl?layer=%ED%A0%80%FF",
        f"/runs/{main}/kl/trajectory?layers=%ED%A0%80",
        f"/runs/{main}/plots/kl.png?layers=%FF%FE",
        f"/runs/{main}/plots/%FF.png",
        "/compare/kl?runs=%ED%A0%80,%FF",
        f"/runs/{main}/percentiles?layer=%00",
    ):
        response = stored.client.get(url)
        assert response.status_code == 200 or 400 <= response.status_code < 500, url
