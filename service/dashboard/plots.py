"""The run page's plot explorer: every plot kind of ``GET /runs/{id}/plots/{kind}.png`` with
its options as form controls, built from the API's own declaration
(:data:`service.routers.plots.RUN_PLOTS`, one pydantic model of options per kind), never
from a copy of it.

Form fields are named ``<kind>.<option>`` so that the options of one kind never reach
another: the page reads only the chosen kind's fields and checks them with the API's
:func:`~service.routers.plots.parse_options` (the same 422 messages). Widgets follow the
option's type: enums and literals are menus, numbers have the model's bounds, lists are
comma-separated text; ``epoch`` lists the captured epochs and ``layer`` the run's layers.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.dashboard._common import QueryError, problems_of
from service.dashboard.render import query_url
from service.routers.plots import RUN_PLOTS, PlotOptions, parse_options
from trainer.errors import BnnError

__all__ = ["Control", "PlotForm", "chosen_plot", "plot_forms"]

GRADIENT_KINDS = frozenset({"gradients"})  # offered for runs with gradient statistics


@dataclass(frozen=True)
class Control:
    """One option of one plot kind as a form control (``id``: ``plot-<kind>-<option>``)."""

    kind: str
    name: str
    widget: Literal["select", "number", "text", "checkbox"]
    help: str
    default: str  # "" for None (the API's default)
    value: str  # what the form shows: the value asked for, else the default
    choices: list[tuple[str, str]] = field(default_factory=list)  # (value, label)
    bounds: dict[str, str] = field(default_factory=dict)  # min, max, step of numbers

    @property
    def field(self) -> str:
        return f"{self.kind}.{self.name}"

    @property
    def id(self) -> str:
        return f"plot-{self.kind}-{self.name}"


@dataclass(frozen=True)
class PlotForm:
    """A plot kind: what it draws (the options model's docstring) and its controls."""

    kind: str
    title: str
    controls: list[Control]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple | list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _inner(annotation: Any) -> tuple[Any, list[Any]]:
    """The type under ``X | None`` and ``Annotated[X, ...]``, with the Annotated metadata."""
    metadata: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, metadata
            annotation = args[0]
        elif origin is Annotated:
            annotation, *extra = get_args(annotation)
            for item in extra:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        else:
            return annotation, metadata


def _bounds(annotation: Any, metadata: Sequence[Any]) -> dict[str, str]:
    """``min``, ``max`` and ``step`` of a number input from the field's constraints."""
    bounds = {"step": "1" if annotation is int else "any"}
    for item in metadata:
        for attr, key in (("ge", "min"), ("gt", "min"), ("le", "max"), ("lt", "max")):
            if getattr(item, attr, None) is not None:
                bounds[key] = str(getattr(item, attr))
    return bounds


def control(
    kind: str,
    name: str,
    info: FieldInfo,
    value: str | None,
    epochs: Sequence[int],
    layers: Sequence[str],
) -> Control:
    """The control of option ``name`` of ``kind`` (``value``: given in the query, or None)."""
    annotation, metadata = _inner(info.annotation)
    metadata = [*info.metadata, *metadata]
    default = _text(info.default)
    help_text = info.description or ""
    shown = default if value is None else value
    args: dict[str, Any] = {"help": help_text, "default": default, "value": shown}
    if name == "epoch":
        choices = [("", "latest")] + [(str(e), str(e)) for e in epochs]
        return Control(kind, name, "select", choices=choices, **args)
    if name == "layer":
        choices = [("", "all layers" if default == "" else default)]
        return Control(kind, name, "select", choices=choices + [(n, n) for n in layers], **args)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        choices = [(str(m.value), str(m.value)) for m in annotation]
        return Control(kind, name, "select", choices=choices, **args)
    if get_origin(annotation) is Literal:
        choices = [(str(v), str(v)) for v in get_args(annotation)]
        return Control(kind, name, "select", choices=choices, **args)
    if annotation is bool:
        return Control(kind, name, "checkbox", **args)
    if annotation in (int, float):
        return Control(kind, name, "number", bounds=_bounds(annotation, metadata), **args)
    if get_origin(annotation) is tuple:
        hint = {"epochs": "all epochs", "layers": "all layers"}.get(name, "the default")
        args["help"] = f"{help_text} (comma-separated; empty: {hint})".strip()
    return Control(kind, name, "text", **args)


def _given(query: Mapping[str, list[str]], kind: str) -> dict[str, list[str]]:
    """The query's ``<kind>.<option>`` fields as ``{option: non-blank values}``."""
    prefix = f"{kind}."
    out = {}
    for key, values in query.items():
        if key.startswith(prefix):
            kept = [v for v in values if v.strip()]
            if kept:
                out[key.removeprefix(prefix)] = kept
    return out


def offered(has_gradients: bool) -> list[str]:
    """The run's plot kinds (gradient plots only for runs that captured gradients)."""
    return [k for k in RUN_PLOTS if has_gradients or k not in GRADIENT_KINDS]


def plot_forms(
    kinds: Sequence[str],
    query: Mapping[str, list[str]],
    epochs: Sequence[int],
    layers: Sequence[str],
) -> list[PlotForm]:
    """A form for each of ``kinds``, showing the values the query gives."""
    forms = []
    for kind in kinds:
        model = RUN_PLOTS[kind].options
        given = _given(query, kind)
        controls = [
            control(kind, name, info, given.get(name, [None])[0], epochs, layers)
            for name, info in model.model_fields.items()
        ]
        title = (model.__doc__ or kind).strip().splitlines()[0]
        forms.append(PlotForm(kind, title, controls))
    return forms


def is_plot_field(key: str) -> bool:
    """``<kind>.<option>``: a field of the plot explorer (for any kind)."""
    return key.partition(".")[0] in RUN_PLOTS and "." in key


def _json(value: Any) -> Any:
    """A JSON-dumped option as query text: lists comma-separated, booleans as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(str(v) for v in value) if isinstance(value, list) else value


def chosen_plot(
    run_id: str, kind: str, kinds: Sequence[str], query: Mapping[str, list[str]], epochs: list[int]
) -> str:
    """The PNG path of plot ``kind`` with the query's options (those left at their default
    left out). QueryError naming an unknown kind, or an unknown or bad option or epoch."""
    if kind not in kinds:
        raise QueryError(f"plot: unknown plot kind {kind!r} for this run; kinds are {list(kinds)}")
    try:
        opts: PlotOptions = parse_options(RUN_PLOTS[kind].options, kind, _given(query, kind))
    except BnnError as exc:
        raise QueryError(exc.message.removeprefix("invalid request: ")) from None
    except RequestValidationError as exc:
        raise QueryError("; ".join(problems_of(exc))) from None
    asked = [getattr(opts, "epoch", None), *(getattr(opts, "epochs", None) or ())]
    missing = [e for e in asked if e is not None and e not in epochs]
    if missing:
        raise QueryError(f"{kind}: no epoch {missing[0]} in this run; captured epochs: {epochs}")
    options = {k: _json(v) for k, v in _dump(opts).items()}
    return query_url(f"/runs/{run_id}/plots/{kind}.png", options)


def _dump(opts: BaseModel) -> dict[str, Any]:
    dumped: dict[str, Any] = opts.model_dump(mode="json", exclude_defaults=True)
    return dumped
