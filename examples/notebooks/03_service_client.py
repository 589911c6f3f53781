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
# # Training and analysing runs on a bnn service from Python
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-org/bnn-infosharing/blob/main/examples/notebooks/03_service_client.ipynb)
#
# `service.client.Client` talks to a running service (`bnn serve`): it starts training
# runs on the service's Dask cluster, polls them, and fetches the analysis as pandas
# DataFrames and the plots as PNG bytes, with one method per endpoint instead of URLs
# built by hand. Errors come back as `BnnError` with the service's message.
#
# **Which service.** Set `BNN_NOTEBOOK_URL` (e.g. `http://central:8000`) before starting
# the kernel to use your own server, and `BNN_API_TOKEN` when it has one. Without
# `BNN_NOTEBOOK_URL` the notebook starts a local `bnn serve` on a free port
# (`service.client.LocalService`), with its data in a temporary folder, and stops it (and
# removes the folder) in its last cell. That server belongs to the kernel: restarting or
# interrupting the kernel stops it too.
#
# At full size (two runs of 60 epochs, one after the other on one Dask worker) it took 49 s
# on a 2-core VM; `BNN_NOTEBOOK_SMALL=1` (what CI sets) trains for a few epochs only.

# %%
# Installs the package when it is not importable (on Colab, or in a bare kernel); in a
# checkout set up with `make` or `pip install -e .` this does nothing.
import importlib
import subprocess
import sys

try:
    import service.client  # noqa: F401
    import trainer  # noqa: F401
except ImportError:
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "--quiet",
         "bnn-infosharing @ git+https://github.com/your-org/bnn-infosharing"]
    )  # fmt: skip
    importlib.invalidate_caches()

# %%
import os

import pandas as pd
from IPython.display import Image, display

from service.client import Client, LocalService
from trainer.errors import BnnError

SMALL = os.environ.get("BNN_NOTEBOOK_SMALL") == "1"
URL = os.environ.get("BNN_NOTEBOOK_URL")
TOKEN = os.environ.get("BNN_API_TOKEN") or None
local = None
if URL is None:
    # `bnn serve` in a child process on a free port, its data in a temporary folder, one
    # Dask worker; this machine's BNN_* settings (a database URL, ...) are not passed on
    local = LocalService(token=TOKEN, workers=1)
    URL = local.url

client = Client(URL, token=TOKEN)
health = client.health()
print(f"service at {URL}: {health['status']}, catalog {health['catalog']}, "
      f"jobs: {health['jobs']['backend']}")  # fmt: skip

# %% [markdown]
# ## Start two runs and follow them
#
# `start_run` takes the fields of a training configuration (the body of `POST /runs`;
# every field not given takes its default, `/docs` lists them) and returns the new run's
# id. The two runs differ in the prior only: one learnable prior per layer, or a fixed
# N(0, 1). `wait` polls until a run has ended, printing its progress.

# %%
CONFIG = {
    "dataset": "regression",
    "widths": [20],
    "epochs": 3 if SMALL else 60,
    "n_train": 128 if SMALL else 1024,
    "n_test": 128 if SMALL else 512,
    "eval_samples": 10 if SMALL else 100,
    "grad_capture": "element",  # per-element gradient statistics: the outlier tables
    "tags": ["notebook"],
}
learnable = client.start_run(CONFIG, prior="learnable", name="notebook learnable")
fixed = client.start_run(CONFIG, prior="fixed", name="notebook fixed")
both = {"learnable": learnable, "fixed": fixed}
for run_id in both.values():
    run = client.wait(run_id, timeout=300 if SMALL else 1800, progress=True)
    if run["status"] != "completed":
        raise RuntimeError(f"run {run_id} ended {run['status']}: {run['error']}")

# %% [markdown]
# The service's run list as a DataFrame (filters: `name`, `status`, `tags`, `dataset`,
# `prior`, bounds on the latest metrics such as `metrics="test_rmse < 0.5"`).

# %%
runs = client.runs(tags="notebook")
runs[["id", "name", "status", "prior", "widths", "epochs", "created_at"]]

# %% [markdown]
# The metrics per epoch, and the test metrics of both runs (evaluated once, at the end).

# %%
metrics = client.metrics(learnable, ["loss", "kl", "val_nll", "val_rmse"])
display(metrics.tail())
tests = ["test_rmse", "test_nll", "test_coverage_90"]
pd.DataFrame({name: client.run(run_id)["metrics"] for name, run_id in both.items()}).loc[tests]

# %% [markdown]
# ## The seed's tables, from the service
#
# Each table is a DataFrame in the service's column order; what the service says about it
# (run, epoch, ...) is in `frame.attrs`. `epoch` omitted means the last captured epoch.
# The pairwise symmetric KL within each layer, for both runs:

# %%
kl = {name: client.kl_table(run_id).set_index("layer") for name, run_id in both.items()}
print("epoch", kl["learnable"].attrs["epoch"])
pd.concat(kl, names=["prior"]).iloc[:, :4]

# %% [markdown]
# The posterior statistics (`get_overall_weight_stats`), the learned layer priors over the
# epochs, and the KL of each layer's posteriors to its prior:

# %%
display(client.stats(learnable).iloc[:, :5])
display(client.priors(learnable).tail(4))
client.kl_prior(learnable)

# %% [markdown]
# Comparing the runs: the KL between their posteriors per layer (same initial weights, so
# element i of one against element i of the other), and the suspected exploding
# gradients of each run next to the same elements in the other.

# %%
display(client.compare_kl(learnable, fixed).iloc[:, :4])
client.compare_gradients([learnable, fixed], k=3).iloc[:, :9]

# %% [markdown]
# A bad value is refused with a message that names it: an epoch that was not captured
# lists the captured ones.

# %%
try:
    client.kl_table(learnable, epoch=10_000)
except BnnError as exc:
    print(f"{exc.code.value} (HTTP {exc.details['http_status']}): {str(exc)[:150]} ...")
    print("the last captured epochs:", exc.details["epochs"][-3:])

# %% [markdown]
# ## Plots
#
# `plot(run, kind, **options)` returns the PNG of `GET /runs/{id}/plots/<kind>.png`
# (kinds: `evolution`, `epoch`, `bands`, `kl`, `priors`, `scales`, `gradients`; options
# as in `/docs`); `compare_plot(runs, kind)` overlays several runs.

# %%
display(Image(client.plot(learnable, "kl")))
display(Image(client.plot(learnable, "bands", layer="layer1")))
display(Image(client.plot(learnable, "evolution", top_k=4, criterion="mu_change")))
display(Image(client.compare_plot([learnable, fixed], "priors")))

# %% [markdown]
# `client.push(run_id, data_dir)` uploads a run trained into a local folder (what
# `bnn push` does). The last cell closes the client and, when the notebook started the
# service, stops it and removes its data.

# %%
client.close()
if local is not None:
    local.stop()
