"""Sweeps in the catalog (migration 0002) on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore, SweepInfo


@pytest.fixture
def store(tmp_path: Path, catalog_url: str | None) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "data", catalog_url, stale_after_s=0)
    yield s
    s.close()


def test_create_add_get_list_summary_delete(store: RunStore) -> None:
    spec = {"kind": "width", "grid": {"widths": [25, 50]}, "target": math.nan}
    sweep = store.create_sweep("width", spec, "widths")
    assert isinstance(sweep, SweepInfo)
    assert (sweep.name, sweep.kind, sweep.runs) == ("widths", "width", [])
    assert sweep.spec["grid"] == {"widths": [25, 50]} and math.isnan(sweep.spec["target"])
    a = store.create_run("a", {}, status=RunStatus.QUEUED)
    b = store.create_run("b", {}, status=RunStatus.QUEUED)
    store.add_sweep_run(sweep.id, b.id, "w25")
    got = store.add_sweep_run(sweep.id, a.id, "w50")
    assert got.runs == [("w25", b.id), ("w50", a.id)]  # submission order, not id order
    assert got.labels == {"w25": b.id, "w50": a.id} and got.run_ids == [b.id, a.id]
    assert store.get_sweep(sweep.id).runs == got.runs
    time.sleep(0.01)
    other = store.create_sweep("optim", {}, sweep_id="my-sweep")
    assert other.name == "optim-my-sweep"
    assert [s.id for s in store.list_sweeps()] == ["my-sweep", sweep.id]
    assert [s.id for s in store.list_sweeps(kind="width")] == [sweep.id]
    assert [s.id for s in store.list_sweeps(limit=1)] == ["my-sweep"]
    done = store.set_sweep_summary(sweep.id, {"study": {"rows": [{"x": math.inf}]}})
    assert done.summary["study"]["rows"][0]["x"] == math.inf
    out = done.to_dict()
    assert out["runs"] == [{"label": "w25", "run_id": b.id}, {"label": "w50", "run_id": a.id}]
    assert out["created_at"].endswith("+00:00")
    # a deleted run leaves the sweep; a deleted sweep leaves its runs
    store.delete_run(b.id)
    assert store.get_sweep(sweep.id).runs == [("w50", a.id)]
    store.delete_sweep(sweep.id)
    assert store.get_run(a.id).name == "a"
    with pytest.raises(BnnError) as err:
        store.get_sweep(sweep.id)
    assert err.value.code is ErrorCode.NOT_FOUND and sweep.id in str(err.value)


def test_errors_name_the_bad_value(store: RunStore) -> None:
    sweep = store.create_sweep("width", {})
    run = store.create_run("r", {})
    store.add_sweep_run(sweep.id, run.id, "x")
    other = store.create_run("s", {})
    cases = [
        (lambda: store.create_sweep("width", {}, sweep_id=sweep.id), ErrorCode.CONFLICT),
        (lambda: store.create_sweep("", {}), ErrorCode.INVALID_ARGUMENT),
        (lambda: store.create_sweep("width", {}, sweep_id="../x"), ErrorCode.INVALID_ARGUMENT),
        (lambda: store.create_sweep("width", {"x": object()}), ErrorCode.INVALID_ARGUMENT),
        (lambda: store.add_sweep_run(sweep.id, other.id, "x"), ErrorCode.CONFLICT),
        (lambda: store.add_sweep_run(sweep.id, run.id, "y"), ErrorCode.CONFLICT),
        (lambda: store.add_sweep_run(sweep.id, "0123456789ab", "z"), ErrorCode.NOT_FOUND),
        (lambda: store.add_sweep_run("nope", other.id, "z"), ErrorCode.NOT_FOUND),
        (lambda: store.add_sweep_run(sweep.id, other.id, ""), ErrorCode.INVALID_ARGUMENT),
        (lambda: store.list_sweeps(limit=-1), ErrorCode.INVALID_ARGUMENT),
        (lambda: store.delete_sweep("nope"), ErrorCode.NOT_FOUND),
    ]
    for call, code in cases:
        with pytest.raises(BnnError) as err:
            call()
        assert err.value.code is code, err.value
    assert store.get_sweep(sweep.id).runs == [("x", run.id)]  # nothing half-written


def test_add_sweep_runs_creates_and_links_many_in_one_go(store: RunStore) -> None:
    sweep = store.create_sweep("study", {})
    first = store.create_run("r0", {}, status=RunStatus.QUEUED)
    store.add_sweep_run(sweep.id, first.id, "x0")
    batch = [(f"x{i}", f"run {i}", {"seed": i}, ["t"]) for i in range(1, 301)]
    ids = store.add_sweep_runs(sweep.id, batch)
    got = store.get_sweep(sweep.id)
    assert got.runs == [("x0", first.id)] + [(f"x{i}", ids[i - 1]) for i in range(1, 301)]
    run = store.get_run(ids[41])
    assert (run.name, run.config, run.tags, run.status) == (
        "run 42",
        {"seed": 42},
        ["t"],
        RunStatus.QUEUED,
    )
    statuses = store.run_statuses([first.id, *ids, "0123456789ab"])  # unknown ids left out
    assert len(statuses) == 301 and set(statuses.values()) == {RunStatus.QUEUED}
    # all or nothing: a label the sweep has, or a repeated one, stores no run
    before = len(store.list_runs())
    for bad, code in [
        ([("y", "a", {}, []), ("x0", "b", {}, [])], ErrorCode.CONFLICT),
        ([("y", "a", {}, []), ("y", "b", {}, [])], ErrorCode.INVALID_ARGUMENT),
        ([("", "a", {}, [])], ErrorCode.INVALID_ARGUMENT),
        ([("y", "a" * 300, {}, [])], ErrorCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(BnnError) as err:
            store.add_sweep_runs(sweep.id, bad)
        assert err.value.code is code
    assert len(store.list_runs()) == before and len(store.get_sweep(sweep.id).runs) == 301
