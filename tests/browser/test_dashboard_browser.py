"""The dashboard in a real browser: headless Chromium (Playwright) against ``bnn serve`` on a
loopback port, its data directory holding two small runs trained here (fixtures in
conftest.py). Every test fails on a failed request, a response >= 400 it did not provoke,
an uncaught exception or a console error, and on any request that leaves the machine.

The runs page (search, open a run, tick two runs and compare them), a run's page (tables,
plots, its sections' links, metrics that are one value in a table, the last epoch files and
"show all", the login link instead of its forms), the compare page (the names the user
gave), the sweep pages, every page within the window at 1280 and 390 pixels, a run
started through ``POST /runs`` whose epoch count grows on its page without a reload, an
unknown run's 404 page, the API docs (``/docs``, ``/redoc``) without internet access, the
top bar's links, the page icon. About a minute and a half, most of it the live run.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.browser.conftest import MANY, MANY_EPOCHS, SWEEP, Watch
from tests.browser.site import SEED_RUNS, Site

pytestmark = pytest.mark.browser

LEARNABLE, FIXED = SEED_RUNS  # names the user gave the two seed runs
# 20 captured epochs of ~0.4 s each on an idle core (~1.5 s on a shared one): several of the
# page's polls (every 3 s) see it training
LIVE = {"dataset": "regression", "prior": "learnable", "epochs": 20, "n_train": 12000}
LIVE |= {"n_test": 32, "eval_samples": 2, "name": "live run from the browser test"}
LIVE_TIMEOUT_MS = 120_000

Watched = tuple[Any, Watch]


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def run_rows(page: Any) -> Any:
    """The rows of the runs table (those with a selection checkbox)."""
    return page.get_by_role("row").filter(has=page.get_by_role("checkbox"))


def images_load(page: Any) -> int:
    """Scrolls every image into view (they load lazily) and waits until each has loaded;
    the number of images."""
    images = page.get_by_role("img")
    for i in range(images.count()):
        images.nth(i).scroll_into_view_if_needed()
    page.wait_for_function(
        "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)",
        timeout=60_000,
    )
    return int(images.count())


# ----------------------------------------------------------------------------- runs page
def test_runs_page_search_and_open_a_run(watched: Watched, site: Site) -> None:
    page, watch = watched
    page.goto("/")
    expect(page).to_have_title(re.compile("Runs"))
    expect(page.get_by_role("heading", level=1)).to_contain_text("Runs")
    for name in (LEARNABLE, FIXED):
        expect(run_rows(page).filter(has_text=name)).to_have_count(1)

    # search by name: the form goes to the same page with ?q=, the catalog filters
    page.get_by_role("searchbox", name="Name", exact=True).fill("learnable")
    page.get_by_role("searchbox", name="Name", exact=True).press("Enter")
    page.wait_for_url(re.compile(r"[?&]q=learnable"))
    expect(run_rows(page)).to_have_count(1)
    expect(run_rows(page)).to_contain_text(LEARNABLE)
    expect(page.get_by_role("link", name=FIXED)).to_have_count(0)
    page.get_by_role("searchbox", name="Name", exact=True).fill("no such run")
    page.get_by_role("searchbox", name="Name", exact=True).press("Enter")
    page.wait_for_url(re.compile(r"[?&]q=no"))
    expect(page.get_by_text("no runs match")).to_be_visible()
    page.go_back()

    # open the run from the table
    page.get_by_role("link", name=LEARNABLE, exact=True).click()
    run_id = site.ids[LEARNABLE]
    page.wait_for_url(f"**/ui/runs/{run_id}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(LEARNABLE)
    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator("#epochs-done")).to_have_text("4")
    expect(page.locator("#metrics svg").first).to_be_visible()  # the metric curves
    expect(page.locator("#epoch-table tbody tr").first).to_be_visible()
    watch.check()


def test_run_page_tables_and_plots(watched: Watched, site: Site) -> None:
    page, watch = watched
    run_id = site.ids[FIXED]
    page.goto(f"/ui/runs/{run_id}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(FIXED)
    expect(page.locator("#config")).to_contain_text("fixed")
    # another table at another epoch, through the page's form
    page.get_by_role("combobox", name=re.compile("^Table")).select_option(
        label="Pairwise KL within each layer"
    )
    page.get_by_role("combobox", name=re.compile("^Epoch")).select_option("1")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(re.compile(r"table=kl&epoch=1|epoch=1&table=kl"))
    expect(page.get_by_role("heading", name="Tables at epoch 1")).to_be_visible()
    expect(page.get_by_role("heading", name="Pairwise KL within each layer")).to_be_visible()
    expect(page.locator("#epoch-table")).to_contain_text("layer1")
    assert images_load(page) >= 2  # the KL and prior plots
    expect(page.locator("#epoch-files tbody tr")).to_have_count(4)
    watch.check()


def test_unknown_run_is_a_404_page(watched: Watched) -> None:
    page, watch = watched
    watch.expect(404, "/ui/runs/no-such-run")
    response = page.goto("/ui/runs/no-such-run")
    assert response is not None and response.status == 404
    expect(page.locator("#error-message")).to_contain_text("no-such-run")
    page.get_by_role("link", name="Back to the runs").click()
    page.wait_for_url(re.compile(r"/$"))
    watch.check()


def test_run_page_sections_folded_metrics_and_epoch_files(watched: Watched, site: Site) -> None:
    page, watch = watched
    page.goto(f"/ui/runs/{site.ids[MANY]}")
    # logged out (the service has a token): a login link, not a disabled form
    expect(page.locator("#login-to-edit")).to_have_text("Log in to edit")
    expect(page.locator("#run-edit-form")).to_have_count(0)
    # lr and kl_weight never change: rows of a table, not charts of flat lines
    constants = page.locator("#constant-metrics")
    expect(constants).to_contain_text("lr")
    expect(constants).to_contain_text(f"all {MANY_EPOCHS} epochs")
    captions = page.locator("#metrics figure.chart figcaption").all_inner_texts()
    assert "loss" in captions and "lr" not in captions and "kl_weight" not in captions
    # the section links lead to the tables and plots
    page.locator("#on-page").get_by_role("link", name="Tables").click()
    page.wait_for_url("**#tables")
    assert abs(page.locator("#tables").bounding_box()["y"]) < 5
    # the last 20 epoch files, the others behind "show all" (no script involved)
    rows = page.locator("#epoch-files tbody tr")
    visible = "(rows) => rows.filter(r => r.getClientRects().length).length"
    assert rows.evaluate_all(visible) == 20
    expect(rows.last).to_contain_text(str(MANY_EPOCHS - 1))
    page.get_by_text(f"the last 20 of {MANY_EPOCHS} epochs · show all").click()
    assert rows.evaluate_all(visible) == MANY_EPOCHS
    page.get_by_text(f"all {MANY_EPOCHS} epochs · show the last 20").click()
    assert rows.evaluate_all(visible) == 20
    # a dict of the configuration: one "key: value" line each, not a Python dict
    expect(page.locator("#config")).to_contain_text("layer1.weight: learnable/gradient")
    expect(page.locator("#config")).not_to_contain_text("{'")
    watch.check()


FITS = """() => {
  const root = document.documentElement, width = root.clientWidth;
  const out = [];
  if (root.scrollWidth > width) out.push(`page ${root.scrollWidth}`);
  for (const e of document.querySelectorAll('body *')) {
    const box = e.getBoundingClientRect();
    if (box.width && box.right > width + 1 && !e.closest('.scroll') && !e.closest('[hidden]'))
      out.push(`${e.tagName}#${e.id}.${e.className} ends at ${Math.round(box.right)}`);
  }
  return out.slice(0, 10);
}"""


@pytest.mark.parametrize("width", [1280, 390])
def test_every_page_fits_the_window(watched: Watched, site: Site, width: int) -> None:
    """Nothing sticks out of the window; wide tables scroll inside their own box."""
    page, watch = watched
    page.set_viewport_size({"width": width, "height": 900})
    a, b = site.ids[LEARNABLE], site.ids[FIXED]
    urls = ["/", f"/ui/runs/{a}", f"/ui/runs/{site.ids[MANY]}", f"/ui/compare?runs={a},{b}"]
    urls += ["/ui/sweeps", f"/ui/sweeps/{site.sweeps[SWEEP]}"]
    for url in urls:
        page.goto(url)
        # every plot of the page answered before the next page: an image request still
        # running at the next navigation is aborted, and the abort can reach the watcher
        # before that navigation does (CI saw it on the sweep page's on-demand plots)
        page.wait_for_load_state("networkidle")
        assert page.evaluate(FITS) == [], f"{url} at {width} px"
    page.goto("/")
    header = page.locator("header.top").bounding_box()
    assert header is not None and header["width"] <= width  # the top bar stays whole
    one_line = "(cells) => cells.map(c => { const r = document.createRange(); "
    one_line += "r.selectNodeContents(c); return r.getClientRects().length; })"
    assert set(page.locator("#runs-table td.when").evaluate_all(one_line)) == {1}
    watch.check()


def test_sweep_page_captions_are_titles(watched: Watched, site: Site) -> None:
    page, watch = watched
    page.goto("/ui/sweeps")
    page.get_by_role("link", name=SWEEP).click()
    page.wait_for_url(f"**/ui/sweeps/{site.sweeps[SWEEP]}")
    expect(page.locator("#study-table")).to_be_visible()
    captions = page.locator("#sweep-plots figcaption").all_inner_texts()
    assert captions and "Posteriors, KL and test metric against width" in captions
    assert not [c for c in captions if "_" in c or c.endswith(".png")], captions
    grid = page.locator("#sweep-grid")
    caption, cell = grid.locator("caption").bounding_box(), grid.locator("th").first.bounding_box()
    assert caption and cell and abs(caption["x"] - cell["x"]) < 12  # "Grid" over its rows
    assert images_load(page) >= 1
    watch.check()


# ----------------------------------------------------------------------------- compare
def test_select_two_runs_and_compare_them(watched: Watched, site: Site) -> None:
    page, watch = watched
    page.goto("/")
    compare = page.get_by_role("button", name="Compare selected")
    expect(compare).to_be_disabled()
    page.get_by_role("checkbox", name=f"select {LEARNABLE}").check()
    expect(compare).to_be_disabled()  # one run is not a comparison
    page.get_by_role("checkbox", name=f"select {FIXED}").check()
    expect(compare).to_be_enabled()
    expect(page.locator("#compare-hint")).to_have_text("2 selected")
    compare.click()

    page.wait_for_url(re.compile(r"/ui/compare\?"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Compare 2 runs")
    header = page.locator("#compare-table thead")
    for name in (LEARNABLE, FIXED):  # the names the user gave, not ids
        expect(header.get_by_role("link", name=name, exact=True)).to_be_visible()
        expect(page.locator(".legend").first).to_contain_text(name)
    expect(page.locator("#compare-table")).to_contain_text("learnable")
    assert images_load(page) >= 3  # priors, scales and (two widths) the width study
    # a run's column links to its page
    header.get_by_role("link", name=FIXED, exact=True).click()
    page.wait_for_url(f"**/ui/runs/{site.ids[FIXED]}")
    watch.check()


# ----------------------------------------------------------------------------- live run
def test_live_run_epoch_count_grows_without_reload(watched: Watched, site: Site) -> None:
    page, watch = watched
    run_id = site.submit(**LIVE)  # POST /runs with the token: trained by the Dask cluster
    navigations: list[str] = []
    page.goto(f"/ui/runs/{run_id}")
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    expect(page.get_by_role("heading", level=1)).to_contain_text(LIVE["name"])
    expect(page.locator("#run-status")).to_have_text(re.compile("queued|running"))
    page.evaluate(
        """() => {
        window.__sameDocument = true;
        const done = document.getElementById("epochs-done");
        window.__seen = [done.textContent];
        new MutationObserver(() => window.__seen.push(done.textContent)).observe(
            done, {childList: true, characterData: true, subtree: true});
        }"""
    )
    planned = str(LIVE["epochs"])
    try:
        expect(page.locator("#run-status")).to_have_text("completed", timeout=LIVE_TIMEOUT_MS)
        expect(page.locator("#epochs-done")).to_have_text(planned)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nserver log:\n{site.output()[-5000:]}") from None
    assert page.evaluate("() => window.__sameDocument") is True, "the page was reloaded"
    assert navigations == [], navigations
    seen = [int(v) for v in page.evaluate("() => window.__seen")]
    counts = list(dict.fromkeys(seen))
    assert counts == sorted(counts), f"the epoch count went back: {seen}"
    assert counts[-1] == LIVE["epochs"], f"epoch counts shown: {seen}"
    assert any(0 < n < counts[-1] for n in counts), f"not seen while training: {seen}"
    # the curves were fetched again: the latest metrics are those of the last epoch
    last = int(LIVE["epochs"]) - 1
    expect(page.locator("#last-metrics caption")).to_have_text(f"Metrics at epoch {last}")
    expect(page.locator("#metrics polyline").first).to_be_visible()

    # the runs page lists it as completed with all its epochs
    page.goto("/")
    row = run_rows(page).filter(has_text=LIVE["name"])
    expect(row).to_contain_text("completed")
    expect(row).to_contain_text(f"{planned} / {planned}")
    watch.check()


# ----------------------------------------------------------------------------- others
def test_api_docs_work_offline(watched: Watched) -> None:
    """``/docs`` (Swagger UI) renders from the service's own files."""
    page, watch = watched
    page.goto("/")
    page.get_by_role("link", name="API", exact=True).click()
    page.wait_for_url("**/docs")
    expect(page.get_by_role("heading", name=re.compile("bnn-infosharing")).first).to_be_visible()
    expect(page.get_by_text("/healthz").first).to_be_visible()  # the operations are listed
    page.wait_for_load_state("networkidle")
    assert not watch.external, f"/docs loads {sorted(set(watch.external))} from the internet"
    watch.check()


def test_redoc_works_offline(watched: Watched) -> None:
    """``/redoc`` (ReDoc) renders from the service's own files."""
    page, watch = watched
    page.goto("/redoc")
    expect(page.get_by_role("heading", name=re.compile("bnn-infosharing")).first).to_be_visible()
    page.wait_for_load_state("networkidle")
    assert not watch.external, f"/redoc loads {sorted(set(watch.external))} from the internet"
    watch.check()


def test_navigation_links_answer(watched: Watched) -> None:
    """Every link of the top bar leads to a page that loads cleanly."""
    page, watch = watched
    page.goto("/")
    nav = page.get_by_role("navigation").first
    names = [link.inner_text().strip() for link in nav.get_by_role("link").all()]
    assert {"Runs", "API"} <= set(names), names
    for name in names:
        page.goto("/")
        with page.expect_navigation():
            nav.get_by_role("link", name=name, exact=True).click()
        page.wait_for_load_state("networkidle")
        expect(page.get_by_role("heading").first).to_be_visible()
    watch.check()


def test_pages_have_an_icon(watched: Watched, site: Site) -> None:
    """A browser asks every site for an icon; without one each first visit logs a 404."""
    page, watch = watched
    page.goto("/")
    links = page.locator('link[rel~="icon"]')
    href = links.first.get_attribute("href") if links.count() else None
    if href is None:
        status = site.http.get("/favicon.ico").status_code
        assert status == 200, f"no <link rel=icon> in the pages and GET /favicon.ico is {status}"
    elif not href.startswith("data:"):
        assert site.http.get(href).status_code == 200, href
    watch.check()
