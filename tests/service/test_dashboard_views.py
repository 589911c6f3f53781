"""The dashboard's views through the test client (SQLite): the run page's plot explorer
(built from the plots API's declaration), its downloads, diverged runs, the compare page's
tables, the sweeps pages, and the inline charts' ticks.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Literal

import pytest
from pydantic import Field

from service import analysis as an
from service.analysis.synthetic import synthetic_snapshot
from service.dashboard.render import fmt, line_chart, nice_step, nice_ticks, tick_label
from service.demo.sweeps import SweepSpec, register_sweep
from service.routers import plots as plots_api
from tests.service.conftest import TINY, TestClient
from tests.service.test_dashboard import add_run, html_of, parse, store_of
from trainer.store import RunReader, RunStatus, RunStore


@pytest.fixture
def catalog_url() -> str | None:
    """SQLite only: these pages run no catalog query of their own (see test_dashboard.py)."""
    return None


def png(client: TestClient, url: str) -> bytes:
    response = client.get(url)
    assert response.status_code == 200, (url, response.text[:500])
    assert response.headers["content-type"] == "image/png"
    return response.content


def section(html: str, start: str, end: str = "</table>") -> str:
    part = html[html.index(start) :]
    return part[: part.index(end)]


# ----------------------------------------------------------------------------- plots
def test_every_plot_kind_and_option_is_a_control_built_from_the_api(client: TestClient) -> None:
    run = add_run(store_of(client), "plots", epochs=3, grads=True)
    html = html_of(client, f"/ui/runs/{run}")
    kinds = re.findall(
        r'<option value="(\w+)"[^>]*>\w+: ', section(html, 'id="plot-kind"', "</select>")
    )
    assert kinds == list(plots_api.RUN_PLOTS)
    for kind, spec in plots_api.RUN_PLOTS.items():
        fieldset = section(html, f'id="plot-options-{kind}"', "</fieldset>")
        for option in spec.options.model_fields:
            assert f'name="{kind}.{option}" id="plot-{kind}-{option}"' in fieldset, (kind, option)
    # enums and literals are menus of their values, numbers carry the model's bounds
    dist = section(html, 'id="plot-evolution-dist"', "</select>")
    assert re.findall(r'value="(\w+)"', dist) == [d.value for d in an.DistType]
    criteria = section(html, 'id="plot-evolution-criterion"', "</select>")
    assert re.findall(r'value="(\w+)"', criteria) == ["mu_change", "sigma", "gradient"]
    assert re.search(
        r'id="plot-epoch-bins" value="100" data-default="100" step="1" min="1" max="1000"', html
    )
    assert re.search(
        r'id="plot-epoch-alpha" value="0.6" data-default="0.6" step="any" min="0" max="1"', html
    )
    epochs = section(html, 'id="plot-epoch-epoch"', "</select>")
    assert re.findall(r'<option value="(\d*)"', epochs) == ["", "0", "1", "2"]
    layers = section(html, 'id="plot-bands-layer"', "</select>")
    assert re.findall(r'<option value="(\w*)"', layers) == ["", "layer1", "layer2"]
    # only the first kind's options are active until another is chosen
    assert (
        'data-plot-kind="evolution">' in html and 'data-plot-kind="bands" hidden disabled' in html
    )
    assert 'id="plot-image"' not in html  # nothing drawn before a plot is asked for

    no_grads = add_run(store_of(client), "no-grads", epochs=1)
    html = html_of(client, f"/ui/runs/{no_grads}")
    assert 'id="plot-options-gradients"' not in html and 'id="plot-options-bands"' in html


def test_a_new_plot_kind_in_the_api_appears_with_its_options(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    class ShadeOptions(plots_api.PlotOptions):
        """A kind the dashboard has never heard of."""

        shade: Literal["light", "dark"] = "light"
        size: int = Field(3, ge=1, le=9, description="how big")
        framed: bool = False

    spec = plots_api.RunPlot(ShadeOptions, lambda r, o, eps: an.plot_kl_over_epochs(r, eps))
    monkeypatch.setitem(plots_api.RUN_PLOTS, "shade", spec)
    run = add_run(store_of(client), "new kind", epochs=2)
    html = html_of(client, f"/ui/runs/{run}")
    assert "shade: A kind the dashboard has never heard of." in html
    assert re.findall(r'value="(\w+)"', section(html, 'id="plot-shade-shade"', "</select>")) == [
        "light",
        "dark",
    ]
    assert 'id="plot-shade-size" value="3" data-default="3" step="1" min="1" max="9"' in html
    assert 'type="checkbox" name="shade.framed" id="plot-shade-framed" value="true">' in html
    html = html_of(
        client, f"/ui/runs/{run}", plot="shade", **{"shade.size": 5, "shade.framed": "true"}
    )
    src = parse(html).srcs[-1]
    assert src == f"/runs/{run}/plots/shade.png?size=5&framed=true"
    assert 'id="plot-shade-framed" value="true" checked>' in html
    # (the API adds a route per kind when it is imported: this one has no PNG to fetch)


def test_each_plot_kind_is_drawn_with_its_options(client: TestClient) -> None:
    run = add_run(store_of(client), "drawn", epochs=3, grads=True)
    for kind in plots_api.RUN_PLOTS:  # the defaults: no option in the PNG's URL
        html = html_of(client, f"/ui/runs/{run}", plot=kind)
        assert f'<img id="plot-image" alt="{kind} plot" src="/runs/{run}/plots/{kind}.png">' in html
        png(client, f"/runs/{run}/plots/{kind}.png")
    asked = {"epoch.epoch": "1", "epoch.bins": "20", "epoch.layer": "layer2", "epoch.dpi": "100"}
    html = html_of(client, f"/ui/runs/{run}", plot="epoch", **asked, **{"bands.layer": "x"})
    src = f"/runs/{run}/plots/epoch.png?epoch=1&layer=layer2&bins=20"  # dpi 100 is the default
    assert src in parse(html).srcs and f"{src}&download=1" in parse(html).hrefs
    assert png(client, src) != png(client, f"/runs/{run}/plots/epoch.png")
    assert '<option value="1" selected>1</option>' in section(
        html, 'id="plot-epoch-epoch"', "</select>"
    )
    assert 'id="plot-epoch-bins" value="20" data-default="100"' in html  # what was asked
    assert 'data-plot-kind="epoch">' in html and 'id="plot-error"' not in html
    html = html_of(client, f"/ui/runs/{run}", plot="bands", **{"bands.epochs": "0, 2"})
    assert f"/runs/{run}/plots/bands.png?epochs=0%2C2" in parse(html).srcs
    png(client, f"/runs/{run}/plots/bands.png?epochs=0%2C2")
    # the table's choice survives drawing a plot
    html = html_of(client, f"/ui/runs/{run}", plot="kl", table="kl", epoch=1)
    assert "Tables at epoch 1" in html and '<input type="hidden" name="table" value="kl">' in html


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"plot": "epoch", "epoch.bins": "0"}, "bins: Input should be greater than or equal to 1"),
        ({"plot": "epoch", "epoch.bins": "many"}, "bins: Input should be a valid integer"),
        ({"plot": "epoch", "epoch.nope": "1"}, "nope: unknown option for plot 'epoch'"),
        ({"plot": "epoch", "epoch.epoch": "9"}, "epoch: no epoch 9 in this run"),
        ({"plot": "bands", "bands.epochs": "0,7"}, "bands: no epoch 7 in this run"),
        ({"plot": "evolution", "evolution.params": "nolayer"}, "params: 'nolayer' is not"),
        ({"plot": "bogus"}, "plot: unknown plot kind 'bogus'"),
        ({"plot": "gradients"}, "plot: unknown plot kind 'gradients'"),  # no gradients captured
        ({"plot": "kl", "kl.dist": "prior"}, "dist: unknown option for plot 'kl'"),
    ],
)
def test_bad_plot_options_are_a_422_naming_them(
    client: TestClient, params: dict[str, str], named: str
) -> None:
    run = add_run(store_of(client), "bad", epochs=2)
    html = html_of(client, f"/ui/runs/{run}", 422, **params)
    error = section(html, 'id="plot-error"', "</p>")
    assert named in error.replace("&#39;", "'"), error
    assert 'id="plot-image"' not in html and 'id="plot-form"' in html  # the form to fix it


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"zzz.a": "1"}, "zzz.a: unknown query parameter"),
        ({"plot": "k" * 65}, "plot: String should have at most 64 characters"),
        ({"plot": ["kl", "bands"]}, "plot: given more than once"),
    ],
)
def test_bad_plot_query_is_a_422_page(
    client: TestClient, params: dict[str, Any], named: str
) -> None:
    run = add_run(store_of(client), "bad", epochs=1)
    html = html_of(client, f"/ui/runs/{run}", 422, **params)
    assert named in html.replace("&#39;", "'") and 'id="error-message"' in html


def test_run_page_links_every_table_as_csv_and_every_epoch_file(client: TestClient) -> None:
    run = add_run(store_of(client), "downloads", epochs=2, grads=True)
    html = html_of(client, f"/ui/runs/{run}", epoch=1)
    hrefs = parse(html).hrefs
    csv = [h for h in hrefs if "format=csv" in h]
    for path in ("stats", "kl", "kl/prior", "gradients", "gradients/outliers"):
        assert f"/runs/{run}/{path}?epoch=1&format=csv" in csv
    for wanted in (
        f"/runs/{run}/kl/trajectory?of=pairwise&format=csv",
        f"/runs/{run}/kl/trajectory?of=prior&format=csv",
        f"/runs/{run}/priors?format=csv",
        f"/runs/{run}/percentiles?layer=layer2&stat=sigma&format=csv",
        f"/runs/{run}/gradients/outliers?epoch=1&kind=vanishing&format=csv",
    ):
        assert wanted in csv, wanted
    for url in csv:
        response = client.get(url)
        assert response.status_code == 200, (url, response.text[:300])
        assert response.headers["content-type"].startswith("text/csv")
        assert len(response.text.splitlines()) >= 2, url  # a header and rows
    for e in (0, 1):
        link = f'href="/runs/{run}/epochs/{e}/file" data-testid="epoch-file-{e}"'
        assert link in html
        assert client.get(f"/runs/{run}/epochs/{e}/file").content[:4] == b"\x89HDF"


def test_runs_page_links_its_runs_as_csv_with_its_filters(client: TestClient) -> None:
    store = store_of(client)
    add_run(store, "alpha", epochs=2, tags=("x",))  # latest test_rmse 0.25
    add_run(store, "alpine", epochs=1, tags=("x",))  # 0.5
    add_run(store, "beta", epochs=2, tags=("x",), prior="fixed")
    add_run(store, "alps", epochs=2)
    for params, names in (
        ({}, {"alpha", "alpine", "beta", "alps"}),
        ({"q": "alp", "tag": "x", "metric": "test_rmse < 0.3", "status": "completed"}, {"alpha"}),
        ({"prior": "fixed"}, {"beta"}),
    ):
        html = html_of(client, "/", **params)
        (url,) = [h for h in parse(html).hrefs if h.startswith("/runs?format=csv")]
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/csv"
        )
        lines = response.text.splitlines()
        column = lines[0].split(",").index("name")
        assert {line.split(",")[column] for line in lines[1:]} == names, (params, url)


# ----------------------------------------------------------------------------- diverged
def test_diverged_runs_are_marked_where_and_when(client: TestClient) -> None:
    store = store_of(client)
    fine = add_run(store, "fine", epochs=2)
    bad = add_run(store, "blew up", epochs=2, status=None)
    store.set_divergence(bad, 17, 1, "layer2.weight")
    store.set_status(bad, RunStatus.DIVERGED)
    went_on = add_run(store, "went on", epochs=3, status=None)
    store.set_divergence(went_on, 40, 2)
    store.set_status(went_on, RunStatus.COMPLETED)

    runs = html_of(client, "/")
    assert "<option>diverged</option>" in runs  # the status filter offers it
    row = section(runs, f'data-run-id="{bad}"', "</tr>")
    assert 'class="status status-diverged"' in row
    assert 'data-testid="diverged-badge" title="non-finite at step 17, epoch 1, parameter ' in row
    assert ">non-finite at epoch 1</span>" in row
    assert "diverged-badge" in section(runs, f'data-run-id="{went_on}"', "</tr>")
    assert "diverged-badge" not in section(runs, f'data-run-id="{fine}"', "</tr>")
    filtered = html_of(client, "/", status="diverged")
    assert parse(filtered).rows == [bad]

    page = html_of(client, f"/ui/runs/{bad}")
    assert (
        'id="divergence" data-step="17" data-epoch="1" data-layer="layer2.weight">Diverged '
        "non-finite at step 17, epoch 1, parameter layer2.weight</p>"
    ) in page
    assert '<tr class="diverged-epoch"><td class="num">1</td>' in page
    assert page.count('<line class="mark"') == 2  # on the loss and test_rmse curves
    assert "(training went on)" in html_of(client, f"/ui/runs/{went_on}")
    assert "non-finite at step 40, epoch 2 (the loss)" in html_of(client, f"/ui/runs/{went_on}")
    assert 'id="divergence"' not in html_of(client, f"/ui/runs/{fine}")


# ----------------------------------------------------------------------------- compare
def test_compare_page_tables_have_one_column_per_run(client: TestClient) -> None:
    store = store_of(client)
    a = add_run(store, "a", epochs=2, grads=True, seed=1)
    b = add_run(store, "b", epochs=3, grads=True, seed=2)
    html = html_of(client, "/ui/compare", runs=f"{a},{b}")
    layers = section(html, 'id="compare-layers"')
    assert "<th>layer</th><th>quantity</th><th>a</th><th>b</th>" in layers
    with RunReader(a, store=store) as ra, RunReader(b, store=store) as rb:
        study = an.width_study({"a": ra, "b": rb}, None, min_widths=1)
        compared = an.compare_gradient_outliers({"a": ra, "b": rb}, 1, 10)
    sigma = [fmt(float(study.at[(r, "layer2"), "Weight prior sigma"])) for r in ("a", "b")]
    assert (
        f'<th>layer2</th><th>Weight prior sigma</th><td class="num">{sigma[0]}</td>'
        f'<td class="num">{sigma[1]}</td>'
    ) in layers
    # the gradient outliers of the two runs, at the latest epoch both captured
    assert "Gradient outliers compared at epoch 1" in html
    counts = section(html, 'id="compare-gradient-counts"')
    for column in compared.counts.columns:
        assert f"<th>{column}</th>" in counts
    outliers = section(html, 'id="compare-outliers"')
    assert outliers.count("<tr>") == 1 + len(compared.table)
    assert "|g| (a)" in outliers and "|g| (b)" in outliers
    for url in parse(html).hrefs:
        if url.startswith("/compare/"):
            assert client.get(url).status_code == 200, url
    # one chart per metric, both runs on its axes: one y scale per quantity
    charts = section(html, 'id="compare-charts"', "</section>")
    assert charts.count("<svg") == 2 and charts.count("<polyline") == 4
    assert 'id="width-study"' not in html and "width.png" not in html  # one width


def test_compare_page_shows_the_width_study_of_two_widths(client: TestClient) -> None:
    store = store_of(client)
    narrow = add_run(store, "narrow", epochs=2, widths=(4,), grads=True)
    wide = add_run(store, "wide", epochs=2, widths=(12,), seed=3, grads=True)
    html = html_of(client, "/ui/compare", runs=f"{narrow},{wide}")
    table = section(html, 'id="width-table"')
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td class=\"num\">(\d+)</td>", table)
    assert rows == [("narrow", "layer1", "4"), ("narrow", "layer2", "4"),
                    ("wide", "layer1", "12"), ("wide", "layer2", "12")]  # fmt: skip
    assert f"/compare/plots/width.png?runs={narrow},{wide}" in parse(html).srcs
    none = section(html, 'id="compare-outliers-none"', "</p>")
    assert "not compared: " in none and "do not have the same architecture" in none
    assert f"/compare/priors?runs={narrow},{wide}&format=csv" in parse(html).hrefs
    plain = [add_run(store, f"plain{i}", epochs=1, seed=i) for i in range(2)]
    html = html_of(client, "/ui/compare", runs=",".join(plain))
    assert "not compared: no gradient statistics" in section(
        html, 'id="compare-outliers-none"', "</p>"
    )


# ----------------------------------------------------------------------------- sweeps
def width_sweep(store: RunStore, finish: bool = True) -> tuple[str, list[str]]:
    """A width sweep of widths 4 and 8 whose runs hold synthetic epochs; with ``finish``
    both completed, else the second still running."""
    spec = SweepSpec.model_validate(
        {"kind": "width", "name": "widths", "base": TINY, "grid": {"widths": [4, 8]}}
    )
    sweep, runs = register_sweep(store, spec)
    for i, (_, run_id, config) in enumerate(runs):
        store.set_status(run_id, RunStatus.RUNNING)
        for e in range(2):
            snap = synthetic_snapshot(e, (4, *config["widths"], 2), seed=i)
            snap.metrics["test_rmse"] = 0.3 + i / 10
            store.write_epoch(run_id, snap)
        if finish or i == 0:
            store.set_status(run_id, RunStatus.COMPLETED)
    return sweep.id, [r[1] for r in runs]


def test_sweeps_pages_list_runs_study_table_and_plots(client: TestClient) -> None:
    store = store_of(client)
    sweep, runs = width_sweep(store, finish=False)
    listing = html_of(client, "/ui/sweeps")
    assert f'href="/ui/sweeps/{sweep}">widths</a>' in listing
    assert 'id="nav-sweeps" href="/ui/sweeps"' in listing
    assert "1 completed" in listing and "1 running" in listing
    assert f'data-sweep-id="{sweep}"' not in html_of(client, "/ui/sweeps", kind="optim")

    html = html_of(client, f"/ui/sweeps/{sweep}")
    table = section(html, 'id="sweep-runs"')
    for run_id, label in zip(runs, ("w4", "w8"), strict=True):
        assert f'<td>{label}</td>\n        <td><a href="/ui/runs/{run_id}">' in table
    assert 'id="study-pending"' in html and 'id="study-table"' not in html
    assert f'href="/ui/compare?runs={",".join(runs)}"' in html

    store.set_status(runs[1], RunStatus.COMPLETED)
    html = html_of(client, f"/ui/sweeps/{sweep}")
    study = client.get(f"/sweeps/{sweep}").json()["study"]  # what the API computed
    table = section(html, 'id="study-table"')
    assert "".join(f"<th>{c}</th>" for c in study["columns"]) in table
    assert table.count("<tr>") == 1 + len(study["rows"]) == 1 + 2 * 2  # runs x layers
    first = study["rows"][0]
    assert f"<td>{first['run']}</td><td>{first['layer']}</td>" in table
    srcs = [s for s in parse(html).srcs if "/plots/" in s]
    assert srcs and all(s.startswith(f"/sweeps/{sweep}/plots/") for s in srcs)
    for src in srcs:
        png(client, src)
    assert client.get(f"/sweeps/{sweep}?format=csv").status_code == 200
    assert f'href="/sweeps/{sweep}?format=csv"' in html


@pytest.mark.parametrize(
    ("url", "status", "named"),
    [
        ("/ui/sweeps/nosuchsweep", 404, "unknown sweep 'nosuchsweep'"),
        ("/ui/sweeps/bad%20id", 404, "bad id"),
        ("/ui/sweeps?kind=study", 422, "kind: Input should be"),
        ("/ui/sweeps?colour=red", 422, "colour: unknown query parameter"),
        ("/ui/sweeps/SWEEP?x=1", 422, "x: unknown query parameter"),
    ],
)
def test_bad_sweep_urls_are_clear_4xx_pages(
    client: TestClient, url: str, status: int, named: str
) -> None:
    sweep, _ = width_sweep(store_of(client))
    html = html_of(client, url.replace("SWEEP", sweep), status)
    assert named in html.replace("&#39;", "'") and 'id="error-message"' in html


def test_a_study_is_not_a_sweep_page(client: TestClient) -> None:
    store = store_of(client)
    study = store.create_sweep("study", {}, "a study")
    html = html_of(client, f"/ui/sweeps/{study.id}", 404)
    assert "not a sweep" in html
    assert study.id not in html_of(client, "/ui/sweeps")


# ----------------------------------------------------------------------------- ticks
@pytest.mark.parametrize(
    ("lo", "hi", "integer", "ticks"),
    [
        (0, 102, True, [0, 20, 40, 60, 80, 100]),
        (0, 16, True, [0, 5, 10, 15]),
        (0, 3, True, [0, 1, 2, 3]),
        (4, 4, True, [4]),
        (0, 0.3, False, [0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]),
        (0.08, 0.52, False, [0.1, 0.2, 0.3, 0.4, 0.5]),
        (-3.2, 7.9, False, [-2, 0, 2, 4, 6]),
        (1.0001, 1.0009, False, [1.0002, 1.0004, 1.0006, 1.0008]),
    ],
)
def test_nice_ticks(lo: float, hi: float, integer: bool, ticks: list[float]) -> None:
    assert nice_ticks(lo, hi, integer=integer) == pytest.approx(ticks)


@pytest.mark.parametrize(
    ("value", "step", "text"),
    [(0.15000000000000002, 0.05, "0.15"), (0.0, 2e-7, "0"), (4e-7, 2e-7, "4e-07"),
     (1000.0, 200.0, "1000"), (1.2e6, 2e5, "1.2e+06"), (-0.1, 0.1, "-0.1"), (3.0, 1.0, "3")],
)  # fmt: skip
def test_tick_labels(value: float, step: float, text: str) -> None:
    assert tick_label(value, step) == text


def _is_nice(step: float) -> bool:
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m) for m in (1, 2, 5, 10))


@pytest.mark.parametrize("last", [5, 17, 33, 102, 999])
def test_chart_ticks_are_at_nice_steps(last: int) -> None:
    values = [(e, 0.37 + 0.013 * e * math.sin(e)) for e in range(last + 1)]
    svg = str(line_chart("loss", {"run": values}))
    xs = [int(t) for t in re.findall(r'class="tick x-tick"[^>]*>(-?\d+)<', svg)]
    ys = [float(t) for t in re.findall(r'class="tick y-tick"[^>]*>([^<]+)<', svg)]
    assert 3 <= len(xs) <= 8 and 3 <= len(ys) <= 8, (xs, ys)
    for ticks in (xs, ys):
        steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
        assert len(steps) == 1 and _is_nice(steps.pop()), ticks
    assert xs[0] % (xs[1] - xs[0]) == 0 and xs[0] >= 0 and xs[-1] <= last
    low, high = min(v for _, v in values), max(v for _, v in values)
    assert ys[0] <= low and ys[-1] >= high  # the y axis spans the values, tick to tick
    assert nice_step(high - low) == pytest.approx(ys[1] - ys[0])


def test_chart_marks_and_odd_values() -> None:
    svg = str(line_chart("x", {"r": [(0, 1.0), (1, float("nan")), (2, 1.0)]}, marks={"d": 1}))
    assert svg.count('<line class="mark"') == 1 and "<title>d</title>" in svg
    assert svg.count("<circle") == 2  # the NaN is left out
    assert "no finite values yet" in str(line_chart("x", {"r": [(0, float("inf"))]}))
    one = str(line_chart("x", {"r": [(3, 2.5)]}))
    assert re.findall(r'class="tick x-tick"[^>]*>(\d+)<', one) == ["3"]
