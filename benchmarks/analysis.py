"""Analysis speed at real sizes: exact pairwise KL, statistics and every plot.

* Exact pairwise symmetric KL of a 940,800-weight layer (784 -> 1200) and the whole
  784-1200-1200-10 model's table, against the brute-force pairs timed on n=2000 and
  extrapolated to the n(n-1)/2 pairs (ratio printed).
* Statistics of the whole model; exact percentiles of the 940,800-weight layer.
* Each plot of a stored run: one 940,800-weight layer (+ its 1,200 biases) over
  ``--epochs`` (default 100) synthetic epochs with element-level gradient statistics,
  written into a temporary RunStore. "cold" clears the summary cache first (the plot reads
  every epoch file it needs); "warm" repeats it (results cached per epoch file).
* Peak memory: tracemalloc peak (numpy buffers) during the cold plots, and ru_maxrss.

    python benchmarks/analysis.py [--epochs 100] [--repeats 5] [--threads N]

Timings are medians over ``--repeats`` (plots: 3) runs, in ms, on this machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service import analysis as an
from service.analysis.summary import workers
from service.analysis.synthetic import synthetic_log, synthetic_snapshot
from trainer.snapshot import GradLevel
from trainer.store import RunStore

MODEL = (784, 1200, 1200, 10)
LAYER = (784, 1200)  # 940,800 weights


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time in ms over ``repeats`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def pairs(n: int) -> int:
    return n * (n - 1) // 2


def kl_section(repeats: int) -> None:
    log = synthetic_log([0], MODEL, seed=0)
    w = log[0]["layer1"]["posterior"]["weight"]
    n_layer = w["mu"].size
    ms_layer, exact = timed(lambda: an.pairwise_symmetric_kl(w["mu"], w["sigma"]), repeats)
    ms_model, table = timed(lambda: an.compute_layer_kl_divergences(log), repeats)
    rng = np.random.default_rng(1)
    idx = rng.choice(n_layer, 2000, replace=False)
    sub_mu, sub_sigma = w["mu"].ravel()[idx], w["sigma"].ravel()[idx]
    ms_brute, brute = timed(lambda: an.pairwise_symmetric_kl_reference(sub_mu, sub_sigma), 3)
    rel = abs(an.pairwise_symmetric_kl(sub_mu, sub_sigma) - brute) / brute
    per_pair_ms = ms_brute / pairs(2000)
    sizes = [
        a.size
        for layer in log[0].values()
        for a in (layer["posterior"]["weight"]["mu"], layer["posterior"]["bias"]["mu"])
    ]
    brute_layer = per_pair_ms * pairs(n_layer)
    brute_model = per_pair_ms * sum(pairs(n) for n in sizes)
    print("## Exact pairwise symmetric KL (float64, O(n))")
    print(f"940,800-weight layer: {ms_layer:.1f} ms   (sum {exact:.6g})")
    print(f"whole 784-1200-1200-10 table (6 tensors, {sum(sizes):,} elements): {ms_model:.1f} ms")
    print(
        f"brute force, n=2000 ({pairs(2000):,} pairs): {ms_brute:.1f} ms "
        f"= {per_pair_ms * 1e6:.2f} ns/pair; exact vs brute force at n=2000: rel. diff {rel:.1e}"
    )
    hours = (brute_layer / 3.6e6, brute_model / 3.6e6)
    print(f"brute force extrapolated: layer {hours[0]:.2f} h, model {hours[1]:.2f} h")
    print(f"speed-up: layer {brute_layer / ms_layer:,.0f}x, model {brute_model / ms_model:,.0f}x")
    print(table.to_string(float_format=lambda v: f"{v:.6g}"))

    ms_stats, _ = timed(lambda: an.get_overall_weight_stats(log), repeats)
    ms_pct, _ = timed(lambda: an.percentiles(w["mu"]), repeats)
    ms_np, _ = timed(lambda: np.percentile(w["mu"], an.TB_PERCENTILES), repeats)
    print("\n## Statistics")
    print(f"get_overall_weight_stats, whole model: {ms_stats:.1f} ms")
    print(
        f"9 exact percentiles of 940,800 float32: {ms_pct:.1f} ms (np.percentile: {ms_np:.1f} ms)"
    )


def write_run(store: RunStore, epochs: int) -> tuple[str, float]:
    run = store.create_run("bench-940800", {}).id
    t0 = time.perf_counter()
    for e in range(epochs):
        store.write_epoch(run, synthetic_snapshot(e, LAYER, seed=0, grad_level=GradLevel.ELEMENT))
    return run, time.perf_counter() - t0


def plots_section(epochs: int, data_dir: Path) -> None:
    store = RunStore(data_dir)
    run, write_s = write_run(store, epochs)
    model_run = store.create_run("bench-model", {}).id
    store.write_epoch(model_run, synthetic_snapshot(0, MODEL))
    store.close()
    size_mb = sum(p.stat().st_size for p in (data_dir / "runs" / run).iterdir()) / 1e6
    print(f"\n## Stored run: one 940,800-weight layer, {epochs} epochs, element gradients")
    print(f"written in {write_s:.1f} s, {size_mb:.0f} MB on disk")

    kw = {"data_dir": data_dir}
    cases: list[tuple[str, Callable[[], Any]]] = [
        (
            "plot_params_log_distributions (top 4 by mu change)",
            lambda: an.plot_params_log_distributions(run, **kw),
        ),
        (
            "plot_epoch_distributions (200 curves + histograms)",
            lambda: an.plot_epoch_distributions(run, **kw),
        ),
        (
            "plot_percentile_bands (mu and sigma)",
            lambda: an.plot_percentile_bands(run, "layer1", **kw),
        ),
        ("plot_kl_over_epochs", lambda: an.plot_kl_over_epochs(run, **kw)),
        ("plot_prior_trajectories", lambda: an.plot_prior_trajectories(run, **kw)),
        ("plot_gradient_magnitudes", lambda: an.plot_gradient_magnitudes(run, **kw)),
        (
            "gradient_outliers (top 10, last epoch)",
            lambda: an.gradient_outliers(run, None, 10, **kw),
        ),
        (
            "compute_layer_kl_divergences, whole model from the store",
            lambda: an.compute_layer_kl_divergences(model_run, **kw),
        ),
    ]
    print("| what | cold (ms) | warm (ms) |")
    print("|---|---|---|")
    for name, fn in cases:
        an.clear_cache()
        t0 = time.perf_counter()
        fn()
        cold = (time.perf_counter() - t0) * 1e3
        warm, _ = timed(fn, 3)
        print(f"| {name} | {cold:.0f} | {warm:.0f} |")
    peak = 0  # a separate cold pass: tracemalloc slows the code it watches
    for _, fn in cases:
        an.clear_cache()
        tracemalloc.start()
        fn()
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\npeak traced memory (numpy buffers) of any cold case: {peak / 1e6:.0f} MB; "
        f"process max RSS: {rss:.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=None, help="temporary store location")
    parser.add_argument("--threads", type=int, default=None, help="BNN_ANALYSIS_THREADS")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["BNN_ANALYSIS_THREADS"] = str(args.threads)
    print(
        f"CPUs: {os.cpu_count()}, reader threads: {workers()}, "
        f"load average at start: {os.getloadavg()[0]:.2f}\n"
    )
    kl_section(args.repeats)
    tmp = Path(tempfile.mkdtemp(prefix="bnn-bench-", dir=args.data_dir))
    try:
        plots_section(args.epochs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
