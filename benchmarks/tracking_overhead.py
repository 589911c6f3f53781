"""What ``trainer.track`` costs a training loop, against the same loop untracked and against
the capture ``bnn train`` pays, on this machine.

The same 784-400-400-10 Bayesian MLP (learnable prior), batch 128, Adam(1e-3) as ``bnn
train`` makes it (on the CPU ``trainer.optim.RecordingAdam``), loss ``CE + KL / N`` on MNIST
batches, in four variants, each with its own model and optimiser:

* **plain**: the loop alone, nothing recorded;
* **bnn train capture**: what :class:`trainer.train.Trainer` does on top of the step when it
  captures every epoch: the divergence watch after each backward and the step recorded
  (``trainer.optim.record_with``: in the optimiser's own pass), and at each epoch end the
  KL per layer, ``get_all_distribution_params``, an ``EpochSnapshot`` handed to the
  trainer's background epoch writer (``RunStore.write_epoch``: HDF5 + SQLite, fsync,
  catalogue);
* **trainer.track**: the loop with ``run.step(loss)`` after each backward and
  ``run.log_epoch`` at each epoch end, into a real run store (``capture_every=1``): the
  recorder's own pass over the gradients, as for any optimiser;
* **trainer.track(optimizer=)**: the same with the tracker recording in the optimiser's step
  hook instead of ``run.step``, so that the RecordingAdam takes the statistics in its pass.

An epoch end is charged, as ``benchmarks/train_throughput.py`` charges it, the time the
training thread was blocked (the snapshot) plus the CPU time the writer thread used for the
epoch's write (in training it competes with the steps for the cores). The write is waited
for, untimed, before the next variant runs: else it runs into the next variant's chunk and
slows that one instead (with the order rotating, the variant after a writing one was charged
for it, which made ``bnn train capture``, always after the plain loop, look free).

Variants are interleaved finely on the noisy shared machine: each round runs ``--chunk``
steps of every variant in turn (the order rotates from round to round), then ends an epoch
of each capturing variant, timed apart and charged to a full MNIST epoch of 391 steps, as
``benchmarks/train_throughput.py`` does. A variant's epoch time is 391 x its median step
time + its median epoch end. "Overhead" is the extra time per epoch against the plain loop;
the per-round overhead (a variant's epoch time from that round's chunk and epoch end against
the plain loop's chunk of the same round) is summarised by its median and quartiles, which
load changes between rounds disturb less.

    OMP_NUM_THREADS=1 python benchmarks/tracking_overhead.py [--rounds 15] [--chunk 20]
        [--threads 1] [--grad-level element|layer|none] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import trainer
from trainer.capture import GradientRecorder, HostCopies, get_all_distribution_params
from trainer.data import load_dataset
from trainer.layers import bayesian_layers, kl_by_layer, model_kl, prior_penalty
from trainer.models import mlp
from trainer.optim import record_with
from trainer.priors import PriorSpec
from trainer.snapshot import EpochSnapshot, GradLevel
from trainer.store import RunStore
from trainer.train import _adam, _DivergenceWatch, _EpochWriter

WIDTHS = [400, 400]
BATCH = 128
N_TRAIN = 50_000
EPOCH_STEPS = 391  # one MNIST epoch: 50,000 / 128


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_backward: Callable[[Tensor], None] | None = None
    end_epoch: Callable[[int, float], None] | None = None
    start_epoch: Callable[[], None] | None = None
    writer_cpu: list[float] | None = None  # CPU seconds of each write, on the writer thread
    flush: Callable[[], None] | None = None  # waits for the write in flight


class TimedStore:
    """A run store whose ``write_epoch`` records the CPU time of its thread."""

    def __init__(self, store: RunStore, cpu: list[float]) -> None:
        self.store, self.cpu = store, cpu

    def write_epoch(self, run_id: str, snap: EpochSnapshot) -> object:
        t0 = time.thread_time()
        try:
            return self.store.write_epoch(run_id, snap)
        finally:
            self.cpu.append(time.thread_time() - t0)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def make_model(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = mlp(784, WIDTHS, 10, PriorSpec(kind="learnable", sigma0=0.1)).to(device)
    return model, _adam(torch.optim.Adam, list(model.parameters()), 1e-3)  # bnn train's


def plain(device: torch.device) -> Variant:
    return Variant("plain loop (no tracking)", *make_model(device))


def trainer_capture(device: torch.device, store: RunStore, level: GradLevel) -> Variant:
    """The calls Trainer.fit makes for a captured epoch, outside the ELBO step itself."""
    model, optimizer = make_model(device)
    recorder = GradientRecorder(model, level)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    watch = _DivergenceWatch(named, device)
    cpu: list[float] = []
    timed = TimedStore(store, cpu)
    run_id = store.create_run("bnn train capture", {"benchmark": True}).id
    writer = _EpochWriter(lambda snap: bool(timed.write_epoch(run_id, snap)), lambda e: None)
    types = {name: type(layer).__name__ for name, layer in bayesian_layers(model)}
    step0 = [0, 0]  # global step at the epoch's start, steps so far

    def start() -> None:
        recorder.reset()
        watch.start(EPOCH_STEPS)
        step0[0] = step0[1]

    def after(loss: Tensor) -> None:
        watch.observe(loss)
        step0[1] += 1
        record_with(optimizer, recorder)

    def end(epoch: int, loss: float) -> None:
        watch.first(epoch, step0[0])
        with torch.no_grad():
            per_layer = {k: float(v) for k, v in kl_by_layer(model).items()}
        metrics = {"loss": loss, "kl": sum(per_layer.values())}
        metrics |= {f"kl/{k}": v for k, v in per_layer.items()}
        copies = HostCopies(device)
        params = get_all_distribution_params(model, epoch, force=True, copies=copies)
        assert params is not None
        gradients = recorder.result(copies)
        snap = EpochSnapshot(epoch, params, metrics, gradients, recorder.level, types)
        writer.submit(snap, copies.ready())  # waits for the previous write first

    name = "bnn train capture (Trainer's calls)"
    return Variant(name, model, optimizer, after, end, start, cpu, writer.wait)


def tracked(
    device: torch.device, store: RunStore, level: GradLevel, *, hook: bool = False
) -> tuple[Variant, object]:
    model, optimizer = make_model(device)
    cpu: list[float] = []
    sink = TimedStore(store, cpu)
    name = "trainer.track(optimizer=)" if hook else "trainer.track"
    run = trainer.track(
        model, name=name, sink=sink, grad_level=level.value, optimizer=optimizer if hook else None
    )

    def after(loss: Tensor) -> None:
        run.step(loss)

    def end(epoch: int, loss: float) -> None:
        run.log_epoch(epoch, {"loss": loss})

    after_backward = None if hook else after
    return Variant(name, model, optimizer, after_backward, end, None, cpu, run.flush), run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_chunk(v: Variant, data: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
    """Train ``v`` on ``data``; seconds per step."""
    _sync(device)
    t0 = time.perf_counter()
    if v.start_epoch is not None:
        v.start_epoch()
    for x, y in data:
        v.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(v.model(x), y)
        loss = loss + (model_kl(v.model) + prior_penalty(v.model)) / N_TRAIN
        loss.backward()
        if v.after_backward is not None:
            v.after_backward(loss)
        v.optimizer.step()
    _sync(device)
    return (time.perf_counter() - t0) / len(data)


def time_end(v: Variant, epoch: int, device: torch.device) -> float:
    """Blocked time of the epoch end + the writer CPU time of its write (waited for, untimed)."""
    assert v.end_epoch is not None and v.writer_cpu is not None
    _sync(device)
    t0 = time.perf_counter()
    v.end_epoch(epoch, 0.0)
    _sync(device)
    blocked = time.perf_counter() - t0
    if v.flush is not None:  # untimed: else the write runs into the next variant's chunk
        v.flush()
    return blocked + (v.writer_cpu.pop(0) if v.writer_cpu else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--chunk", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--grad-level", default="element", choices=[g.value for g in GradLevel])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    if args.rounds < 1 or args.chunk < 1:
        ap.error(f"--rounds and --chunk must be >= 1 (got {args.rounds}, {args.chunk})")
    device = torch.device(args.device)
    level = GradLevel(args.grad_level)
    torch.set_num_threads(args.threads)
    ds = load_dataset("mnist", n_train=args.chunk * BATCH, n_test=1)
    data = [
        (ds.x_train[i : i + BATCH].to(device), ds.y_train[i : i + BATCH].to(device))
        for i in range(0, ds.n_train, BATCH)
    ]
    with tempfile.TemporaryDirectory() as tmp, RunStore(tmp) as store:
        track_variant, run = tracked(device, store, level)
        hook_variant, hook_run = tracked(device, store, level, hook=True)
        variants = [
            plain(device),
            trainer_capture(device, store, level),
            track_variant,
            hook_variant,
        ]
        for v in variants:  # warm-up (its epoch is not timed)
            run_chunk(v, data[:3], device)
            if v.end_epoch is not None:
                v.end_epoch(0, 0.0)
            if v.flush is not None:
                v.flush()
            if v.writer_cpu is not None:
                v.writer_cpu.clear()
        steps: dict[str, list[float]] = {v.name: [] for v in variants}
        ends: dict[str, list[float]] = {v.name: [] for v in variants if v.end_epoch}
        load = []
        for r in range(1, args.rounds + 1):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                steps[v.name].append(run_chunk(v, data, device))
                if v.end_epoch is not None:
                    ends[v.name].append(time_end(v, r, device))
            load.append(os.getloadavg()[0])
            print(f"round {r}/{args.rounds} done (load {load[-1]:.2f})", flush=True)
        for v in variants:
            if v.flush is not None:
                v.flush()
        run.finish()  # type: ignore[attr-defined]
        hook_run.finish()  # type: ignore[attr-defined]
    step_s = {k: statistics.median(v) for k, v in steps.items()}
    end_s = {k: statistics.median(v) for k, v in ends.items()}
    epoch_s = {k: EPOCH_STEPS * s + end_s.get(k, 0.0) for k, s in step_s.items()}
    base = epoch_s[variants[0].name]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{args.threads} threads"
    print(
        f"\n784-{'-'.join(map(str, WIDTHS))}-10 learnable prior, batch {BATCH}, grad level "
        f"{level.value}, {args.rounds} rounds x {len(data)} steps per variant, {args.device} "
        f"({where}), load average {min(load):.2f}-{max(load):.2f}"
    )
    print(f"{'variant':<40} {'ms/step':>8} {'epoch end':>10} {'s/epoch':>8} {'overhead':>9}")
    for k in step_s:
        end = f"{end_s[k]:.3f} s" if k in end_s else "-"
        over = f"{100 * (epoch_s[k] / base - 1):.1f}%" if k != variants[0].name else "-"
        print(f"{k:<40} {1e3 * step_s[k]:>8.2f} {end:>10} {epoch_s[k]:>8.2f} {over:>9}")
    plain_steps = steps[variants[0].name]
    for v in variants[1:]:
        per_round = [
            100 * ((EPOCH_STEPS * s + e) / (EPOCH_STEPS * p) - 1)
            for s, e, p in zip(steps[v.name], ends[v.name], plain_steps, strict=True)
        ]
        q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [0, 0, 0]
        print(
            f"per-round overhead of {v.name}: median {statistics.median(per_round):.1f}% "
            f"(quartiles {q1:.1f}% .. {q3:.1f}%)"
        )
    for name in ("trainer.track", "trainer.track(optimizer=)"):
        ratio = epoch_s[name] / epoch_s[variants[1].name]
        print(f"{name} / bnn train capture: {ratio:.3f} of the epoch time")


if __name__ == "__main__":
    main()
