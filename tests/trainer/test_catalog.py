"""The catalog on SQLite and PostgreSQL: migrations, runs, status rules, heartbeats, JSON."""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from tests.trainer.conftest import SnapshotFactory
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore
from trainer.store.catalog import Base


@pytest.fixture
def store(tmp_path: Path, db_url: str | None) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "data", db_url, stale_after_s=0)
    yield s
    s.close()


def _raw_engine(store: RunStore, db_url: str | None) -> Any:
    return create_engine(db_url or f"sqlite:///{store.data_dir / 'catalog.db'}")


def test_migrations_at_head_and_match_models(store: RunStore, tmp_path: Path, db_url: str | None):
    engine = _raw_engine(store, db_url)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == "0003"
            assert {"runs", "epochs", "sweeps", "sweep_runs", "alembic_version"} <= set(
                inspect(conn).get_table_names()
            )
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            if db_url is None:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()
    run = store.create_run("before", {})
    store.close()
    again = RunStore(tmp_path / "data", db_url)  # already at head: opens, keeps data
    assert again.get_run(run.id).name == "before"
    again.close()


def test_create_get_list(store: RunStore):
    config = {"lr": 1e-3, "widths": [10, 10], "clip": math.inf, "nested": {"x": math.nan}}
    a = store.create_run("a", config, tags=["x", "y"])
    time.sleep(0.01)
    b = store.create_run(None, {}, status=RunStatus.QUEUED)
    assert b.name == b.id
    assert len(b.id) == 12
    assert b.heartbeat_at is None
    got = store.get_run(a.id)
    assert got.status is RunStatus.RUNNING
    assert got.tags == ["x", "y"]
    assert got.config["widths"] == [10, 10]
    assert got.config["clip"] == math.inf
    assert math.isnan(got.config["nested"]["x"])
    assert got.created_at.tzinfo is not None
    assert got.host
    assert [r.id for r in store.list_runs()] == [b.id, a.id]
    assert [r.id for r in store.list_runs(status="running")] == [a.id]
    assert [r.id for r in store.list_runs(limit=1)] == [b.id]
    assert got.to_dict()["status"] == "running"
    with pytest.raises(BnnError) as err:
        store.get_run("0123456789ab")
    assert err.value.code is ErrorCode.NOT_FOUND
    assert "0123456789ab" in str(err.value)
    with pytest.raises(BnnError) as err:
        store.create_run("dup", {}, run_id=a.id)
    assert err.value.code is ErrorCode.CONFLICT
    for bad in ({"status": RunStatus.COMPLETED}, {"tags": "x"}, {"run_id": "../x"}):
        with pytest.raises(BnnError) as err:
            store.create_run("bad", {}, **bad)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(BnnError) as err:
        store.create_run("bad", {"f": object()})
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert "config['f']" in str(err.value)


def test_status_transitions(store: RunStore):
    run = store.create_run("s", {})
    done = store.set_status(run.id, RunStatus.COMPLETED)
    assert done.status is RunStatus.COMPLETED
    assert done.finished_at is not None
    assert store.set_status(run.id, "completed").finished_at == done.finished_at  # no-op
    for status in (RunStatus.RUNNING, RunStatus.FAILED, RunStatus.QUEUED):
        with pytest.raises(BnnError) as err:
            store.set_status(run.id, status)
        assert err.value.code is ErrorCode.CONFLICT
        assert "completed" in str(err.value)
    with pytest.raises(BnnError) as err:
        store.heartbeat(run.id)
    assert err.value.code is ErrorCode.CONFLICT
    failed = store.set_status(store.create_run("f", {}).id, RunStatus.FAILED, error="boom")
    assert failed.error == "boom"
    queued = store.create_run("q", {}, status=RunStatus.QUEUED)
    with pytest.raises(BnnError):
        store.set_status(queued.id, RunStatus.COMPLETED)
    assert store.set_status(queued.id, RunStatus.RUNNING).heartbeat_at is not None
    with pytest.raises(BnnError) as err:
        store.set_status(queued.id, "bogus")
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert "'bogus'" in str(err.value)


def test_reap_stale_running_runs(store: RunStore):
    stale = store.create_run("stale", {})
    alive = store.create_run("alive", {})
    queued = store.create_run("queued", {}, status=RunStatus.QUEUED)
    time.sleep(0.6)
    store.heartbeat(alive.id)
    assert store.reap_stale(0.5) == [stale.id]
    got = store.get_run(stale.id)
    assert got.status is RunStatus.INTERRUPTED
    assert got.finished_at is not None
    assert got.error
    assert got.error.startswith("no heartbeat since ")
    assert store.get_run(alive.id).status is RunStatus.RUNNING
    assert store.get_run(queued.id).status is RunStatus.QUEUED
    assert store.reap_stale(0.5) == []
    # the trainer was only slow: its next heartbeat revives the run; then it can finish
    store.heartbeat(stale.id)
    revived = store.get_run(stale.id)
    assert revived.status is RunStatus.RUNNING
    assert revived.error is None
    assert store.set_status(stale.id, RunStatus.COMPLETED).status is RunStatus.COMPLETED


def test_get_and_list_reap_with_the_store_setting(tmp_path: Path, db_url: str | None):
    with RunStore(tmp_path / "d", db_url, stale_after_s=0.3) as store:
        run = store.create_run("r", {})
        assert store.get_run(run.id).status is RunStatus.RUNNING
        time.sleep(0.4)
        assert store.list_runs()[0].status is RunStatus.INTERRUPTED


def test_metrics_nan_round_trip_and_json_storage(
    store: RunStore, make_snapshot: SnapshotFactory, db_url: str | None
):
    run = store.create_run("m", {})
    metrics = {"loss": math.nan, "kl": math.inf, "neg": -math.inf, "acc": 0.25}
    store.write_epoch(run.id, make_snapshot(0, metrics=metrics))
    got = store.list_epochs(run.id)[0].metrics
    assert math.isnan(got["loss"])
    assert got["kl"] == math.inf
    assert got["neg"] == -math.inf
    assert got["acc"] == 0.25
    summary = store.set_summary(run.id, {"best": math.nan}).summary
    assert math.isnan(summary["best"])
    assert store.set_summary(run.id, {"n": 3}).summary.keys() == {"best", "n"}
    engine = _raw_engine(store, db_url)
    try:
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT metrics FROM epochs")).scalar()
    finally:
        engine.dispose()
    raw_text = raw if isinstance(raw, str) else __import__("json").dumps(raw)
    assert '"nan"' in raw_text
    assert '"-inf"' in raw_text
    assert "NaN" not in raw_text


def test_epochs_cascade_and_not_found_details(
    store: RunStore, make_snapshot: SnapshotFactory, db_url: str | None
):
    run = store.create_run("e", {})
    for epoch in (0, 5, 2):
        store.write_epoch(run.id, make_snapshot(epoch, grad_level=None))
    assert [e.epoch for e in store.list_epochs(run.id)] == [0, 2, 5]
    with pytest.raises(BnnError) as err:
        store.get_epoch(run.id, 3)
    assert err.value.code is ErrorCode.NOT_FOUND
    assert err.value.details["epochs"] == [0, 2, 5]
    store.delete_run(run.id)
    engine = _raw_engine(store, db_url)
    try:  # the epoch rows went with the run (foreign key cascade)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM epochs")).scalar() == 0
    finally:
        engine.dispose()


def _open_and_write(data_dir: str, db_url: str | None, barrier: Any, queue: Any, i: int) -> None:
    from tests.trainer.conftest import _snapshot

    try:
        barrier.wait(timeout=30)
        with RunStore(data_dir, db_url) as store:
            run = store.create_run(f"p{i}", {"i": i})
            for epoch in range(3):
                store.write_epoch(run.id, _snapshot(epoch, grad_level=None, seed=i))
            store.heartbeat(run.id)
            store.set_status(run.id, RunStatus.COMPLETED)
        queue.put((i, "ok"))
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put((i, f"{type(exc).__name__}: {exc}"))


def test_many_processes_open_a_new_catalog_at_once(tmp_path: Path, db_url: str | None):
    ctx = mp.get_context("fork")
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    data_dir = str(tmp_path / "shared")
    procs = [
        ctx.Process(target=_open_and_write, args=(data_dir, db_url, barrier, queue, i))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == {i: "ok" for i in range(n)}
    with RunStore(data_dir, db_url) as store:
        runs = store.list_runs()
        assert len(runs) == n
        assert all(r.status is RunStatus.COMPLETED for r in runs)
        assert all(len(store.list_epochs(r.id)) == 3 for r in runs)


def test_unreachable_database_is_a_storage_error(tmp_path: Path):
    with pytest.raises(BnnError) as err:
        RunStore(tmp_path, "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert err.value.code is ErrorCode.STORAGE
    assert "127.0.0.1:1" in str(err.value)


def test_a_new_sqlite_catalog_locked_for_a_moment_is_opened_after_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's first open can make SQLite answer "database is locked" at once
    (without waiting its busy timeout): the open tries again instead of failing."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from trainer.store import migrations

    real = migrations._upgrade_to_head
    calls = []

    def locked_twice(engine: Any) -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError(
                "PRAGMA journal_mode=WAL", {}, sqlite3.OperationalError("database is locked")
            )
        real(engine)

    monkeypatch.setattr(migrations, "_upgrade_to_head", locked_twice)
    with RunStore(tmp_path) as store:
        store.create_run("r", {})
    assert len(calls) == 3

    def broken(engine: Any) -> None:  # any other error is not waited out
        calls.append(1)
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(migrations, "_upgrade_to_head", broken)
    calls.clear()
    with pytest.raises(BnnError) as err:
        RunStore(tmp_path / "other")
    assert err.value.code is ErrorCode.STORAGE and "disk I/O error" in str(err.value)
    assert len(calls) == 1
