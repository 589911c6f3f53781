"""``/runs/{id}/stats``, ``/kl``, ``/kl/prior``, ``/kl/trajectory``, ``/priors``,
``/percentiles``, ``/gradients``, ``/gradients/outliers``: the analysis tables of one run.

Every table is JSON ``{"run_id", "epoch", ..., "table": {"columns", "rows"}}`` or CSV with
``?format=csv``. ``epoch`` omitted is the latest captured epoch; an epoch that was not
captured is a 404 whose details list the captured ones. A value that does not exist (the
average KL of a layer with one bias: no pairs) is null in JSON and an empty cell in CSV;
each route's description says when. Results are cached per (run, epoch, query) (see
``_results``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import pandas as pd
from fastapi import APIRouter, Depends, Query, Request, Response

from service import analysis as an
from service.analysis import DistType, GradKind, GradStat
from service.analysis.source import ParamKind
from service.deps import MAX_EPOCH
from service.routers import AUTH_RESPONSES, Format, FormatQuery, error_responses
from service.routers._results import (
    AppStoreDep,
    RunEpochs,
    RunEpochsDep,
    authorized,
    cached_table,
    open_reader,
)
from trainer.errors import BnnError

__all__ = [
    "EPOCHS_PATTERN",
    "DistQuery",
    "EpochQuery",
    "EpochsQuery",
    "LayerQuery",
    "LayersQuery",
    "parse_ints",
    "parse_names",
    "router",
]

NOT_FOUND = (
    404,
    "unknown run or layer, an epoch that was not captured (the details list the captured "
    "ones), or a run without captured epochs",
)
_ERRORS = {**AUTH_RESPONSES, **error_responses(NOT_FOUND, 422, 503)}
router = APIRouter(
    prefix="/runs/{run_id}",
    tags=["analysis"],
    dependencies=[Depends(authorized)],
    responses=_ERRORS,
)
# epochs separated by commas and/or blanks ("", "," and " " too: all captured); the schema
# states this pattern, and every string it admits is answered (an epoch of more than 10
# digits is one no run has: 404, like any epoch that was not captured)
EPOCHS_PATTERN = r"^[0-9, ]*$"
_EPOCH_DIGITS = 10

EpochQuery = Annotated[
    int | None, Query(ge=0, le=MAX_EPOCH, description="a captured epoch; default the latest")
]
EpochsQuery = Annotated[
    str | None,
    Query(
        max_length=100_000,
        pattern=EPOCHS_PATTERN,
        description="epochs separated by commas or blanks; default (or blank) all captured",
    ),
]
DistQuery = Annotated[DistType, Query(description="posterior (default) or the layer prior")]
LayerQuery = Annotated[str | None, Query(max_length=256, description="one layer; default all")]
LayersQuery = Annotated[
    str | None, Query(max_length=10_000, description="comma-separated layers; default all")
]
ParamQuery = Annotated[ParamKind, Query(description="weight (default) or bias")]
GradParamQuery = Annotated[
    Literal["mu", "rho"], Query(description="gradient of the posterior's mu (default) or rho")
]
GradStatQuery = Annotated[GradStat, Query(description="per-element |g| over the epoch's steps")]
# Finite bounds for every float option. The flags add thresholds up in log10 space and
# saturate, so any value in range is finite work; |g| statistics are float32, so absolute
# thresholds beyond 1e38 would mean nothing (everything or only non-finite values).
MAX_Z = 1e6
MAX_ABS_G = 1e38
ZQuery = Annotated[
    float | None,
    Query(
        gt=0,
        le=MAX_Z,
        allow_inf_nan=False,
        description="robust z-score threshold for both sides, (0, 1e6]; default: exploding "
        "max(6, Bonferroni) in layers of >= 100 elements, no vanishing z-score",
    ),
]
ExplodeQuery = Annotated[
    float,
    Query(gt=0, le=MAX_ABS_G, allow_inf_nan=False, description="|g| above is exploding, (0, 1e38]"),
]
VanishQuery = Annotated[
    float | None,
    Query(
        ge=0,
        le=MAX_ABS_G,
        allow_inf_nan=False,
        description="|g| below is vanishing, [0, 1e38]; default: none (only |g| = 0)",
    ),
]


def parse_ints(value: str | None, name: str) -> list[int] | None:
    """``"0,5,10"`` (or ``"0 5 10"``) -> [0, 5, 10]; None when not given or blank (all).

    INVALID_ARGUMENT naming ``name`` unless the value matches :data:`EPOCHS_PATTERN` (the
    pattern in the schema); NOT_FOUND for an epoch of more than 10 digits (beyond any
    capture, and beyond what ``int`` should parse); any other epoch beyond the captures is
    left to the caller's 404."""
    if value is None:
        return None
    if not re.fullmatch(EPOCHS_PATTERN.strip("^$"), value):
        raise BnnError.invalid(
            f"{name} must be epochs (digits) separated by commas or blanks, got {value[:50]!r}",
            fields={name: "epochs separated by commas or blanks"},
        )
    items = [v for v in re.split(r"[ ,]+", value) if v]
    huge = next((v for v in items if len(v.lstrip("0")) > _EPOCH_DIGITS), None)
    if huge is not None:
        shown = huge if len(huge) <= 30 else f"{huge[:12]}...({len(huge)} digits)"
        raise BnnError.not_found(f"{name}: no run has epoch {shown}", **{name: shown})
    return [int(item) for item in items] or None


def parse_names(value: str | None) -> list[str] | None:
    """``"a,b"`` -> ["a", "b"]; None when not given or blank (all); blanks dropped."""
    if value is None:
        return None
    return list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip())) or None


async def _one_epoch_table(
    request: Request,
    run: RunEpochs,
    what: str,
    epoch: int | None,
    query: tuple[Any, ...],
    fmt: Format,
    compute: Callable[[int], pd.DataFrame],
    meta: dict[str, Any] | None = None,
) -> Response:
    e = run.resolve(epoch)

    def frames() -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
        return {"run_id": run.run_id, "epoch": e, **(meta or {})}, {"table": compute(e)}

    key = (what, run.key(e), query)
    filename = f"{run.run_id}_{what}_{e}.csv"
    return await cached_table(request, key, fmt, frames, filename, run=run)


async def _many_epochs_table(
    request: Request,
    run: RunEpochs,
    what: str,
    epochs: str | None,
    query: tuple[Any, ...],
    fmt: Format,
    compute: Callable[[list[int]], pd.DataFrame],
    meta: dict[str, Any] | None = None,
) -> Response:
    chosen = run.resolve_all(parse_ints(epochs, "epochs"))

    def frames() -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
        return {"run_id": run.run_id, "epochs": chosen, **(meta or {})}, {"table": compute(chosen)}

    key = (what, run.key(chosen), query)
    return await cached_table(request, key, fmt, frames, f"{run.run_id}_{what}.csv", run=run)


@router.get("/stats", summary="Mean and std of the mu's and sigma's, overall and per layer")
async def get_stats(
    request: Request,
    run: RunEpochsDep,
    store: AppStoreDep,
    fmt: FormatQuery = Format.JSON,
    epoch: EpochQuery = None,
    dist: DistQuery = DistType.POSTERIOR,
) -> Response:
    """The seed's ``get_overall_weight_stats``: first row ``Overall``, then one per layer.

    Null (empty in CSV): the ``Bias`` means and stds of a layer without bias (count 0),
    and any mean or std over no finite element."""

    def compute(e: int) -> pd.DataFrame:
        with open_reader(store, run.run_id) as reader:
            return an.get_overall_weight_stats(reader, e, dist.value)

    meta = {"dist": dist.value}
    return await _one_epoch_table(request, run, "stats", epoch, (dist,), fmt, compute, meta)


@router.get("/kl", summary="Pairwise symmetric KL within each layer (the seed's table)")
async def get_kl(
    request: Request,
    run: RunEpochsDep,
    store: AppStoreDep,
    fmt: FormatQuery = Format.JSON,
    epoch: EpochQuery = None,
    dist: DistQuery = DistType.POSTERIOR,
) -> Response:
    """``Weight KL Sum``, ``Weight KL Average``, ``Bias KL Sum``, ``Bias KL Average`` per layer
    (exact over all pairs, linear time), and the non-finite elements left out.

    Null (empty in CSV): the ``Bias`` columns of a layer without bias, and an average over
    no pair (fewer than two finite elements, e.g. a layer with one bias)."""

    def compute(e: int) -> pd.DataFrame:
        with open_reader(store, run.run_id) as reader:
            return an.compute_layer_kl_divergences(reader, e, dist.value)

    meta = {"dist": dist.value}
    return await _one_epoch_table(request, run, "kl", epoch, (dist,), fmt, compute, meta)


@router.get("/kl/prior", summary="KL(posterior || layer prior) per layer, weights and biases")
async def get_kl_prior(
    request: Request,
    run: RunEpochsDep,
    store: AppStoreDep,
    fmt: FormatQuery = Format.JSON,
    epoch: EpochQuery = None,
) -> Response:
    """The ELBO's KL term split by layer: ``Weight KL``, ``Bias KL``, ``KL``, per element.

    Null (empty in CSV): the ``Bias`` columns of a layer without bias, a per-element value
    over no finite element, and KL to a prior that is not finite."""

    def compute(e: int) -> pd.DataFrame:
        with open_reader(store, run.run_id) as reader:
            return an.kl_to_prior(reader, [e]).droplevel("epoch")

    return await _one_epoch_table(request, run, "kl_prior", epoch, (), fmt, compute)


@router.get("/kl/trajectory", summary="KL tables over epochs: pairwise or to the layer prior")
async def get_kl_trajectory(
    request: Request,
    run: RunEpochsDep,
    store: AppStoreDep,
    fmt: FormatQuery = Format.JSON,
    of: Annotated[
        Literal["pairwise", "prior"], Query(description="the pairwise table or KL to the prior")
    ] = "pairwise",
    epochs: EpochsQuery = None,
    layers: LayersQuery = None,
    dist: DistQuery = DistType.POSTERIOR,
) -> Response:
    """One row per (epoch, layer): the columns of ``/kl`` (``of=pairwise``, for ``dist``) or of
    ``/kl/prior`` (``of=prior``), null where those are (a layer without bias, an average
    over no pair or no element)."""
    names = parse_names(layers)

    def compute(eps: list[int]) -> pd.DataFrame:
        with open_reader(store, run.run_id) as reader:
            if of == "prior":
                return an.kl_to_prior(reader, eps, layers=names)
            return an.pairwise_kl_trajectory(reader, eps, dist.value, layers=names)

    meta = {"of": of, "dist": dist.value if of == "pairwise" else None}
    query = (of, dist if of == "pairwise" else None, tuple(names or ()))
    return await _many_epochs_table(
        request, run, "kl_trajectory", epochs, query, fmt, compute, meta
    )


@router.get("/priors", summary="The shared layer priors over epochs (prior trajectories)")
async def get_priors(
    request: Request,
    run: RunEpochsDep,
    store: AppStoreDep,
    fmt: FormatQuery = Format.JSON,
    epochs: EpochsQuery = None,
    layers: LayersQuery = None,
) -> Response:
    """``Weight prior mu``/``sigma`` and ``Bias prior mu``/``sigma`` per (epoch, layer);
    the ``Bias`` ones are null (empty in CSV) for a layer without bias."""
    names = parse_names(layers)

    def compute(eps: list[int]) -> pd.DataFrame:
        with open_reader(store, run.run_id) as reader:
            return an.prior_trajectories(reader, eps, layers=names)

    query = (tuple(names or ()),)
    return await _many_epochs_table(request, run, "priors", epochs, query, fmt, compute)


@router.get("/percentiles", summary="Exact percentiles of one layer's mu or sigma over epochs")
async def get_percentiles(
    request: Request,
    run: RunEpochsDep,
    store: AppStoreDep,
    layer: Annotated[str, Query(max_length=256, description="the layer")],
    fmt: FormatQuery = Format.JSON,
    param: ParamQuery = ParamKind.WEIGHT,
    stat: Annotated[Literal["mu", "sigma"], Query(description="mu (default) or sigma")] = "mu",
    epochs: EpochsQuery = None,
    dist: DistQuery = DistType.POSTERIOR,
) -> Response:
    """TensorBoard's distribution bands (p0, p6.68, ..., p100), exact over every element.

    Null (empty in CSV): the percentiles of an epoch where the layer has no finite element
    (``count`` 0)."""

    def compute(eps: list[int]) -> pd.DataFrame:
        with open_reader(store, run.run_id) as reader:
            return an.percentile_bands(reader, layer, param.value, stat, eps, dist.value)

    meta = {"layer": layer, "param": param.value, "stat": stat, "dist": dist.value}
    query = (layer, param, stat, dist)
    return await _many_epochs_table(request, run, "percentiles", epochs, query, fmt, compute, meta)


@router.get("/gradients", summary="Gradient diagnostics per layer at one epoch")
async def get_gradients(
    request: Request,
    run: RunEpochsDep,
    store: AppStoreDep,
    fmt: FormatQuery = Format.JSON,
    epoch: EpochQuery = None,
    layer: LayerQuery = None,
    param: ParamQuery = ParamKind.WEIGHT,
    grad_param: GradParamQuery = "mu",
    stat: GradStatQuery = GradStat.MEAN_ABS,
    z_threshold: ZQuery = None,
    explode_abs: ExplodeQuery = 1e2,
    vanish_abs: VanishQuery = None,
) -> Response:
    """Exploding/vanishing element counts and flags (robust z-score of log10 |g| within the
    layer, absolute thresholds), non-finite counts, step norms, step norm / last layer.

    Null (empty in CSV): ``median |g|``/``max |g|`` without a finite |g|, ``z threshold``
    where there is no z-score (layer-level statistics, or no spread), step norms without a
    finite step, and the ratio to the last layer where either norm is missing."""
    opts: dict[str, Any] = {"param": param.value, "grad_param": grad_param, "stat": stat.value}
    opts |= {"z_threshold": z_threshold, "explode_abs": explode_abs, "vanish_abs": vanish_abs}

    def compute(e: int) -> pd.DataFrame:
        with open_reader(store, run.run_id) as reader:
            table = an.gradient_diagnostics(reader, [e], layers=layer, **opts)
        return table.droplevel("epoch")

    query = (layer, *opts.values())
    return await _one_epoch_table(request, run, "gradients", epoch, query, fmt, compute, opts)


@router.get("/gradients/outliers", summary="Top-k suspected exploding or vanishing elements")
async def get_gradient_outliers(
    request: Request,
    run: RunEpochsDep,
    store: AppStoreDep,
    fmt: FormatQuery = Format.JSON,
    epoch: EpochQuery = None,
    k: Annotated[int, Query(ge=1, le=1000, description="how many")] = 10,
    kind: Annotated[GradKind, Query(description="exploding (default) or vanishing")] = (
        GradKind.EXPLODING
    ),
    layer: LayerQuery = None,
    param: ParamQuery = ParamKind.WEIGHT,
    grad_param: GradParamQuery = "mu",
    stat: GradStatQuery = GradStat.MEAN_ABS,
    z_threshold: ZQuery = None,
) -> Response:
    """Ranked by the robust z-score within each element's layer, with the element's gradient
    statistics, its posterior mu/sigma and its layer prior at that epoch.

    ``robust z`` is "inf" for an element with a non-finite gradient (ranked first when
    exploding). Null (empty in CSV): a statistic that is NaN (a NaN gradient), and the
    prior of a layer that has none for this parameter."""
    opts: dict[str, Any] = {"param": param.value, "grad_param": grad_param, "stat": stat.value}
    opts |= {"z_threshold": z_threshold}

    def compute(e: int) -> pd.DataFrame:
        with open_reader(store, run.run_id) as reader:
            return an.gradient_outliers(reader, e, k, kind.value, layer, **opts)

    meta = {"k": k, "kind": kind.value, "layer": layer, **opts}
    query = (k, kind, layer, *opts.values())
    return await _one_epoch_table(request, run, "outliers", epoch, query, fmt, compute, meta)
