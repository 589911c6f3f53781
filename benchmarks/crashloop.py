"""Crash loop: SIGKILL writers of a run store over and over, then check what is left.

    python benchmarks/crashloop.py                        # `make crashloop`: 100 kills per catalog
    python benchmarks/crashloop.py --kills 20 --modes trainer --db sqlite --json

Each round starts one victim and kills it with SIGKILL:

* ``trainer`` -- ``bnn train`` writing a new run into the local store;
* ``push``    -- ``bnn push`` of a local run to a ``bnn serve`` on this machine;
* ``server``  -- that ``bnn serve`` while a push streams epochs into it (ingest).

at a random moment or, deterministically, at a point of the write protocol
(``BNN_CRASH_AT=write|rename|commit:<n>``, see :mod:`trainer.store.runstore`). A killed
server is started again by the next push round, so its start-up recovery runs too.

After every round the catalogued epochs of both stores are recorded (run, epoch ->
checksum) and the leftovers of crashes (orphaned epoch files, temp files) counted. At the
end ``fsck --repair`` runs on both stores and the loop reports: kills, catalogued epochs,
torn (catalogued but failing checksum or schema), lost (catalogued once, gone now),
changed (catalogued once, other bytes now), and orphans / temp files before and after
fsck. Exit status 1 when anything is torn, lost or changed, or left after fsck.

Victims are forked from this process after one warm-up run, so a round costs about a
second rather than a Python and torch start-up; they are real ``bnn`` commands
(``service.cli.main``) in their own processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("BNN_HEARTBEAT_S", "0.5")

from service.cli import main as bnn  # noqa: E402
from trainer.store import RunReader, RunStore  # noqa: E402
from trainer.store.runstore import CRASH_ENV  # noqa: E402

PG_DEFAULT = os.environ.get("BNN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
EPOCHS = 6
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
    str(EPOCHS),
]
LEFTOVER_KINDS = ("orphan", "tmp", "upload_tmp")


# ----------------------------------------------------------------------------- processes
def _spawn(main: Callable[[], int], env: dict[str, str] | None = None) -> int:
    """Run ``main()`` in a forked child (output discarded, ``env`` added, no crash hook of
    the parent's); returns its pid. The child exits with what ``main`` returns (70 if it
    raised)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.environ.pop(CRASH_ENV, None)
            os.environ.update(env or {})
            random.seed()
            code = main()
        finally:
            os._exit(code)
    return pid


def _fork(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``bnn <argv>`` in a forked child; returns its pid."""
    return _spawn(lambda: bnn(argv), env)


def _serve(data_dir: Path, db_url: str | None, port: int, env: dict[str, str]) -> int:
    """Run ``bnn serve`` on ``port`` in a forked child; returns its pid."""

    def main() -> int:
        import uvicorn

        from service.app import create_app
        from service.settings import Settings

        settings = Settings(data_dir=data_dir, database_url=db_url, port=port)
        uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="error")
        return 0

    return _spawn(main, env)


_REAPED: dict[int, int] = {}  # pid -> exit status of the children already waited for


def _wait(pid: int, timeout: float | None) -> int | None:
    """Exit status as ``waitstatus_to_exitcode`` (-9 for SIGKILL), None if still running."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if pid in _REAPED:
            return _REAPED[pid]
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _REAPED[pid] = os.waitstatus_to_exitcode(status)
            return _REAPED[pid]
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _kill(pid: int) -> bool:
    """SIGKILL ``pid`` if it still runs and reap it; True if it was killed by this."""
    if _wait(pid, 0) is not None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return _wait(pid, 30) == -signal.SIGKILL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str, timeout: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------- catalogs
@contextlib.contextmanager
def _pg_schemas(admin_url: str, names: list[str], keep: bool) -> Iterator[dict[str, str]]:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    tag = uuid.uuid4().hex[:8]
    urls: dict[str, str] = {}
    try:
        with engine.connect() as conn:
            for name in names:
                schema = f"crash_{tag}_{name}"
                conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
                url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={schema}"})
                urls[name] = url.render_as_string(hide_password=False)
        yield urls
    finally:
        if not keep:
            with engine.connect() as conn:
                for name in names:
                    conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "crash_{tag}_{name}" CASCADE')
        engine.dispose()


@dataclass
class Loop:
    """One catalog back end's crash loop and its tallies."""

    db: str
    root: Path
    urls: dict[str, str | None]
    rng: random.Random
    modes: list[str]
    kills: dict[str, int] = field(default_factory=dict)
    rounds: int = 0
    ever: dict[tuple[str, str, int], str] = field(default_factory=dict)
    changed: set[tuple[str, str, int]] = field(default_factory=set)
    leftovers_seen: dict[str, set[str]] = field(
        default_factory=lambda: {k: set() for k in LEFTOVER_KINDS}
    )
    leftover_bytes: dict[str, int] = field(default_factory=dict)
    server_pid: int | None = None
    server_url: str = ""
    train_s: float = 1.0
    push_s: float = 1.0

    def data(self, which: str) -> Path:
        return self.root / which

    def store(self, which: str) -> RunStore:
        return RunStore(self.data(which), self.urls[which], stale_after_s=0)

    def store_args(self, which: str) -> list[str]:
        url = self.urls[which]
        return ["--data-dir", str(self.data(which)), *(["--db-url", url] if url else [])]

    # -- victims
    def train_full(self) -> float:
        """One whole trainer run (no kill); its duration sets the random kill times."""
        t0 = time.monotonic()
        status = _wait(_fork(["train", *TINY, *self.store_args("local")]), 300)
        if status != 0:
            raise RuntimeError(f"a trainer run did not complete (exit {status})")
        return time.monotonic() - t0

    def train(self, point: str | None) -> bool:
        env = {CRASH_ENV: f"{point}:{self.rng.randint(1, EPOCHS)}"} if point else {}
        pid = _fork(["train", *TINY, *self.store_args("local")], env)
        if point:
            status = _wait(pid, 120)
            return status == -signal.SIGKILL or _kill(pid)
        time.sleep(self.rng.uniform(0.0, self.train_s))
        return _kill(pid)

    def start_server(self, env: dict[str, str] | None = None) -> None:
        self.stop_server()
        port = _free_port()
        self.server_url = f"http://127.0.0.1:{port}"
        self.server_pid = _serve(self.data("server"), self.urls["server"], port, env or {})
        if not _healthy(self.server_url, 60):
            self.stop_server()
            raise RuntimeError("the bnn service did not start")

    def stop_server(self) -> None:
        if self.server_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server_pid, signal.SIGTERM)
            if _wait(self.server_pid, 20) is None:
                _kill(self.server_pid)
            self.server_pid = None

    def server_alive(self) -> bool:
        return self.server_pid is not None and _wait(self.server_pid, 0) is None

    def push_child(self, fresh: bool = False) -> int:
        """``bnn push`` of a local run (``fresh``: one the service has not got yet)."""
        with self.store("local") as store:
            runs = [r.id for r in store.list_runs() if store.list_epochs(r.id)]
        if fresh:
            with self.store("server") as server:
                there = {r.id for r in server.list_runs()}
            runs = [r for r in runs if r not in there]
            if not runs:  # a new run to ingest (not a kill round of its own)
                self.train_full()
                return self.push_child(fresh=True)
        return _fork(
            ["push", self.rng.choice(runs), "--to", self.server_url, *self.store_args("local")]
        )

    def push(self) -> bool:
        if not self.server_alive():
            self.start_server()
        pid = self.push_child()
        time.sleep(self.rng.uniform(0.0, self.push_s))
        return _kill(pid)

    def ingest(self, point: str | None) -> str | None:
        """Kill the service during a push; returns where (``None``: it had already died)."""
        env = {CRASH_ENV: f"{point}:{self.rng.randint(1, 3)}"} if point else {}
        self.start_server(env)
        server = self.server_pid or 0
        pid = self.push_child(fresh=True)
        where: str | None = point or "random"
        if point:
            status = None
            deadline = time.monotonic() + 120
            while status is None and time.monotonic() < deadline:
                status = _wait(server, 0.05)
                if status is None and _wait(pid, 0) is not None:
                    break  # the push is over and stored nothing new: the point never came
            if status is None:
                where = "idle" if _kill(server) else None
            elif status != -signal.SIGKILL:
                where = None
        else:
            time.sleep(self.rng.uniform(0.0, self.push_s))
            where = where if _kill(server) else None
        self.server_pid = None
        if _wait(pid, 60) is None:
            _kill(pid)
        return where

    # -- bookkeeping
    def record(self) -> None:
        """Catalogued epochs now (first checksum kept) and the crash leftovers on disk."""
        for which in ("local", "server"):
            if not self.data(which).exists():
                continue
            with self.store(which) as store:
                for run in store.list_runs():
                    for e in store.list_epochs(run.id):
                        key = (which, run.id, e.epoch)
                        if self.ever.setdefault(key, e.checksum) != e.checksum:
                            self.changed.add(key)
                report = store.fsck(catalog=False, verify=False)
            for f in report.findings:
                if f.kind in LEFTOVER_KINDS and f.problem:
                    self.leftovers_seen[f.kind].add(f"{which}/{f.path}")
                    self.leftover_bytes[f"{which}/{f.path}"] = f.size

    def round(self, i: int) -> None:
        """Round ``i``: the first ones go through the victims and the kill points in turn."""
        mode = self.modes[i % len(self.modes)]
        points: list[str | None] = {
            "trainer": ["write", "rename", "commit", None],
            "push": [None],
            "server": ["rename", "commit", None],
        }[mode]
        turn = i // len(self.modes)
        point = points[turn] if turn < len(points) else self.rng.choice([*points, None])
        where: str | None = point or "random"
        if mode == "trainer":
            where = where if self.train(point) else None
        elif mode == "push":
            where = where if self.push() else None
        else:
            where = self.ingest(point)
        self.rounds += 1
        if where is not None:
            key = f"{mode}@{where}"
            self.kills[key] = self.kills.get(key, 0) + 1
        self.record()

    def total_kills(self) -> int:
        return sum(self.kills.values())

    def finish(self) -> dict[str, Any]:
        """fsck before / repair / after on both stores; the figures."""
        self.stop_server()
        before: dict[str, int] = dict.fromkeys(LEFTOVER_KINDS, 0)
        after: dict[str, int] = dict.fromkeys([*LEFTOVER_KINDS, "missing", "checksum"], 0)
        adopted = set_aside = catalogued = torn = 0
        lost: list[str] = []
        fsck_s = 0.0
        for which in ("local", "server"):
            if not self.data(which).exists():
                continue
            with self.store(which) as store:
                for kind, n in store.fsck(catalog=False).counts().items():
                    if kind in before:
                        before[kind] += n
                repair = store.fsck(repair=True)
                fsck_s += repair.elapsed_s
                adopted += sum(1 for f in repair.of("orphan") if f.done and f.action == "adopt")
                set_aside += sum(1 for f in repair.of("orphan") if f.done and f.action != "adopt")
                for kind, n in store.fsck().counts().items():
                    if kind in after:
                        after[kind] += n
                now: dict[tuple[str, str, int], str] = {}
                for run in store.list_runs():
                    reader = RunReader(run.id, store=store)
                    for e in store.list_epochs(run.id):
                        now[(which, run.id, e.epoch)] = e.checksum
                        catalogued += 1
                        try:
                            reader.verify(e.epoch)
                        except Exception:  # any failure is a torn epoch
                            torn += 1
                for key, checksum in self.ever.items():
                    if key[0] != which:
                        continue
                    if key not in now:
                        lost.append("/".join(map(str, key)))
                    elif now[key] != checksum:
                        self.changed.add(key)
        seen = {k: len(v) for k, v in self.leftovers_seen.items()}
        return {
            "db": self.db,
            "rounds": self.rounds,
            "kills": self.total_kills(),
            "kills_by": dict(sorted(self.kills.items())),
            "catalogued_epochs": catalogued,
            "torn": torn,
            "lost": len(lost),
            "lost_epochs": lost,
            "changed": len(self.changed),
            "leftovers_left_by_crashes": seen,
            "leftover_mb": round(sum(self.leftover_bytes.values()) / 2**20, 2),
            "before_fsck": before,
            "adopted": adopted,
            "lost_and_found": set_aside,
            "after_fsck": after,
            "fsck_s": round(fsck_s, 2),
            "stores": {
                w: {"data_dir": str(self.data(w)), "db_url": self.urls[w]} for w in self.urls
            },
        }


def _ok(result: dict[str, Any]) -> bool:
    return (
        result["torn"] == 0
        and result["lost"] == 0
        and result["changed"] == 0
        and not any(result["after_fsck"].values())
    )


def run_loop(
    db: str, root: Path, kills: int, modes: list[str], seed: int, pg_url: str, keep: bool
) -> dict[str, Any]:
    names = ["local", "server"]
    schemas = _pg_schemas(pg_url, names, keep) if db == "postgresql" else contextlib.nullcontext()
    with schemas as pg:
        urls: dict[str, str | None] = {n: (pg[n] if pg else None) for n in names}
        loop = Loop(db, root, urls, random.Random(seed), modes)
        RunStore(loop.data("local"), urls["local"]).close()  # migrations once, before forking
        t0 = time.monotonic()
        loop.train_s = loop.train_full()  # a whole run: the time scale of random kills
        loop.record()
        if "push" in modes or "server" in modes:
            loop.start_server()
            t1 = time.monotonic()
            status = _wait(loop.push_child(), 120)
            loop.push_s = max(0.2, time.monotonic() - t1)
            if status != 0:
                raise RuntimeError(f"a push did not complete (exit {status})")
            loop.record()
        max_rounds = kills * 4
        try:
            reported = 0
            while loop.total_kills() < kills and loop.rounds < max_rounds:
                loop.round(loop.rounds)
                if loop.total_kills() >= reported + 10:  # progress, on stderr
                    reported = loop.total_kills()
                    elapsed = time.monotonic() - t0
                    print(f"{db}: {reported}/{kills} kills, {elapsed:.0f} s", file=sys.stderr)
        finally:
            loop.stop_server()
        result = loop.finish()
        result["loop_s"] = round(time.monotonic() - t0, 1)
        return result


def _print(results: list[dict[str, Any]]) -> None:
    rows = [
        ("kills", lambda r: r["kills"]),
        ("rounds", lambda r: r["rounds"]),
        ("catalogued epochs", lambda r: r["catalogued_epochs"]),
        ("torn", lambda r: r["torn"]),
        ("lost", lambda r: r["lost"]),
        ("changed", lambda r: r["changed"]),
        ("orphans left by crashes", lambda r: r["leftovers_left_by_crashes"]["orphan"]),
        ("temp files left by crashes", lambda r: r["leftovers_left_by_crashes"]["tmp"]),
        ("upload temps left by crashes", lambda r: r["leftovers_left_by_crashes"]["upload_tmp"]),
        ("  their size (MB)", lambda r: r["leftover_mb"]),
        ("orphans before final fsck", lambda r: r["before_fsck"]["orphan"]),
        (
            "temps before final fsck",
            lambda r: r["before_fsck"]["tmp"] + r["before_fsck"]["upload_tmp"],
        ),
        ("adopted by fsck", lambda r: r["adopted"]),
        ("moved to lost+found", lambda r: r["lost_and_found"]),
        ("orphans after fsck", lambda r: r["after_fsck"]["orphan"]),
        ("temps after fsck", lambda r: r["after_fsck"]["tmp"] + r["after_fsck"]["upload_tmp"]),
        (
            "missing/bad after fsck",
            lambda r: r["after_fsck"]["missing"] + r["after_fsck"]["checksum"],
        ),
        ("loop time (s)", lambda r: r["loop_s"]),
    ]
    print(f"{'':<30}" + "".join(f"{r['db']:>12}" for r in results))
    for label, get in rows:
        print(f"{label:<30}" + "".join(f"{get(r)!s:>12}" for r in results))
    for r in results:
        print(f"{r['db']} kills by victim@point: {r['kills_by']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs per catalog back end")
    parser.add_argument("--db", default="sqlite,postgresql", help="sqlite,postgresql")
    parser.add_argument("--modes", default="trainer,push,server", help="trainer,push,server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pg-url", default=PG_DEFAULT, help="PostgreSQL (a schema per store)")
    parser.add_argument("--data-dir", type=Path, help="keep the stores here (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep stores and schemas")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    dbs = [d for d in args.db.split(",") if d]
    if set(modes) - {"trainer", "push", "server"} or set(dbs) - {"sqlite", "postgresql"}:
        parser.error("unknown --modes or --db")
    with contextlib.ExitStack() as stack:
        root = args.data_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="crashloop-"))
        )
        import service.app  # noqa: F401 - imported once here, not in every forked victim
        import trainer.remote  # noqa: F401

        warm = root / "warm-up"  # imports and first-use costs paid once, before forking
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if bnn(["train", *TINY, "--data-dir", str(warm)]) != 0:
                raise SystemExit("the warm-up run failed")
        results = [
            run_loop(db, root / db, args.kills, modes, args.seed, args.pg_url, args.keep)
            for db in dbs
        ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results)
    return 0 if all(_ok(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
