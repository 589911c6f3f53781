"""Consistency check and repair of a run store after crashes (``bnn runs fsck``).

A crash can leave, by the write protocol of :class:`~trainer.store.RunStore`:

* ``tmp`` -- a temp file ``runs/<run>/epoch_*.h5.tmp.<pid>.<hex>`` of a writer that died
  (its lock is free and its pid gone or reused; see :mod:`trainer.store._paths`);
* ``upload_tmp`` -- the same in ``<data>/uploads`` (the service's upload in progress);
* ``orphan`` -- a complete epoch file renamed into place whose catalog row was never
  committed. A valid file of a catalogued run is *adopted*: its row is committed with the
  checksum recomputed and the metrics read from the file's ``/metrics`` group (the run's
  heartbeat is not touched). Anything else (an invalid file, a folder of no catalogued run)
  is moved to ``<data>/lost+found/<run>/``;
* ``unknown_run_dir`` -- an empty folder of no catalogued run (removed);
* ``compact`` -- the journal ``runs/<run>/epoch_*.h5.compact`` of a compaction that did
  not finish (:mod:`trainer.store.compact`): when the file in place is the journal's new
  one and the catalog row still holds the old checksum, the row gets the new size and
  checksum (``commit``); a journal whose compaction never renamed its file, or whose row
  already holds the new checksum, is removed; any other combination is left for a person
  (and the ``checksum`` check below reports the epoch);

and a damaged store can show

* ``missing`` / ``checksum`` -- a catalogued epoch whose file is gone or whose bytes differ
  from the catalogued size or sha256 (reported and marked in the run's ``summary["fsck"]``;
  a later clean full check clears the mark);
* ``stale_running`` -- a RUNNING run without a heartbeat for ``stale_after_s`` (reported
  only: the catalog marks it INTERRUPTED when runs are next listed).

``fsck(store)`` only reports; ``repair=True`` also fixes. A run's orphans are handled
under its run lock (the one a writer holds from rename to commit), so a live writer's file
is never taken for an orphan; live writers' temp files are never touched. Checksums of all
catalogued files are read only with ``verify=True``; ``catalog=False`` skips the catalogued
files altogether (the service does that at start: orphans and temp files only).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from trainer.errors import BnnError

from . import _paths as paths
from ._records import RunStatus, encode_json, stale_after_default, utcnow
from .catalog import EpochRow, RunRow
from .compact import journal_epoch, read_journal, replace_checksum
from .hdf5 import EpochFile

if TYPE_CHECKING:
    from .runstore import RunStore

__all__ = ["KINDS", "LOST_FOUND", "Finding", "FsckReport", "fsck"]

LOST_FOUND = "lost+found"
KINDS = (
    "orphan",
    "compact",
    "tmp",
    "upload_tmp",
    "unknown_run_dir",
    "missing",
    "checksum",
    "stale_running",
)
_EPOCH_FILE = re.compile(r"^epoch_(\d{6,})\.h5$")


@dataclass
class Finding:
    """One thing fsck found, what repair does (or did) about it, and whether that worked.

    ``path`` is relative to the data directory. ``problem`` is False for notes that need no
    repair (a live writer's temp file, a stale RUNNING run).
    """

    kind: str
    path: str | None = None
    run_id: str | None = None
    epoch: int | None = None
    size: int = 0
    action: str = ""
    detail: str = ""
    problem: bool = True
    done: bool = False
    error: str | None = None

    @property
    def open(self) -> bool:
        """A problem that is still there (not repaired)."""
        return self.problem and not self.done


@dataclass
class FsckReport:
    """What :func:`fsck` found and did; ``clean`` is what ``bnn runs fsck`` exits 0 on."""

    data_dir: str
    catalog: str
    repair: bool
    verified: bool
    runs: int = 0
    epochs: int = 0
    elapsed_s: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        """Problems found and (with ``repair``) not fixed."""
        return [f for f in self.findings if f.open]

    @property
    def clean(self) -> bool:
        return not self.problems

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def counts(self) -> dict[str, int]:
        """Findings per kind (all kinds listed), problems only."""
        return {k: sum(1 for f in self.findings if f.kind == k and f.problem) for k in KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "catalog": self.catalog,
            "repair": self.repair,
            "verified": self.verified,
            "runs": self.runs,
            "epochs": self.epochs,
            "elapsed_s": round(self.elapsed_s, 3),
            "clean": self.clean,
            "counts": self.counts(),
            "findings": [asdict(f) for f in self.findings],
        }

    def table(self) -> str:
        """A plain-text table of the findings and a summary line."""
        head = ("KIND", "RUN", "EPOCH", "SIZE", "ACTION", "DETAIL")
        rows = [
            (
                f.kind,
                f.run_id or "-",
                "-" if f.epoch is None else str(f.epoch),
                _human(f.size) if f.size else "-",
                _action_text(f, self.repair),
                (f.path or "") + (f": {f.detail}" if f.detail and f.path else f.detail),
            )
            for f in self.findings
        ]
        lines = []
        if rows:
            widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
            for row in [head, *rows]:
                lines.append(
                    "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5]
                )
        problems = self.problems
        counts = ", ".join(f"{n} {k}" for k, n in self.counts().items() if n) or "nothing"
        what = "checked" + (" (checksums verified)" if self.verified else "")
        lines.append(
            f"{what} {self.runs} runs, {self.epochs} catalogued epochs in {self.data_dir} "
            f"({self.elapsed_s:.1f} s): found {counts}; "
            + ("clean" if not problems else f"{len(problems)} problem(s) left")
            + ("" if self.repair or not problems else " -- run with --repair to fix")
        )
        return "\n".join(line.rstrip() for line in lines)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)  # pragma: no cover


def _action_text(f: Finding, repair: bool) -> str:
    if f.error:
        return f"FAILED {f.action}"
    if not f.problem or not repair:
        return f.action
    return f"{f.action}: done" if f.done else f.action


# ----------------------------------------------------------------------------- the check
def fsck(
    store: RunStore,
    *,
    repair: bool = False,
    verify: bool = True,
    catalog: bool = True,
    run_ids: Iterable[str] | None = None,
    uploads: bool = True,
) -> FsckReport:
    """Check ``store`` (files against catalog, see the module docstring); fix with ``repair``.

    Args:
        repair: fix what can be fixed (otherwise nothing is changed).
        verify: recompute the sha256 of every catalogued file (else sizes only).
        catalog: check the catalogued files at all (missing / size / checksum).
        run_ids: only these runs (their folders and rows; stale runs among them).
        uploads: also look at ``<data>/uploads``.
    """
    t0 = time.monotonic()
    only = None if run_ids is None else {paths.validate_run_id(r) for r in run_ids}
    report = FsckReport(str(store.data_dir), store.url, repair, verify and catalog)
    dirs = _run_dirs(store.data_dir / "runs", only)  # folders first: a run's row comes first
    runs, rows = _catalog_state(store, only)
    report.runs, report.epochs = len(runs), sum(len(v) for v in rows.values())
    for run_id, run_dir in sorted(dirs.items()):
        _check_run_dir(store, report, run_id, run_dir, run_id in runs, rows.get(run_id, {}))
    if uploads and only is None:
        _check_uploads(store.data_dir, report)
    if catalog:
        _check_catalogued(store, report, runs, rows, dirs, verify)
    _check_stale(store, report, runs)
    report.elapsed_s = time.monotonic() - t0
    return report


def _run_dirs(root: Path, only: set[str] | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(root):
            if (
                entry.is_dir(follow_symlinks=False)
                and paths.RUN_ID_PATTERN.match(entry.name)
                and (only is None or entry.name in only)
            ):
                out[entry.name] = Path(entry.path)
    return out


@dataclass(frozen=True)
class _Run:
    status: str
    last_seen: datetime
    host: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Row:
    file: str
    size: int
    checksum: str


def _catalog_state(
    store: RunStore, only: set[str] | None
) -> tuple[dict[str, _Run], dict[str, dict[int, _Row]]]:
    """Runs and epoch rows, read without reaping stale runs (a report changes nothing)."""
    run_q = select(
        RunRow.id,
        RunRow.status,
        RunRow.heartbeat_at,
        RunRow.updated_at,
        RunRow.host,
        RunRow.summary,
    )
    epoch_q = select(
        EpochRow.run_id, EpochRow.epoch, EpochRow.file, EpochRow.size, EpochRow.checksum
    )
    if only is not None:
        run_q = run_q.where(RunRow.id.in_(sorted(only)))
        epoch_q = epoch_q.where(EpochRow.run_id.in_(sorted(only)))
    runs: dict[str, _Run] = {}
    rows: dict[str, dict[int, _Row]] = {}
    with store._session() as s:
        for rid, status, heartbeat, updated, host, summary in s.execute(run_q):
            runs[rid] = _Run(status, heartbeat or updated, host or "", dict(summary or {}))
        for rid, epoch, file, size, checksum in s.execute(epoch_q):
            rows.setdefault(rid, {})[epoch] = _Row(file, size, checksum)
    return runs, rows


def _rel(data_dir: Path, path: Path) -> str:
    try:
        return path.relative_to(data_dir).as_posix()
    except ValueError:  # pragma: no cover
        return str(path)


def _tmp_finding(data_dir: Path, path: Path, kind: str, repair: bool) -> Finding | None:
    try:
        size = path.lstat().st_size
    except FileNotFoundError:
        return None
    finding = Finding(kind, _rel(data_dir, path), size=size)
    if kind == "tmp":
        finding.run_id = path.parent.name
    try:
        if repair:
            if paths.remove_dead_tmp(path):
                finding.action, finding.done = "remove", True
                finding.detail = "writer dead"
                return finding
            state = "gone" if not path.exists() else "alive"
        else:
            state = paths.probe_tmp(path)
    except OSError as exc:
        finding.action, finding.error = "remove", f"{type(exc).__name__}: {exc}"
        return finding
    if state == "gone":
        return None
    if state == "alive":
        finding.action, finding.problem, finding.detail = "keep", False, "writer alive"
    else:
        finding.action, finding.detail = "remove", "writer dead"
    return finding


@contextlib.contextmanager
def _maybe_locked(run_dir: Path, lock: bool) -> Iterator[None]:
    if lock:
        with paths.run_lock(run_dir):
            yield
    else:
        yield


def _check_run_dir(
    store: RunStore,
    report: FsckReport,
    run_id: str,
    run_dir: Path,
    known: bool,
    rows: dict[int, _Row],
) -> None:
    data_dir = store.data_dir
    candidates: list[tuple[int, Path]] = []
    journals: list[tuple[int, Path]] = []
    others = 0
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return
    for entry in entries:
        if not entry.is_file(follow_symlinks=False):
            others += 1
            continue
        if paths.is_tmp_name(entry.name):
            found = _tmp_finding(data_dir, Path(entry.path), "tmp", report.repair)
            if found is not None:
                report.findings.append(found)
            continue
        journal = journal_epoch(entry.name)
        if journal is not None and known:
            journals.append((journal, Path(entry.path)))
            continue
        match = _EPOCH_FILE.match(entry.name)
        if match and paths.epoch_filename(int(match.group(1))) == entry.name:
            if int(match.group(1)) not in rows:
                candidates.append((int(match.group(1)), Path(entry.path)))
        elif entry.name != ".lock":
            others += 1
    if journals:
        # compactions hold the run lock from their journal to its removal
        with _maybe_locked(run_dir, report.repair or (run_dir / ".lock").exists()):
            for epoch, path in sorted(journals):
                found = _journal(store, run_id, epoch, path, rows, report.repair)
                if found is not None:
                    report.findings.append(found)
    if candidates:
        # the run lock (held by writers from rename to commit) makes the second look final
        with _maybe_locked(run_dir, report.repair or (run_dir / ".lock").exists()):
            for epoch, path in sorted(candidates):
                found = _orphan(store, run_id, epoch, path, report.repair)
                if found is not None:
                    report.findings.append(found)
    if not known and others == 0 and report.repair:
        leftover = {e.name for e in os.scandir(run_dir)} - {".lock"}
        if not leftover:
            finding = Finding(
                "unknown_run_dir",
                _rel(data_dir, run_dir),
                run_id,
                action="remove",
                detail="folder of no catalogued run",
            )
            try:
                (run_dir / ".lock").unlink(missing_ok=True)
                run_dir.rmdir()
                finding.done = True
            except OSError as exc:
                finding.error = f"{type(exc).__name__}: {exc}"
            report.findings.append(finding)
    elif not known and others == 0 and not candidates:
        report.findings.append(
            Finding(
                "unknown_run_dir",
                _rel(data_dir, run_dir),
                run_id,
                action="remove",
                detail="folder of no catalogued run",
            )
        )


def _row_state(store: RunStore, run_id: str, epoch: int) -> tuple[bool, bool]:
    """(run catalogued, epoch row exists) as of now."""
    with store._session() as s:
        run = s.get(RunRow, run_id)
        return run is not None, run is not None and s.get(EpochRow, (run_id, epoch)) is not None


def _orphan(store: RunStore, run_id: str, epoch: int, path: Path, repair: bool) -> Finding | None:
    known, catalogued = _row_state(store, run_id, epoch)
    if catalogued:  # committed meanwhile by a live writer
        return None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    finding = Finding("orphan", _rel(store.data_dir, path), run_id, epoch, size)
    metrics: dict[str, float] = {}
    reason = ""
    try:
        with EpochFile(path) as ef:
            ef.validate()
            header = ef.header
        if header.epoch != epoch:
            reason = f"the file holds epoch {header.epoch}"
        metrics = dict(header.metrics)
    except BnnError as exc:
        reason = str(exc)
    if not known:
        reason = reason or "its run is not in the catalog"
    finding.action = "lost+found" if reason else "adopt"
    finding.detail = reason or "complete file without a catalog row"
    if not repair:
        return finding
    try:
        if reason:
            dest = _move_to_lost_found(store.data_dir, run_id, path)
            finding.detail += f" -> {_rel(store.data_dir, dest)}"
        else:
            _adopt(store, run_id, epoch, path, metrics)
        finding.done = True
    except (OSError, BnnError) as exc:
        finding.error = f"{type(exc).__name__}: {exc}"
        finding.detail += f" ({finding.error})"
    return finding


def _journal(
    store: RunStore, run_id: str, epoch: int, path: Path, rows: dict[int, _Row], repair: bool
) -> Finding | None:
    """A compaction's journal (see ``compact`` in the module docstring); ``rows`` gets the
    committed checksum, so the catalogued files are checked against what the row holds now."""
    if not path.exists():  # settled meanwhile
        return None
    finding = Finding("compact", _rel(store.data_dir, path), run_id, epoch)
    state = read_journal(path)
    with store._session() as s:
        row = s.get(EpochRow, (run_id, epoch))
        catalogued = None if row is None else (row.file, row.size, row.checksum)
    epoch_file = store.data_dir / paths.epoch_relpath(run_id, epoch)
    try:
        digest: str | None = paths.sha256_file(epoch_file)
        finding.size = epoch_file.stat().st_size
    except OSError:
        digest = None
    commit = False
    if catalogued is None:
        finding.action, finding.detail = "remove", "journal of an epoch no longer catalogued"
    elif state is None:
        if digest == catalogued[2]:
            finding.action = "remove"
            finding.detail = "unreadable journal; the file is the catalogued one"
        else:
            finding.action = "keep"
            finding.detail = "unreadable journal, and the file is not the catalogued one"
    elif catalogued[2] == state["new"]["sha256"]:
        finding.action, finding.detail = "remove", "compaction committed"
    elif catalogued[2] == state["old"]["sha256"] and digest == state["new"]["sha256"]:
        finding.action, commit = "commit", True
        finding.detail = "compacted file in place, catalog row not yet updated"
    elif catalogued[2] == state["old"]["sha256"] and digest == state["old"]["sha256"]:
        finding.action, finding.detail = "remove", "compaction stopped before its rename"
    else:
        finding.action = "keep"
        finding.detail = "neither the journal's old nor its new file is in place"
    if not repair or finding.action == "keep":
        return finding
    try:
        if commit:
            assert state is not None and catalogued is not None
            new = state["new"]
            if not replace_checksum(
                store, run_id, epoch, state["old"]["sha256"], new["size"], new["sha256"]
            ):
                finding.error = "the catalog row changed meanwhile"
                return finding
            rows[epoch] = _Row(catalogued[0], new["size"], new["sha256"])
        path.unlink(missing_ok=True)
        paths.fsync_dir(path.parent)
        finding.done = True
    except (OSError, BnnError) as exc:
        finding.error = f"{type(exc).__name__}: {exc}"
        finding.detail += f" ({finding.error})"
    return finding


def _adopt(store: RunStore, run_id: str, epoch: int, path: Path, metrics: dict[str, float]) -> None:
    """Commit the row of a complete file in place (the writer's commit that never came)."""
    st = path.stat()
    checksum = paths.sha256_file(path)
    with store._session(write=True) as s:
        store._row(s, run_id, lock=True)
        if s.get(EpochRow, (run_id, epoch)) is not None:
            return
        s.add(
            EpochRow(
                run_id=run_id,
                epoch=epoch,
                metrics=encode_json(metrics, "metrics"),
                file=paths.epoch_relpath(run_id, epoch),
                size=st.st_size,
                checksum=checksum,
                created_at=datetime.fromtimestamp(st.st_mtime, UTC),
            )
        )


def _move_to_lost_found(data_dir: Path, run_id: str, path: Path) -> Path:
    target_dir = paths.ensure_dir(data_dir / LOST_FOUND / run_id)
    dest = target_dir / path.name
    n = 0
    while dest.exists():
        n += 1
        dest = target_dir / f"{path.name}.{n}"
    os.replace(path, dest)
    paths.fsync_dir(target_dir)
    paths.fsync_dir(path.parent)
    return dest


def _check_uploads(data_dir: Path, report: FsckReport) -> None:
    uploads = data_dir / paths.UPLOAD_DIR
    try:
        entries = list(os.scandir(uploads))
    except OSError:
        return
    for entry in entries:  # everything in uploads/ is a temp file of an upload
        if entry.is_file(follow_symlinks=False):
            found = _tmp_finding(data_dir, Path(entry.path), "upload_tmp", report.repair)
            if found is not None:
                report.findings.append(found)


def _check_catalogued(
    store: RunStore,
    report: FsckReport,
    runs: dict[str, _Run],
    rows: dict[str, dict[int, _Row]],
    dirs: dict[str, Path],
    verify: bool,
) -> None:
    here = socket.gethostname()
    for run_id in sorted(rows):
        run = runs.get(run_id)
        if run_id not in dirs and run is not None and run.host and run.host != here:
            report.findings.append(
                Finding(
                    "missing",
                    f"runs/{run_id}",
                    run_id,
                    action="report",
                    problem=False,
                    detail=f"run written on {run.host}; its files are not in this data dir",
                )
            )
            continue
        missing: list[int] = []
        bad: list[int] = []
        for epoch, row in sorted(rows[run_id].items()):
            rel = paths.epoch_relpath(run_id, epoch)
            path = store.data_dir / rel
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                missing.append(epoch)
                report.findings.append(
                    Finding(
                        "missing", rel, run_id, epoch, action="mark", detail="catalogued, no file"
                    )
                )
                continue
            except OSError as exc:
                report.findings.append(
                    Finding("missing", rel, run_id, epoch, action="mark", detail=str(exc))
                )
                missing.append(epoch)
                continue
            why = ""
            if size != row.size:
                why = f"size {size}, catalogued {row.size}"
            elif verify:
                try:
                    digest = paths.sha256_file(path)
                except OSError as exc:
                    digest = f"unreadable: {exc}"
                if digest != row.checksum:
                    why = f"sha256 {digest[:12]}..., catalogued {row.checksum[:12]}..."
            if why:
                bad.append(epoch)
                report.findings.append(
                    Finding("checksum", rel, run_id, epoch, size, action="mark", detail=why)
                )
        if report.repair and run is not None:
            _mark(store, report, run_id, run, missing, bad, cleared=verify)


def _mark(
    store: RunStore,
    report: FsckReport,
    run_id: str,
    run: _Run,
    missing: list[int],
    bad: list[int],
    *,
    cleared: bool,
) -> None:
    """Record damage in ``summary["fsck"]``; a clean verified check clears an old mark."""
    mine = [f for f in report.findings if f.run_id == run_id and f.kind in ("missing", "checksum")]
    if missing or bad:
        mark = {
            "checked_at": utcnow().isoformat(),
            "missing_epochs": missing,
            "bad_epochs": bad,
        }
    elif cleared and run.summary.get("fsck"):
        mark = None
    else:
        return
    try:
        store.set_summary(run_id, {"fsck": mark})
        for f in mine:
            f.action = "mark"
    except BnnError as exc:
        for f in mine:
            f.error = str(exc)
    # marked is not repaired: these stay problems (f.done stays False)


def _check_stale(store: RunStore, report: FsckReport, runs: dict[str, _Run]) -> None:
    limit = store.stale_after_s or stale_after_default() or 60.0
    cutoff = utcnow() - timedelta(seconds=limit)
    for run_id, run in sorted(runs.items()):
        if run.status == RunStatus.RUNNING.value and run.last_seen < cutoff:
            age = (utcnow() - run.last_seen).total_seconds()
            report.findings.append(
                Finding(
                    "stale_running",
                    None,
                    run_id,
                    action="report",
                    problem=False,
                    detail=f"RUNNING, no heartbeat for {age:.0f} s (listing runs marks it "
                    "interrupted)",
                )
            )
