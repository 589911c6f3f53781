"""``/compare/gradients``, ``/compare/kl``, ``/compare/priors``: tables across runs.

``runs`` is a comma-separated list of run ids (at least two; tables label runs by id).
Runs compared element by element (gradients, KL) must have the same architecture: 422
naming the first difference otherwise.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import pandas as pd
from fastapi import APIRouter, Depends, Query, Request, Response

from service import analysis as an
from service.analysis import GradKind, GradStat
from service.analysis.source import ParamKind
from service.routers import AUTH_RESPONSES, CSV_RESPONSES, Format, FormatQuery, error_responses
from service.routers._results import (
    AppStoreDep,
    RunEpochs,
    authorized,
    cached_table,
    open_reader,
    run_epochs,
)
from service.routers.analysis import (
    EpochQuery,
    LayerQuery,
    LayersQuery,
    parse_ints,
    parse_names,
)
from trainer.errors import BnnError
from trainer.store import RunReader, RunStore

__all__ = [
    "MAX_RUNS",
    "RunPairQuery",
    "RunsQuery",
    "common_epoch",
    "compare_epochs",
    "load_runs",
    "readers",
    "router",
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    **error_responses(
        (
            404,
            "an unknown run or layer, or an epoch some run did not capture (the details "
            "list each run's epochs)",
        ),
        (
            422,
            "an invalid parameter (``runs``: 2 to 16 run ids, or exactly 2), or runs "
            "compared element by element that differ in architecture (the message names the "
            "first difference)",
        ),
        503,
    ),
    **CSV_RESPONSES,
}
router = APIRouter(
    prefix="/compare", tags=["compare"], dependencies=[Depends(authorized)], responses=_ERRORS
)
MAX_RUNS = 16
_ID = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"  # service.schemas.RUN_ID
RUNS_PATTERN = rf"^{_ID}(,{_ID}){{1,{MAX_RUNS - 1}}}$"
PAIR_PATTERN = rf"^{_ID},{_ID}$"
# The pattern is in the schema and checked by load_runs (after the count, whose 422 says
# more than "does not match"): what the schema allows, the endpoint takes.
RunsQuery = Annotated[
    str,
    Query(
        max_length=2000,
        description=f"comma-separated run ids, 2 to {MAX_RUNS}",
        json_schema_extra={"pattern": RUNS_PATTERN},
    ),
]
RunPairQuery = Annotated[
    str,
    Query(
        max_length=2000,
        description="two comma-separated run ids: a,b",
        json_schema_extra={"pattern": PAIR_PATTERN},
    ),
]


async def load_runs(request: Request, runs: str, exactly: int | None = None) -> list[RunEpochs]:
    """Each run's epochs (404 naming an unknown run); 422 for fewer than 2 (or not
    ``exactly``) or more than :data:`MAX_RUNS` runs."""
    ids = [r.strip() for r in runs.split(",") if r.strip()]
    if exactly is not None and len(ids) != exactly:
        raise BnnError.invalid(
            f"runs must name exactly {exactly} runs, got {len(ids)}: {ids[:MAX_RUNS]}",
            fields={"runs": f"exactly {exactly} comma-separated run ids"},
        )
    if not 2 <= len(ids) <= MAX_RUNS:
        raise BnnError.invalid(
            f"runs must name 2 to {MAX_RUNS} runs to compare, got {len(ids)}: {ids[:MAX_RUNS]}",
            fields={"runs": f"2 to {MAX_RUNS} comma-separated run ids"},
        )
    if not re.fullmatch(RUNS_PATTERN.strip("^$"), runs):
        raise BnnError.invalid(
            f"runs must be run ids separated by single commas, without blanks, got {runs[:200]!r}",
            fields={"runs": f"comma-separated run ids matching {RUNS_PATTERN}"},
        )
    return [await run_epochs(request, run_id) for run_id in ids]


@contextlib.contextmanager
def readers(store: RunStore, runs: list[RunEpochs]) -> Iterator[list[RunReader]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(open_reader(store, r.run_id)) for r in runs]


def common_epoch(runs: list[RunEpochs], epoch: int | None) -> int:
    """``epoch`` checked in every run (404 listing each run's epochs), or the latest common."""
    if epoch is not None:
        for r in runs:
            r.resolve(epoch)
        return epoch
    common = set.intersection(*(set(r.epochs) for r in runs))
    if not common:
        listing = {r.run_id: r.epochs for r in runs}
        raise BnnError.not_found(
            f"the runs have no captured epoch in common: {listing}", epochs=listing
        )
    return max(common)


def _ids(runs: list[RunEpochs]) -> list[str]:
    return [r.run_id for r in runs]


@router.get("/gradients", summary="Top gradient outliers of several runs, side by side")
async def compare_gradients(
    request: Request,
    store: AppStoreDep,
    runs: RunsQuery,
    fmt: FormatQuery = Format.JSON,
    table: Annotated[
        Literal["outliers", "counts"], Query(description="the table CSV gives")
    ] = "outliers",
    epoch: EpochQuery = None,
    k: Annotated[int, Query(ge=1, le=1000, description="top k per run")] = 10,
    kind: Annotated[GradKind, Query(description="exploding (default) or vanishing")] = (
        GradKind.EXPLODING
    ),
    layer: LayerQuery = None,
    param: Annotated[ParamKind, Query(description="weight or bias")] = ParamKind.WEIGHT,
    grad_param: Annotated[Literal["mu", "rho"], Query(description="mu or rho")] = "mu",
    stat: Annotated[GradStat, Query(description="per-element |g|")] = GradStat.MEAN_ABS,
) -> Response:
    """``outliers``: each run's top-k with the same elements' statistics in the other runs
    (columns ``<stat> (<run>)``); ``counts``: exploding / vanishing / non-finite elements
    per layer and run. ``epoch`` omitted: the latest epoch all runs captured.

    Null (empty in CSV): a statistic that is NaN (a NaN gradient), and the prior of a layer
    that has none for this parameter; ``robust z`` is "inf" for a non-finite gradient."""
    found = await load_runs(request, runs)
    e = common_epoch(found, epoch)
    opts: dict[str, Any] = {"param": param.value, "grad_param": grad_param, "stat": stat.value}

    def compute() -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
        with readers(store, found) as rs:
            result = an.compare_gradient_outliers(rs, e, k, kind=kind.value, layer=layer, **opts)
        meta = {"runs": _ids(found), "epoch": e, "k": k, "kind": kind.value, "layer": layer}
        return {**meta, **opts}, {"outliers": result.table, "counts": result.counts}

    key = ("compare_gradients", tuple(r.key(e) for r in found), k, kind, layer, *opts.values())
    return await cached_table(request, key, fmt, compute, "compare_gradients.csv", table)


@router.get("/kl", summary="KL between two runs' posteriors, layer by layer")
async def compare_kl(
    request: Request,
    store: AppStoreDep,
    runs: RunPairQuery,
    fmt: FormatQuery = Format.JSON,
    epoch: EpochQuery = None,
    epoch_b: Annotated[
        int | None, Query(ge=0, le=2**31 - 1, description="the second run's epoch; default epoch")
    ] = None,
    layers: LayersQuery = None,
) -> Response:
    """``KL(a||b)``, ``KL(b||a)``, symmetric and per element, for weights and biases: element i
    of run a against element i of run b, so both runs need the same architecture (422
    otherwise). ``epoch`` omitted: each run's latest.

    Null (empty in CSV): the ``Bias`` columns of layers without bias, and the per-element
    value over no element finite in both runs."""
    found = await load_runs(request, runs, exactly=2)
    a, b = found
    ea = a.resolve(epoch)
    eb = b.resolve(epoch_b if epoch_b is not None else epoch)
    names = parse_names(layers)

    def compute() -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
        with readers(store, found) as (ra, rb):
            frame = an.kl_between_runs(ra, rb, ea, eb, layers=names)
        meta = {"runs": _ids(found), "epoch_a": ea, "epoch_b": eb}
        return meta, {"table": frame}

    key = ("compare_kl", a.key(ea), b.key(eb), tuple(names or ()))
    return await cached_table(request, key, fmt, compute, "compare_kl.csv")


@router.get("/priors", summary="Learned priors against layer width across runs (width study)")
async def compare_priors(
    request: Request,
    store: AppStoreDep,
    runs: RunsQuery,
    fmt: FormatQuery = Format.JSON,
    epoch: EpochQuery = None,
) -> Response:
    """One row per (run, layer): width, fan in/out, the learned weight and bias prior, the
    posterior spread and the KL to the prior per element. ``epoch`` omitted: each run's
    latest (given, every run must have it).

    Null (empty in CSV): the ``Bias`` prior of a layer without bias, and the KL per element
    over no finite weight."""
    found = await load_runs(request, runs)
    chosen = [r.resolve(epoch) for r in found]

    def compute() -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
        with readers(store, found) as rs:
            frame = an.width_study(rs, epoch, min_widths=1)  # a table: one width is fine
        return {"runs": _ids(found), "epochs": chosen}, {"table": frame}

    key = ("compare_priors", tuple(r.key(e) for r, e in zip(found, chosen, strict=True)))
    return await cached_table(request, key, fmt, compute, "compare_priors.csv")


def compare_epochs(found: list[RunEpochs], epochs: str | None) -> list[list[int]]:
    """Each run's epochs: all captured, or the listed ones (every run must have them)."""
    wanted = parse_ints(epochs, "epochs")
    return [r.resolve_all(wanted) for r in found]
