"""Cold plots: the three slowest plots of one 940,800-weight layer over 100 stored epochs.

``plot_kl_over_epochs``, ``plot_gradient_magnitudes`` and ``plot_percentile_bands`` read
every epoch file (the summaries of 100 x 940,800 weights or gradient statistics), so the
first request for them is what a user waits for. Each sample runs in a fresh Python
process (``--worker``), which measures:

* ``first``: the first call in that process, imports done (what the first request to a
  freshly started server pays on top of its imports) -- the files are in the OS page
  cache, as on a server that wrote or read them recently;
* ``cold``: the call again after ``clear_cache()`` (summaries forgotten, every file read
  again; imports, matplotlib and fonts warm): ``benchmarks/analysis.py``'s "cold";
* ``warm``: the call again with the summaries cached: the drawing alone;
* ``import``: ``import service.analysis`` (matplotlib included), for reference.

``--trees A,B`` runs the same samples with other source trees' code (e.g. ``git archive
HEAD | tar -x -C /tmp/base``), alternating A, B, B, A, ... in one run, so that their ratio
holds on a shared machine. The run is written on first use into ``--data-dir`` (100
synthetic epochs like ``benchmarks/analysis.py``, element gradient statistics, by the
tree running this script: schema 2 files with their summaries take 1.24 GB; schema 1 files
took 2.3 GB) and reused afterwards; all trees read that run (code that predates the stored
summaries computes from the arrays).

    python benchmarks/cold_plots.py --data-dir /tmp/cold-plots [--rounds 3] [--trees .,/tmp/base]

Target (issue 11): each of the three <= 1 s cold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYER = (784, 1200)  # 940,800 weights
PLOTS = ("plot_kl_over_epochs", "plot_gradient_magnitudes", "plot_percentile_bands")
TARGET_MS = 1000.0


def write_run(data_dir: Path, epochs: int) -> str:
    from service.analysis.synthetic import synthetic_snapshot
    from trainer.snapshot import GradLevel
    from trainer.store import RunStore

    t0 = time.perf_counter()
    with RunStore(data_dir) as store:
        run = store.create_run("cold-plots-940800", {}).id
        for e in range(epochs):
            snap = synthetic_snapshot(e, LAYER, seed=0, grad_level=GradLevel.ELEMENT)
            store.write_epoch(run, snap)
    size = sum(p.stat().st_size for p in (data_dir / "runs" / run).iterdir())
    print(
        f"wrote run {run}: {epochs} epochs in {time.perf_counter() - t0:.0f} s, {size / 1e9:.2f} GB"
    )
    (data_dir / "cold_plots_run").write_text(run)
    return run


def worker(plot: str, data_dir: Path, run: str) -> None:
    """One sample in this fresh process; prints one JSON line."""
    t0 = time.perf_counter()
    from service import analysis as an

    imported = time.perf_counter() - t0
    kw: dict[str, object] = {"data_dir": data_dir}
    fn = getattr(an, plot)
    args = (run, "layer1") if plot == "plot_percentile_bands" else (run,)

    def timed() -> tuple[float, float, int]:
        t, c = time.perf_counter(), time.process_time()
        png = fn(*args, **kw)
        return (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3, len(png)

    first, first_cpu, size = timed()
    an.clear_cache()
    cold, cold_cpu, _ = timed()
    warm, warm_cpu, _ = timed()
    print(json.dumps({"import": imported * 1e3, "first": first, "cold": cold, "warm": warm,
                      "first_cpu": first_cpu, "cold_cpu": cold_cpu, "warm_cpu": warm_cpu,
                      "png_bytes": size}))  # fmt: skip


def sample(tree: Path, plot: str, data_dir: Path, run: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    script = str(REPO / "benchmarks" / "cold_plots.py")
    args = [sys.executable, script, "--worker", plot, "--data-dir", str(data_dir), "--run", run]
    out = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {plot} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the run's store (reused)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of a new run")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per plot and tree")
    parser.add_argument("--trees", default=str(REPO), help="comma-separated source trees")
    parser.add_argument("--worker", choices=PLOTS, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data_dir, args.run)
        return
    marker = args.data_dir / "cold_plots_run"
    run = marker.read_text().strip() if marker.exists() else write_run(args.data_dir, args.epochs)
    trees = [Path(t).resolve() for t in args.trees.split(",") if t.strip()]
    print(f"CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.2f}; run {run}")
    got: dict[tuple[Path, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for tree in trees if r % 2 == 0 else trees[::-1]:
            for plot in PLOTS:
                got.setdefault((tree, plot), []).append(sample(tree, plot, args.data_dir, run))
        print(
            f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True
        )
    print("\nmedians over the rounds, ms; CPU: the process's CPU time (steadier than wall time")
    print("on a shared machine); min-max of the cold wall time\n")
    print("| tree | plot | first | cold | cold min-max | warm | cold CPU | warm CPU | import "
          "| cold CPU / first tree |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for plot in PLOTS:
        base = statistics.median(s["cold_cpu"] for s in got[(trees[0], plot)])
        for tree in trees:
            samples = got[(tree, plot)]
            med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
            colds = [s["cold"] for s in samples]
            print(
                f"| {tree} | {plot} | {med['first']:.0f} | {med['cold']:.0f} | "
                f"{min(colds):.0f}-{max(colds):.0f} | {med['warm']:.0f} | {med['cold_cpu']:.0f} | "
                f"{med['warm_cpu']:.0f} | {med['import']:.0f} | {med['cold_cpu'] / base:.2f} |"
            )
    print(f"\ntarget: cold <= {TARGET_MS:.0f} ms; load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
