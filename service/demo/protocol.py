"""The project's standard comparison of priors, as a :class:`StudySpec` per dataset.

Seven arms: two untuned or tuned fixed Gaussians, Blundell's fixed scale mixture, and four
learnable designs (by gradient with the prior's own learning rate, empirical Bayes after a
burn-in, the hierarchical prior whose hyperprior scales with the layer, the fan-in prior).
Every tuned arm has a validation grid of the same size (:data:`GRID_SIZE` points: the same
budget); ``fixed N(0,1)`` is the untuned reference and the baseline of the differences.
Tempering (``kl_weight``) is a grid factor of every tuned arm when ``temper`` is on.
"""

from __future__ import annotations

import math
from typing import Any

from service.demo.study import StudySpec

__all__ = ["ARMS", "PROTOCOL_BASE", "protocol_arms", "protocol_spec"]

ARMS = (
    "fixed N(0,1)",
    "fixed tuned",
    "fixed mixture",
    "learnable gradient",
    "EB burn-in",
    "hierarchical scaled",
    "fan-in learnable",
)

#: Shared configuration per dataset (the demo's sizes; ``epochs`` etc. can be overridden).
PROTOCOL_BASE: dict[str, dict[str, Any]] = {
    "regression": {
        "dataset": "regression",
        "widths": [32, 32],
        "epochs": 150,
        "lr": 1e-2,
        "n_train": 1024,
        "n_test": 512,
        "capture_every": 25,
        "grad_capture": "layer",
    },
    "mnist": {
        "dataset": "mnist",
        "widths": [400, 400],
        "epochs": 10,
        "lr": 1e-3,
        "batch_size": 128,
        "capture_every": 1,
        "grad_capture": "layer",
    },
}


def protocol_arms(dataset: str, *, temper: bool = False) -> dict[str, dict[str, Any]]:
    """The seven arms for ``dataset`` ("regression" or "mnist"), as ``StudySpec.arms``."""
    mnist = dataset != "regression"
    burnin = [1, 2, 3] if mnist else [10, 20, 40]  # regression: within 50-epoch tuning
    arms: dict[str, dict[str, Any]] = {
        "fixed N(0,1)": {"config": {"prior": "fixed", "prior_sigma0": 1.0}},
        "fixed tuned": {
            "config": {"prior": "fixed"},
            "tune": {"prior_sigma0": [0.03, 0.1, 0.3] if mnist else [0.1, 0.3, 1.0]},
        },
        "fixed mixture": {
            "config": {
                "prior": "fixed",
                "prior_family": "scale_mixture",
                "mixture_pi": 0.5,
                "mixture_sigma2": math.exp(-6),
            },
            "tune": {"prior_sigma0": [1.0, math.exp(-1), math.exp(-2)]},
        },
        "learnable gradient": {
            "config": {"prior": "learnable", "prior_mode": "gradient"},
            "tune": {"prior_lr": [1e-4, 1e-3, 1e-2]},
        },
        "EB burn-in": {
            "config": {"prior": "learnable", "prior_mode": "empirical_bayes", "eb_every": "epoch"},
            "tune": {"prior_burnin_epochs": burnin},
        },
        "hierarchical scaled": {
            "config": {"prior": "learnable", "prior_mode": "hierarchical"},
            "tune": {"hyper_strength": [0.1, 1.0, 10.0]},
        },
        "fan-in learnable": {
            "config": {"prior": "learnable", "prior_mode": "gradient", "prior_scale": "fan_in"},
            "tune": {"prior_sigma0": [0.5, 1.0, 2.0]},
        },
    }
    if temper:
        for arm in arms.values():
            if "tune" in arm:
                arm["tune"]["kl_weight"] = [0.1, 1.0]
    return arms


def protocol_spec(
    dataset: str,
    *,
    seeds: list[int] | None = None,
    base: dict[str, Any] | None = None,
    arms: list[str] | None = None,
    temper: bool = False,
    tune_epochs: int | None = None,
    name: str | None = None,
) -> StudySpec:
    """The standard study for ``dataset``: 5 seeds for regression, 3 for MNIST by default;
    ``base`` overrides the shared configuration, ``arms`` picks a subset (in order)."""
    all_arms = protocol_arms(dataset, temper=temper)
    picked = list(arms) if arms else list(all_arms)
    unknown = [a for a in picked if a not in all_arms]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {list(all_arms)}")
    default_seeds = [0, 1, 2, 3, 4] if dataset == "regression" else [0, 1, 2]
    return StudySpec.model_validate(
        {
            "name": name or f"protocol-{dataset}",
            "base": PROTOCOL_BASE[dataset] | (base or {}),
            "arms": {a: all_arms[a] for a in picked},
            "seeds": seeds or default_seeds,
            "baseline": picked[0],
            "tune_epochs": tune_epochs,
        }
    )
