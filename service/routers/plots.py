"""``/runs/{id}/plots/<kind>.png`` and ``/compare/plots/<kind>.png``: the analysis plots.

One operation per kind, whose query parameters are that kind's options: one pydantic model
per kind (:data:`RUN_PLOTS`, :data:`COMPARE_PLOTS`) validates them (:func:`parse_options`:
an unknown option or a bad value is a 422 naming it) and declares them in the OpenAPI
document (:func:`query_parameters`). An unknown kind is a 404 listing the kinds. PNG bytes
are cached per (kind, run epochs, options). ``Content-Disposition`` names the file
(``curl -OJ`` saves it); ``?download=1`` makes it an attachment.
"""

from __future__ import annotations

import copy
import re
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
from service.routers import AUTH_RESPONSES, error_responses
from service.routers._results import (
    AppStoreDep,
    Rendered,
    RunEpochs,
    RunEpochsDep,
    authorized,
    cached_bytes,
    open_reader,
)
from service.routers.analysis import EPOCHS_PATTERN, parse_ints, parse_names
from service.routers.compare import RunsQuery, load_runs, readers
from service.run_labels import named_source, run_labels, run_names
from trainer.errors import BnnError
from trainer.store import RunReader, RunStore

__all__ = ["COMPARE_PLOTS", "RUN_PLOTS", "PlotOptions", "parse_options", "query_parameters"]

_PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the plot as PNG"}
}
_ERRORS = error_responses(
    (404, "unknown run or layer, an epoch that was not captured, or a run without epochs"),
    (422, "an unknown option or a bad value (the message names it and lists the options)"),
    503,
)
router = APIRouter(tags=["plots"], dependencies=[Depends(authorized)], responses=AUTH_RESPONSES)
RESERVED = frozenset({"download", "runs"})  # query parameters that are not plot options


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCH)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
# Lists come as comma-separated text (the query's form is :data:`_LIST_QUERIES`); their
# epochs and layer names are bounded by the text only: one never captured is a 404
Epochs = Annotated[
    tuple[Annotated[int, Field(ge=0)], ...], BeforeValidator(_split), Field(min_length=1)
]
Names = Annotated[
    tuple[Annotated[str, Field(min_length=1)], ...], BeforeValidator(_split), Field(min_length=1)
]
Element = Annotated[str, Field(pattern=r"^[^:,]*:[0-9]{1,10}(\.[0-9]{1,10}){0,7}$")]
Elements = Annotated[
    tuple[Element, ...], BeforeValidator(_split), Field(min_length=1, max_length=16)
]
# A list of 1 to 16 elements "layer:flat_index" or "layer:i.j" (the schema's pattern; the
# same text in Python's re and ECMA-262)
_ELEMENT = r"[^:,]{1,256}:[0-9]{1,10}(\.[0-9]{1,10}){0,7}"
PARAMS_PATTERN = rf"^{_ELEMENT}(,{_ELEMENT}){{0,15}}$"
_LIST_QUERIES: dict[str, dict[str, Any]] = {
    "epochs": {"type": "string", "maxLength": 100_000, "pattern": EPOCHS_PATTERN},
    "layers": {"type": "string", "maxLength": 10_000},
    "params": {"type": "string", "maxLength": 5_000, "pattern": PARAMS_PATTERN},
}
_EPOCHS = "epochs separated by commas or blanks; default (or blank) all captured"
_LAYERS = "comma-separated layers; default (or blank) all"
_LAYER = "one layer; default all"
_PARAM = "the layer's weights (default) or biases"


class PlotOptions(BaseModel):
    """Options every plot takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dpi: int = Field(100, ge=30, le=300, description="resolution of the PNG")


class EvolutionOptions(PlotOptions):
    """Chosen parameters' Gaussians over epochs (dark red early, neon green late)."""

    epochs: Epochs | None = Field(None, description=_EPOCHS)
    num_points: int = Field(200, ge=2, le=2000, description="points per density curve")
    dist: DistType = Field(DistType.POSTERIOR, description="posterior or the layer prior")
    params: Elements | None = Field(
        None, description="up to 16 elements layer:flat_index or layer:i.j, comma-separated; "
        "default: the top_k by criterion",
    )  # fmt: skip
    top_k: int = Field(4, ge=1, le=16, description="how many elements, without params")
    criterion: Literal["mu_change", "sigma", "gradient"] = Field(
        "mu_change", description="how the top_k are chosen, without params"
    )
    layer: Name | None = Field(None, description="choose in this layer; default all")
    param: ParamKind = Field(ParamKind.WEIGHT, description=_PARAM)


class EpochOptions(PlotOptions):
    """All distributions of each layer at one epoch: a stated subset of curves, histograms."""

    epoch: Epoch | None = Field(None, description="a captured epoch; default the latest")
    num_points: int = Field(200, ge=2, le=2000, description="points per density curve")
    alpha: float = Field(0.6, gt=0, le=1, description="opacity of the curves")
    dist: DistType = Field(DistType.POSTERIOR, description="posterior or the layer prior")
    layer: Name | None = Field(None, description=_LAYER)
    param: ParamKind = Field(ParamKind.WEIGHT, description=_PARAM)
    max_curves: int = Field(200, ge=1, le=2000, description="curves drawn per layer at most")
    bins: int = Field(100, ge=1, le=1000, description="histogram bins")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="which curves, when not all are drawn")


class BandsOptions(PlotOptions):
    """Percentile bands of mu and sigma per layer over epochs."""

    layer: Name | None = Field(None, description=_LAYER)
    param: ParamKind = Field(ParamKind.WEIGHT, description=_PARAM)
    epochs: Epochs | None = Field(None, description=_EPOCHS)
    dist: DistType = Field(DistType.POSTERIOR, description="posterior or the layer prior")


class TrajectoryOptions(PlotOptions):
    """KL over epochs (pairwise and to the prior) per layer."""

    epochs: Epochs | None = Field(None, description=_EPOCHS)
    layers: Names | None = Field(None, description=_LAYERS)


class PriorOptions(TrajectoryOptions):
    """The learned layer priors' mu and sigma over epochs."""

    param: ParamKind = Field(ParamKind.WEIGHT, description=_PARAM)


class ScaleOptions(PriorOptions):
    """Prior sigma vs posterior sigma (RMS) and RMS of the means per layer over epochs."""


class GradientOptions(PriorOptions):
    """Per-step gradient norms and per-element gradient magnitudes per layer over epochs."""

    grad_param: Literal["mu", "rho"] = Field(
        "mu", description="gradient of the posterior's mu (default) or rho"
    )
    stat: GradStat = Field(GradStat.MEAN_ABS, description="per-element |g| over the steps")


class WidthOptions(PlotOptions):
    """Learned priors against network width across runs."""

    epoch: Epoch | None = Field(None, description="a captured epoch; default each run's latest")
    param: ParamKind = Field(ParamKind.WEIGHT, description=_PARAM)


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


# ----------------------------------------------------------------------------- options
def _list_option(name: str, value: str) -> list[Any] | None:
    """A list option's text as the list (None when blank: the default); what the schema's
    :data:`_LIST_QUERIES` admits is taken (an epoch never captured is the caller's 404)."""
    if name == "epochs":
        return parse_ints(value, "epochs")
    if name == "params":
        if not re.fullmatch(PARAMS_PATTERN.strip("^$"), value):
            raise BnnError.invalid(
                f"invalid request: params: {value[:100]!r} is not 1 to 16 comma-separated "
                "elements layer:flat_index or layer:i.j",
                fields={"params": "comma-separated layer:flat_index or layer:i.j"},
            )
        return [v.strip() for v in value.split(",")]
    return parse_names(value)


def parse_options(cls: type[PlotOptions], kind: str, query: Mapping[str, list[str]]) -> PlotOptions:
    """The options of ``kind`` from the query; 422 naming an unknown or bad option."""
    fields: dict[str, str] = {}
    values: dict[str, Any] = {}
    allowed = sorted(cls.model_fields)
    for name, given in query.items():
        if name in RESERVED:
            continue
        if name not in cls.model_fields:
            fields[name] = f"unknown option for plot {kind!r}; options are {allowed}"
        elif len(given) > 1:
            fields[name] = "given more than once"
        elif name in _LIST_QUERIES:
            if len(given[0]) > _LIST_QUERIES[name]["maxLength"]:
                fields[name] = f"longer than {_LIST_QUERIES[name]['maxLength']} characters"
                continue
            items = _list_option(name, given[0])
            if items is not None:
                values[name] = items
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


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    """``node`` with every ``$ref`` to ``defs`` replaced by (a copy of) its target."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            return _inline(
                {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}, defs
            )
        return {k: _inline(v, defs) for k, v in node.items() if k != "title"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def query_parameters(cls: type[BaseModel]) -> list[dict[str, Any]]:
    """The OpenAPI query parameters of an options model: one per field, optional, with its
    type and bounds (a list as its comma-separated text), default and description."""
    schema = cls.model_json_schema()
    defs = schema.get("$defs", {})
    out = []
    for name, prop in schema["properties"].items():
        prop = _inline(prop, defs)
        description = prop.pop("description", None)
        if name in _LIST_QUERIES:
            prop = copy.deepcopy(_LIST_QUERIES[name])
        branches = [b for b in prop.pop("anyOf", ()) if b.get("type") != "null"]
        if len(branches) == 1:  # X | None: absent is the default
            prop = {**branches[0], **prop}
        if prop.get("default", 0) is None:
            del prop["default"]
        param = {"name": name, "in": "query", "required": False, "schema": prop}
        if description:
            param["description"] = description
        out.append(param)
    return out


# ----------------------------------------------------------------------------- routes
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
_INTRO = (
    "Options are query parameters (422 naming an unknown or bad one and listing the "
    "options); ``download=1``: served as an attachment."
)


def _unknown_kind(kind: str, kinds: Mapping[str, Any], where: str) -> BnnError:
    return BnnError.not_found(
        f"unknown plot kind {kind!r} for {where}; kinds are {sorted(kinds)}",
        kind=kind,
        kinds=sorted(kinds),
    )


async def run_plot(
    request: Request, kind: str, run: RunEpochs, store: RunStore, download: bool
) -> Response:
    """Plot ``kind`` of ``run`` as the request's options say."""
    spec = RUN_PLOTS[kind]
    opts = parse_options(spec.options, kind, _query(request))
    if spec.one_epoch:
        eps = [run.resolve(getattr(opts, "epoch", None))]
    else:
        eps = run.resolve_all(getattr(opts, "epochs", None))
    (name,) = await run_names(request, store, [run.run_id])  # titles name the run

    def draw() -> bytes:
        with open_reader(store, run.run_id) as reader:
            return spec.draw(named_source(reader, name), opts, eps)  # type: ignore[arg-type]

    key = ("plot", kind, run.key(eps), name, opts.model_dump_json(exclude={"epoch", "epochs"}))
    return await _png(request, key, draw, f"{run.run_id}_{kind}.png", download)


def _draw_compare(
    kind: str,
    store: RunStore,
    found: list[RunEpochs],
    opts: Any,
    eps: list[list[int]],
    labels: list[str],
) -> bytes:
    with readers(store, found) as opened:
        rs = dict(zip(labels, opened, strict=True))  # legends and titles by run name
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


async def compare_plot(
    request: Request, kind: str, store: RunStore, runs: str, download: bool
) -> Response:
    """Plot ``kind`` across the comma-separated ``runs``."""
    opts = parse_options(COMPARE_PLOTS[kind], kind, _query(request))
    found = await load_runs(request, runs)
    if kind == "width":
        eps = [[r.resolve(getattr(opts, "epoch", None))] for r in found]
    else:
        wanted = getattr(opts, "epochs", None)
        eps = [r.resolve_all(None if wanted is None else list(wanted)) for r in found]
    ids = [r.run_id for r in found]
    labels = run_labels(ids, await run_names(request, store, ids))

    def draw() -> bytes:
        return _draw_compare(kind, store, found, opts, eps, labels)

    runs_key = tuple(r.key(e) for r, e in zip(found, eps, strict=True))
    options = opts.model_dump_json(exclude={"epoch", "epochs"})
    key = ("compare_plot", kind, runs_key, tuple(labels), options)
    return await _png(request, key, draw, f"compare_{kind}.png", download)


def _add_run_plot(kind: str, options: type[PlotOptions]) -> None:
    async def endpoint(
        request: Request, run: RunEpochsDep, store: AppStoreDep, download: DownloadQuery = False
    ) -> Response:
        return await run_plot(request, kind, run, store, download)

    doc = (options.__doc__ or kind).strip()
    router.add_api_route(
        f"/runs/{{run_id}}/plots/{kind}.png",
        endpoint,
        methods=["GET"],
        name=f"run_plot_{kind}",
        response_class=Response,
        responses={**_PNG, **_ERRORS},
        summary=f"Plot of one run: {doc[0].lower()}{doc[1:].rstrip('.')}",
        description=f"{doc}\n\n{_INTRO} Epoch lists default to every captured epoch.",
        openapi_extra={"parameters": query_parameters(options)},
    )


def _add_compare_plot(kind: str, options: type[PlotOptions]) -> None:
    async def endpoint(
        request: Request, store: AppStoreDep, runs: RunsQuery, download: DownloadQuery = False
    ) -> Response:
        return await compare_plot(request, kind, store, runs, download)

    doc = (options.__doc__ or kind).strip()
    if kind != "width":
        doc = f"{doc.rstrip('.')}, every run overlaid."
    router.add_api_route(
        f"/compare/plots/{kind}.png",
        endpoint,
        methods=["GET"],
        name=f"compare_plot_{kind}",
        response_class=Response,
        responses={**_PNG, **_ERRORS},
        summary=f"Plot across runs: {doc[0].lower()}{doc[1:].rstrip('.')}",
        description=f"{doc}\n\n``runs``: 2 to 16 comma-separated run ids. {_INTRO}",
        openapi_extra={"parameters": query_parameters(options)},
    )


for _kind, _spec in RUN_PLOTS.items():
    _add_run_plot(_kind, _spec.options)
for _kind, _options in COMPARE_PLOTS.items():
    _add_compare_plot(_kind, _options)


# After the kinds' routes: any other kind is a 404 listing them (not in the schema).
@router.get("/runs/{run_id}/plots/{kind}.png", include_in_schema=False)
async def unknown_run_plot(kind: KindPath) -> Response:
    raise _unknown_kind(kind, RUN_PLOTS, "a run")


@router.get("/compare/plots/{kind}.png", include_in_schema=False)
async def unknown_compare_plot(kind: KindPath) -> Response:
    raise _unknown_kind(kind, COMPARE_PLOTS, "comparisons")
