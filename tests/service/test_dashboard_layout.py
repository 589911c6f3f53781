"""What the dashboard's pages show and how (SQLite): metric series that are one value
folded into a table, per-layer series in one chart, dict values of a configuration as
``key: value`` lines, the last epoch files with the others behind "show all", the runs
table in a scrolling box with short start times, the compare page's constant metrics, and
the sweep plots' captions.
"""

from __future__ import annotations

import math
import re

import pytest

from service.analysis.synthetic import synthetic_snapshot
from service.dashboard import pages
from service.dashboard.render import cell, fmt, fold_series, short_time
from service.dashboard.sweeps import plot_title
from tests.service.conftest import TestClient
from tests.service.test_dashboard import SIZES, add_run, html_of, store_of
from tests.service.test_dashboard_views import section
from trainer.store import RunStatus, RunStore

PRIORS = {"layer1.weight": "learnable/gradient", "layer1.bias": "fixed (6 < min_group 10)"}


@pytest.fixture
def catalog_url() -> str | None:
    """SQLite only: these tests are about rendering."""
    return None


def trained_like(store: RunStore, name: str, epochs: int = 4) -> str:
    """A run with metrics like the trainer's: some vary, some are constant (kl_weight, lr,
    steps), per-layer KL, one only at the last epoch; a dict in its configuration."""
    config = {"dataset": "regression", "prior": "learnable", "widths": [6], "epochs": epochs,
              "lr": 0.01, "resolved_priors": PRIORS}  # fmt: skip
    run = store.create_run(name, config).id
    for e in range(epochs):
        snap = synthetic_snapshot(e, SIZES, seed=1)
        snap.metrics.clear()
        snap.metrics |= {"loss": 2.0 / (1 + e), "kl_weight": 1.0, "lr": 0.01, "steps": 8.0}
        snap.metrics |= {"kl/layer1": 40.0 - e, "kl/layer2": 20.0 - e / 2}
        if e == epochs - 1:
            snap.metrics["selected_epoch"] = float(e)
        store.write_epoch(run, snap)
    store.set_status(run, RunStatus.COMPLETED)
    return run


# ----------------------------------------------------------------------------- metrics
def test_fold_series_keeps_charts_for_what_varies() -> None:
    nan = math.nan
    charts, values = fold_series(
        {
            "loss": [(0, 2.0), (1, 1.0)],
            "lr": [(0, 0.1), (1, 0.1), (2, 0.1)],
            "kl/layer1": [(0, 3.0), (1, 2.0)],
            "kl": [(0, 5.0), (1, 4.0)],
            "kl/layer2": [(0, 1.0), (1, 0.5)],
            "best": [(7, 0.9)],
            "gone": [(0, nan), (1, nan)],
            "alone/part": [(0, 1.0), (1, 2.0)],
        }
    )
    assert [title for title, _ in charts] == ["loss", "kl/*", "kl", "alone/part"]
    assert list(dict(charts)["kl/*"]) == ["layer1", "layer2"]  # one line per layer
    assert [(n, w) for n, _, w in values] == [
        ("lr", "all 3 epochs"),
        ("best", "epoch 7 only"),
        ("gone", "all 2 epochs"),
    ]


def test_run_page_folds_constant_metrics_into_a_table(client: TestClient) -> None:
    run = trained_like(store_of(client), "folded")
    html = html_of(client, f"/ui/runs/{run}")
    metrics = section(html, 'id="metrics"', '<table class="kv" id="last-metrics">')
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", metrics)
    assert captions == ["loss", "kl/*"]  # no chart of a flat line or of one point
    assert ">layer1</li>" in metrics and ">layer2</li>" in metrics
    table = section(html, 'id="constant-metrics"')
    for name, value, where in [
        ("kl_weight", "1", "all 4 epochs"),
        ("lr", "0.01", "all 4 epochs"),
        ("steps", "8", "all 4 epochs"),
        ("selected_epoch", "3", "epoch 3 only"),
    ]:
        assert f'<th>{name}</th><td class="num">{value}</td><td class="muted">{where}</td>' in (
            table
        )
    assert "Metrics at epoch 3" in html
    fragment = html_of(client, f"/ui/runs/{run}/metrics")  # what the live page fetches
    assert 'id="constant-metrics"' in fragment and fragment.count('<figure class="chart">') == 2


def test_run_page_has_links_to_its_sections(client: TestClient) -> None:
    run = trained_like(store_of(client), "nav")
    html = html_of(client, f"/ui/runs/{run}")
    nav = section(html, 'id="on-page"', "</nav>")
    targets = re.findall(r'href="#([\w-]+)"', nav)
    assert targets == ["metrics-section", "tables", "plots", "plot-explorer",
                       "epoch-files-section", "configuration"]  # fmt: skip
    for target in targets:
        assert f'id="{target}"' in html
    assert 'action="/ui/runs/' in html and f'{run}#tables"' in html  # "Show" comes back here


# ----------------------------------------------------------------------------- values
def test_dicts_and_lists_are_never_python_reprs() -> None:
    assert fmt(PRIORS) == '{"layer1.weight": "learnable/gradient", "layer1.bias": ' + (
        '"fixed (6 < min_group 10)"}'
    )
    assert fmt([1200, 1200]) == "1200-1200" and fmt([{"a": 1}]) == '[{"a": 1}]'
    shown = str(cell(PRIORS))
    assert shown == (
        '<span class="lines">layer1.weight: learnable/gradient<br>'
        "layer1.bias: fixed (6 &lt; min_group 10)</span>"
    )
    assert str(cell({})) == "{}" and str(cell("<b>")) == "&lt;b&gt;" and str(cell(None)) == "–"


def test_configuration_and_compare_tables_show_dicts_as_lines(client: TestClient) -> None:
    store = store_of(client)
    a = trained_like(store, "a")
    b = add_run(store, "b", epochs=2)
    config = section(html_of(client, f"/ui/runs/{a}"), 'id="config"')
    assert '<th>resolved_priors</th><td><span class="lines">layer1.weight: learnable' in config
    assert "{'" not in config and "{&#39;" not in config
    compare = html_of(client, "/ui/compare", runs=f"{a},{b}")
    table = section(compare, 'id="compare-table"')
    assert '<th>resolved_priors</th><td><span class="lines">layer1.weight:' in table
    assert "{&#39;" not in table


def test_compare_page_charts_only_what_varies(client: TestClient) -> None:
    store = store_of(client)
    a, b = trained_like(store, "a"), trained_like(store, "b", epochs=3)
    html = html_of(client, "/ui/compare", runs=f"{a},{b}")
    charts = section(html, 'id="compare-charts"', "</section>")
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", charts)
    assert captions == ["loss", "kl/layer1", "kl/layer2"]
    table = section(html, 'id="compare-table"')
    assert "<th>lr (constant)</th>" in table and "<th>loss (last)</th>" in table
    assert "<th>selected_epoch (last)</th>" in table  # one epoch in each run: no chart
    assert "selected_epoch" not in captions


# ----------------------------------------------------------------------------- epoch files
def test_epoch_files_show_the_last_ones_and_the_rest_on_demand(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pages, "RECENT_EPOCHS", 3)
    store = store_of(client)
    run = trained_like(store, "many", epochs=5)
    html = html_of(client, f"/ui/runs/{run}")
    files = section(html, 'id="epoch-files"')
    rows = re.findall(r"<tr( class=\"[\w -]+\")?><td class=\"num\">(\d+)</td>", files)
    assert [(cls, int(e)) for cls, e in rows] == [
        (' class="older"', 0),
        (' class="older"', 1),
        ("", 2),
        ("", 3),
        ("", 4),
    ]
    toggle = section(html, 'id="epoch-files-all"', "</label>")
    assert 'type="checkbox"' in html and "the last 3 of 5 epochs · show all" in toggle
    few = trained_like(store, "few", epochs=2)
    html = html_of(client, f"/ui/runs/{few}")
    assert 'id="epoch-files-all"' not in html and 'class="older"' not in html


# ----------------------------------------------------------------------------- runs page
def test_runs_table_scrolls_in_its_box_and_starts_fit_one_line(client: TestClient) -> None:
    run = add_run(store_of(client), "wide", tags=("t",))
    html = html_of(client, "/")
    assert '<div class="scroll" id="runs-scroll"><table class="runs" id="runs-table"' in html
    created = store_of(client).get_run(run).created_at
    assert short_time(created) == created.strftime("%Y-%m-%d %H:%M")
    assert f'<td class="when" title="{fmt(created)} UTC">{short_time(created)}</td>' in html
    assert 'class="tag" href="/?tag=t&amp;sort=created_at&amp;order=desc">t</a>' in html


# ----------------------------------------------------------------------------- sweeps
@pytest.mark.parametrize(
    ("url", "title"),
    [
        ("/sweeps/s1/plots/width_posteriors.png", "Posteriors, KL and test metric against width"),
        (
            "/sweeps/s1/plots/width_priors_learnable.png",
            "Learned priors against width (learnable prior runs)",
        ),
        (
            "/sweeps/s1/plots/optim.png",
            "Optimisers compared: final metric, epochs to the target, exploding gradients",
        ),
        ("/sweeps/s1/plots/some_new_plot.png", "Some new plot"),
    ],
)
def test_sweep_plots_have_titles_not_file_names(url: str, title: str) -> None:
    assert plot_title(url) == title
