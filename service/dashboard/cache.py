"""What keeps the dashboard's pages cheap: generations of the catalog, and rendered pages
and small query results remembered per generation.

A page is a function of the catalog rows it shows (epoch files never change once
committed), of its URL and of the visitor's login state. Every commit of this process that
changes the catalog bumps :data:`GENERATIONS`: the whole catalog's count, the count of the
run whose rows changed (its run row, its epoch rows), and, when runs are created or
deleted, the count of the set of runs. A heartbeat alone (``heartbeat_at``) shows on no
page and bumps nothing. The bump comes after the commit, so a page rendered from the rows
before it is stored under the old generation and never served again.

Writers in other processes (another service on the same PostgreSQL catalog, a trainer
writing to the same directory) are not seen: what is remembered is also dropped after
:data:`PAGE_TTL_S` seconds (pages, progress) or :data:`VALUES_TTL_S` (the filter menus),
which also bounds how late a stale run is reaped (the catalog does that as pages query it).

    page = await serve_page(request, lambda: GENERATIONS.run(run_id), make)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import event, inspect
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction

from service.dashboard._common import auth_state, guarded, root_of
from service.deps import require_token
from service.routers._results import Rendered, app_state
from trainer.store.catalog import EpochRow, RunRow

__all__ = [
    "GENERATIONS",
    "PAGE_TTL_S",
    "VALUES_TTL_S",
    "Generations",
    "PageCache",
    "memo",
    "remembered",
    "serve_page",
]

PAGE_TTL_S = 2.0
VALUES_TTL_S = 10.0
MAX_PAGE_BYTES = 32 * 2**20


# ----------------------------------------------------------------------------- generations
@dataclass
class _Changes:
    """What one session's flushes changed, until it commits."""

    runs_set: bool = False  # runs created or deleted
    runs: set[str] = field(default_factory=set)  # ids of runs whose rows changed
    unknown: bool = False  # a bulk statement: which rows is not known


class Generations:
    """Counters bumped after each commit that changes the catalog (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.catalog = 0  # any change
        self.runs_set = 0  # runs created or deleted
        self._unknown = 0  # bulk statements (they may touch any run)
        self._per_run: dict[str, int] = {}

    def run(self, run_id: str) -> tuple[int, int]:
        """What changes when the rows of run ``run_id`` change."""
        return (self._unknown, self._per_run.get(run_id, 0))

    def runs(self, run_ids: tuple[str, ...]) -> tuple[Any, ...]:
        return (self._unknown, *(self._per_run.get(r, 0) for r in run_ids))

    def bump(self, changes: _Changes) -> None:
        with self._lock:
            self.catalog += 1
            self.runs_set += changes.runs_set or changes.unknown
            self._unknown += changes.unknown
            for run_id in changes.runs:
                self._per_run[run_id] = self._per_run.get(run_id, 0) + 1


GENERATIONS = Generations()
_KEY = "bnn_dashboard_changes"  # in Session.info


def _changes(session: Session) -> _Changes:
    found: _Changes = session.info.setdefault(_KEY, _Changes())
    return found


def _changed_keys(obj: Any) -> set[str]:
    return {a.key for a in inspect(obj).attrs if a.history.has_changes()}


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, context: UOWTransaction) -> None:
    # new/dirty/deleted still hold what this flush wrote
    for obj, membership in [
        *((o, True) for o in session.new),
        *((o, True) for o in session.deleted),
        *((o, False) for o in session.dirty),
    ]:
        if not membership and not (_changed_keys(obj) - {"heartbeat_at"}):
            continue  # a heartbeat, or nothing really changed
        changes = _changes(session)
        if isinstance(obj, RunRow):
            changes.runs.add(obj.id)
            changes.runs_set |= membership
        elif isinstance(obj, EpochRow):
            changes.runs.add(obj.run_id)


@event.listens_for(Session, "do_orm_execute")
def _bulk(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        _changes(state.session).unknown = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    changes = session.info.pop(_KEY, None)
    if changes is not None:
        GENERATIONS.bump(changes)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_KEY, None)


# ----------------------------------------------------------------------------- caches
class _Memo:
    """A small thread-safe LRU of values, each valid for its generation and ``ttl`` seconds."""

    def __init__(self, ttl: float, max_entries: int, max_bytes: int | None = None) -> None:
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self._items: OrderedDict[Hashable, tuple[Hashable, float, Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable, generation: Hashable) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != generation or time.monotonic() - item[1] > self.ttl:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[2]

    def put(self, key: Hashable, generation: Hashable, value: Any, size: int = 0) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= old[3] if old else 0
            self._items[key] = (generation, time.monotonic(), value, size)
            self._bytes += size
            while len(self._items) > self.max_entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, (_, _, _, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


class PageCache(_Memo):
    """Rendered pages (:class:`~service.routers._results.Rendered`) by URL and login state."""

    def __init__(self, ttl: float = PAGE_TTL_S) -> None:
        super().__init__(ttl, max_entries=1000, max_bytes=MAX_PAGE_BYTES)


def memo(request: Request, ttl: float = VALUES_TTL_S) -> _Memo:
    """The app's remembered small values (filter menus, progress) kept ``ttl`` seconds."""
    found: _Memo = app_state(request, f"dashboard_memo_{ttl:g}", lambda: _Memo(ttl, 10_000))
    return found


def remembered(
    request: Request,
    key: Hashable,
    generation: Hashable,
    compute: Callable[[], Any],
    ttl: float = VALUES_TTL_S,
) -> Any:
    """``compute()`` remembered under ``key`` while ``generation`` holds, ``ttl`` seconds at
    most. ``generation`` is read by the caller before: a change while computing is seen."""
    values = memo(request, ttl)
    value = values.get(key, generation)
    if value is None:
        value = compute()
        values.put(key, generation, value)
    return value


async def serve_page(
    request: Request, generation: Callable[[], Hashable], make: Callable[[], Response]
) -> Response:
    """The page for this URL and login state from the cache when ``generation()`` has not
    changed since it was made (on the event loop: no thread, no query); else ``make()``
    in the threadpool, through :func:`guarded`, kept when it is a 200. With an ETag: a
    reload of an unchanged page is a 304."""
    try:
        require_token(request, request.app.state.settings)
    except HTTPException:  # the 401 page, never cached
        return await run_in_threadpool(guarded, request, make)
    cache: PageCache = app_state(request, "dashboard_pages", PageCache)
    auth = auth_state(request)
    key = (request.url.path, request.url.query, root_of(request), auth["on"], auth["logged_in"])
    now = generation()  # before making the page: a change while it is made is a new one
    page: Rendered | None = cache.get(key, now)
    if page is None:
        response = await run_in_threadpool(guarded, request, make)
        if response.status_code != 200:
            return response
        page = Rendered(bytes(response.body), "text/html")
        cache.put(key, now, page, len(page.body))
    return page.response(request)
