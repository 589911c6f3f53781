"""Warm analysis tables answered before routing (``service.routers._results.WarmTables``).

A table URL answered once is answered again by the middleware, with the same bytes and
headers, only while the token check passes, the run's epochs are unchanged and the body
is cached; everything else (a new epoch, a deleted run, a missing token, a bad query, an
evicted body) takes the normal path with its normal answer.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from service.analysis.synthetic import synthetic_snapshot
from service.app import create_app
from service.deps import get_jobs
from service.routers._results import QUIET_NS, WarmTables
from service.settings import Settings
from tests.service.conftest import AUTH, TOKEN, FakeJobs
from trainer.store import RunStatus, RunStore

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

SIZES = (6, 5, 2)
QUIET_S = QUIET_NS / 1e9 + 0.05  # the epoch index remembers a run folder quiet this long


@dataclass
class App:
    app: FastAPI
    client: TestClient
    store: RunStore
    run: str

    @property
    def warm(self) -> WarmTables:
        layer: Any = self.app.middleware_stack
        while not isinstance(layer, WarmTables):
            layer = layer.app
        return layer

    def write(self, epoch: int) -> None:
        self.store.write_epoch(
            self.run, synthetic_snapshot(epoch, SIZES, seed=epoch, grad_level="element")
        )
        time.sleep(QUIET_S)


def _app(tmp_path: Path, **settings: Any) -> Iterator[App]:
    app = create_app(Settings(data_dir=tmp_path / "data", **settings))
    jobs = FakeJobs()
    app.dependency_overrides[get_jobs] = lambda: jobs
    with TestClient(app) as client:
        store: RunStore = app.state.store
        run = store.create_run("warm", {"dataset": "synthetic"}).id
        out = App(app, client, store, run)
        out.write(0)
        out.write(1)
        yield out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[App]:
    yield from _app(tmp_path)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[App]:
    yield from _app(tmp_path, api_token=TOKEN, auth_reads=True)


@pytest.mark.parametrize("query", ["?epoch=0", "?epoch=1&format=csv", "", "?epochs=0,1"], ids=str)
def test_a_repeated_table_is_answered_before_routing_with_the_same_response(
    served: App, query: str
) -> None:
    path = "kl/trajectory" if "epochs" in query else "kl"
    url = f"/runs/{served.run}/{path}{query}"
    first = served.client.get(url)
    assert first.status_code == 200, first.text
    assert served.warm.served == 0
    second = served.client.get(url)
    assert served.warm.served == 1
    assert second.status_code == 200
    assert second.content == first.content
    assert list(second.headers.items()) == list(first.headers.items())
    not_modified = served.client.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert served.warm.served == 2
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == first.headers["etag"]
    other = served.client.get(url, headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200 and other.content == first.content


def test_a_new_epoch_changes_the_latest_table(served: App) -> None:
    url = f"/runs/{served.run}/stats"
    assert served.client.get(url).json()["epoch"] == 1
    assert served.client.get(url).json()["epoch"] == 1
    assert served.warm.served == 1
    served.write(2)
    assert served.client.get(url).json()["epoch"] == 2  # the normal path, remembered again
    assert served.warm.served == 1
    assert served.client.get(url).json()["epoch"] == 2
    assert served.warm.served == 2


def test_a_deleted_run_is_a_404(served: App) -> None:
    url = f"/runs/{served.run}/kl?epoch=1"
    served.store.set_status(served.run, RunStatus.COMPLETED)
    time.sleep(QUIET_S)
    for _ in range(2):
        assert served.client.get(url).status_code == 200
    assert served.warm.served == 1
    assert served.client.delete(f"/runs/{served.run}").status_code == 204
    response = served.client.get(url)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"
    assert served.warm.served == 1


def test_an_evicted_body_is_computed_again(served: App) -> None:
    url = f"/runs/{served.run}/gradients/outliers?k=3"
    first = served.client.get(url)
    assert first.status_code == 200, first.text
    served.app.state.analysis_cache.clear()
    again = served.client.get(url)
    assert served.warm.served == 0
    assert again.status_code == 200 and again.content == first.content


def test_bad_queries_and_other_methods_are_never_answered_early(served: App) -> None:
    for _ in range(2):
        response = served.client.get(f"/runs/{served.run}/kl?epoch=-1")
        assert response.status_code == 422
        assert "epoch" in response.json()["error"]["message"]
        missing = served.client.get(f"/runs/{served.run}/kl?epoch=7")
        assert missing.status_code == 404
        assert missing.json()["error"]["details"]["epochs"] == [0, 1]
    url = f"/runs/{served.run}/kl?epoch=0"
    served.client.get(url)
    assert served.client.head(url).status_code == 405  # HEAD goes the normal way
    assert served.client.post(url).status_code == 405
    assert served.warm.served == 0


def test_reads_that_need_the_token_still_need_it(guarded: App) -> None:
    url = f"/runs/{guarded.run}/kl?epoch=1"
    first = guarded.client.get(url, headers=AUTH)
    assert first.status_code == 200
    assert guarded.client.get(url, headers=AUTH).content == first.content
    assert guarded.warm.served == 1
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "bnn_session=1.ab"}):
        refused = guarded.client.get(url, headers=headers)
        assert refused.status_code == 401, headers
        assert refused.json()["error"]["code"] == "unauthenticated"
    assert guarded.warm.served == 1


def test_the_remembered_urls_are_bounded(served: App) -> None:
    served.warm.max_urls = 3
    for k in range(1, 6):
        served.client.get(f"/runs/{served.run}/gradients/outliers?k={k}")
    assert len(served.warm._urls) <= 3
    long_query = "&".join(["epochs=0,1"] * 300)  # longer than MAX_WARM_URL: never remembered
    for _ in range(2):
        served.client.get(f"/runs/{served.run}/priors?{long_query}")
    assert served.warm.served == 0
