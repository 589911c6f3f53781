"""Which formulation of a Bayesian linear training step is fastest, by batch size.

One step (forward, KL, backward, fused Adam) of the 784-1200-1200-10 MLP with a learnable
shared prior, three ways, next to torchbnn 1.2 (when installed) with the same optimiser:

* **weight sampling** (``BayesLinear``, the default): one weight matrix per forward,
  w = mu + sigma * eps; costs one weight-sized normal draw and one matmul per layer.
* **local reparameterisation** (``local_reparam=True``): samples the pre-activations,
  mean = x mu^T + b, var = x^2 (sigma^2)^T + b_sigma^2; no weight-sized draw, but a second
  matmul forward and one or two more backward. Exact for the predictive of a factorised
  Gaussian layer, one independent sample per example (lower-variance gradients).
* **Flipout** (written here on the same parameters): one shared weight perturbation per
  batch, decorrelated per example with random signs, out = x mu^T + ((x * s) (sigma * eps)^T)
  * r; costs the weight-sized draw *and* a second matmul: never the fastest, it buys
  lower-variance gradients than weight sampling where local reparameterisation does not
  apply (e.g. convolutions with shared weights).

Variants are interleaved (``--rounds`` rounds of ``--steps`` steps each, median per
variant) so that the ratios hold on a noisy machine. ``--profile`` prints torch.profiler's
top operators for the weight-sampling and local-reparameterisation steps at batch 128.

    OMP_NUM_THREADS=2 python benchmarks/step_formulations.py [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_throughput import torchbnn_mlp  # (benchmarks/ is on sys.path when run as a script)

from trainer.layers import BayesLinear, model_kl, prior_penalty
from trainer.models import mlp
from trainer.priors import PriorKind, PriorSpec

N_TRAIN = 50_000
WIDTHS = [1200, 1200]


def flipout_forward(layer: BayesLinear, x: Tensor) -> Tensor:
    """Flipout (Wen et al. 2018) on a ``BayesLinear``'s posterior parameters."""
    sigma = layer._sigma("weight")
    delta = sigma * torch.randn_like(sigma)  # one perturbation for the whole batch
    s = torch.empty_like(x).bernoulli_(0.5).mul_(2).sub_(1)
    r = torch.empty(x.shape[0], layer.out_features).bernoulli_(0.5).mul_(2).sub_(1)
    out = F.linear(x, layer.weight_mu, layer.bias_mu) + F.linear(x * s, delta) * r
    if layer.bias_mu is not None:
        out = out + layer._sigma("bias") * torch.randn_like(out)
    return out


class FlipoutMLP(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.layers = [m for m in base.modules() if isinstance(m, BayesLinear)]

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = flipout_forward(layer, x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def variants() -> dict[str, tuple[nn.Module, Callable[[nn.Module, Tensor, Tensor], Tensor]]]:
    prior = PriorSpec(kind=PriorKind.LEARNABLE, sigma0=0.1)

    def elbo(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y) + (model_kl(model) + prior_penalty(model)) / N_TRAIN

    out = {
        "weight sampling (default)": (mlp(784, WIDTHS, 10, prior), elbo),
        "local reparameterisation": (mlp(784, WIDTHS, 10, prior, local_reparam=True), elbo),
        "Flipout": (FlipoutMLP(mlp(784, WIDTHS, 10, prior)), elbo),
    }
    try:
        tb, kl = torchbnn_mlp()
        out["torchbnn 1.2"] = (tb, lambda m, x, y: F.cross_entropy(m(x), y) + kl(m) / N_TRAIN)
    except ImportError:
        print("note: torchbnn not installed (make bench installs it); no peer column")
    return out


def step(
    model: nn.Module, loss: Callable, opt: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> None:
    opt.zero_grad(set_to_none=True)
    loss(model, x, y).backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vs = variants()
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for k, (m, _) in vs.items()}
    print(f"784-1200-1200-10, learnable prior, fused Adam, {args.threads} threads; ms per step")
    print(f"{'batch':>6} " + " ".join(f"{k:>26}" for k in vs))
    for batch in args.batches:
        x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
        times: dict[str, list[float]] = {k: [] for k in vs}
        for k, (m, loss) in vs.items():  # warm-up
            step(m, loss, opts[k], x, y)
        for _ in range(args.rounds):
            for k, (m, loss) in vs.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(m, loss, opts[k], x, y)
                times[k].append((time.perf_counter() - t0) / args.steps)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        base = med["weight sampling (default)"]
        cells = [f"{v:8.1f} ({base / v:4.2f}x ws)" for v in med.values()]
        print(f"{batch:>6} " + " ".join(f"{c:>26}" for c in cells))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
        for k in ("weight sampling (default)", "local reparameterisation"):
            m, loss = vs[k]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step(m, loss, opts[k], x, y)
            print(f"\n{k}, batch 128, 5 steps: top operators by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
