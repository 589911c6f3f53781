"""``/ui/login`` and ``/ui/logout``: the dashboard's login when ``BNN_API_TOKEN`` is set.

Logging in with the token sets the cookie :data:`~service.deps.SESSION_COOKIE` (http-only,
SameSite=Strict, ``Secure`` over HTTPS; an expiry and an HMAC keyed by the token, never the
token itself), which :func:`~service.deps.require_token` takes like the Bearer header. A
write it authorises must also carry ``X-BNN-CSRF`` from a page of this origin (the
dashboard's script sends it), so another site cannot make a logged-in browser change runs.
The forms here are posted from this site's pages too: another ``Origin`` is a 403.
"""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.dashboard._common import error_page, render_page, root_of
from service.deps import SESSION_COOKIE, SESSION_S, same_origin, session_value
from service.settings import Settings

__all__ = ["router", "safe_next"]

router = APIRouter(include_in_schema=False)
FORM = "application/x-www-form-urlencoded"


def safe_next(value: str | None, root: str) -> str:
    """Where to go after logging in: a path on this site, else the runs page (a login link
    must not send anyone elsewhere)."""
    if (
        value
        and value.startswith("/")
        and not value.startswith("//")
        and "\\" not in value
        and value.isprintable()
        and len(value) <= 2000
    ):
        return value
    return f"{root}/"


def _refused(request: Request) -> Response | None:
    if not same_origin(request):
        return error_page(request, 403, "Forbidden", "this form must be sent from this site")
    return None


@router.get("/ui/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    """The login form (or, without a token configured, a page saying none is needed)."""
    back = safe_next(request.query_params.get("next"), root_of(request))
    return render_page(request, "login.html", next=back, error=None)


@router.post("/ui/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Checks the posted ``token``: 303 to ``next`` with the login cookie, or the form again
    (401 wrong token); 409 when no token is configured, 415 for a body that is not a form."""
    settings: Settings = request.app.state.settings
    token = settings.token
    if token is None:
        message = "this service has no API token (BNN_API_TOKEN): there is nothing to log in to"
        return error_page(request, 409, "Conflict", message)
    refused = _refused(request)
    if refused is not None:
        return refused
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != FORM:
        return error_page(request, 415, "Unsupported media type", f"send the form as {FORM}")
    try:
        body = (await request.body()).decode("utf-8", "replace")
        form = parse_qs(body, keep_blank_values=True, max_num_fields=8)
    except ValueError as exc:
        return error_page(request, 422, "Bad request", f"bad form: {exc}")
    back = safe_next(form.get("next", [""])[0], root_of(request))
    given = form.get("token", [""])[0]
    if not secrets.compare_digest(given.strip().encode(), token.encode()):
        return render_page(request, "login.html", 401, next=back, error="wrong token")
    response = RedirectResponse(back, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_value(token),
        max_age=SESSION_S,
        path=f"{root_of(request)}/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/ui/logout")
def logout(request: Request) -> Response:
    """Removes the login cookie; 303 to the runs page."""
    refused = _refused(request)
    if refused is not None:
        return refused
    root = root_of(request)
    response = RedirectResponse(f"{root}/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=f"{root}/", httponly=True, samesite="strict")
    return response
