"""``bnn serve --http/--loop``: uvicorn's HTTP parser and event loop (default ``auto``:
httptools and uvloop, installed with ``uvicorn[standard]``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from service.cli import main


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    return calls


def test_serve_picks_httptools_and_uvloop_by_default(
    served: list[dict[str, Any]], tmp_path: Path
) -> None:
    assert main(["serve", "--data-dir", str(tmp_path / "data"), "--port", "8123"]) == 0
    (kw,) = served
    assert (kw["http"], kw["loop"], kw["port"]) == ("auto", "auto", 8123)
    # uvicorn[standard] is a dependency: "auto" resolves to these two
    assert importlib.util.find_spec("httptools") is not None
    assert importlib.util.find_spec("uvloop") is not None


def test_serve_can_use_the_pure_python_stack(served: list[dict[str, Any]], tmp_path: Path) -> None:
    args = ["serve", "--data-dir", str(tmp_path / "data"), "--http", "h11", "--loop", "asyncio"]
    assert main(args) == 0
    assert (served[0]["http"], served[0]["loop"]) == ("h11", "asyncio")


def test_an_unknown_parser_is_refused_by_name(
    served: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--data-dir", str(tmp_path / "data"), "--http", "fast"])
    assert exit_.value.code == 2
    assert "'fast'" in capsys.readouterr().err and not served
