"""The benchmark scripts that no other test runs still run: tiny settings, real code paths.

Their figures are not checked (machines differ); that they finish and print their tables is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    return env


def test_capture_step_prints_every_level() -> None:
    cmd = [
        sys.executable, "benchmarks/capture_step.py",
        "--pairs", "2", "--block", "3", "--writes", "1", "--threads", "1", "--element-every", "2",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert {"layer", "element", "element/2", "unrecorded"} <= set(rows), proc.stdout
    for args, message in [
        (["--block", "1"], "--block must be >= 2"),
        (["--element-every", "2", "--block", "4"], "--block must be one more than a multiple"),
        (["--element-every", "1"], "--element-every must be >= 2"),
    ]:
        bad = subprocess.run(
            [sys.executable, "benchmarks/capture_step.py", *args],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr[-500:])


def test_summary_kernels_prints_both_rows() -> None:
    cmd = [sys.executable, "benchmarks/summary_kernels.py", "--size", "20000", "--reps", "2"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "posterior summary" in proc.stdout and "encode + summary" in proc.stdout
    assert "numpy / C" in proc.stdout


def test_epoch_file_floor_prints_every_coder_and_the_floor() -> None:
    cmd = [
        sys.executable, "benchmarks/epoch_file_floor.py",
        "--steps", "4", "--every", "2", "--hidden", "32", "--preset", "0",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("array"))
    for coder in ("raw", "as v2", "blosc zstd 9", "zfp rev", "xz", "entropy", "delta", "2-d"):
        assert coder in header, header
    rows = [line for line in lines if line.startswith(("posterior", "statistics"))]
    assert len(rows) == 6, proc.stdout
    assert "smallest lossless file" in proc.stdout and "bits each" in proc.stdout
    fewer = next(x for x in lines if x.startswith("the statistics at fewer mantissa bits"))
    what_if = lines[lines.index(fewer) + 2 :]
    assert [row.split()[0] for row in what_if[:6]] == ["7", "6", "5", "4", "3", "2"], what_if


def test_epoch_file_floor_refuses_an_interval_longer_than_the_run() -> None:
    bad = subprocess.run(
        [sys.executable, "benchmarks/epoch_file_floor.py", "--steps", "4", "--every", "9"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "--every must be in 1..--steps" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check does real work")
def test_the_gpu_check_runs_every_step_and_keeps_their_output_without_a_gpu(
    tmp_path: Path,
) -> None:
    """Without a GPU each step fails or skips at once, and every step's output file, with
    its exit line, is still written: one hang or failure never takes the others' output."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=REPO,
        env=_env(OUT=str(out), PYTHON=sys.executable, BNN_GPU_WHEELS=str(tmp_path / "none")),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = {p.name: p.read_text() for p in out.iterdir()}
    assert set(files) == {
        "env.txt", "cuda_tests.txt", "train_throughput_cuda.txt", "capture_step_cuda.txt",
    }  # fmt: skip
    assert "no CUDA device" in files["env.txt"]
    assert (
        "skipped" in files["cuda_tests.txt"] and "== cuda_tests: exit 0" in files["cuda_tests.txt"]
    )
    assert "== train_throughput_cuda: exit 1" in files["train_throughput_cuda.txt"]
    assert "no CUDA device here" in files["capture_step_cuda.txt"]
    assert "== capture_step_cuda: exit 2" in files["capture_step_cuda.txt"]
