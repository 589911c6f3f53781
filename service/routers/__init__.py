"""The API's routers (one per resource) and what they share: JSON and CSV responses.

Every table endpoint takes ``?format=csv``; :func:`table_response` renders either form.
:data:`CSV_RESPONSES` documents the CSV form in a route's ``responses``, and
:func:`complete_openapi` adds it (and the transport-level errors) to every operation of
the generated schema whatever its router declared.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Query
from fastapi.responses import JSONResponse, Response

from service.errors import json_safe
from service.schemas import NO_NUL, complete_components

__all__ = [
    "CSV_RESPONSES",
    "Format",
    "FormatQuery",
    "complete_openapi",
    "csv_response",
    "json_response",
    "table_response",
]

CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
_CSV_CONTENT = {"schema": {"type": "string"}, "example": "column_a,column_b\n1,2\n"}
# ``responses=CSV_RESPONSES`` on a route that takes FormatQuery: 200 is JSON or CSV
CSV_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the result as JSON, or as CSV with ``?format=csv``",
        "content": {"text/csv": _CSV_CONTENT},
    }
}


class Format(StrEnum):
    JSON = "json"
    CSV = "csv"


FormatQuery = Annotated[Format, Query(alias="format", description="json (default) or csv")]


def json_response(
    content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """JSON with non-finite floats spelled "nan"/"inf"/"-inf" and times in ISO 8601."""
    return JSONResponse(json_safe(content), status_code=status_code, headers=dict(headers or {}))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return json_safe(value)
    if isinstance(value, list | tuple):
        return ";".join(str(_cell(v)) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(json_safe(value), sort_keys=True)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def csv_response(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    filename: str = "table.csv",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """CSV with a header row; ``columns`` default to the keys of all rows, first seen first.

    Lists are joined with ";", dicts written as JSON, missing cells left empty.
    """
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in columns})
    disposition = {"Content-Disposition": f'inline; filename="{filename}"'}
    return Response(
        buffer.getvalue(), media_type=CSV_MEDIA_TYPE, headers={**disposition, **(headers or {})}
    )


def table_response(
    fmt: Format,
    payload: Any,
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    filename: str = "table.csv",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """``payload`` as JSON, or ``rows`` as CSV when ``fmt`` is csv."""
    if fmt is Format.CSV:
        return csv_response(rows, columns, filename, headers)
    return json_response(payload, headers=headers)


# ----------------------------------------------------------------------------- OpenAPI
_ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}
_UNPARSABLE = (
    "a request the HTTP server cannot parse (e.g. a request line or headers beyond its "
    "limits): plain text from the server, not the JSON error body"
)
# RunCreate field -> (Settings attribute, what the limit bounds)
_LIMITS = {
    "epochs": ("max_epochs", "maximum"),
    "mc_samples": ("max_mc_samples", "maximum"),
    "eval_samples": ("max_mc_samples", "maximum"),
    "val_samples": ("max_mc_samples", "maximum"),
    "laplace_examples": ("max_n_train", "maximum"),
    "batch_size": ("max_batch_size", "maximum"),
    "n_train": ("max_n_train", "maximum"),
    "n_test": ("max_n_train", "maximum"),
    "n_val": ("max_n_train", "maximum"),
    "widths": ("max_layers", "maxItems"),
}


def _deref(schema: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = schema.get("components", {}).get("schemas", {}).get(name, {})
    return node


def _enum_values(schema: dict[str, Any], node: Any) -> set[Any]:
    """The values an (optional, possibly referenced) enum parameter schema allows."""
    node = _deref(schema, node)
    if not isinstance(node, dict):
        return set()
    values = set(node.get("enum", ()))
    if "const" in node:
        values.add(node["const"])
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in node.get(key, ()):
            values |= _enum_values(schema, sub)
    return values


def _takes_csv(schema: dict[str, Any], operation: dict[str, Any]) -> bool:
    return any(
        p.get("in") == "query"
        and p.get("name") == "format"
        and "csv" in _enum_values(schema, p.get("schema"))
        for p in operation.get("parameters", ())
    )


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _limits(schema: dict[str, Any], settings: Any) -> None:
    """The service's limits on a training request (``BNN_MAX_*``) in the RunCreate schema.

    They bind runs the service trains (``execute`` true, the default): the schema says so
    with ``if execute is false then (no limits) else (limits)``.
    """
    model = schema.get("components", {}).get("schemas", {}).get("RunCreate")
    if not isinstance(model, dict) or "properties" not in model:
        return
    bounded: dict[str, Any] = {}
    lines = []
    for field, (setting, keyword) in _LIMITS.items():
        if field not in model["properties"]:
            continue
        limit = int(getattr(settings, setting))
        bounded[field] = {keyword: limit}
        if field == "widths":
            bounded[field]["items"] = {"maximum": int(settings.max_width)}
            lines.append(f"`widths`: at most {limit} layers of at most {settings.max_width}")
        else:
            lines.append(f"`{field}` <= {limit} (BNN_{setting.upper()})")
    if not bounded:
        return
    # in ``else``: only where the field is given (absent, the config's default applies)
    model["if"] = {"properties": {"execute": {"const": False}}, "required": ["execute"]}
    model["else"] = {"properties": bounded}
    note = "Limits of this service on runs it trains (`execute` true): " + "; ".join(lines)
    model["description"] = f"{model.get('description', '').rstrip()}\n\n{note}.".strip()
    # sweeps and studies always train here: their shared configuration is bounded outright
    components = schema["components"]["schemas"]
    grid = components.get("SweepSpec", {}).get("properties", {}).get("grid", {})
    widths = grid.get("properties", {}).get("widths", {}).get("items")
    if isinstance(widths, dict):
        widths["maximum"] = int(settings.max_width)
    for name, field in (("SweepSpec", "base"), ("StudySpec", "base"), ("ArmSpec", "config")):
        props = components.get(name, {}).get("properties", {}).get(field, {}).get("properties")
        for key, limit in bounded.items() if isinstance(props, dict) else ():
            if key in props:
                props[key].update(copy.deepcopy(limit))


_ARM_NAME = r"^[^/\x00]{1,100}$"


def _configs(components: dict[str, Any]) -> None:
    """The ``base`` (and arm ``config`` / ``tune``) of sweeps and studies: TrainConfig
    fields (those of RunCreate), no others, the ones a study sets itself left out."""
    run = components.get("RunCreate", {}).get("properties", {})
    if not run:
        return

    def config(*without: str) -> dict[str, Any]:
        fields = {
            k: copy.deepcopy(v) for k, v in run.items() if k not in {"execute", "run_id", *without}
        }
        return {"type": "object", "properties": fields, "additionalProperties": False}

    sweep = components.get("SweepSpec", {}).get("properties", {})
    if "base" in sweep:
        sweep["base"] = {**config(), "description": "TrainConfig fields shared by every run"}
    grid = sweep.get("grid", {}).get("properties", {})
    for factor in [f for f in grid if f != "lr" and f in run]:
        level = copy.deepcopy(run[factor])
        if factor == "widths":  # one width, given to every hidden layer
            level = {"type": "integer", "minimum": 1}
        grid[factor] = {"type": "array", "minItems": 1, "uniqueItems": True, "items": level}
    for branch in sweep.get("name", {}).get("anyOf", ()):
        if branch.get("type") == "string":
            branch["pattern"] = NO_NUL
    study = components.get("StudySpec", {}).get("properties", {})
    if "base" in study:
        base = config("seed")
        base["properties"]["tags"]["maxItems"] = int(base["properties"]["tags"]["maxItems"]) - 1
        study["base"] = {**base, "description": "TrainConfig fields shared (not seed: `seeds`)"}
    if "arms" in study:
        study["arms"].update(minProperties=1, propertyNames={"pattern": _ARM_NAME})
    if "name" in study:
        for branch in study["name"].get("anyOf", ()):
            if branch.get("type") == "string":
                branch["pattern"] = NO_NUL
    arm = components.get("ArmSpec", {}).get("properties", {})
    if "config" in arm:
        arm["config"] = {**config("seed", "name", "tags"), "description": "TrainConfig overrides"}
    if "tune" in arm:
        names = sorted(set(run) - {"execute", "run_id", "seed", "name", "tags"})
        arm["tune"] = {
            "type": "object",
            "description": "validation grid: field -> levels (full product)",
            "propertyNames": {"enum": names},
            "additionalProperties": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/components/schemas/JsonValue"},
            },
        }


def complete_openapi(schema: dict[str, Any], settings: Any = None) -> dict[str, Any]:
    """The generated schema made to say what the server does, in place:

    - ``text/csv`` on the 200 of every operation with a ``format`` query taking csv;
    - 400 (body that is not JSON) and 413 (body over ``BNN_MAX_JSON_BYTES``) with the
      error body on every operation with a JSON body;
    - 400 in plain text on every operation: requests the HTTP server cannot parse;
    - with ``settings``, the training limits in the RunCreate schema (:func:`_limits`).
    """
    for item in schema.get("paths", {}).values():
        for method, operation in item.items():
            if method not in {"get", "put", "post", "patch", "delete"}:
                continue
            responses = operation.setdefault("responses", {})
            if _takes_csv(schema, operation):
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {}).setdefault("text/csv", dict(_CSV_CONTENT))
            body = operation.get("requestBody", {}).get("content", {})
            bad = responses.setdefault("400", {"description": _UNPARSABLE, "content": {}})
            if "application/json" in body:
                bad["description"] = "a body that is not JSON (error body); or " + _UNPARSABLE
                bad.setdefault("content", {}).setdefault("application/json", {"schema": _ERROR_REF})
                responses.setdefault(
                    "413", _error("the body is over the limit (BNN_MAX_JSON_BYTES)")
                )
            bad.setdefault("content", {}).setdefault("text/plain", {"schema": {"type": "string"}})
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    complete_components(components)
    _configs(components)
    if settings is not None:
        _limits(schema, settings)
    return schema
