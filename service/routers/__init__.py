"""The API's routers (one per resource) and what they share: JSON and CSV responses.

Every table endpoint takes ``?format=csv``; :func:`table_response` renders either form.
"""

from __future__ import annotations

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

__all__ = ["Format", "FormatQuery", "csv_response", "json_response", "table_response"]

CSV_MEDIA_TYPE = "text/csv; charset=utf-8"


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
