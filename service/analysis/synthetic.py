"""Synthetic captured epochs for examples, tests and benchmarks (seeded, no training).

An MLP ``sizes[0] -> ... -> sizes[-1]`` with layers ``layer1..layerK`` as
:func:`trainer.models.mlp` names them: posterior mu ~ N(0, 0.05^2) drifting with the
epoch, sigma log-normal around 0.05, shared priors whose sigma moves with the epoch, and
(optionally) gradient statistics with log10 |g| ~ N(-3, 0.3^2).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from trainer.snapshot import EpochSnapshot, GradLevel, LayerLog

__all__ = ["synthetic_log", "synthetic_snapshot"]


def _grads(shape: tuple[int, ...], rng: np.random.Generator, level: GradLevel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for gp in ("mu", "rho"):
        mean = (10.0 ** rng.normal(-3.0, 0.3, shape)).astype(np.float32)
        peak = (mean * (1.0 + rng.random(shape, np.float32))).astype(np.float32)
        stats = {"mean_abs": mean, "max_abs": peak, "nonfinite": np.zeros(shape, np.int64)}
        if level is GradLevel.LAYER:
            stats = {
                "mean_abs": np.array(mean.mean(), np.float32),
                "max_abs": np.array(peak.max(), np.float32),
                "nonfinite": np.array(0, np.int64),
            }
        out[gp] = stats
    return out


def synthetic_snapshot(
    epoch: int,
    sizes: Sequence[int] = (784, 1200, 1200, 10),
    *,
    seed: int = 0,
    grad_level: GradLevel | str = GradLevel.NONE,
    prior_sigma: float = 0.1,
    learnable: bool = True,
    bias: bool = True,
    steps: int = 20,
) -> EpochSnapshot:
    """One captured epoch of the synthetic MLP (deterministic for ``seed`` and ``epoch``)."""
    level = GradLevel(grad_level)
    rng = np.random.default_rng([seed, epoch])
    params: dict[str, LayerLog] = {}
    grads: dict[str, Any] = {}
    drift = 1.0 + 0.01 * epoch
    for k, (n_in, n_out) in enumerate(itertools.pairwise(sizes), start=1):
        name = f"layer{k}"
        kinds: list[tuple[str, tuple[int, ...]]] = [("weight", (n_out, n_in))]
        if bias:
            kinds.append(("bias", (n_out,)))
        log: LayerLog = {"posterior": {}, "prior": {}}
        for kind, shape in kinds:
            mu = rng.normal(0.0, 0.05 * drift, shape).astype(np.float32)
            sigma = np.exp(rng.normal(np.log(0.05), 0.2, shape)).astype(np.float32)
            log["posterior"][kind] = {"mu": mu, "sigma": sigma}
            p_sigma = prior_sigma * (drift if learnable else 1.0) * (1.0 + 0.1 * k)
            p_mu = 0.001 * epoch * k if learnable else 0.0
            log["prior"][kind] = {
                "mu": np.array([p_mu], np.float32),
                "sigma": np.array([p_sigma], np.float32),
            }
        params[name] = log
        if level is not GradLevel.NONE:
            entry: dict[str, Any] = {kind: _grads(shape, rng, level) for kind, shape in kinds}
            entry["step_norm"] = 10.0 ** rng.normal(-1.0 - 0.2 * k, 0.1, steps)
            if learnable:
                entry["prior"] = {
                    kind: {"mu": rng.normal(0, 1e-3, steps), "rho": rng.normal(0, 1e-3, steps)}
                    for kind, _ in kinds
                }
            grads[name] = entry
    return EpochSnapshot(
        epoch=epoch,
        params=params,
        metrics={"loss": 1.0 / (1 + epoch)},
        gradients=grads or None,
        grad_level=level,
        layer_types={name: "BayesLinear" for name in params},
    )


def synthetic_log(
    epochs: Sequence[int], sizes: Sequence[int] = (784, 1200, 1200, 10), *, seed: int = 0, **kw: Any
) -> dict[int, dict[str, LayerLog]]:
    """The seed's ``distribution_log`` of :func:`synthetic_snapshot` epochs."""
    return {e: synthetic_snapshot(e, sizes, seed=seed, **kw).params for e in epochs}
