"""The study advancer: moves studies from tuning to evaluation without a human in the loop.

A daemon thread started with the app (every ``BNN_STUDY_POLL_S`` seconds, default 2; 0 turns
the loop off) lists the studies still tuning, calls :func:`service.demo.study.advance_study`
and hands the evaluation runs it registers to the job runner, each run once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fastapi import FastAPI

from service.demo.study import STUDY_KIND, advance_study
from service.demo.study import study_phase as recorded_phase
from service.deps import get_jobs
from service.settings import Settings
from trainer.store import RunStore, SweepInfo

__all__ = ["DEFAULT_POLL_S", "StudyAdvancer", "Submitter", "jobs_of", "poll_seconds"]

log = logging.getLogger("bnn.studies")

DEFAULT_POLL_S = 2.0


class Submitter(Protocol):
    def submit(self, run_id: str, config: dict[str, Any]) -> None: ...

    def cancel(self, run_id: str, *, started: bool) -> None: ...

    def busy(self, run_id: str) -> bool: ...


def jobs_of(app: FastAPI) -> Submitter:
    """The job runner the routers see: a test's ``get_jobs`` override, else the app's."""
    override = app.dependency_overrides.get(get_jobs)
    if override is not None:
        try:
            jobs: Submitter = override()
            return jobs
        except TypeError:  # an override that needs the request: use the app's runner
            pass
    runner: Submitter = app.state.jobs
    return runner


def poll_seconds(settings: Settings) -> float:
    """``BNN_STUDY_POLL_S`` (a settings field of that name wins); 0 turns the loop off."""
    value: Any = getattr(settings, "study_poll_s", None)
    if value is None:
        value = os.environ.get("BNN_STUDY_POLL_S", DEFAULT_POLL_S)
    try:
        poll = float(value)
    except (TypeError, ValueError):
        poll = math.nan
    if not math.isfinite(poll) or poll < 0:
        log.warning("BNN_STUDY_POLL_S=%r is not a number >= 0; using %s", value, DEFAULT_POLL_S)
        return DEFAULT_POLL_S
    return poll


class StudyAdvancer:
    """Registers and submits the evaluation runs of studies whose tuning has ended.

    One lock serialises every change to a study's runs and summary (registration, advance,
    cancel, the table cache), so two callers never register the same evaluation runs and a
    cancelled study is never advanced; a run id is handed to the job runner at most once.
    """

    def __init__(self, store: RunStore, jobs: Callable[[], Submitter], poll_s: float) -> None:
        self.store, self._jobs, self.poll_s = store, jobs, poll_s
        self.lock = threading.RLock()
        self._submitted: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: set[str] = set()

    def submit(self, runs: Iterable[tuple[str, str, dict[str, Any]]], jobs: Submitter) -> None:
        with self.lock:
            fresh = [(rid, cfg) for _, rid, cfg in runs if rid not in self._submitted]
            self._submitted.update(rid for rid, _ in fresh)
        for run_id, config in fresh:
            jobs.submit(run_id, config)

    def advance(self, study_id: str, jobs: Submitter | None = None) -> SweepInfo:
        """Advance one study (a no-op unless its tuning runs have all ended)."""
        with self.lock:
            sweep, runs = advance_study(self.store, study_id)
        if runs:
            log.info("study %s: %d evaluation runs registered", study_id, len(runs))
            self.submit(runs, jobs or self._jobs())
        return sweep

    def tick(self) -> None:
        """Advance every study still tuning; logs failures, never raises."""
        try:
            studies = self.store.list_sweeps(kind=STUDY_KIND)
        except Exception:
            log.exception("cannot list the studies")
            return
        for sweep in studies:
            if self._stop.is_set():
                return
            if recorded_phase(sweep) != "tuning":
                continue
            try:
                self.advance(sweep.id)
            except Exception:
                if sweep.id not in self._reported:  # once per study, not every poll
                    self._reported.add(sweep.id)
                    log.exception("cannot advance study %s", sweep.id)

    def start(self) -> None:
        if self.poll_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bnn-studies", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop and wait for a tick in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:  # pragma: no cover - tick catches its own
                log.exception("study advancer tick failed")
