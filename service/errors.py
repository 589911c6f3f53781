"""Errors as HTTP responses: one table from codes to statuses, one JSON shape.

Every error body is ``{"error": {"code": ..., "message": ..., "details": {...}}}``.
:class:`~trainer.errors.BnnError` codes map through :data:`STATUS`; the transport-level
failures the library has no code for (bad token, body too large, unknown route, wrong
method, wrong media type) use the extra codes of the same table.

A JSON body that does not parse is a 400 naming the line and column; a body of another
media type sent to a JSON operation a 415 saying which header to send (a body without a
Content-Type is read as JSON: ``create_app`` turns FastAPI's strict check off). A path
no route has is a 404 listing the API's resources and pointing to ``/docs`` (an HTML
page for a browser, when the app gives :func:`install_error_handlers` one).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainer.errors import BnnError, ErrorCode

__all__ = [
    "STATUS",
    "BodyLimit",
    "HtmlPage",
    "LastResort",
    "Options",
    "PayloadTooLarge",
    "allowed_methods",
    "error_response",
    "install_error_handlers",
    "json_safe",
]

log = logging.getLogger("bnn.service")

# The one table: error code -> HTTP status.
STATUS: dict[str, int] = {
    ErrorCode.INVALID_ARGUMENT: 422,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.CORRUPT: 422,  # an uploaded file that fails the schema check
    ErrorCode.STORAGE: 503,
    ErrorCode.UNAVAILABLE: 503,
    "bad_request": 400,
    "unauthenticated": 401,
    "method_not_allowed": 405,
    "too_large": 413,
    "unsupported_media_type": 415,
    "internal": 500,
}
_CODE_OF_STATUS = {401: "unauthenticated", 404: "not_found", 405: "method_not_allowed"}
_CODE_OF_STATUS |= {413: "too_large", 415: "unsupported_media_type"}


def json_safe(value: Any, nan: Any = "nan") -> Any:
    """A copy JSON can hold: infinite floats as "inf"/"-inf" and NaN as ``nan`` ("nan", the
    catalog's spelling of a recorded value; None in tables, where NaN means no value)."""
    if isinstance(value, float) and not math.isfinite(value):
        return nan if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, nan) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, nan) for v in value]
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. echoed from a request
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item(), nan)
    return str(value)


def error_response(
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error body; the status comes from :data:`STATUS`."""
    body = {"error": {"code": str(code), "message": message, "details": json_safe(details or {})}}
    return JSONResponse(body, status_code=STATUS.get(str(code), 500), headers=dict(headers or {}))


class PayloadTooLarge(StarletteHTTPException):
    """A request body longer than its limit (raised while the body is read).

    An HTTPException, so that FastAPI's body parsing passes it on untouched.
    """

    def __init__(self, limit: int, setting: str, size: int | None = None) -> None:
        got = "the body" if size is None else f"the body's {size} bytes"
        message = f"request body too large: {got} exceed the limit of {limit} bytes ({setting})"
        super().__init__(413, message, headers={"Connection": "close"})
        self.limit, self.setting, self.size = limit, setting, size


async def _bnn_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BnnError)
    return error_response(exc.code, exc.message, exc.details)


def _json_syntax_error(exc: RequestValidationError, err: Mapping[str, Any]) -> JSONResponse:
    """400 for a body that is not JSON: what is wrong, at which line and column."""
    loc = tuple(err.get("loc", ()))
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
    doc = exc.body if isinstance(exc.body, str) else ""
    line = doc.count("\n", 0, pos) + 1
    column = pos - doc.rfind("\n", 0, pos)
    what = str((err.get("ctx") or {}).get("error", "JSON decode error"))
    return error_response(
        "bad_request",
        f"invalid JSON at line {line}, column {column}: {what}",
        {"line": line, "column": column, "position": pos, "error": what},
    )


def _not_json(request: Request) -> JSONResponse:
    """415 for a body of another media type sent to an operation that takes JSON."""
    given = request.headers.get("content-type", "")
    hint = " (curl's default for -d)" if given.startswith("application/x-www-form-") else ""
    return error_response(
        "unsupported_media_type",
        f"the body must be JSON, sent with 'Content-Type: application/json'; got "
        f"Content-Type {given[:100]!r}{hint}",
        {"content_type": given[:100], "expected": "application/json"},
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    for err in errors:
        if err.get("type") == "json_invalid":
            return _json_syntax_error(exc, err)
        if tuple(err.get("loc", ())) == ("body",) and isinstance(err.get("input"), bytes):
            return _not_json(request)  # FastAPI hands the raw bytes of non-JSON media types
    fields: dict[str, str] = {}
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        where = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if "input" in err and err.get("type") not in ("missing", "json_invalid"):
            given = repr(err["input"])
            msg = f"{msg} (got {given[:200]})" if "got" not in msg else msg
        fields[where or "body"] = msg
    text = "; ".join(f"{k}: {v}" for k, v in fields.items())
    return error_response(
        ErrorCode.INVALID_ARGUMENT, f"invalid request: {text}", {"fields": fields}
    )


def allowed_methods(routes: Sequence[BaseRoute], scope: Scope) -> list[str]:
    """Every method some route serves at this request's path, and OPTIONS (which
    :class:`Options` answers), in a fixed order; empty when no route has the path."""
    methods: set[str] = set()
    probe = {**scope, "method": "GET"}
    stack = list(routes)
    while stack:
        route = stack.pop()
        included = getattr(route, "original_router", None)  # FastAPI's include_router
        if included is not None:
            stack.extend(included.routes)
            continue
        if getattr(route, "methods", None) and route.matches(probe)[0] is not Match.NONE:
            methods |= set(route.methods)  # type: ignore[attr-defined]
    if not methods:
        return []
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods | {"OPTIONS"}, key=lambda m: (order.index(m) if m in order else 99, m))


# (request, message) -> an HTML error page for a browser (the dashboard's)
HtmlPage = Callable[[Request, str], Response]
DOCS = {"docs": "/docs", "redoc": "/redoc", "openapi": "/openapi.json", "dashboard": "/"}


def _api_paths(routes: Sequence[BaseRoute]) -> list[str]:
    """The paths of the routes in the OpenAPI document, in order, each once."""
    paths: list[str] = []
    stack = list(reversed(routes))
    while stack:
        route = stack.pop()
        included = getattr(route, "original_router", None)
        if included is not None:
            stack.extend(reversed(included.routes))
        elif isinstance(route, Route) and getattr(route, "include_in_schema", False):
            paths.append(route.path)
    return list(dict.fromkeys(paths))


def _wants_html(request: Request) -> bool:
    """A browser navigating (``Accept`` names text/html), not an API client (``*/*``)."""
    return "text/html" in request.headers.get("accept", "")


def _unknown_path(request: Request, html: HtmlPage | None) -> Response:
    """404 for a path no route has: the API's resources, the closest one, ``/docs``."""
    root = request.scope.get("root_path", "")
    path = request.url.path.removeprefix(root) or "/"
    paths = _api_paths(request.app.router.routes)
    resources = list(dict.fromkeys("/" + p.split("/")[1] for p in paths))
    first = "/" + path.split("/")[1]
    under = [p for p in paths if p == first or p.startswith(first + "/")]
    close = [] if under else difflib.get_close_matches(first, resources, n=1, cutoff=0.6)
    lead = f"no route at {path!r}" + (f"; did you mean {root}{close[0]}?" if close else ".")
    listing = ", ".join(root + r for r in resources)
    message = (
        f"{lead} The API's resources are {listing}; every operation is listed at {root}/docs "
        f"(OpenAPI: {root}/openapi.json), the dashboard is at {root}/"
    )
    if html is not None and _wants_html(request):
        response = html(request, message)
        response.status_code = 404
        return response
    details = {"path": path, "resources": resources, **DOCS}
    if under:
        details["operations"] = under
    return error_response(ErrorCode.NOT_FOUND, message, details)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and not allowed_methods(request.app.router.routes, request.scope):
        return _unknown_path(request, getattr(request.app.state, "html_error_page", None))
    code = _CODE_OF_STATUS.get(
        exc.status_code, "bad_request" if exc.status_code < 500 else "internal"
    )
    headers = dict(exc.headers or {})
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):  # FastAPI's body read
        message = (
            f"invalid JSON: the body is not text in {cause.encoding.upper()} ({cause.reason} "
            f"at byte {cause.start}); send JSON as UTF-8"
        )
        return error_response("bad_request", message, {"position": cause.start})
    if exc.status_code == 405:  # Starlette names the first matching route's methods only
        allow = allowed_methods(request.app.router.routes, request.scope)
        if allow:
            headers["Allow"] = ", ".join(allow)
    response = error_response(code, str(exc.detail), headers=headers)
    response.status_code = exc.status_code
    return response


async def _too_large(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PayloadTooLarge)
    details = {"limit": exc.limit, "setting": exc.setting, "size": exc.size}
    return error_response("too_large", str(exc.detail), details, {"Connection": "close"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response("internal", f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI, html_page: HtmlPage | None = None) -> None:
    """The handlers of every error; ``html_page`` draws the 404 of an unknown path for a
    browser (JSON for everyone else, and for every other error)."""
    app.state.html_error_page = html_page
    app.add_exception_handler(BnnError, _bnn_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(PayloadTooLarge, _too_large)
    app.add_exception_handler(Exception, _unexpected)


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``json_limit`` (``upload_limit`` for PUT).

    A declared Content-Length over the limit is refused before anything is read; a body
    without one raises :class:`PayloadTooLarge` as soon as it grows past the limit.
    """

    def __init__(self, app: ASGIApp, json_limit: int, upload_limit: int) -> None:
        self.app, self.json_limit, self.upload_limit = app, json_limit, upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "PUT"
        limit = self.upload_limit if upload else self.json_limit
        setting = "BNN_MAX_UPLOAD_BYTES" if upload else "BNN_MAX_JSON_BYTES"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            exc = PayloadTooLarge(limit, setting, int(declared))
            details = {"limit": limit, "setting": setting, "size": exc.size}
            response = error_response(
                "too_large", str(exc.detail), details, {"Connection": "close"}
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(limit, setting)
            return message

        await self.app(scope, limited, send)


class Options:
    """ASGI middleware: ``OPTIONS`` on a path the API serves is 204 with an ``Allow`` header
    listing every method of that path (no authentication: it discloses only the schema);
    on an unknown path it goes on to the 404."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            router = getattr(scope.get("app"), "router", None)
            allow = allowed_methods(router.routes, scope) if router is not None else []
            if allow:
                await Response(status_code=204, headers={"Allow": ", ".join(allow)})(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


class LastResort:
    """ASGI middleware: an exception nothing else handled becomes a 500 with the JSON error
    body, logged with its traceback, and is not raised further, so that the server keeps
    the connection open (uvicorn closes it on an exception from the application).

    Only for what slipped through: every error the service knows of has its own status.
    After the response has started nothing can be sent: the exception goes on to the server.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            if started:
                raise
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            response = error_response("internal", f"internal error: {type(exc).__name__}")
            await response(scope, receive, send)
