"""Your own model and training loop, with learnable shared priors, tracked into a run store.

A model built from ``BayesLinear`` layers whose weights (and biases) share one learnable
Gaussian prior per layer, trained with a hand-written ELBO loop on the 1-D regression
task. ``trainer.track`` records the loop like ``bnn train`` records its runs: every epoch's
posteriors, layer priors, per-weight gradient statistics (``run.step()`` after each
backward) and metrics go into a run store (``--out``/bnn-data), where ``bnn runs``, the
service and every analysis function find them; ``load_distribution_log`` reads the run back
as the seed's ``distribution_log``, and the seed's analysis functions turn it into tables
and plots.

    python examples/own_training_loop.py --out example-out
    python examples/own_training_loop.py --tiny                 # CI (or BNN_EXAMPLES_TINY=1)

The first command (200 epochs, each captured with per-weight gradient statistics) took 24 s of
CPU time (``/usr/bin/time``, ``OMP_NUM_THREADS=1``, on a 2-core AMD EPYC VM; 54 s wall there,
with other jobs holding the cores).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import trainer
from service.analysis import (
    compute_layer_kl_divergences,
    get_overall_weight_stats,
    kl_to_prior,
    plot_epoch_distributions,
    plot_params_log_distributions,
    plot_percentile_bands,
    prior_trajectories,
)
from trainer import BayesLinear, PriorSpec, load_distribution_log, make_regression, model_kl


class SimpleBNN(nn.Module):
    """The seed's 1 -> H -> 1 network, each layer with a learnable shared prior."""

    def __init__(self, hidden: int = 10) -> None:
        super().__init__()
        prior = PriorSpec(kind="learnable", mode="gradient", sigma0=1.0)
        self.fc1 = BayesLinear(1, hidden, prior=prior)
        self.fc2 = BayesLinear(hidden, 1, prior=prior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("example-out"))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="a few epochs on a few points (CI)")
    args = parser.parse_args()
    tiny = args.tiny or os.environ.get("BNN_EXAMPLES_TINY") == "1"
    epochs, n = (4, 64) if tiny else (args.epochs, 1024)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    data = make_regression(n, 256, seed=0)
    model = SimpleBNN(hidden=20)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    noise_sigma = 0.1  # a known observation noise keeps the loop short
    data_dir = args.out / "bnn-data"
    config = {"dataset": "regression", "hidden": 20, "lr": 1e-2, "noise_sigma": noise_sigma}
    with trainer.track(model, name="own-loop", config=config, data_dir=data_dir, epochs=epochs,
                       capture_every=1, grad_level="element") as run:  # fmt: skip
        for epoch in range(epochs):
            perm = torch.randperm(n)
            for start in range(0, n, 64):
                idx = perm[start : start + 64]
                x, y = data.x_train[idx], data.y_train[idx]
                optimizer.zero_grad()
                # the Gaussian NLL up to a constant, and the ELBO per example: NLL + KL / N
                nll = 0.5 * F.mse_loss(model(x), y) / noise_sigma**2
                loss = nll + model_kl(model) / n
                loss.backward()
                run.step(loss)  # gradient statistics of this step (before the update)
                optimizer.step()
            with torch.no_grad():
                rmse = F.mse_loss(model(data.x_test), data.y_test).sqrt().item()
            run.log_epoch(epoch, {"loss": loss.item(), "test_rmse": rmse})  # captured here
            if epoch % max(1, epochs // 5) == 0 or epoch == epochs - 1:
                print(f"epoch {epoch}: loss {loss.item():.4f}, test RMSE {rmse:.4f}")
    print(f"\nrun {run.id} {run.status}, {len(run.captured_epochs)} epochs in {data_dir}")
    # the seed's distribution_log, read back from the store
    distribution_log = load_distribution_log(run.id, data_dir=data_dir)
    last = max(distribution_log)
    print("\nlearned layer priors (last epoch):")
    print(prior_trajectories(distribution_log, [last]).to_string())
    print("\nposterior statistics:")
    print(get_overall_weight_stats(distribution_log, epoch=last).iloc[:, :5].to_string())
    print("\npairwise symmetric KL within each layer:")
    print(compute_layer_kl_divergences(distribution_log, epoch=last).to_string())
    print("\nKL(posterior || layer prior):")
    print(kl_to_prior(distribution_log, [last]).iloc[:, :3].to_string())
    plot_params_log_distributions(distribution_log, top_k=4, save=args.out / "evolution.png")
    plot_epoch_distributions(distribution_log, epoch=last, save=args.out / "overlay.png")
    plot_percentile_bands(distribution_log, save=args.out / "bands.png")
    print(f"\nplots written to {args.out}/: evolution.png, overlay.png, bands.png")
    print(f"the run: bnn runs show {run.id} --data-dir {data_dir}")


if __name__ == "__main__":
    main()
