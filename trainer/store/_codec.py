"""How schema version 2 stores arrays: bfloat16 statistics, Blosc chunks, chunk shapes.

The layout and the reasons are in :mod:`trainer.store.hdf5`; this module holds the parts
that the writer and the reader share.

* **bfloat16.** A per-element gradient statistic (``mean_abs``, ``max_abs``) is stored as
  ``uint16`` holding the upper 16 bits of the float32 value, rounded to nearest (ties away
  from zero), with the dataset attribute ``encoding="bfloat16"``. :func:`encode_bf16` keeps
  three properties that the gradient diagnostics rely on: zero stays zero and a non-zero
  value never becomes zero (a tiny one becomes the smallest bfloat16 of its sign, 9.2e-41);
  a finite value never becomes infinite (one above the largest bfloat16, 3.39e38, becomes
  the largest); Inf stays Inf and NaN stays NaN. Decoding is exact:
  ``(codes.astype(uint32) << 16).view(float32)`` (:func:`decode_bf16`).
* **Fewer mantissa bits** (opt-in, lossy: ``bnn runs compact --stat-bits N``). The codes may
  keep only ``N`` (0-7) of bfloat16's 7 mantissa bits: :func:`round_bf16` rounds each code's
  magnitude to nearest, ties to even, keeping the three properties above, and the dataset
  gets the attribute ``mantissa_bits=N`` (absent: 7). The dropped bits are zero, so the bit
  shuffle hands Blosc whole planes of zeros. Readers need nothing new: the codes decode as
  any others.
* **Blosc.** Arrays of at least ``COMPRESS_MIN_SIZE`` elements are chunked and compressed
  with the Blosc filter (HDF5 filter id 32001; LZ4, level 5, bit shuffle but for integer
  arrays), which
  ``hdf5plugin`` provides to h5py: :func:`load_filters` imports it (once per process) before
  any epoch file is opened or written. :func:`blosc_header_problem` checks a stored chunk's
  Blosc header against the chunk it claims to be, before a file from elsewhere is decoded.
* **Chunks** (:func:`chunk_shape`) are C-order row blocks of about :data:`CHUNK_BYTES`, so
  a row range (or one element) decompresses a few chunks, not the whole array.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from trainer.errors import BnnError

__all__ = [
    "BF16_MANTISSA",
    "BFLOAT16",
    "BLOSC_FILTER",
    "CHUNK_BYTES",
    "ENCODING_ATTR",
    "MANTISSA_ATTR",
    "blosc_header_problem",
    "blosc_options",
    "chunk_shape",
    "decode_bf16",
    "encode_bf16",
    "first_unrounded",
    "load_filters",
    "round_bf16",
    "validate_compress_posteriors",
    "validate_stat_bits",
]

ENCODING_ATTR = "encoding"
BFLOAT16 = "bfloat16"
MANTISSA_ATTR = "mantissa_bits"
BF16_MANTISSA = 7  # bfloat16's mantissa bits: all of them kept (the default)
BLOSC_FILTER = 32001  # the HDF5 registered filter id of Blosc (c-blosc 1.x)
BLOSC_CLEVEL = 5
CHUNK_BYTES = 256 * 1024
BLOSC_HEADER = 16
_BLOSC_MEMCPYED = 0x02
_BLOCK = 1 << 16  # elements converted at a time, so the passes stay in the CPU cache
_F32_MAX = np.float32(np.finfo(np.float32).max)
_F32_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)
_loaded = False


def load_filters() -> None:
    """Register hdf5plugin's HDF5 filters (Blosc among them) with h5py, once per process.

    Importing ``hdf5plugin`` loads its filter libraries (about 30 ms), so it happens at the
    first epoch file opened or written, not when ``trainer.store`` is imported.
    """
    global _loaded
    if not _loaded:
        import hdf5plugin  # noqa: F401  (registers its filters when imported)

        _loaded = True


def blosc_options(bitshuffle: bool = True) -> dict[str, Any]:
    """``create_dataset`` keywords of the format's Blosc filter: LZ4, level 5, with bit
    shuffle (floats and bfloat16 codes: their high bits vary little) or without (integer
    counts, nearly all zero: as small, and faster)."""
    load_filters()
    import hdf5plugin

    shuffle = hdf5plugin.Blosc.BITSHUFFLE if bitshuffle else hdf5plugin.Blosc.NOSHUFFLE
    return dict(hdf5plugin.Blosc(cname="lz4", clevel=BLOSC_CLEVEL, shuffle=shuffle))


def chunk_shape(
    shape: tuple[int, ...], itemsize: int, target: int = CHUNK_BYTES
) -> tuple[int, ...]:
    """C-order row blocks of at most about ``target`` bytes (at least one element per axis).

    Leading axes are split first and trailing axes kept whole where they fit, so a chunk is
    one contiguous run of the array: ``(54, 1200)`` for a 1200x1200 float32 array.
    """
    chunk = [max(1, n) for n in shape]
    for axis, n in enumerate(shape):
        inner = itemsize * math.prod(shape[axis + 1 :])
        if inner * n <= target:
            break
        if inner <= target:
            chunk[axis] = max(1, target // inner)
            break
        chunk[axis] = 1
    return tuple(chunk)


def _as_float32(values: np.ndarray) -> np.ndarray:
    """``values`` as float32 without a finite value becoming infinite or a non-zero one zero."""
    arr = np.asarray(values)
    if arr.dtype == np.float32:
        return arr
    wide = arr.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = wide.astype(np.float32)
        over = np.isfinite(wide) & ~np.isfinite(out)
        under = (wide != 0) & (out == 0)
    if over.any():
        out[over] = np.copysign(_F32_MAX, wide[over])
    if under.any():
        out[under] = np.copysign(_F32_TINY, wide[under])
    return out


def _fix_specials(u: np.ndarray, codes: np.ndarray) -> None:
    """Correct the codes of NaN, overflowing, zero and tiny inputs in place (rare: the
    fast path of :func:`encode_bf16` calls this only for blocks that hold such codes)."""
    mag = u & np.uint32(0x7FFFFFFF)
    sign = ((u >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16)
    nan = mag > np.uint32(0x7F800000)
    over = (mag >= np.uint32(0x7F7F8000)) & (mag < np.uint32(0x7F800000))
    tiny = (mag != 0) & (mag < np.uint32(0x8000))
    zero = mag == 0
    codes[nan] = sign[nan] | np.uint16(0x7FC0)
    codes[over] = sign[over] | np.uint16(0x7F7F)
    codes[tiny] = sign[tiny] | np.uint16(0x0001)
    codes[zero] = sign[zero]


def encode_bf16(values: np.ndarray) -> np.ndarray:
    """bfloat16 codes (``uint16``, same shape) of ``values``; see the module docstring.

    Rounded to nearest, ties away from zero: the relative error is at most 2^-8 (0.39%)
    for |x| >= 2^-126 (1.2e-38), the absolute error at most 2^-134 below that.
    """
    src = _as_float32(values)
    u = np.ascontiguousarray(src).reshape(-1).view(np.uint32)
    codes = np.empty(u.size, np.uint16)
    tmp = np.empty(min(_BLOCK, u.size), np.uint32)
    mag = np.empty(min(_BLOCK, u.size), np.uint16)
    for start in range(0, u.size, _BLOCK):
        block = u[start : start + _BLOCK]
        out = codes[start : start + _BLOCK]
        t, m = tmp[: block.size], mag[: block.size]
        np.add(block, np.uint32(0x8000), out=t)  # magnitude + half a bfloat16 step
        np.right_shift(t, np.uint32(16), out=out, casting="unsafe")
        # every input that needs care gives a code of magnitude 0 or >= 0x7F80 here
        # (NaN wraps around to 0 or into the sign bit, overflow and Inf reach 0x7F80)
        np.bitwise_and(out, np.uint16(0x7FFF), out=m)
        if m.min() == 0 or m.max() >= 0x7F80:
            _fix_specials(block, out)
    return codes.reshape(src.shape)


def validate_compress_posteriors(value: object) -> bool | None:
    """``value`` as a ``compress_posteriors`` option (True, False or None: the writer's
    default); INVALID_ARGUMENT naming the value otherwise."""
    if value is not None and not isinstance(value, bool | np.bool_):
        raise BnnError.invalid(f"compress_posteriors must be True, False or None, got {value!r}")
    return None if value is None else bool(value)


def validate_stat_bits(bits: object) -> int:
    """``bits`` as the mantissa bits to keep of a statistic's bfloat16 codes (0-7);
    INVALID_ARGUMENT naming the value otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise BnnError.invalid(f"stat_bits must be an integer from 0 to 7, got {bits!r}")
    if not 0 <= bits <= BF16_MANTISSA:
        raise BnnError.invalid(f"stat_bits must be from 0 to {BF16_MANTISSA}, got {bits}")
    return int(bits)


def round_bf16(codes: np.ndarray, bits: int) -> np.ndarray:
    """bfloat16 ``codes`` with only ``bits`` (0-7) of their 7 mantissa bits: each finite
    code's magnitude rounded to nearest, ties to even (a new array; ``codes`` itself at 7).

    The encoding's properties stay: zero stays zero and a non-zero code never becomes zero
    (the smallest code of ``bits`` bits instead), a finite one never infinite (the largest
    instead), Inf and NaN stay as they are. Monotonic, and idempotent: codes already of
    ``bits`` bits are returned unchanged, so rounding a stored file's codes again to the same
    or more bits changes nothing. Codes rounded again to fewer bits may differ by one unit
    of the last kept bit from the original codes rounded once (a tie made by the first
    rounding). Relative error against the bfloat16 value: at most
    ``2**-(bits + 1)`` for normal numbers (6.25% at 3 bits); against the float32 statistic
    before encoding, at most that plus bfloat16's ``2**-8``.
    """
    bits = validate_stat_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype != np.uint16:
        raise TypeError(f"bfloat16 codes must be uint16, got {codes.dtype}")
    drop = BF16_MANTISSA - bits
    if drop == 0:
        return codes
    c = codes.astype(np.uint32)
    sign, mag = c & np.uint32(0x8000), c & np.uint32(0x7FFF)
    special = mag >= 0x7F80
    half = np.uint32((1 << (drop - 1)) - 1)
    odd = (mag >> np.uint32(drop)) & np.uint32(1)  # ties go to the even neighbour
    rounded = ((mag + half + odd) >> np.uint32(drop)) << np.uint32(drop)
    top = np.uint32((0x7F7F >> drop) << drop)  # the largest finite code of `bits` bits
    rounded = np.where(rounded >= 0x7F80, top, rounded)
    rounded = np.where((mag != 0) & (rounded == 0), np.uint32(1 << drop), rounded)
    return (sign | np.where(special, mag, rounded)).astype(np.uint16)


def first_unrounded(codes: np.ndarray, bits: int) -> int | None:
    """The flat index of the first finite code of ``codes`` with more than ``bits`` mantissa
    bits (a dropped bit set); None when there is none."""
    drop = BF16_MANTISSA - bits
    if drop <= 0 or not codes.size:
        return None
    c = np.asarray(codes, np.uint16).reshape(-1)
    low = (c & np.uint16((1 << drop) - 1)) != 0
    low &= (c & np.uint16(0x7F80)) != 0x7F80  # Inf and NaN keep their bits
    return int(np.argmax(low)) if low.any() else None


def decode_bf16(codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of bfloat16 ``codes`` (exact); into ``out`` (float32, same shape)."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint16:
        raise TypeError(f"bfloat16 codes must be uint16, got {codes.dtype}")
    if out is None:
        out = np.empty(codes.shape, np.float32)
    elif out.dtype != np.float32 or out.shape != codes.shape:
        raise ValueError(f"out must be float32 of shape {codes.shape}, got {out.dtype} {out.shape}")
    np.left_shift(codes, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    return out


def blosc_header_problem(header: bytes, itemsize: int, nbytes: int, stored: int) -> str | None:
    """Why a stored chunk is not the Blosc buffer of an ``nbytes``-byte chunk of items of
    ``itemsize`` bytes that is ``stored`` bytes long (None when its header fits).

    Checked before a chunk from elsewhere is decompressed: the filter sizes its output
    from this header, so a header claiming more than the chunk would cost more than the
    chunk's declared size.
    """
    if len(header) < BLOSC_HEADER or stored < BLOSC_HEADER:
        return f"is {stored} bytes, shorter than a Blosc header"
    version, _, flags, typesize = header[:4]
    size, block, cbytes = struct.unpack("<III", header[4:BLOSC_HEADER])
    if version == 0:
        return "has no Blosc header"
    if size != nbytes:
        return f"holds {size} bytes by its Blosc header, the chunk has {nbytes}"
    if cbytes != stored:
        return f"is {cbytes} bytes by its Blosc header, {stored} are stored"
    if typesize != (itemsize if itemsize <= 255 else 1):
        return f"has Blosc type size {typesize}, the dataset's items are {itemsize} bytes"
    if nbytes and not 0 < block <= nbytes:
        return f"has a Blosc block size of {block} bytes for a {nbytes}-byte chunk"
    if flags & _BLOSC_MEMCPYED and cbytes != nbytes + BLOSC_HEADER:
        return f"is stored uncompressed by its Blosc header, but {cbytes} bytes for {nbytes}"
    return None
