"""Per-step gradient series of one epoch: the layers' gradient norms and the learnable
priors' gradients. Each reads only the arrays it shows (not a layer's whole statistics)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from trainer.errors import BnnError

from .source import RunLike, open_source
from .summary import PARAMS, select_layers

__all__ = ["gradient_norm_series", "prior_gradient_series"]


def gradient_norm_series(
    run: RunLike,
    epoch: int | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """Per-step gradient L2 norm of each layer's posterior parameters at one epoch.

    Returns a DataFrame indexed by step with one column per layer (NaN/Inf kept).
    """
    cols: dict[str, np.ndarray] = {}
    with (
        open_source(run, data_dir=data_dir, db_url=db_url) as src,
        src.open(src.resolve_epoch(epoch)) as view,
    ):
        for layer in select_layers(view, layers):
            norms = view.gradient_array(layer, "step_norm")
            if norms is not None:
                cols[layer] = np.asarray(norms, np.float64).ravel()
        if not cols:
            raise BnnError.not_found(
                f"run {src.name!r} epoch {view.epoch} has no gradient step norms"
            )
    frame = pd.DataFrame({k: pd.Series(v) for k, v in cols.items()})
    frame.index.name = "step"
    return frame


def prior_gradient_series(
    run: RunLike,
    epoch: int | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """Per-step gradients of the learnable prior parameters at one epoch.

    Returns a DataFrame indexed by step with columns ``<layer>.<weight|bias>.<mu|rho>``
    (empty when every prior is fixed or learned by empirical Bayes).
    """
    cols: dict[str, pd.Series] = {}
    with (
        open_source(run, data_dir=data_dir, db_url=db_url) as src,
        src.open(src.resolve_epoch(epoch)) as view,
    ):
        for layer in select_layers(view, layers):
            for param in PARAMS:
                for name in ("mu", "rho"):
                    series = view.gradient_array(layer, "prior", param, name)
                    if series is not None:
                        cols[f"{layer}.{param}.{name}"] = pd.Series(np.asarray(series, np.float64))
    frame = pd.DataFrame(cols)
    frame.index.name = "step"
    return frame
