"""One optimiser step in isolation: what recording a captured step's gradient statistics costs
with PyTorch's fused Adam (the recorder's own pass over every gradient, then the update) and
with ``trainer.optim.RecordingAdam`` (the statistics taken in the update's own pass).

The model's gradients come from one real ELBO backward and stay fixed; every variant steps
its own optimiser (lr 1e-6, so the parameters barely move) on them, the variants interleaved
rep by rep, and before each timed step a 64 MB buffer is written so that the parameters,
gradients and optimiser state come from memory, as after a real forward and backward.
Prints the median time per step of each variant and the cost of recording against the same
optimiser's plain step.

    OMP_NUM_THREADS=2 python benchmarks/optimizer_step.py [--model big|small] [--threads 2]
        [--reps 200]

``big``: the 784-1200-1200-10 learnable-prior MLP of ``train_throughput.py`` (4.7M elements);
``small``: the regression demo's 1-32-32-1 MLP, where ``RecordingAdam`` keeps PyTorch's update
(below ``RecordingAdam.ONE_PASS_MIN``); its "forced" rows run the kernel anyway.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainer import kernels
from trainer.capture import GradientRecorder
from trainer.layers import model_kl
from trainer.models import mlp
from trainer.optim import RecordingAdam, record_with
from trainer.priors import PriorKind, PriorSpec
from trainer.snapshot import GradLevel


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="big", choices=["big", "small"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels.tune_allocator()
    torch.manual_seed(0)
    prior = PriorSpec(kind=PriorKind.LEARNABLE)
    if args.model == "big":
        model = mlp(784, [1200, 1200], 10, prior)
        x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
        loss = F.cross_entropy(model(x), y)
    else:
        model = mlp(1, [32, 32], 1, prior)
        x, y = torch.randn(64, 1), torch.randn(64, 1)
        loss = F.mse_loss(model(x), y)
    (loss + model_kl(model) / 50_000).backward()
    params = list(model.parameters())
    size = sum(p.numel() for p in params)
    recorders = {lv: GradientRecorder(model, lv) for lv in (GradLevel.LAYER, GradLevel.ELEMENT)}

    def variant(opt: torch.optim.Optimizer, level: GradLevel | None) -> Callable[[], None]:
        def step() -> None:
            if level is not None:
                record_with(opt, recorders[level])  # a separate pass unless RecordingAdam
            opt.step()

        return step

    def pytorch() -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-6, fused=True)

    def ours() -> torch.optim.Optimizer:
        return RecordingAdam(params, lr=1e-6, fused=True, one_pass_min=0)

    forced = " (forced)" if size < RecordingAdam.ONE_PASS_MIN else ""
    variants = {
        "PyTorch fused Adam": variant(pytorch(), None),
        "PyTorch fused Adam + recorder pass, per layer": variant(pytorch(), GradLevel.LAYER),
        "PyTorch fused Adam + recorder pass, per element": variant(pytorch(), GradLevel.ELEMENT),
        f"RecordingAdam{forced}": variant(ours(), None),
        f"RecordingAdam{forced}, per layer in its pass": variant(ours(), GradLevel.LAYER),
        f"RecordingAdam{forced}, per element in its pass": variant(ours(), GradLevel.ELEMENT),
    }
    evict = torch.empty(16 << 20)  # 64 MB, more than the last-level cache
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps + 10):
        for name, step in variants.items():
            evict.fill_(float(rep))
            t0 = time.perf_counter()
            step()
            if rep >= 10:  # warm-up
                times[name].append(time.perf_counter() - t0)
        for rec in recorders.values():
            if rec._norms is not None and rec._norms.n > 1000:
                rec.reset()
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(
        f"{args.model} model ({size:,} elements), {args.threads} threads, {args.reps} reps, "
        f"kernels: {kernels.status()}"
    )
    print(f"{'variant':<52} {'ms/step':>8} {'recording costs':>16}")
    names = list(med)
    for i, name in enumerate(names):
        base = med[names[0 if i < 3 else 3]]
        extra = f"+{med[name] - base:.3f} ms" if i % 3 else "-"
        print(f"{name:<52} {med[name]:>8.3f} {extra:>16}")


if __name__ == "__main__":
    main()
