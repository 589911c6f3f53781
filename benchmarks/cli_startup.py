"""Start-up time and peak memory of the ``bnn`` command line, side by side with ``python -c pass``.

Runs each command ``--repeats`` times, interleaved (pass, --help, runs, runs show, train
--help, pass, ...), each in a fresh process, and prints the median wall time, the ratio to
``python -c pass`` and the peak resident memory (``ru_maxrss`` of the child). ``bnn runs``
lists a store of ``--runs`` runs (created on first use in ``--data-dir``: a few real
``bnn train`` runs with captured epochs and empty queued ones), so the catalog is not empty.

    python benchmarks/cli_startup.py [--repeats 15] [--data-dir /tmp/cli-startup] [--runs 50]

Targets (issue 11): ``bnn --help`` <= 0.5 s and ``bnn runs`` <= 1.0 s on 2 cores, peak
memory <= 150 MB for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BNN = str(Path(sys.executable).with_name("bnn"))


def _store(data_dir: Path, runs: int) -> str:
    """A store with ``runs`` runs (3 trained, the rest queued); returns a trained run's id."""
    marker = data_dir / "cli_startup_run"
    if marker.exists():
        return marker.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [BNN, "train", "--data-dir", str(data_dir), "--dataset", "regression"]
    last = ""
    for seed in range(3):
        out = subprocess.run(
            [*train, "--epochs", "5", "--seed", str(seed), "--no-progress"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        last = out.stdout.strip().splitlines()[-1]
    # in a child: this process stays small, since a child's peak RSS counts the parent's
    # pages it was forked with
    code = (
        "import sys\nfrom trainer.store import RunStore\n"
        "with RunStore(sys.argv[1]) as store:\n"
        "    for i in range(int(sys.argv[2])):\n"
        "        store.create_run(f'queued-{i}', {'dataset': 'mnist', 'prior': 'learnable'})\n"
    )
    subprocess.run([sys.executable, "-c", code, str(data_dir), str(max(0, runs - 3))], check=True)
    marker.write_text(last)
    return last


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/cli-startup"))
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    run_id = _store(args.data_dir, args.runs)
    where = ["--data-dir", str(args.data_dir)]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "bnn --help": [BNN, "--help"],
        "bnn runs": [BNN, "runs", *where],
        "bnn runs show ID": [BNN, "runs", "show", run_id, *where],
        "bnn train --help": [BNN, "train", "--help"],
    }
    walls: dict[str, list[float]] = {k: [] for k in commands}
    rss: dict[str, float] = {k: 0.0 for k in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            wall, peak = _run(cmd)
            walls[name].append(wall)
            rss[name] = max(rss[name], peak)
    base = statistics.median(walls["python -c pass"])
    print(
        f"{args.repeats} fresh processes each, interleaved; {args.runs} runs in the store; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'command':<20} {'median':>9} {'min':>9} {'- pass':>9} {'peak RSS':>10}")
    for name, values in walls.items():
        med = statistics.median(values)
        print(
            f"{name:<20} {med:>8.3f}s {min(values):>8.3f}s {med - base:>8.3f}s {rss[name]:>8.0f} MB"
        )


if __name__ == "__main__":
    main()
