"""Turn an existing PyTorch model into a BNN, train it in your own loop with gradient
capture into a run store, and compare exploding-gradient candidates across two priors.

``bayesianize`` replaces every ``nn.Linear`` of a plain MLP by a ``BayesLinear`` (posterior
means copied from the weights), once with a fixed N(0, 1) prior and once with learnable
shared priors. ``GradientRecorder`` keeps per-weight gradient statistics of each epoch, and
``RunStore.write_epoch`` stores parameters, gradients and metrics crash-safely, so the
service's analysis can rank the top suspected exploding weights of both runs side by side.

    python examples/bayesianize_mnist.py --out example-mnist
    python examples/bayesianize_mnist.py --tiny                  # CI (or BNN_EXAMPLES_TINY=1)

The first command took 18 s of CPU time (``/usr/bin/time``, ``OMP_NUM_THREADS=1``, on a 2-core
AMD EPYC VM; 46 s wall there, with other jobs holding the cores).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from service.analysis import compare_gradient_outliers, gradient_diagnostics, kl_between_runs
from trainer import (
    EpochSnapshot,
    GradientRecorder,
    GradLevel,
    PriorSpec,
    RunStore,
    bayesianize,
    get_all_distribution_params,
    load_dataset,
    model_kl,
)


def train(store: RunStore, prior: PriorSpec, data: object, epochs: int, name: str) -> str:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    model = bayesianize(plain, prior)  # same starting means for both priors
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    recorder = GradientRecorder(model, GradLevel.ELEMENT)
    x, y = data.x_train, data.y_train  # type: ignore[attr-defined]
    n = x.shape[0]
    run = store.create_run(name, {"dataset": "mnist", "widths": [64], "prior": prior.kind.value})
    for epoch in range(epochs):
        recorder.reset()
        for start in range(0, n, 128):
            xb, yb = x[start : start + 128], y[start : start + 128]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb) + model_kl(model) / n
            loss.backward()
            recorder.record_step()  # raw gradients, before any clipping
            optimizer.step()
        with torch.no_grad():
            acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()  # type: ignore[attr-defined]
        params = get_all_distribution_params(model, epoch, force=True)
        assert params is not None
        snap = EpochSnapshot(epoch, params, {"loss": loss.item(), "test_acc": acc},
                             recorder.result(), GradLevel.ELEMENT)  # fmt: skip
        store.write_epoch(run.id, snap)
        print(f"{name}: epoch {epoch}, loss {loss.item():.4f}, test accuracy {acc:.4f}")
    store.set_status(run.id, "completed")
    return run.id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("example-mnist"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a few hundred images (CI)")
    args = parser.parse_args()
    tiny = args.tiny or os.environ.get("BNN_EXAMPLES_TINY") == "1"
    n_train, n_test, epochs = (512, 256, 2) if tiny else (10_000, 2000, args.epochs)
    data = load_dataset("mnist", n_train=n_train, n_test=n_test)
    with RunStore(args.out / "bnn-data") as store:
        runs = {
            "fixed": train(store, PriorSpec(kind="fixed"), data, epochs, "fixed"),
            "learnable": train(store, PriorSpec(kind="learnable"), data, epochs, "learnable"),
        }
        readers = {label: store.reader(run_id) for label, run_id in runs.items()}
        diag = gradient_diagnostics(readers["learnable"], [epochs - 1])
        print("\ngradient diagnostics (learnable prior, last epoch):")
        print(diag[["elements", "exploding", "vanishing", "median |g|", "max |g|"]].to_string())
        cmp = compare_gradient_outliers(readers, k=3)
        print("\nflagged elements per layer:\n" + cmp.counts.to_string())
        cols = ["run", "rank", "layer", "index", "|g| (fixed)", "|g| (learnable)"]
        print("\ntop-3 exploding candidates of each run:\n" + cmp.table[cols].to_string())
        print("\nKL between the two runs' posteriors:")
        print(kl_between_runs(readers["learnable"], readers["fixed"]).iloc[:, :4].to_string())
        for reader in readers.values():
            reader.close()
    print(f"\nruns stored in {args.out / 'bnn-data'} (bnn runs --data-dir {args.out / 'bnn-data'})")


if __name__ == "__main__":
    main()
