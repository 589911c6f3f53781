"""No input gives a 500: random bodies, paths and queries against every endpoint.

The test client re-raises any exception the app does not turn into a response, so an
unhandled error fails these tests; a 5xx answer fails them too.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.schemas import RunCreate
from tests.service.conftest import TINY, ClientFactory, TestClient, external_run

FIELDS = [*RunCreate.model_fields, "bogus"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _send(client: TestClient, method: str, path: str, body: Any) -> int:
    raw = json.dumps(body, allow_nan=True).encode()
    response = client.request(
        method, path, content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code < 500, (method, path, body, response.text)
    assert "error" in response.json() or response.status_code < 300
    return response.status_code


@FUZZ
@given(
    body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    valid_base=st.booleans(),
)
def test_random_run_bodies(client: TestClient, body: dict[str, Any], valid_base: bool) -> None:
    _send(client, "POST", "/runs", {**TINY, **body} if valid_base else body)


@FUZZ
@given(
    body=st.dictionaries(
        st.sampled_from(["status", "error", "summary", "heartbeat", "train_host", "x"]),
        json_values,
        max_size=4,
    )
)
def test_random_patches(client: TestClient, body: dict[str, Any]) -> None:
    run_id = getattr(client, "_fuzz_run", None) or external_run(client)
    client._fuzz_run = run_id  # type: ignore[attr-defined]
    _send(client, "PATCH", f"/runs/{run_id}", body)


@FUZZ
@given(
    segment=st.text(max_size=70),
    query=st.dictionaries(
        st.sampled_from(
            ["status", "tag", "dataset", "prior", "limit", "offset", "format", "names"]
        ),
        st.text(max_size=12),
        max_size=4,
    ),
    tail=st.sampled_from(["", "/epochs", "/metrics", "/epochs/1", "/epochs/1/file", "/epochs/x"]),
)
def test_random_paths_and_queries(
    client: TestClient, segment: str, query: dict[str, str], tail: str
) -> None:
    path = f"/runs/{quote(segment, safe='')}{tail}" if segment else "/runs"
    response = client.get(path, params=query)
    assert response.status_code < 500, (path, query, response.text)


def test_lone_surrogates_and_deep_nesting_are_rejected_not_crashed(
    make_client: ClientFactory,
) -> None:
    client = make_client()
    run_id = external_run(client)
    headers = {"Content-Type": "application/json"}
    for method, path, raw in [
        ("POST", "/runs", b'{"name": "a\\ud800b"}'),
        ("POST", "/runs", b'{"tags": ["\\udfff"], "execute": false}'),
        ("PATCH", f"/runs/{run_id}", b'{"error": "\\ud800"}'),
        ("PATCH", f"/runs/{run_id}", b'{"summary": {"\\ud800": 1}}'),
        ("PATCH", f"/runs/{run_id}", b"[" * 5000 + b"]" * 5000),
        ("PATCH", f"/runs/{run_id}", b'{"summary": {"a": ' + b"[" * 600 + b"]" * 600 + b"}}"),
        ("POST", "/runs", b'{"bogus": ' + b"[" * 900 + b"]" * 900 + b"}"),
        ("POST", "/runs", b'{"seed": 1' + b"0" * 5000 + b"}"),
    ]:
        response = client.request(method, path, content=raw, headers=headers)
        assert 400 <= response.status_code < 500, (path, raw[:40], response.text)
    response = client.get(f"/runs/{run_id}/metrics?names=%ED%A0%80%FF")  # not UTF-8
    assert response.status_code == 404  # no metric of that name (not a crash)
    assert client.get("/runs/%ED%A0%80%FF").status_code == 404
