"""A real trainer process killed with SIGKILL mid-run loses at most the epoch in flight."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from trainer.store import RunReader, RunStatus, RunStore, load_distribution_log

REPO = Path(__file__).resolve().parents[2]


def test_sigkill_mid_run_leaves_only_complete_epochs(tmp_path: Path) -> None:
    env = {**os.environ, "BNN_HEARTBEAT_S": "0.2"}
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "train",
        "--dataset",
        "regression",
        "--n-train",
        "20000",
        "--n-test",
        "64",
        "--eval-samples",
        "2",
        "--epochs",
        "500",
        "--widths",
        "64,64",
        "--no-progress",
        "--data-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        store = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (
                proc.stderr.read().decode() if proc.stderr else "trainer exited"
            )
            if (tmp_path / "catalog.db").exists():
                store = store or RunStore(tmp_path, stale_after_s=3600)
                runs = store.list_runs()
                if runs and len(store.list_epochs(runs[0].id)) >= 3:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the trainer did not capture 3 epochs in time")
        time.sleep(0.13)  # land somewhere inside a later epoch
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    store = RunStore(tmp_path, stale_after_s=3600)
    run = store.list_runs()[0]
    assert run.status is RunStatus.RUNNING  # heartbeat not yet stale under a 1 h limit
    epochs = [e.epoch for e in store.list_epochs(run.id)]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 3

    reader = RunReader(run.id, data_dir=tmp_path)
    assert reader.epochs == epochs
    for epoch in epochs:  # every catalogued epoch is whole: checksum and schema
        reader.verify(epoch)
    log = load_distribution_log(run.id, data_dir=tmp_path)
    assert sorted(log) == epochs
    assert all(np.isfinite(log[e]["layer2"]["posterior"]["weight"]["mu"]).all() for e in epochs)

    time.sleep(1.5)
    stale = RunStore(tmp_path, stale_after_s=1.0)
    after = stale.get_run(run.id)
    assert after.status is RunStatus.INTERRUPTED
    assert after.error and "heartbeat" in after.error
