"""The API's routers (one per resource) and what they share: JSON and CSV responses.

Every table endpoint takes ``?format=csv``; :func:`table_response` renders either form.
:data:`CSV_RESPONSES` documents the CSV form in a route's ``responses``, and
:func:`complete_openapi` adds it (and the transport-level errors) to every operation of
the generated schema whatever its router declared. Each route declares the errors it
answers with :func:`error_responses`; routers that check the token declare 401
(:data:`AUTH_RESPONSES`), which :func:`complete_openapi` keeps where this server's
settings ask for a token.
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
from service.schemas import NO_NUL, ErrorOut, complete_components
from trainer.config import CONFIG_RULES, Optimizer, available_devices

__all__ = [
    "AUTH_RESPONSES",
    "CSV_RESPONSES",
    "Format",
    "FormatQuery",
    "complete_openapi",
    "csv_response",
    "error_responses",
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


# What each error status means, as a route's ``responses`` say it (error_responses)
ERROR_TEXT: dict[int, str] = {
    401: "no `Authorization: Bearer <token>` header, or a wrong token (BNN_API_TOKEN)",
    403: "a write authorised by the dashboard's login cookie without the X-BNN-CSRF header, "
    "or from a page of another site",
    404: "not found: the message names what (a run, an epoch, a layer, ...)",
    409: "the resource's state forbids it: the message says which",
    413: "the body is over its limit",
    415: "the body is not of the media type this operation takes",
    422: "an invalid parameter or body: the message and `details.fields` name each",
    503: "the catalog or the run store is unavailable (retry later)",
}


def error_responses(*codes: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the error body under each status, described by
    :data:`ERROR_TEXT` or by the text given with it, e.g. ``(404, "unknown run")``."""
    out: dict[int | str, dict[str, Any]] = {}
    for item in codes:
        code, text = item if isinstance(item, tuple) else (item, ERROR_TEXT[item])
        out[code] = {"model": ErrorOut, "description": text}
    return out


# ``responses=`` of a router whose routes check the token (complete_openapi keeps it
# where these settings ask for one)
AUTH_RESPONSES = error_responses(401)


class Format(StrEnum):
    JSON = "json"
    CSV = "csv"


FormatQuery = Annotated[Format, Query(alias="format", description="json (default) or csv")]


def json_response(
    content: Any,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    nan: Any = "nan",
) -> JSONResponse:
    """JSON with infinite floats spelled "inf"/"-inf", NaN as ``nan`` ("nan"; None in
    analysis tables, where NaN means no value) and times in ISO 8601."""
    body = json_safe(content, nan)
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


def _cell(value: Any, nan: str = "nan") -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return json_safe(value, nan)
    if isinstance(value, list | tuple):
        return ";".join(str(_cell(v, nan)) for v in value)
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
    nan: str = "nan",
) -> Response:
    """CSV with a header row; ``columns`` default to the keys of all rows, first seen first.

    Lists are joined with ";", dicts written as JSON, missing cells left empty, NaN written
    as ``nan`` ("nan"; "" in analysis tables, where NaN means no value).
    """
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key), nan) for key in columns})
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
    if "device" in model["properties"] and not settings.dask_scheduler:
        # the LocalCluster's workers run on this machine: the devices it has (a remote
        # scheduler's workers check theirs when a job starts; the run fails at once)
        devices = available_devices()
        bounded["device"] = {"enum": devices}
        lines.append(f"`device` one of this machine's: {', '.join(devices)}")
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
    tune = components.get("ArmSpec", {}).get("properties", {}).get("tune", {})
    for key, limit in bounded.items():  # every level of a tuned field
        levels = tune.get("properties", {}).get(key)
        if isinstance(levels, dict) and isinstance(levels.get("items"), dict):
            levels["items"].update(copy.deepcopy(limit))
    study = components.get("StudySpec", {}).get("properties", {})
    for branch in study.get("tune_epochs", {}).get("anyOf", ()):
        if branch.get("type") == "integer":
            branch["maximum"] = int(settings.max_epochs)


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
        sweep["base"] = {
            **config(),
            "description": "TrainConfig fields shared by every run",
            "allOf": copy.deepcopy(CONFIG_RULES),
        }
    grid = sweep.get("grid", {}).get("properties", {})
    lr = next((b for b in run.get("lr", {}).get("anyOf", ()) if b.get("type") == "number"), None)
    if "lr" in grid and lr is not None:  # {optimizer: lr}, each a valid lr
        grid["lr"] = {
            "type": "object",
            "description": "optimizer -> learning rate (default: base.lr when given, "
            "else the dataset's, x10 for sgd)",
            "propertyNames": {"enum": [o.value for o in Optimizer]},
            "additionalProperties": copy.deepcopy(lr),
        }
    for factor in [f for f in grid if f != "lr" and f in run]:
        level = copy.deepcopy(run[factor])
        if factor == "widths":  # one width, given to every hidden layer
            level = {"type": "integer", "minimum": 1}
        if factor == "kl_anneal_epochs":  # null: the default "on" level
            level = {
                "anyOf": [level, {"type": "null"}],
                "description": "epochs of KL warm-up; null: a quarter of the epochs (>= 1)",
            }
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
        arm["tune"] = {  # each field's levels: values of that field
            "type": "object",
            "description": "validation grid: field -> levels (full product)",
            "properties": {
                name: {"type": "array", "minItems": 1, "items": copy.deepcopy(run[name])}
                for name in names
            },
            "additionalProperties": False,
        }


BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "the service's BNN_API_TOKEN: `Authorization: Bearer <token>`",
}


def _auth(operation: dict[str, Any], method: str, settings: Any) -> bool:
    """Whether this server asks ``operation`` (one that declares 401) for the token: writes
    when BNN_API_TOKEN is set, reads too with BNN_AUTH_READS. Where it does, the bearer
    scheme and 403 (writes: the login cookie's CSRF check); where not, no 401."""
    responses = operation["responses"]
    write = method != "get"
    if getattr(settings, "token", None) is None or not (write or settings.auth_reads):
        del responses["401"]
        return False
    operation["security"] = [{"bearer": []}]
    if write:
        responses.setdefault("403", _error(ERROR_TEXT[403]))
    return True


def _generated_422(response: Any) -> bool:
    """FastAPI's own 422 (``HTTPValidationError``, a body this service never sends), which
    it adds to every operation with parameters that does not declare a 422."""
    content = (response or {}).get("content", {}).get("application/json", {})
    return str(content.get("schema", {}).get("$ref", "")).endswith("/HTTPValidationError")


def complete_openapi(schema: dict[str, Any], settings: Any = None) -> dict[str, Any]:
    """The generated schema made to say what the server does, in place:

    - ``text/csv`` on the 200 of every operation with a ``format`` query taking csv;
    - 400 (body that is not JSON), 413 (body over ``BNN_MAX_JSON_BYTES``) and 415 (body
      of another media type) with the error body on every operation with a JSON body;
    - 400 in plain text on every operation: requests the HTTP server cannot parse;
    - no 422 of FastAPI's shape: the routes that answer 422 declare it (the error body);
    - with ``settings``: 401 (declared by routers that check the token) only where these
      settings ask for a token, with the bearer security scheme (:func:`_auth`), and the
      training limits in the RunCreate schema (:func:`_limits`).
    """
    secured = False
    for item in schema.get("paths", {}).values():
        for method, operation in item.items():
            if method not in {"get", "put", "post", "patch", "delete"}:
                continue
            responses = operation.setdefault("responses", {})
            if _generated_422(responses.get("422")):  # routes that answer 422 declare it
                del responses["422"]
            if settings is not None and "401" in responses:
                secured = _auth(operation, method, settings) or secured
            if _takes_csv(schema, operation):
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {}).setdefault("text/csv", dict(_CSV_CONTENT))
            body = operation.get("requestBody", {}).get("content", {})
            bad = responses.setdefault("400", {"description": _UNPARSABLE, "content": {}})
            if "application/json" in body:
                bad["description"] = (
                    "a body that is not JSON (error body: the message names the line and "
                    "column); or " + _UNPARSABLE
                )
                bad.setdefault("content", {}).setdefault("application/json", {"schema": _ERROR_REF})
                responses.setdefault(
                    "413", _error("the body is over the limit (BNN_MAX_JSON_BYTES)")
                )
                responses.setdefault(
                    "415",
                    _error(
                        "a body sent with another Content-Type than application/json (a body "
                        "without one is read as JSON)"
                    ),
                )
            bad.setdefault("content", {}).setdefault("text/plain", {"schema": {"type": "string"}})
    if secured:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = dict(BEARER)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, never sent
        if name in components and f'/{name}"' not in json.dumps(schema["paths"]):
            del components[name]
    complete_components(components)
    _configs(components)
    if settings is not None:
        _limits(schema, settings)
    return schema
