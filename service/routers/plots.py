"""``/runs/{id}/plots/{kind}.png`` and ``/compare/plots/{kind}.png``: the analysis plots.

Each kind's options are query parameters, validated by one pydantic model per kind: an
unknown option or a bad value is a 422 naming it; an unknown kind a 404 listing the kinds.
PNG bytes are cached per (kind, run epochs, options). ``Content-Disposition`` names the
file (``curl -OJ`` saves it); ``?download=1`` makes it an attachment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from service import analysis as an
from service.analysis import DistType, GradStat
from service.analysis.source import ParamKind
from service.deps import MAX_EPOCH
from service.routers._results import (
    AppStoreDep,
    Rendered,
    RunEpochs,
    RunEpochsDep,
    authorized,
    cached_bytes,
    open_reader,
)
from service.routers.compare import RunsQuery, load_runs, readers
from service.schemas import ErrorOut
from trainer.errors import BnnError
from trainer.store import RunReader, RunStore

__all__ = ["COMPARE_PLOTS", "RUN_PLOTS", "PlotOptions", "router"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 404, 422, 503)
}
_PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the plot as PNG"}
}
router = APIRouter(tags=["plots"], dependencies=[Depends(authorized)], responses=_ERRORS)
RESERVED = frozenset({"download", "runs"})  # query parameters that are not plot options


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCH)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
Epochs = Annotated[
    tuple[Epoch, ...], BeforeValidator(_split), Field(min_length=1, max_length=10_000)
]
Names = Annotated[tuple[Name, ...], BeforeValidator(_split), Field(min_length=1, max_length=64)]
Element = Annotated[str, Field(pattern=r"^[^:,]{1,256}:\d{1,10}(\.\d{1,10}){0,7}$")]
Elements = Annotated[
    tuple[Element, ...], BeforeValidator(_split), Field(min_length=1, max_length=16)
]


class PlotOptions(BaseModel):
    """Options every plot takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dpi: int = Field(100, ge=30, le=300, description="resolution of the PNG")


class EvolutionOptions(PlotOptions):
    """Chosen parameters' Gaussians over epochs (dark red early, neon green late)."""

    epochs: Epochs | None = None
    num_points: int = Field(200, ge=2, le=2000)
    dist: DistType = DistType.POSTERIOR
    params: Elements | None = Field(None, description="layer:flat_index or layer:i.j, ...")
    top_k: int = Field(4, ge=1, le=16)
    criterion: Literal["mu_change", "sigma", "gradient"] = "mu_change"
    layer: Name | None = None
    param: ParamKind = ParamKind.WEIGHT


class EpochOptions(PlotOptions):
    """All distributions of each layer at one epoch: a stated subset of curves, histograms."""

    epoch: Epoch | None = None
    num_points: int = Field(200, ge=2, le=2000)
    alpha: float = Field(0.6, gt=0, le=1)
    dist: DistType = DistType.POSTERIOR
    layer: Name | None = None
    param: ParamKind = ParamKind.WEIGHT
    max_curves: int = Field(200, ge=1, le=2000)
    bins: int = Field(100, ge=1, le=1000)
    seed: int = Field(0, ge=0, le=2**32 - 1)


class BandsOptions(PlotOptions):
    """Percentile bands of mu and sigma per layer over epochs."""

    layer: Name | None = None
    param: ParamKind = ParamKind.WEIGHT
    epochs: Epochs | None = None
    dist: DistType = DistType.POSTERIOR


class TrajectoryOptions(PlotOptions):
    """KL over epochs (pairwise and to the prior) per layer."""

    epochs: Epochs | None = None
    layers: Names | None = None


class PriorOptions(TrajectoryOptions):
    """The learned layer priors' mu and sigma over epochs."""

    param: ParamKind = ParamKind.WEIGHT


class ScaleOptions(PriorOptions):
    """Prior sigma vs posterior sigma (RMS) and RMS of the means per layer over epochs."""


class GradientOptions(PriorOptions):
    """Per-step gradient norms and per-element gradient magnitudes per layer over epochs."""

    grad_param: Literal["mu", "rho"] = "mu"
    stat: GradStat = GradStat.MEAN_ABS


class WidthOptions(PlotOptions):
    """Learned priors against network width across runs."""

    epoch: Epoch | None = None
    param: ParamKind = ParamKind.WEIGHT


def _elements(params: tuple[str, ...] | None) -> list[tuple[str, Any]] | None:
    if params is None:
        return None
    out: list[tuple[str, Any]] = []
    for item in params:
        layer, _, index = item.rpartition(":")
        parts = tuple(int(i) for i in index.split("."))
        out.append((layer, parts[0] if len(parts) == 1 else parts))
    return out


def _names(names: tuple[str, ...] | None) -> list[str] | None:
    return None if names is None else list(names)


@dataclass(frozen=True)
class RunPlot:
    options: type[PlotOptions]
    draw: Callable[[RunReader, Any, list[int]], bytes]
    one_epoch: bool = False  # draws ``epoch`` (else ``epochs``)


RUN_PLOTS: dict[str, RunPlot] = {
    "evolution": RunPlot(
        EvolutionOptions,
        lambda r, o, eps: an.plot_params_log_distributions(
            r, o.num_points, o.dist.value, params=_elements(o.params), top_k=o.top_k,
            criterion=o.criterion, layer=o.layer, param=o.param.value, epochs=eps, dpi=o.dpi,
        ),
    ),
    "epoch": RunPlot(
        EpochOptions,
        lambda r, o, eps: an.plot_epoch_distributions(
            r, eps[0], o.num_points, o.alpha, o.dist.value, layer=o.layer, param=o.param.value,
            max_curves=o.max_curves, bins=o.bins, seed=o.seed, dpi=o.dpi,
        ),
        one_epoch=True,
    ),
    "bands": RunPlot(
        BandsOptions,
        lambda r, o, eps: an.plot_percentile_bands(
            r, o.layer, o.param.value, eps, o.dist.value, dpi=o.dpi
        ),
    ),
    "kl": RunPlot(
        TrajectoryOptions,
        lambda r, o, eps: an.plot_kl_over_epochs(r, eps, layers=_names(o.layers), dpi=o.dpi),
    ),
    "priors": RunPlot(
        PriorOptions,
        lambda r, o, eps: an.plot_prior_trajectories(
            r, eps, layers=_names(o.layers), param=o.param.value, dpi=o.dpi
        ),
    ),
    "scales": RunPlot(
        ScaleOptions,
        lambda r, o, eps: an.plot_scale_diagnostics(
            r, eps, layers=_names(o.layers), param=o.param.value, dpi=o.dpi
        ),
    ),
    "gradients": RunPlot(
        GradientOptions,
        lambda r, o, eps: an.plot_gradient_magnitudes(
            r, eps, layers=_names(o.layers), param=o.param.value, grad_param=o.grad_param,
            stat=o.stat.value, dpi=o.dpi,
        ),
    ),
}  # fmt: skip

COMPARE_PLOTS: dict[str, type[PlotOptions]] = {
    "width": WidthOptions,
    "priors": PriorOptions,
    "scales": ScaleOptions,
}


def describe(kinds: Mapping[str, type[PlotOptions]], intro: str) -> str:
    """The OpenAPI description: each kind with its options and their defaults."""
    lines = [intro, "", "| kind | what | options (default) |", "|---|---|---|"]
    for kind, cls in kinds.items():
        opts = ", ".join(
            f"`{name}` ({'-' if f.default is None else getattr(f.default, 'value', f.default)})"
            for name, f in cls.model_fields.items()
        )
        lines.append(f"| `{kind}` | {(cls.__doc__ or '').strip()} | {opts} |")
    return "\n".join(lines)


def parse_options(cls: type[PlotOptions], kind: str, query: Mapping[str, list[str]]) -> PlotOptions:
    """The options of ``kind`` from the query; 422 naming an unknown or bad option."""
    fields: dict[str, str] = {}
    values: dict[str, str] = {}
    allowed = sorted(cls.model_fields)
    for name, given in query.items():
        if name in RESERVED:
            continue
        if name not in cls.model_fields:
            fields[name] = f"unknown option for plot {kind!r}; options are {allowed}"
        elif len(given) > 1:
            fields[name] = "given more than once"
        else:
            values[name] = given[0]
    if fields:
        text = "; ".join(f"{k}: {v}" for k, v in fields.items())
        raise BnnError.invalid(f"invalid request: {text}", fields=fields, options=allowed)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("query", *err["loc"])} for err in exc.errors()]
        ) from None


def _query(request: Request) -> dict[str, list[str]]:
    params = request.query_params
    return {key: params.getlist(key) for key in params}


async def _png(
    request: Request,
    key: tuple[Any, ...],
    draw: Callable[[], bytes],
    filename: str,
    download: bool,
) -> Response:
    out = await cached_bytes(request, key, lambda: Rendered(draw(), "image/png"))
    disposition = f'{"attachment" if download else "inline"}; filename="{filename}"'
    return out.response(request, {"Content-Disposition": disposition})


DownloadQuery = Annotated[
    bool, Query(description="1: Content-Disposition attachment (default inline)")
]
KindPath = Annotated[str, Path(max_length=64, description="the plot kind")]


def _kind(kind: str, kinds: Mapping[str, Any], where: str) -> None:
    if kind not in kinds:
        raise BnnError.not_found(
            f"unknown plot kind {kind!r} for {where}; kinds are {sorted(kinds)}",
            kind=kind,
            kinds=sorted(kinds),
        )


@router.get(
    "/runs/{run_id}/plots/{kind}.png",
    response_class=Response,
    responses=_PNG,
    summary="A plot of one run as PNG",
    description=describe(
        {k: v.options for k, v in RUN_PLOTS.items()},
        "Options are query parameters (422 naming an unknown or bad one); ``download=1``: "
        "served as an attachment. Epoch lists are comma-separated (default all captured).",
    ),
)
async def run_plot(
    request: Request,
    kind: KindPath,
    run: RunEpochsDep,
    store: AppStoreDep,
    download: DownloadQuery = False,
) -> Response:
    """Kinds: ``evolution`` (chosen parameters over epochs), ``epoch`` (all distributions at
    one epoch), ``bands`` (percentile bands), ``kl`` (KL over epochs), ``priors`` (prior
    trajectories), ``scales`` (prior sigma vs posterior scales), ``gradients`` (gradient
    magnitudes). Options as query parameters (see the 422 of an unknown option for a
    kind's list)."""
    _kind(kind, RUN_PLOTS, "a run")
    spec = RUN_PLOTS[kind]
    opts = parse_options(spec.options, kind, _query(request))
    if spec.one_epoch:
        eps = [run.resolve(getattr(opts, "epoch", None))]
    else:
        eps = run.resolve_all(getattr(opts, "epochs", None))

    def draw() -> bytes:
        with open_reader(store, run.run_id) as reader:
            return spec.draw(reader, opts, eps)

    key = ("plot", kind, run.key(eps), opts.model_dump_json(exclude={"epoch", "epochs"}))
    return await _png(request, key, draw, f"{run.run_id}_{kind}.png", download)


def _draw_compare(
    kind: str, store: RunStore, found: list[RunEpochs], opts: Any, eps: list[list[int]]
) -> bytes:
    with readers(store, found) as rs:
        if kind == "width":
            return an.plot_width_study(rs, opts.epoch, param=opts.param.value, dpi=opts.dpi)
        # each run's own epochs: the trajectory plots apply one list to every run
        wanted = None if opts.epochs is None else eps[0]
        if kind == "scales":
            return an.plot_scale_diagnostics(
                rs, wanted, layers=_names(opts.layers), param=opts.param.value, dpi=opts.dpi
            )
        return an.plot_prior_trajectories(
            rs, wanted, layers=_names(opts.layers), param=opts.param.value, dpi=opts.dpi
        )


@router.get(
    "/compare/plots/{kind}.png",
    response_class=Response,
    responses=_PNG,
    summary="A plot across runs as PNG",
    description=describe(
        COMPARE_PLOTS,
        "``runs``: comma-separated run ids (2 to 16). Options are query parameters; "
        "``download=1``: served as an attachment.",
    ),
)
async def compare_plot(
    request: Request,
    kind: KindPath,
    store: AppStoreDep,
    runs: RunsQuery,
    download: DownloadQuery = False,
) -> Response:
    """Kinds: ``width`` (learned prior against width, one point per run), ``priors``
    (prior trajectories of all runs overlaid) and ``scales`` (prior sigma vs posterior
    scales of all runs overlaid). ``runs``: comma-separated run ids."""
    _kind(kind, COMPARE_PLOTS, "comparisons")
    opts = parse_options(COMPARE_PLOTS[kind], kind, _query(request))
    found = await load_runs(request, runs)
    if kind == "width":
        eps = [[r.resolve(getattr(opts, "epoch", None))] for r in found]
    else:
        wanted = getattr(opts, "epochs", None)
        eps = [r.resolve_all(None if wanted is None else list(wanted)) for r in found]

    def draw() -> bytes:
        return _draw_compare(kind, store, found, opts, eps)

    runs_key = tuple(r.key(e) for r, e in zip(found, eps, strict=True))
    key = ("compare_plot", kind, runs_key, opts.model_dump_json(exclude={"epoch", "epochs"}))
    return await _png(request, key, draw, f"compare_{kind}.png", download)
