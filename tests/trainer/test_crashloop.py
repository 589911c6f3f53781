"""SIGKILLed writers leave only what ``fsck --repair`` recovers; nothing catalogued changes.

The kill points come from the store's test hook ``BNN_CRASH_AT=write|rename|commit:<n>``.
The 20-kill loop is ``benchmarks/crashloop.py`` (``make crashloop`` runs 100 kills).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from trainer.store import RunReader, RunStore

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--dataset",
    "regression",
    "--n-train",
    "96",
    "--n-test",
    "32",
    "--eval-samples",
    "2",
    "--no-progress",
    "--epochs",
    "4",
]


def _catalogued(store: RunStore) -> dict[tuple[str, int], str]:
    return {(r.id, e.epoch): e.checksum for r in store.list_runs() for e in store.list_epochs(r.id)}


def _verify_all(store: RunStore) -> int:
    n = 0
    for run in store.list_runs():
        reader = RunReader(run.id, store=store)
        for e in store.list_epochs(run.id):
            reader.verify(e.epoch)  # checksum and schema
            n += 1
    return n


def test_bnn_train_killed_at_write_rename_and_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BNN_HEARTBEAT_S": "0.2"}
    cmd = [sys.executable, "-m", "service.cli", "train", *TINY, "--data-dir", str(tmp_path)]
    RunStore(tmp_path).close()  # the catalog exists before three trainers start at once
    procs = {
        point: subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, "BNN_CRASH_AT": f"{point}:2"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for point in ("write", "rename", "commit")
    }
    for point, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, err.decode()[-2000:])

    with RunStore(tmp_path, stale_after_s=3600) as store:
        before = _catalogued(store)
        runs = {r.id: sorted(e for (rid, e) in before if rid == r.id) for r in store.list_runs()}
        report = store.fsck()
    assert sorted(runs.values()) == [[0], [0], [0, 1]]  # the second epoch's commit never came
    assert len(report.of("orphan")) == 1 and report.of("orphan")[0].action == "adopt"
    assert len(report.of("tmp")) == 1 and report.of("tmp")[0].action == "remove"

    assert main(["runs", "fsck", "--repair", "--json", "--data-dir", str(tmp_path)]) == 0
    repaired = json.loads(capsys.readouterr().out)
    assert repaired["clean"] and repaired["counts"]["orphan"] == 1

    with RunStore(tmp_path, stale_after_s=3600) as store:
        after_report = store.fsck()
        assert after_report.clean and not after_report.of("orphan") and not after_report.of("tmp")
        after = _catalogued(store)
        assert {k: after[k] for k in before} == before  # nothing catalogued changed
        assert len(after) == len(before) + 1  # the orphan, adopted
        assert _verify_all(store) == 5
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp." in p.name]
    assert leftovers == []


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_twenty_kills_of_the_trainer_then_fsck(
    tmp_path: Path, db: str, request: pytest.FixtureRequest
) -> None:
    pg = str(request.getfixturevalue("pg_database")) if db == "postgresql" else "unused"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "crashloop.py"),
        *["--kills", "20", "--modes", "trainer", "--db", db, "--seed", "1"],
        *["--pg-url", pg, "--data-dir", str(tmp_path), "--keep", "--json"],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads(proc.stdout)
    assert result["kills"] >= 20
    kills = result["kills_by"]
    assert all(kills.get(f"trainer@{p}") for p in ("write", "rename", "commit")), kills
    assert result["torn"] == result["lost"] == result["changed"] == 0
    assert result["leftovers_left_by_crashes"]["orphan"] >= 1  # the rename kill's, at least
    assert result["leftovers_left_by_crashes"]["tmp"] >= 1  # the write kill's, at least
    assert result["after_fsck"] == dict.fromkeys(result["after_fsck"], 0)

    local = result["stores"]["local"]
    with RunStore(local["data_dir"], local["db_url"], stale_after_s=0) as store:
        assert store.fsck().clean
        assert _verify_all(store) == result["catalogued_epochs"]
    assert [p for p in Path(local["data_dir"]).rglob("*") if ".tmp." in p.name] == []
