"""Catalog database plumbing: engines (SQLite pragmas), the session scope, Alembic upgrade.

:func:`upgrade_to_head` runs at every store open. It is cheap when the database is already
at head (one SELECT of ``alembic_version`` against :data:`HEAD_REVISION`, without importing
Alembic, whose import alone costs ~0.1 s of every ``bnn runs``), and safe when several
processes open a new database at once: the upgrade runs inside one transaction holding a
database-wide lock (``BEGIN IMMEDIATE`` on SQLite, ``pg_advisory_xact_lock`` on PostgreSQL),
so the second process waits and then finds the schema at head.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from trainer.errors import BnnError, ErrorCode

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "HEAD_REVISION",
    "SQLITE_BUSY_TIMEOUT_MS",
    "alembic_config",
    "make_engine",
    "normalize_url",
    "upgrade_to_head",
]

# The newest revision in versions/ (a test checks it against Alembic's script directory): a
# catalog stamped with it needs no upgrade, and opening it imports no Alembic.
HEAD_REVISION = "0003"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_PG_LOCK_KEY = 0x626E6E5F6D6967  # "bnn_mig": one advisory lock for all bnn catalogs on a server
HERE = Path(__file__).resolve().parent


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; plain ``postgresql://`` / ``postgres://`` use psycopg 3."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str | URL) -> Engine:
    """An engine; for SQLite with WAL, a busy timeout and foreign keys on every connection.

    SQLite transactions are begun explicitly (``BEGIN`` or, with the execution option
    ``sqlite_begin="IMMEDIATE"``, a write transaction that takes the lock up front, so a
    writer waits for another instead of failing with "database is locked").
    """
    u = normalize_url(url)
    dumps = lambda obj: json.dumps(obj, allow_nan=False)  # noqa: E731 - NaN is encoded before this
    if u.get_backend_name() != "sqlite":
        return create_engine(u, json_serializer=dumps, pool_pre_ping=True)
    engine = create_engine(
        u, json_serializer=dumps, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {'IMMEDIATE' if mode == 'IMMEDIATE' else 'DEFERRED'}")

    return engine


def alembic_config() -> Config:
    """An Alembic config pointing at this package (no ini file needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE).replace("%", "%%"))
    return cfg


def upgrade_to_head(engine: Engine) -> None:
    """Bring the catalog schema to the newest revision (a no-op when it is already there).

    Several processes may open a new SQLite catalog at once (Dask workers, parallel
    ``bnn train``). SQLite's busy timeout covers most of their contention, but a few steps
    of the first open (switching a new file to WAL, a reader meeting another process's
    migration) answer "database is locked" at once; those are tried again, with jittered
    pauses, for up to the busy timeout (``SQLITE_BUSY_TIMEOUT_MS``)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            _upgrade_to_head(engine)
            return
        except OperationalError as exc:
            locked = engine.dialect.name == "sqlite" and "database is locked" in str(exc)
            if not locked or time.monotonic() >= deadline:
                raise
            time.sleep(random.uniform(0.01, 0.1))


def _upgrade_to_head(engine: Engine) -> None:
    if current_revision(engine) == HEAD_REVISION:
        return
    from alembic import command

    cfg = alembic_config()
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


def current_revision(engine: Engine) -> str | None:
    """The revision the catalog is stamped with; None for a new (or foreign) database."""
    with engine.connect() as conn:
        if not engine.dialect.has_table(conn, "alembic_version"):
            return None
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


@contextmanager
def session_scope(maker: Any, where: str) -> Iterator[Session]:
    """Commit on success, roll back on error; database errors become BnnError(STORAGE)."""
    session: Session = maker()
    try:
        yield session
        session.commit()
    except BnnError:
        with suppress(SQLAlchemyError):
            session.rollback()
        raise
    except SQLAlchemyError as exc:
        with suppress(SQLAlchemyError):
            session.rollback()
        orig = getattr(exc, "orig", None) or exc
        raise BnnError(
            ErrorCode.STORAGE, f"catalog {where}: {type(orig).__name__}: {orig}", catalog=where
        ) from exc
    finally:
        session.close()
