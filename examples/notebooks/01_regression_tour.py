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
# # A tour of bnn-infosharing: fixed vs learnable layer priors on a 1-D regression
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/bnn-infosharing/blob/main/examples/notebooks/01_regression_tour.ipynb)
#
# The seed project's tour, run end to end: a small Bayesian neural network (every weight
# and bias has a Gaussian posterior N(mu, sigma^2)) fitted to a 1-D regression task twice,
# once with a **fixed** N(0, 1) prior and once with a **learnable** prior shared by all
# weights of a layer (and one by all its biases: "Bayesian information sharing"). Then
# the seed's tables and plots, computed from the posteriors captured at every epoch:
#
# 1. the data and the two fits, with their test metrics;
# 2. the seed's `distribution_log` and its tables: `get_overall_weight_stats`,
#    `compute_layer_kl_divergences`, the learned priors and KL to them;
# 3. the seed's plots: each chosen weight's Gaussian over epochs, one epoch's
#    distributions, percentile bands, the prior trajectories, KL over epochs;
# 4. the two runs compared: KL between their posteriors and the top gradient outliers.
#
# Everything runs on a CPU: 1 min 42 s (43 s of CPU time) on a 2-core VM that other jobs
# were using too. `BNN_NOTEBOOK_SMALL=1` (what CI sets) trains for a few epochs on a few
# points only, to check that every cell runs.

# %%
# Installs the package when it is not importable (on Colab, or in a bare kernel); in a
# checkout set up with `make` or `pip install -e .` this does nothing.
import importlib
import subprocess
import sys
import warnings

# tqdm's notice that Jupyter widgets are missing: this notebook shows no progress bars
warnings.filterwarnings("ignore", message="IProgress not found")
try:
    import service.analysis  # noqa: F401
    import trainer  # noqa: F401
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
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Image, display

from service.analysis import (
    compare_gradient_outliers,
    compute_layer_kl_divergences,
    get_overall_weight_stats,
    kl_between_runs,
    kl_to_prior,
    plot_epoch_distributions,
    plot_kl_over_epochs,
    plot_params_log_distributions,
    plot_percentile_bands,
    plot_prior_trajectories,
    prior_trajectories,
)
from service.demo.regression import predictive
from trainer import RunStore, load_distribution_log, make_regression, train
from trainer.data import REGRESSION_RANGE, regression_function

SMALL = os.environ.get("BNN_NOTEBOOK_SMALL") == "1"
EPOCHS = 4 if SMALL else 150
N_TRAIN = 96 if SMALL else 1024
torch.set_num_threads(1)  # layers of 20 units: more threads would only wait for each other
# the runs are stored here (HDF5 files per epoch + a SQLite catalog); a temporary folder
# unless BNN_NOTEBOOK_DATA names one to keep
DATA_DIR = Path(os.environ.get("BNN_NOTEBOOK_DATA") or tempfile.mkdtemp(prefix="bnn-tour-"))
print(f"{EPOCHS} epochs on {N_TRAIN} points; runs stored in {DATA_DIR}")

# %% [markdown]
# ## 1. The data and the two fits
#
# x ~ U(-2, 2) and y = f(x) + Gaussian noise. The network is the seed's 1 -> 20 -> 1
# ReLU MLP of `BayesLinear` layers; the Gaussian likelihood learns its noise sigma.

# %%
data = make_regression(N_TRAIN, 256, seed=0)
grid = torch.linspace(-4, 4, 400).unsqueeze(1)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.scatter(data.x_train.squeeze(1), data.y_train.squeeze(1), s=6, alpha=0.5, label="training data")
ax.plot(grid.squeeze(1), regression_function(grid).squeeze(1), "k", lw=1, label="f(x)")
ax.axvspan(*REGRESSION_RANGE, color="0.9", zorder=-1, label="training range")
ax.set(xlabel="x", ylabel="y", title="The 1-D regression task")
ax.legend(loc="upper left")
plt.show()

# %% [markdown]
# Both runs share everything (seed, initial weights, optimiser, data) but the prior.
# `train` captures each epoch's posteriors, the layer priors, per-element gradient
# statistics and the metrics into the run store.

# %%
BASE = {
    "dataset": "regression",
    "widths": [20],
    "epochs": EPOCHS,
    "n_train": N_TRAIN,
    "n_test": 256,
    "seed": 0,
    "grad_capture": "element",  # per-element gradient statistics, for the outlier tables
    "eval_samples": 20 if SMALL else 200,
}
results = {}
with RunStore(DATA_DIR) as store:
    for prior in ("fixed", "learnable"):
        results[prior] = train({**BASE, "prior": prior, "name": f"tour {prior}"}, sink=store,
                               progress=False)  # fmt: skip
runs = {prior: str(result.run_id) for prior, result in results.items()}
metrics = ["test_rmse", "test_nll", "test_coverage_90", "test_noise_sigma"]
pd.DataFrame({prior: {m: r.history[-1][m] for m in metrics} for prior, r in results.items()})

# %% [markdown]
# The predictive distributions: the mean and +-2 standard deviations (posterior samples
# plus the learned noise), inside the training range and outside it.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
for ax, (prior, result) in zip(axes, results.items(), strict=True):
    pred = predictive(result.model, grid, samples=100, noise_sigma=result.noise_sigma or 0.0)
    x = grid.squeeze(1).numpy()
    ax.fill_between(x, pred["mean"] - 2 * pred["sigma"], pred["mean"] + 2 * pred["sigma"],
                    alpha=0.3, label="+-2 sigma")  # fmt: skip
    ax.plot(x, pred["mean"], label="predictive mean")
    ax.plot(x, regression_function(grid).squeeze(1), "k", lw=1, label="f(x)")
    ax.scatter(data.x_train.squeeze(1), data.y_train.squeeze(1), s=3, alpha=0.3, color="0.4")
    ax.axvspan(*REGRESSION_RANGE, color="0.93", zorder=-1)
    ax.set(title=f"{prior} prior", xlabel="x", ylim=(-4, 4))
axes[0].legend(loc="upper left")
plt.show()

# %% [markdown]
# ## 2. The seed's `distribution_log` and its tables
#
# `load_distribution_log` reads a stored run back as the seed's nested dict:
# `{epoch: {layer: {"posterior"|"prior": {"weight"|"bias": {"mu": array, "sigma": array}}}}}`.
# Every analysis function takes that dict, a run id (with `data_dir=`) or a reader.

# %%
logs = {prior: load_distribution_log(run_id, DATA_DIR) for prior, run_id in runs.items()}
log = logs["learnable"]
last = max(log)
print(f"epochs captured: {sorted(log)[:5]}{' ...' if len(log) > 5 else ''} (last {last})")
for layer, layer_data in log[last].items():
    for dist in ("posterior", "prior"):
        for param, values in layer_data[dist].items():
            print(f"{layer:7s} {dist:9s} {param:6s} mu {values['mu'].shape}, "
                  f"sigma {values['sigma'].shape}")  # fmt: skip

# %% [markdown]
# `get_overall_weight_stats`: the mean and standard deviation of the posterior mu's and
# sigma's, over all layers (`Overall`) and per layer, for both runs at the last epoch.

# %%
stats = {prior: get_overall_weight_stats(logs[prior], epoch=last) for prior in runs}
pd.concat(stats, names=["prior"]).iloc[:, :6]

# %% [markdown]
# `compute_layer_kl_divergences`: the symmetric KL between every pair of posteriors within
# a layer, summed and averaged (exact over all pairs, in linear time). With a learnable
# prior the posteriors of a layer can be pulled towards a prior fitted to them instead of
# towards N(0, 1).

# %%
kl = {prior: compute_layer_kl_divergences(logs[prior], epoch=last) for prior in runs}
pd.concat(kl, names=["prior"]).iloc[:, :4]

# %% [markdown]
# The shared layer priors (the fixed run's stay N(0, 1); the learnable run's sigmas move,
# their means stay 0 unless `prior_learn_mean` is set; a prior shared by fewer than
# `prior_min_group` = 10 elements stays fixed, like the one bias of `layer2`), and the KL
# of each layer's posteriors to its prior (the ELBO's KL term, split by layer).

# %%
first = min(log)
display(prior_trajectories(logs["learnable"], [first, last]))
pd.concat({p: kl_to_prior(logs[p], [last]) for p in runs}, names=["prior"]).iloc[:, :4]

# %% [markdown]
# ## 3. The seed's plots
#
# Each plot function returns PNG bytes (`save=` writes a file as well). First, chosen
# weights' Gaussians over the epochs, coloured by epoch (dark purple early, yellow late):
# the 4 weights of the learnable run's first layer whose mean moved most.

# %%
display(Image(plot_params_log_distributions(logs["learnable"], top_k=4, layer="layer1")))

# %% [markdown]
# All distributions of each layer at the last epoch (a stated subset of the curves, plus
# histograms of every mu and sigma), for the learnable run.

# %%
display(Image(plot_epoch_distributions(logs["learnable"], epoch=last)))

# %% [markdown]
# Percentile bands of mu and sigma per layer over the epochs (TensorBoard's
# distributions view, exact over every weight).

# %%
display(Image(plot_percentile_bands(logs["learnable"])))

# %% [markdown]
# The learned priors of both runs over the epochs, and the KL curves (pairwise within
# each layer, and to the prior).

# %%
display(Image(plot_prior_trajectories(runs, data_dir=DATA_DIR)))
display(Image(plot_kl_over_epochs(runs["learnable"], data_dir=DATA_DIR)))

# %% [markdown]
# ## 4. The two runs compared
#
# Both runs started from the same initial weights, so element i of one can be compared
# with element i of the other: the KL between their posteriors per layer. Then the
# elements whose gradients look most like exploding ones (robust z-score of log |g|
# within the layer) in each run, with the same elements in the other run.

# %%
display(kl_between_runs(runs["fixed"], runs["learnable"], data_dir=DATA_DIR).iloc[:, :4])
outliers = compare_gradient_outliers(runs, k=3, data_dir=DATA_DIR)
outliers.table.iloc[:, :9]

# %%
display(outliers.counts)

# %% [markdown]
# The runs stay in `DATA_DIR`: `bnn serve --data-dir DATA_DIR` serves them (dashboard,
# API), and the notebook `03_service_client` shows the same tables through the service.
# Without `BNN_NOTEBOOK_DATA` the temporary folder is removed here.

# %%
if not os.environ.get("BNN_NOTEBOOK_DATA"):
    shutil.rmtree(DATA_DIR, ignore_errors=True)
