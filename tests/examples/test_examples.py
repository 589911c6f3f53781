"""Every script in examples/ runs on tiny settings (``BNN_EXAMPLES_TINY=1``) as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
# what each example must print (its last steps ran)
EXPECTED = {
    "own_training_loop.py": ["learned layer priors", "pairwise symmetric KL", "plots written to"],
    "push_to_service.py": [
        "started a bnn service in-process",
        "completed, epochs [0, 1, 2]",
        "pairwise KL table",
        "KL plot:",
    ],
    "bayesianize_mnist.py": [
        "flagged elements per layer",
        "top-3 exploding candidates",
        "KL between the two runs",
    ],
}


def test_every_example_is_listed() -> None:
    assert {p.name for p in EXAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_on_tiny_settings(script: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
    env |= {"BNN_EXAMPLES_TINY": "1", "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    args = [sys.executable, str(script)]
    if "--out" in script.read_text():
        args += ["--out", str(tmp_path / "out")]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for words in EXPECTED[script.name]:
        assert words in proc.stdout, (words, proc.stdout)
