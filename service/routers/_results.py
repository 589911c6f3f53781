"""What the analysis routers share: a run's captured epochs, cached rendered results, tables.

Results are cached per (endpoint, run, epoch, query) as the bytes of the response. Keys
name each epoch by its file's sha256 (from the catalog): a committed epoch never changes,
and a run deleted and created again under the same id has other files, so other keys.
Results over all epochs are keyed by every (epoch, sha256) of the run, so a new epoch
makes new keys. A repeated request costs a stat of the run's folder and two dictionary
look-ups on the event loop: no threadpool hop, no catalog query (see :class:`EpochIndex`).

Computations run in the threadpool, at most one per CPU at a time (more only queue for
the same cores), and one per key: concurrent requests for the same result wait for the
first.

A table of one run answered once is answered again before routing (:class:`WarmTables`,
an ASGI middleware): the URL is remembered with the run's epochs it was resolved against
and its cache key; the next request for the same URL whose token check passes, whose
run's epochs are unchanged (the :class:`EpochIndex`) and whose body is still cached gets
the same bytes without FastAPI's routing, parameter validation and dependencies (which
cost more than half of the server's time per warm request). Anything else takes the
normal path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import pandas as pd
from fastapi import Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.deps import require_token
from service.routers import Format, csv_response, json_response
from trainer.errors import BnnError
from trainer.store import RunReader, RunStore

__all__ = [
    "MAX_CACHE_BYTES",
    "AppStoreDep",
    "EpochIndex",
    "Rendered",
    "ResultCache",
    "RunEpochs",
    "RunEpochsDep",
    "WarmTables",
    "authorized",
    "cached_bytes",
    "cached_table",
    "frame_rows",
    "load_epochs",
    "open_reader",
    "remember_url",
    "render",
    "result_cache",
    "run_epochs",
]

MAX_CACHE_BYTES = 256 * 2**20
RawHeaders = list[tuple[bytes, bytes]]
QUIET_NS = 100_000_000  # a run folder unchanged this long (ns) can be remembered by its stat


@dataclass(frozen=True)
class Rendered:
    """A finished response body: served again as is, with an ETag."""

    body: bytes
    media_type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    etag: str = ""
    # raw headers of the 200 and the 304 (made on the first :meth:`send`)
    _raw: tuple[RawHeaders, RawHeaders] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        digest = hashlib.blake2b(self.body, digest_size=12).hexdigest()
        object.__setattr__(self, "etag", f'"{digest}"')

    def response(
        self, request: Request | None = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        """The response (304 when the request's If-None-Match is this body's ETag)."""
        headers = {**self.headers, **(headers or {}), "ETag": self.etag}
        if request is not None and request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)

    async def send(self, scope: Scope, send: Send) -> None:
        """Sends what :meth:`response` (without extra headers) would, for the request of
        ``scope``; the raw headers are made once."""
        raw = self._raw
        if raw is None:
            headers = {**self.headers, "ETag": self.etag}
            ok = Response(self.body, media_type=self.media_type, headers=headers)
            raw = (ok.raw_headers, Response(status_code=304, headers=headers).raw_headers)
            object.__setattr__(self, "_raw", raw)
        given = next((v for k, v in scope["headers"] if k == b"if-none-match"), None)
        fresh = given == self.etag.encode("latin-1")
        await send({"type": "http.response.start", "status": 304 if fresh else 200,
                    "headers": raw[1] if fresh else raw[0]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"" if fresh else self.body})


class ResultCache:
    """A thread-safe LRU bounded by the bytes it holds; one computation per key at a time."""

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES, workers: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, threading.Lock] = {}
        self._compute = threading.BoundedSemaphore(workers or os.cpu_count() or 1)
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def get_or_compute(
        self, key: Hashable, compute: Callable[[], tuple[Any, int]], heavy: bool = True
    ) -> Any:
        """The cached value, or ``compute()`` -> (value, size in bytes) run once and stored.

        ``heavy`` computations wait for one of the per-CPU slots; light ones (rendering a
        cached table) do not, and may call heavy ones.
        """
        hit = self.get(key)
        if hit is not None:
            return hit
        with self._lock:
            gate = self._inflight.setdefault(key, threading.Lock())
        with gate:  # requests for the same key wait for the first one
            hit = self.get(key)
            if hit is not None:
                return hit
            try:
                with self._compute if heavy else contextlib.nullcontext():
                    value, size = compute()
                self.put(key, value, size)
                with self._lock:
                    self.misses += 1
                return value
            finally:
                with self._lock:
                    self._inflight.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self._bytes, "hits": self.hits,
                    "misses": self.misses, "max_bytes": self.max_bytes}  # fmt: skip


_init_lock = threading.Lock()


def result_cache(request: Request) -> ResultCache:
    """The app's cache of rendered analysis results (made on first use)."""
    cache: ResultCache = app_state(request, "analysis_cache", ResultCache)
    return cache


# ----------------------------------------------------------------------------- epochs
@dataclass(frozen=True)
class RunEpochs:
    """A run's committed epochs and their files' sha256, from one catalog query."""

    run_id: str
    checksums: dict[int, str]

    @property
    def epochs(self) -> list[int]:
        return list(self.checksums)

    def resolve(self, epoch: int | None) -> int:
        """``epoch``, or the latest when None; NOT_FOUND listing the captured epochs."""
        if not self.checksums:
            raise BnnError.not_found(
                f"run {self.run_id!r} has no captured epochs yet", run_id=self.run_id, epochs=[]
            )
        if epoch is None:
            return max(self.checksums)
        if epoch not in self.checksums:
            raise BnnError.not_found(
                f"run {self.run_id!r} has no epoch {epoch}; captured epochs: {self.epochs}",
                run_id=self.run_id,
                epoch=epoch,
                epochs=self.epochs,
            )
        return epoch

    def resolve_all(self, epochs: Sequence[int] | None) -> list[int]:
        """Every captured epoch when None, else each one checked."""
        if epochs is None:
            self.resolve(None)  # NOT_FOUND without epochs
            return self.epochs
        return list(dict.fromkeys(self.resolve(e) for e in epochs))

    def key(self, epochs: int | Sequence[int] | None = None) -> tuple[Any, ...]:
        """What identifies the content of ``epochs`` (one, several or all of them)."""
        chosen = self.epochs if epochs is None else [epochs] if isinstance(epochs, int) else epochs
        return (self.run_id, tuple((e, self.checksums[e]) for e in chosen))


class EpochIndex:
    """Each run's :class:`RunEpochs`, remembered for at most ``ttl`` seconds and only while
    the run's folder is unchanged (a stat: inode, mtime, ctime).

    Deleting a run removes its folder, and every epoch file is renamed into it, so both
    are seen at once; ``ttl`` bounds the one window a stat cannot see (the catalog row of
    an epoch is committed just after its file is renamed in place). Under load this
    replaces a catalog query per request by a stat.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._items: dict[str, tuple[float, tuple[int, ...], RunEpochs]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _signature(store: RunStore, run_id: str) -> tuple[int, ...] | None:
        try:
            st = os.stat(store.run_dir(run_id))
        except (BnnError, OSError, ValueError):
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def get(self, store: RunStore, run_id: str) -> RunEpochs | None:
        """The remembered epochs if still valid (no catalog query), else None."""
        with self._lock:
            item = self._items.get(run_id)
        if item is None or time.monotonic() - item[0] > self.ttl:
            return None
        return item[2] if self._signature(store, run_id) == item[1] else None

    def load(self, store: RunStore, run_id: str) -> RunEpochs:
        """From the catalog (NOT_FOUND naming an unknown run), remembered for later."""
        signature = self._signature(store, run_id)  # before the query: a change after it shows
        found = RunEpochs(run_id, {e.epoch: e.checksum for e in store.list_epochs(run_id)})
        # A folder changed in the last moments may change again within the file system's
        # timestamp granularity (milliseconds) without its stat showing it: not remembered.
        if signature is not None and time.time_ns() - max(signature[1:]) > QUIET_NS:
            with self._lock:
                if len(self._items) > 10_000:
                    self._items.clear()
                self._items[run_id] = (time.monotonic(), signature, found)
        return found


def app_state(request: Request, name: str, make: Callable[[], Any]) -> Any:
    """``request.app.state.<name>``, made once by ``make`` (thread-safe) on first use."""
    state = request.app.state
    value = getattr(state, name, None)
    if value is None:
        with _init_lock:
            value = getattr(state, name, None)
            if value is None:
                value = make()
                setattr(state, name, value)
    return value


async def run_epochs(request: Request, run_id: str) -> RunEpochs:
    """A run's epochs: from the :class:`EpochIndex`, else one catalog query (threadpool)."""
    index: EpochIndex = app_state(request, "epoch_index", EpochIndex)
    store: RunStore = request.app.state.store
    found = index.get(store, run_id)
    return found if found is not None else await run_in_threadpool(index.load, store, run_id)


async def load_epochs(
    request: Request, run_id: Annotated[str, Path(description="a run id")]
) -> RunEpochs:
    """The run's epochs (NOT_FOUND naming an unknown run)."""
    return await run_epochs(request, run_id)


RunEpochsDep = Annotated[RunEpochs, Depends(load_epochs)]


async def app_store(request: Request) -> RunStore:
    """The open store (``deps.get_store`` without a threadpool hop: it does no I/O)."""
    store: RunStore = request.app.state.store
    return store


AppStoreDep = Annotated[RunStore, Depends(app_store)]


async def authorized(request: Request) -> None:
    """``deps.require_token`` on the app's settings, without the threadpool hops of its sync
    dependencies (it does no I/O)."""
    require_token(request, request.app.state.settings)


# ----------------------------------------------------------------------------- warm tables
WARM_SCOPE_KEY = "bnn.warm_tables"  # the scope's (WarmTables, URL key), for cached_table
MAX_WARM_URL = 2048  # longer URLs (long epoch lists) always take the normal path


class WarmTables:
    """ASGI middleware: a table of one run answered before is answered again without
    routing, parameter validation or dependencies (see the module docstring).

    Per URL (root path, path, raw query string) it remembers the :class:`RunEpochs` the
    table was resolved against and the cache key of its body (:func:`cached_table`
    records them). A GET of such a URL is answered here only when the token check of
    :func:`authorized` passes, the run's epochs from the :class:`EpochIndex` equal the
    remembered ones (same run folder, same committed files: a new epoch, a deleted run or
    the index's 1 s expiry all send it the normal way, which records it again) and the
    :class:`ResultCache` still holds the body; the answer is what the route would send
    (the same bytes and headers, 304 for a matching If-None-Match). The same raw query
    string parses to the same parameters, so what was valid once is valid again.
    """

    def __init__(self, app: ASGIApp, max_urls: int = 10_000) -> None:
        self.app = app
        self.max_urls = max_urls
        self._urls: dict[tuple[str, str, bytes], tuple[RunEpochs, Hashable]] = {}
        self.served = 0  # requests answered here (for tests and benchmarks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            key = (scope.get("root_path", ""), scope["path"], scope["query_string"])
            entry = self._urls.get(key)
            if entry is not None and await self._serve(scope, send, *entry):
                return
            if len(key[1]) + len(key[2]) <= MAX_WARM_URL:
                scope[WARM_SCOPE_KEY] = (self, key)
        await self.app(scope, receive, send)

    def remember(self, key: tuple[str, str, bytes], run: RunEpochs, body_key: Hashable) -> None:
        if len(self._urls) >= self.max_urls:
            self._urls.clear()
        self._urls[key] = (run, body_key)

    async def _serve(self, scope: Scope, send: Send, run: RunEpochs, body_key: Hashable) -> bool:
        state = scope["app"].state
        settings = state.settings
        if settings.token is not None and settings.auth_reads:
            try:
                require_token(Request(scope), settings)
            except HTTPException:
                return False  # the normal path answers 401
        index: EpochIndex | None = getattr(state, "epoch_index", None)
        cache: ResultCache | None = getattr(state, "analysis_cache", None)
        if index is None or cache is None or index.get(state.store, run.run_id) != run:
            return False
        out: Rendered | None = cache.get(body_key)
        if out is None:
            return False
        self.served += 1
        await out.send(scope, send)
        return True


def remember_url(request: Request, run: RunEpochs, body_key: Hashable) -> None:
    """Let :class:`WarmTables` answer this request's URL from now on (when installed)."""
    found = request.scope.get(WARM_SCOPE_KEY)
    if found is not None:
        warm, key = found
        warm.remember(key, run, body_key)


@contextlib.contextmanager
def open_reader(store: RunStore, run_id: str) -> Iterator[RunReader]:
    """A :class:`RunReader` on the service's open store (the store stays open)."""
    reader = RunReader(run_id, store=store)
    try:
        yield reader
    finally:
        reader.close()


# ----------------------------------------------------------------------------- tables
def frame_rows(frame: pd.DataFrame) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns (index names first) and one dict per row of a DataFrame."""
    flat = frame.reset_index() if any(n is not None for n in frame.index.names) else frame
    columns = [str(c) for c in flat.columns]
    rows = [dict(zip(columns, values, strict=True)) for values in flat.itertuples(index=False)]
    return columns, rows


def render(
    fmt: Format,
    meta: Mapping[str, Any],
    tables: Mapping[str, pd.DataFrame],
    filename: str,
    csv_table: str | None = None,
) -> Rendered:
    """JSON ``{**meta, name: {"columns", "rows"}}``, or one table as CSV. A NaN cell is a
    value that does not exist (a layer without bias has no bias KL): null in JSON, an empty
    cell in CSV; infinite values are "inf"/"-inf" in both."""
    if fmt is Format.CSV:
        name = csv_table or next(iter(tables))
        columns, rows = frame_rows(tables[name])
        response = csv_response(rows, columns, filename, nan="")
    else:
        payload = dict(meta)
        for name, frame in tables.items():
            columns, rows = frame_rows(frame)
            payload[name] = {"columns": columns, "rows": rows}
        response = json_response(payload, nan=None)
    headers = {k: v for k, v in response.headers.items() if k == "content-disposition"}
    return Rendered(bytes(response.body), response.media_type or "", headers)


async def cached_table(
    request: Request,
    key: Hashable,
    fmt: Format,
    compute: Callable[[], tuple[Mapping[str, Any], Mapping[str, pd.DataFrame]]],
    filename: str,
    csv_table: str | None = None,
    run: RunEpochs | None = None,
) -> Response:
    """The table response for ``key``: computed once (threadpool), rendered once per format;
    a cached body is answered on the event loop.

    ``run``: the table depends on the request's URL and this run's epochs only (nothing
    else read per request), so :class:`WarmTables` may answer the URL again.
    """
    cache = result_cache(request)
    body_key = ("body", key, fmt.value, csv_table)
    out: Rendered | None = cache.get(body_key)
    if out is None:
        out = await run_in_threadpool(
            _table, cache, key, body_key, fmt, compute, filename, csv_table
        )
    if run is not None:
        remember_url(request, run, body_key)
    return out.response(request)


def _table(
    cache: ResultCache,
    key: Hashable,
    body_key: Hashable,
    fmt: Format,
    compute: Callable[[], tuple[Mapping[str, Any], Mapping[str, pd.DataFrame]]],
    filename: str,
    csv_table: str | None,
) -> Rendered:
    def frames() -> tuple[Any, int]:
        meta, tables = compute()
        size = sum(int(t.memory_usage(index=True, deep=True).sum()) for t in tables.values())
        return (meta, tables), size

    def rendered() -> tuple[Rendered, int]:
        meta, tables = cache.get_or_compute(("frames", key), frames)
        out = render(fmt, meta, tables, filename, csv_table)
        return out, len(out.body)

    out: Rendered = cache.get_or_compute(body_key, rendered, heavy=False)
    return out


async def cached_bytes(
    request: Request, key: Hashable, compute: Callable[[], Rendered]
) -> Rendered:
    """A rendered result (e.g. a PNG) for ``key``: computed once in the threadpool."""
    cache = result_cache(request)
    hit: Rendered | None = cache.get(key)
    if hit is not None:
        return hit

    def run() -> tuple[Rendered, int]:
        value = compute()
        return value, len(value.body)

    out: Rendered = await run_in_threadpool(cache.get_or_compute, key, run)
    return out
