"""A bounded, thread-safe LRU for results derived from immutable stored epochs."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["cached", "clear_cache", "peek", "store"]

T = TypeVar("T")
_MAX_ENTRIES = 16384
_cache: OrderedDict[Hashable, Any] = OrderedDict()
_lock = threading.Lock()
_MISSING = object()


def clear_cache() -> None:
    """Forget every cached summary (e.g. after deleting runs)."""
    with _lock:
        _cache.clear()


def peek(key: Hashable | None) -> Any:
    """The cached value or None."""
    if key is None:
        return None
    with _lock:
        value = _cache.get(key, _MISSING)
        if value is _MISSING:
            return None
        _cache.move_to_end(key)
        return value


def cached(key: Hashable | None, compute: Callable[[], T]) -> T:
    """``compute()`` memoised under ``key`` (never cached when ``key`` is None).

    Keys must identify immutable content (a stored run's id, creation time and epoch).
    """
    if key is None:
        return compute()
    hit = peek(key)
    if hit is not None:
        return hit
    value = compute()
    store(key, value)
    return value


def store(key: Hashable | None, value: Any) -> None:
    """Remember ``value`` under ``key`` (nothing when ``key`` is None)."""
    if key is None:
        return
    with _lock:
        _cache[key] = value
        _cache.move_to_end(key)
        while len(_cache) > _MAX_ENTRIES:
            _cache.popitem(last=False)
