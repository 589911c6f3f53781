"""Captured epochs are written on a background thread while the next epoch trains.

An epoch counts as captured (``TrainResult.captured_epochs``) only once the sink has stored
it; the run's final status is set after the last write; a failed write fails the run with
the write's error. What a process killed in the middle of a background write leaves behind
is what any killed writer leaves: ``tests/trainer/test_crashloop.py`` SIGKILLs ``bnn train``
(whose writes are now in the background) at the store's write, rename and commit points and
checks that ``fsck --repair`` recovers every catalogued epoch unchanged.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from trainer.config import parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot
from trainer.store import RunStore
from trainer.train import Trainer

TINY = {"dataset": "regression", "n_train": 128, "n_test": 64, "eval_samples": 2, "seed": 0}


class SlowSink:
    """A real store whose writes take ``delay`` seconds and are logged with their thread."""

    def __init__(self, root: Path, delay: float, fail_at: int | None = None) -> None:
        self.store = RunStore(root)
        self.delay, self.fail_at = delay, fail_at
        self.events: list[tuple[str, Any, float, str]] = []

    def create_run(self, name: str | None, config: dict[str, Any], tags: Any = ()) -> Any:
        return self.store.create_run(name, config, tags=tags)

    def write_epoch(self, run_id: str, snap: EpochSnapshot) -> Any:
        start = time.perf_counter()
        self.events.append(("write-start", snap.epoch, start, threading.current_thread().name))
        time.sleep(self.delay)
        if snap.epoch == self.fail_at:
            raise BnnError(ErrorCode.STORAGE, f"disk full while writing epoch {snap.epoch}")
        info = self.store.write_epoch(run_id, snap)
        self.events.append(("write-end", snap.epoch, time.perf_counter(), ""))
        return info

    def heartbeat(self, run_id: str) -> None:
        self.store.heartbeat(run_id)

    def set_status(self, run_id: str, status: Any, error: str | None = None) -> Any:
        self.events.append(("status", status, time.perf_counter(), error or ""))
        return self.store.set_status(run_id, status, error=error)


def _trainer(sink: SlowSink, **kwargs: Any) -> tuple[Trainer, list[tuple[int, float]]]:
    epochs: list[tuple[int, float]] = []
    trainer = Trainer(
        parse_config({**TINY, "epochs": 4, "grad_capture": "element"}),
        sink=sink,
        progress=False,
        on_epoch=lambda epoch, metrics: epochs.append((epoch, time.perf_counter())),
        **kwargs,
    )
    return trainer, epochs


def test_epochs_are_written_in_the_background_in_order_before_the_status(tmp_path: Path) -> None:
    sink = SlowSink(tmp_path, delay=0.4)
    trainer, _ = _trainer(sink)
    started: dict[int, float] = {}
    train_epoch = trainer.train_epoch

    def timed(epoch: int, capture: bool) -> dict[str, float]:
        started[epoch] = time.perf_counter()
        return train_epoch(epoch, capture)

    trainer.train_epoch = timed  # type: ignore[method-assign]
    result = trainer.fit()
    assert result.captured_epochs == [0, 1, 2, 3]
    starts = [e for e in sink.events if e[0] == "write-start"]
    ends = {e[1]: e[2] for e in sink.events if e[0] == "write-end"}
    assert [e[1] for e in starts] == [0, 1, 2, 3]
    assert all(name.startswith("bnn-epoch-") for *_, name in starts)  # not the training thread
    # the next epoch trained while the previous one was being written ...
    assert all(started[e + 1] < ends[e] for e in range(3))
    # ... but the run was completed only after the last write
    (status,) = [e for e in sink.events if e[0] == "status"]
    assert status[1] == "completed" and status[2] > max(ends.values())
    with sink.store as store:
        assert [e.epoch for e in store.list_epochs(result.run_id or "")] == [0, 1, 2, 3]
        assert store.get_run(result.run_id or "").status == "completed"


def test_a_failed_background_write_fails_the_run_with_its_error(tmp_path: Path) -> None:
    sink = SlowSink(tmp_path, delay=0.05, fail_at=1)
    trainer, epochs = _trainer(sink)
    with pytest.raises(BnnError, match="disk full while writing epoch 1"):
        trainer.fit()
    (status,) = [e for e in sink.events if e[0] == "status"]
    assert status[1] == "failed" and "disk full while writing epoch 1" in status[3]
    assert max(e for e, _ in epochs) <= 2  # found at the next epoch's hand-over at the latest
    with sink.store as store:
        (run,) = store.list_runs()
        assert [e.epoch for e in store.list_epochs(run.id)] == [0]
        assert run.status == "failed"


def test_inline_writes_when_asked(tmp_path: Path) -> None:
    sink = SlowSink(tmp_path, delay=0.0)
    trainer, _ = _trainer(sink, background_writes=False)
    result = trainer.fit()
    assert result.captured_epochs == [0, 1, 2, 3]
    names = {name for kind, *_, name in sink.events if kind == "write-start"}
    assert names == {threading.main_thread().name}
