"""Capture's cost in a real training loop, step by step: what per-layer and per-element
gradient capture add to a training step of the 784-1200-1200-10 learnable-prior MLP, and to
an epoch once the epoch's write is charged.

One model trains on MNIST batches (batch 128) with the optimiser ``bnn train`` makes
(``trainer.train._adam``: on the CPU ``RecordingAdam``, whose pass takes a recorded step's
statistics). Its steps run in blocks of ``--block`` steps cycling through *none, layer,
none, element*; each recorded block (forward, KL, backward, recording, update per step) is
paired with the unrecorded block just before it, on the same model and optimiser, so the
machine's drift (this is a shared VM) cancels within a pair. The first step of a block is
not timed: it pays for what the previous block left in the caches, which in training at
one level is that level's own cost, and is then counted in the steps that follow. A level's
step overhead is the median over its pairs of ``t_recorded / t_unrecorded - 1`` (each the
mean step time of the block's timed steps), with the sign test's distribution-free 95% CI
of that median. Then, ``--writes`` times per level, a whole epoch's capture as the trainer makes it
(the snapshot's copies, the recorder's result, the background writer's write to a real run
store: HDF5, fsync, SQLite catalogue, the stored summaries) is charged as the training
thread's blocked time plus the write's CPU time (the writer thread's and that of the thread
beside it that computes the posteriors' summaries; in training it competes with the steps
for the cores), and divided by a 391-step MNIST epoch of unrecorded steps. The
capture overhead of a level is the two added.

    OMP_NUM_THREADS=2 python benchmarks/capture_step.py [--pairs 100] [--block 4] [--threads 2]
        [--writes 5] [--device cpu|cuda] [--element-every N --block N+1]

``--element-every N`` adds a third level, per-element statistics whose mean |g| samples every
N-th step (``GradientRecorder(element_every=N)``, ``bnn train --element-every N``; the max
|g| and counts still take every step); its blocks of ``m * N + 1`` steps time ``m * N``
steps of which exactly ``m`` are sampled.

On CUDA every step ends with a device synchronisation (so a step's time is its own) and the
epoch's copies to the host are asynchronous, as in the trainer.

Compared with ``train_throughput.py`` (chunks of 20 steps per variant, separate models),
this pairs short blocks of steps of one model: it measures only capture's cost, with a much
narrower interval on a noisy machine, and no peer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from train_throughput import BATCH, EPOCH_STEPS, N_TRAIN, EpochCharge, median_ci

from trainer import kernels
from trainer.capture import GradientRecorder
from trainer.data import load_dataset
from trainer.layers import model_kl, prior_penalty
from trainer.models import mlp
from trainer.optim import record_with
from trainer.priors import PriorKind, PriorSpec
from trainer.snapshot import GradLevel
from trainer.store import RunStore
from trainer.train import _adam

LEVELS = ("layer", "element")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=100, help="recorded blocks per level")
    ap.add_argument("--block", type=int, default=4, help="steps per block (>= 2)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--writes", type=int, default=5, help="epoch writes per level")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--element-every",
        type=int,
        default=0,
        metavar="N",
        help="also measure per-element statistics whose mean samples every N-th step "
        "(element_every)",
    )
    args = ap.parse_args()
    if args.element_every < 0 or args.element_every == 1:
        ap.error(f"--element-every must be >= 2 (0: not measured), got {args.element_every}")
    if args.element_every and args.block % args.element_every != 1:
        # a block of m*N + 1 steps: its m*N timed steps hold exactly m sampled ones
        ap.error(
            f"--block must be one more than a multiple of --element-every (e.g. "
            f"{args.element_every + 1}), so that every block's timed steps hold the same share "
            f"of sampled steps; got --block {args.block}"
        )
    levels = [*LEVELS, f"element/{args.element_every}"] if args.element_every else list(LEVELS)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.block < 2:
        ap.error(f"--block must be >= 2 (its first step is not timed), got {args.block}")
    torch.set_num_threads(args.threads)
    tuned = kernels.tune_allocator()
    torch.manual_seed(0)
    ds = load_dataset("mnist", n_train=64 * BATCH, n_test=1)
    data = [
        (ds.x_train[i : i + BATCH].to(device), ds.y_train[i : i + BATCH].to(device))
        for i in range(0, 64 * BATCH, BATCH)
    ]
    model = mlp(784, [1200, 1200], 10, PriorSpec(kind=PriorKind.LEARNABLE, sigma0=0.1))
    model.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    opt = _adam(torch.optim.Adam, list(model.parameters()), 1e-3)
    recorders = {
        name: GradientRecorder(
            model,
            GradLevel.LAYER if name == "layer" else GradLevel.ELEMENT,
            element_every=args.element_every if "/" in name else 1,
        )
        for name in levels
    }

    def step(i: int, level: str | None) -> float:
        x, y = data[i % len(data)]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + (model_kl(model) + prior_penalty(model)) / N_TRAIN
        loss.backward()
        if level is not None:
            record_with(opt, recorders[level])
        opt.step()
        sync()
        return time.perf_counter() - t0

    cycle: list[str | None] = [x for name in levels for x in (None, name)]
    for i in range(2 * len(cycle)):  # warm-up: every path once, kernels compiled
        step(i, cycle[i % len(cycle)])
    pairs: dict[str, list[tuple[float, float]]] = {level: [] for level in levels}
    load = [os.getloadavg()[0]]
    i = 0

    def block(level: str | None) -> float:
        """Mean time of the block's steps after its first."""
        nonlocal i
        times = [step(i + k, level) for k in range(args.block)]
        i += args.block
        return statistics.fmean(times[1:])

    for p in range(args.pairs):
        for level in levels:
            base = block(None)
            pairs[level].append((base, block(level)))
        if (p + 1) % 50 == 0:
            load.append(os.getloadavg()[0])
            print(f"{p + 1}/{args.pairs} pairs (load {load[-1]:.2f})", flush=True)

    charges: dict[str, list[float]] = {level: [] for level in levels}
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        charge = EpochCharge(store, "capture_step", device)
        epoch = 0
        for _ in range(args.writes):
            for level in levels:
                for _ in range(3):  # a few steps into the recorder's new epoch
                    step(i, level)
                    i += 1
                charges[level].append(charge(model, recorders[level], epoch))
                epoch += 1
        charge.writer.wait()
        store.close()
    load.append(os.getloadavg()[0])

    base_step = statistics.median(b for level in levels for b, _ in pairs[level])
    epoch_s = EPOCH_STEPS * base_step
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{args.threads} threads"
    print(
        f"\n784-1200-1200-10 learnable prior, batch {BATCH}, {where}, "
        f"{args.pairs} pairs of {args.block}-step blocks per level, {args.writes} epoch writes "
        f"per level, load average "
        f"{min(load):.2f}-{max(load):.2f}, malloc {'tuned' if tuned else 'default'}, "
        f"kernels: {kernels.status() if device.type == 'cpu' else 'CPU only'}"
    )
    print(
        f"unrecorded step: {1e3 * base_step:.2f} ms (median); {EPOCH_STEPS} of them {epoch_s:.2f} s"
    )
    print(
        f"{'level':<11} {'step +':>8} {'95% CI':>16} {'epoch write':>12} {'of an epoch':>12} "
        f"{'capture overhead':>17}"
    )
    for level in levels:
        ratios = [r / b - 1 for b, r in pairs[level]]
        med = statistics.median(ratios)
        low, high = median_ci(ratios)
        charge = statistics.median(charges[level])
        share = charge / epoch_s
        print(
            f"{level:<11} {100 * med:>7.1f}% {100 * low:>7.1f} to {100 * high:>4.1f}% "
            f"{charge:>10.2f} s {100 * share:>11.1f}% {100 * (med + share):>16.1f}%"
        )


if __name__ == "__main__":
    main()
