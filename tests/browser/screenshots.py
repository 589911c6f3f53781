"""Screenshots of the dashboard for the README, taken in headless Chromium:

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.browser.screenshots [--out docs/img]

Trains a few small regression runs (about a minute in all on one core), starts ``bnn serve``
on a free loopback port with them, runs a small width sweep on its Dask cluster when the
dashboard has a sweeps page, starts a long run so that the runs page shows one training,
and saves ``dashboard_runs.png``, ``dashboard_run.png``, ``dashboard_compare.png`` and
(when ``/ui/sweeps`` exists) ``dashboard_sweeps.png`` and ``dashboard_sweep.png`` (the
sweep's own page): 1280 pixels wide (wider where a page is), down to the end of the page
or ``--max-height``.
Needs Playwright and a Chromium (see ``site.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.browser.site import Site, find_chromium, missing

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--dataset", "regression", "--epochs", "25", "--n-train", "512", "--n-test", "256"]
COMMON += ["--eval-samples", "20", "--no-progress"]
RUNS = {  # name -> options: the learnable prior against a fixed one, two widths
    "learnable prior, width 10": ["--prior", "learnable", "--widths", "10", "--tag", "study"],
    "fixed N(0,1) prior, width 10": ["--prior", "fixed", "--widths", "10", "--tag", "study"],
    "learnable prior, width 40": ["--prior", "learnable", "--widths", "40", "--tag", "width"],
    "empirical Bayes prior, width 10": ["--prior", "learnable", "--prior-mode",
                                        "empirical_bayes", "--widths", "10"],
}  # fmt: skip
RUN, OTHER = "learnable prior, width 10", "fixed N(0,1) prior, width 10"
SWEEP = {
    "kind": "width",
    "name": "width sweep (screenshot)",
    "base": {"dataset": "regression", "epochs": 10, "n_train": 256, "n_test": 64},
    "grid": {"widths": [8, 32], "prior": ["learnable", "fixed"]},
}
LIVE = {"dataset": "regression", "prior": "learnable", "epochs": 400, "n_train": 20000}
LIVE |= {"n_test": 32, "eval_samples": 2, "name": "long run, still training", "tags": ["live"]}


def shoot(page: Any, path: Path, max_height: int) -> None:
    """The page from its top, the full width, at most ``max_height`` pixels tall."""
    page.wait_for_load_state("networkidle")
    for image in page.get_by_role("img").all():  # lazy images: load them all
        image.scroll_into_view_if_needed()
    page.wait_for_function(
        "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
    )
    page.evaluate("() => window.scrollTo(0, 0)")
    width = int(page.evaluate("() => document.documentElement.scrollWidth"))  # all columns
    bottom = page.evaluate("() => document.querySelector('main').getBoundingClientRect().bottom")
    height = max(320, min(max_height, int(bottom) + 16))  # down to the end of the content
    page.screenshot(
        path=str(path), full_page=True, clip={"x": 0, "y": 0, "width": width, "height": height}
    )
    print(f"{path} ({width}x{height})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--max-height", type=int, default=1400)
    args = parser.parse_args(argv)
    why = missing()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bnn_screens_") as tmp:
        site = Site(Path(tmp), runs=RUNS, common=COMMON).start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=find_chromium())
                page = browser.new_page(
                    base_url=site.url, viewport={"width": args.width, "height": 900}
                )
                has_sweeps = site.http.get("/ui/sweeps").status_code == 200
                if has_sweeps:
                    response = site.http.post("/sweeps", json=SWEEP)
                    assert response.status_code == 202, response.text
                    site.wait_idle(timeout=300)
                live = site.submit(**LIVE)
                deadline = time.monotonic() + 120
                while len(site.http.get(f"/runs/{live}").json()["epochs"]) < 8:
                    assert time.monotonic() < deadline, site.output()
                    time.sleep(0.5)

                page.goto("/")
                shoot(page, args.out / "dashboard_runs.png", args.max_height)
                page.goto(f"/ui/runs/{site.ids[RUN]}")
                shoot(page, args.out / "dashboard_run.png", args.max_height)
                page.goto(f"/ui/compare?runs={site.ids[RUN]},{site.ids[OTHER]}")
                shoot(page, args.out / "dashboard_compare.png", args.max_height)
                if has_sweeps:
                    page.goto("/ui/sweeps")
                    shoot(page, args.out / "dashboard_sweeps.png", args.max_height)
                    page.get_by_role("link", name=SWEEP["name"]).click()
                    page.wait_for_url("**/ui/sweeps/*")
                    shoot(page, args.out / "dashboard_sweep.png", args.max_height)
                else:
                    print("no /ui/sweeps page yet: no sweeps screenshot")
                site.http.post(f"/runs/{live}/cancel")
                browser.close()
        finally:
            site.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
