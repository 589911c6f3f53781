"""KL tables: pairwise symmetric KL within a layer, KL of the posteriors to the layer prior.

The symmetric KL of two Gaussians is
``KL(q_i||q_j) + KL(q_j||q_i) = 0.5 (v_i/v_j + v_j/v_i - 2 + (m_i - m_j)^2 (1/v_i + 1/v_j))``.
Summed over all unordered pairs i < j of a layer it reduces to a few sums (see
:func:`~service.analysis._numeric.gaussian_sums`): exact, float64, linear time.

Elements whose mu or sigma is NaN/Inf, or whose sigma <= 0, are left out of every sum and
counted in the ``"<Param> non-finite"`` columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ._numeric import (
    kl_normal_elementwise,
    pairwise_symmetric_kl,
    pairwise_symmetric_kl_reference,
)
from .source import DistType, RunLike, open_source, parse_enum
from .summary import PARAMS, ParamSummary, frame_from_rows, iter_summaries

__all__ = [
    "KL_COLUMNS",
    "compute_layer_kl_divergences",
    "kl_normal_elementwise",
    "kl_tables",
    "kl_to_prior",
    "pairwise_kl_trajectory",
    "pairwise_symmetric_kl",
    "pairwise_symmetric_kl_reference",
]

#: The seed's columns of :func:`compute_layer_kl_divergences`.
KL_COLUMNS = ("Weight KL Sum", "Weight KL Average", "Bias KL Sum", "Bias KL Average")
_NAN = float("nan")


def _pairwise_row(sums: dict[str, ParamSummary | None]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for p in PARAMS:
        s, name = sums[p], p.capitalize()
        row[f"{name} KL Sum"] = s.pairwise_kl_sum if s else _NAN
        row[f"{name} KL Average"] = s.pairwise_kl_average if s else _NAN
    for p in PARAMS:
        s = sums[p]
        row[f"{p.capitalize()} non-finite"] = s.nonfinite if s else 0
    return row


def pairwise_kl_trajectory(
    run: RunLike,
    epochs: Sequence[int] | None = None,
    dist_type: str = "posterior",
    *,
    layers: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """The pairwise table of :func:`compute_layer_kl_divergences` for many epochs.

    Returns a DataFrame indexed by (epoch, layer) with the seed's four columns plus
    ``"Weight non-finite"`` and ``"Bias non-finite"``. ``epochs=None``: all captured.
    """
    dist = parse_enum(DistType, dist_type, "dist_type").value
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        rows = {
            (epoch, layer): _pairwise_row(sums)
            for epoch, layer, sums in iter_summaries(src, src.resolve_epochs(epochs), layers, dist)
        }
    return frame_from_rows(rows, ["epoch", "layer"])


def compute_layer_kl_divergences(
    distribution_log: RunLike,
    epoch: int | None = None,
    dist_type: str = "posterior",
    *,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """Pairwise symmetric KL divergences within each layer at one epoch (the seed's table).

    For each layer, ``Weight KL Sum`` is the symmetric KL summed over all unordered pairs
    i < j of its weights and ``Weight KL Average`` that sum over n(n-1)/2 (NaN for fewer
    than two); the same for biases (NaN when a layer has none). Extra columns
    ``Weight non-finite`` / ``Bias non-finite`` count elements left out. ``epoch=None``
    is the latest captured epoch; ``dist_type`` is ``"posterior"`` or ``"prior"`` (a
    shared prior has one element, so its sums are 0).

    >>> compute_layer_kl_divergences(distribution_log, epoch=95)          # doctest: +SKIP
    """
    dist = parse_enum(DistType, dist_type, "dist_type").value
    with open_source(distribution_log, data_dir=data_dir, db_url=db_url) as src:
        e = src.resolve_epoch(epoch)
        rows = {
            layer: _pairwise_row(sums) for _, layer, sums in iter_summaries(src, [e], None, dist)
        }
    return frame_from_rows(rows, ["layer"])


def _prior_row(sums: dict[str, ParamSummary | None]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for p in PARAMS:
        s = sums[p]
        row[f"{p.capitalize()} KL"] = s.kl_to_prior if s else _NAN
    row["KL"] = row["Weight KL"] + (row["Bias KL"] if sums["bias"] else 0.0)
    for p in PARAMS:
        s = sums[p]
        row[f"{p.capitalize()} KL per element"] = s.kl_to_prior / s.n if s and s.n else _NAN
    for p in PARAMS:
        s = sums[p]
        row[f"{p.capitalize()} non-finite"] = s.nonfinite if s else 0
    return row


def kl_to_prior(
    run: RunLike,
    epochs: Sequence[int] | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """KL(posterior || layer prior) per layer and epoch: the ELBO's KL term split up.

    Returns a DataFrame indexed by (epoch, layer) with ``Weight KL``, ``Bias KL`` (sums over
    elements of KL(q_i || p) against the layer's shared prior of that epoch), ``KL`` (their
    sum), ``Weight KL per element``, ``Bias KL per element`` and the non-finite counts.
    """
    return kl_tables(run, epochs, layers=layers, data_dir=data_dir, db_url=db_url)[0]


def kl_tables(
    run: RunLike,
    epochs: Sequence[int] | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`kl_to_prior` and :func:`pairwise_kl_trajectory` from one pass over the run."""
    prior: dict[tuple[int, str], dict[str, Any]] = {}
    pair: dict[tuple[int, str], dict[str, Any]] = {}
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        for epoch, layer, sums in iter_summaries(src, src.resolve_epochs(epochs), layers):
            prior[(epoch, layer)] = _prior_row(sums)
            pair[(epoch, layer)] = _pairwise_row(sums)
    return frame_from_rows(prior, ["epoch", "layer"]), frame_from_rows(pair, ["epoch", "layer"])
