"""Dependencies of the routers, as ``Annotated`` aliases (one place for all of them).

def get_run(run: RunDep) -> ...        # the run, or 404 naming the id
def list_runs(store: StoreDep) -> ...  # the open RunStore

Authentication (:func:`require_token`): ``Authorization: Bearer <BNN_API_TOKEN>``, or the
dashboard's login cookie, whose writes must also pass :func:`check_csrf`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Path, Request

from service.jobs import JobRunner
from service.settings import Settings
from trainer.store import RunInfo, RunStore

__all__ = [
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "SESSION_S",
    "EpochPath",
    "JobsDep",
    "RunDep",
    "SettingsDep",
    "StoreDep",
    "check_csrf",
    "get_jobs",
    "get_settings",
    "get_store",
    "load_run",
    "require_token",
    "same_origin",
    "session_value",
    "valid_session",
]

_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_EPOCH = 2**31 - 1


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> RunStore:
    store: RunStore = request.app.state.store
    return store


def get_jobs(request: Request) -> JobRunner:
    jobs: JobRunner = request.app.state.jobs
    return jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[RunStore, Depends(get_store)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]


# ----------------------------------------------------------------------------- authentication
SESSION_COOKIE = "bnn_session"  # the dashboard's login (``/ui/login``): http-only, SameSite=Strict
SESSION_S = 12 * 3600  # how long a login lasts
CSRF_HEADER = "X-BNN-CSRF"  # what the dashboard's fetch sends with writes the cookie authorises
_SESSION = re.compile(r"([0-9]{1,12})\.([0-9a-f]{64})")


def _signature(token: str, expires: int) -> str:
    return hmac.new(token.encode(), f"bnn-session:{expires}".encode(), hashlib.sha256).hexdigest()


def session_value(token: str, now: float | None = None) -> str:
    """The login cookie: its expiry (Unix seconds) and an HMAC of it keyed by the token.

    The token itself never travels in a cookie; a new token ends every login.
    """
    expires = int(time.time() if now is None else now) + SESSION_S
    return f"{expires}.{_signature(token, expires)}"


def valid_session(token: str, value: str | None, now: float | None = None) -> bool:
    """``value`` is a login cookie of ``token`` that has not expired."""
    found = _SESSION.fullmatch(value or "")
    if found is None or int(found.group(1)) < (time.time() if now is None else now):
        return False
    expected = _signature(token, int(found.group(1)))
    return hmac.compare_digest(found.group(2).encode(), expected.encode())


def same_origin(request: Request) -> bool:
    """The request's ``Origin`` (or, without one, ``Referer``) names this server's host,
    or the request has neither (not from a browser page)."""
    given = request.headers.get("origin") or request.headers.get("referer")
    if given is None:
        return True
    return urlsplit(given).netloc.lower() == request.headers.get("host", "").lower()


def check_csrf(request: Request) -> None:
    """403 unless a write authorised by the login cookie carries ``X-BNN-CSRF`` (which a
    page of another site cannot send without a CORS preflight this service never allows)
    and comes from this origin."""
    if not request.headers.get(CSRF_HEADER):
        raise HTTPException(
            403,
            f"a write authorised by the login cookie needs the {CSRF_HEADER} header (the "
            "dashboard sends it); scripts use 'Authorization: Bearer <token>'",
        )
    if not same_origin(request):
        raise HTTPException(
            403, "a write authorised by the login cookie must come from this site's pages"
        )


def require_token(request: Request, settings: SettingsDep) -> None:
    """401 unless the request carries ``Authorization: Bearer <BNN_API_TOKEN>`` or, without
    that header, a valid login cookie (then writes also need :func:`check_csrf`: 403).

    Only writes need it, and reads too when ``BNN_AUTH_READS`` is set; no token configured
    means no authentication.
    """
    token = settings.token
    write = request.method in _WRITES
    if token is None or (not write and not settings.auth_reads):
        return
    header = request.headers.get("authorization")
    cookie = request.cookies.get(SESSION_COOKIE)
    if header is None and cookie is not None:
        if not valid_session(token, cookie):
            raise HTTPException(
                401,
                "the login cookie has expired or is not valid: log in again at /ui/login",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if write:
            check_csrf(request)
        return
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), token.encode()
    ):
        what = "a missing" if not given else "a wrong"
        raise HTTPException(
            401,
            f"this request needs 'Authorization: Bearer <token>' (BNN_API_TOKEN); got {what} token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def load_run(run_id: str, store: StoreDep) -> RunInfo:
    """The run ``run_id`` (after stale runs are reaped); 404 naming it when unknown."""
    return store.get_run(run_id)


RunDep = Annotated[RunInfo, Depends(load_run)]
EpochPath = Annotated[int, Path(ge=0, le=MAX_EPOCH, description="a captured epoch")]
