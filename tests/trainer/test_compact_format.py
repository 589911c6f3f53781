"""Schema version 2: bfloat16 statistics, Blosc chunks, old files, and `bnn runs compact`.

``tests/trainer/data/epoch_v1.h5`` was written by the schema version 1 writer (commit
5d0f612, before this format) from a numpy snapshot of two layers (32x33 and 3x32, with
biases), per-element gradient statistics of log-normal size and, in ``layer1``'s weight
``mu`` statistics, the hard cases of a 16-bit float: 0, 1e-41, 1e-12, 6e-8, 1e6, 65504,
1e30, 3.3e38, inf and nan (the last two with non-finite step counts 3 and 25), plus a
zero in ``layer2``'s bias ``rho`` ``mean_abs`` and a 50-example evaluation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from service.cli import main
from tests.trainer.conftest import SnapshotFactory, as_stored, assert_tree_equal
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot
from trainer.store import EpochFile, RunReader, RunStore, read_epoch_file, write_epoch_file
from trainer.store._codec import (
    BLOSC_FILTER,
    blosc_header_problem,
    chunk_shape,
    decode_bf16,
    encode_bf16,
)
from trainer.store.compact import compact_run
from trainer.store.validate import UploadLimits, check_epoch_file

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "data" / "epoch_v1.h5"
FIXTURE_RUN = "fixture-v1"
SPECIAL = [0.0, 1e-41, 1e-12, 6e-8, 1e6, 65504.0, 1e30, 3.3e38, math.inf, math.nan]


# ----------------------------------------------------------------------------- bfloat16
def _reference_bf16(x: np.ndarray) -> np.ndarray:
    """One value at a time, in Python integers: the rule of ``encode_bf16``."""
    out = []
    for u in np.asarray(x, np.float32).reshape(-1).view(np.uint32).tolist():
        sign, mag = (u >> 16) & 0x8000, u & 0x7FFFFFFF
        if mag > 0x7F800000:
            out.append(sign | 0x7FC0)  # NaN
        elif mag == 0x7F800000:
            out.append(sign | 0x7F80)  # Inf
        else:
            code = (mag + 0x8000) >> 16  # nearest, ties away from zero
            code = min(code, 0x7F7F)  # a finite value stays finite
            out.append(sign | (1 if code == 0 and mag else code))  # non-zero stays non-zero
    return np.array(out, np.uint16).reshape(np.shape(x))


def test_bfloat16_codes_match_the_rule_on_every_kind_of_float32() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate(
        [bits.view(np.float32), np.array(SPECIAL, np.float32), -np.array(SPECIAL, np.float32)]
    ).reshape(-1, 7)
    codes = encode_bf16(x)
    np.testing.assert_array_equal(codes, _reference_bf16(x))
    back = decode_bf16(codes)
    assert back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_array_equal(np.isnan(back), np.isnan(x))
    np.testing.assert_array_equal(np.isinf(back), np.isinf(x))
    np.testing.assert_array_equal(back == 0, x == 0)
    np.testing.assert_array_equal(np.signbit(back), np.signbit(x))
    normal = np.isfinite(x) & (np.abs(x) >= 2.0**-126)
    rel = np.abs(back[normal].astype(np.float64) / x[normal] - 1)
    assert rel.max() <= 2.0**-8
    assert rel.max() > 2.0**-8 * 0.99  # the bound is tight: the rounding is to 8 bits
    tiny = np.isfinite(x) & (np.abs(x) < 2.0**-126)
    assert np.abs(back[tiny].astype(np.float64) - x[tiny]).max() <= 2.0**-133


def test_bfloat16_of_float64_saturates_instead_of_overflowing_or_vanishing() -> None:
    x = np.array([1e300, -1e300, 1e-300, -1e-300, 0.0, 1e-3, np.inf, np.nan])
    back = decode_bf16(encode_bf16(x))
    assert back[0] == np.float32(3.3895314e38) and back[1] == -back[0]  # largest finite
    assert back[2] > 0 and back[3] < 0 and back[2] < 1e-40  # smallest non-zero
    assert back[4] == 0 and back[5] == pytest.approx(1e-3, rel=2**-8)
    assert np.isinf(back[6]) and np.isnan(back[7])


def test_decode_checks_its_input() -> None:
    with pytest.raises(TypeError, match="uint16"):
        decode_bf16(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="float32 of shape"):
        decode_bf16(np.zeros(3, np.uint16), out=np.zeros(4, np.float32))


def test_chunks_are_row_blocks_of_about_256_kb() -> None:
    assert chunk_shape((1200, 1200), 4) == (54, 1200)
    assert chunk_shape((1200, 784), 2) == (167, 784)
    assert chunk_shape((10, 1200), 4) == (10, 1200)  # small: one chunk
    assert chunk_shape((64, 64, 3, 3), 4) == (64, 64, 3, 3)
    assert chunk_shape((512, 512, 3, 3), 4) == (14, 512, 3, 3)
    assert chunk_shape((2, 10_000_000), 4) == (1, 65536)  # a row larger than a chunk
    assert chunk_shape((1_000_000,), 8) == (32768,)
    for shape in ((1200, 1200), (2, 10_000_000), (512, 512, 3, 3)):
        assert math.prod(chunk_shape(shape, 4)) * 4 <= 256 * 1024


# ----------------------------------------------------------------------------- the v1 fixture
def _raw_tree(group: h5py.Group) -> dict:
    return {
        k: _raw_tree(v) if isinstance(v, h5py.Group) else np.asarray(v[()])
        for k, v in group.items()
    }


@pytest.fixture
def store(tmp_path: Path, db_url: str | None) -> Iterator[RunStore]:
    """A store with its catalog in SQLite or in PostgreSQL (the row updates of compaction
    and fsck run on both)."""
    s = RunStore(tmp_path / "data", db_url)
    yield s
    s.close()


def test_a_version_1_file_reads_and_validates_as_before() -> None:
    with EpochFile(FIXTURE) as ef:
        assert ef.header.schema_version == 1
        assert ef.header.run_id == FIXTURE_RUN and ef.header.epoch == 4
        ef.validate(UploadLimits())
        ef.check_values()
        snap = ef.snapshot()
    with h5py.File(FIXTURE, "r") as f:
        raw_params, raw_grads = _raw_tree(f["params"]), _raw_tree(f["gradients"])
        evaluation = _raw_tree(f["evaluation"])
    for layer, log in snap.params.items():
        for dist, params in log.items():
            for param, stats in params.items():
                for stat, arr in stats.items():
                    np.testing.assert_array_equal(arr, raw_params[layer][dist][param][stat])
    assert snap.gradients is not None
    stats = snap.gradients["layer1"]["weight"]["mu"]
    assert stats["mean_abs"].dtype == np.float32  # version 1: float32 as written
    np.testing.assert_array_equal(stats["max_abs"], raw_grads["layer1"]["weight"]["mu"]["max_abs"])
    flat = stats["mean_abs"].reshape(-1)[: len(SPECIAL)]
    np.testing.assert_array_equal(flat, np.array(SPECIAL, np.float32))
    assert snap.evaluation is not None
    np.testing.assert_array_equal(snap.evaluation["nll"], evaluation["nll"])
    check_epoch_file(FIXTURE, run_id=FIXTURE_RUN, epoch=4)


def _import_fixture(store: RunStore, epochs: tuple[int, ...] = (4,)) -> str:
    """The fixture uploaded as ``epochs`` of run ``fixture-v1`` (its epoch attribute set)."""
    run = store.create_run("fixture", {}, run_id=FIXTURE_RUN)
    for epoch in epochs:
        path = store.data_dir.parent / f"upload_{epoch}.h5"
        shutil.copyfile(FIXTURE, path)
        with h5py.File(path, "r+") as f:
            f.attrs["epoch"] = epoch
        store.import_epoch_file(run.id, epoch, path, limits=UploadLimits())
    return run.id


def test_a_version_1_upload_is_accepted_and_compacts(store: RunStore) -> None:
    run_id = _import_fixture(store)
    before = store.get_epoch(run_id, 4)
    old = read_epoch_file(store.epoch_path(run_id, 4))
    with pytest.raises(BnnError) as err:  # a running run: its trainer may send it again
        compact_run(store, run_id)
    assert err.value.code is ErrorCode.CONFLICT and "running" in err.value.message
    store.set_status(run_id, "completed")
    report = compact_run(store, run_id)
    assert [(e.epoch, e.action) for e in report.epochs] == [(4, "compacted")]
    after = store.get_epoch(run_id, 4)
    path = store.epoch_path(run_id, 4)
    assert after.size == path.stat().st_size
    bare = store.data_dir.parent / "bare.h5"  # the same arrays in version 2, no summaries
    write_epoch_file(bare, old, run_id=run_id, summaries=False)
    assert bare.stat().st_size < before.size  # v2 arrays are smaller; this tiny fixture's
    assert after.size - bare.stat().st_size < 8192  # summaries take a few KB more
    assert after.checksum != before.checksum
    assert json.dumps(after.metrics) == json.dumps(before.metrics)  # NaN included
    new = read_epoch_file(path)
    with EpochFile(path) as ef:
        assert ef.header.schema_version == 2
        ef.validate(UploadLimits())
    assert_tree_equal(old.params, new.params)
    assert_tree_equal(as_stored(old.gradients), new.gradients)
    assert_tree_equal(old.evaluation, new.evaluation)
    assert new.gradients is not None
    flat = new.gradients["layer1"]["weight"]["mu"]["mean_abs"].reshape(-1)[: len(SPECIAL)]
    assert flat[0] == 0 and 0 < flat[1] < 1e-40  # zero stays zero, tiny stays non-zero
    assert flat[2] == pytest.approx(1e-12, rel=2**-8) and flat[4] == pytest.approx(1e6, rel=2**-8)
    assert np.isfinite(flat[7]) and np.isinf(flat[8]) and np.isnan(flat[9])
    counts = new.gradients["layer1"]["weight"]["mu"]["nonfinite"].reshape(-1)
    assert counts[8] == 3 and counts[9] == 25 and counts.dtype == np.int32
    assert store.fsck().clean
    RunReader(run_id, store=store, verify=True).verify()
    again = compact_run(store, run_id)  # already current: skipped
    assert [(e.action, e.detail) for e in again.epochs] == [("skipped", "schema_version 2")]
    assert again.saved == 0 and store.get_epoch(run_id, 4).checksum == after.checksum


def test_a_reader_that_listed_an_epoch_before_compaction_reads_it_after(
    store: RunStore,
) -> None:
    run_id = _import_fixture(store, (4, 5))
    store.set_status(run_id, "completed")
    with RunReader(run_id, store=store) as reader:
        assert reader.epochs == [4, 5]  # rows remembered
        compact_run(store, run_id)
        assert reader.array(5, "layer1").shape == (32, 33)  # the new size is asked for
        reader.verify()


def test_compacting_refuses_a_file_that_differs_from_its_row(store: RunStore) -> None:
    run_id = _import_fixture(store, (4, 5))
    store.set_status(run_id, "completed")
    damaged = store.epoch_path(run_id, 5)
    with h5py.File(damaged, "r+") as f:  # same size, other bytes
        f["params/layer2/posterior/weight/mu"][0, 0] = 0.5
    before = damaged.read_bytes()
    report = compact_run(store, run_id)
    assert [e.action for e in report.epochs] == ["compacted", "failed"]
    assert "does not match its catalog row" in report.epochs[1].detail
    assert damaged.read_bytes() == before  # left as it was, for fsck to report
    assert not report.ok and report.saved != 0  # (this tiny fixture grows by its summaries)


# ----------------------------------------------------------------------------- version 2 files
def _gradients_with_hard_cases(snap: EpochSnapshot) -> None:
    assert snap.gradients is not None
    stats = snap.gradients["big"]["weight"]["mu"]
    flat, counts = stats["mean_abs"].reshape(-1), stats["nonfinite"].reshape(-1)
    flat[: len(SPECIAL)] = SPECIAL
    counts[:] = 0
    counts[8:10] = [2, 4]


def test_version_2_layout(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    snap = make_snapshot(1, layers={"big": (300, 200), "small": (3, 4)})
    _gradients_with_hard_cases(snap)
    path = tmp_path / "v2.h5"
    write_epoch_file(path, snap, run_id="r")
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == 2
        mu = f["params/big/posterior/weight/mu"]
        assert mu.dtype == np.float32 and mu.chunks is None and not mu._filters
        for gp in ("mu", "rho"):
            for stat in ("mean_abs", "max_abs"):
                ds = f[f"gradients/big/weight/{gp}/{stat}"]
                assert ds.dtype == np.uint16 and ds.attrs["encoding"] == "bfloat16"
                assert ds.chunks == chunk_shape((300, 200), 2)
                assert list(ds._filters) == [str(BLOSC_FILTER)]
            counts = f[f"gradients/big/weight/{gp}/nonfinite"]
            assert counts.dtype == np.int64 and list(counts._filters) == [str(BLOSC_FILTER)]
        small = f["gradients/small/weight/mu/mean_abs"]  # encoded, too small to compress
        assert small.dtype == np.uint16 and small.chunks is None
        assert f["gradients/big/step_norm"].dtype == np.float64
    back = read_epoch_file(path)
    assert_tree_equal(snap.params, back.params)
    assert_tree_equal(as_stored(snap.gradients), back.gradients)
    check_epoch_file(path, run_id="r", epoch=1, limits=UploadLimits())
    with EpochFile(path) as ef:  # one array read alone, into a given buffer
        buf = np.full((300, 200), -1, np.float32)
        got = ef.gradient_array("big", "weight", "mu", "mean_abs", alloc=lambda s, d: buf)
        assert got is buf
        np.testing.assert_array_equal(
            buf, as_stored(snap.gradients)["big"]["weight"]["mu"]["mean_abs"]
        )


def test_version_2_is_smaller(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    snap = make_snapshot(0, layers={"big": (400, 300)}, no_bias=("big",))
    rng = np.random.default_rng(1)
    assert snap.gradients is not None
    weight = snap.gradients["big"]["weight"]
    for gp in ("mu", "rho"):  # log-normal statistics and no non-finite steps, as in training
        for stat in ("mean_abs", "max_abs"):
            weight[gp][stat] = (10 ** rng.normal(-3, 0.5, (400, 300))).astype(np.float32)
        weight[gp]["nonfinite"] = np.zeros((400, 300), np.int32)
    write_epoch_file(tmp_path / "v1.h5", snap, schema_version=1)
    write_epoch_file(tmp_path / "v2.h5", snap)
    v1, v2 = ((tmp_path / f"v{v}.h5").stat().st_size for v in (1, 2))
    # posteriors as they were (960 KB), statistics from 1.92 MB to well under half
    assert v2 < 0.6 * v1, (v1, v2)


def test_writer_options_are_checked(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BnnError, match="schema_version must be one of"):
        write_epoch_file(tmp_path / "a.h5", make_snapshot(0), schema_version=3)
    monkeypatch.setenv("BNN_HDF5_COMPRESSION", "blosc")
    with pytest.raises(BnnError, match="blosc needs schema version 2"):
        write_epoch_file(tmp_path / "a.h5", make_snapshot(0), schema_version=1)
    assert not (tmp_path / "a.h5").exists()


def test_compressed_posteriors_read_the_same(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    snap = make_snapshot(0, layers={"big": (300, 200)})
    path = tmp_path / "packed.h5"
    write_epoch_file(path, snap, compress_posteriors=True)
    with h5py.File(path, "r") as f:
        assert list(f["params/big/posterior/weight/sigma"]._filters) == [str(BLOSC_FILTER)]
    with EpochFile(path) as ef:
        ef.validate(UploadLimits())
        ef.check_values(block=1000)
        np.testing.assert_array_equal(
            ef.array("big", index=(slice(10, 20), 7)),
            snap.params["big"]["posterior"]["weight"]["mu"][10:20, 7],
        )
    assert_tree_equal(snap.params, read_epoch_file(path).params)


# ----------------------------------------------------------------------------- hostile files
def _v2_file(tmp_path: Path, make_snapshot: SnapshotFactory, name: str = "v2.h5") -> Path:
    path = tmp_path / name
    write_epoch_file(path, make_snapshot(0, layers={"big": (300, 200)}), run_id="r")
    return path


def _refusal(path: Path) -> BnnError:
    with pytest.raises(BnnError) as err:
        check_epoch_file(path, run_id="r", epoch=0, limits=UploadLimits())
    assert err.value.code is ErrorCode.CORRUPT
    return err.value


def test_encodings_only_where_the_format_puts_them(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    encoded = "gradients/big/weight/mu/max_abs"
    cases = {
        "unknown": lambda f: f[encoded].attrs.__setitem__("encoding", "float8"),
        "params": lambda f: _encode_in_place(f, "params/big/posterior/weight/sigma"),
        "step_norm": lambda f: _encode_in_place(f, "gradients/big/step_norm"),
        "version_1": lambda f: f.attrs.__setitem__("schema_version", 1),
    }
    needles = {
        "unknown": "unknown encoding 'float8'",
        "params": "only the gradient statistics",
        "step_norm": "only the gradient statistics",
        "version_1": "which schema_version 1 does not allow",
    }
    for case, edit in cases.items():
        path = _v2_file(tmp_path, make_snapshot, f"{case}.h5")
        with h5py.File(path, "r+") as f:
            edit(f)
        assert needles[case] in _refusal(path).message, case
    with h5py.File(path, "r+") as f:  # a version 3 file
        f.attrs["schema_version"] = 3
    assert "reads 1 and 2" in _refusal(path).message


def _encode_in_place(f: h5py.File, name: str) -> None:
    data = f[name][()]
    del f[name]
    f.create_dataset(name, data=encode_bf16(data)).attrs["encoding"] = "bfloat16"


def _first_chunk(path: Path, name: str) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
        return int(info.byte_offset), int(info.size)


def test_blosc_chunk_headers_are_checked_before_decompressing(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    name = "gradients/big/weight/rho/mean_abs"
    base = _v2_file(tmp_path, make_snapshot)
    offset, size = _first_chunk(base, name)
    nbytes = math.prod(chunk_shape((300, 200), 2)) * 2
    for field, value, needle in (
        (4, 2**31 - 1, f"holds 2147483647 bytes by its Blosc header, the chunk has {nbytes}"),
        (12, size + 1000, f"is {size + 1000} bytes by its Blosc header, {size} are stored"),
        (8, 0, f"has a Blosc block size of 0 bytes for a {nbytes}-byte chunk"),
    ):
        bad = tmp_path / f"bad{field}.h5"
        data = bytearray(base.read_bytes())
        data[offset + field : offset + field + 4] = value.to_bytes(4, "little")
        bad.write_bytes(bytes(data))
        message = _refusal(bad).message
        assert f"{name}: the chunk at (0, 0) {needle}" in message, message
    assert blosc_header_problem(b"\x02\x01", 2, 100, 2) == "is 2 bytes, shorter than a Blosc header"


def test_blosc_with_another_filter_is_refused(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    import hdf5plugin

    path = _v2_file(tmp_path, make_snapshot)
    name = "gradients/big/weight/mu/nonfinite"
    with h5py.File(path, "r+") as f:
        data = f[name][()]
        del f[name]
        f.create_dataset(name, data=data, chunks=(10, 200), fletcher32=True, **hdf5plugin.Blosc())
    assert "combines Blosc with other filters" in _refusal(path).message


# ----------------------------------------------------------------------------- command line
def _stopped_fixture_run(tmp_path: Path, epochs: tuple[int, ...] = (0, 1, 2)) -> Path:
    data_dir = tmp_path / "data"
    with RunStore(data_dir) as store:
        _import_fixture(store, epochs)
        store.set_status(FIXTURE_RUN, "completed")
    return data_dir


def test_bnn_runs_compact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = _stopped_fixture_run(tmp_path)
    args = ["runs", "compact", FIXTURE_RUN, "--data-dir", str(data_dir)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "3 epochs compacted, 0 already current, 0 failed" in out
    assert "compact fixture-v1: 100%" in err and "saved" in err  # the progress bar
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == 3 and report["compacted"] == 0 and report["bytes_saved"] == 0
    assert main(["runs", "fsck", "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    # posteriors compressed too: current files rewritten once, then skipped
    assert main([*args, "--compress-posteriors", "--no-progress"]) == 0
    assert "3 epochs compacted, 0 already current" in capsys.readouterr().out
    assert main([*args, "--compress-posteriors", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["detail"] for e in report["epochs"]] == [
        "schema_version 2, posteriors compressed"
    ] * 3
    with RunStore(data_dir) as store:
        path = store.epoch_path(FIXTURE_RUN, 1)
        with h5py.File(path, "r") as f:
            assert list(f["params/layer1/posterior/weight/sigma"]._filters) == [str(BLOSC_FILTER)]
        assert_tree_equal(read_epoch_file(FIXTURE).params, read_epoch_file(path).params)
        assert store.fsck().clean
    assert main(["runs", "compact", "--data-dir", str(data_dir)]) == 2
    assert "`bnn runs compact` needs a run id" in capsys.readouterr().err
    assert main(["runs", "compact", "nope", "--data-dir", str(data_dir)]) == 2
    assert "unknown run 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- crashes
def _compact_killed_at(data_dir: Path, point: str) -> None:
    cmd = [sys.executable, "-m", "service.cli", "runs", "compact", FIXTURE_RUN, "--no-progress"]
    env = {**os.environ, "BNN_CRASH_AT": f"{point}:2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "--data-dir", str(data_dir)], cwd=REPO, env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize(
    ("point", "action", "second"),
    [
        ("compact_write", "remove", 1),  # journal written, old file in place
        ("compact_rename", "commit", 2),  # new file in place, catalog row still the old one
        ("compact_commit", "remove", 2),  # catalog updated, journal not yet removed
    ],
)
def test_a_compaction_killed_at_each_step_is_settled_by_fsck(
    tmp_path: Path, point: str, action: str, second: int
) -> None:
    data_dir = _stopped_fixture_run(tmp_path)
    _compact_killed_at(data_dir, point)  # killed at the second epoch
    run_dir = data_dir / "runs" / FIXTURE_RUN
    assert (run_dir / "epoch_000001.h5.compact").exists()
    with RunStore(data_dir) as store:
        report = store.fsck()
        [found] = report.of("compact")
        assert (found.epoch, found.action) == (1, action)
        assert found.open
        if point == "compact_rename":  # until repaired, the checksum check sees it too
            assert [f.epoch for f in report.of("checksum")] == [1]
        repaired = store.fsck(repair=True)
        assert repaired.clean, repaired.table()
        assert not (run_dir / "epoch_000001.h5.compact").exists()
        assert not [p for p in run_dir.iterdir() if ".tmp." in p.name]
        RunReader(FIXTURE_RUN, store=store, verify=True).verify()  # files match their rows
        versions = []
        for epoch in (0, 1, 2):
            with EpochFile(store.epoch_path(FIXTURE_RUN, epoch)) as ef:
                versions.append(ef.header.schema_version)
        assert versions == [2, second, 1]
        rest = compact_run(store, FIXTURE_RUN)  # the rest, on the next try
        assert [e.action for e in rest.epochs] == [
            "skipped",
            "compacted" if second == 1 else "skipped",
            "compacted",
        ]
        assert store.fsck().clean
        old = read_epoch_file(FIXTURE)
        for epoch in (0, 1, 2):
            new = read_epoch_file(store.epoch_path(FIXTURE_RUN, epoch))
            assert_tree_equal(old.params, new.params)
            assert_tree_equal(as_stored(old.gradients), new.gradients)


def test_recover_run_settles_a_journal(tmp_path: Path) -> None:
    data_dir = _stopped_fixture_run(tmp_path, (0, 1))
    _compact_killed_at(data_dir, "compact_rename")
    with RunStore(data_dir) as store:
        report = store.recover_run(FIXTURE_RUN)  # what a trainer resuming the run calls
        assert [(f.kind, f.action, f.done) for f in report.findings] == [
            ("compact", "commit", True)
        ]
        assert store.fsck().clean


def test_unreadable_or_stale_journals(store: RunStore) -> None:
    run_id = _import_fixture(store, (0,))
    store.set_status(run_id, "completed")
    journal = store.run_dir(run_id) / "epoch_000000.h5.compact"
    journal.write_text("{not json")  # a crash while writing it: the file was never renamed
    report = store.fsck()
    assert [(f.kind, f.action, f.detail) for f in report.of("compact")] == [
        ("compact", "remove", "unreadable journal; the file is the catalogued one")
    ]
    assert store.fsck(repair=True).clean and not journal.exists()
    path = store.epoch_path(run_id, 0)
    journal.write_text(
        json.dumps(
            {"epoch": 0, "old": {"size": 1, "sha256": "a"}, "new": {"size": 2, "sha256": "b"}}
        )
    )
    report = store.fsck(repair=True)  # neither side in place: left for a person
    [found] = report.of("compact")
    assert found.action == "keep" and found.open and journal.exists()
    assert path.exists()


def test_hdf5plugin_loads_with_the_first_file_not_with_the_command_line(tmp_path: Path) -> None:
    """``bnn --help`` and ``import trainer.store`` stay light; ``bnn runs compact`` loads the
    filter (and still no torch)."""
    data_dir = _stopped_fixture_run(tmp_path, (0,))
    code = (
        "import sys\n"
        "import trainer.store, service.cli\n"
        "assert 'hdf5plugin' not in sys.modules\n"
        "from service.cli import main\n"
        "args = ['runs', 'compact', 'fixture-v1', '--no-progress', '--data-dir', sys.argv[1]]\n"
        "assert main(args) == 0\n"
        "assert 'hdf5plugin' in sys.modules\n"
        "assert 'torch' not in sys.modules and 'pandas' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(data_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 epochs compacted" in proc.stdout


_MUTATE = """
import sys
import numpy as np
from trainer.errors import BnnError
from trainer.store import EpochFile
from trainer.store.validate import UploadLimits

path, offset, size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = open(path, "rb").read()
rng = np.random.default_rng(0)
refused = 0
for trial in range(60):
    mutated = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):  # the header stays valid: bytes after it
        mutated[offset + 16 + int(rng.integers(0, size - 16))] = int(rng.integers(0, 256))
    open(out, "wb").write(mutated)
    try:
        with EpochFile(out) as ef:
            ef.validate(UploadLimits())
            ef.gradient_array("big", "weight", "mu", "mean_abs")
    except BnnError:
        refused += 1
print(refused)
"""


def test_damaged_blosc_chunks_are_refused_or_read_never_crash(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    """Random bytes inside a chunk behind a valid header: a CORRUPT error or other values,
    never a crash (in a subprocess, so that a crash fails this test instead of pytest)."""
    path = _v2_file(tmp_path, make_snapshot)
    offset, size = _first_chunk(path, "gradients/big/weight/mu/mean_abs")
    proc = subprocess.run(
        [sys.executable, "-c", _MUTATE, str(path), str(offset), str(size), str(tmp_path / "m.h5")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0 < int(proc.stdout) < 60  # some mutations break a block, others only values
