"""Hostile uploads against a real server: each must be refused (4xx) in under 1 s, with the
server's memory growing by under 50 MB, and the stored runs byte-identical afterwards.

The real server (``python -m service.cli serve``, log level warning) runs on a free
loopback port over a temporary data directory. A run is registered as a 784-1200-1200-10
MNIST MLP (``execute: false``) and its epoch 0 uploaded: a synthetic capture of that model
with per-element gradient statistics (random arrays of the trainer's shapes and dtypes).
The hostile files (tests/hostile_files.py) are built from a valid epoch 1 of the same run
and uploaded as epoch 1, one at a time. For each the script prints the status code, the
elapsed seconds of the PUT (sending the body included), the seconds of the checks alone
(``check_epoch_file`` on the same file in this process), the server's RSS growth over the
request and its peak RSS growth (VmHWM; /proc), and whether the stored files are
byte-identical (sha256 of every file under ``runs/`` before and after). Two references
close the table: zero bytes of the base file's size (not HDF5: refused at once, so its PUT
is the cost of sending that much), and the valid epoch 1 (accepted: 201).

    python benchmarks/hostile_uploads.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_load import Server  # noqa: E402 - the same server process as that benchmark

from tests.hostile_files import FLIP_CASES, HOSTILE, TRUNCATIONS, truncate  # noqa: E402
from tests.trainer.conftest import _snapshot  # noqa: E402
from trainer.errors import BnnError  # noqa: E402
from trainer.store import EpochFile, write_epoch_file  # noqa: E402
from trainer.store.validate import Reference, check_epoch_file  # noqa: E402

H5 = {"Content-Type": "application/x-hdf5"}
MLP = {"layer1": (1200, 784), "layer2": (1200, 1200), "layer3": (10, 1200)}
CONFIG = {"dataset": "mnist", "widths": [1200, 1200], "execute": False, "name": "hostile"}
TARGET_S, TARGET_MB = 1.0, 50.0


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def stored(data_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((data_dir / "runs").rglob("*"))
        if p.is_file()
    }


def epoch_file(path: Path, run_id: str, epoch: int) -> Path:
    write_epoch_file(path, _snapshot(epoch, layers=MLP, no_bias=()), run_id=run_id)
    return path


def junk(path: Path, size: int) -> Path:
    """Not HDF5 at all: refused at once, so its PUT times the sending of the body alone."""
    path.write_bytes(b"\0" * size)
    return path


def cut(fraction: float) -> Callable[[Path, Path], Path]:
    return lambda base, out: truncate(base, out, int(base.stat().st_size * fraction))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bnn-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    server = Server(data, work / "server.log")
    rows: list[tuple[str, int, int, float, float, float, float, bool, str]] = []
    try:
        http = httpx.Client(base_url=server.url, timeout=120)
        run = http.post("/runs", json=CONFIG)
        assert run.status_code == 201, run.text
        run_id = run.json()["id"]
        t0 = time.perf_counter()
        first = epoch_file(work / "epoch0.h5", run_id, 0)
        base = epoch_file(work / "epoch1.h5", run_id, 1)
        print(f"built two epoch files of {base.stat().st_size / 1e6:.1f} MB in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        put = http.put(f"/runs/{run_id}/epochs/0", content=first.read_bytes(), headers=H5)
        assert put.status_code == 201, put.text
        with EpochFile(first) as ef:  # the server's reference: the run's epoch 0
            reference = Reference(ef.layout(), "as epoch 0 of the run")
        cases = {**HOSTILE, **FLIP_CASES}
        builds = [(name, build) for name, (build, _) in cases.items()]
        builds += [(f"truncate_{f:g}", cut(f)) for f in TRUNCATIONS]
        builds.append(("junk, base's size", lambda b, o: junk(o, b.stat().st_size)))
        builds.append(("valid (accepted)", lambda b, o: shutil.copyfile(b, o)))
        for name, build in builds:
            try:
                path = build(base, work / f"{name}.h5")
            except LookupError as exc:
                print(f"{name}: skipped ({exc})")
                continue
            body = Path(path).read_bytes()
            t0 = time.perf_counter()  # the checks alone, in this process
            with contextlib.suppress(BnnError):
                check_epoch_file(path, run_id=run_id, epoch=1, reference=reference)
            check_s = time.perf_counter() - t0
            before = stored(data)
            rss0, hwm0 = memory(server.proc.pid)
            t0 = time.perf_counter()
            response = http.put(f"/runs/{run_id}/epochs/1", content=body, headers=H5)
            elapsed = time.perf_counter() - t0
            rss1, hwm1 = memory(server.proc.pid)
            identical = stored(data) == before
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = "" if response.is_success else response.text[:200]
            rows.append((name, len(body), response.status_code, elapsed, check_s, rss1 - rss0,
                         max(0.0, hwm1 - max(hwm0, rss0)), identical, message))  # fmt: skip
            Path(path).unlink()
        uploads = [p for p in data.rglob("*.tmp.*") if p.is_file()]  # temp files left
    finally:
        server.stop()
    print(
        f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. seconds: the "
        "PUT (sending the body included); check s: check_epoch_file alone, in this process"
    )
    print("\n| upload | bytes | status | seconds | check s | RSS growth MB | peak RSS growth MB "
          "| runs byte-identical | error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, size, status, elapsed, check_s, rss, hwm, identical, message in rows:
        short = message.split(" is corrupt: ")[-1].split(" epoch 1 ")[-1][:90]
        print(f"| {name} | {size} | {status} | {elapsed:.3f} | {check_s:.3f} | {rss:+.1f} | "
              f"{hwm:.1f} | {'yes' if identical else 'NO'} | {short} |")  # fmt: skip
    hostile = [r for r in rows if r[0] != "valid (accepted)"]
    refused = all(400 <= r[2] < 500 for r in hostile)
    grew = max(max(r[5], r[6]) for r in hostile)
    print(f"\nall hostile uploads refused with a 4xx: {'yes' if refused else 'NO'}; slowest PUT "
          f"{max(r[3] for r in hostile):.3f} s, slowest check {max(r[4] for r in hostile):.3f} s "
          f"(target < {TARGET_S} s); largest memory growth {grew:.1f} MB (target < {TARGET_MB} "
          f"MB); runs byte-identical after every hostile upload: "
          f"{'yes' if all(r[7] for r in hostile) else 'NO'}; upload temp files left: "
          f"{len(uploads)}")  # fmt: skip
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
