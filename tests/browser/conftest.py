"""Fixtures of the browser tests: the real server with two small finished runs, headless
Chromium, and a page whose failed requests and console errors fail the test.

Without Playwright or Chromium the tests skip, except under CI (``CI=true``), where they fail:
CI installs both (``.ci/run``; the playwright package is in the dev extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser.site import CI, Site, find_chromium, missing

VIEWPORT = {"width": 1280, "height": 900}
LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
SWEEP = "widths 4 and 8"  # a finished width sweep of synthetic runs (see add_synthetic)
MANY = "many epochs"  # a finished run of 25 synthetic epochs
MANY_EPOCHS = 25


def add_synthetic(data_dir: Path) -> None:
    """Written straight into the store before the server starts (no training): the sweep
    :data:`SWEEP` and the run :data:`MANY` (synthetic epochs of small MLPs, with metrics
    that vary and metrics that are constant, like the trainer's)."""
    from service.analysis.synthetic import synthetic_snapshot
    from service.demo.sweeps import SweepSpec, register_sweep
    from trainer.store import RunStatus, RunStore

    base = {"dataset": "regression", "epochs": 2, "n_train": 64, "n_test": 32}
    with RunStore(data_dir) as store:
        spec = {"kind": "width", "name": SWEEP, "base": base, "grid": {"widths": [4, 8]}}
        _, runs = register_sweep(store, SweepSpec.model_validate(spec))
        for i, (_, run_id, config) in enumerate(runs):
            store.set_status(run_id, RunStatus.RUNNING)
            for e in range(2):
                snap = synthetic_snapshot(e, (1, *config["widths"], 1), seed=i)
                snap.metrics |= {"test_rmse": 0.5 - i / 10 - e / 20, "lr": 0.01}
                store.write_epoch(run_id, snap)
            store.set_status(run_id, RunStatus.COMPLETED)
        config = {**base, "epochs": MANY_EPOCHS, "widths": [6], "prior": "learnable",
                  "resolved_priors": {"layer1.weight": "learnable/gradient"}}  # fmt: skip
        run = store.create_run(MANY, config, ["browser"]).id
        for e in range(MANY_EPOCHS):
            snap = synthetic_snapshot(e, (1, 6, 1), seed=7)
            snap.metrics |= {"loss": 1.0 / (1 + e), "lr": 0.01, "kl_weight": 1.0}
            store.write_epoch(run, snap)
        store.set_status(run, RunStatus.COMPLETED)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives the dashboard in headless Chromium")


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium executable; skip (fail under CI) without it or without Playwright."""
    why = missing()
    if why is not None:
        if CI:
            pytest.fail(f"browser tests cannot run under CI: {why}", pytrace=False)
        pytest.skip(why)
    path = find_chromium()
    assert path is not None
    return path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    """Headless Chromium, one per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def site(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """``bnn serve`` on a fresh data directory holding the two seed runs (see site.py), a
    sweep and a run of many epochs (:func:`add_synthetic`)."""
    started = Site(tmp_path_factory.mktemp("browser_site"), prepare=add_synthetic).start()
    try:
        yield started
    finally:
        started.stop()


class Watch:
    """What went wrong in a page: failed requests, responses >= 400 and console errors,
    except the ones the test provokes (:meth:`expect`) and the browser's own favicon
    request (tested apart)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        self.external: list[str] = []  # requests that left the machine (aborted)
        self.expected: set[tuple[int, str]] = set()
        self.closed = False
        self._navigations = 0  # main-frame navigations begun
        self._commits = 0  # main-frame navigations committed (a new document shown)
        self._started: dict[Any, tuple[int, int]] = {}  # request -> (begun, committed) before
        page.on("request", self._request)
        page.on("framenavigated", self._committed)
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self._add(f"uncaught exception: {error}"))
        page.route("**/*", self._route)

    def expect(self, status: int, path: str) -> None:
        """A response the test provokes (e.g. 404 for an unknown run): not a problem."""
        self.expected.add((status, path))

    def _add(self, problem: str) -> None:
        if not self.closed:
            self.problems.append(problem)

    def _route(self, route: Any) -> None:
        """Nothing leaves the machine: requests to other hosts are aborted and recorded."""
        url = route.request.url
        if urlsplit(url).scheme in ("http", "https") and urlsplit(url).hostname not in {
            h.strip("[]") for h in LOOPBACK
        }:
            self.external.append(url)
            route.abort("internetdisconnected")
        else:
            route.continue_()

    def _request(self, request: Any) -> None:
        self._started[request] = (self._navigations, self._commits)
        if request.is_navigation_request() and request.frame == self.page.main_frame:
            self._navigations += 1

    def _committed(self, frame: Any) -> None:
        if frame == self.page.main_frame:
            self._commits += 1

    def _failed(self, request: Any) -> None:
        failure = request.failure or ""
        if request.url in self.external:
            self._add(f"fetched from the internet: {request.url}")
            return
        begun, committed = self._started.get(request, (0, 0))
        if "ERR_ABORTED" in failure and (
            self._navigations > begun or self._commits > committed
        ):  # the page navigated away while it was loading (a lazy image of the old page
            return  # may start after the next page's request, before that page replaces it)
        self._add(f"request failed: {request.method} {request.url}: {failure}")

    def _path(self, url: str) -> str:
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def _response(self, response: Any) -> None:
        if response.status >= 400 and (response.status, self._path(response.url)) not in (
            self.expected
        ):
            self._add(f"{response.status} {response.request.method} {response.url}")

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        where = message.location.get("url", "") if message.location else ""
        if urlsplit(where).path == "/favicon.ico":
            return  # see test_pages_have_an_icon
        provoked = any(self._path(where) == path for _, path in self.expected)
        if provoked and "status of" in message.text:
            return
        self._add(f"console error: {message.text} ({where})")

    def check(self) -> None:
        """Fails naming every problem seen so far."""
        problems, self.problems = self.problems, []
        assert not problems, "the browser saw:\n" + "\n".join(problems)


@pytest.fixture
def watched(browser: Any, site: Site) -> Iterator[tuple[Any, Watch]]:
    """A fresh browser context's page on the site (``page.goto("/")`` works) and its
    :class:`Watch`; problems left unchecked fail the test at teardown."""
    context = browser.new_context(base_url=site.url, viewport=VIEWPORT)
    context.set_default_timeout(20_000)
    page = context.new_page()
    watch = Watch(page)
    try:
        yield page, watch
        watch.check()
    finally:
        watch.closed = True
        context.close()
