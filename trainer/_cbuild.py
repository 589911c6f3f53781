"""Building the package's C sources on first use (torch-free: the store's kernels use it too).

A source is compiled with the system C compiler (``$CC``, ``cc`` or ``gcc``) into a cache
directory (``$BNN_KERNEL_CACHE``, default ``~/.cache/bnn-infosharing/kernels``) under a name
keyed by the source, the flags, the compiler and the machine (``-march=native`` code runs
only where it was built), written to a temporary file and renamed, so that concurrent first
uses are safe. ``BNN_FUSED_KERNELS=0`` turns every compiled kernel off (the callers then use
their torch or numpy operations).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FLAGS", "build", "compiler", "load", "switched_off", "unsupported"]

#: optimised for this machine, no -ffast-math (NaN and Inf keep their meaning, denormals are
#: not flushed); ``#pragma omp simd`` loops vectorised without an OpenMP runtime
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd")


def switched_off() -> bool:
    """Whether ``BNN_FUSED_KERNELS`` turns the compiled kernels off."""
    value = os.environ.get("BNN_FUSED_KERNELS", "1").strip().lower()
    return value in ("0", "false", "no", "off")


def unsupported() -> str | None:
    """Why no kernel can be built here (None when one can): the platform or the compiler."""
    if not sys.platform.startswith("linux"):
        return f"not built on {sys.platform} (glibc's vector math is needed)"
    if compiler() is None:
        return "no C compiler ($CC, cc or gcc) found"
    return None


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    given = os.environ.get("BNN_KERNEL_CACHE")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bnn-infosharing" / "kernels"


def _machine() -> str:
    """What -march=native compiles for: the CPU's model and flags (Linux), else the arch."""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    return platform.machine()


def _compile(cc: str, cmd: Sequence[str], out: Path) -> None:
    """Run ``cc *cmd -o tmp`` and rename tmp to ``out`` (a temp file in the same directory)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        full = [cc, *cmd, "-o", tmp]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise OSError(f"{' '.join(full)} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def build(source: Path, flags: Sequence[str], libs: Sequence[str] = ("-lm",)) -> Path:
    """The shared library of ``source`` built with ``flags`` (compiled unless cached).

    Raises OSError (or ``subprocess.SubprocessError``) when it cannot be built; callers check
    :func:`unsupported` first.
    """
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler ($CC, cc or gcc) found")
    text = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join([text, " ".join(flags).encode(), cc.encode(), _machine().encode()])
    ).hexdigest()[:20]
    path = _cache_dir() / f"{source.stem}-{key}.so"
    if not path.exists():
        _compile(cc, [*flags, "-fPIC", "-shared", str(source), *libs], path)
    return path


def load(
    source: Path,
    flags: Sequence[str],
    libs: Sequence[str],
    version: tuple[str, int],
    *,
    name: str,
    fallback: str,
    log: logging.Logger,
) -> tuple[ctypes.CDLL | None, str]:
    """``(library, status)``: ``source`` built (:func:`build`) and loaded, its ``version``
    function (name, value) checked; or None and why not. Unless the user turned the kernels
    off, a missing library is logged once as a warning on ``log``: ``name`` (e.g. "bnn fused
    CPU kernels") is unavailable, ``fallback`` (what the caller uses instead, and what that
    costs) is used, and how to fix or silence it."""
    if switched_off():
        return None, "off (BNN_FUSED_KERNELS=0)"
    why = unsupported()
    if why is None:
        fn, want = version
        try:
            path = build(source, flags, libs)
            lib = ctypes.CDLL(str(path))
            got = getattr(lib, fn)()
            if got != want:
                raise OSError(f"{path}: {fn}() is {got}, not {want}")
            return lib, f"loaded from {path}"
        except (OSError, subprocess.SubprocessError) as exc:
            why = f"build failed: {exc}"
    log.warning(
        "%s unavailable (%s): %s (install a C compiler such as gcc, or set "
        "BNN_FUSED_KERNELS=0 to choose that)",
        name,
        why,
        fallback,
    )
    return None, why
