"""Epoch files from elsewhere, checked against the run (RunStore.import_epoch_file and
trainer.store.validate): hostile files are refused naming the problem, the run untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.hostile_files import FLIP_CASES, HOSTILE, TRUNCATIONS, many_layers, sparse, truncate
from tests.trainer.conftest import SnapshotFactory
from trainer.config import parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.store import EpochFile, RunStore, read_epoch_file, write_epoch_file
from trainer.store.validate import (
    Reference,
    UploadLimits,
    check_epoch_file,
    check_layout,
    config_layout,
    run_reference,
)

LAYERS = {"layer1": (10, 1), "layer2": (1, 10)}  # the regression model's (1 -> 10 -> 1)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "data")


def _files(store: RunStore, run_id: str) -> dict[str, str]:
    """sha256 of every file in the run's folder (the lock file included)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.run_dir(run_id).iterdir())
    }


def _pinned_run(store: RunStore, make_snapshot: SnapshotFactory) -> str:
    """A run without a configured model whose epoch 0 (stored by the trainer) pins LAYERS."""
    run = store.create_run("pinned", {})
    store.write_epoch(run.id, make_snapshot(0, layers=LAYERS, no_bias=()))
    return run.id


def _refused(store: RunStore, run_id: str, epoch: int, path: Path) -> BnnError:
    before = _files(store, run_id)
    epochs = store.list_epochs(run_id)
    with pytest.raises(BnnError) as err:
        store.import_epoch_file(run_id, epoch, path)
    assert _files(store, run_id) == before  # nothing added, nothing changed
    assert store.list_epochs(run_id) == epochs
    return err.value


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused_naming_the_problem(
    store: RunStore, make_snapshot: SnapshotFactory, tmp_path: Path, case: str
) -> None:
    run_id = _pinned_run(store, make_snapshot)
    base = tmp_path / "base.h5"
    write_epoch_file(base, make_snapshot(1, layers=LAYERS, no_bias=()), run_id=run_id)
    build, word = HOSTILE[case]
    err = _refused(store, run_id, 1, build(base, tmp_path / f"{case}.h5"))
    assert err.code in (ErrorCode.CORRUPT, ErrorCode.INVALID_ARGUMENT)
    assert word in err.message and str(tmp_path) in err.message, err.message
    store.import_epoch_file(run_id, 1, base)  # the valid file still goes in
    assert [e.epoch for e in store.list_epochs(run_id)] == [0, 1]


@pytest.mark.parametrize("case", sorted(FLIP_CASES))
def test_bit_flips_are_refused(
    store: RunStore, make_snapshot: SnapshotFactory, tmp_path: Path, case: str
) -> None:
    run_id = _pinned_run(store, make_snapshot)
    base = tmp_path / "base.h5"
    write_epoch_file(base, make_snapshot(1, layers=LAYERS, no_bias=()), run_id=run_id)
    build, word = FLIP_CASES[case]
    err = _refused(store, run_id, 1, build(base, tmp_path / f"{case}.h5"))
    assert word in err.message, err.message


@pytest.mark.parametrize("fraction", TRUNCATIONS)
def test_truncations_are_refused(
    store: RunStore, make_snapshot: SnapshotFactory, tmp_path: Path, fraction: float
) -> None:
    run_id = _pinned_run(store, make_snapshot)
    base = tmp_path / "base.h5"
    write_epoch_file(base, make_snapshot(1, layers=LAYERS, no_bias=()), run_id=run_id)
    cut = truncate(base, tmp_path / "cut.h5", int(base.stat().st_size * fraction))
    err = _refused(store, run_id, 1, cut)
    assert err.code is ErrorCode.CORRUPT and "HDF5" in err.message


def test_unwritten_arrays_are_refused_without_a_reference(store: RunStore, tmp_path: Path):
    """No epoch and no configured model: nothing pins the shapes, the storage check holds."""
    run = store.create_run("free", {})
    base = tmp_path / "base.h5"
    sparse(Path(_write(base, run.id)), tmp_path / "s.h5", (3000, 3000))
    assert run_reference(store, run.id) is None
    err = _refused(store, run.id, 0, tmp_path / "s.h5")
    assert err.code is ErrorCode.CORRUPT
    assert "(3000, 3000) float32 (36000000 bytes) but only 0 bytes are written" in err.message


def _write(path: Path, run_id: str, epoch: int = 0, **kwargs: object) -> Path:
    from tests.trainer.conftest import _snapshot

    kwargs.setdefault("layers", LAYERS)
    kwargs.setdefault("no_bias", ())
    write_epoch_file(path, _snapshot(epoch, **kwargs), run_id=run_id)  # type: ignore[arg-type]
    return path


def test_run_id_may_be_empty_but_not_another_run(store: RunStore, tmp_path: Path) -> None:
    run = store.create_run("ids", {})
    store.import_epoch_file(run.id, 0, _write(tmp_path / "empty.h5", ""))
    store.import_epoch_file(run.id, 1, _write(tmp_path / "own.h5", run.id, 1))
    err = _refused(store, run.id, 2, _write(tmp_path / "other.h5", "other-run", 2))
    assert err.code is ErrorCode.INVALID_ARGUMENT
    assert err.details["file_run_id"] == "other-run" and "belongs to run 'other-run'" in err.message


def test_the_first_epoch_pins_the_layout(store: RunStore, tmp_path: Path) -> None:
    run = store.create_run("first", {})
    store.import_epoch_file(run.id, 0, _write(tmp_path / "a.h5", run.id))
    ref = run_reference(store, run.id)
    assert (
        ref is not None
        and ref.source == "as epoch 0 of the run"
        and list(ref.layout) == list(LAYERS)
    )
    renamed = _write(tmp_path / "b.h5", run.id, 1, layers={"layer1": (10, 1), "other": (1, 10)})
    err = _refused(store, run.id, 1, renamed)
    assert "its layers are ['layer1', 'other'], the run's are ['layer1', 'layer2']" in err.message
    no_bias = _write(tmp_path / "c.h5", run.id, 1, no_bias=("layer2",))
    assert (
        "layer 'layer2' has arrays [] the run's epochs lack"
        in _refused(store, run.id, 1, no_bias).message
    )
    wide = _write(tmp_path / "d.h5", run.id, 1, layers={"layer1": (20, 3), "layer2": (1, 20)})
    err = _refused(store, run.id, 1, wide)
    assert "layer1/posterior/weight/mu has shape (20, 3) float32, the run's is (10, 1) float32" in (
        err.message
    )
    assert err.details["array"] == "layer1/posterior/weight/mu"
    f64 = tmp_path / "e.h5"
    _write(f64, run.id, 1)
    with h5py.File(f64, "r+") as f:
        for stat in ("mu", "sigma"):
            data = f[f"params/layer2/posterior/bias/{stat}"][()]
            del f[f"params/layer2/posterior/bias/{stat}"]
            f[f"params/layer2/posterior/bias/{stat}"] = data.astype(np.float64)
    assert "float64" in _refused(store, run.id, 1, f64).message


def test_the_configured_model_pins_the_first_epoch(store: RunStore, tmp_path: Path) -> None:
    config = parse_config({"dataset": "regression", "widths": [10]}).to_json_dict()
    run = store.create_run("configured", config)
    ref = run_reference(store, run.id)
    assert ref is not None and ref.source == "as the run's configured model" and not ref.dtypes
    assert ref.layout["layer1"]["posterior/weight/mu"] == ((10, 1), "float32")
    wrong = _write(tmp_path / "wrong.h5", run.id, layers={"layer1": (12, 1), "layer2": (1, 12)})
    err = _refused(store, run.id, 0, wrong)
    assert "the run's is (10, 1) (as the run's configured model)" in err.message
    store.import_epoch_file(run.id, 0, _write(tmp_path / "right.h5", run.id))


def test_config_layouts() -> None:
    mnist = config_layout(parse_config({"dataset": "mnist", "widths": [1200, 1200]}).to_json_dict())
    assert mnist is not None and list(mnist) == ["layer1", "layer2", "layer3"]
    assert mnist["layer1"]["posterior/weight/sigma"] == ((1200, 784), "float32")
    assert mnist["layer3"]["prior/bias/mu"] == ((1,), "float32")
    cnn = config_layout(parse_config({"dataset": "mnist", "model": "cnn"}).to_json_dict())
    assert cnn is not None and cnn["conv1"]["posterior/weight/mu"][0] == (16, 1, 3, 3)
    assert cnn["fc1"]["posterior/weight/mu"][0] == (128, 32 * 7 * 7)
    # a hand-made configuration describes no model; a huge one is not built
    assert config_layout({}) is None and config_layout({"lr": 0.1}) is None
    huge = parse_config({"dataset": "mnist", "widths": [4000, 4000]}).to_json_dict()
    assert config_layout(huge) is None
    assert config_layout({"dataset": "nope", "model": "mlp"}) is None


def test_limits(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    path = _write(tmp_path / "a.h5", "r")
    check_epoch_file(path, run_id="r", epoch=0)
    with pytest.raises(BnnError) as err:
        check_epoch_file(path, run_id="r", epoch=0, limits=UploadLimits(max_layers=1))
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert err.value.details == {
        "file": str(path),
        "limit": 1,
        "count": 2,
        "setting": "BNN_MAX_UPLOAD_LAYERS",
    }
    with pytest.raises(BnnError, match="array elements, more than the limit of 100"):
        check_epoch_file(path, run_id="r", epoch=0, limits=UploadLimits(max_elements=100))
    with pytest.raises(BnnError, match="4 metrics, more than the limit of 3"):
        check_epoch_file(path, run_id="r", epoch=0, limits=UploadLimits(max_metrics=3))
    # many members in one group, e.g. evaluation arrays
    with h5py.File(path, "r+") as f:
        for i in range(70):
            f[f"evaluation/e{i}"] = np.zeros(3)
    with pytest.raises(BnnError, match="70 members in /evaluation, more than the limit of 64"):
        check_epoch_file(path, run_id="r", epoch=0)
    # many small chunks
    chunked = tmp_path / "c.h5"
    write_epoch_file(chunked, make_snapshot(0, layers={"big": (64, 48)}), run_id="r")
    with h5py.File(chunked, "r+") as f:
        data = f["params/big/posterior/weight/mu"][()]
        del f["params/big/posterior/weight/mu"]
        f.create_dataset("params/big/posterior/weight/mu", data=data, chunks=(1, 48))
    check_epoch_file(chunked, run_id="r", epoch=0)
    with pytest.raises(BnnError, match="64 stored chunks, more than the limit of 10"):
        check_epoch_file(chunked, run_id="r", epoch=0, limits=UploadLimits(max_chunks=10))


def test_many_layers_are_refused_before_they_are_read(tmp_path: Path) -> None:
    base = _write(tmp_path / "a.h5", "r")
    path = many_layers(base, tmp_path / "many.h5", 500)
    with pytest.raises(BnnError) as err:
        EpochFile(path, limits=UploadLimits())
    assert "500 layers, more than the limit of 64" in err.value.message
    with EpochFile(path) as ef:  # without limits (files of this store) it opens
        assert len(ef.header.layers) == 500


def test_project_files_pass_under_every_compression(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = make_snapshot(0, layers={"big": (64, 48), "small": (3, 2)})
    snap.gradients["big"]["weight"]["rho"]["nonfinite"][...] = 0  # type: ignore[index]
    snap.evaluation = {"nll": np.ones(2000), "error": np.zeros(2000)}
    for compression in ("none", "gzip", "lzf"):
        monkeypatch.setenv("BNN_HDF5_COMPRESSION", compression)
        path = tmp_path / f"{compression}.h5"
        write_epoch_file(path, snap, run_id="r")
        check_epoch_file(path, run_id="r", epoch=0)


def test_older_files_with_unwritten_zero_counts_are_accepted(
    store: RunStore, make_snapshot: SnapshotFactory, tmp_path: Path
) -> None:
    """Older writers left all-zero non-finite counts as chunked datasets never written
    (fill value 0): accepted (bounded by the shapes and limits), read as zeros. A float
    array stored that way, or counts with another fill value, are not."""
    run = store.create_run("old", {})
    path = tmp_path / "old.h5"
    snap = make_snapshot(0, layers={"big": (64, 48)})
    write_epoch_file(path, snap, run_id=run.id, summaries=False)  # older writers: none
    name = "gradients/big/weight/rho/nonfinite"

    def unwritten(target: Path, dataset: str, fill: int = 0) -> Path:
        with h5py.File(target, "r+") as f:
            shape, dtype, attrs = f[dataset].shape, f[dataset].dtype, dict(f[dataset].attrs)
            del f[dataset]
            ds = f.create_dataset(dataset, shape=shape, dtype=dtype, chunks=True, fillvalue=fill)
            ds.attrs.update(attrs)  # e.g. the bfloat16 encoding of a statistic
        return target

    unwritten(path, name)
    store.import_epoch_file(run.id, 0, path)
    back = read_epoch_file(store.epoch_path(run.id, 0))
    assert not back.gradients["big"]["weight"]["rho"]["nonfinite"].any()  # type: ignore[index]
    bad = tmp_path / "bad.h5"
    write_epoch_file(bad, make_snapshot(1, layers={"big": (64, 48)}), run_id=run.id)
    unwritten(bad, "gradients/big/weight/rho/max_abs")
    assert "0 of its" in _refused(store, run.id, 1, bad).message
    write_epoch_file(bad, make_snapshot(1, layers={"big": (64, 48)}), run_id=run.id)
    unwritten(bad, name, fill=7)
    assert "0 of its" in _refused(store, run.id, 1, bad).message


def test_values_are_checked_in_blocks(tmp_path: Path) -> None:
    """A NaN far into a large array is found reading a block at a time; the error names
    the layer and the array, and where."""
    path = _write(tmp_path / "a.h5", "r", layers={"layer1": (300, 200), "layer2": (1, 300)})
    for chunks in (None, (7, 13)):
        with h5py.File(path, "r+") as f:
            name = "params/layer1/posterior/weight/sigma"
            data = f[name][()]
            data[299, 199] = -1.0
            del f[name]
            f.create_dataset(name, data=data, chunks=chunks)
        with EpochFile(path) as ef, pytest.raises(BnnError) as err:
            ef.check_values(block=1000)
        assert err.value.details["array"] == "layer1/posterior/weight/sigma"
        assert err.value.details["layer"] == "layer1"
        assert "found -1.0 at index (299, 199)" in err.value.message


def test_layout_differences_name_the_reference() -> None:
    ref = Reference({"a": {"posterior/weight/mu": ((1,), "float32")}}, "as epoch 3 of the run")
    layout = {"b": {"posterior/weight/mu": ((1,), "float32")}}
    with pytest.raises(BnnError, match=r"the run's are \['a'\] \(as epoch 3 of the run\)"):
        check_layout(layout, ref, "x")
