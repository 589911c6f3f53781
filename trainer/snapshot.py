"""What one captured epoch holds: the unit the trainer hands to a run store.

``params`` is exactly one epoch of the seed's ``distribution_log``::

    {layer: {"posterior"|"prior": {"weight"|"bias": {"mu": ndarray, "sigma": ndarray}}}}

Posterior arrays have the parameter's shape (float32); a shared prior's arrays
have shape ``(1,)``. ``"bias"`` is absent for a layer without bias.

``gradients`` (``None`` when gradient capture is off) holds, per layer::

    {"weight"|"bias": {"mu"|"rho": {"mean_abs": arr, "max_abs": arr, "nonfinite": arr}},
     "step_norm": ndarray (steps,),            # L2 norm of the layer's posterior grads per step
     "prior": {"weight"|"bias": {"mu"|"rho": ndarray (steps,)}}}  # learnable priors only

At level ``"element"`` the statistic arrays have the parameter's shape; at level
``"layer"`` they are 0-d (the layer's mean |g|, max |g|, non-finite count).
``rho`` is the unconstrained parameter behind sigma (sigma = softplus(rho)).

``evaluation`` (the last epoch of a run only; None elsewhere) holds the final test evaluation
per test example, one float64 array of shape (N,) per quantity: ``nll``, ``error``, ``brier``
(classification) or ``nll``, ``sq_error``, ``coverage_50|90|95`` (regression). Studies
bootstrap over these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

__all__ = ["EpochSnapshot", "GradLevel", "LayerLog"]

LayerLog = dict[str, dict[str, dict[str, np.ndarray]]]


class GradLevel(StrEnum):
    """How much gradient detail a capture keeps."""

    NONE = "none"
    LAYER = "layer"
    ELEMENT = "element"


@dataclass
class EpochSnapshot:
    """Parameters, gradient statistics and metrics of one captured epoch."""

    epoch: int
    params: dict[str, LayerLog]
    metrics: dict[str, float] = field(default_factory=dict)
    gradients: dict[str, dict[str, Any]] | None = None
    grad_level: GradLevel = GradLevel.NONE
    layer_types: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, np.ndarray] | None = None  # per-test-example arrays, (N,) each
    # how the epoch file stores it (``trainer.store.write_epoch_file``); None: the writer's
    # arguments, else the environment (``BNN_STAT_BITS``, ``BNN_COMPRESS_POSTERIORS``), decide
    stat_bits: int | None = None  # mantissa bits (0-7) of the per-element statistics
    compress_posteriors: bool | None = None

    @property
    def layers(self) -> list[str]:
        """Layer names in model order."""
        return list(self.params)
