"""What runs are called in pages and plots: the name the user gave, with the id only where
two runs of one view share a name (:func:`run_labels`).

The plot routes label by name without a catalog query per request: :func:`run_names`
remembers each run's name for :data:`NAMES_TTL_S` seconds (like the epoch index of
``service.routers._results``), so a renamed run's plots carry the new name a second later
(the name is part of their cache key).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from service.analysis.source import ReaderSource
from trainer.store import RunReader, RunStore

__all__ = ["NAMES_TTL_S", "named_source", "run_labels", "run_names"]

NAMES_TTL_S = 1.0


def run_labels(ids: Sequence[str], names: Sequence[str]) -> list[str]:
    """``names``, each one that collides with another as ``name (id)``."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [
        name if counts[name] == 1 else f"{name} ({run_id})"
        for run_id, name in zip(ids, names, strict=True)
    ]


class _Names:
    def __init__(self) -> None:
        self._items: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def get(self, run_id: str) -> str | None:
        with self._lock:
            item = self._items.get(run_id)
        return item[1] if item is not None and time.monotonic() - item[0] <= NAMES_TTL_S else None

    def load(self, store: RunStore, run_ids: Sequence[str]) -> dict[str, str]:
        found = {run_id: store.get_run(run_id).name for run_id in run_ids}  # 404 unknown
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            now = time.monotonic()
            self._items.update({run_id: (now, name) for run_id, name in found.items()})
        return found


_init = threading.Lock()


async def run_names(request: Request, store: RunStore, run_ids: Sequence[str]) -> list[str]:
    """The name of each run (NOT_FOUND naming an unknown one): remembered, else one catalog
    query per run in the threadpool."""
    state = request.app.state
    names: _Names | None = getattr(state, "run_names", None)
    if names is None:
        with _init:
            names = getattr(state, "run_names", None) or _Names()
            state.run_names = names
    found = {r: name for r in run_ids if (name := names.get(r)) is not None}
    missing = [r for r in run_ids if r not in found]
    if missing:
        found |= await run_in_threadpool(names.load, store, missing)
    return [found[r] for r in run_ids]


def named_source(reader: RunReader, label: str) -> ReaderSource:
    """``reader`` as an analysis source whose plots and messages call it ``label``."""
    source = ReaderSource(reader)
    source.name = label
    return source
