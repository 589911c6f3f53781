"""Training-step cost of a small Bayesian MLP (the regression demo's 1-32-32-1), side by side.

At this size every step is a few hundred tiny operations, so the cost is PyTorch's per-operation
overhead, not arithmetic. This benchmark times one ELBO step (forward, KL, backward, Adam on the
posterior and on the learnable priors) with the pieces the trainer uses now against the ones it
used before, interleaved in rounds so that machine noise hits every variant alike:

* ``KL``: one batched pass over all small groups (``model_kl``) vs one fused KL per weight or
  bias group (``sum(layer.kl())``);
* ``Adam``: fused (one kernel for all parameters) vs the per-parameter loop (PyTorch's CPU
  default, ``foreach=False``) vs foreach.

For each prior design of the demo (fixed Gaussian, learnable by gradient, hierarchical, scale
mixture) it prints milliseconds per step, median over ``--rounds`` rounds of ``--steps`` steps,
and the ratio old / new.

    python benchmarks/small_model_step.py [--rounds 7] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.layers import bayesian_layers, model_kl, prior_penalty
from trainer.models import mlp
from trainer.priors import LayerPrior, PriorSpec

DESIGNS = {
    "fixed N(0,1)": PriorSpec("fixed"),
    "learnable gradient": PriorSpec(mode="gradient"),
    "hierarchical": PriorSpec(mode="hierarchical"),
    "fixed mixture": PriorSpec("fixed", family="scale_mixture"),
}


def per_layer_kl(model: nn.Module) -> Tensor:
    """The KL as the trainer summed it before: one fused KL per weight/bias group."""
    total = torch.zeros(())
    for _, layer in bayesian_layers(model):
        total = total + layer.kl()
    return total


def per_layer_penalty(model: nn.Module) -> Tensor:
    total = torch.zeros(())
    for _, layer in bayesian_layers(model):
        total = total + layer.prior_penalty()
    return total


def make_step(
    spec: PriorSpec,
    kl: Callable[[nn.Module], Tensor],
    penalty: Callable[[nn.Module], Tensor],
    adam: dict[str, Any],
    seed: int = 0,
) -> Callable[[], None]:
    torch.manual_seed(seed)
    model = mlp(1, [32, 32], 1, prior=spec)
    prior_ids = {
        id(p) for m in model.modules() if isinstance(m, LayerPrior) for p in m.parameters()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    main = torch.optim.Adam([p for p in params if id(p) not in prior_ids], lr=1e-2, **adam)
    priors = [p for p in params if id(p) in prior_ids]
    prior_opt = torch.optim.Adam(priors, lr=1e-3, **adam) if priors else None
    x = torch.rand(64, 1) * 4 - 2
    y = torch.sin(2 * x) + 0.25 * x

    def step() -> None:
        main.zero_grad(set_to_none=True)
        if prior_opt is not None:
            prior_opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y) + 0.01 * (kl(model) + penalty(model)) / 1024
        loss.backward()
        main.step()
        if prior_opt is not None:
            prior_opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {
        "before (per-layer KL, Adam loop)": (per_layer_kl, per_layer_penalty, {"foreach": False}),
        "batched KL, Adam foreach": (model_kl, prior_penalty, {"foreach": True}),
        "now (batched KL, fused Adam)": (model_kl, prior_penalty, {"fused": True}),
    }
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), 1-32-32-1, batch 64; "
        f"ms per step, median of {args.rounds} rounds x {args.steps} steps"
    )
    for design, spec in DESIGNS.items():
        steps = {name: make_step(spec, *v) for name, v in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():  # warm-up
            for _ in range(20):
                step()
        for _ in range(args.rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        medians = {name: statistics.median(v) for name, v in times.items()}
        before = medians["before (per-layer KL, Adam loop)"]
        cells = ", ".join(f"{n} {ms:.2f} ms ({before / ms:.2f}x)" for n, ms in medians.items())
        print(f"{design:20s} {cells}")


if __name__ == "__main__":
    main()
