"""Epoch file size, write time and cold reads: schema version 1 against version 2.

Trains the 784-1200-1200-10 MLP (learnable prior, sigma0 0.1, Adam 1e-3, batch 128, one
thread) on MNIST for ``--steps`` steps with per-element gradient capture, and captures an
epoch every ``--every`` steps (each capture's statistics cover the steps since the last
one). Every captured snapshot is written by each variant side by side (the order rotated
per repetition, ``--repeats`` times), with fsync, as the trainer writes it:

* ``v1``: schema version 1, today's format before this change (float32, uncompressed);
* ``v2``: schema version 2 (bfloat16 statistics, Blosc; posteriors plain float32), with
  the epoch's summaries (``/summary``, computed by the writer: ``trainer.store.summaries``);
* ``v2-bare``: version 2 without the summaries (as written before they were added: what
  computing and storing them costs the writer);
* ``v2-packed``: version 2 with ``compress_posteriors=True`` (posteriors Blosc too);
* ``v2-archive``: ``v2-packed`` with the statistics at 3 mantissa bits (``stat_bits=3``,
  lossy: what ``bnn runs compact --compress-posteriors --stat-bits 3`` writes).

Each variant's files then form one run of its own store, and the reads the analysis does
are timed cold (every epoch file of the run dropped from the page cache with
``posix_fadvise(DONTNEED)`` after an fsync, and the summary cache cleared) and warm:

* the exact pairwise KL table of one layer at the last epoch (``kl_tables``, 784 -> 1200
  layer) and of the whole model (``compute_layer_kl_divergences``);
* ``plot_kl_over_epochs``, ``plot_gradient_magnitudes`` and ``plot_percentile_bands`` of
  the 940,800-weight layer over all captured epochs.

    OMP_NUM_THREADS=1 python benchmarks/epoch_file_size.py [--steps 300] [--every 30]
        [--repeats 3] [--read-repeats 7] [--variants v1,v2,v2-packed,v2-archive] [--dir /tmp]
        [--malloc tuned|default]

``--malloc tuned`` (the default) makes glibc's malloc keep freed memory, as the trainer does
for CPU training (``trainer.kernels.tune_allocator``), so a write's new arrays (the bfloat16
codes) reuse memory instead of faulting in fresh pages; ``default`` leaves malloc alone, as
a GPU trainer or another program writing epoch files does.

Prints medians (and minima: on a shared machine the least disturbed run) and the ratio of
each variant to v1, the load average before and after, and the bytes of each kind of
array in a v2 file. A write's time is wall time, fsync included; its CPU time (every
thread of the process: version 2 computes the posteriors' summaries on a second thread
while the datasets are written) is printed below it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import torch
import torch.nn.functional as F

from service import analysis as an
from service.analysis.kl import kl_tables
from trainer import kernels
from trainer.capture import GradientRecorder, get_all_distribution_params
from trainer.data import load_dataset
from trainer.layers import model_kl, prior_penalty
from trainer.models import mlp
from trainer.priors import PriorKind, PriorSpec
from trainer.snapshot import EpochSnapshot, GradLevel
from trainer.store import RunStore, write_epoch_file

BATCH = 128
N_TRAIN = 50_000
LAYER = "layer1"  # 784 -> 1200: 940,800 weights
VARIANTS: dict[str, dict[str, Any]] = {
    "v1": {"schema_version": 1},
    "v2": {"schema_version": 2},
    "v2-bare": {"schema_version": 2, "summaries": False},
    "v2-packed": {"schema_version": 2, "compress_posteriors": True},
    "v2-archive": {"schema_version": 2, "compress_posteriors": True, "stat_bits": 3},
}


def train(steps: int, every: int, hidden: int = 1200) -> list[EpochSnapshot]:
    """Snapshots of a real training run, one per ``every`` steps (``hidden``: the width of
    both hidden layers)."""
    torch.manual_seed(0)
    data = load_dataset("mnist", n_train=steps * BATCH, n_test=1)
    model = mlp(784, [hidden, hidden], 10, PriorSpec(kind=PriorKind.LEARNABLE, sigma0=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    recorder = GradientRecorder(model, GradLevel.ELEMENT)
    snaps: list[EpochSnapshot] = []
    t0 = time.perf_counter()
    for step in range(steps):
        x = data.x_train[step * BATCH : (step + 1) * BATCH]
        y = data.y_train[step * BATCH : (step + 1) * BATCH]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + (model_kl(model) + prior_penalty(model)) / N_TRAIN
        loss.backward()
        recorder.record_step()
        opt.step()
        if (step + 1) % every == 0:
            epoch = len(snaps)
            params = get_all_distribution_params(model, epoch, force=True)
            assert params is not None
            metrics = {"loss": float(loss.detach())}
            snaps.append(
                EpochSnapshot(epoch, params, metrics, recorder.result(), GradLevel.ELEMENT)
            )
            recorder.reset()
    print(f"trained {steps} steps in {time.perf_counter() - t0:.0f} s, {len(snaps)} captures")
    return snaps


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (clean pages: fsync first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def array_bytes(path: Path) -> dict[str, int]:
    """Stored bytes per kind of array: posterior mu/sigma, statistics, counts, summary,
    other."""
    out: dict[str, int] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            last = name.rsplit("/", 1)[-1]
            kind = (
                f"posterior {last}"
                if name.startswith("params/") and "/posterior/" in name
                else {"mean_abs": "statistics", "max_abs": "statistics"}.get(last, last)
            )
            if name.startswith("summary/"):
                kind = "summary"
            elif kind not in ("posterior mu", "posterior sigma", "statistics", "nonfinite"):
                kind = "other"
            out[kind] = out.get(kind, 0) + obj.id.get_storage_size()

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="writes of each snapshot per variant")
    ap.add_argument("--read-repeats", type=int, default=7, help="cold and warm reads per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dir", default=None, help="where the stores go (default: system temp)")
    ap.add_argument(
        "--malloc",
        default="tuned",
        choices=["tuned", "default"],
        help="tuned (as the trainer on the CPU: trainer.kernels.tune_allocator) or glibc's default",
    )
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or "v1" not in names:
        ap.error(f"--variants must include v1 and come from {list(VARIANTS)}, got {names}")
    torch.set_num_threads(1)
    tuned = args.malloc == "tuned" and kernels.tune_allocator()
    load = [os.getloadavg()[0]]
    snaps = train(args.steps, args.every)
    writes: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    sizes: dict[str, list[int]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        stores = {n: RunStore(root / n) for n in names}
        runs = {n: stores[n].create_run(n, {}).id for n in names}
        for snap in snaps:
            for rep in range(args.repeats):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for n in order:
                    path = root / f"{n}_{snap.epoch}.h5"
                    t0, c0 = time.perf_counter(), time.process_time()
                    write_epoch_file(path, snap, run_id=runs[n], **VARIANTS[n])  # fsynced
                    writes[n].append(time.perf_counter() - t0)
                    cpu[n].append(time.process_time() - c0)  # every thread of the process
            for n in names:
                path = root / f"{n}_{snap.epoch}.h5"
                sizes[n].append(path.stat().st_size)
                stores[n].import_epoch_file(runs[n], snap.epoch, path)
                path.unlink()
        del snaps
        last = max(e.epoch for e in stores["v1"].list_epochs(runs["v1"]))
        files = {
            n: [stores[n].epoch_path(runs[n], e.epoch) for e in stores[n].list_epochs(runs[n])]
            for n in names
        }
        reads: dict[str, Callable[[str, Path], Any]] = {
            f"KL table, {LAYER}, one epoch": lambda r, d: kl_tables(
                r, [last], layers=LAYER, data_dir=d
            ),
            "KL table, whole model, one epoch": lambda r, d: an.compute_layer_kl_divergences(
                r, last, data_dir=d
            ),
            "plot_kl_over_epochs": lambda r, d: an.plot_kl_over_epochs(r, layers=LAYER, data_dir=d),
            "plot_gradient_magnitudes": lambda r, d: an.plot_gradient_magnitudes(
                r, layers=LAYER, data_dir=d
            ),
            "plot_percentile_bands": lambda r, d: an.plot_percentile_bands(r, LAYER, data_dir=d),
        }
        cold: dict[tuple[str, str], list[float]] = {}
        warm: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.read_repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for what, fn in reads.items():
                for n in order:
                    an.clear_cache()
                    drop_cache(files[n])
                    t0 = time.perf_counter()
                    fn(runs[n], root / n)
                    cold.setdefault((what, n), []).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    fn(runs[n], root / n)
                    warm.setdefault((what, n), []).append(time.perf_counter() - t0)
        kinds = array_bytes(files["v2"][-1]) if "v2" in files else {}
        for store in stores.values():
            store.close()
    load.append(os.getloadavg()[0])

    med = statistics.median
    print(
        f"\n784-1200-1200-10, {len(sizes['v1'])} captured epochs of {args.every} steps, "
        f"{args.repeats} writes of each and {args.read_repeats} reads per variant, load "
        f"average {load[0]:.2f} before, {load[1]:.2f} after, malloc "
        f"{'tuned' if tuned else 'default'}"
    )
    head = (
        f"{'':<40}"
        + "".join(f"{n:>12}" for n in names)
        + "".join(f"{n + ' / v1':>16}" for n in names[1:])
    )
    print(head)

    def row(label: str, values: dict[str, float], fmt: str, ratio: str = ".2f") -> None:
        cells = "".join(f"{values[n]:>12{fmt}}" for n in names)
        ratios = "".join(f"{values[n] / values['v1']:>16{ratio}}" for n in names[1:])
        print(f"{label:<40}{cells}{ratios}")

    row("epoch file (MB, median)", {n: med(sizes[n]) / 1e6 for n in names}, ".2f", ".3f")
    row("epoch file (MB, largest)", {n: max(sizes[n]) / 1e6 for n in names}, ".2f", ".3f")
    row("write incl. fsync (ms, median)", {n: 1e3 * med(writes[n]) for n in names}, ".1f")
    row("write incl. fsync (ms, min)", {n: 1e3 * min(writes[n]) for n in names}, ".1f")
    row("  CPU time of the write (ms, median)", {n: 1e3 * med(cpu[n]) for n in names}, ".1f")
    for what in reads:
        row(f"{what} cold (ms)", {n: 1e3 * med(cold[(what, n)]) for n in names}, ".1f")
        row("  min", {n: 1e3 * min(cold[(what, n)]) for n in names}, ".1f")
    for what in reads:
        row(f"{what} warm (ms)", {n: 1e3 * med(warm[(what, n)]) for n in names}, ".1f")
    if kinds:
        total = sum(kinds.values())
        print("\nv2 file by kind of array (stored bytes):")
        for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:<18} {n / 1e6:7.2f} MB  {100 * n / total:5.1f}%")


if __name__ == "__main__":
    main()
