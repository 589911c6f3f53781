"""``bnn demo mnist``: a fixed-prior and a learnable-prior Bayesian MLP on MNIST.

Default: 784-400-400-10, sized to finish within 15 minutes on 2 CPU cores. ``full=True``
(``--full``): 784-1200-1200-10 trained long (the Bayes-by-Backprop network). The report
has test accuracy, NLL and ECE with reliability diagrams, predictive entropy on the test
set against out-of-distribution inputs (the test images rotated by 90 degrees, uniform
noise images, and FashionMNIST's test set when its files are found) with AUROC, and
every diagnostic of :mod:`service.demo.common`.
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from service.demo._plots import plot_entropy_histograms, plot_reliability, reliability_bins
from service.demo.common import DemoResult, DemoRun, add_diagnostics, config_table, say, train_pair
from service.demo.report import Report
from trainer.data import _images_to_tensor, load_dataset
from trainer.store import RunStore

__all__ = [
    "MNIST_DEFAULTS",
    "MNIST_FULL",
    "auroc",
    "find_fashion_mnist",
    "mc_predict",
    "read_idx_images",
    "run_mnist_demo",
]

MNIST_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist",
    "widths": [400, 400],
    "epochs": 10,
    "lr": 1e-3,
    "batch_size": 128,
    "capture_every": 1,
    "grad_capture": "element",
    "eval_samples": 10,
    "seed": 0,
    "name": "demo-mnist",
    "tags": ["demo", "demo:mnist"],
}
#: ``--full``: the 2x1200 network trained long; epochs captured every 10.
MNIST_FULL: dict[str, Any] = MNIST_DEFAULTS | {
    "widths": [1200, 1200],
    "epochs": 100,
    "capture_every": 10,
    "name": "demo-mnist-full",
    "tags": ["demo", "demo:mnist", "demo:full"],
}
FASHION_FILE = "t10k-images-idx3-ubyte"
#: Debian/Ubuntu's package ``dataset-fashion-mnist`` installs the files here.
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx_images(path: str | Path) -> np.ndarray:
    """Images of an IDX file (``.gz`` or plain) as uint8 (N, rows, cols)."""
    raw = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">i4")
    if magic != 2051 or len(raw) != 16 + n * rows * cols:
        raise ValueError(f"{path} is not an IDX image file (magic {magic}, {len(raw)} bytes)")
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, rows, cols).copy()


def find_fashion_mnist(*extra: str | Path | None) -> Path | None:
    """FashionMNIST's test images, searched in ``extra`` dirs, ``$BNN_DATASETS_DIR``,
    ``./bnn-data/datasets`` (each also under ``FashionMNIST/raw``) and the Debian package's
    folder; None when absent. Nothing is downloaded."""
    roots = [Path(p) for p in extra if p]
    if os.environ.get("BNN_DATASETS_DIR"):
        roots.append(Path(os.environ["BNN_DATASETS_DIR"]))
    roots += [Path("bnn-data/datasets"), SYSTEM_FASHION_DIR]
    for root in roots:
        for folder in (root, root / "FashionMNIST" / "raw"):
            for name in (FASHION_FILE, FASHION_FILE + ".gz"):
                if (folder / name).is_file():
                    return folder / name
    return None


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling ``out`` (positive, higher score) from ``in``:
    P(out > in) + P(out = in) / 2, from average ranks (Mann-Whitney U)."""
    scores = np.concatenate([in_scores, out_scores]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average 1-based ranks of ties
    n_in, n_out = len(in_scores), len(out_scores)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


@torch.no_grad()
def mc_predict(
    model: torch.nn.Module, x: torch.Tensor, samples: int, batch: int = 2048
) -> dict[str, np.ndarray]:
    """MC-averaged class probabilities (N, C), predictive entropy and mutual information (N,)."""
    model.eval()
    device = next(model.parameters()).device
    probs, expected_h = [], []
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch].to(device)
        p = torch.stack([torch.softmax(model(xb), -1) for _ in range(samples)]).double()
        probs.append(p.mean(0).cpu())
        expected_h.append((-(p * p.clamp_min(1e-12).log()).sum(-1)).mean(0).cpu())
    mean = torch.cat(probs)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
    return {
        "probs": mean.numpy(),
        "entropy": entropy.numpy(),
        "mutual_info": (entropy - torch.cat(expected_h)).clamp_min(0).numpy(),
    }


def _ood_sets(
    x_test: torch.Tensor, n: int, seed: int, fashion: Path | None
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 20_000)
    base = x_test[:n].reshape(-1, 28, 28)
    lo, hi = float(x_test.min()), float(x_test.max())
    sets = {
        "rotated 90 deg": torch.rot90(base, 1, dims=(1, 2)).reshape(-1, 784).contiguous(),
        "uniform noise": lo + (hi - lo) * torch.rand(base.shape[0], 784, generator=gen),
    }
    if fashion is not None:
        sets["FashionMNIST"] = _images_to_tensor(read_idx_images(fashion)[:n], flatten=True)
    return sets


def run_mnist_demo(
    out_dir: str | Path,
    *,
    full: bool = False,
    epochs: int | None = None,
    widths: list[int] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    n_ood: int = 2000,
    eval_samples: int = 20,
    capture_every: int | None = None,
    fashion_dir: str | Path | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> DemoResult:
    """Train both models, evaluate calibration and OOD detection, write the report."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset = MNIST_FULL if full else MNIST_DEFAULTS
    given: dict[str, Any] = {"epochs": epochs, "widths": widths, "n_train": n_train}
    given |= {"n_test": n_test, "capture_every": capture_every, "seed": seed, "device": device}
    base = preset | {k: v for k, v in given.items() if v is not None}
    data = load_dataset("mnist", n_train=base.get("n_train"), n_test=base.get("n_test"))
    fashion = find_fashion_mnist(fashion_dir, out / "bnn-data" / "datasets")
    store = RunStore(out / "bnn-data")
    try:
        runs = train_pair(base, data, store, progress=progress)
        t_trained = time.perf_counter()
        say("evaluating (calibration, OOD) and writing the report")
        ood = _ood_sets(data.x_test, min(n_ood, data.x_test.shape[0]), seed, fashion)
        result = _report(out, store, runs, data, ood, eval_samples, seed, full)
    finally:
        store.close()
    result.seconds = {
        **{f"train {label}": run.seconds for label, run in runs.items()},
        "train": t_trained - t_start,
        "report": time.perf_counter() - t_trained,
        "total": time.perf_counter() - t_start,
    }
    result.write_summary(fashion_mnist=str(fashion) if fashion else None)
    return result


def _report(
    out: Path,
    store: RunStore,
    runs: Mapping[str, DemoRun],
    data: Any,
    ood: dict[str, torch.Tensor],
    samples: int,
    seed: int,
    full: bool,
) -> DemoResult:
    y = data.y_test.numpy()
    preds, ood_preds = {}, {}
    metric_rows, ood_rows = {}, {}
    for label, run in runs.items():
        torch.manual_seed(seed)
        p = mc_predict(run.trainer.model, data.x_test, samples)
        preds[label] = p
        ood_preds[label] = {
            name: mc_predict(run.trainer.model, x, samples) for name, x in ood.items()
        }
        probs = p["probs"]
        b = reliability_bins(probs, y)
        ok = b["count"] > 0
        ece = float(np.sum(b["count"][ok] * np.abs(b["confidence"] - b["accuracy"])[ok]) / len(y))
        onehot = np.eye(probs.shape[1])[y]
        metric_rows[label] = {
            "test accuracy": float((probs.argmax(1) == y).mean()),
            "test error %": 100 * float((probs.argmax(1) != y).mean()),
            "test NLL": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()),
            "ECE %": 100 * ece,
            "Brier": float(((probs - onehot) ** 2).sum(1).mean()),
            "mean entropy (test)": float(p["entropy"].mean()),
        }
        for name, q in ood_preds[label].items():
            ood_rows[(label, name)] = {
                "mean entropy": float(q["entropy"].mean()),
                "AUROC (entropy)": auroc(p["entropy"], q["entropy"]),
                "AUROC (mutual information)": auroc(p["mutual_info"], q["mutual_info"]),
            }
    metrics = pd.DataFrame.from_dict(metric_rows, orient="index")
    metrics.index.name = "prior"
    ood_table = pd.DataFrame.from_dict(ood_rows, orient="index")
    ood_table.index.names = ["prior", "OOD inputs"]
    first = next(iter(runs.values())).config
    arch = "-".join(map(str, [784, *first.hidden, 10]))
    report = Report(
        f"BNN demo: fixed vs learnable shared prior, MNIST {arch}" + (" (full)" if full else ""),
        out,
        intro=(
            f"Bayesian MLP {arch} on MNIST ({data.n_train} training images, "
            f"{data.x_test.shape[0]} test images), {first.epochs} epochs of Adam. Two models with "
            "the **same** seed, data, architecture and optimiser: a fixed N(0, 1) prior vs a "
            f"learnable shared Gaussian prior per layer. Predictions average {samples} "
            "posterior samples."
        ),
    )
    report.section("setup", "Setup").table(config_table(runs), "configurations")
    sec = report.section("metrics", "Test metrics")
    sec.text(
        "Accuracy, NLL (nats), expected calibration error (15 equal-width bins) and Brier "
        "score on the test set."
    )
    sec.table(metrics, "test metrics")
    sec = report.section("calibration", "Calibration")
    sec.text(
        "Reliability diagrams: accuracy per confidence bin (bars) against the diagonal; red: "
        "the gap; dotted: share of test images per bin."
    )
    sec.image(
        "reliability",
        plot_reliability({k: (v["probs"], y) for k, v in preds.items()}),
        "reliability diagrams",
    )
    sec = report.section("ood", "Out-of-distribution inputs")
    names = ", ".join(ood)
    missing = (
        ""
        if "FashionMNIST" in ood
        else (
            " FashionMNIST was not found (install `dataset-fashion-mnist` or put "
            "`t10k-images-idx3-ubyte.gz` under `$BNN_DATASETS_DIR/FashionMNIST/raw`), so it "
            "is left out."
        )
    )
    sec.text(
        f"Predictive entropy of the test images against OOD inputs ({names}); AUROC of "
        "telling OOD from test images by the entropy (total uncertainty) and by the mutual "
        f"information between prediction and weights (epistemic part); 0.5 is chance.{missing}"
    )
    sec.table(ood_table, "OOD detection")
    ent = {
        k: {"MNIST test": v["entropy"]} | {n: q["entropy"] for n, q in ood_preds[k].items()}
        for k, v in preds.items()
    }
    sec.image("entropy", plot_entropy_histograms(ent), "predictive entropy: test vs OOD inputs")
    add_diagnostics(report, store, runs, ["loss", "kl", "test_acc", "test_nll", "test_ece"])
    html, md = report.write()
    return DemoResult(
        out,
        html,
        md,
        {k: r.run_id for k, r in runs.items()},
        metrics,
        tables={"ood": ood_table},
        sections=report.section_ids,
    )
