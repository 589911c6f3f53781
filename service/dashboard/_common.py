"""What every dashboard page shares: query parsing, the HTML responses (pages and error
pages), authentication as pages answer it, and the result cache.

A page checks the token itself (:func:`guarded`), so that a missing login is an HTML page
with a link to ``/ui/login`` rather than the API's JSON 401.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ValidationError

from service.dashboard.render import templates
from service.deps import SESSION_COOKIE, require_token, valid_session
from service.errors import STATUS
from service.routers._results import result_cache
from service.settings import Settings
from trainer.errors import BnnError
from trainer.store import EpochInfo

__all__ = [
    "QueryError",
    "auth_state",
    "cached",
    "error_page",
    "guarded",
    "parse_query",
    "problems_of",
    "render_page",
    "root_of",
    "series_of",
]


class QueryError(Exception):
    """A bad query value: the page answers 422 with ``message``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


M = TypeVar("M", bound=BaseModel)


def problems_of(exc: ValidationError | RequestValidationError) -> list[str]:
    """``where: message (got value)`` for each error of a pydantic validation."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p not in ("query", "body")]
        out.append(f"{'.'.join(loc)}: {err['msg']} (got {err.get('input')!r:.100})")
    return out


def parse_query(
    request: Request,
    model: type[M],
    multi: Sequence[str] = (),
    skip: Callable[[str], bool] = lambda key: False,
) -> M:
    """The request's query as ``model`` (keys for which ``skip`` is true left out); blank
    values count as not given. QueryError naming each unknown, repeated or bad parameter."""
    params = request.query_params
    data: dict[str, Any] = {}
    problems: list[str] = []
    for key in params.keys():  # noqa: SIM118 - a multi-dict: keys once each
        if skip(key):
            continue
        values = [v for v in params.getlist(key) if v.strip()]
        if key not in model.model_fields:
            known = sorted(model.model_fields)
            problems.append(f"{key}: unknown query parameter; known are {known}")
        elif key in multi:
            data[key] = values
        elif len(values) > 1:
            problems.append(f"{key}: given more than once")
        elif values:
            data[key] = values[0]
    if not problems:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            problems = problems_of(exc)
    raise QueryError("; ".join(problems))


def series_of(epochs: Sequence[EpochInfo]) -> dict[str, list[tuple[int, Any]]]:
    """Each metric over the epochs: name -> [(epoch, value)], names first seen first."""
    names = dict.fromkeys(k for e in epochs for k in e.metrics)
    return {n: [(e.epoch, e.metrics[n]) for e in epochs if n in e.metrics] for n in names}


def root_of(request: Request) -> str:
    """Where the app is mounted ("" at the server's root)."""
    return str(request.scope.get("root_path", ""))


def auth_state(request: Request) -> dict[str, bool]:
    """``on``: the service has a token (pages that change state need a login);
    ``logged_in``: this request carries a valid login cookie."""
    settings: Settings = request.app.state.settings
    token = settings.token
    logged_in = token is not None and valid_session(token, request.cookies.get(SESSION_COOKIE))
    return {"on": token is not None, "logged_in": logged_in}


def render_page(
    request: Request, name: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    """The template ``name`` with ``root``, ``auth`` and ``here`` (this page's path and
    query, the login form's way back) besides ``context``."""
    root = root_of(request)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return templates.TemplateResponse(
        request,
        name,
        {"root": root, "auth": auth_state(request), "here": here, **context},
        status_code=status_code,
    )


def error_page(
    request: Request,
    status_code: int,
    title: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """The HTML error page (401 without login, 404 unknown run, 422 bad query value, ...)."""
    response = render_page(
        request, "error.html", status_code, title=title, message=message, code=status_code
    )
    response.headers.update(headers or {})
    return response


_TITLES = {401: "Log in", 403: "Forbidden", 404: "Not found", 409: "Conflict", 422: "Bad request"}


def guarded(request: Request, make: Callable[[], Response]) -> Response:
    """``make()`` once the request may read (the token, as :func:`require_token` says),
    with a missing login, a bad query and the library's errors as HTML error pages."""
    try:
        require_token(request, request.app.state.settings)
        return make()
    except HTTPException as exc:
        title = _TITLES.get(exc.status_code, "Error")
        return error_page(request, exc.status_code, title, str(exc.detail), exc.headers)
    except QueryError as exc:
        return error_page(request, 422, "Bad query", exc.message)
    except BnnError as exc:
        status = STATUS.get(str(exc.code), 500)
        return error_page(request, status, _TITLES.get(status, "Error"), exc.message)


T = TypeVar("T")


def cached(request: Request, key: Hashable, compute: Callable[[], tuple[T, int]]) -> T:
    """``compute()`` -> (value, bytes to account for) through the service's result cache,
    under ``("dashboard", key)``. Keys must name each epoch by its checksum (a committed
    epoch never changes)."""
    value: T = result_cache(request).get_or_compute(("dashboard", key), compute)
    return value
