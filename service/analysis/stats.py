"""Summary statistics of posteriors and priors: the seed's overall table, percentile bands
over epochs (TensorBoard's distributions view, exact) and the learned priors' trajectories.

Statistics use the valid elements only (finite mu and sigma, sigma > 0); the others are
counted in ``"<Param> non-finite"`` columns. Standard deviations are population ones
(ddof=0, as ``np.std``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from trainer.errors import BnnError

from ._numeric import TB_PERCENTILES, Moments
from .source import DistType, RunLike, open_source, parse_enum
from .summary import PARAMS, PERCENTILES, ParamSummary, frame_from_rows, iter_summaries

__all__ = [
    "PERCENTILE_COLUMNS",
    "get_overall_weight_stats",
    "percentile_bands",
    "prior_trajectories",
]

#: Column names of :func:`percentile_bands` (TensorBoard's percentiles of a normal).
PERCENTILE_COLUMNS = tuple(f"p{q:g}" for q in TB_PERCENTILES)
_NAN = float("nan")


def _stat_row(mu: Moments, sigma: Moments, size: int, nonfinite: int, name: str) -> dict[str, Any]:
    return {
        f"{name} mu mean": mu.mean if mu.n else _NAN,
        f"{name} mu std": mu.std,
        f"{name} sigma mean": sigma.mean if sigma.n else _NAN,
        f"{name} sigma std": sigma.std,
        f"{name} count": size,
        f"{name} non-finite": nonfinite,
    }


def get_overall_weight_stats(
    distribution_log: RunLike,
    epoch: int | None = None,
    dist_type: str = "posterior",
    *,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """Mean and std of the mu's and sigma's, overall and per layer (the seed's table).

    Returns a DataFrame indexed by ``"Overall"`` (all layers pooled exactly) then each layer,
    with columns ``Weight mu mean``, ``Weight mu std``, ``Weight sigma mean``,
    ``Weight sigma std``, ``Weight count``, ``Weight non-finite`` and the same for ``Bias``
    (NaN/0 for layers without bias). ``epoch=None`` is the latest captured epoch;
    ``dist_type="prior"`` describes the shared priors (one element per layer).

    >>> get_overall_weight_stats(distribution_log, epoch=50)          # doctest: +SKIP
    """
    dist = parse_enum(DistType, dist_type, "dist_type").value
    empty = Moments(0, _NAN, 0.0)
    total = {p: (empty, empty, 0, 0) for p in PARAMS}
    per_layer: dict[str, dict[str, Any]] = {}
    with open_source(distribution_log, data_dir=data_dir, db_url=db_url) as src:
        e = src.resolve_epoch(epoch)
        for _, layer, sums in iter_summaries(src, [e], None, dist):
            row: dict[str, Any] = {}
            for p in PARAMS:
                s = sums[p]
                if s is None:
                    row |= _stat_row(empty, empty, 0, 0, p.capitalize())
                    continue
                row |= _stat_row(s.mu, s.sigma, s.size, s.nonfinite, p.capitalize())
                mu, sigma, size, bad = total[p]
                total[p] = (mu + s.mu, sigma + s.sigma, size + s.size, bad + s.nonfinite)
            per_layer[layer] = row
    overall: dict[str, Any] = {}
    for p in PARAMS:
        mu, sigma, size, bad = total[p]
        overall |= _stat_row(mu, sigma, size, bad, p.capitalize())
    return frame_from_rows({"Overall": overall, **per_layer}, ["layer"])


def percentile_bands(
    run: RunLike,
    layer: str,
    param: str = "weight",
    stat: str = "mu",
    epochs: Sequence[int] | None = None,
    dist_type: str = "posterior",
    *,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """Exact percentiles of one layer's mu or sigma over epochs (TensorBoard's distributions).

    Returns a DataFrame indexed by epoch with :data:`PERCENTILE_COLUMNS` (p0 = min,
    p50 = median, p100 = max, over all valid elements, never a sample), ``count`` and
    ``non-finite``.
    """
    dist = parse_enum(DistType, dist_type, "dist_type").value
    if param not in PARAMS:
        raise BnnError.invalid(
            f"param must be one of {list(PARAMS)}, got {param!r}", param=str(param)
        )
    if stat not in ("mu", "sigma"):
        raise BnnError.invalid(f"stat must be one of ['mu', 'sigma'], got {stat!r}", stat=str(stat))
    rows: dict[int, dict[str, Any]] = {}
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        eps = src.resolve_epochs(epochs)
        for epoch, name, sums in iter_summaries(
            src, eps, layer, dist, parts=(PERCENTILES,), params=(param,)
        ):
            s = sums[param]
            if s is None:
                raise BnnError.not_found(f"layer {name!r} has no {param}", layer=name)
            pct = s.mu_percentiles if stat == "mu" else s.sigma_percentiles
            assert pct is not None
            rows[epoch] = dict(zip(PERCENTILE_COLUMNS, pct.tolist(), strict=True))
            rows[epoch] |= {"count": s.n, "non-finite": s.nonfinite}
    return frame_from_rows(rows, ["epoch"])


def _prior_row(sums: dict[str, ParamSummary | None]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for p in PARAMS:
        s = sums[p]
        row[f"{p.capitalize()} prior mu"] = s.prior_mu if s else _NAN
        row[f"{p.capitalize()} prior sigma"] = s.prior_sigma if s else _NAN
    return row


def prior_trajectories(
    run: RunLike,
    epochs: Sequence[int] | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """The learned (or fixed) shared prior of every layer over epochs.

    Returns a DataFrame indexed by (epoch, layer) with ``Weight prior mu``,
    ``Weight prior sigma``, ``Bias prior mu``, ``Bias prior sigma`` (NaN without bias).
    """
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        rows = {
            (epoch, layer): _prior_row(sums)
            for epoch, layer, sums in iter_summaries(
                src, src.resolve_epochs(epochs), layers, "prior"
            )
        }
    return frame_from_rows(rows, ["epoch", "layer"])
