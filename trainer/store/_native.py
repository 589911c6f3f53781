"""The summaries' C kernels (``summaries.c``): loading them and calling them on numpy arrays.

Torch-free (the store and the service import it without PyTorch). Built on first use like
the training kernels (:mod:`trainer._cbuild`: the system C compiler, a cache directory,
``BNN_FUSED_KERNELS=0`` turns them off); without them every function here returns None and
:mod:`trainer.store.numeric` computes with numpy instead. The results are the same: order
statistics, counts and bfloat16 codes exactly, the float64 sums of
:func:`~trainer.store.numeric.gaussian_sums` up to their last bits (the terms are the same,
the order of the additions is not), which is why files from elsewhere are compared with
a tolerance (``trainer.store.summaries.SUM_RTOL``).

Each call releases the GIL (ctypes does) and runs on the calling thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np

from trainer import _cbuild

__all__ = [
    "BINS",
    "available",
    "bf16_counts",
    "bf16_encode",
    "bf16_values",
    "disabled",
    "gauss_sums",
    "key_hist",
    "select",
    "status",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("summaries.c")
VERSION = 2  # summaries.c's bnn_summaries_version()
FLAGS = (*_cbuild.FLAGS, "-ffp-contract=off")  # products rounded as numpy rounds them
BINS = 1 << 16
SELECT_MAX = 1024  # summaries.c's SELECT_MAX
#: arrays of at least this many elements use the kernels (below, numpy is as fast)
MIN_SIZE = 4096
_MAX_SIZE = (1 << 32) - 1  # the histograms count in uint32

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_status = "not loaded yet"
_lock = threading.Lock()
_off = 0  # disabled() depth (process-wide: the epoch writer runs on its own thread)
_loaded = False  # _library() has run (its result is cached): no lock needed any more


def _new_lock() -> None:  # a fork while another thread held it (building) must not deadlock
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


@cache
def _library() -> ctypes.CDLL | None:
    global _status
    lib, _status = _cbuild.load(
        SOURCE,
        FLAGS,
        ("-lmvec", "-lm"),
        ("bnn_summaries_version", VERSION),
        name="bnn summary kernels",
        fallback="epoch summaries are computed with numpy, about 3x slower",
        log=log,
    )
    if lib is None:
        return None
    d = ctypes.c_double
    lib.bnn_key_hist.argtypes = [_P, _I64, _P]
    lib.bnn_key_hist.restype = None
    lib.bnn_gauss_sums.argtypes = [_P, _P, _I64, d, d, _P, _P, _P]
    lib.bnn_gauss_sums.restype = None
    lib.bnn_select.argtypes = [_P, _I64, _P, _P, ctypes.c_int, _P]
    lib.bnn_select.restype = ctypes.c_int
    lib.bnn_bf16_encode.argtypes = [_P, _I64, ctypes.c_int, _P, _P]
    lib.bnn_bf16_encode.restype = None
    lib.bnn_bf16_stats.argtypes = [_P, _P, ctypes.c_int, _P, _P, _P]
    lib.bnn_bf16_stats.restype = ctypes.c_int
    return lib


def _lib() -> ctypes.CDLL | None:
    global _loaded
    if _off:
        return None
    if _loaded:
        return _library()
    with _lock:
        lib = _library()
        _loaded = True
        return lib


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return _lib() is not None


def status() -> str:
    """Why the kernels are or are not in use."""
    available()
    return "off (disabled())" if _off else _status


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """numpy everywhere inside the block (every thread), e.g. to compare the two."""
    global _off
    with _lock:
        _off += 1
    try:
        yield
    finally:
        with _lock:
            _off -= 1


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def _flat32(x: np.ndarray) -> np.ndarray | None:
    """``x`` as a flat C-contiguous float32 view (no copy), or None when it is not one or its
    size is outside what the kernels take."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or not MIN_SIZE <= x.size <= _MAX_SIZE:
        return None
    return x.reshape(-1)


def key_hist(x: np.ndarray) -> np.ndarray | None:
    """The histogram of the top 16 bits of ``x``'s order keys (see summaries.c)."""
    lib, flat = _lib(), _flat32(x)
    if lib is None or flat is None:
        return None
    hist = np.empty(BINS, np.uint32)
    lib.bnn_key_hist(_ptr(flat), flat.size, _ptr(hist))
    return hist


def select(x: np.ndarray, ranks: np.ndarray, hist: np.ndarray | None = None) -> np.ndarray | None:
    """The values of ``ranks`` (sorted, unique, 0-based) of ``x`` (float32 without NaN) as
    float64, exactly ``np.partition``'s; None where the kernels cannot take it."""
    lib, flat = _lib(), _flat32(x)
    if lib is None or flat is None or ranks.size > SELECT_MAX:
        return None
    if hist is None:
        hist = key_hist(flat)
        if hist is None:
            return None
    want = np.ascontiguousarray(ranks, np.int64)
    out = np.empty(want.size, np.float32)
    if lib.bnn_select(_ptr(flat), flat.size, _ptr(hist), _ptr(want), want.size, _ptr(out)):
        return None  # out of memory for the candidates: numpy will say so if it must
    return out.astype(np.float64)


def gauss_sums(
    mu: np.ndarray, sigma: np.ndarray, m_c: float, s_c: float, hists: bool = False
) -> tuple[list[float], np.ndarray | None, np.ndarray | None] | None:
    """The eleven sums of ``gaussian_sums`` about the centres ``m_c``, ``s_c`` (see
    summaries.c), and with ``hists`` the key histograms of ``mu`` and ``sigma`` from the same
    pass; None where the kernels cannot take the arrays."""
    lib, m, s = _lib(), _flat32(mu), _flat32(sigma)
    if lib is None or m is None or s is None or m.size != s.size:
        return None
    out = np.empty(11, np.float64)
    h_mu = np.empty(BINS, np.uint32) if hists else None
    h_sigma = np.empty(BINS, np.uint32) if hists else None
    lib.bnn_gauss_sums(
        _ptr(m),
        _ptr(s),
        m.size,
        m_c,
        s_c,
        _ptr(out),
        None if h_mu is None else _ptr(h_mu),
        None if h_sigma is None else _ptr(h_sigma),
    )
    return out.tolist(), h_mu, h_sigma


def bf16_encode(x: np.ndarray, bits: int = 7) -> tuple[np.ndarray, np.ndarray] | None:
    """``(codes, histogram of the codes)`` of float32 ``x`` (codes of ``x``'s shape, exactly
    ``encode_bf16``'s, or with ``bits`` < 7 ``round_bf16(encode_bf16(x), bits)``'s); None
    where the kernels cannot take it."""
    lib, flat = _lib(), _flat32(x)
    if lib is None or flat is None:
        return None
    codes = np.empty(x.shape, np.uint16)
    hist = np.empty(BINS, np.uint32)
    lib.bnn_bf16_encode(_ptr(flat), flat.size, int(bits), _ptr(codes), _ptr(hist))
    return codes, hist


def bf16_counts(hist: np.ndarray) -> tuple[int, int, int, float] | None:
    """From a histogram of bfloat16 codes: ``(non-finite, zeros, finite, largest finite
    value)`` (NaN when none is finite); None without the kernels."""
    lib = _lib()
    if lib is None:
        return None
    counts = np.empty(3, np.int64)
    top = np.empty(1, np.float32)
    lib.bnn_bf16_stats(_ptr(hist), None, 0, _ptr(counts), _ptr(top), None)
    return int(counts[0]), int(counts[1]), int(counts[2]), float(top[0])


def bf16_values(hist: np.ndarray, ranks: np.ndarray) -> np.ndarray | None:
    """The values of ``ranks`` (sorted, 0-based, below the count of finite codes) among the
    finite codes of a histogram of bfloat16 codes, as float64; None without the kernels."""
    lib = _lib()
    if lib is None:
        return None
    want = np.ascontiguousarray(ranks, np.int64)
    counts = np.empty(3, np.int64)
    top = np.empty(1, np.float32)
    out = np.empty(want.size, np.float32)
    if lib.bnn_bf16_stats(_ptr(hist), _ptr(want), want.size, _ptr(counts), _ptr(top), _ptr(out)):
        raise ValueError(f"ranks {want.tolist()} outside the {int(counts[2])} finite codes")
    return out.astype(np.float64)
