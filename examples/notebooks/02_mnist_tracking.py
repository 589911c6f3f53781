# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your own model and loop on MNIST, tracked: fixed vs learnable layer priors
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/bnn-infosharing/blob/main/examples/notebooks/02_mnist_tracking.ipynb)
#
# The common case: a researcher has a plain PyTorch model, their own data loader and their
# own training loop. This notebook
#
# 1. turns a small convolutional network into a Bayesian one with `trainer.bayesianize`
#    (every `nn.Conv2d` / `nn.Linear` becomes a layer with a Gaussian posterior per weight
#    and one prior shared by the layer's weights, another by its biases), once with a
#    **fixed** N(0, 1) prior and once with a **learnable** one;
# 2. trains both on MNIST in an ordinary loop, recorded by `trainer.track` (like
#    `mlflow.start_run()`): each epoch's posteriors, learned priors, per-weight gradient
#    statistics and metrics go into a run store, exactly as `bnn train` would store them;
# 3. compares the two runs with `service.analysis`: metrics, learned priors, KL within
#    layers, to the prior and between the runs;
# 4. looks for exploding and vanishing gradients, side by side.
#
# The full notebook (10,000 training images, 5 epochs per run; about 95% test accuracy)
# took 8 minutes on a 2-core CPU that other jobs were using too. `BNN_NOTEBOOK_SMALL=1`
# (what CI sets) trains on a few hundred images for 2 epochs, to check that every cell runs.

# %%
# Installs the package when it is not importable (on Colab, or in a bare kernel); in a
# checkout set up with `make` or `pip install -e .` this does nothing.
import importlib
import subprocess
import sys

try:
    import service.analysis  # noqa: F401
    import trainer
except ImportError:
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "--quiet",
         "bnn-infosharing @ git+https://github.com/your-org/bnn-infosharing"]
    )  # fmt: skip
    importlib.invalidate_caches()

# %%
import os
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import Image, display
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainer
from service.analysis import (
    compare_gradient_outliers,
    compute_layer_kl_divergences,
    gradient_diagnostics,
    kl_between_runs,
    kl_to_prior,
    plot_gradient_magnitudes,
    plot_kl_over_epochs,
    plot_prior_trajectories,
    prior_trajectories,
)
from trainer import PriorSpec, RunStore, bayesianize, load_dataset, model_kl, use_mean

SMALL = os.environ.get("BNN_NOTEBOOK_SMALL") == "1"
EPOCHS = 2 if SMALL else 5
N_TRAIN = 384 if SMALL else 10_000
N_TEST = 256 if SMALL else 2_000
BATCH, LR = 128, 1e-2
torch.set_num_threads(min(4, os.cpu_count() or 1))
# the runs are stored here (HDF5 files per epoch + a SQLite catalog); a temporary folder
# unless BNN_NOTEBOOK_DATA names one to keep
DATA_DIR = Path(os.environ.get("BNN_NOTEBOOK_DATA") or tempfile.mkdtemp(prefix="bnn-mnist-"))
print(f"{EPOCHS} epochs on {N_TRAIN} training images; runs stored in {DATA_DIR}")

# %% [markdown]
# ## 1. A plain model, made Bayesian
#
# MNIST comes with the package (no download): the classic 50k/10k/10k split, normalised
# 28x28 images. The model is what one would write for it in plain PyTorch.

# %%
data = load_dataset("mnist", flatten=False, n_train=N_TRAIN, n_test=N_TEST)
train_loader = DataLoader(
    TensorDataset(data.x_train, data.y_train), batch_size=BATCH, shuffle=True,
    generator=torch.Generator().manual_seed(0),
)  # fmt: skip
print(f"train {tuple(data.x_train.shape)}, test {tuple(data.x_test.shape)}")


class SmallCNN(nn.Module):
    """A LeNet-like network, as one would write it for MNIST."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=5)  # -> 8 x 24 x 24, pooled 8 x 12 x 12
        self.conv2 = nn.Conv2d(8, 16, kernel_size=5)  # -> 16 x 8 x 8, pooled 16 x 4 x 4
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


priors = {
    "fixed": PriorSpec(kind="fixed", sigma0=1.0),
    "learnable": PriorSpec(kind="learnable", mode="gradient", sigma0=1.0),
}
models = {}
for name, spec in priors.items():
    torch.manual_seed(0)  # the same initial weights for both priors
    models[name] = bayesianize(SmallCNN(), spec)
models["learnable"]

# %% [markdown]
# ## 2. Your loop, tracked
#
# The loop is an ordinary ELBO loop: cross-entropy plus the KL of the posteriors to their
# priors divided by the number of training examples. Three lines are the tracker's:
# `trainer.track(...)` around it, `run.step(loss)` after each `backward()` (gradient
# statistics before the optimiser step, and a check that nothing became non-finite), and
# `run.log_epoch(epoch, metrics)` at the end of each epoch. Leaving the block marks the
# run `completed`; an exception would mark it `failed` (and be raised), Ctrl-C
# `interrupted`. `tracking_url="http://host:8000"` instead of `data_dir` would send the
# same epochs to a bnn service.


# %%
@torch.no_grad()
def evaluate(model: nn.Module, samples: int = 10) -> dict[str, float]:
    """Test accuracy and NLL of the posterior predictive (``samples`` forward passes)."""
    model.eval()
    probs = torch.stack([F.softmax(model(data.x_test), dim=1) for _ in range(samples)]).mean(0)
    with use_mean(model):
        mean_acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    model.train()
    return {
        "test_acc": (probs.argmax(1) == data.y_test).float().mean().item(),
        "test_nll": F.nll_loss(probs.clamp_min(1e-12).log(), data.y_test).item(),
        "test_acc_mean_weights": mean_acc,
    }


def fit(name: str, model: nn.Module) -> str:
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    config = {"dataset": "mnist", "model": "small-cnn", "lr": LR, "batch_size": BATCH,
              "n_train": N_TRAIN}  # fmt: skip
    with trainer.track(model, name=f"mnist {name}", config=config, data_dir=DATA_DIR,
                       epochs=EPOCHS, tags=["notebook"]) as run:  # fmt: skip
        for epoch in range(EPOCHS):
            t0, total = time.perf_counter(), 0.0
            for x, y in train_loader:
                loss = F.cross_entropy(model(x), y) + model_kl(model) / N_TRAIN
                loss.backward()
                run.step(loss)
                optimizer.step()
                optimizer.zero_grad()
                total += loss.item() * len(x)
            metrics = {"train_loss": total / N_TRAIN, **evaluate(model)}
            run.log_epoch(epoch, metrics)
            seconds = time.perf_counter() - t0
            print(f"{name}: epoch {epoch}, loss {metrics['train_loss']:.3f}, "
                  f"test acc {metrics['test_acc']:.3f} ({seconds:.0f} s)")  # fmt: skip
    return run.id


runs = {name: fit(name, model) for name, model in models.items()}
print(runs)

# %% [markdown]
# The runs are ordinary runs of the store: `bnn runs --data-dir DATA_DIR` lists them,
# `bnn serve --data-dir DATA_DIR` shows them in the dashboard, and every analysis function
# takes their ids. The catalog holds each run's configuration (yours, plus what the
# tracker knows: the priors each layer got, the capture settings) and each epoch's metrics.

# %%
with RunStore(DATA_DIR) as store:
    listing = pd.DataFrame(
        [{"run": r.id, "name": r.name, "status": r.status.value, "prior": r.config["prior"],
          "epochs": len(store.list_epochs(r.id))} for r in store.list_runs()]
    )  # fmt: skip
    history = {
        name: pd.DataFrame({e.epoch: e.metrics for e in store.list_epochs(run_id)}).T
        for name, run_id in runs.items()
    }
    resolved = store.get_run(runs["learnable"]).config["resolved_priors"]
display(listing)
pd.Series(resolved, name="learnable run: the prior each group got")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for ax, metric in zip(axes, ["train_loss", "test_acc", "test_nll"], strict=True):
    for name, frame in history.items():
        ax.plot(frame.index, frame[metric], marker="o", label=name)
    ax.set(title=metric, xlabel="epoch")
axes[0].legend()
plt.show()

# %% [markdown]
# ## 3. The two runs compared
#
# The learned layer priors (the fixed run's stay N(0, 1)): a learnable prior fitted by
# the ELBO moves its sigma towards the spread of the layer's posterior means.

# %%
display(prior_trajectories(runs["learnable"], data_dir=DATA_DIR).round(4))
display(Image(plot_prior_trajectories(runs, data_dir=DATA_DIR)))

# %% [markdown]
# The seed's table: the symmetric KL between every pair of posteriors within a layer
# (exact, in linear time), at the last epoch, and the KL of each layer's posteriors to its
# prior (the ELBO's KL term, split by layer).

# %%
pairwise = {n: compute_layer_kl_divergences(r, data_dir=DATA_DIR) for n, r in runs.items()}
display(pd.concat(pairwise, names=["prior"]).iloc[:, :4])
last = EPOCHS - 1
to_prior = {n: kl_to_prior(r, [last], data_dir=DATA_DIR) for n, r in runs.items()}
pd.concat(to_prior, names=["prior"]).iloc[:, :4]

# %% [markdown]
# Both runs started from the same weights, so weight i of one run can be compared with
# weight i of the other: the KL between their posteriors per layer, and the learnable
# run's KL curves over the epochs.

# %%
display(kl_between_runs(runs["fixed"], runs["learnable"], data_dir=DATA_DIR).iloc[:, :4])
display(Image(plot_kl_over_epochs(runs["learnable"], data_dir=DATA_DIR)))

# %% [markdown]
# ## 4. Exploding and vanishing gradients
#
# `run.step` kept, per weight, the mean and max |g| over each epoch's steps. An element is
# flagged *exploding* when its gradient was non-finite, passed |g| = 100, or is an outlier
# of its layer (robust z-score of log10 |g|); *vanishing* the other way round. First the
# counts per layer, then each run's top candidates beside the same weights in the other
# run.

# %%
display(gradient_diagnostics(runs["learnable"], [last], data_dir=DATA_DIR).iloc[:, :8])
outliers = compare_gradient_outliers(runs, k=3, data_dir=DATA_DIR)
display(outliers.counts)
outliers.table.iloc[:, :9]

# %%
display(Image(plot_gradient_magnitudes(runs["learnable"], data_dir=DATA_DIR)))

# %% [markdown]
# The runs stay in `DATA_DIR` when `BNN_NOTEBOOK_DATA` names it; otherwise the temporary
# folder is removed here.

# %%
if not os.environ.get("BNN_NOTEBOOK_DATA"):
    shutil.rmtree(DATA_DIR, ignore_errors=True)
