"""How small can an epoch file get without losing a bit? The lossless floor of the arrays a
version 2 file holds, against issue 11's target (per-element epoch file <= 40% of version 1).

Trains the 784-1200-1200-10 MLP (learnable prior, sigma0 0.1, Adam 1e-3, batch 128) on MNIST
for ``--steps`` steps with per-element gradient capture, capturing every ``--every`` steps
(``epoch_file_size.py``'s run), and takes the last capture: trained values, its statistics
over the last ``--every`` steps. That snapshot is written as version 1 and as version 2 (as written,
and with its posteriors compressed); then the arrays a version 2 file must hold without loss,
the posteriors' float32 ``mu`` and ``sigma`` and the statistics' bfloat16 codes (``mean_abs``
and ``max_abs`` of ``mu``'s and ``rho``'s gradients), are each coded with every lossless coder
tried here, on the whole model:

* ``raw``: the bytes themselves;
* ``as v2``: Blosc LZ4 with bit shuffle, 256 KB chunks (what version 2 stores; the posteriors
  only with ``compress_posteriors``);
* ``blosc zstd 9``: Blosc Zstd level 9 with bit shuffle, same chunks;
* ``zfp rev``: ZFP's reversible (lossless) mode, a coder made for floating-point arrays
  (float32 arrays only);
* ``xz``: LZMA (``--preset``, default 9 extreme) of the byte-shuffled bytes, one stream per
  array, no chunks (so no partial reads: a bound, not a format);
* ``entropy``: what an arithmetic coder with a static order-0 model would take (the model's
  table not counted): per byte plane for float32, per whole 16-bit code for the statistics;
* ``delta``: statistics only, order-0 entropy of each code's difference from a related
  statistic's (``max_abs`` from ``mean_abs`` of the same element, ``rho``'s from ``mu``'s);
* ``2-d``: statistics only, order-0 entropy of each code's residual from its neighbours'
  (the median edge detector of lossless image coding, LOCO-I; a weight matrix's gradient
  magnitudes are roughly an outer product of its rows' and columns' scales, which such a
  predictor removes).

Then it adds the best coder of each kind of array to the file's other bytes and prints that
smallest lossless file as a share of version 1, and what 40% would leave the statistics once
the posteriors take their smallest size: as bits per statistic, against the bits each carries.
Last, the lossy option: the statistics rounded to fewer of bfloat16's 7 mantissa bits
(``--mantissa-bits``; ``trainer.store._codec.round_bf16``, what ``bnn runs compact
--stat-bits N`` stores), coded as version 2 codes them and at their order-0 entropy, and the
file each would make.

    OMP_NUM_THREADS=2 python benchmarks/epoch_file_floor.py [--steps 300] [--every 30]
        [--preset 9] [--hidden 1200] [--dir /tmp] [--mantissa-bits 7,6,5,4,3,2]

The figures are coders tried, not a proof: no coder here gets below the printed floor, and a
model of these numbers that beats an order-0 coder by the margin 40% needs would have to
predict gradient magnitudes from other ones.
"""

from __future__ import annotations

import argparse
import lzma
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import h5py
import hdf5plugin
import numpy as np
from epoch_file_size import train

from trainer.snapshot import EpochSnapshot
from trainer.store import write_epoch_file
from trainer.store._codec import chunk_shape, encode_bf16, load_filters, round_bf16
from trainer.store._schema import GRAD_PARAMS
from trainer.store._write import ENCODED_STATS as STATS


def gather(snap: EpochSnapshot) -> dict[str, list[np.ndarray]]:
    """The arrays a version 2 file holds without loss, by kind, over the whole model."""
    out: dict[str, list[np.ndarray]] = {"posterior mu": [], "posterior sigma": []}
    for log in snap.params.values():
        for post in log["posterior"].values():
            if post["mu"].size > 1:
                out["posterior mu"].append(np.ascontiguousarray(post["mu"], np.float32))
                out["posterior sigma"].append(np.ascontiguousarray(post["sigma"], np.float32))
    assert snap.gradients is not None
    for g in snap.gradients.values():
        for param in ("weight", "bias"):
            for gp in GRAD_PARAMS:
                for stat in STATS:
                    arr = g.get(param, {}).get(gp, {}).get(stat)
                    if arr is not None:
                        key = f"statistics {gp} {stat}"
                        out.setdefault(key, []).append(encode_bf16(np.asarray(arr)))
    return out


def shuffled(arr: np.ndarray) -> bytes:
    """The bytes of ``arr`` grouped by byte plane (all first bytes, then all second ...)."""
    return np.ascontiguousarray(
        arr.reshape(-1).view(np.uint8).reshape(-1, arr.itemsize).T
    ).tobytes()


def entropy_bytes(symbols: np.ndarray) -> float:
    """Order-0 entropy of ``symbols`` (non-negative integers), in bytes."""
    counts = np.bincount(symbols.reshape(-1).astype(np.int64))
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    return float(-(counts * np.log2(counts / n)).sum() / 8)


def entropy(arrs: list[np.ndarray]) -> float:
    """Per byte plane for float32, per whole code for 16-bit codes."""
    total = 0.0
    for arr in arrs:
        if arr.dtype == np.uint16:
            total += entropy_bytes(arr)
        else:
            planes = arr.reshape(-1).view(np.uint8).reshape(-1, arr.itemsize)
            total += sum(entropy_bytes(planes[:, k]) for k in range(arr.itemsize))
    return total


def hdf5_bytes(arrs: list[np.ndarray], options: Callable[[np.ndarray], dict[str, Any]],
               where: Path) -> int:  # fmt: skip
    path = where / "coded.h5"
    with h5py.File(path, "w") as f:
        for i, arr in enumerate(arrs):
            f.create_dataset(str(i), data=arr, **options(arr))
    with h5py.File(path, "r") as f:
        stored = sum(f[k].id.get_storage_size() for k in f)
    path.unlink()
    return stored


def blosc(cname: Literal["lz4", "zstd"], clevel: int) -> Callable[[np.ndarray], dict[str, Any]]:
    def options(arr: np.ndarray) -> dict[str, Any]:
        if arr.size < 1024:
            return {}
        codec = hdf5plugin.Blosc(cname=cname, clevel=clevel, shuffle=hdf5plugin.Blosc.BITSHUFFLE)
        return {"chunks": chunk_shape(arr.shape, arr.itemsize), **codec}

    return options


def zfp(arr: np.ndarray) -> dict[str, Any]:
    return {"chunks": chunk_shape(arr.shape, arr.itemsize), **hdf5plugin.Zfp(reversible=True)}


def delta_entropy(found: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Each statistic coded as its difference from a related one (order-0 entropy): the
    maximum from the mean of the same element; rho's mean from mu's mean."""
    out: dict[str, float] = {}
    for gp in GRAD_PARAMS:
        mean, top = found[f"statistics {gp} mean_abs"], found[f"statistics {gp} max_abs"]
        out[f"statistics {gp} max_abs"] = sum(
            entropy_bytes((t.astype(np.int64) - m.astype(np.int64)) + (1 << 16))
            for m, t in zip(mean, top, strict=True)
        )
    mu, rho = found["statistics mu mean_abs"], found["statistics rho mean_abs"]
    out["statistics rho mean_abs"] = sum(
        entropy_bytes((r.astype(np.int64) - m.astype(np.int64)) + (1 << 16))
        for m, r in zip(mu, rho, strict=True)
    )
    out["statistics mu mean_abs"] = entropy(mu)
    return out


def med_residuals(codes: np.ndarray) -> np.ndarray:
    """The codes' residuals from the median edge detector of lossless image coding
    (LOCO-I / JPEG-LS): each code predicted from its left, upper and upper-left neighbours
    (a 2-D statistic as an image; the first row and column from their one neighbour, a 1-D
    one from its left), zigzagged to non-negative integers."""
    c = codes.astype(np.int64)
    if c.ndim != 2:
        c = c.reshape(1, -1)
    pred = np.zeros_like(c)
    pred[0, 1:] = c[0, :-1]
    pred[1:, 0] = c[:-1, 0]
    left, up, corner = c[1:, :-1], c[:-1, 1:], c[:-1, :-1]
    low, high = np.minimum(left, up), np.maximum(left, up)
    pred[1:, 1:] = np.where(corner >= high, low, np.where(corner <= low, high, left + up - corner))
    r = c - pred
    return np.where(r >= 0, 2 * r, -2 * r - 1)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument("--preset", type=int, default=9, choices=range(10), metavar="0-9")
    ap.add_argument("--hidden", type=int, default=1200, help="width of both hidden layers")
    ap.add_argument("--dir", default=None, help="where the temporary files go")
    ap.add_argument(
        "--mantissa-bits",
        default="7,6,5,4,3,2",
        help="the what-if: statistics rounded to these mantissa bits (7: bfloat16 as stored)",
    )
    args = ap.parse_args()
    if not 0 < args.every <= args.steps:
        ap.error(f"--every must be in 1..--steps ({args.steps}), got {args.every}")
    try:
        bits = [int(b) for b in args.mantissa_bits.split(",") if b.strip()]
    except ValueError:
        bits = [-1]
    if not bits or any(not 0 <= b <= 7 for b in bits):
        ap.error(f"--mantissa-bits must be integers in 0..7, got {args.mantissa_bits!r}")
    load_filters()
    snap = train(args.steps, args.every, args.hidden)[-1]  # the last capture: trained values
    found = gather(snap)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        where = Path(tmp)
        sizes = {}
        variants = {"v1": (1, False), "v2": (2, False), "v2 packed": (2, True)}
        for name, (version, packed) in variants.items():
            path = where / f"{name.replace(' ', '-')}.h5"
            write_epoch_file(path, snap, schema_version=version, compress_posteriors=packed)
            sizes[name] = path.stat().st_size
        stored_lossless = sum(sum(a.nbytes for a in arrs) for arrs in found.values())
        coders: dict[str, Callable[[list[np.ndarray]], float]] = {
            "raw": lambda arrs: sum(a.nbytes for a in arrs),
            "as v2": lambda arrs: hdf5_bytes(arrs, blosc("lz4", 5), where),
            "blosc zstd 9": lambda arrs: hdf5_bytes(arrs, blosc("zstd", 9), where),
            "zfp rev": lambda arrs: (
                hdf5_bytes(arrs, zfp, where) if arrs[0].dtype == np.float32 else math.nan
            ),
            "xz": lambda arrs: sum(
                len(lzma.compress(shuffled(a), preset=args.preset | lzma.PRESET_EXTREME))
                for a in arrs
            ),
            "entropy": entropy,
        }
        table: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        for kind, arrs in found.items():
            table[kind] = {name: float(code(arrs)) for name, code in coders.items()}
        deltas = delta_entropy(found)
        for kind, value in deltas.items():
            table[kind]["delta"] = value
            table[kind]["2-d"] = sum(entropy_bytes(med_residuals(a)) for a in found[kind])
        stat_kinds = [k for k in found if k.startswith("statistics")]
        what_if: dict[int, tuple[float, float]] = {}
        for b in bits:
            arrs = [round_bf16(a, b) for k in stat_kinds for a in found[k]]
            what_if[b] = (hdf5_bytes(arrs, blosc("lz4", 5), where), entropy(arrs))
        print(f"coded in {time.perf_counter() - t0:.0f} s\n")

    mb = 1e6
    names = [*coders, "delta", "2-d"]
    print(f"{'array (whole model), MB':<28}" + "".join(f"{n:>13}" for n in names))
    best: dict[str, float] = {}
    for kind, row in table.items():
        cells = [row.get(n, math.nan) for n in names]
        best[kind] = min(c for c in cells if not math.isnan(c))
        print(
            f"{kind:<28}"
            + "".join(f"{'-':>13}" if math.isnan(c) else f"{c / mb:>13.2f}" for c in cells)
        )
    posteriors = [k for k in table if k.startswith("posterior")]
    statistics = [k for k in table if k.startswith("statistics")]
    n_stats = sum(a.size for k in statistics for a in found[k])
    others_v2 = (
        sizes["v2"]
        - sum(table[k]["raw"] for k in posteriors)
        - sum(table[k]["as v2"] for k in statistics)
    )
    post_best = sum(best[k] for k in posteriors)
    stats_best = sum(best[k] for k in statistics)
    floor = post_best + stats_best + max(others_v2, 0.0)
    v1 = sizes["v1"]
    print(
        f"\nfiles: v1 {v1 / mb:.1f} MB; v2 {sizes['v2'] / mb:.1f} MB "
        f"({sizes['v2'] / v1:.0%} of v1); v2 with compressed posteriors "
        f"{sizes['v2 packed'] / mb:.1f} MB ({sizes['v2 packed'] / v1:.0%})"
    )
    print(
        f"lossless arrays of v2: {stored_lossless / mb:.1f} MB raw; everything else in a v2 "
        f"file (summaries, counts, metadata) {others_v2 / mb:.2f} MB"
    )
    print(
        f"smallest lossless file with the best coder of each array: {floor / mb:.1f} MB = "
        f"{floor / v1:.1%} of v1 (posteriors {post_best / mb:.1f} MB, statistics "
        f"{stats_best / mb:.1f} MB)"
    )
    budget = 0.40 * v1 - post_best - max(others_v2, 0.0)
    print(
        f"40% of v1 ({0.4 * v1 / mb:.1f} MB) leaves the {n_stats:,} statistics "
        f"{max(budget, 0.0) / mb:.1f} MB: {8 * max(budget, 0.0) / n_stats:.1f} bits each; "
        f"the best coder here needs {8 * stats_best / n_stats:.1f} bits (bfloat16 codes: 16)"
    )
    post_v2 = sum(table[k]["raw"] for k in posteriors)
    post_packed = sum(table[k]["as v2"] for k in posteriors)
    print(
        "\nthe statistics at fewer mantissa bits (lossy: `bnn runs compact --stat-bits`): "
        "their bytes and the file as a share of v1"
    )
    print(
        f"{'mantissa bits':>13} {'rel. error':>10} {'as v2, MB':>10} {'entropy, MB':>12} "
        f"{'file':>6} {'packed':>7} {'packed, entropy':>16}"
    )
    for b, (as_v2, ent) in what_if.items():
        print(
            f"{b:>13} {2.0 ** -(b + 1):>10.2%} {as_v2 / mb:>10.2f} {ent / mb:>12.2f} "
            f"{(post_v2 + as_v2 + others_v2) / v1:>6.1%} "
            f"{(post_packed + as_v2 + others_v2) / v1:>7.1%} "
            f"{(post_best + ent + others_v2) / v1:>16.1%}"
        )
    print(
        "(file: posteriors plain as v2 writes them; packed: posteriors with v2's Blosc; "
        "packed, entropy: both at the best coder found above)"
    )
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
