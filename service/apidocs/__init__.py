"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) from files shipped in this package.

    app = FastAPI(docs_url=None, redoc_url=None)
    app.include_router(apidocs.router)        # what service.app.create_app does

FastAPI's own pages load Swagger UI and ReDoc from a CDN, and are blank without internet
access; these pages load them from ``/docs/assets/<file>`` (:data:`ASSETS`; versions,
licences and hashes in ``static/README.md``). Nothing on them comes from another host:
Swagger UI's online validator is off, ReDoc uses the browser's fonts. No authentication
(the pages and ``/openapi.json`` disclose only the schema).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from trainer.errors import BnnError

__all__ = ["ASSETS", "ASSET_PATH", "STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSET_PATH = "/docs/assets"
# file -> media type; the files are swagger-ui-dist 5.35.0 and redoc 2.5.4, unmodified
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
}
_CACHE = {"Cache-Control": "public, max-age=86400"}
# Swagger UI: no calls to validator.swagger.io; the bearer token kept across page loads
_SWAGGER_PARAMETERS = {"validatorUrl": None, "persistAuthorization": True}

router = APIRouter(include_in_schema=False)


def _asset(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{ASSET_PATH}/{name}"


def _openapi_url(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}{request.app.openapi_url}"


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI on this service's OpenAPI document ("Try it out" sends real requests)."""
    return get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=_asset(request, "swagger-ui-bundle.js"),
        swagger_css_url=_asset(request, "swagger-ui.css"),
        swagger_favicon_url=_asset(request, "favicon-32x32.png"),
        oauth2_redirect_url=None,
        swagger_ui_parameters=_SWAGGER_PARAMETERS,
    )


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """ReDoc on this service's OpenAPI document."""
    return get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=_asset(request, "redoc.standalone.js"),
        redoc_favicon_url=_asset(request, "favicon-32x32.png"),
        with_google_fonts=False,
    )


@router.get(ASSET_PATH + "/{name}")
def asset(name: Annotated[str, PathParam(max_length=64)]) -> Response:
    """One of :data:`ASSETS` (404 naming the others)."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise BnnError.not_found(
            f"no documentation asset {name!r}; assets are {sorted(ASSETS)}",
            asset=name,
            assets=sorted(ASSETS),
        )
    if name == "redoc.standalone.js":
        return Response(_redoc_js(), media_type=media_type, headers=_CACHE)
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_CACHE)


# ReDoc's sidebar footer shows Redocly's logo from their CDN, with no option to turn it
# off: served with that one URL pointing at an empty inline SVG, so the page makes no
# request outside this server (the file on disk stays as shipped; README's sha256 holds)
REDOC_LOGO_URL = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
REDOC_LOGO_STANDIN = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


@cache
def _redoc_js() -> bytes:
    shipped = (STATIC_DIR / "redoc.standalone.js").read_bytes()
    return shipped.replace(REDOC_LOGO_URL, REDOC_LOGO_STANDIN)
