"""RunStore and the epoch file: round trips, crash-safety rules, corruption, bad input."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.trainer.conftest import SnapshotFactory, assert_grads_equal, assert_tree_equal
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import GradLevel
from trainer.store import (
    SCHEMA_VERSION,
    RunStore,
    load_distribution_log,
    read_epoch_file,
    write_epoch_file,
)
from trainer.store import hdf5 as store_hdf5


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "data")
    yield s
    s.close()


def test_round_trip_every_array_dtype_and_shape(store: RunStore, make_snapshot: SnapshotFactory):
    snap = make_snapshot(3, metrics={"loss": 0.5, "nll": math.nan, "kl": math.inf, "x": -math.inf})
    run = store.create_run("rt", {"lr": 1e-3})
    info = store.write_epoch(run.id, snap)
    assert info.file == f"runs/{run.id}/epoch_000003.h5"
    assert info.size == (store.data_dir / info.file).stat().st_size
    assert len(info.checksum) == 64
    back = store.reader(run.id).snapshot(3)
    assert_tree_equal(snap.params, back.params)
    assert_grads_equal(snap.gradients, back.gradients)
    assert back.grad_level is GradLevel.ELEMENT
    assert back.layer_types == snap.layer_types
    assert list(back.metrics) == list(snap.metrics)
    assert back.metrics["loss"] == 0.5
    assert math.isnan(back.metrics["nll"])
    assert back.metrics["kl"] == math.inf
    assert back.metrics["x"] == -math.inf
    got = store.get_epoch(run.id, 3).metrics  # the catalog keeps NaN/Inf too
    assert math.isnan(got["nll"])
    assert got["kl"] == math.inf
    assert got["x"] == -math.inf


def test_layer_level_and_no_gradients_round_trip(store: RunStore, make_snapshot: SnapshotFactory):
    run = store.create_run("levels", {})
    layer = make_snapshot(0, grad_level=GradLevel.LAYER)
    none = make_snapshot(1, grad_level=None)
    store.write_epoch(run.id, layer)
    store.write_epoch(run.id, none)
    reader = store.reader(run.id)
    assert reader.gradients(0, "layer1")["weight"]["mu"]["mean_abs"].shape == ()
    assert_grads_equal(layer.gradients, reader.snapshot(0).gradients)
    assert reader.snapshot(1).gradients is None
    with pytest.raises(BnnError) as err:
        reader.gradients(1, "layer1")
    assert err.value.code is ErrorCode.NOT_FOUND


def test_file_layout_is_plain_hdf5(tmp_path: Path, make_snapshot: SnapshotFactory):
    big = {"big": (64, 40), "tiny": (2, 3)}
    snap = make_snapshot(7, layers=big, no_bias=())
    path = tmp_path / "e.h5"
    write_epoch_file(path, snap, run_id="abc")
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 2
        assert f.attrs["epoch"] == 7
        assert f.attrs["run_id"] == "abc"
        assert f.attrs["grad_level"] == "element"
        assert f["params/big"].attrs["type"] == "BayesLinear"
        big_mu = f["params/big/posterior/weight/mu"]
        assert big_mu.chunks is None  # posteriors: plain float32, memory-mapped by readers
        assert big_mu.dtype == np.float32
        stat = f["gradients/big/weight/mu/mean_abs"]  # bfloat16 codes, Blosc-compressed
        assert stat.dtype == np.uint16 and stat.attrs["encoding"] == "bfloat16"
        assert list(stat._filters) == ["32001"]
        tiny_mu = f["params/tiny/posterior/weight/mu"]
        assert tiny_mu.compression is None
        assert tiny_mu.chunks is None
        assert f["params/tiny/prior/bias/sigma"].shape == (1,)
        assert f["gradients/big/weight/rho/nonfinite"].dtype == np.int64
        assert f["gradients/big/step_norm"].shape == (4,)
        assert f["gradients/big/prior/weight/mu"].shape == (4,)
        assert f["metrics"].attrs["kl/layer1"] == 0.25
    assert_tree_equal(snap.params, read_epoch_file(path).params)


def test_rewrite_same_epoch_is_idempotent_and_other_content_conflicts(
    store: RunStore, make_snapshot: SnapshotFactory
):
    run = store.create_run("rw", {})
    first = store.write_epoch(run.id, make_snapshot(2))
    again = store.write_epoch(run.id, make_snapshot(2))
    assert again == first
    with pytest.raises(BnnError) as err:
        store.write_epoch(run.id, make_snapshot(2, seed=99))
    assert err.value.code is ErrorCode.CONFLICT
    path = store.epoch_path(run.id, 2)
    assert store.reader(run.id).epochs == [2]
    from trainer.store._paths import sha256_file

    assert sha256_file(path) == first.checksum  # the stored file was not replaced
    assert not [p for p in path.parent.iterdir() if ".tmp." in p.name]


def test_partial_reads_match_and_open_only_one_file(
    store: RunStore, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
):
    run = store.create_run("partial", {})
    snaps = [make_snapshot(e, layers={"a": (50, 30), "b": (3, 50)}) for e in range(3)]
    for snap in snaps:
        store.write_epoch(run.id, snap)
    reader = store.reader(run.id)
    opened: list[str] = []
    real_file = h5py.File
    monkeypatch.setattr(
        store_hdf5.h5py, "File", lambda p, *a, **k: opened.append(str(p)) or real_file(p, *a, **k)
    )
    full = snaps[1].params["a"]["posterior"]["weight"]["mu"]
    part = reader.array(1, "a", index=(slice(10, 20), slice(None, None, 3)))
    np.testing.assert_array_equal(part, full[10:20, ::3])
    assert part.dtype == np.float32
    assert (
        reader.array(1, "a", "prior", "bias", "sigma")[0]
        == snaps[1].params["a"]["prior"]["bias"]["sigma"][0]
    )
    row = reader.array(1, "b", stat="sigma", index=2)
    np.testing.assert_array_equal(row, snaps[1].params["b"]["posterior"]["weight"]["sigma"][2])
    only_b = reader.epoch_params(1, layers=["b"])
    assert list(only_b) == ["b"]
    assert_tree_equal(snaps[1].params["b"], only_b["b"])
    assert len(opened) == 4
    assert all(p.endswith("epoch_000001.h5") for p in opened)


def test_layer_order_is_kept(store: RunStore, make_snapshot: SnapshotFactory):
    order = {"layer2": (3, 2), "layer10": (2, 3), "layer1": (3, 2), "features.0": (2, 1, 3, 3)}
    run = store.create_run("order", {})
    store.write_epoch(run.id, make_snapshot(0, layers=order, no_bias=("layer10",)))
    reader = store.reader(run.id)
    assert reader.layers() == list(order)
    assert list(reader.epoch_params(0)) == list(order)
    assert list(reader.epoch_params(0, layers=["layer1", "layer2"])) == ["layer2", "layer1"]
    log = load_distribution_log(run.id, data_dir=store.data_dir)
    assert list(log[0]) == list(order)
    assert "bias" not in log[0]["layer10"]["posterior"]


def test_only_committed_epochs_are_visible(store: RunStore, make_snapshot: SnapshotFactory):
    run = store.create_run("vis", {})
    store.write_epoch(run.id, make_snapshot(0))
    run_dir = store.run_dir(run.id)
    # a complete file without a catalog row (killed between rename and commit) ...
    write_epoch_file(run_dir / "epoch_000001.h5", make_snapshot(1), run_id=run.id)
    # ... and a half-written temp file of a killed writer (dead pid, old mtime)
    stray = run_dir / "epoch_000002.h5.tmp.4999999.deadbeef"
    stray.write_bytes(b"\x89HDF\r\n half written")
    old = time.time() - 3600
    os.utime(stray, (old, old))
    reader = store.reader(run.id)
    assert reader.epochs == [0]
    assert [e.epoch for e in store.list_epochs(run.id)] == [0]
    with pytest.raises(BnnError) as err:
        reader.epoch_params(1)
    assert err.value.code is ErrorCode.NOT_FOUND
    assert err.value.details["epochs"] == [0]
    assert list(load_distribution_log(run.id, data_dir=store.data_dir)) == [0]
    # the next write of the run replaces the orphan and removes the stray temp file
    store.write_epoch(run.id, make_snapshot(1, seed=5))
    assert not stray.exists()
    assert reader.epochs == [0, 1]
    assert_tree_equal(make_snapshot(1, seed=5).params, reader.epoch_params(1))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "delete"])
def test_corrupt_epoch_file_is_reported_and_others_survive(
    store: RunStore, make_snapshot: SnapshotFactory, damage: str
):
    run = store.create_run("corrupt", {})
    infos = [store.write_epoch(run.id, make_snapshot(e, layers={"a": (40, 40)})) for e in range(3)]
    path = store.epoch_path(run.id, 1)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "flip":  # same size, inside the compressed weights: only the checksum sees it
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    else:
        path.unlink()
    reader = store.reader(run.id)
    with pytest.raises(BnnError) as err:
        reader.verify(1)
    assert err.value.code is ErrorCode.CORRUPT
    assert infos[1].file in str(err.value)
    if damage != "flip":
        with pytest.raises(BnnError) as err:
            reader.epoch_params(1)
        assert err.value.code is ErrorCode.CORRUPT
        assert infos[1].file in str(err.value)
    with pytest.raises(BnnError) as err:
        reader.verify()
    assert err.value.details["epochs"] == [1]
    for e in (0, 2):  # the other epochs are untouched and readable
        assert_tree_equal(make_snapshot(e, layers={"a": (40, 40)}).params, reader.epoch_params(e))
        reader.verify(e)
    assert [i.epoch for i in store.list_epochs(run.id)] == [0, 1, 2]


def test_import_epoch_file(store: RunStore, make_snapshot: SnapshotFactory, tmp_path: Path):
    run = store.create_run("import", {})
    src = tmp_path / "upload.h5"
    # no run id: a file written without one (another run's id is refused, see
    # tests/trainer/test_upload_validation.py)
    write_epoch_file(src, make_snapshot(4, metrics={"loss": math.nan}))
    before = src.read_bytes()
    info = store.import_epoch_file(run.id, 4, src)
    assert src.read_bytes() == before
    assert math.isnan(info.metrics["loss"])
    assert store.import_epoch_file(run.id, 4, src) == info  # retry of the same upload
    assert_tree_equal(make_snapshot(4).params, store.reader(run.id).epoch_params(4))
    with pytest.raises(BnnError) as err:
        store.import_epoch_file(run.id, 5, src)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert "holds epoch 4" in str(err.value)


def _edited_copy(src: Path, dst: Path, edit: str) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        if edit == "prior_shape":
            del f["params/layer1/prior/weight/mu"]
            f["params/layer1/prior/weight/mu"] = np.zeros(2, np.float32)
        elif edit == "sigma_shape":
            del f["params/layer1/posterior/weight/sigma"]
            f["params/layer1/posterior/weight/sigma"] = np.ones((5, 2), np.float32)
        elif edit == "int_dtype":
            del f["params/layer1/posterior/weight/mu"]
            f["params/layer1/posterior/weight/mu"] = np.ones((5, 3), np.int32)
        elif edit == "schema_version":
            f.attrs["schema_version"] = 3
        elif edit == "unknown_group":
            f["params/layer1/posterior/extra/mu"] = np.ones(1, np.float32)
        elif edit == "external_link":
            del f["params/layer1/posterior/weight/mu"]
            f["params/layer1/posterior/weight/mu"] = h5py.ExternalLink("/etc/passwd", "/x")
        elif edit == "layer_list":
            f.attrs["layers"] = '["layer1", "../../etc"]'
    return dst


@pytest.mark.parametrize(
    "edit",
    [
        "prior_shape",
        "sigma_shape",
        "int_dtype",
        "schema_version",
        "unknown_group",
        "external_link",
        "layer_list",
        "garbage",
    ],
)
def test_import_rejects_invalid_files(
    store: RunStore, make_snapshot: SnapshotFactory, tmp_path: Path, edit: str
):
    run = store.create_run("bad-import", {})
    good = tmp_path / "good.h5"
    write_epoch_file(good, make_snapshot(0), run_id=run.id)
    bad = tmp_path / f"{edit}.h5"
    if edit == "garbage":
        bad.write_bytes(b"not an hdf5 file at all" * 100)
    else:
        _edited_copy(good, bad, edit)
    with pytest.raises(BnnError) as err:
        store.import_epoch_file(run.id, 0, bad)
    assert err.value.code is ErrorCode.CORRUPT
    assert str(bad) in str(err.value)
    assert store.list_epochs(run.id) == []
    assert [p.name for p in store.run_dir(run.id).iterdir() if p.name != ".lock"] == []


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("slash", "layer name"),
        ("sigma_shape", "shape"),
        ("int_dtype", "dtype"),
        ("metric", "metric 'loss'"),
        ("no_prior", "missing keys ['prior']"),
        ("grad_shape", "gradients/layer1/weight/mu/mean_abs"),
        ("epoch", "epoch must be an integer"),
    ],
)
def test_bad_snapshot_is_invalid_argument(
    store: RunStore, make_snapshot: SnapshotFactory, edit: str, needle: str
):
    snap = make_snapshot(0)
    layer = snap.params["layer1"]
    if edit == "slash":
        snap.params["a/b"] = snap.params.pop("layer1")
        snap.gradients = None
    elif edit == "sigma_shape":
        layer["posterior"]["weight"]["sigma"] = np.ones((3, 5), np.float32)
    elif edit == "int_dtype":
        layer["posterior"]["bias"]["mu"] = np.ones(5, np.int64)
    elif edit == "metric":
        snap.metrics["loss"] = "low"  # type: ignore[assignment]
    elif edit == "no_prior":
        del layer["prior"]
    elif edit == "grad_shape":
        assert snap.gradients is not None
        snap.gradients["layer1"]["weight"]["mu"]["mean_abs"] = np.ones(7, np.float32)
    else:
        snap.epoch = -1
    run = store.create_run("bad", {})
    with pytest.raises(BnnError) as err:
        store.write_epoch(run.id, snap)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert needle in str(err.value)
    assert store.list_epochs(run.id) == []


def test_unwritable_data_dir_is_a_storage_error(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(BnnError) as err:
        RunStore(blocker / "data")
    assert err.value.code is ErrorCode.STORAGE
    assert str(blocker / "data") in str(err.value)


def test_unknown_run_and_missing_store(store: RunStore, tmp_path: Path):
    for bad in ("nope", "../etc", ""):
        with pytest.raises(BnnError) as err:
            store.get_run(bad)
        assert err.value.code is ErrorCode.NOT_FOUND
    missing = tmp_path / "missing"
    with pytest.raises(BnnError) as err:
        load_distribution_log("abc", data_dir=missing)
    assert err.value.code is ErrorCode.NOT_FOUND
    assert not missing.exists()


def test_delete_run_removes_rows_and_files(store: RunStore, make_snapshot: SnapshotFactory):
    keep = store.create_run("keep", {})
    gone = store.create_run("gone", {})
    for run in (keep, gone):
        store.write_epoch(run.id, make_snapshot(0))
    store.delete_run(gone.id)
    assert not store.run_dir(gone.id).exists()
    assert [r.id for r in store.list_runs()] == [keep.id]
    with pytest.raises(BnnError):
        store.list_epochs(gone.id)
    assert len(store.list_epochs(keep.id)) == 1


@pytest.mark.parametrize("compression", ["blosc", "none", "gzip", "lzf"])
def test_large_arrays_round_trip_under_each_compression(
    tmp_path: Path,
    make_snapshot: SnapshotFactory,
    monkeypatch: pytest.MonkeyPatch,
    compression: str,
):
    monkeypatch.setenv("BNN_HDF5_COMPRESSION", compression)
    snap = make_snapshot(0, layers={"big": (64, 48)}, no_bias=())
    zero = snap.gradients["big"]["weight"]["rho"]["nonfinite"]
    zero[...] = 0  # all-zero counts are stored gzip-compressed (fully written, tiny)
    store = RunStore(tmp_path / "data")
    run = store.create_run("c", {})
    store.write_epoch(run.id, snap)
    back = store.reader(run.id).snapshot(0)
    assert_tree_equal(snap.params, back.params)
    assert_grads_equal(snap.gradients, back.gradients)
    with h5py.File(store.epoch_path(run.id, 0), "r") as f:
        assert f["params/big/posterior/weight/mu"].chunks is None  # never compressed
        ds = f["gradients/big/weight/mu/max_abs"]
        assert ds.compression == {"blosc": "unknown", "none": None}.get(compression, compression)
        assert ("32001" in ds._filters) is (compression == "blosc")
        zeros = f["gradients/big/weight/rho/nonfinite"]
        assert zeros.compression == ("unknown" if compression == "blosc" else "gzip")
        assert zeros.id.get_num_chunks() == math.prod(
            -(-n // c) for n, c in zip(zeros.shape, zeros.chunks, strict=True)
        )
        assert 0 < zeros.id.get_storage_size() < zeros.size * zeros.dtype.itemsize // 10


def test_unknown_compression_is_named(tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch):
    monkeypatch.setenv("BNN_HDF5_COMPRESSION", "zstd")
    store = RunStore(tmp_path / "data")
    run = store.create_run("c", {})
    with pytest.raises(BnnError, match="zstd"):
        store.write_epoch(run.id, make_snapshot(0, layers={"big": (64, 48)}))
    assert store.list_epochs(run.id) == []
