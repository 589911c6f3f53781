"""False alarms and detections of the exploding/vanishing gradient flags, on real training runs.

Trains small *healthy* runs with the trainer (in memory, nothing written), then counts the
weights that the gradient flags of :mod:`service.analysis.gradients` raise, under the rule
used before (``before``: robust z of log10 |g| beyond ``max(3.5, Phi^-1(1 - 0.005/n))`` on
both sides in a layer of any size, or |g| < 1e-10) and under the current defaults
(``after``). Every captured epoch of every layer counts; the default statistic is the one
the API and the dashboard show (``weight``, gradient of ``mu``, ``mean_abs``), and a
second table pools every (weight|bias) x (mu|rho) x (mean_abs|max_abs) statistic.

True positives: one element of each layer (>= 100 weights) of each run's last epoch is set to
k decades above the layer's median |g| (k = 3, 4, 6, 8) or to 10x / 100x the layer's largest
|g|, and counted as found when the defaults flag it exploding; and one run with SGD at
lr 10 that diverges must be flagged (non-finite gradients).

    OMP_NUM_THREADS=1 python benchmarks/gradient_false_alarms.py [--seeds 5] [--quick]

Measured figures: docs/gradients.md.
"""

from __future__ import annotations

import argparse
import math
import time
import types
from collections import defaultdict
from collections.abc import Iterator
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from service.analysis import gradient_diagnostics
from service.analysis._numeric import robust_log_scale
from service.analysis.gradients import GradThresholds, layer_scores
from trainer.snapshot import EpochSnapshot
from trainer.train import train

DEFAULT = ("weight", "mu", "mean_abs")
#: name -> (config, prior variants, seeds used of --seeds)
PRIORS = {
    "fixed": {"prior": "fixed"},
    "learnable": {"prior": "learnable", "prior_mode": "gradient"},
    "EB": {
        "prior": "learnable",
        "prior_mode": "empirical_bayes",
        "eb_every": "epoch",
        "prior_burnin_epochs": 20,
    },
    "hierarchical": {"prior": "learnable", "prior_mode": "hierarchical"},
}
CONFIGS: dict[str, tuple[dict[str, Any], tuple[str, ...], int]] = {
    "regression 1-10-1, 5 epochs": (
        {"dataset": "regression", "epochs": 5},
        ("fixed", "learnable"),
        99,
    ),
    "regression 1-50-50-1, 20 epochs": (
        {"dataset": "regression", "widths": [50, 50], "epochs": 20},
        ("fixed", "learnable"),
        99,
    ),
    "regression 1-50-50-1, 20 epochs, SGD": (
        {"dataset": "regression", "widths": [50, 50], "epochs": 20, "optimizer": "sgd"},
        ("fixed", "learnable"),
        2,
    ),
    "regression demo 1-32-32-1, 100 epochs": (
        {"dataset": "regression", "widths": [32, 32], "epochs": 100, "capture_every": 25},
        ("fixed", "learnable", "EB", "hierarchical"),
        2,
    ),
    "MNIST 784-100-100-10, 3 epochs, 10k images": (
        {
            "dataset": "mnist",
            "widths": [100, 100],
            "epochs": 3,
            "n_train": 10_000,
            "n_val": 2_000,
            "n_test": 2_000,
        },
        ("fixed", "learnable"),
        3,
    ),
}


class MemorySink:
    """A run sink that keeps the snapshots in memory."""

    def __init__(self) -> None:
        self.snaps: list[EpochSnapshot] = []

    def create_run(self, name: str | None, config: dict[str, Any], tags: Any = ()) -> Any:
        return types.SimpleNamespace(id="memory")

    def write_epoch(self, run_id: str, snap: EpochSnapshot) -> None:
        self.snaps.append(snap)

    def heartbeat(self, run_id: str) -> None:
        pass

    def set_status(self, run_id: str, status: Any, error: str | None = None) -> None:
        pass


def run(config: dict[str, Any]) -> tuple[list[EpochSnapshot], str]:
    sink = MemorySink()
    result = train(
        {**config, "grad_capture": "element", "eval_samples": 10, "val_samples": 2},
        sink=sink,
        progress=False,
    )
    return sink.snaps, result.status


def trees(snaps: list[EpochSnapshot]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    for snap in snaps:
        for layer, tree in (snap.gradients or {}).items():
            yield snap.epoch, layer, tree


def before_flags(tree: dict[str, Any], stat: tuple[str, str, str]) -> tuple[int, int]:
    """The rule before: z = max(3.5, Bonferroni(n)) both sides, any n; |g| < 1e-10; 0."""
    p, gp, st = stat
    g = np.abs(np.asarray(tree[p][gp][st], np.float32).ravel())
    nonfinite = (np.asarray(tree[p][gp]["nonfinite"]).ravel() > 0) | ~np.isfinite(g)
    med, scale, n = robust_log_scale(g)
    z = max(3.5, NormalDist().inv_cdf(1.0 - 0.005 / max(n, 1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(g.astype(np.float64))
    ok = math.isfinite(med) and scale > 0
    explode = nonfinite | (g > 1e2) | ((logs > med + z * scale) if ok else False)
    vanish = ((g == 0) | (g < 1e-10) | ((logs < med - z * scale) if ok else False)) & ~nonfinite
    return int(np.count_nonzero(explode)), int(np.count_nonzero(vanish))


def after_flags(tree: dict[str, Any], stat: tuple[str, str, str]) -> tuple[int, int]:
    th = GradThresholds(*stat)
    sc = layer_scores(tree, th)
    return int(np.count_nonzero(sc.exploding(th))), int(np.count_nonzero(sc.vanishing(th)))


def stats_of(tree: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (p, gp, st)
        for p in ("weight", "bias")
        if p in tree
        for gp in ("mu", "rho")
        for st in ("mean_abs", "max_abs")
    ]


def injected(tree: dict[str, Any], rng: np.random.Generator) -> dict[str, bool]:
    """Set one element k decades above the median (or 10x/100x the max): flagged?"""
    g = np.abs(np.asarray(tree["weight"]["mu"]["mean_abs"], np.float32)).ravel()
    med, _, _ = robust_log_scale(g)
    top = float(g.max())
    found = {}
    for label, value in [
        *((f"median x 1e{k}", 10.0 ** (med + k)) for k in (3, 4, 6, 8)),
        ("10 x max", 10 * top),
        ("100 x max", 100 * top),
    ]:
        g2 = g.copy()
        g2[int(rng.integers(g.size))] = value
        stats = {"mean_abs": g2, "nonfinite": np.zeros(g2.shape, np.int64)}
        th = GradThresholds()
        sc = layer_scores({"weight": {"mu": stats}}, th)
        found[label] = bool(sc.exploding(th).sum() >= 1 and sc.exploding(th)[g2 == value].all())
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per configuration (at most)")
    ap.add_argument("--quick", action="store_true", help="only the first two configurations")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    # per (config, rule, which) -> [elements, exploding, vanishing, layer-epochs flagged,
    # layer-epochs, runs flagged, runs]
    table: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0] * 7)
    detect: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    configs = list(CONFIGS.items())[: 2 if args.quick else None]
    for name, (config, priors, max_seeds) in configs:
        for seed in range(min(args.seeds, max_seeds)):
            for prior in priors:
                snaps, status = run({**config, **PRIORS[prior], "seed": seed})
                assert status == "completed", (name, prior, seed, status)
                hit_run: dict[tuple[str, str], bool] = defaultdict(bool)
                for epoch, _, tree in trees(snaps):
                    for stat in stats_of(tree):
                        which = "default" if stat == DEFAULT else "all"
                        for rule, flags in (("before", before_flags), ("after", after_flags)):
                            e, v = flags(tree, stat)
                            n = int(np.size(tree[stat[0]][stat[1]][stat[2]]))
                            for w in {which, "all"}:
                                row = table[(name, rule, w)]
                                row[0] += n
                                row[1] += e
                                row[2] += v
                                row[3] += int(e + v > 0)
                                row[4] += 1
                                hit_run[(rule, w)] |= e + v > 0
                    w_size = np.size(tree["weight"]["mu"]["mean_abs"])
                    if epoch == snaps[-1].epoch and w_size >= 100:
                        for label, ok in injected(tree, rng).items():
                            detect[label][0] += int(ok)
                            detect[label][1] += 1
                for rule in ("before", "after"):
                    for w in ("default", "all"):
                        table[(name, rule, w)][5] += int(hit_run[(rule, w)])
                        table[(name, rule, w)][6] += 1
                print(f"  {name} / {prior} / seed {seed}: done", flush=True)

    for w, title in (
        ("default", "weight, gradient of mu, mean |g| (the default statistic)"),
        ("all", "every statistic: weight|bias x mu|rho x mean_abs|max_abs"),
    ):
        print(f"\n### Healthy runs, {title}\n")
        print(
            "| runs | rule | weights x epochs | exploding | vanishing | flagged share "
            "| layer-epochs with a flag | runs with a flag |"
        )
        print("|---|---|---|---|---|---|---|---|")
        totals: dict[str, list[int]] = defaultdict(lambda: [0] * 7)
        for name, _ in configs:
            for rule in ("before", "after"):
                row = table[(name, rule, w)]
                totals[rule] = [a + b for a, b in zip(totals[rule], row, strict=True)]
                print(_row(name, rule, row))
        for rule in ("before", "after"):
            print(_row("**all**", rule, totals[rule]))

    print("\n### Injected exploding element (defaults), last epoch, layers >= 100 weights\n")
    print("| injected | found |")
    print("|---|---|")
    for label, (found, n) in detect.items():
        print(f"| {label} | {found}/{n} |")

    snaps, status = run(
        {"dataset": "regression", "epochs": 5, "optimizer": "sgd", "lr": 10.0, "seed": 0}
    )
    diag = gradient_diagnostics(snaps)
    last = diag.xs(snaps[-1].epoch, level="epoch")
    print(
        f"\nDiverging run (regression, SGD lr 10): status {status}, last captured epoch "
        f"{snaps[-1].epoch}: exploding elements per layer {last['exploding'].to_dict()}, "
        f"non-finite {last['non-finite elements'].to_dict()}"
    )
    print(f"\n{time.perf_counter() - t0:.0f} s")


def _row(name: str, rule: str, row: list[int]) -> str:
    n, e, v, le, lt, rf, rt = row
    share = (e + v) / n if n else float("nan")
    return f"| {name} | {rule} | {n:,} | {e:,} | {v:,} | {share:.1e} | {le}/{lt} | {rf}/{rt} |"


if __name__ == "__main__":
    main()
