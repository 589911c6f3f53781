"""Fused CPU kernels for the Bayesian layers' reparameterised draw ``w = mu + sigma * eps``.

On the CPU a Bayesian step spends a fifth of its time in ``torch.randn`` (one
Mersenne-Twister stream, on one core) and much of the rest in elementwise passes over the
weights: softplus, the draw, and their backward. :func:`sample` does the forward in one pass
(``sigma = softplus(rho) + 1e-8``, ``eps ~ N(0, 1)``, ``w = mu + sigma * eps``) and the
backward in another (``grad_rho = (grad_w * eps + grad_sigma) * sigmoid(rho)``), on
torch's own OpenMP threads; :func:`normal` is the draw alone. The KL of a shared prior
(:func:`kl_sums`, :func:`kl_backward`), the gradient statistics of a capture
(:func:`grad_stats_many`) and the divergence watch (:func:`count_nonfinite`) take one pass
each too, and :func:`adam_step` does the Adam/AdamW update (``trainer.optim.RecordingAdam``)
with a captured step's gradient statistics in one pass over each parameter.
``benchmarks/train_throughput.py`` measures what it saves; ``BENCHMARKS.md`` has the figures.

**Random numbers.** Philox4x32-10 (the counter-based generator of cuRAND and JAX) with
Box-Muller, keyed per draw by 63 bits taken from torch's default generator: a run seeded
with ``torch.manual_seed`` draws the same values again, on any number of threads. The
values differ from ``torch.randn``'s (another generator), with the same distribution
(tests/trainer/test_kernels.py checks moments, tails and independence).

**Allocator.** glibc's malloc serves every allocation above 128 KB-32 MB (its adaptive
threshold) with a fresh ``mmap`` and returns it with ``munmap`` when freed, so each of the
dozens of weight-sized temporaries of a step is zero-filled page by page by the kernel, and
page faults of two threads contend for one lock: on the 2-core machine, ``F.softplus`` of a
1200 x 1200 tensor took 8 ms on two threads and 1.9 ms once memory is reused.
:func:`tune_allocator` (called by the trainer and ``trainer.track`` for CPU training;
``BNN_MALLOC_TUNING=0`` leaves malloc alone) makes malloc keep and reuse freed memory. A
training process then keeps its peak heap until it exits (a Dask worker that ran a training
job, between jobs too); the API server, which does not train, never calls it.

**Build.** ``fused.c`` is compiled on first use with the system C compiler (``$CC`` or
``cc``; ``-O3 -march=native``, glibc's vector math; ``-fopenmp`` when torch's OpenMP runtime
is libgomp, so that the kernels share torch's thread team) into a cache directory
(``$BNN_KERNEL_CACHE``, default ``~/.cache/bnn-infosharing/kernels``), keyed by the source,
the flags and the machine, written atomically so concurrent first uses are safe. Without a
compiler, on another platform, for other dtypes or devices, under ``torch.compile``, with
``BNN_FUSED_KERNELS=0`` or inside ``with kernels.disabled():``, the layers use the torch
operations (same distribution, ``torch.randn``'s values): :func:`available` says which.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import sys
import threading
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from trainer import _cbuild

__all__ = [
    "Accumulators",
    "AdamHyper",
    "adam_step",
    "addressable",
    "available",
    "count_nonfinite",
    "disabled",
    "grad_stats_many",
    "kl_backward",
    "kl_sums",
    "normal",
    "on",
    "sample",
    "status",
    "tune_allocator",
    "usable",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
BLOCK = 512  # fused.c's BLOCK: a thread's share starts at a multiple of it
VERSION = 11  # fused.c's bnn_kernels_version()
FLAGS = _cbuild.FLAGS

_P, _I64, _U64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64
_status = "not loaded yet"
_lock = threading.Lock()


def _new_lock() -> None:  # a fork while another thread held it (building) must not deadlock
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


def _torch_libgomp() -> str | None:
    """The libgomp that torch loaded (its OpenMP runtime), from this process's mappings."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "/libgomp" in path and ".so" in path:
                return path
    return None


def _flags() -> tuple[str, ...]:
    """FLAGS, plus -fopenmp when torch runs on libgomp: the library then names the same
    libgomp.so.1, which the loader resolves to torch's copy, so the kernels' parallel regions
    run on torch's thread team (with another runtime, one team of each would compete)."""
    return (*FLAGS, "-fopenmp") if _torch_libgomp() else FLAGS


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with the reason in :func:`status`)."""
    global _status
    lib, _status = _cbuild.load(
        SOURCE,
        _flags(),
        ("-lmvec", "-lm"),
        ("bnn_kernels_version", VERSION),
        name="bnn fused CPU kernels",
        fallback="CPU training uses torch operations, about 1.5x slower",
        log=log,
    )
    if lib is None:
        return None
    i32 = ctypes.c_int
    lib.bnn_normal.argtypes = [_P, _I64, _U64, i32]
    lib.bnn_sample.argtypes = [_P, _P, _P, _P, _P, _I64, _U64, i32]
    lib.bnn_sample_backward.argtypes = [_P, _P, _P, _P, _P, _I64, i32]
    lib.bnn_kl_sums.argtypes = [_P, _P, ctypes.c_float, _P, _I64, i32, _P]
    f32 = ctypes.c_float
    lib.bnn_kl_backward.argtypes = [_P, _P, f32, f32, f32, _P, _P, _I64, i32]
    lib.bnn_count_nonfinite.argtypes = [_P, _I64, i32]
    lib.bnn_count_nonfinite.restype = _I64
    lib.bnn_grad_stats.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _P, _P, i32, _P]
    lib.bnn_adam.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, i32, _P]
    for fn in (
        lib.bnn_normal,
        lib.bnn_sample,
        lib.bnn_sample_backward,
        lib.bnn_kl_sums,
        lib.bnn_kl_backward,
        lib.bnn_grad_stats,
        lib.bnn_adam,
    ):
        fn.restype = None
    openmp = "OpenMP, torch's threads" if lib.bnn_kernels_openmp() else "one thread"
    _status = f"{_status} ({openmp})"
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    with _lock:
        return _library() is not None


def status() -> str:
    """Why the kernels are or are not in use, e.g. for ``bnn train`` diagnostics."""
    available()
    return _status


_off = threading.local()
# tensors whose memory the kernels may address: not subclasses (fake, meta-backed, ...)
_PLAIN = (Tensor, torch.nn.Parameter)


def _wrapped(t: Tensor) -> bool:
    """A tensor inside a torch.func transform (grad, vmap, ...): torch operations only."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block (in this thread) the layers use torch operations, e.g. to draw
    ``torch.randn``'s values or to compare both paths."""
    depth = getattr(_off, "depth", 0)
    _off.depth = depth + 1
    try:
        yield
    finally:
        _off.depth = depth


def on() -> bool:
    """Whether the kernels may run here and now: available, and not inside
    :func:`disabled` in this thread (the tensors' checks are the caller's)."""
    return not getattr(_off, "depth", 0) and available()


def usable(*tensors: Tensor) -> bool:
    """Whether :func:`sample` takes these tensors: plain CPU float32 tensors, contiguous, of
    one shape, outside ``torch.compile`` and ``torch.func`` transforms (which trace or batch
    torch operations only), and the kernels available."""
    if torch.compiler.is_compiling():  # first: the checks below would break the graph
        return False
    first = tensors[0]
    return (
        all(addressable(t) and t.shape == first.shape and not _wrapped(t) for t in tensors) and on()
    )


def addressable(t: Tensor) -> bool:
    """A plain float32 CPU tensor the kernels may address as one array (contiguous, strided);
    :func:`usable` adds the shape, ``torch.func`` and availability checks."""
    return (
        type(t) in _PLAIN
        and t.layout is torch.strided
        and t.is_cpu
        and t.dtype is torch.float32
        and t.is_contiguous()
    )


# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 1 << 30  # allocations below it come from the heap, and freed ones stay
_TOP_PAD = 64 << 20
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of unmapping it (see the
    module's "Allocator"); once per process, True when in effect. No-op elsewhere than
    Linux/glibc and with ``BNN_MALLOC_TUNING=0``."""
    global _tuned
    with _lock:
        if _tuned is not None:
            return _tuned
        _tuned = False
        if os.environ.get("BNN_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
            return False
        if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        threshold = next(
            (t for t in (_MMAP_THRESHOLD, 32 << 20) if mallopt(_M_MMAP_THRESHOLD, t) == 1), None
        )
        if threshold is None:
            return False
        mallopt(_M_TRIM_THRESHOLD, min(2 * threshold, 2**31 - 1))
        mallopt(_M_TOP_PAD, _TOP_PAD)
        _tuned = True
        log.debug("malloc keeps freed memory: mmap threshold %d bytes", threshold)
        return True


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _seed() -> int:
    """63 random bits from torch's default CPU generator (so torch.manual_seed repeats them)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def _lib() -> ctypes.CDLL:
    lib = _library()
    assert lib is not None, "trainer.kernels used where usable() is False"
    return lib


def normal(like: Tensor) -> Tensor:
    """A new tensor of ``like``'s shape of N(0, 1) draws (``like`` as for :func:`usable`)."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    _lib().bnn_normal(out.data_ptr(), out.numel(), _seed(), _threads())
    return out


class _Sample(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, mu: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
        w, sigma, eps = torch.empty_like(mu), torch.empty_like(mu), torch.empty_like(mu)
        ptrs = (mu.data_ptr(), rho.data_ptr(), w.data_ptr(), sigma.data_ptr(), eps.data_ptr())
        _lib().bnn_sample(*ptrs, mu.numel(), _seed(), _threads())
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(eps, rho)
        return w, sigma

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_w: Tensor | None, grad_sigma: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        grad_mu = grad_w if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_mu, None
        eps, rho = ctx.saved_tensors
        if grad_w is None:
            grad_w = torch.zeros_like(rho)
        grad_w = grad_w.contiguous()
        if grad_sigma is not None:
            grad_sigma = grad_sigma.contiguous()
        grad_rho = torch.empty_like(rho)
        _lib().bnn_sample_backward(
            grad_w.data_ptr(),
            None if grad_sigma is None else grad_sigma.data_ptr(),
            eps.data_ptr(),
            rho.data_ptr(),
            grad_rho.data_ptr(),
            rho.numel(),
            _threads(),
        )
        return grad_mu, grad_rho


def sample(mu: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """``(w, sigma)``: ``sigma = softplus(rho) + 1e-8`` and one draw ``w = mu + sigma * eps``,
    differentiable in ``mu`` and ``rho`` (through both outputs). Only for tensors that
    :func:`usable` accepts."""
    w, sigma = _Sample.apply(mu, rho)
    return w, sigma


def kl_sums(mu: Tensor, sigma: Tensor, mu_p: float) -> tuple[float, float, float]:
    """``(sum log sigma_i, sum sigma_i^2 + d_i^2, sum d_i)``, ``d_i = mu_i - mu_p``, each
    accumulated in float64 in one pass, blocks added in order (the same on any number of
    threads); for :class:`trainer.priors._SharedPriorKL`."""
    n = mu.numel()
    partials = torch.empty(3 * max(1, -(-n // BLOCK)), dtype=torch.float64)
    out = (ctypes.c_double * 3)()
    _lib().bnn_kl_sums(
        mu.data_ptr(), sigma.data_ptr(), mu_p, partials.data_ptr(), n, _threads(), out
    )
    return out[0], out[1], out[2]


def kl_backward(
    mu: Tensor, sigma: Tensor, mu_p: float, scale: float, grad: float
) -> tuple[Tensor, Tensor]:
    """``((mu - mu_p) * scale, sigma * scale - grad / sigma)`` in one pass."""
    g_mu, g_sigma = torch.empty_like(mu), torch.empty_like(sigma)
    _lib().bnn_kl_backward(
        mu.data_ptr(),
        sigma.data_ptr(),
        mu_p,
        scale,
        grad,
        g_mu.data_ptr(),
        g_sigma.data_ptr(),
        mu.numel(),
        _threads(),
    )
    return g_mu, g_sigma


def count_nonfinite(x: Tensor) -> int:
    """How many NaN and Inf values ``x`` (as for :func:`usable`) holds, in one read pass."""
    return int(_lib().bnn_count_nonfinite(x.data_ptr(), x.numel(), _threads()))


GradStats = tuple[float, float, float, int]


def _pointers(tensors: Sequence[Tensor | None]) -> Any:
    """A C array of the tensors' data pointers (NULL for None)."""
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _block_partials(sizes: Sequence[int], recorded: Sequence[bool]) -> tuple[Any, Tensor]:
    """Where each recorded tensor's block partials start (a C array) and the float64 buffer
    of 4 partials per block that ``fused.c``'s statistics write into (uninitialised: every
    block of a recorded tensor is written before its totals read it, and an empty tensor's
    totals read none)."""
    first, total = [], 0
    for n, r in zip(sizes, recorded, strict=True):
        first.append(total)
        total += max(1, -(-n // BLOCK)) if r else 0
    return (ctypes.c_int64 * len(sizes))(*first), torch.empty(
        max(1, 4 * total), dtype=torch.float64
    )


def _totals(out: Any, t: int) -> GradStats:
    """Tensor t's statistics from the kernels' output array."""
    return (out[4 * t], out[4 * t + 1], out[4 * t + 2], int(out[4 * t + 3]))


class Accumulators(NamedTuple):
    """One gradient's per-element accumulators (of its shape, contiguous, CPU): int16
    ``max_code`` and int32 ``nonfinite``, updated every recorded step; float32 ``sum_abs``
    (None: this step adds nothing to the mean, which samples fewer steps) and int32
    ``nonfinite_mean`` (None: ``nonfinite`` counts the mean's steps too) where the step adds
    to the mean."""

    sum_abs: Tensor | None
    max_code: Tensor
    nonfinite: Tensor
    nonfinite_mean: Tensor | None = None

    def check(self, like: Tensor) -> None:
        dtypes = (torch.float32, torch.int16, torch.int32, torch.int32)
        for a, dtype in zip(self, dtypes, strict=True):
            if a is not None:
                assert a.dtype == dtype and a.shape == like.shape and a.is_contiguous()


def _accumulator_arrays(accumulators: Sequence[Accumulators | None] | None) -> list[Any]:
    """The four C arrays of ``fused.c``'s calls (NULL entries for None), or four NULLs."""
    if accumulators is None:
        return [None] * 4
    return [_pointers([None if a is None else a[i] for a in accumulators]) for i in range(4)]


def grad_stats_many(
    grads: Sequence[Tensor],
    accumulators: Sequence[Accumulators] | None = None,
) -> list[GradStats]:
    """One step's statistics of each gradient, one pass over each and one call for all:
    ``(sum of g^2, sum |g|, max |g|, non-finite count)``, the sums in float64, ``|g|`` over
    the finite values only, the sum of squares NaN or Inf as a norm would be. With
    ``accumulators`` (:class:`Accumulators`), also, per element, ``max_code =
    max(max_code, bf16_code(|g|))`` where g is finite and ``nonfinite += 1`` where it is
    not, and, where ``sum_abs`` is given, ``sum_abs += |g|`` where g is finite (and
    ``nonfinite_mean += 1``, where given, where it is not). ``bf16_code`` is
    :func:`trainer.store.encode_bf16`'s code (0 to 0x7F7F, so int16 holds it); it is
    monotonic, so the largest code is the code of the largest |g|, what a version-2 epoch
    file stores."""
    k = len(grads)
    if k == 0:
        return []
    sizes = [g.numel() for g in grads]
    first, partials = _block_partials(sizes, [True] * k)
    if accumulators is not None:
        for a, g in zip(accumulators, grads, strict=True):
            a.check(g)
    acc = _accumulator_arrays(accumulators)
    out = (ctypes.c_double * (4 * k))()
    _lib().bnn_grad_stats(
        k,
        _pointers(grads),
        *acc,
        (ctypes.c_int64 * k)(*sizes),
        first,
        partials.data_ptr(),
        _threads(),
        out,
    )
    return [_totals(out, t) for t in range(k)]


class AdamHyper(ctypes.Structure):
    """One tensor's Adam step, as ``fused.c``'s ``adam_hyper`` (float32, as the update runs)."""

    _fields_ = [
        (name, ctypes.c_float)
        for name in (
            "beta1", "beta2", "eps", "weight_decay", "decay", "step_size", "bias2_sqrt", "pad"
        )
    ]  # fmt: skip


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    hypers: Sequence[AdamHyper],
    record: Sequence[int] | None = None,
    accumulators: Sequence[Accumulators | None] | None = None,
) -> list[GradStats | None]:
    """One Adam/AdamW update of every parameter in one pass over its memory (see
    ``fused.c``'s ``adam_range``; ``trainer.optim.RecordingAdam`` builds the arguments),
    with, where ``record[t]`` is 1, the raw gradient's statistics of :func:`grad_stats_many`
    taken in the same pass (2: and its per-element ``accumulators[t]`` updated too, as
    :func:`grad_stats_many` updates them).
    Returns each tensor's statistics, None where not recorded. Every tensor: plain float32,
    contiguous, CPU (the caller checks, e.g. with :func:`usable`)."""
    k = len(params)
    if k == 0:
        return []
    record = list(record) if record is not None else [0] * k
    sizes = [p.numel() for p in params]
    first, partials = _block_partials(sizes, [bool(r) for r in record])
    acc = _accumulator_arrays(accumulators)
    out = (ctypes.c_double * (4 * k))()
    _lib().bnn_adam(
        k,
        _pointers(params),
        _pointers(grads),
        _pointers(exp_avgs),
        _pointers(exp_avg_sqs),
        (AdamHyper * k)(*hypers),
        (ctypes.c_int32 * k)(*record),
        *acc,
        (ctypes.c_int64 * k)(*sizes),
        first,
        partials.data_ptr(),
        _threads(),
        out,
    )
    return [_totals(out, t) if record[t] else None for t in range(k)]
