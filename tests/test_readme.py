"""Every ```python block of README.md runs as written.

The blocks run in order, in one namespace (later blocks use what earlier ones defined, as a
reader following the README would), in a fresh working directory, as one subprocess. A
block that is not meant to run standalone is marked in the README by an HTML comment on the
line before it, ``<!-- not-run: the reason -->``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->")
# What the README's blocks write into the working directory (their save= arguments).
WRITTEN = ["evolution.png", "bands.png", "grads.png", "width.png", "runs/catalog.db"]

RUNNER = """
import json, sys
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__readme__"}
for block in blocks:
    # padded with newlines so that a traceback names the README's own line numbers
    code = compile("\\n" * block["line"] + block["code"], "README.md", "exec")
    exec(code, namespace)
    print(f"block at README.md:{block['line'] + 1} ran", flush=True)
"""


@dataclass(frozen=True)
class Block:
    """One fenced block: the line of its first code line (1-based), code, not-run reason."""

    line: int
    code: str
    not_run: str | None


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a Markdown text, in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            before = next((t for t in reversed(lines[:i]) if t.strip()), "")
            marker = NOT_RUN.search(before)
            code = "\n".join(lines[start:end]) + "\n"
            blocks.append(Block(start, code, marker.group("reason") if marker else None))
            i = end
        i += 1
    return blocks


def test_the_block_parser_sees_markers_and_line_numbers() -> None:
    text = "intro\n```python\nx = 1\n```\n<!-- not-run: needs a GPU -->\n\n```python\ny\n```\n"
    assert python_blocks(text) == [Block(2, "x = 1\n", None), Block(7, "y\n", "needs a GPU")]


def test_readme_has_python_blocks_and_few_exemptions() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6
    skipped = [b for b in blocks if b.not_run]
    assert len(skipped) <= 1, [(b.line, b.not_run) for b in skipped]


def test_every_python_block_of_the_readme_runs(tmp_path: Path) -> None:
    blocks = [b for b in python_blocks(README.read_text()) if b.not_run is None]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([{"line": b.line - 1, "code": b.code} for b in blocks]))
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(spec)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - reported, not hidden
        pytest.fail(f"README blocks did not finish in {exc.timeout} s: {exc.stdout!r}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    assert proc.stdout.count(" ran\n") == len(blocks), proc.stdout
    for name in WRITTEN:
        assert (work / name).is_file(), name
