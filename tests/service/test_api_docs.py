"""``/docs`` and ``/redoc`` work offline: every file they load comes from this server and
ships in the package; the vendored files are the recorded versions; the OpenAPI document
declares each operation's own errors and, with a token, its security."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from service.apidocs import ASSETS, REDOC_LOGO_STANDIN, REDOC_LOGO_URL, STATIC_DIR
from tests.service.conftest import REPO, TOKEN, ClientFactory, TestClient

PAGES = ("/docs", "/redoc")
MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


class References(HTMLParser):
    """Every URL a page loads: src and href attributes, and the OpenAPI URL it fetches."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "spec-url") and v]


def references(html: str) -> list[str]:
    parser = References()
    parser.feed(html)
    return parser.urls + re.findall(r"\burl: '([^']+)'", html)  # Swagger UI's spec URL


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_load_nothing_from_another_host(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", response.text), response.text
    urls = references(response.text)
    assert "/openapi.json" in urls
    assert {u for u in urls if u != "/openapi.json"} <= {f"/docs/assets/{n}" for n in ASSETS}
    assert len(urls) >= 2 + (page == "/docs")  # script, favicon (and the stylesheet)
    for url in urls:
        answer = client.get(url)
        assert answer.status_code == 200, url
        suffix = Path(url).suffix
        expected = MEDIA.get(suffix, "application/json")
        assert answer.headers["content-type"].startswith(expected), (url, answer.headers)
        if url.startswith("/docs/assets/"):  # as shipped (ReDoc: but for its CDN logo)
            shipped = (STATIC_DIR / Path(url).name).read_bytes()
            assert answer.content == shipped.replace(REDOC_LOGO_URL, REDOC_LOGO_STANDIN)


def test_redoc_is_served_without_its_cdn_logo(client: TestClient) -> None:
    assert REDOC_LOGO_URL in (STATIC_DIR / "redoc.standalone.js").read_bytes()  # as shipped
    served = client.get("/docs/assets/redoc.standalone.js")
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/java")
    assert b"cdn.redoc.ly" not in served.content and b"https://" in served.content


def test_swagger_ui_calls_no_online_validator(client: TestClient) -> None:
    html = client.get("/docs").text
    assert '"validatorUrl": null' in html


def test_the_pages_and_assets_need_no_token_and_follow_the_root_path(
    make_client: ClientFactory,
) -> None:
    client = make_client(api_token=TOKEN, auth_reads=True)
    assert client.get("/runs").status_code == 401
    for url in (*PAGES, *(f"/docs/assets/{n}" for n in ASSETS)):
        assert client.get(url).status_code == 200, url
    proxied = TestClient(client.app, root_path="/bnn")
    html = proxied.get("/docs").text
    assert "/bnn/docs/assets/swagger-ui-bundle.js" in html and "'/bnn/openapi.json'" in html
    assert "/bnn/docs/assets/redoc.standalone.js" in proxied.get("/redoc").text


def test_an_unknown_asset_is_a_404_listing_them(client: TestClient) -> None:
    for name in ("nope.js", "README.md", "redoc.LICENSE.txt", "%2E%2E"):
        response = client.get(f"/docs/assets/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"]["details"]["assets"] == sorted(ASSETS)
    assert client.get("/docs/assets/..%2F..%2Fapp.py").status_code == 404


def test_the_vendored_files_are_the_recorded_versions() -> None:
    readme = (STATIC_DIR / "README.md").read_text()
    recorded = dict(re.findall(r"^\| `([^`]+)` \|.*\| ([0-9a-f]{64}) \|$", readme, re.M))
    assert set(recorded) == set(ASSETS)
    for name, digest in recorded.items():
        assert hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest() == digest, name
    assert "swagger-ui-dist` | 5.35.0" in readme and "`redoc` (`bundles/`) | 2.5.4" in readme
    for licence in ("swagger-ui-dist.LICENSE.txt", "swagger-ui-dist.NOTICE.txt",
                    "redoc.LICENSE.txt", "swagger-ui-bundle.js.LICENSE.txt",
                    "redoc.standalone.js.LICENSE.txt"):  # fmt: skip
        assert (STATIC_DIR / licence).stat().st_size > 0, licence


def test_the_package_data_ships_every_file_of_the_pages() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["service.apidocs"]
    package = STATIC_DIR.parent
    files = [p.relative_to(package).as_posix() for p in STATIC_DIR.iterdir() if p.is_file()]
    assert {*ASSETS, "README.md", "redoc.LICENSE.txt"} <= {Path(f).name for f in files}
    for name in files:
        assert any(fnmatch.fnmatch(name, g) for g in globs), name


# ----------------------------------------------------------------------------- errors, auth
def _operations(client: TestClient) -> dict[str, dict]:
    paths = client.get("/openapi.json").json()["paths"]
    return {f"{m.upper()} {p}": op for p, item in paths.items() for m, op in item.items()}


def test_each_operation_declares_its_own_errors(client: TestClient) -> None:
    ops = _operations(client)

    def codes(label: str) -> set[str]:
        return {c for c in ops[label]["responses"] if c.startswith(("4", "5"))} - {"400"}

    assert codes("GET /runs/{run_id}") == {"404", "503"}  # no parameter to be invalid
    assert codes("GET /runs") == {"422", "503"}  # no run named: no 404
    assert codes("POST /runs") == {"409", "413", "415", "422", "503"}
    assert codes("DELETE /runs/{run_id}") == {"404", "409", "503"}
    assert codes("POST /runs/{run_id}/cancel") == {"404", "409", "503"}
    put = ops["PUT /runs/{run_id}/epochs/{epoch}"]["responses"]
    assert {"404", "409", "413", "415", "422", "503"} <= set(put)
    assert "BNN_MAX_UPLOAD_BYTES" in put["413"]["description"]
    assert codes("GET /runs/{run_id}/kl") == {"404", "422", "503"}
    assert codes("GET /healthz") == {"503"}
    for label, op in ops.items():
        for code, response in op["responses"].items():
            if code.startswith(("4", "5")) and code != "400":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (label, code)
                assert response["description"] not in ("", "Validation Error"), (label, code)
    assert "HTTPValidationError" not in client.get("/openapi.json").text


def test_authentication_is_declared_where_this_server_asks_for_it(
    make_client: ClientFactory,
) -> None:
    open_ops = _operations(make_client())
    assert not any("401" in op["responses"] or "security" in op for op in open_ops.values())
    writes = make_client(api_token=TOKEN)
    schema = writes.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for label, op in _operations(writes).items():
        write = not label.startswith("GET ")
        assert ("401" in op["responses"]) is write, label
        assert (op.get("security") == [{"bearer": []}]) is write, label
        assert ("403" in op["responses"]) is write, label
    reads = _operations(make_client(api_token=TOKEN, auth_reads=True))
    assert "401" in reads["GET /runs"]["responses"] and "security" in reads["GET /runs"]
    assert "401" not in reads["GET /healthz"]["responses"]  # liveness stays open


def test_run_create_states_this_servers_training_limits(make_client: ClientFactory) -> None:
    client = make_client(max_epochs=7, max_width=33, max_layers=2)
    model = client.get("/openapi.json").json()["components"]["schemas"]["RunCreate"]
    limits = model["else"]["properties"]
    assert limits["epochs"] == {"maximum": 7}
    assert limits["widths"] == {"maxItems": 2, "items": {"maximum": 33}}
    assert model["if"] == {"properties": {"execute": {"const": False}}, "required": ["execute"]}
    assert "`epochs` <= 7 (BNN_MAX_EPOCHS)" in model["description"]
    assert "at most 2 layers of at most 33" in model["description"]
