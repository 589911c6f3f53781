"""The epoch summaries' C kernels against numpy, side by side in one process.

For one layer-sized posterior (``--size`` float32 elements, default 1,440,000: the
784-1200-1200-10 MLP's 1200x1200 layer; mu ~ N(0, 0.05), sigma log-normal around 0.05) and
one per-element gradient statistic of the same size (|N(0, 1e-3)|), times, interleaved rep
by rep (``--reps``), median milliseconds:

* the posterior's summary: the Gaussian sums and the TensorBoard percentiles of mu and sigma
  (``trainer.store.numeric.gaussian_summary``), with the kernels and with numpy
  (``trainer.store._native.disabled()``);
* the statistic's bfloat16 encoding (with its codes' histogram, in C) and its summary (counts,
  median, maxima: ``trainer.store.summaries.grad_stats``): C from the histogram, numpy from
  the decoded values.

    python benchmarks/summary_kernels.py [--size 1440000] [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from trainer.store import _native, numeric, summaries
from trainer.store._codec import decode_bf16, encode_bf16


def _ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=1_440_000)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if not _native.available():
        ap.error(f"the summary kernels are not available here: {_native.status()}")
    rng = np.random.default_rng(0)
    mu = rng.normal(0.0, 0.05, args.size).astype(np.float32)
    sigma = (0.05 * np.exp(0.2 * rng.normal(0.0, 1.0, args.size))).astype(np.float32)
    stat = np.abs(rng.normal(0.0, 1e-3, args.size)).astype(np.float32)
    nonfinite = np.zeros(args.size, np.int32)
    qs = numeric.TB_PERCENTILES

    def c_post() -> Any:
        return numeric.gaussian_summary(mu, sigma, qs)

    def np_post() -> Any:
        with _native.disabled():
            return numeric.gaussian_summary(mu, sigma, qs)

    def c_grad() -> Any:
        found = _native.bf16_encode(stat)
        assert found is not None
        return summaries.grad_stats(summaries.Encoded(*found), nonfinite)

    def np_grad() -> Any:
        with _native.disabled():
            return summaries.grad_stats(decode_bf16(encode_bf16(stat)), nonfinite)

    cases = {
        "posterior summary": (c_post, np_post),
        "gradient statistic: encode + summary": (c_grad, np_grad),
    }
    for c_fn, np_fn in cases.values():  # warm up, and the two agree
        c_fn(), np_fn()
    assert repr(c_grad()) == repr(np_grad())
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in cases}
    for _ in range(args.reps):
        for name, (c_fn, np_fn) in cases.items():
            times[name][0].append(_ms(c_fn))
            times[name][1].append(_ms(np_fn))
    print(
        f"{args.size:,} float32 elements, {args.reps} interleaved reps, "
        f"load average {os.getloadavg()[0]:.2f}, kernels: {_native.status()}"
    )
    print(f"{'':<40}{'C ms':>9}{'numpy ms':>10}{'numpy / C':>11}")
    for name, (c_t, np_t) in times.items():
        c_med, np_med = statistics.median(c_t), statistics.median(np_t)
        print(f"{name:<40}{c_med:>9.2f}{np_med:>10.2f}{np_med / c_med:>10.1f}x")


if __name__ == "__main__":
    main()
