"""Errors that are not about a resource: a path no route has (JSON for API clients, the
dashboard's HTML page for a browser), non-UTF-8 bodies."""

from __future__ import annotations

import pytest

from tests.service.conftest import TestClient

RESOURCES = ["/runs", "/compare", "/sweeps", "/studies", "/healthz"]


@pytest.mark.parametrize(
    ("path", "guess"),
    [("/nowhere", None), ("/run", "/runs"), ("/compre/kl", "/compare"), ("/a/b/c", None)],
)
def test_an_unknown_path_says_what_exists(client: TestClient, path: str, guess: str | None) -> None:
    for method in ("GET", "POST", "DELETE"):
        response = client.request(method, path)
        assert response.status_code == 404, method
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == "not_found"
        details = error["details"]
        assert details["path"] == path and details["resources"] == RESOURCES
        assert (details["docs"], details["openapi"], details["dashboard"]) == (
            "/docs",
            "/openapi.json",
            "/",
        )
        assert f"no route at {path!r}" in error["message"]
        assert "/docs" in error["message"] and "/runs" in error["message"]
        assert (f"did you mean {guess}?" in error["message"]) is (guess is not None)


def test_an_unknown_path_under_a_resource_lists_its_operations(client: TestClient) -> None:
    error = client.get("/runs/abc/statz").json()["error"]
    operations = error["details"]["operations"]
    assert "/runs/{run_id}/stats" in operations and "/runs/{run_id}/plots/kl.png" in operations
    assert all(op.startswith("/runs") for op in operations)
    assert "did you mean" not in error["message"]


def test_a_browser_gets_the_dashboards_html_page(client: TestClient) -> None:
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    response = client.get("/run", headers={"Accept": accept})
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "did you mean /runs?" in response.text and "/docs" in response.text
    assert 'id="error-message"' in response.text
    api = client.get("/run", headers={"Accept": "*/*"})
    assert api.headers["content-type"] == "application/json"


def test_a_known_route_keeps_its_own_404(client: TestClient) -> None:
    error = client.get("/runs/nope").json()["error"]
    assert error["message"] == "unknown run 'nope'" and "resources" not in error["details"]
    assert client.options("/nowhere").status_code == 404
    assert "resources" in client.options("/nowhere").json()["error"]["details"]


def test_a_root_path_prefixes_what_the_404_names(client: TestClient) -> None:
    proxied = TestClient(client.app, root_path="/bnn")
    error = proxied.get("/bnn/run").json()["error"]
    assert error["details"]["path"] == "/run"
    assert "did you mean /bnn/runs?" in error["message"] and "/bnn/docs" in error["message"]


@pytest.mark.parametrize("body", [b'{"name": "\xff"}', b"\x80{}", b'{"a": 1, "b": "\xc3"}'])
def test_a_body_that_is_not_utf8_is_a_400_saying_so(client: TestClient, body: bytes) -> None:
    response = client.post("/runs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "bad_request" and error["message"].startswith("invalid JSON: ")
    assert "send JSON as UTF-8" in error["message"]
