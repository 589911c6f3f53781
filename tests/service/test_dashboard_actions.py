"""The dashboard's writes through the test client, on SQLite and PostgreSQL: the login form
and its cookie (http-only, SameSite=Strict, never the token), the cookie accepted by
``require_token`` beside the Bearer header, CSRF refusals, logout, and what the run page's
script calls: ``PATCH /runs/{id}`` with a name and tags, ``POST /runs/{id}/cancel``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.dashboard.render import STATIC_DIR
from service.deps import CSRF_HEADER, SESSION_COOKIE, SESSION_S, session_value, valid_session
from tests.service.conftest import AUTH, TOKEN, ClientFactory, TestClient
from tests.service.test_dashboard import add_run, html_of, store_of
from trainer.errors import BnnError
from trainer.store import RunStatus

ORIGIN = "http://testserver"  # the TestClient's own origin
PAGE = {CSRF_HEADER: "1", "Origin": ORIGIN}  # what the page's fetch sends
TEMPLATES = Path(STATIC_DIR).parent / "templates"


def login(client: TestClient, token: str = TOKEN, nxt: str = "/", **headers: str) -> Any:
    body = {"token": token, "next": nxt}
    return client.post("/ui/login", data=body, headers=headers, follow_redirects=False)


def rename(client: TestClient, run: str, headers: dict[str, str], **body: Any) -> Any:
    return client.patch(f"/runs/{run}", json=body, headers=headers)


# ----------------------------------------------------------------------------- the cookie
def test_session_cookie_is_signed_expires_and_is_not_the_token() -> None:
    value = session_value(TOKEN, now=1000.0)
    assert TOKEN not in value and valid_session(TOKEN, value, now=1000.0)
    assert valid_session(TOKEN, value, now=1000.0 + SESSION_S)
    assert not valid_session(TOKEN, value, now=1001.0 + SESSION_S)  # expired
    assert not valid_session("another-token", value, now=1000.0)  # a new token ends logins
    expires, sig = value.split(".")
    assert not valid_session(TOKEN, f"{int(expires) + 10**6}.{sig}", now=1000.0)  # tampered
    for bad in ("", "x", f"{expires}.", f".{sig}", f"{expires}.{sig}0", "١٢.ab", None):
        assert not valid_session(TOKEN, bad, now=1000.0), bad


def test_login_sets_an_http_only_strict_cookie_that_authorises_writes(
    make_client: ClientFactory,
) -> None:
    client = make_client(api_token=TOKEN)
    run = add_run(store_of(client), "before")
    form = html_of(client, "/ui/login", next=f"/ui/runs/{run}")
    assert 'id="login-form"' in form and f'name="next" value="/ui/runs/{run}"' in form
    assert rename(client, run, PAGE, name="x").status_code == 401  # not logged in yet

    wrong = login(client, "not-it")
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert "set-cookie" not in wrong.headers and SESSION_COOKIE not in client.cookies

    response = login(client, nxt=f"/ui/runs/{run}")
    assert response.status_code == 303 and response.headers["location"] == f"/ui/runs/{run}"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and TOKEN not in cookie
    for part in ("HttpOnly", "SameSite=strict", "Path=/", f"Max-Age={SESSION_S}"):
        assert part.lower() in cookie.lower(), (part, cookie)
    assert "secure" not in cookie.lower()  # plain HTTP here; Secure over HTTPS

    page = html_of(client, f"/ui/runs/{run}")
    assert 'id="logout-form"' in page and 'id="login-hint"' not in page
    assert 'id="run-edit-fieldset">' in page  # not disabled
    ok = rename(client, run, PAGE, name="after", tags=["a", "b"])
    assert ok.status_code == 200, ok.text
    assert (ok.json()["name"], ok.json()["tags"]) == ("after", ["a", "b"])
    assert store_of(client).get_run(run).name == "after"
    # the Bearer header still works, and when present it decides (a wrong one is 401)
    assert rename(client, run, AUTH, name="by-bearer").status_code == 200
    assert rename(client, run, {"Authorization": "Bearer nope"}, name="x").status_code == 401
    assert store_of(client).get_run(run).name == "by-bearer"


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"Origin": ORIGIN}, "X-BNN-CSRF"),  # a plain form post or a script without it
        ({CSRF_HEADER: "1", "Origin": "http://evil.example"}, "this site's pages"),
        ({CSRF_HEADER: "1", "Origin": "http://testserver:8080"}, "this site's pages"),
        ({CSRF_HEADER: "1", "Origin": "null"}, "this site's pages"),
        ({CSRF_HEADER: "1", "Referer": "http://evil.example/x"}, "this site's pages"),
    ],
)
def test_cookie_writes_without_the_header_or_from_elsewhere_are_refused(
    make_client: ClientFactory, headers: dict[str, str], named: str
) -> None:
    client = make_client(api_token=TOKEN)
    store = store_of(client)
    run = add_run(store, "kept", status=None)
    assert login(client).status_code == 303
    for response in (
        rename(client, run, headers, name="changed"),
        client.post(f"/runs/{run}/cancel", headers=headers),
    ):
        assert response.status_code == 403, response.text
        assert named in response.json()["error"]["message"]
    assert store.get_run(run).name == "kept" and store.get_run(run).status is RunStatus.RUNNING
    assert client.jobs.cancelled == []  # type: ignore[attr-defined]
    # without Origin and Referer (not a browser page) the header suffices
    assert rename(client, run, {CSRF_HEADER: "1"}, name="changed").status_code == 200


def test_a_forged_or_stale_cookie_is_401(make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN)
    run = add_run(store_of(client), "kept")
    for value in ("garbage", session_value("other-token"), session_value(TOKEN, now=0.0)):
        client.cookies.set(SESSION_COOKIE, value)
        response = rename(client, run, PAGE, name="x")
        assert response.status_code == 401 and "log in again" in response.text
    assert store_of(client).get_run(run).name == "kept"


def test_logout_removes_the_cookie(make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN)
    run = add_run(store_of(client), "kept")
    assert login(client).status_code == 303
    refused = client.post("/ui/logout", headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403 and SESSION_COOKIE in client.cookies
    response = client.post("/ui/logout", headers={"Origin": ORIGIN}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert re.search(rf"{SESSION_COOKIE}=(\"\")?;.*Max-Age=0", response.headers["set-cookie"])
    assert SESSION_COOKIE not in client.cookies
    assert rename(client, run, PAGE, name="x").status_code == 401
    assert 'id="nav-login"' in html_of(client, "/")


@pytest.mark.parametrize(
    "nxt", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:1", ""]
)
def test_login_goes_back_only_to_this_site(make_client: ClientFactory, nxt: str) -> None:
    client = make_client(api_token=TOKEN)
    response = login(client, nxt=nxt)
    assert response.status_code == 303 and response.headers["location"] == "/"


def test_bad_logins_are_clear_4xx_pages(make_client: ClientFactory) -> None:
    client = make_client(api_token=TOKEN)
    json_body = client.post("/ui/login", json={"token": TOKEN})
    assert json_body.status_code == 415 and "x-www-form-urlencoded" in json_body.text
    many = "&".join(f"f{i}=1" for i in range(20))
    crowded = client.post(
        "/ui/login", content=many, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert crowded.status_code == 422 and "bad form" in crowded.text
    elsewhere = login(client, Origin="http://evil.example")
    assert elsewhere.status_code == 403 and SESSION_COOKIE not in client.cookies
    for response in (json_body, crowded, elsewhere):
        assert response.headers["content-type"].startswith("text/html")

    open_service = make_client()  # no token: nothing to log in to
    assert 'id="login-off"' in html_of(open_service, "/ui/login")
    assert login(open_service).status_code == 409
    assert 'id="nav-login"' not in html_of(open_service, "/")
    assert 'id="auth-state"' not in html_of(open_service, "/")


# ----------------------------------------------------------------------------- reads
def test_protected_reads_are_a_login_page_then_work_with_the_cookie(
    make_client: ClientFactory,
) -> None:
    client = make_client(api_token=TOKEN, auth_reads=True)
    run = add_run(store_of(client), "secret", epochs=1)
    for url in ("/", f"/ui/runs/{run}", "/ui/sweeps", f"/ui/runs/{run}/metrics"):
        page = html_of(client, url, 401)
        assert 'id="error-login"' in page and "/ui/login?next=" in page
    assert client.get(f"/ui/runs/{run}/progress").status_code == 401
    assert client.get(f"/runs/{run}").status_code == 401
    # the login page and the stylesheet need no login
    assert 'id="login-form"' in html_of(client, "/ui/login")
    assert client.get("/ui/static/dashboard.css").status_code == 200
    assert login(client).status_code == 303
    assert "secret" in html_of(client, "/")
    assert client.get(f"/ui/runs/{run}/progress").json()["epochs_done"] == 1
    assert client.get(f"/runs/{run}").status_code == 200  # the API takes the cookie too
    assert client.get(f"/runs/{run}/stats?format=csv").status_code == 200


def test_without_a_login_the_run_page_links_the_login_instead_of_its_forms(
    make_client: ClientFactory,
) -> None:
    client = make_client(api_token=TOKEN)
    run = add_run(store_of(client), "locked", status=None)
    page = html_of(client, f"/ui/runs/{run}")  # reads are open
    hint = page[page.index('id="login-hint"') : page.index("</p>", page.index('id="login-hint"'))]
    assert f'href="/ui/login?next=%2Fui%2Fruns%2F{run}">Log in to edit or cancel</a>' in hint
    for form in ("run-edit-form", "run-edit-fieldset", "run-cancel-box", "run-cancel"):
        assert f'id="{form}"' not in page  # no disabled form to puzzle over
    assert 'id="nav-login"' in page
    done = add_run(store_of(client), "finished")  # nothing to cancel: "edit" only
    assert ">Log in to edit</a>" in html_of(client, f"/ui/runs/{done}")
    login(client, nxt=f"/ui/runs/{run}")
    page = html_of(client, f"/ui/runs/{run}")  # the same URL, logged in: the forms
    assert 'id="login-hint"' not in page and 'id="run-edit-form"' in page
    assert 'id="run-cancel"' in page


# ----------------------------------------------------------------------------- edit, cancel
def test_run_page_edits_name_and_tags_through_the_patch_api(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "old name", tags=("x",), epochs=1)
    page = html_of(client, f"/ui/runs/{run}")
    assert f'data-patch-url="/runs/{run}"' in page
    assert 'id="run-name-input" value="old name"' in page
    assert 'id="run-tags-input" value="x"' in page
    response = rename(client, run, PAGE, name="new name", tags=["paper", "wide"])
    assert response.status_code == 200, response.text
    page = html_of(client, f"/ui/runs/{run}")
    assert '<span id="run-name">new name</span>' in page
    assert 'class="tag" href="/?tag=paper">paper</a>' in page
    names = html_of(client, "/", tag="wide")
    assert "new name" in names and "old name" not in names
    assert store.get_run(run).status is RunStatus.COMPLETED  # only the labels changed
    assert rename(client, run, PAGE, tags=[]).json()["tags"] == []
    assert rename(client, run, PAGE, name="only the name").json()["name"] == "only the name"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"name": "   "}, "name must not be blank"),
        ({"name": "n" * 257}, "name"),
        ({"name": "a\x00b"}, "NUL"),
        ({"tags": ["ok", ""]}, "tags must not be blank"),
        ({"tags": ["t" * 65]}, "longer than 64"),
        ({"tags": [f"t{i}" for i in range(33)]}, "at most 32"),
        ({"tags": "a,b"}, "tags"),
        ({"name": 3}, "name"),
    ],
)
def test_bad_names_and_tags_are_422_naming_them(
    client: TestClient, body: dict[str, Any], named: str
) -> None:
    run = add_run(store_of(client), "kept", tags=("x",))
    response = rename(client, run, PAGE, **body)
    assert response.status_code == 422, response.text
    assert named in response.json()["error"]["message"]
    assert (store_of(client).get_run(run).name, store_of(client).get_run(run).tags) == (
        "kept",
        ["x"],
    )


def test_store_set_labels_checks_its_input(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "kept")
    for name in ("", " ", "n" * 257, "a\x00"):
        with pytest.raises(BnnError, match="run name must be"):
            store.set_labels(run, name=name)
    with pytest.raises(BnnError, match="tags must be a list"):
        store.set_labels(run, tags="abc")
    with pytest.raises(BnnError, match="unknown run"):
        store.set_labels("ghost", name="x")
    assert store.set_labels(run).name == "kept"  # nothing asked: nothing changed


def test_cancel_button_calls_the_cancel_api(client: TestClient) -> None:
    store = store_of(client)
    run = add_run(store, "live", status=None)
    page = html_of(client, f"/ui/runs/{run}")
    assert f'id="run-cancel-box" data-cancel-url="/runs/{run}/cancel"' in page
    assert 'id="run-cancel"' in page and 'id="run-cancel-confirm"' in page
    response = client.post(f"/runs/{run}/cancel", headers=PAGE)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert client.jobs.cancelled == [run]  # type: ignore[attr-defined]
    page = html_of(client, f"/ui/runs/{run}")
    assert 'id="run-status">cancelled<' in page and 'id="run-cancel-box"' not in page
    again = client.post(f"/runs/{run}/cancel", headers=PAGE)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]
    done = add_run(store, "done")
    assert 'id="run-cancel-box"' not in html_of(client, f"/ui/runs/{done}")


def test_the_script_finds_every_element_it_uses() -> None:
    """Each id the script looks up is in a template, and it sends the CSRF header."""
    script = (STATIC_DIR / "dashboard.js").read_text()
    html = "".join(p.read_text() for p in TEMPLATES.glob("*.html"))
    ids = set(re.findall(r'getElementById\("([\w-]+)"\)', script))
    assert {"run-edit-form", "run-cancel-confirm", "plot-kind", "plot-image"} <= ids
    missing = [i for i in sorted(ids) if f'id="{i}"' not in html]
    assert missing == []
    assert f'"{CSRF_HEADER}": "1"' in script and 'credentials: "same-origin"' in script
    assert '"PATCH"' in script and '"POST"' in script
