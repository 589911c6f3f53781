"""The run catalog: SQLAlchemy 2 ORM and :class:`Catalog`, its database operations.

Tables ``runs`` (with where a run diverged, migration ``0003``) and ``epochs`` (schema in
``migrations/versions``, applied at open, so a catalog of an older version is upgraded). ORM
rows never leave this module: callers get :class:`RunInfo` and :class:`EpochInfo`. Every
database call goes through one session scope that commits or rolls back and turns
SQLAlchemy errors into ``BnnError(STORAGE)``. Files are :class:`~trainer.store.RunStore`'s.
"""

from __future__ import annotations

import operator
import re
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    case,
    delete,
    exists,
    func,
    literal,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from trainer.errors import BnnError, ErrorCode

from . import _paths as paths
from ._records import (
    TRANSITIONS,
    EpochInfo,
    RunInfo,
    RunStatus,
    check_tags,
    decode_json,
    encode_json,
    stale_after_default,
    utcnow,
)
from .migrations import make_engine, normalize_url, session_scope, upgrade_to_head

__all__ = [
    "BOUNDS",
    "METRIC_CONDITION",
    "METRIC_NAME",
    "METRIC_SORT",
    "RUN_SORTS",
    "Base",
    "Catalog",
    "EpochRow",
    "RunListing",
    "RunPage",
    "RunRow",
    "parse_metric_condition",
]

# what :meth:`Catalog.query_runs` sorts by (config values for dataset, prior, prior_mode
# and epochs, the number of captured epochs for epochs_done)
RUN_SORTS = (
    "created_at",
    "finished_at",
    "name",
    "status",
    "dataset",
    "prior",
    "prior_mode",
    "epochs",
    "epochs_done",
    "host",
)
METRIC_SORT = "metric:"  # sort="metric:test_nll": by the latest epoch's value of a metric
METRIC_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
BOUNDS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
# A condition on a metric, "test_nll<0.1" or "test_acc >= 0.9": a metric name, an operator of
# BOUNDS, a decimal number (bounded digits: always finite), blanks around each. The same
# text in Python's re and in the ECMA-262 regex of a JSON Schema ``pattern``.
METRIC_CONDITION = (
    r"^ *([A-Za-z0-9_.-]{1,64}) *(<=|>=|<|>) *"
    r"([-+]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][-+]?[0-9]{1,2})?) *$"
)
_METRIC_CONDITION = re.compile(METRIC_CONDITION)


def parse_metric_condition(text: str) -> tuple[str, str, float]:
    """``"test_nll<0.1"`` -> ("test_nll", "<", 0.1), a condition for
    :meth:`Catalog.query_runs`; INVALID_ARGUMENT naming ``text`` unless it matches
    :data:`METRIC_CONDITION`."""
    found = _METRIC_CONDITION.fullmatch(text)
    if found is None:
        shown = text if len(text) <= 100 else f"{text[:100]}..."
        raise BnnError.invalid(
            f"metric condition {shown!r} is not like 'test_nll<0.1': a metric name (letters, "
            "digits, '_', '.', '-'), then <, <=, > or >=, then a decimal number",
            fields={"metric": shown},
        )
    return found.group(1), found.group(2), float(found.group(3))


# ----------------------------------------------------------------------------- ORM
class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), index=True)
    config: Mapped[Any] = mapped_column(JSONType)
    tags: Mapped[Any] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    host: Mapped[str] = mapped_column(String(256))
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[Any] = mapped_column(JSONType)
    diverged_step: Mapped[int | None] = mapped_column(BigInteger)
    diverged_epoch: Mapped[int | None] = mapped_column(Integer)
    diverged_layer: Mapped[str | None] = mapped_column(String(256))

    def info(self) -> RunInfo:
        return RunInfo(
            id=self.id,
            name=self.name,
            status=RunStatus(self.status),
            config=decode_json(self.config),
            created_at=self.created_at,
            updated_at=self.updated_at,
            heartbeat_at=self.heartbeat_at,
            finished_at=self.finished_at,
            host=self.host,
            error=self.error,
            tags=list(self.tags),
            summary=decode_json(self.summary),
            diverged_step=self.diverged_step,
            diverged_epoch=self.diverged_epoch,
            diverged_layer=self.diverged_layer,
        )


class EpochRow(Base):
    __tablename__ = "epochs"

    run_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    metrics: Mapped[Any] = mapped_column(JSONType)
    file: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def info(self) -> EpochInfo:
        return EpochInfo(
            run_id=self.run_id,
            epoch=self.epoch,
            metrics=decode_json(self.metrics),
            file=self.file,
            size=self.size,
            checksum=self.checksum,
            created_at=self.created_at,
        )


@dataclass(frozen=True)
class RunListing:
    """One row of :meth:`Catalog.query_runs`: a run, its number of captured epochs, and
    its latest captured epoch with that epoch's metrics (None and {} before the first)."""

    run: RunInfo
    epochs_done: int
    last_epoch: int | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPage:
    """One page of :meth:`Catalog.query_runs`; ``total`` counts every matching run."""

    total: int
    runs: list[RunListing]


# ----------------------------------------------------------------------------- catalog
class Catalog:
    """Runs and epoch rows in one database (SQLite file or PostgreSQL URL), migrated at open.

    ``stale_after_s``: a RUNNING run without a heartbeat for this long is reaped to
    INTERRUPTED by :meth:`get_run` / :meth:`list_runs` (default ``$BNN_STALE_AFTER_S`` or
    60 s; ``0`` turns automatic reaping off).
    """

    def __init__(self, db_url: str, *, stale_after_s: float | None = None) -> None:
        self.stale_after_s = (
            stale_after_default() if stale_after_s is None else float(stale_after_s)
        )
        if not self.stale_after_s >= 0:
            raise BnnError.invalid(f"stale_after_s must be >= 0 seconds, got {stale_after_s!r}")
        try:
            self.url = normalize_url(db_url).render_as_string(hide_password=True)
        except (SQLAlchemyError, ValueError) as exc:
            raise BnnError(ErrorCode.STORAGE, f"bad catalog URL: {exc}") from exc
        try:
            self._engine = make_engine(db_url)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise BnnError(
                ErrorCode.STORAGE, f"cannot use catalog {self.url}: {exc}", catalog=self.url
            ) from exc
        try:
            upgrade_to_head(self._engine)
        except (SQLAlchemyError, OSError) as exc:
            self._engine.dispose()
            orig = getattr(exc, "orig", None) or exc
            raise BnnError(
                ErrorCode.STORAGE, f"cannot open catalog {self.url}: {orig}", catalog=self.url
            ) from exc
        self._read = sessionmaker(self._engine, expire_on_commit=False)
        self._write = sessionmaker(
            self._engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False
        )

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self, write: bool = False) -> Any:
        return session_scope(self._write if write else self._read, self.url)

    @staticmethod
    def _row(session: Session, run_id: str, lock: bool = False) -> RunRow:
        query = select(RunRow).where(RunRow.id == paths.validate_run_id(run_id))
        row = session.scalars(query.with_for_update() if lock else query).first()
        if row is None:
            raise BnnError.not_found(f"unknown run {run_id!r}", run_id=run_id)
        return row

    # -- runs
    def create_run(
        self,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        status: RunStatus | str = RunStatus.RUNNING,
        *,
        run_id: str | None = None,
    ) -> RunInfo:
        """Register a new run (QUEUED or RUNNING); id: 12 hex chars unless ``run_id`` is given."""
        status = RunStatus.parse(status)
        if not status.active:
            raise BnnError.invalid(f"a new run must be queued or running, got {status.value!r}")
        if run_id is not None and not (
            isinstance(run_id, str) and paths.RUN_ID_PATTERN.match(run_id)
        ):
            raise BnnError.invalid(f"bad run id {run_id!r}: use 1-64 letters, digits, '_' or '-'")
        row = self._new_run_row(name, config, tags, status, run_id)
        run_id = row.id
        try:
            with self._session(write=True) as s:
                s.add(row)
                s.flush()
                return row.info()
        except BnnError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise BnnError(
                    ErrorCode.CONFLICT, f"run {run_id!r} already exists", run_id=run_id
                ) from exc
            raise

    @staticmethod
    def _new_run_row(
        name: str | None,
        config: Mapping[str, Any] | None,
        tags: Iterable[str],
        status: RunStatus,
        run_id: str | None = None,
    ) -> RunRow:
        """The row of a new run (names, config and tags checked; nothing stored)."""
        if name is not None and (not isinstance(name, str) or len(name) > 256):
            raise BnnError.invalid(
                f"run name must be a string of at most 256 characters, got {name!r}"
            )
        run_id = run_id or uuid.uuid4().hex[:12]
        now = utcnow()
        return RunRow(
            id=run_id,
            name=name or run_id,
            status=status.value,
            config=encode_json(dict(config or {}), "config"),
            tags=check_tags(tags),
            created_at=now,
            updated_at=now,
            heartbeat_at=now if status is RunStatus.RUNNING else None,
            finished_at=None,
            host=socket.gethostname(),
            error=None,
            summary={},
        )

    def get_run(self, run_id: str) -> RunInfo:
        """The run (after reaping stale runs); NOT_FOUND naming the id."""
        self._auto_reap()
        with self._session() as s:
            return self._row(s, run_id).info()

    def run_statuses(self, run_ids: Sequence[str]) -> dict[str, RunStatus]:
        """The status of each run of ``run_ids`` that exists, in one query per 500 ids
        (for lists of sweeps and studies, which need counts, not whole runs)."""
        self._auto_reap()
        ids = list(dict.fromkeys(run_ids))
        out: dict[str, RunStatus] = {}
        with self._session() as s:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                query = select(RunRow.id, RunRow.status).where(RunRow.id.in_(chunk))
                out.update({run_id: RunStatus(status) for run_id, status in s.execute(query)})
        return out

    def list_runs(
        self, status: RunStatus | str | None = None, limit: int | None = None
    ) -> list[RunInfo]:
        """Runs, newest first, optionally only those with ``status``."""
        self._auto_reap()
        query = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id.desc())
        if status is not None:
            query = query.where(RunRow.status == RunStatus.parse(status).value)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise BnnError.invalid(f"limit must be an integer >= 0, got {limit!r}")
            query = query.limit(limit)
        with self._session() as s:
            return [row.info() for row in s.scalars(query)]

    def query_runs(
        self,
        *,
        name: str | None = None,
        tags: Iterable[str] = (),
        status: RunStatus | str | None = None,
        dataset: str | None = None,
        prior: str | None = None,
        metrics: Iterable[tuple[str, str, float]] = (),
        sort: str = "created_at",
        descending: bool = True,
        limit: int = 50,
        offset: int = 0,
    ) -> RunPage:
        """Runs filtered, sorted and paginated in the database, each with its number of
        captured epochs and the metrics of its latest one (the dashboard's runs table).

        ``name``: a case-insensitive substring of the name; ``tags``: runs having all of
        them; ``status``, ``dataset``, ``prior`` (the config's prior kind): equal to.
        ``metrics``: (name, one of :data:`BOUNDS`, bound) conditions on the metrics of the
        run's latest captured epoch, e.g. ``("test_nll", "<", 0.1)``; a run whose value is
        missing or not finite does not match. ``sort`` is one of :data:`RUN_SORTS` or
        ``metric:<name>`` (that latest value); missing values last, ties newest first.
        INVALID_ARGUMENT naming a bad sort, metric condition, limit or offset.
        """
        sort_metric = sort.removeprefix(METRIC_SORT) if sort.startswith(METRIC_SORT) else None
        if sort not in RUN_SORTS and not (sort_metric and METRIC_NAME.fullmatch(sort_metric)):
            raise BnnError.invalid(
                f"cannot sort runs by {sort!r}; one of {list(RUN_SORTS)} or {METRIC_SORT}<name>"
            )
        conditions = list(metrics)
        for metric, bound, value in conditions:
            if not METRIC_NAME.fullmatch(str(metric)) or bound not in BOUNDS:
                raise BnnError.invalid(
                    f"bad metric condition {metric!r} {bound!r} {value!r}: a metric name "
                    f"(letters, digits, '_', '.', '-') and one of {list(BOUNDS)}"
                )
        for what, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BnnError.invalid(f"{what} must be an integer >= 0, got {value!r}")
        self._auto_reap()
        done = (
            select(func.count())
            .select_from(EpochRow)
            .where(EpochRow.run_id == RunRow.id)
            .correlate(RunRow)
            .scalar_subquery()
        )
        where: list[ColumnElement[bool]] = []
        if name:
            where.append(RunRow.name.icontains(name, autoescape=True))
        for tag in dict.fromkeys(tags):
            where.append(self._has_tag(tag))
        if status is not None:
            where.append(RunRow.status == RunStatus.parse(status).value)
        for field_name, wanted in (("dataset", dataset), ("prior", prior)):
            if wanted is not None:
                where.append(RunRow.config[field_name].as_string() == wanted)
        for metric, bound, value in conditions:
            where.append(BOUNDS[bound](self._last_metric(metric), float(value)))
        keys: dict[str, Any] = {
            "created_at": RunRow.created_at,
            "finished_at": RunRow.finished_at,
            "name": RunRow.name,
            "status": RunRow.status,
            "host": RunRow.host,
            "epochs": RunRow.config["epochs"].as_integer(),
            "epochs_done": done,
            **{k: RunRow.config[k].as_string() for k in ("dataset", "prior", "prior_mode")},
        }
        column = self._last_metric(sort_metric) if sort_metric else keys[sort]
        key = column.desc() if descending else column.asc()
        query = (
            select(RunRow, done)
            .where(*where)
            .order_by(key.nulls_last(), RunRow.created_at.desc(), RunRow.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._session() as s:
            total = s.scalar(select(func.count()).select_from(RunRow).where(*where)) or 0
            found = [(row.info(), int(n)) for row, n in s.execute(query).all()]
            latest = self._latest_metrics(s, [info.id for info, _ in found])
        runs = [RunListing(info, n, *latest.get(info.id, (None, {}))) for info, n in found]
        return RunPage(int(total), runs)

    def _has_tag(self, tag: str) -> ColumnElement[bool]:
        """``tag`` is one of the run's tags (a JSON array: ``?`` on PostgreSQL's JSONB,
        ``json_each`` on SQLite)."""
        if self._engine.dialect.name == "postgresql":
            return RunRow.tags.op("?", is_comparison=True)(literal(tag, String()))
        values = func.json_each(RunRow.tags).table_valued("value")
        return exists(select(1).select_from(values).where(values.c.value == tag))

    def _last_metric(self, metric: str) -> Any:
        """The run's value of ``metric`` at its latest captured epoch, when a finite number
        (NULL when missing or stored as "nan"/"inf"): a correlated scalar subquery."""
        if self._engine.dialect.name == "postgresql":
            number = func.jsonb_typeof(EpochRow.metrics[metric]) == "number"
        else:
            path = f'$."{metric}"'  # METRIC_NAME: no quote to escape
            number = func.json_type(EpochRow.metrics, path).in_(("integer", "real"))
        value = case((number, EpochRow.metrics[metric].as_float()), else_=None)
        return (
            select(value)
            .where(EpochRow.run_id == RunRow.id)
            .order_by(EpochRow.epoch.desc())
            .limit(1)
            .correlate(RunRow)
            .scalar_subquery()
        )

    @staticmethod
    def _latest_metrics(
        session: Session, run_ids: list[str]
    ) -> dict[str, tuple[int, dict[str, Any]]]:
        """Each run's latest captured epoch and its metrics (runs without epochs absent)."""
        if not run_ids:
            return {}
        last = (
            select(EpochRow.run_id, func.max(EpochRow.epoch).label("epoch"))
            .where(EpochRow.run_id.in_(run_ids))
            .group_by(EpochRow.run_id)
            .subquery()
        )
        query = select(EpochRow.run_id, EpochRow.epoch, EpochRow.metrics).join(
            last, (EpochRow.run_id == last.c.run_id) & (EpochRow.epoch == last.c.epoch)
        )
        return {
            run_id: (epoch, decode_json(metrics))
            for run_id, epoch, metrics in session.execute(query).all()
        }

    def config_values(self, key: str) -> list[str]:
        """The distinct string values of ``config[key]`` over all runs, sorted (e.g. the
        datasets to offer as a filter)."""
        column = RunRow.config[key].as_string()
        with self._session() as s:
            return sorted(v for v in s.scalars(select(column).distinct()) if v is not None)

    def set_status(self, run_id: str, status: RunStatus | str, error: str | None = None) -> RunInfo:
        """Move a run to ``status``; CONFLICT where ``TRANSITIONS`` forbids it (from COMPLETED)."""
        status = RunStatus.parse(status)
        with self._session(write=True) as s:
            row = self._row(s, run_id, lock=True)
            current = RunStatus(row.status)
            if status is not current and status not in TRANSITIONS[current]:
                raise BnnError(
                    ErrorCode.CONFLICT,
                    f"run {run_id!r} is {current.value}; cannot become {status.value}",
                    run_id=run_id,
                    status=current.value,
                )
            now = utcnow()
            if status is not current or error is not None:
                row.status, row.updated_at = status.value, now
                row.error = error if error is not None else (None if status.active else row.error)
                row.finished_at = (
                    None if status.active else (row.finished_at if status is current else now)
                )
                if status is RunStatus.RUNNING:
                    row.heartbeat_at = now
            return row.info()

    def heartbeat(self, run_id: str) -> None:
        """Record that the trainer lives; revives an INTERRUPTED run, CONFLICT on a terminal one."""
        with self._session(write=True) as s:
            row = self._row(s, run_id, lock=True)
            status = RunStatus(row.status)
            if status.terminal:
                raise BnnError(
                    ErrorCode.CONFLICT,
                    f"run {run_id!r} is {status.value}",
                    run_id=run_id,
                    status=status.value,
                )
            row.heartbeat_at = utcnow()
            if status is RunStatus.INTERRUPTED:
                row.status, row.error, row.finished_at, row.updated_at = (
                    RunStatus.RUNNING.value,
                    None,
                    None,
                    row.heartbeat_at,
                )

    def reap_stale(self, stale_after_s: float | None = None) -> list[str]:
        """RUNNING runs silent for ``stale_after_s`` become INTERRUPTED; returns their ids."""
        cutoff = utcnow() - timedelta(
            seconds=self.stale_after_s if stale_after_s is None else stale_after_s
        )
        last = func.coalesce(RunRow.heartbeat_at, RunRow.updated_at)
        stale = select(RunRow).where(RunRow.status == RunStatus.RUNNING.value, last < cutoff)
        with self._session() as s:  # cheap check first: no write lock when nothing is stale
            if s.scalars(stale.limit(1)).first() is None:
                return []
        reaped: list[str] = []
        with self._session(write=True) as s:
            now = utcnow()
            for row in s.scalars(stale.with_for_update()):
                seen = row.heartbeat_at or row.updated_at
                row.status, row.updated_at, row.finished_at = RunStatus.INTERRUPTED.value, now, now
                row.error = f"no heartbeat since {seen.isoformat()}"
                reaped.append(row.id)
        return reaped

    def _auto_reap(self) -> None:
        if self.stale_after_s > 0:
            self.reap_stale()

    def set_summary(self, run_id: str, summary: Mapping[str, Any]) -> RunInfo:
        """Merge ``summary`` (JSON values; NaN/Inf allowed) into the run's summary."""
        with self._session(write=True) as s:
            row = self._row(s, run_id, lock=True)
            row.summary = {**row.summary, **encode_json(dict(summary), "summary")}
            row.updated_at = utcnow()
            return row.info()

    def set_divergence(
        self, run_id: str, step: int, epoch: int, layer: str | None = None
    ) -> RunInfo:
        """Record where the run first became non-finite (its status is not changed).

        ``step`` is the global 0-based training step, ``layer`` the first parameter with a
        non-finite gradient (None: only the loss was). Recording the same place again is a
        no-op (a retried report); another place is CONFLICT, since only the first counts.
        """
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**63:
            raise BnnError.invalid(f"diverged step must be an integer >= 0, got {step!r}")
        epoch = paths.validate_epoch(epoch)
        if layer is not None and (
            not isinstance(layer, str) or not layer or len(layer) > 256 or "\x00" in layer
        ):
            raise BnnError.invalid(
                f"diverged layer must be a non-empty string of at most 256 characters, "
                f"got {layer!r}"
            )
        with self._session(write=True) as s:
            row = self._row(s, run_id, lock=True)
            place = (step, epoch, layer)
            if row.diverged_step is None:
                row.diverged_step, row.diverged_epoch, row.diverged_layer = place
                row.updated_at = utcnow()
            elif (row.diverged_step, row.diverged_epoch, row.diverged_layer) != place:
                raise BnnError(
                    ErrorCode.CONFLICT,
                    f"run {run_id!r} already diverged at step {row.diverged_step} "
                    f"(epoch {row.diverged_epoch}); cannot record step {step} (epoch {epoch})",
                    run_id=run_id,
                    diverged_step=row.diverged_step,
                )
            return row.info()

    def set_labels(
        self, run_id: str, name: str | None = None, tags: Iterable[str] | None = None
    ) -> RunInfo:
        """Rename the run and/or replace its tags (None leaves that one as it is); any status."""
        if name is not None and (
            not isinstance(name, str) or not name.strip() or len(name) > 256 or "\x00" in name
        ):
            raise BnnError.invalid(
                f"run name must be a non-blank string of at most 256 characters, got {name!r}"
            )
        new_tags = None if tags is None else check_tags(tags)
        with self._session(write=True) as s:
            row = self._row(s, run_id, lock=True)
            if name is not None:
                row.name = name
            if new_tags is not None:
                row.tags = new_tags
            row.updated_at = utcnow()
            return row.info()

    def delete_run(self, run_id: str) -> None:
        """Remove the run's catalog row; its epoch rows go with it (ON DELETE CASCADE)."""
        with self._session(write=True) as s:
            self._row(s, run_id, lock=True)
            s.execute(delete(RunRow).where(RunRow.id == run_id))

    # -- epochs
    def list_epochs(self, run_id: str) -> list[EpochInfo]:
        """Committed epochs of a run, ascending."""
        with self._session() as s:
            self._row(s, run_id)
            rows = s.scalars(
                select(EpochRow).where(EpochRow.run_id == run_id).order_by(EpochRow.epoch)
            )
            return [row.info() for row in rows]

    def get_epoch(self, run_id: str, epoch: int) -> EpochInfo:
        """One committed epoch; NOT_FOUND with ``details["epochs"]`` = the captured epochs."""
        epoch = paths.validate_epoch(epoch)
        with self._session() as s:
            self._row(s, run_id)
            row = s.get(EpochRow, (run_id, epoch))
            if row is not None:
                return row.info()
            epochs = list(
                s.scalars(
                    select(EpochRow.epoch).where(EpochRow.run_id == run_id).order_by(EpochRow.epoch)
                )
            )
        raise BnnError.not_found(
            f"run {run_id!r} has no epoch {epoch!r}; captured epochs: {epochs}",
            run_id=run_id,
            epoch=epoch,
            epochs=epochs,
        )

    def find_epoch(self, run_id: str, epoch: int, checksum: str) -> EpochInfo | None:
        """The committed epoch if its checksum is ``checksum``; None if absent; else CONFLICT."""
        with self._session() as s:
            row = s.get(EpochRow, (run_id, epoch))
            if row is None:
                return None
            if row.checksum != checksum:
                raise BnnError(
                    ErrorCode.CONFLICT,
                    f"run {run_id!r} already has epoch {epoch} with other content "
                    f"(sha256 {row.checksum[:12]}..., new {checksum[:12]}...)",
                    run_id=run_id,
                    epoch=epoch,
                )
            return row.info()

    def add_epoch(
        self,
        run_id: str,
        epoch: int,
        metrics: Mapping[str, float],
        file: str,
        size: int,
        checksum: str,
    ) -> EpochInfo:
        """Commit an epoch row (the file must already be in place); bumps the run's heartbeat.

        Committing the same checksum again returns the existing row; another one is CONFLICT.
        """
        try:
            with self._session(write=True) as s:
                run = self._row(s, run_id, lock=True)
                now = utcnow()
                row = EpochRow(
                    run_id=run_id,
                    epoch=epoch,
                    metrics=encode_json(dict(metrics), "metrics"),
                    file=file,
                    size=size,
                    checksum=checksum,
                    created_at=now,
                )
                s.add(row)
                run.updated_at = now
                if run.status == RunStatus.RUNNING.value:
                    run.heartbeat_at = now
                s.flush()
                return row.info()
        except BnnError as exc:  # committed concurrently by another writer
            if isinstance(exc.__cause__, IntegrityError) and (
                found := self.find_epoch(run_id, epoch, checksum)
            ):
                return found
            raise
