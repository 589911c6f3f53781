"""Read buffers reused across epochs, so that large reads do not fault in fresh pages.

A 940,800-element layer is read as arrays of 3.8 MB, one epoch after another. Left to
``malloc``, each comes from freshly mapped memory (glibc returns big freed blocks to the
system), and the page faults of filling it cost about as much as the statistics computed
from it. A :class:`Scratch` lends buffers for one computation and takes them back after;
up to :data:`MAX_FREE_BYTES` of free buffers are kept for the next one (any thread).

Only for arrays that do not outlive the ``with`` block: results must be new arrays.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["MAX_FREE_BYTES", "Scratch"]

MAX_FREE_BYTES = 64 * 2**20
_free: list[np.ndarray] = []  # uint8 buffers, returned by finished computations
_lock = threading.Lock()


class Scratch:
    """``with Scratch() as sc: view.array(..., alloc=sc.alloc)``: buffers given back on exit."""

    def __init__(self) -> None:
        self._held: list[np.ndarray] = []

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        held, self._held = self._held, []
        with _lock:
            _free.extend(held)
            _free.sort(key=lambda b: -b.nbytes)  # keep the largest within the bound
            total = 0
            for i, buf in enumerate(_free):
                total += buf.nbytes
                if total > MAX_FREE_BYTES:
                    del _free[i:]
                    break

    def alloc(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` held until exit."""
        dt = np.dtype(dtype)
        need = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        buf = None
        with _lock:
            fits = [i for i, b in enumerate(_free) if b.nbytes >= need]
            if fits:  # the smallest that fits
                buf = _free.pop(min(fits, key=lambda i: _free[i].nbytes))
        if buf is None:
            buf = np.empty(max(need, 1), np.uint8)
        self._held.append(buf)
        return buf[:need].view(dt).reshape(shape)
