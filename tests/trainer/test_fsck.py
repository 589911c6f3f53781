"""``RunStore.fsck`` / ``bnn runs fsck``: what crashes leave is found, reported and repaired."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main
from service.settings import Settings
from trainer.store import RunReader, RunStatus, RunStore
from trainer.store import _paths as paths
from trainer.store.fsck import LOST_FOUND

from .conftest import SnapshotFactory


@pytest.fixture
def store(tmp_path: Path, db_url: str | None) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "data", db_url, stale_after_s=0)
    try:
        yield s
    finally:
        s.close()


def _orphan(store: RunStore, run_id: str, make_snapshot: SnapshotFactory, epoch: int) -> Path:
    """A complete epoch file renamed into place whose catalog row never came (a crash)."""
    final = store.data_dir / paths.epoch_relpath(run_id, epoch)
    from trainer.store import write_epoch_file

    write_epoch_file(final, make_snapshot(epoch), run_id=run_id)
    return final


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _checksums(store: RunStore) -> dict[tuple[str, int], str]:
    return {(r.id, e.epoch): e.checksum for r in store.list_runs() for e in store.list_epochs(r.id)}


def test_a_clean_store_is_clean(store: RunStore, make_snapshot: SnapshotFactory) -> None:
    run = store.create_run("r")
    for epoch in range(3):
        store.write_epoch(run.id, make_snapshot(epoch))
    report = store.fsck()
    assert report.clean and report.epochs == 3 and report.runs == 1
    assert report.counts() == dict.fromkeys(report.counts(), 0)
    assert "clean" in report.table()


def test_orphans_are_adopted_or_set_aside(
    store: RunStore, make_snapshot: SnapshotFactory, tmp_path: Path
) -> None:
    run = store.create_run("r")
    store.write_epoch(run.id, make_snapshot(0))
    before = _checksums(store)
    heartbeat = store.get_run(run.id).heartbeat_at
    good = _orphan(store, run.id, make_snapshot, 1)
    bad = store.data_dir / paths.epoch_relpath(run.id, 2)
    bad.write_bytes(b"not hdf5")
    wrong = store.data_dir / paths.epoch_relpath(run.id, 3)
    shutil.copyfile(good, wrong)  # holds epoch 1
    ghost_dir = store.data_dir / "runs" / "ghost"
    ghost_dir.mkdir()
    ghost = _orphan(store, "ghost", make_snapshot, 0)

    report = store.fsck()
    assert not report.clean
    actions = {(f.run_id, f.epoch): f.action for f in report.of("orphan")}
    assert actions == {
        (run.id, 1): "adopt",
        (run.id, 2): "lost+found",
        (run.id, 3): "lost+found",
        ("ghost", 0): "lost+found",
    }
    assert good.exists() and bad.exists() and _checksums(store) == before  # report only

    fixed = store.fsck(repair=True)
    assert fixed.clean, fixed.table()
    assert all(f.done for f in fixed.of("orphan"))
    info = store.get_epoch(run.id, 1)
    assert info.checksum == paths.sha256_file(good) and info.size == good.stat().st_size
    assert info.metrics == pytest.approx(make_snapshot(1).metrics)
    assert store.get_run(run.id).heartbeat_at == heartbeat  # adoption is not a sign of life
    RunReader(run.id, store=store).verify(1)
    lost = store.data_dir / LOST_FOUND
    assert (lost / run.id / bad.name).read_bytes() == b"not hdf5"
    assert (lost / run.id / wrong.name).is_file() and (lost / "ghost" / ghost.name).is_file()
    assert not bad.exists() and not wrong.exists() and not ghost_dir.exists()
    after = _checksums(store)
    assert {k: v for k, v in after.items() if k in before} == before
    assert store.fsck(repair=True).findings == []


def test_temp_files_go_only_when_their_writer_is_dead(
    store: RunStore, make_snapshot: SnapshotFactory
) -> None:
    run = store.create_run("r")
    run_dir = store.run_dir(run.id)
    dead = run_dir / f"epoch_000000.h5.tmp.{_dead_pid()}.0123abcd"
    dead.write_bytes(b"x" * 100)
    # a live pid whose process started after the file was last written: pid reused
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        reused = run_dir / f"epoch_000001.h5.tmp.{sleeper.pid}.0123abcd"
        reused.write_bytes(b"y")
        os.utime(reused, (time.time() - 30, time.time() - 30))
        unlocked_live = run_dir / f"epoch_000002.h5.tmp.{os.getpid()}.0123abcd"
        unlocked_live.write_bytes(b"z")  # this process, not locked: a writer that does not lock
        uploads = paths.ensure_dir(store.data_dir / paths.UPLOAD_DIR)
        legacy = uploads / "upload-abc123.h5"  # mkstemp-named, nobody holds it
        legacy.write_bytes(b"u")
        with (
            paths.locked_tmp(run_dir / "epoch_000003.h5") as held,
            paths.locked_tmp_file(uploads, "upload-", ".h5") as (fd, upload),
        ):
            os.close(fd)
            held.write_bytes(b"being written")
            os.utime(held, (time.time() - 3600, time.time() - 3600))  # age does not matter
            report = store.fsck()
            states = {Path(f.path or "").name: (f.action, f.problem) for f in report.findings}
            assert states == {
                dead.name: ("remove", True),
                reused.name: ("remove", True),
                unlocked_live.name: ("keep", False),
                held.name: ("keep", False),
                legacy.name: ("remove", True),
                upload.name: ("keep", False),
            }
            fixed = store.fsck(repair=True)
            assert fixed.clean
            assert held.exists() and upload.exists() and unlocked_live.exists()
            assert not dead.exists() and not reused.exists() and not legacy.exists()
        assert not held.exists() and not upload.exists()  # their writers cleaned up
    finally:
        sleeper.kill()
        sleeper.wait()
    unlocked_live.unlink()
    # the write path cleans the run's dead temps without any age limit, too
    dead2 = run_dir / f"epoch_000009.h5.tmp.{_dead_pid()}.0123abcd"
    dead2.write_bytes(b"x")
    store.write_epoch(run.id, make_snapshot(0))
    assert not dead2.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "epoch_000000.h5"]


def test_a_zombie_writer_is_dead(store: RunStore) -> None:
    run = store.create_run("r")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    tmp = store.run_dir(run.id) / f"epoch_000000.h5.tmp.{proc.pid}.0123abcd"
    tmp.write_bytes(b"x")
    os.utime(tmp, (time.time() + 5, time.time() + 5))  # written "after" the child started
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and paths.probe_tmp(tmp) != "dead":
        time.sleep(0.05)  # the child exits but is not reaped yet: a zombie holds nothing
    assert paths.probe_tmp(tmp) == "dead"
    proc.wait()


def test_missing_and_damaged_files_are_reported_and_marked(
    store: RunStore, make_snapshot: SnapshotFactory
) -> None:
    run = store.create_run("r")
    for epoch in range(3):
        store.write_epoch(run.id, make_snapshot(epoch))
    e0, e1 = (store.data_dir / paths.epoch_relpath(run.id, e) for e in (0, 1))
    saved0, saved1 = e0.read_bytes(), e1.read_bytes()
    e0.unlink()
    flipped = bytearray(saved1)
    flipped[-10] ^= 0xFF  # same size: only the checksum sees it
    e1.write_bytes(bytes(flipped))
    quick = store.fsck(verify=False)
    assert [f.epoch for f in quick.of("missing")] == [0] and not quick.of("checksum")
    report = store.fsck()
    assert [f.epoch for f in report.of("missing")] == [0]
    assert [f.epoch for f in report.of("checksum")] == [1]
    assert "fsck" not in store.get_run(run.id).summary  # report only
    repaired = store.fsck(repair=True)
    assert not repaired.clean  # marked, not fixed
    mark = store.get_run(run.id).summary["fsck"]
    assert mark["missing_epochs"] == [0] and mark["bad_epochs"] == [1]
    assert [e.epoch for e in store.list_epochs(run.id)] == [0, 1, 2]  # rows kept
    e0.write_bytes(saved0)
    e1.write_bytes(saved1)
    assert store.fsck(repair=True).clean
    assert store.get_run(run.id).summary["fsck"] is None


def test_stale_running_runs_are_reported_only(tmp_path: Path) -> None:
    store = RunStore(tmp_path, stale_after_s=0.2)
    run = store.create_run("r")
    time.sleep(0.4)
    report = store.fsck(repair=True)
    (stale,) = report.of("stale_running")
    assert stale.run_id == run.id and not stale.problem and report.clean
    with store._session() as s:  # not reaped by fsck
        assert store._row(s, run.id).status == RunStatus.RUNNING.value


def test_recover_run_repairs_one_run(store: RunStore, make_snapshot: SnapshotFactory) -> None:
    a, b = store.create_run("a"), store.create_run("b")
    orphan_a = _orphan(store, a.id, make_snapshot, 0)
    orphan_b = _orphan(store, b.id, make_snapshot, 0)
    tmp_a = store.run_dir(a.id) / f"epoch_000001.h5.tmp.{_dead_pid()}.0123abcd"
    tmp_a.write_bytes(b"x")
    report = store.recover_run(a.id)
    assert {f.kind for f in report.findings} == {"orphan", "tmp"} and report.clean
    assert store.get_epoch(a.id, 0).checksum == paths.sha256_file(orphan_a)
    assert not tmp_a.exists()
    assert store.list_epochs(b.id) == [] and orphan_b.exists()  # the other run untouched


def test_bnn_runs_fsck_command(
    tmp_path: Path, make_snapshot: SnapshotFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    with RunStore(tmp_path) as store:
        run = store.create_run("r")
        store.write_epoch(run.id, make_snapshot(0))
        _orphan(store, run.id, make_snapshot, 1)
        (store.run_dir(run.id) / f"epoch_000002.h5.tmp.{_dead_pid()}.00ff00ff").write_bytes(b"x")
    args = ["runs", "fsck", "--data-dir", str(tmp_path)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "orphan" in out and "adopt" in out and "tmp" in out and "--repair" in out
    assert main([*args, "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["orphan"] == 1 and data["counts"]["tmp"] == 1 and not data["clean"]
    assert main([*args, "--repair"]) == 0
    assert "adopt: done" in capsys.readouterr().out
    assert main(args) == 0
    assert "clean" in capsys.readouterr().out
    assert main(["runs", "fsck", "--data-dir", str(tmp_path / "nope")]) == 2


def test_the_service_recovers_at_start(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    data = tmp_path / "data"
    with RunStore(data) as store:
        run = store.create_run("r")
        store.write_epoch(run.id, make_snapshot(0))
        orphan = _orphan(store, run.id, make_snapshot, 1)
        tmp = store.run_dir(run.id) / f"epoch_000002.h5.tmp.{_dead_pid()}.0123abcd"
        tmp.write_bytes(b"x")
    uploads = paths.ensure_dir(data / paths.UPLOAD_DIR)
    fresh_upload = uploads / "upload-x1.h5"  # seconds old: no age limit keeps it
    fresh_upload.write_bytes(b"partial")
    with TestClient(create_app(Settings(data_dir=data))) as client:
        epochs = client.get(f"/runs/{run.id}/epochs").json()
        assert [e["epoch"] for e in epochs] == [0, 1]
        assert epochs[1]["checksum"] == paths.sha256_file(orphan)
    assert not tmp.exists() and not fresh_upload.exists()
