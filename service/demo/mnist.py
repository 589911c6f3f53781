"""``bnn demo mnist``: the seven-arm comparison of priors on MNIST, as one report.

The study (:func:`service.demo.protocol.protocol_spec`, ``"mnist"``) with 3 paired seeds by
default. The CPU demo is sized to finish within about 20 minutes on 2 cores (see
:data:`MNIST_DEFAULTS`); ``full=True`` (``--full``) trains the 784-1200-1200-10 network longer,
on a GPU when there is one. After the study's sections (test NLL, error, ECE, Brier, OOD AUROC
with 95% CIs and paired differences), the first seed's runs of up to three arms are rebuilt
from their stored posteriors for reliability diagrams and predictive entropy on
out-of-distribution inputs (test images rotated by 90 degrees, uniform noise, FashionMNIST's
test set when its files are found), then every diagnostic of :mod:`service.demo.common`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from service.demo._plots import plot_entropy_histograms, plot_reliability, reliability_bins
from service.demo.common import (
    DemoResult,
    burnin_note,
    data_for_run,
    demo_spec,
    model_from_run,
    pick_arms,
    plot_epoch,
    run_protocol_demo,
)
from service.demo.protocol import PROTOCOL_BASE
from service.demo.report import Report
from trainer.data import _images_to_tensor
from trainer.store import RunStore

__all__ = [
    "EVAL_ARMS",
    "MNIST_DEFAULTS",
    "MNIST_FULL",
    "auroc",
    "find_fashion_mnist",
    "mc_predict",
    "read_idx_images",
    "run_mnist_demo",
]

#: The CPU demo's changes to the protocol's MNIST preset (784-400-400-10, all 50k training
#: and 10k validation images, 10 epochs): the first 10,000 training and 2,000 validation
#: images (the test set stays the full 10k), 5 epochs, 3-epoch tuning runs, 100 test samples.
#: Measured on 2 cores, one thread per Dask worker (2026-11-29): with all 50k training
#: images the 18 tuning runs alone took 19.5 min; with 10k training and all 10k validation
#: images the demo was still running after 19 min with 8 of its 39 runs to go (validation,
#: 10 posterior samples of 10k images, cost twice the training epoch). The 10-epoch,
#: full-data comparison is ``bnn study --preset mnist``.
MNIST_DEFAULTS: dict[str, Any] = {
    "epochs": 5,
    "n_train": 10_000,
    "n_val": 2_000,
    "eval_samples": 100,
    "name": "demo-mnist",
    "tags": ["demo", "demo:mnist"],
}
MNIST_TUNE_EPOCHS = 3
#: ``--full``: the Bayes-by-Backprop network, 50 epochs (tuning 20), 100 test samples, on the
#: GPU when there is one; GPU-sized (hours on 2 CPU cores).
MNIST_FULL: dict[str, Any] = {
    "widths": [1200, 1200],
    "epochs": 50,
    "capture_every": 5,
    "eval_samples": 100,
    "device": "auto",
    "name": "demo-mnist-full",
    "tags": ["demo", "demo:mnist", "demo:full"],
}
MNIST_FULL_TUNE_EPOCHS = 20
#: Arms whose calibration and OOD entropy are drawn (those in the study, at most three).
EVAL_ARMS = ("fixed N(0,1)", "learnable gradient", "fan-in learnable")
CURVES = ["loss", "kl", "val_nll", "val_acc"]
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
    seeds: Sequence[int] | None = None,
    arms: Sequence[str] | None = None,
    epochs: int | None = None,
    widths: list[int] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    capture_every: int | None = None,
    eval_samples: int | None = None,
    tune_epochs: int | None = None,
    temper: bool = False,
    device: str | None = None,
    n_ood: int = 2000,
    plot_samples: int = 20,
    fashion_dir: str | Path | None = None,
    workers: int = 2,
    progress: bool = True,
    command: str | None = None,
) -> DemoResult:
    """Run the MNIST protocol (3 seeds by default) into ``<out>/bnn-data`` and write
    ``report.html``/``report.md``/``summary.json`` to ``out_dir``."""
    out = Path(out_dir)
    preset = MNIST_FULL if full else MNIST_DEFAULTS
    given = {
        "epochs": epochs,
        "widths": widths,
        "n_train": n_train,
        "n_test": n_test,
        "capture_every": capture_every,
        "eval_samples": eval_samples,
        "device": device,
    }
    base = preset | {k: v for k, v in given.items() if v is not None}
    if tune_epochs is None:
        tune_epochs = MNIST_FULL_TUNE_EPOCHS if full else MNIST_TUNE_EPOCHS
    tune_epochs = min(tune_epochs, base["epochs"])
    spec = demo_spec(
        "mnist",
        seeds=list(seeds) if seeds else None,
        base=base,
        arms=list(arms) if arms else None,
        temper=temper,
        tune_epochs=tune_epochs,
        name=base["name"],
    )
    sizes = PROTOCOL_BASE["mnist"] | {k: v for k, v in spec.base.items() if k != "tags"}
    arch = "-".join(map(str, [784, *sizes["widths"], 10]))
    fashion = find_fashion_mnist(fashion_dir, out / "bnn-data" / "datasets")
    intro = (
        f"Bayesian MLP {arch} on MNIST ({sizes.get('n_train') or 50000} training, "
        f"{sizes.get('n_val') or 10000} validation, {sizes.get('n_test') or 10000} test "
        f"images), Adam (lr {sizes['lr']}, "
        f"batch {sizes['batch_size']}). {len(spec.arms)} priors (arms) x {len(spec.seeds)} "
        f"paired seeds {spec.seeds}. **Sizes of this demo**: {sizes['epochs']} epochs per "
        f"evaluation run, {spec.tune_epochs}-epoch tuning runs (every tuned arm the same "
        f"budget), {sizes.get('eval_samples', 100)} posterior samples for the test metrics, "
        f"capture every {sizes['capture_every']} epoch(s)"
        + (
            " (the 784-1200-1200-10 network, GPU-sized)."
            if full
            else ". The CPU demo's defaults (the first 10,000 training and 2,000 validation "
            "images, 5 epochs, 3-epoch tuning runs) are sized for 20 minutes on 2 CPU cores; "
            "the protocol preset (`bnn study --preset mnist`) trains 10 epochs on all 50k "
            "images and validates on all 10k."
        )
        + burnin_note(spec)
        + " Results first (every test metric with its 95% CI and the paired differences to "
        f"{spec.baseline}), then calibration, OOD inputs and the diagnostics of seed "
        f"{spec.seeds[0]}'s runs."
    )

    def extra(report: Report, store: RunStore, runs: dict[str, str]) -> dict[str, pd.DataFrame]:
        shown = pick_arms(list(runs), EVAL_ARMS, 3)
        return _eval_sections(
            report, store, {a: runs[a] for a in shown}, plot_samples, n_ood, fashion
        )

    return run_protocol_demo(
        out,
        spec,
        title=f"BNN demo: seven priors compared, MNIST {arch}" + (" (full)" if full else ""),
        intro=intro,
        curve_keys=CURVES,
        extra=extra,
        workers=workers,
        progress=progress,
        command=command,
        info={
            "task": "mnist",
            "full": full,
            "sizes": sizes,
            "plot_samples": plot_samples,
            "fashion_mnist": str(fashion) if fashion else None,
        },
    )


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _eval_sections(
    report: Report,
    store: RunStore,
    runs: dict[str, str],
    samples: int,
    n_ood: int,
    fashion: Path | None,
) -> dict[str, pd.DataFrame]:
    """Reliability diagrams and OOD entropy of ``runs`` (one seed), from rebuilt models."""
    preds, ood_preds, metric_rows, ood_rows, notes = {}, {}, {}, {}, []
    ood: dict[str, torch.Tensor] = {}
    y = np.zeros(0, dtype=np.int64)
    seed = 0
    for label, run_id in runs.items():
        data = data_for_run(store, run_id)
        seed = int(store.get_run(run_id).config["seed"])
        y = data.y_test.numpy()
        if not ood:
            ood = _ood_sets(data.x_test, min(n_ood, data.x_test.shape[0]), seed, fashion)
        with store.reader(run_id) as reader:
            epoch = plot_epoch(reader)
        model = model_from_run(store, run_id, data, epoch=epoch, device=_device())
        notes.append(f"{label}: epoch {epoch}")
        torch.manual_seed(seed)
        p = mc_predict(model, data.x_test, samples)
        preds[label] = p
        ood_preds[label] = {name: mc_predict(model, x, samples) for name, x in ood.items()}
        probs = p["probs"]
        b = reliability_bins(probs, y)
        ok = b["count"] > 0
        ece = float(np.sum(b["count"][ok] * np.abs(b["confidence"] - b["accuracy"])[ok]) / len(y))
        metric_rows[label] = {
            "epoch": epoch,
            "test error %": 100 * float((probs.argmax(1) != y).mean()),
            "test NLL": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()),
            "ECE %": 100 * ece,
            "mean entropy (test)": float(p["entropy"].mean()),
        }
        for name, q in ood_preds[label].items():
            ood_rows[(label, name)] = {
                "mean entropy": float(q["entropy"].mean()),
                "AUROC (entropy)": auroc(p["entropy"], q["entropy"]),
                "AUROC (mutual information)": auroc(p["mutual_info"], q["mutual_info"]),
            }
    metrics = pd.DataFrame.from_dict(metric_rows, orient="index")
    metrics.index.name = "arm"
    ood_table = pd.DataFrame.from_dict(ood_rows, orient="index")
    ood_table.index.names = ["arm", "OOD inputs"]
    sec = report.section("calibration", "Calibration")
    sec.text(
        f"Seed {seed}'s runs of {', '.join(runs)}, each network rebuilt from its stored "
        "posteriors (the validation-selected epoch when it was captured, else the last "
        f"captured epoch: {'; '.join(notes)}), {samples} posterior samples. Reliability "
        "diagrams: accuracy per confidence bin (bars) against the diagonal; red: the gap; "
        "dotted: share of test images per bin. One seed, no intervals: the study's tables "
        "above carry the CIs (and its ECE is computed the same way)."
    )
    sec.table(metrics, "the rebuilt models on the test set")
    sec.image(
        "reliability",
        plot_reliability({k: (v["probs"], y) for k, v in preds.items()}),
        "reliability diagrams",
    )
    sec = report.section("ood", "Out-of-distribution inputs")
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
        f"Predictive entropy of the test images against OOD inputs ({', '.join(ood)}); AUROC "
        "of telling OOD from test images by the entropy (total uncertainty) and by the mutual "
        "information between prediction and weights (epistemic part); 0.5 is chance. The "
        f"study's OOD AUROC (with CIs) uses permuted-pixel images instead.{missing}"
    )
    sec.table(ood_table, "OOD detection, one seed")
    ent = {
        k: {"MNIST test": v["entropy"]} | {n: q["entropy"] for n, q in ood_preds[k].items()}
        for k, v in preds.items()
    }
    sec.image("entropy", plot_entropy_histograms(ent), "predictive entropy: test vs OOD inputs")
    return {"calibration": metrics, "ood": ood_table}
