"""Plots label runs by the names the user gave, as the pages do (SQLite): a run's PNG
titles, the compare plots' legends and titles, the width study; the id only where two
runs share a name (:func:`service.run_labels.run_labels`), and a renamed run's plots
drawn again with the new name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service import analysis as an
from service import run_labels
from service.dashboard.compare import labels
from tests.service.conftest import TestClient
from tests.service.test_dashboard import add_run, store_of
from tests.service.test_dashboard_views import png
from trainer.store import RunStore


@pytest.fixture
def catalog_url() -> str | None:
    """SQLite only: the labels do not depend on the catalog's back end."""
    return None


def spy(monkeypatch: pytest.MonkeyPatch, name: str, seen: list[Any]) -> None:
    """Records what ``an.<name>`` is given as runs: a source's name, or a mapping's labels."""
    original: Callable[..., bytes] = getattr(an, name)

    def wrapper(runs: Any, *args: Any, **kwargs: Any) -> bytes:
        seen.append(list(runs) if isinstance(runs, dict) else runs.name)
        return original(runs, *args, **kwargs)

    monkeypatch.setattr(an, name, wrapper)


def test_the_label_rule() -> None:
    assert run_labels.run_labels(["a", "b", "c"], ["x", "y", "x"]) == ["x (a)", "y", "x (c)"]
    assert run_labels.run_labels([], []) == []


def test_a_run_s_plots_are_titled_by_its_name(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(client)
    run = add_run(store, "my study run", epochs=2)
    seen: list[Any] = []
    for name in ("plot_kl_over_epochs", "plot_prior_trajectories", "plot_epoch_distributions"):
        spy(monkeypatch, name, seen)
    for kind in ("kl", "priors", "epoch"):
        png(client, f"/runs/{run}/plots/{kind}.png")
    assert seen == ["my study run"] * 3

    monkeypatch.setattr(run_labels, "NAMES_TTL_S", 0.0)  # names read again at once
    store.set_labels(run, name="renamed")
    png(client, f"/runs/{run}/plots/kl.png")  # the name is in the cache key: drawn again
    assert seen[-1] == "renamed"
    response = client.get(f"/runs/{run}/plots/kl.png")
    assert f'filename="{run}_kl.png"' in response.headers["content-disposition"]


def test_compare_plots_name_their_runs_and_ids_only_where_names_collide(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: RunStore = store_of(client)
    a = add_run(store, "narrow", epochs=2, widths=(4,))
    b = add_run(store, "wide", epochs=2, widths=(12,), seed=1)
    c = add_run(store, "wide", epochs=2, widths=(8,), seed=2)
    seen: list[Any] = []
    for name in ("plot_prior_trajectories", "plot_scale_diagnostics", "plot_width_study"):
        spy(monkeypatch, name, seen)
    for kind in ("priors", "scales", "width"):
        png(client, f"/compare/plots/{kind}.png?runs={a},{b}")
    assert seen == [["narrow", "wide"]] * 3
    seen.clear()
    png(client, f"/compare/plots/width.png?runs={a},{b},{c}")
    assert seen == [["narrow", f"wide ({b})", f"wide ({c})"]]
    # the compare page's columns follow the same rule
    assert labels([store.get_run(r) for r in (a, b, c)]) == seen[0]
