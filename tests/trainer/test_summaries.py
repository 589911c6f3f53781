"""The summaries an epoch file keeps (``/summary``, trainer.store.summaries): written with
the epoch, read back bit for bit equal to what the arrays give, absent from older files,
checked on receipt (a file from elsewhere cannot plant wrong ones), added by compaction."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.trainer.conftest import SnapshotFactory
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot, GradLevel
from trainer.store import EpochFile, RunStore, read_epoch_file, summaries, write_epoch_file
from trainer.store.compact import compact_run
from trainer.store.summaries import (
    GRAD_COLUMNS,
    PARAM_COLUMNS,
    SUMMARY_VERSION,
    EpochSummaries,
    add_layer,
)
from trainer.store.validate import UploadLimits, check_epoch_file

LAYERS = {"big": (300, 200), "conv": (4, 2, 3, 3), "out": (2, 5)}


def _hard_snapshot(make_snapshot: SnapshotFactory, epoch: int = 0, **kw: Any) -> EpochSnapshot:
    """Non-finite posteriors and gradients, a zero statistic, a layer without bias."""
    snap = make_snapshot(epoch, layers=LAYERS, **kw)
    post = snap.params["big"]["posterior"]["weight"]
    post["mu"][0, :3] = [np.nan, np.inf, 1.0]
    post["sigma"][1, :2] = [0.0, -1.0]
    if snap.gradients is not None and snap.grad_level is GradLevel.ELEMENT:
        stats = snap.gradients["big"]["weight"]["mu"]
        stats["mean_abs"][0, :4] = [np.inf, np.nan, 0.0, 1e-41]
        stats["max_abs"][0, :2] = [np.inf, 3e38]
        stats["nonfinite"][...] = 0
        stats["nonfinite"][0, :2] = [3, 1]
        stats["nonfinite"][5, 5] = 2
    return snap


def _bits(x: Any) -> Any:
    """Every number as its exact bits (NaN as NaN), for comparing records exactly."""
    if isinstance(x, np.ndarray):
        return ("array", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, float):
        return "nan" if math.isnan(x) else struct.pack("<d", x)
    if isinstance(x, tuple | list):
        return tuple(_bits(v) for v in x)
    if hasattr(x, "__dataclass_fields__"):
        return (type(x).__name__, *(_bits(getattr(x, f)) for f in x.__dataclass_fields__))
    return x


def _from_arrays(path: Path) -> EpochSummaries:
    """What the arrays of the file give, computed as a reader would."""
    snap = read_epoch_file(path)
    out = EpochSummaries()
    for layer, log in snap.params.items():
        add_layer(out, layer, log, (snap.gradients or {}).get(layer))
    return out


@pytest.mark.parametrize("level", [GradLevel.ELEMENT, GradLevel.LAYER, None])
def test_stored_summaries_equal_the_arrays_bit_for_bit(
    tmp_path: Path, make_snapshot: SnapshotFactory, level: GradLevel | None
) -> None:
    snap = _hard_snapshot(make_snapshot, grad_level=level)
    path = tmp_path / "e.h5"
    write_epoch_file(path, snap, run_id="r")
    with EpochFile(path) as ef:
        ef.validate(UploadLimits())
        assert ef.summary_version() == SUMMARY_VERSION
        stored = ef.summaries()
    assert stored is not None
    want = _from_arrays(path)
    assert list(stored.params) == list(want.params)
    assert list(stored.gradients) == list(want.gradients)
    for key, s in stored.params.items():
        assert _bits(s) == _bits(want.params[key]), key
    for key, g in stored.gradients.items():
        assert _bits(g) == _bits(want.gradients[key]), key
    params = {k[:2] for k in stored.params}
    assert ("out", "posterior") in params and ("out", "posterior", "bias") not in stored.params
    big = stored.params[("big", "posterior", "weight")]
    assert big.shape == (300, 200) and big.nonfinite == 4  # NaN, Inf mu; 0, -1 sigma
    assert big.sums.n == 300 * 200 - 4
    assert stored.params[("conv", "posterior", "weight")].shape == (4, 2, 3, 3)
    prior = stored.params[("big", "prior", "weight")]
    assert prior.prior_mu == prior.mu_percentiles[0] == big.prior_mu
    if level is GradLevel.ELEMENT:
        g = stored.gradients[("big", "weight", "mu", "mean_abs")]
        assert (g.element_level, g.nonfinite_elements, g.nonfinite_steps) == (True, 3, 6)
        assert g.zeros == 1 and np.isfinite(g.peak) and g.peak >= g.max
        peak = stored.gradients[("big", "weight", "mu", "max_abs")].peak
        assert peak == pytest.approx(3e38, rel=2**-8)  # bfloat16-rounded, as stored
    elif level is GradLevel.LAYER:
        assert not stored.gradients[("big", "weight", "rho", "mean_abs")].element_level
    else:
        assert not stored.gradients


def test_the_layout(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    path = tmp_path / "e.h5"
    write_epoch_file(path, make_snapshot(0, layers=LAYERS), run_id="r")
    with h5py.File(path, "r") as f:
        group = f["summary"]
        assert group.attrs["version"] == SUMMARY_VERSION and sorted(group) == [
            "gradients",
            "params",
        ]
        params, grads = group["params"], group["gradients"]
        assert params.dtype == np.float64 and params.shape == (10, len(PARAM_COLUMNS))
        assert json.loads(params.attrs["columns"]) == list(PARAM_COLUMNS)
        assert json.loads(params.attrs["shapes"])[:2] == [[300, 200], [1]]
        assert grads.shape == (5 * 2 * 2, len(GRAD_COLUMNS))  # 5 parameters, mu/rho, 2 stats
        assert json.loads(grads.attrs["columns"]) == list(GRAD_COLUMNS)
        # layer, dist, param indices: big posterior weight, big prior weight
        np.testing.assert_array_equal(params[:2, :3], [[0, 0, 0], [0, 1, 0]])


def test_older_files_and_other_versions_have_none(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    snap = make_snapshot(0, layers=LAYERS)
    for name, kw in (("v1", {"schema_version": 1}), ("bare", {"summaries": False})):
        path = tmp_path / f"{name}.h5"
        write_epoch_file(path, snap, run_id="r", **kw)
        with EpochFile(path) as ef:
            ef.validate(UploadLimits())
            assert ef.summary_version() is None and ef.summaries() is None
        with h5py.File(path, "r") as f:
            assert "summary" not in f
    fixture = Path(__file__).parent / "data" / "epoch_v1.h5"
    with EpochFile(fixture) as ef:
        assert ef.summaries() is None
    newer = tmp_path / "newer.h5"
    write_epoch_file(newer, snap, run_id="r")
    with h5py.File(newer, "r+") as f:
        f["summary"].attrs["version"] = SUMMARY_VERSION + 1
    with EpochFile(newer) as ef:  # another version: ignored by readers, valid here
        ef.validate()
        assert ef.summary_version() == SUMMARY_VERSION + 1 and ef.summaries() is None


def test_a_model_too_large_for_the_shapes_attribute_is_written_without(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(summaries, "MAX_SHAPES_BYTES", 10)
    path = tmp_path / "e.h5"
    write_epoch_file(path, make_snapshot(0, layers=LAYERS), run_id="r")
    with EpochFile(path) as ef:
        ef.validate()
        assert ef.summaries() is None


# ----------------------------------------------------------------------------- files from elsewhere
def _edit_table(path: Path, table: str, row: int, column: str, value: float) -> None:
    with h5py.File(path, "r+") as f:
        ds = f[f"summary/{table}"]
        data = ds[()]
        data[row, json.loads(ds.attrs["columns"]).index(column)] = value
        ds[...] = data


def _refusal(path: Path) -> BnnError:
    with pytest.raises(BnnError) as err:
        check_epoch_file(path, run_id="r", epoch=0, limits=UploadLimits())
    assert err.value.code is ErrorCode.CORRUPT, err.value
    return err.value


def _valid(tmp_path: Path, make_snapshot: SnapshotFactory, name: str) -> Path:
    path = tmp_path / f"{name}.h5"
    write_epoch_file(path, make_snapshot(0, layers=LAYERS), run_id="r")
    check_epoch_file(path, run_id="r", epoch=0, limits=UploadLimits())
    return path


def test_wrong_summaries_from_elsewhere_are_refused_naming_them(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    row_of = {"big/posterior/weight": 0, "big/prior/weight": 1, "conv/posterior/bias": 6}
    cases: list[tuple[str, str, str, str, float, str]] = [
        # (case, table, row key, column, new value, what the message says)
        ("mean", "params", "big/posterior/weight", "mu_mean", 0.5, "mu_mean is 0.5"),
        ("kl", "params", "conv/posterior/bias", "pairwise_kl", 1e9, "pairwise_kl is 1000000000.0"),
        ("pct", "params", "big/posterior/weight", "sigma_p50", 0.05, "sigma_p50 is 0.05"),
        ("prior", "params", "big/prior/weight", "prior_sigma", 2.0, "prior_sigma is 2.0"),
        ("nan", "params", "big/posterior/weight", "sum_variance", math.nan, "sum_variance"),
        ("nonfinite", "params", "big/posterior/weight", "nonfinite", 3, "nonfinite is 3"),
        ("zeros", "gradients", "big/weight/mu/mean_abs", "zeros", 7, "zeros is 7"),
        ("median", "gradients", "big/weight/mu/mean_abs", "median", 9.0, "median is 9.0"),
        ("peak", "gradients", "big/weight/mu/max_abs", "peak", 1e30, "peak is 1e+30"),
    ]
    for case, table, key, column, value, needle in cases:
        path = _valid(tmp_path, make_snapshot, case)
        row = row_of.get(key, 1 if key.endswith("max_abs") else 0)
        _edit_table(path, table, row, column, value)
        err = _refusal(path)
        assert err.details["summary"] == f"{table}/{key}", (case, err.message)
        assert needle in err.message and "its arrays give" in err.message, (case, err.message)


def test_missing_extra_and_unknown_summaries_are_refused(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    path = _valid(tmp_path, make_snapshot, "missing")
    with h5py.File(path, "r+") as f:  # the last gradient row dropped
        ds = f["summary/gradients"]
        data, columns = ds[()], ds.attrs["columns"]
        del f["summary/gradients"]
        f["summary/gradients"] = data[:-1]
        f["summary/gradients"].attrs["columns"] = columns
    assert "missing, though the file has its arrays" in _refusal(path).message
    path = _valid(tmp_path, make_snapshot, "extra")  # a row for the bias "out" lacks
    with h5py.File(path, "r+") as f:
        ds = f["summary/params"]
        data, attrs = ds[()], dict(ds.attrs)
        extra = data[-1].copy()
        extra[:3] = [2, 0, 1]  # out, posterior, bias
        del f["summary/params"]
        f["summary/params"] = np.vstack([data, extra])
        shapes = json.loads(attrs["shapes"])
        attrs["shapes"] = json.dumps([*shapes, [2]])
        f["summary/params"].attrs.update(attrs)
    err = _refusal(path)
    assert err.details["summary"] == "params/out/posterior/bias" and "lacks" in err.message
    path = _valid(tmp_path, make_snapshot, "newer")
    with h5py.File(path, "r+") as f:
        f["summary"].attrs["version"] = SUMMARY_VERSION + 1
    assert f"of version {SUMMARY_VERSION + 1}; this library checks" in _refusal(path).message


def test_malformed_summaries_are_corrupt(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    def edit(name: str, change: Any) -> str:
        path = _valid(tmp_path, make_snapshot, name)
        with h5py.File(path, "r+") as f:
            change(f)
        message = _refusal(path).message
        with EpochFile(path) as ef, pytest.raises(BnnError):  # readers too: CORRUPT
            ef.validate()
        return message

    def replace(f: h5py.File, name: str, data: Any, keep: bool = True) -> None:
        attrs = dict(f[name].attrs)
        del f[name]
        f[name] = data
        if keep:
            f[name].attrs.update(attrs)

    assert "must be float64" in edit(
        "f32", lambda f: replace(f, "summary/params", f["summary/params"][()].astype("f4"))
    )
    assert "columns" in edit(
        "cols", lambda f: f["summary/params"].attrs.__setitem__("columns", '["a"]')
    )
    assert "one shape per row" in edit(
        "shapes", lambda f: f["summary/params"].attrs.__setitem__("shapes", "[[1]]")
    )
    assert "indices within range" in edit(
        "index", lambda f: _edit_table_open(f, "params", 0, "layer", 0.5)
    )
    assert "names a row twice" in edit(
        "twice", lambda f: _edit_table_open(f, "params", 1, "dist", 0)
    )
    assert "integer version" in edit(
        "version", lambda f: f["summary"].attrs.__setitem__("version", "1")
    )
    assert "not params, gradients" in edit("member", lambda f: f.create_group("summary/extra"))
    assert "not params, gradients" in edit(
        "link", lambda f: f["summary"].__setitem__("more", h5py.SoftLink("/params"))
    )


def _edit_table_open(f: h5py.File, table: str, row: int, column: str, value: float) -> None:
    ds = f[f"summary/{table}"]
    data = ds[()]
    data[row, json.loads(ds.attrs["columns"]).index(column)] = value
    ds[...] = data


def test_sums_another_machine_rounds_differently_are_accepted(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    """A log rounded differently elsewhere moves sum_log_sigma by far less than 1e-9 of its
    size: accepted; every count, percentile and gradient statistic must be identical."""
    path = _valid(tmp_path, make_snapshot, "rounded")
    with EpochFile(path) as ef:
        stored = ef.summaries()
    assert stored is not None
    value = stored.params[("big", "posterior", "weight")].sums.sum_log_sigma
    _edit_table(path, "params", 0, "sum_log_sigma", value * (1 + 1e-13))
    check_epoch_file(path, run_id="r", epoch=0, limits=UploadLimits())
    _edit_table(path, "params", 0, "sum_log_sigma", value * (1 + 1e-6))
    assert "sum_log_sigma" in _refusal(path).message


def test_an_honest_upload_with_summaries_is_stored_as_sent(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    with RunStore(tmp_path / "data") as store:
        run = store.create_run("up", {})
        path = tmp_path / "e.h5"
        write_epoch_file(path, _hard_snapshot(make_snapshot), run_id=run.id)
        with h5py.File(path, "r+") as f:  # uploads must have finite values: make them so
            for stat, value in (("mu", 0.0), ("sigma", 0.05)):
                ds = f[f"params/big/posterior/weight/{stat}"]
                data = ds[()]
                data[~np.isfinite(data) | (data <= 0 if stat == "sigma" else False)] = value
                ds[...] = data
        with pytest.raises(BnnError, match="summary params/big/posterior/weight"):
            store.import_epoch_file(run.id, 0, path)  # the arrays changed, the summary not
        write_epoch_file(path, make_snapshot(0, layers=LAYERS), run_id=run.id)
        info = store.import_epoch_file(run.id, 0, path)
        assert store.epoch_path(run.id, 0).read_bytes() == path.read_bytes()
        assert info.size == path.stat().st_size
        assert store.fsck().clean


# ----------------------------------------------------------------------------- compaction
def test_compact_adds_summaries_to_files_without_them(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.store import runstore

    data = tmp_path / "data"
    with RunStore(data) as store:
        run = store.create_run("old", {}).id
        with monkeypatch.context() as m:  # files as the previous version wrote them
            bare = lambda path, snap, **kw: write_epoch_file(path, snap, summaries=False, **kw)  # noqa: E731
            m.setattr(runstore, "write_epoch_file", bare)
            for epoch in range(3):
                store.write_epoch(run, _hard_snapshot(make_snapshot, epoch))
        store.write_epoch(run, _hard_snapshot(make_snapshot, 3))  # this one has them
        snaps = {e: read_epoch_file(store.epoch_path(run, e)) for e in range(4)}
        store.set_status(run, "completed")
        report = compact_run(store, run)
        assert [(e.epoch, e.action, e.detail) for e in report.epochs] == [
            (0, "compacted", "summaries added"),
            (1, "compacted", "summaries added"),
            (2, "compacted", "summaries added"),
            (3, "skipped", "schema_version 2"),
        ]
        for epoch in range(4):
            path = store.epoch_path(run, epoch)
            with EpochFile(path) as ef:
                stored = ef.summaries()
            assert stored is not None
            want = _from_arrays(path)
            assert _bits(list(stored.params.values())) == _bits(list(want.params.values()))
            back = read_epoch_file(path)
            for layer in LAYERS:
                assert _bits(back.params[layer]["posterior"]["weight"]["mu"]) == _bits(
                    snaps[epoch].params[layer]["posterior"]["weight"]["mu"]
                )
        assert store.fsck().clean
        again = compact_run(store, run)
        assert {e.action for e in again.epochs} == {"skipped"}


def test_compact_keeps_compressed_posteriors(tmp_path: Path, make_snapshot: SnapshotFactory):
    """A file whose posteriors were compressed (``--compress-posteriors``) but that has no
    summaries is rewritten with them, its posteriors still compressed."""
    from trainer.store import runstore

    data = tmp_path / "data"
    with RunStore(data) as store, pytest.MonkeyPatch.context() as m:
        run = store.create_run("packed", {}).id

        def packed(path: Path, snap: EpochSnapshot, **kw: Any) -> None:
            write_epoch_file(path, snap, summaries=False, compress_posteriors=True, **kw)

        m.setattr(runstore, "write_epoch_file", packed)
        store.write_epoch(run, make_snapshot(0, layers=LAYERS))
        m.undo()
        store.set_status(run, "completed")
        [step] = compact_run(store, run).epochs
        assert (step.action, step.detail) == ("compacted", "summaries added")
        with h5py.File(store.epoch_path(run, 0), "r") as f:
            assert f["params/big/posterior/weight/mu"].chunks is not None
            assert "summary" in f
        assert store.fsck().clean
