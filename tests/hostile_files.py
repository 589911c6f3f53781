"""Hostile epoch files, built from a valid one: what an upload must refuse (4xx), and why.

Shared by tests/service/test_api_upload_hostile.py, tests/trainer/test_upload_validation.py
and benchmarks/hostile_uploads.py. Each builder takes a valid epoch file ``base`` (of the
run it is sent to) and writes a variant at ``out``; :data:`HOSTILE` maps a case name to
its builder and a word the refusal's message must contain.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

__all__ = [
    "FLIP_CASES",
    "HOSTILE",
    "TRUNCATIONS",
    "Builder",
    "bit_flip",
    "first_layer",
    "truncate",
]

Builder = Callable[[Path, Path], Path]


def first_layer(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return str(json.loads(f.attrs["layers"])[0])


def _copy(base: Path, out: Path) -> Path:
    shutil.copyfile(base, out)
    return out


def other_shapes(base: Path, out: Path) -> Path:
    """The first layer's weight two columns wider, consistently (posterior and gradients)."""
    _copy(base, out)
    layer = first_layer(base)
    with h5py.File(out, "r+") as f:
        shape = f[f"params/{layer}/posterior/weight/mu"].shape
        wider = (shape[0], shape[1] + 2, *shape[2:])
        names: list[str] = []
        f.visititems(
            lambda name, obj: (
                names.append(name)
                if isinstance(obj, h5py.Dataset)
                and obj.shape == shape
                and (name.startswith(f"params/{layer}/") or name.startswith(f"gradients/{layer}/"))
                else None
            )
        )
        for name in names:
            dtype, attrs = f[name].dtype, dict(f[name].attrs)  # e.g. a bfloat16 encoding
            del f[name]
            fill = 0.05 if name.endswith("sigma") else 0
            f.create_dataset(name, data=np.full(wider, fill, dtype)).attrs.update(attrs)
    return out


def sparse(base: Path, out: Path, shape: tuple[int, ...] = (6000, 6000)) -> Path:
    """A small file declaring one layer of ``shape`` float32 that is never written."""
    with h5py.File(base, "r") as src:
        attrs = dict(src.attrs)
    with h5py.File(out, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["layers"] = json.dumps(["layer1"])
        f.attrs["grad_level"] = "none"
        layer = f.create_group("params/layer1")
        for stat in ("mu", "sigma"):
            layer.create_dataset(f"posterior/weight/{stat}", shape=shape, dtype="f4")
            layer.create_dataset(f"prior/weight/{stat}", data=np.ones(1, "f4"))
        f.create_group("metrics").attrs["loss"] = 1.0
    return out


def unwritten_sigma(base: Path, out: Path) -> Path:
    """The run's own shapes, but the first layer's posterior sigma never written."""
    _copy(base, out)
    layer = first_layer(base)
    with h5py.File(out, "r+") as f:
        name = f"params/{layer}/posterior/weight/sigma"
        shape, dtype = f[name].shape, f[name].dtype
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype)
    return out


def unwritten_chunks(base: Path, out: Path) -> Path:
    """The run's own shapes; the first layer's posterior mu chunked with no chunk written."""
    _copy(base, out)
    layer = first_layer(base)
    with h5py.File(out, "r+") as f:
        name = f"params/{layer}/posterior/weight/mu"
        shape, dtype = f[name].shape, f[name].dtype
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype, chunks=True, compression="gzip")
    return out


def many_layers(base: Path, out: Path, n: int = 500) -> Path:
    """``n`` small layers (with per-element gradient statistics): a few MB."""
    with h5py.File(base, "r") as src:
        attrs = dict(src.attrs)
    rng = np.random.default_rng(0)
    names = [f"layer{i}" for i in range(n)]
    with h5py.File(out, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["layers"] = json.dumps(names)
        f.attrs["grad_level"] = "element"
        for name in names:
            for dist, shape in (("posterior", (20, 20)), ("prior", (1,))):
                for stat in ("mu", "sigma"):
                    value = rng.uniform(0.01, 0.1, shape).astype("f4")
                    f[f"params/{name}/{dist}/weight/{stat}"] = value
            for gp in ("mu", "rho"):
                for stat in ("mean_abs", "max_abs"):
                    f[f"gradients/{name}/weight/{gp}/{stat}"] = rng.random((20, 20)).astype("f4")
                f[f"gradients/{name}/weight/{gp}/nonfinite"] = np.zeros((20, 20), "i4")
            f[f"gradients/{name}/step_norm"] = rng.random(100)
        f.create_group("metrics").attrs["loss"] = 1.0
    return out


def other_run(base: Path, out: Path) -> Path:
    _copy(base, out)
    with h5py.File(out, "r+") as f:
        f.attrs["run_id"] = "someone-else"
    return out


def no_metrics(base: Path, out: Path) -> Path:
    _copy(base, out)
    with h5py.File(out, "r+") as f:
        del f["metrics"]
    return out


def _set_value(stat: str, value: float) -> Builder:
    def build(base: Path, out: Path) -> Path:
        _copy(base, out)
        layer = first_layer(base)
        with h5py.File(out, "r+") as f:
            ds = f[f"params/{layer}/posterior/weight/{stat}"]
            index = tuple(n // 2 for n in ds.shape)
            ds[index] = value
        return out

    build.__doc__ = f"one posterior weight {stat} of the first layer set to {value}"
    return build


def wrong_summary(base: Path, out: Path) -> Path:
    """The stored summary of the first layer's posterior weights claims another mean mu
    (the arrays as they were): readers trust stored summaries, so an upload may not."""
    _copy(base, out)
    with h5py.File(out, "r+") as f:
        ds = f["summary/params"]
        table = ds[()]
        column = json.loads(ds.attrs["columns"]).index("mu_mean")
        table[0, column] += 0.25
        ds[...] = table
    return out


def bit_flip(base: Path, out: Path, offset: int, bit: int = 0) -> Path:
    data = bytearray(base.read_bytes())
    data[offset] ^= 1 << bit
    out.write_bytes(bytes(data))
    return out


def truncate(base: Path, out: Path, size: int) -> Path:
    out.write_bytes(base.read_bytes()[:size])
    return out


def _flip_at(find: Callable[[Path], int], bit: int = 0) -> Builder:
    def build(base: Path, out: Path) -> Path:
        return bit_flip(base, out, find(base), bit)

    return build


def _sigma_offset(base: Path) -> int:
    """The byte holding the sign bit of the first layer's first posterior sigma element."""
    layer = first_layer(base)
    with h5py.File(base, "r") as f:
        ds = f[f"params/{layer}/posterior/weight/sigma"]
        offset = ds.id.get_offset()
        assert offset is not None and ds.dtype == np.float32, "a contiguous float32 sigma"
        return int(offset) + 3  # little-endian: the sign bit is the last byte's top bit


def _mu_offset(base: Path) -> int:
    """The byte holding the top exponent bit of the first element of mu in [1, 2): flipped,
    it becomes Inf or NaN. LookupError when there is none (a trained layer's small mu)."""
    layer = first_layer(base)
    with h5py.File(base, "r") as f:
        ds = f[f"params/{layer}/posterior/weight/mu"]
        values = np.abs(ds[()].reshape(-1))
        hits = np.flatnonzero((values >= 1) & (values < 2))
        if not hits.size:
            raise LookupError(f"no posterior mu of {layer} in [1, 2): no flip makes it Inf")
        index = int(hits[0])
        offset = ds.id.get_offset()
        assert offset is not None
        return int(offset) + 4 * index + 3


def _run_id_offset(base: Path) -> int:
    """The first byte of the file's run id (it must have one)."""
    with h5py.File(base, "r") as f:
        run_id = f.attrs["run_id"]
    needle = run_id.encode() if isinstance(run_id, str) else bytes(run_id)
    at = base.read_bytes().find(needle) if needle else -1
    assert at >= 0, f"no run id {needle!r} in {base}"
    return at


#: case -> (builder, a word the refusal names)
HOSTILE: dict[str, tuple[Builder, str]] = {
    "other_shapes": (other_shapes, "shape"),
    "sparse_6000x6000": (sparse, "array elements"),
    "unwritten_sigma": (unwritten_sigma, "written"),
    "unwritten_chunks": (unwritten_chunks, "chunks are written"),
    "500_layers": (many_layers, "layers"),
    "other_run_id": (other_run, "someone-else"),
    "no_metrics": (no_metrics, "metrics"),
    "sigma_nan": (_set_value("sigma", float("nan")), "sigma"),
    "sigma_inf": (_set_value("sigma", float("inf")), "sigma"),
    "sigma_zero": (_set_value("sigma", 0.0), "sigma"),
    "sigma_negative": (_set_value("sigma", -0.1), "sigma"),
    "mu_nan": (_set_value("mu", float("nan")), "mu"),
    "mu_inf": (_set_value("mu", float("-inf")), "mu"),
    "wrong_summary": (wrong_summary, "summary params/"),
}

#: bit flips at chosen places: (case, builder, a word the refusal names)
FLIP_CASES: dict[str, tuple[Builder, str]] = {
    "flip_signature": (_flip_at(lambda base: 0), "HDF5"),
    "flip_superblock_eof": (_flip_at(lambda base: 40, 6), "corrupt"),
    "flip_sigma_sign": (_flip_at(_sigma_offset, 7), "sigma"),
    "flip_mu_exponent": (_flip_at(_mu_offset, 6), "mu"),
    "flip_run_id": (_flip_at(_run_id_offset, 1), "belongs to run"),
}

#: truncations: the fraction of the file kept
TRUNCATIONS = (0.0001, 0.01, 0.25, 0.5, 0.9, 0.999)
