"""Sweeps in the catalog: a named group of runs (a width or optimiser study).

Tables ``sweeps`` (kind, name, the JSON spec that generated it, a summary) and
``sweep_runs`` (sweep id, run id, label, position), added by migration ``0002``. A run
deleted from the catalog leaves its sweep (ON DELETE CASCADE on the link); a deleted
sweep leaves its runs. :class:`SweepCatalog` is mixed into
:class:`~trainer.store.RunStore`; callers get :class:`SweepInfo`, never ORM rows.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from trainer.errors import BnnError, ErrorCode

from . import _paths as paths
from ._records import RunStatus, decode_json, encode_json, utcnow
from .catalog import Base, Catalog, JSONType, RunRow, UTCDateTime

__all__ = ["SweepCatalog", "SweepInfo", "SweepRow", "SweepRunRow"]


class SweepRow(Base):
    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(32), index=True)
    spec: Mapped[Any] = mapped_column(JSONType)
    summary: Mapped[Any] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    host: Mapped[str] = mapped_column(String(256))


class SweepRunRow(Base):
    __tablename__ = "sweep_runs"

    sweep_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    label: Mapped[str] = mapped_column(String(256))
    position: Mapped[int] = mapped_column(Integer)


@dataclass(frozen=True)
class SweepInfo:
    """One sweep: its spec and its runs as ``(label, run_id)`` in submission order."""

    id: str
    name: str
    kind: str
    spec: dict[str, Any]
    created_at: datetime
    host: str
    summary: dict[str, Any] = field(default_factory=dict)
    runs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def run_ids(self) -> list[str]:
        return [run_id for _, run_id in self.runs]

    @property
    def labels(self) -> dict[str, str]:
        """``{label: run_id}``."""
        return dict(self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "spec": self.spec,
            "created_at": self.created_at.isoformat(),
            "host": self.host,
            "summary": self.summary,
            "runs": [{"label": label, "run_id": run_id} for label, run_id in self.runs],
        }


def _info(session: Session, row: SweepRow) -> SweepInfo:
    links = session.scalars(
        select(SweepRunRow)
        .where(SweepRunRow.sweep_id == row.id)
        .order_by(SweepRunRow.position, SweepRunRow.run_id)
    )
    return SweepInfo(
        id=row.id,
        name=row.name,
        kind=row.kind,
        spec=decode_json(row.spec),
        created_at=row.created_at,
        host=row.host,
        summary=decode_json(row.summary),
        runs=[(link.label, link.run_id) for link in links],
    )


class SweepCatalog:
    """Sweep operations; mixed into a :class:`~trainer.store.catalog.Catalog` subclass."""

    def _session(self, write: bool = False) -> Any:  # provided by Catalog
        raise NotImplementedError

    @staticmethod
    def _sweep_row(session: Session, sweep_id: str) -> SweepRow:
        row = session.get(SweepRow, paths.validate_run_id(sweep_id))
        if row is None:
            raise BnnError.not_found(f"unknown sweep {sweep_id!r}", sweep_id=sweep_id)
        return row

    def create_sweep(
        self,
        kind: str,
        spec: Mapping[str, Any],
        name: str | None = None,
        *,
        sweep_id: str | None = None,
    ) -> SweepInfo:
        """Register a sweep without runs (add them with :meth:`add_sweep_run`)."""
        if not isinstance(kind, str) or not kind or len(kind) > 32:
            raise BnnError.invalid(f"sweep kind must be a short string, got {kind!r}")
        if sweep_id is not None and not (
            isinstance(sweep_id, str) and paths.RUN_ID_PATTERN.match(sweep_id)
        ):
            raise BnnError.invalid(
                f"bad sweep id {sweep_id!r}: use 1-64 letters, digits, '_' or '-'"
            )
        if name is not None and (not isinstance(name, str) or len(name) > 256):
            raise BnnError.invalid(f"sweep name must be at most 256 characters, got {name!r}")
        sweep_id = sweep_id or uuid.uuid4().hex[:12]
        row = SweepRow(
            id=sweep_id,
            name=name or f"{kind}-{sweep_id}",
            kind=kind,
            spec=encode_json(dict(spec), "spec"),
            summary={},
            created_at=utcnow(),
            host=socket.gethostname(),
        )
        try:
            with self._session(write=True) as s:
                s.add(row)
                s.flush()
                return _info(s, row)
        except BnnError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise BnnError(
                    ErrorCode.CONFLICT, f"sweep {sweep_id!r} already exists", sweep_id=sweep_id
                ) from exc
            raise

    def add_sweep_runs(
        self,
        sweep_id: str,
        runs: Sequence[tuple[str, str, Mapping[str, Any], Sequence[str]]],
    ) -> list[str]:
        """Create QUEUED runs ``[(label, name, config, tags)]`` and append them to the sweep
        under their labels, all in one transaction (a study registers hundreds: one
        transaction per run, each reading the sweep's links, was quadratic). Returns the
        new run ids, in order; CONFLICT naming a label the sweep already has."""
        labels = [label for label, *_ in runs]
        for label in labels:
            if not isinstance(label, str) or not label or len(label) > 256:
                raise BnnError.invalid(f"sweep run label must be 1-256 characters, got {label!r}")
        if len(set(labels)) != len(labels):
            raise BnnError.invalid(f"sweep run labels must be distinct, got {labels}")
        with self._session(write=True) as s:
            row = self._sweep_row(s, sweep_id)
            links = list(s.scalars(select(SweepRunRow).where(SweepRunRow.sweep_id == row.id)))
            taken = {link.label for link in links} & set(labels)
            if taken:
                raise BnnError(
                    ErrorCode.CONFLICT, f"sweep {sweep_id!r} already has runs labelled {taken}"
                )
            ids = []
            for position, (label, name, config, tags) in enumerate(runs, start=len(links)):
                run = Catalog._new_run_row(name, config, tags, RunStatus.QUEUED)
                s.add(run)
                s.add(SweepRunRow(sweep_id=row.id, run_id=run.id, label=label, position=position))
                ids.append(run.id)
            s.flush()
            return ids

    def add_sweep_run(self, sweep_id: str, run_id: str, label: str) -> SweepInfo:
        """Append ``run_id`` to the sweep under ``label`` (unique within the sweep)."""
        if not isinstance(label, str) or not label or len(label) > 256:
            raise BnnError.invalid(f"sweep run label must be 1-256 characters, got {label!r}")
        with self._session(write=True) as s:
            row = self._sweep_row(s, sweep_id)
            links = list(s.scalars(select(SweepRunRow).where(SweepRunRow.sweep_id == row.id)))
            if any(link.label == label for link in links):
                raise BnnError(
                    ErrorCode.CONFLICT, f"sweep {sweep_id!r} already has a run labelled {label!r}"
                )
            if any(link.run_id == run_id for link in links):
                raise BnnError(ErrorCode.CONFLICT, f"run {run_id!r} is already in the sweep")
            if s.get(RunRow, run_id) is None:
                raise BnnError.not_found(f"unknown run {run_id!r}", run_id=run_id)
            s.add(SweepRunRow(sweep_id=row.id, run_id=run_id, label=label, position=len(links)))
            s.flush()
            return _info(s, row)

    def get_sweep(self, sweep_id: str) -> SweepInfo:
        """The sweep and its runs; NOT_FOUND naming the id."""
        with self._session() as s:
            return _info(s, self._sweep_row(s, sweep_id))

    def list_sweeps(self, kind: str | None = None, limit: int | None = None) -> list[SweepInfo]:
        """Sweeps, newest first."""
        query = select(SweepRow).order_by(SweepRow.created_at.desc(), SweepRow.id.desc())
        if kind is not None:
            query = query.where(SweepRow.kind == kind)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise BnnError.invalid(f"limit must be an integer >= 0, got {limit!r}")
            query = query.limit(limit)
        with self._session() as s:
            return [_info(s, row) for row in s.scalars(query).all()]

    def set_sweep_summary(self, sweep_id: str, summary: Mapping[str, Any]) -> SweepInfo:
        """Merge ``summary`` (JSON values, NaN allowed) into the sweep's summary."""
        with self._session(write=True) as s:
            row = self._sweep_row(s, sweep_id)
            row.summary = {**row.summary, **encode_json(dict(summary), "summary")}
            s.flush()
            return _info(s, row)

    def delete_sweep(self, sweep_id: str) -> None:
        """Remove the sweep and its links; its runs stay."""
        with self._session(write=True) as s:
            self._sweep_row(s, sweep_id)
            s.execute(delete(SweepRow).where(SweepRow.id == sweep_id))
