"""Training throughput of a 784-1200-1200-10 Bayesian MLP, batch 128, on this machine.

Every variant trains on the same MNIST batches with the same optimiser, Adam(1e-3) as
``bnn train`` makes it (``--optimizer fused``: on the CPU ``trainer.optim.RecordingAdam``,
the one-pass kernel that also takes a captured step's gradient statistics, on CUDA
PyTorch's fused Adam; ``torch-fused``, ``foreach`` or ``loop``: PyTorch's), and the ELBO
``CE + KL / N``. To keep ratios meaningful on a noisy shared
machine, variants are interleaved finely: each round runs a chunk of ``--chunk`` steps of
every variant in turn, and a variant's rate is the median over ``--rounds`` chunks.
Capture variants record gradient statistics at every step (inside the timed chunks) and,
once per round, capture a whole epoch and hand it to the trainer's background epoch
writer (a real run store: HDF5 + SQLite, fsync, catalogue, the stored summaries). The epoch
is charged to a full MNIST epoch (391 steps) as the time the training thread was blocked
(snapshot copies) plus all the CPU time the writer thread used (in training it competes with
the steps for the cores; here the write is waited for, untimed, so that it does not slow the
next variant's chunk instead), so "samples/s" of a capture variant is
391 * 128 / (391 steps at its step rate + that charge). Ratios are to torchbnn 1.2, the
fastest peer.

    python benchmarks/train_throughput.py [--rounds 15] [--chunk 20] [--threads 2] [--device cpu]

Peers (bayesian-torch 0.5.0, torchbnn 1.2, blitz-bayesian-pytorch 0.2.8) are skipped
with a note when not installed (`make bench` installs them with --no-deps).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer import kernels
from trainer.capture import GradientRecorder, HostCopies, get_all_distribution_params
from trainer.data import load_dataset
from trainer.layers import model_kl, prior_penalty
from trainer.models import deterministic_mlp, mlp
from trainer.optim import record_with
from trainer.priors import PriorKind, PriorSpec
from trainer.snapshot import EpochSnapshot, GradLevel
from trainer.store import RunStore
from trainer.store._write import background_cpu
from trainer.train import _adam, _EpochWriter

WIDTHS = [1200, 1200]
BATCH = 128
DEVICE = torch.device("cpu")  # set by --device before any model is built
N_TRAIN = 50_000
EPOCH_STEPS = 391  # one MNIST epoch: 50,000 / 128


@dataclass
class Variant:
    name: str
    model: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]
    end_epoch: Callable[[int], float] | None = None
    after_backward: Callable[[torch.optim.Optimizer], None] | None = None
    finish: Callable[[], float] | None = None
    optimizer: str | None = None  # overrides --optimizer


class EpochCharge:
    """What capturing an epoch costs training, as the trainer captures it: the training
    thread's blocked time (the snapshot's copies, the recorder's result) plus the CPU time of
    the write in the background writer thread and the thread beside it that computes the
    posteriors' summaries (HDF5, fsync, catalogue, the stored summaries),
    which in training competes with the steps for the cores. The write is waited for here,
    untimed, so that it does not run into the next measurement and slow that one instead."""

    def __init__(self, store: RunStore, name: str, device: torch.device) -> None:
        self.store, self.device = store, device
        self.run_id = store.create_run(name, {"benchmark": True}).id
        self._cpu: list[float] = []
        self.writer = _EpochWriter(self._write, lambda epoch: None)

    def _write(self, snap: EpochSnapshot) -> bool:
        # this thread's CPU time and that of the thread the write computes the posteriors'
        # summaries on
        t0, b0 = time.thread_time(), background_cpu()
        self.store.write_epoch(self.run_id, snap)
        self._cpu.append(time.thread_time() - t0 + background_cpu() - b0)
        return True

    def __call__(self, model: nn.Module, recorder: GradientRecorder, epoch: int) -> float:
        """Capture ``epoch`` (the recorder's statistics so far), reset the recorder; seconds."""
        t0 = time.perf_counter()
        copies = HostCopies(self.device)
        params = get_all_distribution_params(model, epoch, force=True, copies=copies)
        assert params is not None
        result = recorder.result(copies)
        snap = EpochSnapshot(epoch, params, {"loss": 0.0}, result, recorder.level)
        recorder.reset()
        self.writer.submit(snap, copies.ready())
        blocked = time.perf_counter() - t0
        self.writer.wait()
        return blocked + self._cpu.pop()


def ours(
    name: str,
    kind: PriorKind,
    level: GradLevel | None,
    store: RunStore | None,
    *,
    local_reparam: bool = False,
    fused: bool = True,
    optimizer: str | None = None,
) -> Variant:
    model = mlp(784, WIDTHS, 10, PriorSpec(kind=kind, sigma0=0.1), local_reparam=local_reparam).to(
        DEVICE
    )

    def loss(x: Tensor, y: Tensor) -> Tensor:
        with contextlib.nullcontext() if fused else kernels.disabled():
            return F.cross_entropy(model(x), y) + (model_kl(model) + prior_penalty(model)) / N_TRAIN

    if level is None:
        return Variant(name, model, loss, optimizer=optimizer)
    recorder = GradientRecorder(model, level)
    assert store is not None
    charge = EpochCharge(store, name, DEVICE)

    def end_epoch(epoch: int) -> float:
        return charge(model, recorder, epoch)

    def finish() -> float:
        charge.writer.wait()
        return 0.0

    def record(opt: torch.optim.Optimizer) -> None:  # as the trainer records a step
        record_with(opt, recorder)

    return Variant(name, model, loss, end_epoch, record, finish)


def deterministic() -> Variant:
    model = deterministic_mlp(784, WIDTHS, 10)
    return Variant("deterministic MLP (floor)", model, lambda x, y: F.cross_entropy(model(x), y))


def torchbnn_mlp() -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    """torchbnn 1.2's 784-1200-1200-10 MLP (prior N(0, 0.1^2)) and its summed KL
    (ImportError when torchbnn is not installed)."""
    import torchbnn

    tb = nn.Sequential(
        torchbnn.BayesLinear(0.0, 0.1, 784, WIDTHS[0]),
        nn.ReLU(),
        torchbnn.BayesLinear(0.0, 0.1, WIDTHS[0], WIDTHS[1]),
        nn.ReLU(),
        torchbnn.BayesLinear(0.0, 0.1, WIDTHS[1], 10),
    )
    return tb, torchbnn.BKLLoss(reduction="sum", last_layer_only=False)


def peers() -> list[Variant]:
    out: list[Variant] = []
    try:
        tb, kl_loss = torchbnn_mlp()
        out.append(
            Variant(
                "torchbnn 1.2 BayesLinear",
                tb,
                lambda x, y: F.cross_entropy(tb(x), y) + kl_loss(tb) / N_TRAIN,
            )
        )
    except ImportError:
        print("note: torchbnn not installed; ratios are to the first variant instead")
    try:
        from bayesian_torch.layers import LinearReparameterization as LR

        class BT(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.l1, self.l2, self.l3 = LR(784, 1200), LR(1200, 1200), LR(1200, 10)

            def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
                x, k1 = self.l1(x)
                x, k2 = self.l2(F.relu(x))
                x, k3 = self.l3(F.relu(x))
                return x, k1 + k2 + k3

        bt = BT()

        def bt_loss(x: Tensor, y: Tensor) -> Tensor:
            logits, kl = bt(x)
            return F.cross_entropy(logits, y) + kl / N_TRAIN

        out.append(Variant("bayesian-torch 0.5.0 LinearReparameterization", bt, bt_loss))
    except ImportError:
        print("note: bayesian-torch not installed")
    try:
        from blitz.modules import BayesianLinear

        bl = nn.Sequential(
            BayesianLinear(784, 1200),
            nn.ReLU(),
            BayesianLinear(1200, 1200),
            nn.ReLU(),
            BayesianLinear(1200, 10),
        )

        def bl_loss(x: Tensor, y: Tensor) -> Tensor:
            logits = bl(x)
            kl = sum(
                m.log_variational_posterior - m.log_prior
                for m in bl
                if isinstance(m, BayesianLinear)
            )
            return F.cross_entropy(logits, y) + kl / N_TRAIN

        out.append(Variant("blitz 0.2.8 BayesianLinear", bl, bl_loss))
    except ImportError:
        print("note: blitz-bayesian-pytorch not installed")
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_chunk(v: Variant, opt: torch.optim.Optimizer, data: list[tuple[Tensor, Tensor]]) -> float:
    """Train on ``data``; samples per second."""
    _sync()
    t0 = time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = v.loss(x, y)
        loss.backward()
        if v.after_backward is not None:
            v.after_backward(opt)
        opt.step()
    _sync()
    return len(data) * BATCH / (time.perf_counter() - t0)


def time_epoch_end(v: Variant, epoch: int) -> float:
    assert v.end_epoch is not None
    _sync()
    return v.end_epoch(epoch)


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    """Adam(1e-3): "fused" (what ``bnn train`` uses: trainer.train._adam), "torch-fused"
    (PyTorch's fused kernel), "foreach" or "loop"."""
    if kind == "fused":
        return _adam(torch.optim.Adam, list(model.parameters()), 1e-3)
    if kind == "torch-fused":
        return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    return torch.optim.Adam(model.parameters(), lr=1e-3, foreach=kind == "foreach")


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--chunk", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--optimizer",
        default="fused",
        choices=["fused", "torch-fused", "foreach", "loop"],
        help="every variant's",
    )
    ap.add_argument(
        "--malloc",
        default="tuned",
        choices=["tuned", "default"],
        help="tuned (default): glibc malloc keeps freed memory (trainer.kernels.tune_allocator, "
        "what bnn train does on the CPU), for every variant of the run alike; default: as is",
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: run only the variants whose name holds one (torchbnn "
        "and the learnable prior without capture always run, as the references)",
    )
    args = ap.parse_args()
    tuned = args.malloc == "tuned" and kernels.tune_allocator()
    device = DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = load_dataset("mnist", n_train=args.chunk * BATCH, n_test=1)
    data = [
        (ds.x_train[i : i + BATCH].to(device), ds.y_train[i : i + BATCH].to(device))
        for i in range(0, ds.n_train, BATCH)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(tmp)
        variants = [
            deterministic(),
            *peers(),
            ours("ours fixed prior, no capture", PriorKind.FIXED, None, None),
            ours(
                "ours learnable, torch ops, no capture",
                PriorKind.LEARNABLE,
                None,
                None,
                fused=False,
            ),
            ours(
                "ours learnable, PyTorch fused Adam, no capture",
                PriorKind.LEARNABLE,
                None,
                None,
                optimizer="torch-fused",
            ),
            ours(
                "ours learnable, local reparam, no capture",
                PriorKind.LEARNABLE,
                None,
                None,
                local_reparam=True,
            ),
            # the reference right before the capture variants: their overheads are paired
            # per round with it (adjacent chunks, the least drift between them)
            ours("ours learnable prior, no capture", PriorKind.LEARNABLE, None, None),
            ours("ours learnable, per-layer capture", PriorKind.LEARNABLE, GradLevel.LAYER, store),
            ours(
                "ours learnable, per-element capture",
                PriorKind.LEARNABLE,
                GradLevel.ELEMENT,
                store,
            ),
        ]
        if args.only:
            keep = [w.strip() for w in args.only.split(",") if w.strip()]
            references = ("torchbnn", "ours learnable prior, no capture")
            variants = [v for v in variants if any(w in v.name for w in (*keep, *references))]
        for v in variants:
            v.model.to(device)
        opts = [make_optimizer(v.model, v.optimizer or args.optimizer) for v in variants]
        for v, o in zip(variants, opts, strict=True):  # warm-up
            run_chunk(v, o, data[:3])
        rates: dict[str, list[float]] = {v.name: [] for v in variants}
        writes: dict[str, list[float]] = {v.name: [] for v in variants if v.end_epoch}
        load = []
        for r in range(args.rounds):
            for v, o in zip(variants, opts, strict=True):
                rates[v.name].append(run_chunk(v, o, data))
                if v.end_epoch is not None:
                    writes[v.name].append(time_epoch_end(v, r))
            load.append(os.getloadavg()[0])
            print(f"round {r + 1}/{args.rounds} done (load {load[-1]:.2f})", flush=True)
        for v in variants:
            if v.finish is not None:
                v.finish()
        store.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    write_s = {k: statistics.median(v) for k, v in writes.items()}
    epoch_samples = EPOCH_STEPS * BATCH
    full = {
        k: epoch_samples / (epoch_samples / rate + write_s.get(k, 0.0)) for k, rate in med.items()
    }
    ref_name = next((k for k in med if k.startswith("torchbnn")), next(iter(med)))
    ref = full[ref_name]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{args.threads} threads"
    print(
        f"\n784-1200-1200-10, batch {BATCH}, {args.rounds} rounds x {len(data)} steps per "
        f"variant, {args.device} ({where}), Adam {args.optimizer}, "
        f"load average {min(load):.2f}-{max(load):.2f}, malloc {'tuned' if tuned else 'default'}, "
        f"fused kernels: {kernels.status() if device.type == 'cpu' else 'CPU only'}"
    )
    print(f"{'variant':<46} {'samples/s':>10} {'epoch write':>12} {'ratio to torchbnn':>18}")
    for k, v in full.items():
        w = f"{write_s[k]:.2f} s" if k in write_s else "-"
        print(f"{k:<46} {v:>10.0f} {w:>12} {v / ref:>17.2f}x")
    base_name = "ours learnable prior, no capture"
    for level in ("per-layer", "per-element"):
        name = f"ours learnable, {level} capture"
        if name not in full:
            continue
        # per round: the epoch time of the capture variant (its chunk's step rate plus that
        # round's epoch charge) over the reference's in the chunk just before it
        paired = [
            (epoch_samples / cap + charge) / (epoch_samples / ref_rate) - 1
            for cap, charge, ref_rate in zip(
                rates[name], writes[name], rates[base_name], strict=True
            )
        ]
        low, high = median_ci(paired)
        print(
            f"capture overhead {level}: {100 * (full[base_name] / full[name] - 1):.1f}% of the "
            f"epoch time (ratio of medians); paired per round: median "
            f"{100 * statistics.median(paired):.1f}%, {'95% CI' if len(paired) >= 6 else 'range'} "
            f"{100 * low:.1f} to {100 * high:.1f}%"
        )


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics whose
    ranks the binomial(n, 1/2) distribution puts around it (the sign test's interval)."""
    xs = sorted(values)
    n = len(xs)
    if n < 6:  # too few rounds for a 95% interval: the range
        return xs[0], xs[-1]
    cdf, k = 0.0, 0
    while True:  # the largest k with P(B <= k) <= (1 - level) / 2, B ~ binomial(n, 1/2)
        p = math.comb(n, k) / 2**n
        if cdf + p > (1 - level) / 2:
            break
        cdf += p
        k += 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k]


if __name__ == "__main__":
    main()
