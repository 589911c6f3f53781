"""Plain records the store hands out (never ORM rows), run statuses, and the JSON codec.

JSON columns cannot hold NaN/Inf on PostgreSQL, so non-finite floats in metrics, config
and summary are stored as the strings ``"nan"``, ``"inf"``, ``"-inf"`` and decoded back
(a config *string* equal to one of those also comes back as a float).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any

import numpy as np

from trainer.errors import BnnError

__all__ = [
    "TRANSITIONS",
    "EpochInfo",
    "RunInfo",
    "RunStatus",
    "check_tags",
    "decode_json",
    "encode_json",
    "stale_after_default",
    "utcnow",
]


class RunStatus(StrEnum):
    """Life cycle of a run. COMPLETED, FAILED, CANCELLED and DIVERGED are terminal.

    DIVERGED: training stopped because its loss or gradients became non-finite (where it
    happened is in :attr:`RunInfo.diverged_step` and the fields after it).

    INTERRUPTED means "presumed dead" (no heartbeat); the run's own trainer may still
    report back (heartbeat or a new status), since a missed heartbeat is only a guess.
    """

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    DIVERGED = "diverged"

    @classmethod
    def parse(cls, value: RunStatus | str) -> RunStatus:
        """``value`` as a status; INVALID_ARGUMENT naming it and the choices if unknown."""
        try:
            return cls(value)
        except ValueError:
            choices = [s.value for s in cls]
            raise BnnError.invalid(f"unknown run status {value!r}; one of {choices}") from None

    @property
    def terminal(self) -> bool:
        return self in (
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
            RunStatus.DIVERGED,
        )

    @property
    def active(self) -> bool:
        return self in (RunStatus.QUEUED, RunStatus.RUNNING)


# Allowed status changes (setting the current status again is always a no-op).
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset(
        {RunStatus.RUNNING, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.INTERRUPTED}
    ),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
            RunStatus.INTERRUPTED,
            RunStatus.DIVERGED,
        }
    ),
    RunStatus.INTERRUPTED: frozenset(
        {
            RunStatus.RUNNING,
            RunStatus.COMPLETED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
            RunStatus.DIVERGED,
        }
    ),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
    RunStatus.DIVERGED: frozenset(),
}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True)
class RunInfo:
    """One run as the catalog knows it. Times are timezone-aware UTC.

    ``diverged_step`` (global 0-based training step), ``diverged_epoch`` and
    ``diverged_layer`` (the first parameter with a non-finite gradient, None when only the
    loss was) say where the run first became non-finite; None when it never did. A run
    trained with ``on_divergence="continue"`` has them and may still be COMPLETED.
    """

    id: str
    name: str
    status: RunStatus
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    heartbeat_at: datetime | None
    finished_at: datetime | None
    host: str
    error: str | None
    tags: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    diverged_step: int | None = None
    diverged_epoch: int | None = None
    diverged_layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values: status as its string, times as ISO 8601 strings."""
        out = asdict(self)
        out["status"] = self.status.value
        for key in ("created_at", "updated_at", "heartbeat_at", "finished_at"):
            out[key] = _iso(getattr(self, key))
        return out


@dataclass(frozen=True)
class EpochInfo:
    """One committed epoch: its metrics and its file (relative to the data dir)."""

    run_id: str
    epoch: int
    metrics: dict[str, float]
    file: str
    size: int
    checksum: str  # sha256 hex of the file's bytes
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["created_at"] = _iso(self.created_at)
        return out


# ----------------------------------------------------------------------------- JSON codec
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_json(value: Any, where: str = "value") -> Any:
    """JSON-safe copy: non-finite floats become "nan"/"inf"/"-inf", numpy scalars plain numbers.

    Raises INVALID_ARGUMENT naming ``where`` for values JSON cannot hold.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise BnnError.invalid(f"{where} has a non-string key {key!r}")
            out[key] = encode_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [encode_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Enum):
        return encode_json(value.value, where)
    raise BnnError.invalid(f"{where} is not JSON-serialisable: {value!r} ({type(value).__name__})")


def decode_json(value: Any) -> Any:
    """Inverse of :func:`encode_json` ("nan"/"inf"/"-inf" strings become floats)."""
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {key: decode_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_json(item) for item in value]
    return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def stale_after_default() -> float:
    """``$BNN_STALE_AFTER_S`` or 60 seconds."""
    raw = os.environ.get("BNN_STALE_AFTER_S", "60")
    try:
        return float(raw)
    except ValueError:
        raise BnnError.invalid(
            f"BNN_STALE_AFTER_S must be a number of seconds, got {raw!r}"
        ) from None


def check_tags(tags: Iterable[str]) -> list[str]:
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise BnnError.invalid(f"tags must be a list of strings, got {tags!r}")
    return list(tags)
