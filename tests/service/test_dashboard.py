"""The dashboard through the test client, on SQLite and PostgreSQL: the catalog query behind
the runs table, the runs, run and compare pages, their errors, and the run page's polling.

Runs are written straight into the app's store (real catalog rows and HDF5 epoch files of
the synthetic 4-6-2 MLP), with configs like the trainer's.
"""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser
from typing import Any

import pytest

from service import analysis as an
from service.analysis.synthetic import synthetic_snapshot
from service.dashboard.render import fmt
from tests.service.conftest import AUTH, TOKEN, ClientFactory, TestClient
from trainer.errors import BnnError
from trainer.store import RunPage, RunReader, RunStatus, RunStore

SIZES = (4, 6, 2)


def store_of(client: TestClient) -> RunStore:
    store: RunStore = client.app.state.store  # type: ignore[attr-defined]
    return store


def add_run(
    store: RunStore,
    name: str,
    *,
    epochs: int = 0,
    planned: int = 5,
    dataset: str = "regression",
    prior: str = "learnable",
    widths: tuple[int, ...] = (6,),
    tags: tuple[str, ...] = (),
    status: RunStatus | None = RunStatus.COMPLETED,
    seed: int = 0,
    grads: bool = False,
) -> str:
    """A run with ``epochs`` captured epochs (metrics loss and test_rmse; gradient statistics
    per element with ``grads``), then ``status`` (None: left running)."""
    config = {"dataset": dataset, "prior": prior, "prior_mode": "gradient",
              "widths": list(widths), "epochs": planned, "seed": seed}  # fmt: skip
    run = store.create_run(name, config, tags).id
    for e in range(epochs):
        snap = synthetic_snapshot(
            e, (SIZES[0], *widths, SIZES[-1]), seed=seed, grad_level="element" if grads else "none"
        )
        snap.metrics["test_rmse"] = 0.5 / (1 + e) + seed / 100
        store.write_epoch(run, snap)
    if status is not None:
        store.set_status(run, status)
    return run


class Links(HTMLParser):
    """The hrefs and img srcs of a page, and the run ids of its runs table, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.rows: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("a", "link") and a.get("href"):
            self.hrefs.append(str(a["href"]))
        if tag in ("img", "script") and a.get("src"):
            self.srcs.append(str(a["src"]))
        if tag == "tr" and a.get("data-run-id"):
            self.rows.append(str(a["data-run-id"]))


def parse(html: str) -> Links:
    links = Links()
    links.feed(html)
    return links


def html_of(client: TestClient, url: str, expect: int = 200, **params: Any) -> str:
    response = client.get(url, params=params or None)  # {} would drop the url's query
    assert response.status_code == expect, response.text[:2000]
    assert response.headers["content-type"].startswith("text/html")
    return response.text


def names_in_table(client: TestClient, html: str) -> list[str]:
    store = store_of(client)
    return [store.get_run(run_id).name for run_id in parse(html).rows]


# ----------------------------------------------------------------------------- catalog
def test_query_runs_filters_sorts_and_pages_in_the_catalog(client: TestClient) -> None:
    store = store_of(client)
    a = add_run(store, "Alpha_1", epochs=2, tags=("x", "y"), planned=3)
    b = add_run(store, "beta%", epochs=1, dataset="mnist", prior="fixed", tags=("y",))
    c = add_run(store, "gamma", tags=("x",), status=RunStatus.FAILED, planned=9)
    d = add_run(store, "alphabet", status=None)  # still running

    def ids(page: RunPage) -> list[str]:
        return [r.run.id for r in page.runs]

    assert ids(store.query_runs()) == [d, c, b, a]  # newest first
    assert store.query_runs().total == 4
    assert ids(store.query_runs(name="ALPHA")) == [d, a]  # case-insensitive substring
    assert ids(store.query_runs(name="%")) == [b]  # LIKE wildcards are literal
    assert ids(store.query_runs(name="a_")) == [a]
    assert ids(store.query_runs(tags=["x"])) == [c, a]
    assert ids(store.query_runs(tags=["x", "y"])) == [a]
    assert ids(store.query_runs(tags=["z"])) == []
    assert ids(store.query_runs(status="running")) == [d]
    assert ids(store.query_runs(dataset="mnist")) == [b]
    assert ids(store.query_runs(prior="learnable", tags=["y"])) == [a]
    assert ids(store.query_runs(sort="name", descending=False)) == [a, d, b, c]
    assert ids(store.query_runs(sort="epochs_done")) == [a, b, d, c]  # ties newest first
    assert ids(store.query_runs(sort="epochs", descending=False)) == [a, d, b, c]
    page = store.query_runs(sort="name", descending=False, limit=2, offset=2)
    assert (page.total, ids(page)) == (4, [b, c])

    listed = {r.run.id: r for r in store.query_runs().runs}
    assert (listed[a].epochs_done, listed[a].last_epoch) == (2, 1)
    assert listed[a].last_metrics == pytest.approx({"loss": 0.5, "test_rmse": 0.25})
    assert (listed[c].epochs_done, listed[c].last_epoch, listed[c].last_metrics) == (0, None, {})
    assert store.config_values("dataset") == ["mnist", "regression"]
    with pytest.raises(BnnError, match="cannot sort runs by 'bogus'"):
        store.query_runs(sort="bogus")
    with pytest.raises(BnnError, match="unknown run status"):
        store.query_runs(status="sleeping")


def test_query_runs_by_the_latest_metrics(client: TestClient) -> None:
    store = store_of(client)
    a = add_run(store, "a", epochs=2)  # latest test_rmse 0.25
    b = add_run(store, "b", epochs=1, seed=10)  # 0.6
    c = add_run(store, "c")  # no epoch
    d = store.create_run("d", {}).id
    for e, rmse in ((0, 0.01), (1, float("nan"))):  # the latest is NaN: no value
        snap = synthetic_snapshot(e, SIZES)
        snap.metrics["test_rmse"] = rmse
        store.write_epoch(d, snap)

    def ids(*conditions: tuple[str, str, float], **kw: Any) -> list[str]:
        return [r.run.id for r in store.query_runs(metrics=conditions, **kw).runs]

    assert ids(("test_rmse", "<", 0.3)) == [a]
    assert ids(("test_rmse", ">=", 0.25)) == [b, a]
    assert ids(("test_rmse", ">", 0.25), ("loss", "<=", 1.0)) == [b]
    assert ids(("test_nll", "<", 1e9)) == []  # no run has it
    assert ids(sort="metric:test_rmse", descending=False) == [a, b, d, c]  # missing last
    assert ids(sort="metric:test_rmse") == [b, a, d, c]
    assert store.query_runs(metrics=[("test_rmse", "<", 0.3)]).total == 1
    with pytest.raises(BnnError, match="bad metric condition"):
        store.query_runs(metrics=[("test_rmse", "!=", 1.0)])
    with pytest.raises(BnnError, match="bad metric condition"):
        store.query_runs(metrics=[("x'y", "<", 1.0)])
    with pytest.raises(BnnError, match="cannot sort runs by"):
        store.query_runs(sort="metric:x'y")


def test_get_runs_filters_by_name_in_the_catalog(client: TestClient) -> None:
    store = store_of(client)
    a = add_run(store, "Wide-learnable", tags=("w",))
    add_run(store, "narrow")
    b = add_run(store, "wide-fixed", prior="fixed")

    def listed(**params: Any) -> list[str]:
        response = client.get("/runs", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total"] == len(body["runs"])
        return [r["id"] for r in body["runs"]]

    assert listed(name="WIDE") == [b, a]
    assert listed(name="wide", prior="learnable") == [a]
    assert listed(name="wide", tag="w") == [a]
    assert listed(name="x\x00") == [] and listed(tag="w\x00") == []
    assert client.get("/runs", params={"name": "n" * 257}).status_code == 422


# ----------------------------------------------------------------------------- runs page
def test_runs_page_shows_each_run_with_its_columns_and_assets(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "learnable-10", epochs=2, widths=(10, 10), tags=("paper",))
    html = html_of(client, "/")
    assert "learnable-10" in html and f'href="/ui/runs/{run}"' in html
    row = html[html.index(f'data-run-id="{run}"') :]
    row = row[: row.index("</tr>")]
    epochs = '<span data-field="epochs_done">2</span> / 5'
    for cell in ("completed", "regression", "learnable", "gradient", "10-10", epochs, "paper"):
        assert cell in row, cell
    assert fmt(0.25) in row  # the last test_rmse
    assert ">test_rmse<" in html
    links = parse(html)
    assert "/ui/static/dashboard.css" in links.hrefs and "/ui/static/dashboard.js" in links.srcs
    for asset, kind in (("dashboard.css", "text/css"), ("dashboard.js", "javascript")):
        response = client.get(f"/ui/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    assert client.get("/ui/static/../pages.py").status_code == 404
    assert client.get("/ui/static/nope.css").status_code == 404


def test_runs_page_search_filter_and_sort(client: TestClient) -> None:
    store = store_of(client)
    add_run(store, "alpha", epochs=2, tags=("x",))
    add_run(store, "beta", epochs=1, dataset="mnist", prior="fixed", tags=("x", "y"))
    add_run(store, "gamma", status=RunStatus.FAILED)
    add_run(store, "alpine", status=None)

    def names(**params: Any) -> list[str]:
        return names_in_table(client, html_of(client, "/", **params))

    assert names() == ["alpine", "gamma", "beta", "alpha"]
    assert names(q="alp") == ["alpine", "alpha"]
    assert names(tag="x") == ["beta", "alpha"]
    assert names(tag="x, y") == ["beta"]
    assert names(status="failed") == ["gamma"]
    assert names(dataset="mnist") == ["beta"]
    assert names(prior="learnable", q="a", status="") == ["alpine", "gamma", "alpha"]
    assert names(sort="name", order="asc") == ["alpha", "alpine", "beta", "gamma"]
    assert names(sort="name", order="desc") == ["gamma", "beta", "alpine", "alpha"]
    assert names(sort="epochs_done", order="desc")[:2] == ["alpha", "beta"]
    assert names(metric="test_rmse < 0.3") == ["alpha"]  # latest: alpha 0.25, beta 0.5
    assert names(metric="test_rmse>=0.3, loss<2") == ["beta"]
    assert names(sort="metric:test_rmse", order="desc") == ["beta", "alpha", "alpine", "gamma"]
    html = html_of(client, "/", metric="test_rmse<1", sort="metric:test_rmse", order="asc")
    assert "/?metric=test_rmse%3C1&sort=metric%3Atest_rmse&order=desc" in parse(html).hrefs
    assert "no runs match" in html_of(client, "/", q="zzz")
    # the column header links sort, keeping the filters
    html = html_of(client, "/", q="al", sort="name", order="asc")
    hrefs = parse(html).hrefs
    assert "/?q=al&sort=name&order=desc" in hrefs  # the sorted column: the other way
    assert "/?q=al&sort=status&order=asc" in hrefs
    assert "/?q=al&sort=created_at&order=desc" in hrefs
    # the filter choices come from the catalog
    assert "<option selected>mnist</option>" in html_of(client, "/", dataset="mnist")


def test_runs_page_paginates_50_runs_a_page(client: TestClient) -> None:
    store = store_of(client)
    for i in range(53):
        store.create_run(f"run-{i:02d}", {"dataset": "regression", "epochs": 1})
    first = html_of(client, "/", sort="name", order="asc")
    assert len(parse(first).rows) == 50 and "page 1 of 2" in first
    assert names_in_table(client, first)[:2] == ["run-00", "run-01"]
    assert "/?sort=name&order=asc&page=2" in parse(first).hrefs
    second = html_of(client, "/", sort="name", order="asc", page=2)
    assert names_in_table(client, second) == ["run-50", "run-51", "run-52"]
    assert "/?sort=name&order=asc&page=1" in parse(second).hrefs
    assert parse(html_of(client, "/", page=3)).rows == []


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("/?page=0", "page: Input should be greater than or equal to 1"),
        ("/?page=two", "page: Input should be a valid integer"),
        ("/?sort=bogus", "sort: cannot sort by 'bogus'"),
        ("/?sort=metric:", "sort: cannot sort by 'metric:'"),
        ("/?metric=test_nll~1", "metric: 'test_nll~1' is not a condition"),
        ("/?metric=test_nll<nan", "metric: 'test_nll<nan' is not a condition"),
        ("/?metric=a b<1", "metric: 'a b<1' is not a condition"),
        ("/?status=sleeping", "status: Input should be"),
        ("/?order=up", "order: Input should be"),
        ("/?colour=red", "colour: unknown query parameter"),
        ("/?q=a&q=b", "q: given more than once"),
        ("/?q=a%00b", "q: String should match pattern"),
        ("/?tag=" + "t" * 101, "tag.0: String should have at most 100 characters"),
        ("/ui/compare?runs=onlyone", "runs: select 2 to 16 runs to compare, got 1"),
        ("/ui/compare", "runs: select 2 to 16 runs"),
    ],
)
def test_bad_query_values_are_a_422_page_naming_them(
    client: TestClient, url: str, named: str
) -> None:
    html = html_of(client, url, 422)
    assert "422" in html and named in unescape(html)


# ----------------------------------------------------------------------------- run page
def test_run_page_shows_config_curves_tables_and_working_links(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "shown", epochs=3, tags=("t1",))
    html = html_of(client, f"/ui/runs/{run}")
    assert '<h1><span id="run-name">shown</span>' in html and "completed" in html
    assert 'id="config"' in html and ">prior_mode<" in html and ">gradient<" in html
    assert html.count('<figure class="chart">') == 2 and "<polyline" in html  # loss, test_rmse
    assert "Tables at epoch 2" in html  # the latest by default
    with RunReader(run, store=store) as reader:
        stats = an.get_overall_weight_stats(reader, 2)
        kl = an.compute_layer_kl_divergences(reader, 0)
    table = html[html.index('id="epoch-table"') :]
    table = table[: table.index("</table>")]
    assert ">Overall<" in table and ">layer1<" in table and ">layer2<" in table
    first = stats.reset_index().iloc[0]
    assert f">{fmt(float(first.iloc[1]))}<" in table
    assert "data-progress-url" not in html  # a finished run is not polled

    kl_html = html_of(client, f"/ui/runs/{run}", table="kl", epoch=0)
    assert "Tables at epoch 0" in kl_html and "Pairwise KL within each layer" in kl_html
    value = kl.reset_index().select_dtypes("number").iloc[0, -1]
    assert f">{fmt(float(value))}<" in kl_html
    assert ">layer1<" in html_of(client, f"/ui/runs/{run}", table="kl_prior", epoch=1)
    assert "/gradients" not in html  # no gradient statistics captured: no gradient tables
    no_grads = html_of(client, f"/ui/runs/{run}", table="gradients")
    assert "epoch 2 of this run has no gradient statistics" in no_grads

    links = parse(html)
    wanted = {
        f"/runs/{run}/metrics?format=csv",
        f"/runs/{run}/stats?epoch=2&format=csv",
        f"/runs/{run}/kl?epoch=2&format=csv",
        f"/runs/{run}/kl/prior?epoch=2&format=csv",
        *(f"/runs/{run}/epochs/{e}/file" for e in range(3)),
    }
    assert wanted <= set(links.hrefs)
    for url in [*links.hrefs, *links.srcs]:  # every link and image of the page answers
        if url.startswith("/") and not url.startswith("/docs"):
            response = client.get(url)
            assert response.status_code == 200, (url, response.text[:500])
    assert client.get(f"/runs/{run}/epochs/1/file").content[:4] == b"\x89HDF"
    assert client.get(f"/runs/{run}/plots/kl.png").headers["content-type"] == "image/png"


def test_run_page_shows_gradient_tables_of_runs_that_captured_them(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "with-grads", epochs=2, grads=True)
    html = html_of(client, f"/ui/runs/{run}", table="outliers", epoch=1)
    assert "Top exploding gradient elements" in html and 'id="epoch-table"' in html
    with RunReader(run, store=store) as reader:
        expected = an.gradient_outliers(reader, 1, 10, "exploding")
    table = html[html.index('id="epoch-table"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + len(expected)  # header and one row per element
    html = html_of(client, f"/ui/runs/{run}", table="gradients")
    assert ">layer1<" in html and ">layer2<" in html
    hrefs = parse(html_of(client, f"/ui/runs/{run}", epoch=1)).hrefs
    for path in ("gradients", "gradients/outliers"):  # their CSV links, which answer
        url = f"/runs/{run}/{path}?epoch=1&format=csv"
        assert url in hrefs
        assert client.get(url).status_code == 200


def test_unknown_runs_and_epochs_are_404_pages(client: TestClient) -> None:
    run = add_run(store_of(client), "known", epochs=2)
    html = html_of(client, "/ui/runs/nope", 404)
    assert "404" in html and "unknown run" in html and "nope" in html
    html = html_of(client, f"/ui/runs/{run}", 404, epoch=7)
    assert "has no epoch 7; captured epochs: [0, 1]" in html
    html = html_of(client, "/ui/compare", 404, runs=f"{run},ghost")
    assert "unknown run" in html and "ghost" in html
    assert "unknown run" in html_of(client, "/ui/runs/ghost/metrics", 404)
    assert client.get("/ui/runs/ghost/progress").status_code == 404
    html_of(client, f"/ui/runs/{run}", 422, epoch=-1)
    html_of(client, f"/ui/runs/{run}", 422, table="loss")


def test_live_run_progress_is_polled_and_grows(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "live", planned=4, status=None)
    html = html_of(client, f"/ui/runs/{run}")
    assert f'data-progress-url="/ui/runs/{run}/progress"' in html
    assert f'data-metrics-url="/ui/runs/{run}/metrics"' in html
    assert '<span id="epochs-done">0</span>' in html and "no epoch captured yet" in html
    runs_page = html_of(client, "/")  # its row in the runs table is polled too
    assert f'data-progress-url="/ui/runs/{run}/progress"' in runs_page

    def progress() -> dict[str, Any]:
        response = client.get(f"/ui/runs/{run}/progress")
        assert response.status_code == 200
        return dict(response.json())

    assert progress() == {"run_id": run, "status": "running", "active": True,
                          "epochs_done": 0, "epochs_planned": 4, "last_epoch": None}  # fmt: skip
    for e in range(2):
        snap = synthetic_snapshot(e, SIZES)
        store.write_epoch(run, snap)
        assert progress()["epochs_done"] == e + 1 and progress()["last_epoch"] == e
    fragment = html_of(client, f"/ui/runs/{run}/metrics")
    assert "<polyline" in fragment and "Metrics at epoch 1" in fragment
    assert "<html" not in fragment
    store.set_status(run, RunStatus.COMPLETED)
    assert progress()["active"] is False and progress()["status"] == "completed"
    assert "data-progress-url" not in html_of(client, f"/ui/runs/{run}")


# ----------------------------------------------------------------------------- compare page
def test_compare_page_puts_two_runs_side_by_side_by_name(client: TestClient) -> None:
    store = store_of(client)
    a = add_run(store, "learnable", epochs=3, seed=1)
    b = add_run(store, "fixed", epochs=2, prior="fixed", seed=2, widths=(12,))
    html = html_of(client, "/ui/compare", runs=f"{a},{b}")
    head = html[html.index("<thead>") : html.index("</thead>")]
    assert re.findall(r'href="/ui/runs/(\w+)">([^<]+)</a>', head) == [
        (a, "learnable"),
        (b, "fixed"),
    ]
    table = html[html.index('id="compare-table"') : html.index("</table>")]
    assert "<th>prior</th><td>learnable</td><td>fixed</td>" in table
    assert "<th>widths</th><td>6</td><td>12</td>" in table
    assert '<td class="num">3</td><td class="num">2</td>' in table  # epochs captured
    assert f'<td class="num">{fmt(0.5 / 3 + 0.01)}</td><td class="num">{fmt(0.5 / 2 + 0.02)}' in (
        table
    )  # last test_rmse, one column per run
    charts = html[html.index("Metrics over epochs") :]
    assert charts.count('<figure class="chart">') == 2 and charts.count("<polyline") == 4
    assert ">learnable</li>" in charts and ">fixed</li>" in charts  # legends by name
    links = parse(html)
    assert f"/compare/plots/priors.png?runs={a},{b}" in links.srcs
    assert f"/compare/plots/width.png?runs={a},{b}" in links.srcs  # two widths
    for src in links.srcs:
        response = client.get(src)
        assert response.status_code == 200, (src, response.text[:500])
    # the runs page's form sends run=a&run=b: the same page
    same = html_of(client, f"/ui/compare?run={a}&run={b}")
    assert parse(same).srcs == links.srcs


def test_compare_labels_colliding_names_with_ids(client: TestClient) -> None:
    store = store_of(client)
    a = add_run(store, "same", epochs=1)
    b = add_run(store, "same", epochs=1, seed=3)
    html = html_of(client, "/ui/compare", runs=f"{a},{b}")
    assert f">same ({a})</a>" in html and f">same ({b})</a>" in html
    assert "width.png" not in html  # one width: no width study


def test_pages_need_the_token_when_reads_are_protected(make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN, auth_reads=True)
    assert client.get("/").status_code == 401
    assert client.get("/", headers=AUTH).status_code == 200
    open_reads = make_client(api_token=TOKEN)
    assert open_reads.get("/").status_code == 200
