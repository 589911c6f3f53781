"""Per (epoch, layer, parameter) summaries, computed part by part and cached for stored runs.

A summary holds what the tables and trajectory plots need of one parameter tensor: the
sums (moments, the pairwise KL sum, the sums that give KL to any prior) and the exact
percentiles of mu and sigma. Epoch files written by this version keep them
(``/summary``, :mod:`trainer.store.summaries`, computed when the epoch was written by the
same functions): then they are read from there, all parts at once, and no array is read.
Otherwise (older files, dict sources) each part is computed from the arrays when first
asked for. Committed epochs never change, so for stored runs every summary is read or
computed once per process (the cache key is the run's id and creation time and the
epoch); dict sources are never cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from trainer.errors import BnnError, ErrorCode
from trainer.store.summaries import ParamStats

from ._cache import clear_cache, peek, store
from ._numeric import (
    TB_PERCENTILES,
    GaussianSums,
    Moments,
    gaussian_summary,
    gaussian_sums,
    percentiles,
    scalar,
    valid_values,
)
from ._scratch import Scratch
from .source import EpochView, RunSource

__all__ = [
    "PARAMS",
    "PERCENTILES",
    "SUMS",
    "ParamSummary",
    "clear_cache",
    "frame_from_rows",
    "iter_summaries",
    "prefetch",
    "select_layers",
    "summarize",
    "workers",
]

PARAMS = ("weight", "bias")


SUMS, PERCENTILES = "sums", "percentiles"


@dataclass(frozen=True)
class ParamSummary:
    """One parameter tensor of one layer at one epoch (posterior or prior).

    Statistics cover the valid elements only: finite mu and sigma with sigma > 0;
    ``nonfinite`` counts the others. Parts are computed on demand: ``sums`` (moments,
    pairwise KL, KL to any prior) and the :data:`TB_PERCENTILES` of mu and of sigma.
    """

    shape: tuple[int, ...]
    nonfinite: int
    prior_mu: float  # the layer's shared prior (NaN when only percentiles were asked for)
    prior_sigma: float
    sums: GaussianSums | None = None
    mu_percentiles: np.ndarray | None = None
    sigma_percentiles: np.ndarray | None = None
    with_prior: bool = True  # False: prior_mu/prior_sigma were not read (NaN)

    def has(self, parts: Sequence[str]) -> bool:
        return (
            (SUMS not in parts or self.sums is not None)
            and (PERCENTILES not in parts or self.mu_percentiles is not None)
            and (self.with_prior or (PERCENTILES in parts and SUMS not in parts))
        )

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n(self) -> int:
        """Number of valid elements."""
        return self.size - self.nonfinite

    @property
    def _sums(self) -> GaussianSums:
        if self.sums is None:
            raise RuntimeError("summary computed without its sums")
        return self.sums

    @property
    def mu(self) -> Moments:
        return self._sums.mu

    @property
    def sigma(self) -> Moments:
        return self._sums.sigma

    @property
    def pairs(self) -> int:
        return self.n * (self.n - 1) // 2

    @property
    def pairwise_kl_sum(self) -> float:
        return self._sums.pairwise_kl

    @property
    def pairwise_kl_average(self) -> float:
        return self._sums.pairwise_kl / self.pairs if self.pairs else float("nan")

    @property
    def kl_to_prior(self) -> float:
        """sum of KL(q_i || layer prior) over the valid elements."""
        return self._sums.kl_to(self.prior_mu, self.prior_sigma)


def _compute(
    view: EpochView,
    layer: str,
    param: str,
    dist: str,
    parts: Sequence[str],
    base: ParamSummary | None,
) -> ParamSummary | None:
    with Scratch() as scratch:  # mu and sigma are not kept: only sums and percentiles
        return _compute_from(view, layer, param, dist, parts, base, scratch)


def _compute_from(
    view: EpochView,
    layer: str,
    param: str,
    dist: str,
    parts: Sequence[str],
    base: ParamSummary | None,
    scratch: Scratch,
) -> ParamSummary | None:
    try:
        mu = view.array(layer, dist, param, "mu", alloc=scratch.alloc)
    except BnnError as exc:
        if exc.code is ErrorCode.NOT_FOUND and exc.details.get("param") == param:
            return None  # the layer has no such parameter (e.g. bias=False)
        raise
    sigma = view.array(layer, dist, param, "sigma", alloc=scratch.alloc)
    if mu.shape != sigma.shape:
        raise BnnError.invalid(
            f"epoch {view.epoch} layer {layer!r} {dist} {param}: mu shape {mu.shape} "
            f"differs from sigma shape {sigma.shape}",
            layer=layer,
        )
    with_prior = True
    if dist == "prior":
        prior_mu, prior_sigma = scalar(mu), scalar(sigma)
    elif base is not None and base.with_prior:
        prior_mu, prior_sigma = base.prior_mu, base.prior_sigma
    elif SUMS in parts or PERCENTILES not in parts:
        prior_mu = scalar(view.array(layer, "prior", param, "mu"))
        prior_sigma = scalar(view.array(layer, "prior", param, "sigma"))
    else:  # percentiles alone need no prior
        prior_mu = prior_sigma = float("nan")
        with_prior = False
    shape = tuple(int(d) for d in mu.shape)
    mu, sigma, nonfinite = valid_values(mu, sigma)
    sums = base.sums if base is not None else None
    mu_pct = base.mu_percentiles if base is not None else None
    sigma_pct = base.sigma_percentiles if base is not None else None
    if sums is None and SUMS in parts and mu_pct is None and PERCENTILES in parts:
        # both from the arrays: one pass for the sums and the percentiles' histograms
        sums, mu_pct, sigma_pct = gaussian_summary(mu, sigma, TB_PERCENTILES)
    if sums is None and SUMS in parts:
        sums = gaussian_sums(mu, sigma)
    if mu_pct is None and PERCENTILES in parts:
        mu_pct, sigma_pct = percentiles(mu, TB_PERCENTILES), percentiles(sigma, TB_PERCENTILES)
    return ParamSummary(
        shape, nonfinite, prior_mu, prior_sigma, sums, mu_pct, sigma_pct, with_prior
    )


_ABSENT = object()  # cached: the layer has no such parameter


def _from_stats(s: ParamStats) -> ParamSummary:
    return ParamSummary(
        s.shape,
        s.nonfinite,
        s.prior_mu,
        s.prior_sigma,
        s.sums,
        s.mu_percentiles,
        s.sigma_percentiles,
    )


def summarize(
    src: RunSource,
    view: EpochView,
    layer: str,
    param: str,
    dist: str = "posterior",
    *,
    parts: Sequence[str] = (SUMS,),
) -> ParamSummary | None:
    """The summary of ``layer``'s ``param`` at ``view.epoch`` with at least ``parts``
    (``"sums"``, ``"percentiles"``); None if the layer lacks ``param``.

    Read from the epoch file when it keeps summaries (all parts; no array is read), else
    computed from the arrays. For stored runs each part is read or computed once and cached.
    """
    view.check_layer(layer)
    base_key = src.cache_key(view.epoch)
    key = None if base_key is None else ("param", base_key, layer, param, dist)
    hit = peek(key)
    if hit is _ABSENT:
        return None
    if isinstance(hit, ParamSummary) and hit.has(parts):
        return hit
    stored = view.stored()
    if stored is not None:  # a row for every parameter the layer has
        found = stored.params.get((layer, dist, param))
        value = None if found is None else _from_stats(found)
    else:
        value = _compute(view, layer, param, dist, parts, hit)
    store(key, _ABSENT if value is None else value)
    return value


def select_layers(view: EpochView, layers: str | Sequence[str] | None) -> list[str]:
    """All layers of the epoch in model order, or the named ones (NOT_FOUND for unknown)."""
    if layers is None:
        return view.layers
    names = [layers] if isinstance(layers, str) else list(layers)
    for name in names:
        view.check_layer(name)
    return names


def workers() -> int:
    """Threads for summarising stored epochs: ``$BNN_ANALYSIS_THREADS``, default 1.

    On a 2-core machine shared with other work, 2 threads gained nothing (h5py serialises
    reads; numpy's per-chunk calls contend for the GIL), so threads are opt-in.
    """
    env = os.environ.get("BNN_ANALYSIS_THREADS", "")
    return max(1, int(env)) if env.isdigit() else 1


def prefetch(src: RunSource, epochs: Sequence[int], task: Callable[[EpochView], object]) -> None:
    """Run ``task(view)`` for every epoch in a thread pool, to fill the cache of a stored run.

    Reading (serialised by h5py) overlaps with the numpy work of other epochs (which
    releases the GIL). Memory: one epoch per thread. No-op for
    sources that are not cached or for a single thread; errors propagate.
    """
    epochs = list(epochs)
    if len(epochs) < 2 or workers() < 2 or src.cache_key(epochs[0]) is None:
        return
    for e in epochs:
        src.cache_key(e)  # catalog look-ups stay in this thread

    def run(epoch: int) -> None:
        with src.open(epoch) as view:
            task(view)

    with ThreadPoolExecutor(workers(), thread_name_prefix="bnn-analysis") as pool:
        for future in [pool.submit(run, e) for e in epochs]:
            future.result()


def iter_summaries(
    src: RunSource,
    epochs: Sequence[int],
    layers: str | Sequence[str] | None,
    dist: str = "posterior",
    *,
    parts: Sequence[str] = (SUMS,),
    params: Sequence[str] = PARAMS,
) -> Iterator[tuple[int, str, dict[str, ParamSummary | None]]]:
    """``(epoch, layer, {"weight": s, "bias": s | None})`` per epoch and layer, file by file."""

    def summaries(view: EpochView) -> list[tuple[str, dict[str, ParamSummary | None]]]:
        return [
            (
                layer,
                {p: summarize(src, view, layer, p, dist, parts=parts) for p in params},
            )
            for layer in select_layers(view, layers)
        ]

    prefetch(src, epochs, summaries)
    for epoch in epochs:
        with src.open(epoch) as view:
            for layer, sums in summaries(view):
                yield epoch, layer, sums


def frame_from_rows(rows: dict[Any, dict[str, Any]], names: Sequence[str]) -> pd.DataFrame:
    """A DataFrame of ``{index: {column: value}}``; a tuple index becomes a MultiIndex."""
    frame = pd.DataFrame.from_dict(rows, orient="index")
    if len(names) > 1:
        frame.index = (
            pd.MultiIndex.from_tuples(list(rows), names=list(names))
            if rows
            else pd.MultiIndex.from_arrays([[] for _ in names], names=list(names))
        )
    else:
        frame.index.name = names[0]
    return frame
