"""Plots over HTTP: every kind decodes as PNG, options validated, downloads named, cached."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import pytest
from matplotlib import image as mpimg

from service.routers.plots import COMPARE_PLOTS, RUN_PLOTS
from tests.service.test_api_analysis import Stored, make_stored

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    yield from make_stored(tmp_path_factory.mktemp("plots"))


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the magic; decodes the image too."""
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])
    pixels = mpimg.imread(io.BytesIO(data), format="png")
    assert pixels.shape[:2] == (height, width)
    return width, height


RUN_CASES = [
    ("evolution", ""),
    ("evolution", "params=layer1:3,layer2:1.2&num_points=50&epochs=0,4"),
    ("evolution", "criterion=gradient&top_k=2&layer=layer1"),
    ("evolution", "dist=prior&param=bias"),
    ("epoch", ""),
    ("epoch", "epoch=2&max_curves=5&bins=10&alpha=0.3&seed=7&layer=layer2&param=bias"),
    ("epoch", "dist=prior"),
    ("bands", ""),
    ("bands", "layer=layer2&param=bias&dist=prior&epochs=0,2"),
    ("kl", ""),
    ("kl", "layers=layer2&epochs=2,4&dpi=50"),
    ("priors", "param=bias"),
    ("scales", ""),
    ("scales", "layers=layer2&param=bias&epochs=0,4&dpi=60"),
    ("gradients", ""),
    ("gradients", "grad_param=rho&stat=max_abs&layers=layer1"),
]


@pytest.mark.parametrize(("kind", "query"), RUN_CASES)
def test_run_plots_are_pngs(stored: Stored, kind: str, query: str) -> None:
    run_id = stored.ids["main"]
    response = stored.client.get(f"/runs/{run_id}/plots/{kind}.png?{query}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    disposition = response.headers["content-disposition"]
    assert disposition == f'inline; filename="{run_id}_{kind}.png"'
    width, height = png_size(response.content)
    assert 200 <= width <= 4000 and 150 <= height <= 4000
    assert 5_000 < len(response.content) < 3_000_000


def test_every_kind_is_tested() -> None:
    assert {kind for kind, _ in RUN_CASES} == set(RUN_PLOTS)
    assert set(COMPARE_PLOTS) == {"width", "priors", "scales"}


@pytest.mark.parametrize("query", ["", "epochs=0,4&layers=layer1&param=bias"])
def test_compare_prior_trajectories(stored: Stored, query: str) -> None:
    pair = f"{stored.ids['main']},{stored.ids['fixed']}"
    response = stored.client.get(f"/compare/plots/priors.png?runs={pair}&{query}")
    assert response.status_code == 200, response.text
    png_size(response.content)
    assert response.headers["content-disposition"] == 'inline; filename="compare_priors.png"'


@pytest.mark.parametrize("query", ["", "epochs=2,4&layers=layer2&param=bias"])
def test_compare_scale_diagnostics(stored: Stored, query: str) -> None:
    pair = f"{stored.ids['main']},{stored.ids['fixed']}"
    response = stored.client.get(f"/compare/plots/scales.png?runs={pair}&{query}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    png_size(response.content)
    assert response.headers["content-disposition"] == 'inline; filename="compare_scales.png"'


def test_scale_plot_is_cached_with_an_etag(stored: Stored) -> None:
    url = f"/runs/{stored.ids['main']}/plots/scales.png?layers=layer1&dpi=40"
    first = stored.client.get(url)
    cache = stored.client.app.state.analysis_cache  # type: ignore[attr-defined]
    misses = cache.misses
    again = stored.client.get(url)
    assert again.content == first.content and cache.misses == misses
    etag = {"If-None-Match": first.headers["etag"]}
    assert stored.client.get(url, headers=etag).status_code == 304


def test_compare_width_plot_downloads_as_an_attachment(stored: Stored) -> None:
    three = ",".join(stored.ids[k] for k in ("main", "wide", "fixed"))
    response = stored.client.get(f"/compare/plots/width.png?runs={three}&download=1")
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == 'attachment; filename="compare_width.png"'
    png_size(response.content)


def test_dpi_changes_the_size_and_results_are_cached(stored: Stored) -> None:
    url = f"/runs/{stored.ids['fixed']}/plots/priors.png"
    small = stored.client.get(url + "?dpi=50")
    large = stored.client.get(url + "?dpi=100")
    assert png_size(large.content)[0] == 2 * png_size(small.content)[0]
    cache = stored.client.app.state.analysis_cache  # type: ignore[attr-defined]
    misses = cache.misses
    again = stored.client.get(url + "?dpi=100&download=true")
    assert again.content == large.content and cache.misses == misses
    assert again.headers["content-disposition"].startswith("attachment")
    assert again.headers["etag"] == large.headers["etag"]
    etag = {"If-None-Match": large.headers["etag"]}
    assert stored.client.get(url + "?dpi=100", headers=etag).status_code == 304


@pytest.mark.parametrize(
    ("url", "status", "needle"),
    [
        ("/runs/{main}/plots/violin.png", 404, "kinds are ['bands', 'epoch', 'evolution'"),
        (
            "/compare/plots/kl.png?runs={main},{fixed}",
            404,
            "kinds are ['priors', 'scales', 'width']",
        ),
        ("/runs/{main}/plots/kl.png?colour=red", 422, "colour: unknown option for plot 'kl'"),
        ("/runs/{main}/plots/kl.png?format=csv", 422, "format: unknown option"),
        ("/runs/{main}/plots/epoch.png?alpha=2", 422, "alpha"),
        ("/runs/{main}/plots/epoch.png?bins=0", 422, "bins"),
        ("/runs/{main}/plots/epoch.png?seed=-1", 422, "seed"),
        ("/runs/{main}/plots/epoch.png?epoch=1", 404, "captured epochs: [0, 2, 4]"),
        ("/runs/{main}/plots/epoch.png?epoch=1&epoch=2", 422, "given more than once"),
        ("/runs/{main}/plots/evolution.png?top_k=17", 422, "top_k"),
        ("/runs/{main}/plots/evolution.png?criterion=luck", 422, "criterion"),
        ("/runs/{main}/plots/evolution.png?params=layer1", 422, "params"),
        ("/runs/{main}/plots/evolution.png?params=layer1:999", 422, "index 999 is not in"),
        ("/runs/{main}/plots/evolution.png?params=nope:1", 404, "unknown layer 'nope'"),
        ("/runs/{main}/plots/bands.png?layer=nope", 404, "unknown layer 'nope'"),
        ("/runs/{main}/plots/kl.png?epochs=0,1", 404, "has no epoch 1"),
        ("/runs/{main}/plots/kl.png?epochs=0;2", 422, "epochs"),
        ("/runs/{main}/plots/kl.png?epochs=99999999999", 404, "no run has epoch"),
        ("/runs/{main}/plots/kl.png?epochs=2147483648", 404, "has no epoch 2147483648"),
        ("/runs/{main}/plots/evolution.png?params=", 422, "params"),
        ("/runs/{main}/plots/evolution.png?params=layer1:1,,layer1:2", 422, "params"),
        ("/runs/{main}/plots/kl.png?layers=" + "x" * 10_001, 422, "longer than 10000"),
        ("/runs/{main}/plots/kl.png?dpi=5000", 422, "dpi"),
        ("/runs/{main}/plots/gradients.png?stat=median", 422, "stat"),
        ("/runs/{main}/plots/priors.png?param=kernel", 422, "param"),
        ("/runs/{main}/plots/kl.png?download=maybe", 422, "download"),
        ("/runs/nope/plots/kl.png", 404, "unknown run 'nope'"),
        ("/runs/{empty}/plots/kl.png", 404, "no captured epochs"),
        ("/compare/plots/width.png?runs={main}", 422, "2 to 16 runs"),
        ("/compare/plots/width.png?runs={main},{fixed}&epoch=3", 404, "has no epoch 3"),
        ("/compare/plots/priors.png?runs={main},{fixed}&layers=nope", 404, "unknown layer"),
        ("/runs/{main}/plots/scales.png?layers=nope", 404, "unknown layer 'nope'"),
        ("/runs/{main}/plots/scales.png?dist=prior", 422, "dist: unknown option"),
        ("/compare/plots/scales.png?runs={main},{fixed}&layers=nope", 404, "unknown layer"),
    ],
)
def test_plot_errors(stored: Stored, url: str, status: int, needle: str) -> None:
    response = stored.client.get(url.format(**stored.ids))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] + str(error["details"])


# ----------------------------------------------------------------------------- OpenAPI
def _operations(stored: Stored) -> dict[str, dict]:
    paths = stored.client.get("/openapi.json").json()["paths"]
    return {path: item["get"] for path, item in paths.items() if "/plots/" in path}


def test_each_kind_is_an_operation_with_its_options_as_query_parameters(stored: Stored) -> None:
    operations = _operations(stored)
    expected = {
        f"/runs/{{run_id}}/plots/{kind}.png": spec.options for kind, spec in RUN_PLOTS.items()
    }
    expected |= {f"/compare/plots/{kind}.png": options for kind, options in COMPARE_PLOTS.items()}
    assert set(expected) <= set(operations)
    assert not any("{kind}" in path for path in operations)  # no free-text kind any more
    for path, options in expected.items():
        params = {p["name"]: p for p in operations[path]["parameters"]}
        where = "runs" if path.startswith("/compare") else "run_id"
        assert set(params) == {*options.model_fields, "download", where}, path
        for name in options.model_fields:
            assert params[name]["in"] == "query" and not params[name]["required"], (path, name)
            assert params[name].get("description"), (path, name)
            assert "$ref" not in str(params[name]["schema"]), (path, name)
        responses = operations[path]["responses"]
        assert "image/png" in responses["200"]["content"]
        assert {"404", "422", "503"} <= set(responses) and "409" not in responses
    evolution = {
        p["name"]: p["schema"]
        for p in operations["/runs/{run_id}/plots/evolution.png"]["parameters"]
    }
    assert evolution["criterion"]["enum"] == ["mu_change", "sigma", "gradient"]
    assert evolution["dist"]["enum"] == ["posterior", "prior"]
    assert evolution["top_k"] == {"default": 4, "minimum": 1, "maximum": 16, "type": "integer"}
    assert evolution["epochs"]["type"] == "string" and evolution["params"]["type"] == "string"
    epoch = {
        p["name"]: p["schema"] for p in operations["/runs/{run_id}/plots/epoch.png"]["parameters"]
    }
    assert epoch["epoch"] == {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
    assert epoch["alpha"]["exclusiveMinimum"] == 0 and epoch["alpha"]["maximum"] == 1


def test_what_the_schema_admits_the_server_takes(stored: Stored) -> None:
    """Every enum value of every option, and list options in the schema's text form, are
    answered with a plot (or a 404 for a layer or epoch the run does not have)."""
    run = stored.ids["main"]  # with element-level gradient statistics
    for path, operation in _operations(stored).items():
        if path.startswith("/compare") or "{name}" in path:
            continue
        url = path.replace("{run_id}", run)
        for param in operation["parameters"]:
            for value in param["schema"].get("enum", ()):
                response = stored.client.get(url, params={param["name"]: value})
                assert response.status_code in (200, 404), (url, param["name"], value)
    main = stored.ids["main"]
    for kind, query in [
        ("kl", {"epochs": " 0 , 4,,", "layers": " layer2 ,"}),
        ("kl", {"epochs": "", "layers": ""}),  # blank: all
        ("bands", {"epochs": "0 2"}),
        ("evolution", {"params": "layer1:3,layer2:1.2"}),
        ("evolution", {"params": "nope:1"}),
        ("epoch", {"epoch": "2147483647"}),
    ]:
        response = stored.client.get(f"/runs/{main}/plots/{kind}.png", params=query)
        assert response.status_code in (200, 404), (kind, query, response.text[:300])
    response = stored.client.get(f"/runs/{main}/plots/kl.png", params={"epochs": "", "layers": ""})
    assert response.status_code == 200


def test_an_unknown_kind_is_a_404_listing_the_kinds_of_the_schema(stored: Stored) -> None:
    main = stored.ids["main"]
    error = stored.client.get(f"/runs/{main}/plots/violin.png").json()["error"]
    assert error["details"]["kinds"] == sorted(RUN_PLOTS)
    error = stored.client.get("/compare/plots/kl.png?runs=a,b").json()["error"]
    assert error["details"]["kinds"] == sorted(COMPARE_PLOTS)
