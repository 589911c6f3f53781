"""The dashboard's caches (:mod:`service.dashboard.cache`), on SQLite and PostgreSQL: which
catalog writes change which generation (a heartbeat none), pages served again until the
catalog changes and never across login states, a 304 for an unchanged page, writers in
another process seen after the time limit, the filter menus, and the runs page's batched
progress polling.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from service.analysis.synthetic import synthetic_snapshot
from service.dashboard.cache import GENERATIONS, PageCache, remembered
from service.dashboard.live import MAX_POLLED
from service.settings import Settings
from tests.service.conftest import AUTH, TOKEN, ClientFactory, TestClient
from tests.service.test_dashboard import SIZES, add_run, html_of, store_of
from trainer.errors import BnnError
from trainer.store import RunStatus


def state(run_id: str) -> tuple[int, int, Any]:
    return GENERATIONS.catalog, GENERATIONS.runs_set, GENERATIONS.run(run_id)


# ----------------------------------------------------------------------------- generations
def test_catalog_writes_bump_the_generations_they_change(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "watched", status=None)
    other = add_run(store, "other", status=None)
    catalog, runs_set, mine = state(run)
    theirs = GENERATIONS.run(other)

    store.heartbeat(run)  # shows on no page
    assert state(run) == (catalog, runs_set, mine)

    store.set_labels(run, name="renamed")
    assert GENERATIONS.catalog > catalog and GENERATIONS.run(run) != mine
    assert GENERATIONS.runs_set == runs_set and GENERATIONS.run(other) == theirs

    mine = GENERATIONS.run(run)
    store.write_epoch(run, synthetic_snapshot(0, SIZES))
    assert GENERATIONS.run(run) != mine and GENERATIONS.run(other) == theirs

    mine = GENERATIONS.run(run)
    store.set_status(run, RunStatus.COMPLETED)
    assert GENERATIONS.run(run) != mine
    mine, catalog = GENERATIONS.run(run), GENERATIONS.catalog
    with pytest.raises(BnnError):  # refused, rolled back: nothing changed
        store.set_status(run, RunStatus.RUNNING)
    assert (GENERATIONS.catalog, GENERATIONS.run(run)) == (catalog, mine)

    runs_set = GENERATIONS.runs_set
    add_run(store, "new")
    assert GENERATIONS.runs_set > runs_set
    runs_set = GENERATIONS.runs_set
    store.delete_run(other)  # a statement on rows not loaded: every run's pages
    assert GENERATIONS.runs_set > runs_set and GENERATIONS.run(run) != mine


# ----------------------------------------------------------------------------- pages
def test_a_page_is_served_again_until_its_run_changes(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "cached", epochs=2)
    other = add_run(store, "elsewhere", status=None)
    first = client.get(f"/ui/runs/{run}")
    pages: PageCache = client.app.state.dashboard_pages  # type: ignore[attr-defined]
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/html")
    hits = pages.hits
    again = client.get(f"/ui/runs/{run}")
    assert again.text == first.text and pages.hits == hits + 1
    etag = again.headers["etag"]
    unchanged = client.get(f"/ui/runs/{run}", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and not unchanged.content

    store.write_epoch(other, synthetic_snapshot(0, SIZES))  # another run: still served
    assert client.get(f"/ui/runs/{run}").text == first.text and pages.hits == hits + 3
    store.set_labels(run, name="renamed", tags=["fresh"])
    page = html_of(client, f"/ui/runs/{run}")
    assert '<span id="run-name">renamed</span>' in page and ">fresh</a>" in page
    assert "renamed" in html_of(client, "/")  # the runs page too


def test_pages_are_kept_per_login_state_and_401_pages_never(make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN, auth_reads=True)
    run = add_run(store_of(client), "private")
    assert client.get(f"/ui/runs/{run}").status_code == 401
    assert client.get(f"/ui/runs/{run}", headers=AUTH).status_code == 200
    assert client.get(f"/ui/runs/{run}").status_code == 401  # not the cached page
    assert client.get(f"/ui/runs/{run}", headers={"Authorization": "Bearer no"}).status_code == 401
    assert client.get(f"/ui/runs/{run}/progress").status_code == 401
    assert client.get("/ui/progress", params={"runs": run}).status_code == 401


def test_another_process_s_writes_show_after_the_time_limit(client: TestClient) -> None:
    """A write this process does not see (raw SQL on its own connection) shows once the
    cached page is older than its time limit."""
    store = store_of(client)
    run = add_run(store, "before")
    pages = PageCache(ttl=0.3)
    client.app.state.dashboard_pages = pages  # type: ignore[attr-defined]
    assert "before" in html_of(client, f"/ui/runs/{run}")
    settings: Settings = client.app.state.settings  # type: ignore[attr-defined]
    url = settings.database_url or f"sqlite:///{settings.data_dir / 'catalog.db'}"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE runs SET name = 'after' WHERE id = :id"), {"id": run})
    finally:
        engine.dispose()
    assert "before" in html_of(client, f"/ui/runs/{run}")  # cached: not seen yet
    time.sleep(pages.ttl + 0.05)
    assert '<span id="run-name">after</span>' in html_of(client, f"/ui/runs/{run}")


def test_filter_menus_follow_runs_created_and_deleted(client: TestClient) -> None:
    store = store_of(client)
    add_run(store, "a", dataset="regression")
    assert ">regression</option>" in html_of(client, "/")
    assert ">mnist</option>" not in html_of(client, "/")
    gone = add_run(store, "b", dataset="mnist")
    assert ">mnist</option>" in html_of(client, "/")
    store.delete_run(gone)
    assert ">mnist</option>" not in html_of(client, "/")


def test_remembered_values_expire_with_their_generation(client: TestClient) -> None:
    calls: list[int] = []
    request: Any = type("R", (), {"app": client.app})()

    def compute() -> list[int]:
        calls.append(1)
        return [len(calls)]

    assert remembered(request, "k", 1, compute) == [1]
    assert remembered(request, "k", 1, compute) == [1]  # remembered
    assert remembered(request, "k", 2, compute) == [2]  # a new generation
    assert remembered(request, "k", 2, compute, ttl=0.0) == [3]  # another time limit


# ----------------------------------------------------------------------------- polling
def test_runs_page_polls_its_active_rows_in_one_request(client: TestClient) -> None:
    store = store_of(client)
    live = add_run(store, "live", planned=3, status=None)
    done = add_run(store, "done", epochs=1)
    page = html_of(client, "/")
    assert 'id="runs-table" data-progress-url="/ui/progress"' in page
    assert f'data-progress-url="/ui/runs/{live}/progress"' in page  # the rows polled
    assert f'data-progress-url="/ui/runs/{done}/progress"' not in page

    def poll(runs: str) -> list[dict[str, Any]]:
        response = client.get("/ui/progress", params={"runs": runs})
        assert response.status_code == 200, response.text
        return list(response.json()["runs"])

    answer = poll(f"{live},ghost,{done},{live}")  # unknown runs left out, each run once
    assert [(p["run_id"], p["epochs_done"], p["active"]) for p in answer] == [
        (live, 0, True),
        (done, 1, False),
    ]
    store.write_epoch(live, synthetic_snapshot(0, SIZES))
    assert poll(live)[0]["epochs_done"] == 1 and poll(live)[0]["last_epoch"] == 0
    store.set_status(live, RunStatus.COMPLETED)
    assert poll(live)[0]["status"] == "completed"
    assert poll("") == []
    assert client.get("/ui/progress").json() == {"runs": []}


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"runs": "a b"}, "runs"),
        ({"runs": ",".join(f"r{i}" for i in range(MAX_POLLED + 1))}, f"at most {MAX_POLLED}"),
        ({"runs": "a", "other": "1"}, "unknown query parameter"),
    ],
)
def test_batched_progress_refuses_bad_queries(
    client: TestClient, query: dict[str, str], named: str
) -> None:
    response = client.get("/ui/progress", params=query)
    assert response.status_code == 422, response.text
    assert named in response.json()["error"]["message"]
