"""Per-element gradient statistics at fewer mantissa bits (``stat_bits``, lossy, opt-in):
the rounding, the files that carry it, what readers and uploads check, and
``bnn runs compact --stat-bits N``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from service.cli import main
from tests.trainer.conftest import SnapshotFactory, as_stored, assert_tree_equal
from tests.trainer.test_compact_format import FIXTURE, FIXTURE_RUN, SPECIAL, _import_fixture
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot
from trainer.store import EpochFile, RunReader, RunStore, _native, read_epoch_file, write_epoch_file
from trainer.store._codec import (
    MANTISSA_ATTR,
    decode_bf16,
    encode_bf16,
    first_unrounded,
    round_bf16,
    validate_stat_bits,
)
from trainer.store.compact import compact_run
from trainer.store.validate import UploadLimits, check_epoch_file

ALL_CODES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
STATS = [
    f"gradients/big/{param}/{gp}/{stat}"
    for param in ("weight", "bias")
    for gp in ("mu", "rho")
    for stat in ("mean_abs", "max_abs")
]


def _reference(code: int, bits: int) -> int:
    """One code at a time, in Python integers: nearest, ties to even, the guarantees kept."""
    sign, mag = code & 0x8000, code & 0x7FFF
    drop = 7 - bits
    if mag >= 0x7F80 or drop == 0:
        return code  # Inf and NaN as they are
    unit = 1 << drop
    low, rest = divmod(mag, unit)
    up = rest > unit // 2 or (rest == unit // 2 and low % 2 == 1)
    rounded = (low + up) * unit
    if rounded >= 0x7F80:
        rounded = (0x7F7F >> drop) << drop  # a finite value stays finite
    if mag and not rounded:
        rounded = unit  # a non-zero value stays non-zero
    return sign | rounded


@pytest.mark.parametrize("bits", range(8))
def test_rounding_every_code_follows_the_rule(bits: int) -> None:
    got = round_bf16(ALL_CODES, bits)
    want = np.array([_reference(c, bits) for c in ALL_CODES.tolist()], np.uint16)
    np.testing.assert_array_equal(got, want)
    assert first_unrounded(got, bits) is None
    np.testing.assert_array_equal(round_bf16(got, bits), got)  # idempotent
    for fewer in range(bits):  # rounding a rounded file again: as if from the start?
        assert first_unrounded(round_bf16(got, fewer), fewer) is None
    values, rounded = decode_bf16(ALL_CODES), decode_bf16(got)
    np.testing.assert_array_equal(np.isnan(values), np.isnan(rounded))
    np.testing.assert_array_equal(np.isinf(values), np.isinf(rounded))
    np.testing.assert_array_equal(values == 0, rounded == 0)
    np.testing.assert_array_equal(np.signbit(values), np.signbit(rounded))
    positive = ALL_CODES[:0x7F80]  # +0 .. the largest finite, in order of their values
    assert (np.diff(decode_bf16(round_bf16(positive, bits)).astype(np.float64)) >= 0).all()
    normal = np.isfinite(values) & (np.abs(values) >= 2.0**-126) & (np.abs(values) < 3e38)
    rel = np.abs(rounded[normal].astype(np.float64) / values[normal] - 1)
    assert rel.max() <= 2.0 ** -(bits + 1)


def test_ties_go_to_the_even_neighbour() -> None:
    # at 6 bits, 1 + 1/128 lies halfway between 1 (mantissa 0, even) and 1 + 2/128 (odd);
    # 1 + 3/128 between 1 + 2/128 (odd) and 1 + 4/128 (even)
    one = 0x3F80
    assert round_bf16(np.array([one + 1], np.uint16), 6)[0] == one
    assert round_bf16(np.array([one + 3], np.uint16), 6)[0] == one + 4
    assert round_bf16(np.array([one + 2], np.uint16), 5)[0] == one  # 1 + 2/128: tie, even 1
    assert round_bf16(np.array([one + 6], np.uint16), 5)[0] == one + 8


def test_the_kernels_round_as_numpy_does() -> None:
    if not _native.available():
        pytest.skip("the summary kernels are not built here")
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
            np.array(SPECIAL, np.float32),
            -np.array(SPECIAL, np.float32),
        ]
    ).reshape(-1, 10)
    for bits in range(8):
        found = _native.bf16_encode(x, bits)
        assert found is not None
        codes, hist = found
        want = round_bf16(encode_bf16(x), bits)
        np.testing.assert_array_equal(codes, want)
        np.testing.assert_array_equal(hist, np.bincount(want.reshape(-1), minlength=1 << 16))


@pytest.mark.parametrize("bad", [8, -1, 3.0, True, "3"])
def test_bad_stat_bits_are_refused_by_name(
    bad: object, tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    with pytest.raises(BnnError) as err:
        validate_stat_bits(bad)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and repr(bad) in err.value.message
    with pytest.raises(BnnError, match="stat_bits"):
        write_epoch_file(tmp_path / "a.h5", make_snapshot(0), stat_bits=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "a.h5").exists()


def test_version_1_cannot_drop_bits(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    with pytest.raises(BnnError, match="stat_bits=3 needs schema version 2"):
        write_epoch_file(tmp_path / "a.h5", make_snapshot(0), schema_version=1, stat_bits=3)
    assert not (tmp_path / "a.h5").exists()


def _snapshot(make_snapshot: SnapshotFactory) -> EpochSnapshot:
    snap = make_snapshot(3, layers={"big": (300, 200), "small": (3, 4)})
    assert snap.gradients is not None
    rng = np.random.default_rng(2)
    for param in ("weight", "bias"):  # log-normal magnitudes, as in training
        for gp in ("mu", "rho"):
            for stat in ("mean_abs", "max_abs"):
                arr = snap.gradients["big"][param][gp][stat]
                arr[...] = 10 ** rng.normal(-3, 0.7, arr.shape)
    flat = snap.gradients["big"]["weight"]["mu"]["mean_abs"].reshape(-1)
    flat[: len(SPECIAL)] = SPECIAL
    counts = snap.gradients["big"]["weight"]["mu"]["nonfinite"].reshape(-1)
    counts[:] = 0
    counts[8:10] = [2, 4]
    return snap


def test_a_file_at_fewer_bits(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    snap = _snapshot(make_snapshot)
    sizes = {}
    for bits in (7, 3):
        path = tmp_path / f"b{bits}.h5"
        write_epoch_file(path, snap, run_id="r", stat_bits=bits)
        with h5py.File(path, "r") as f:
            sizes[bits] = sum(f[name].id.get_storage_size() for name in STATS)
            for name in STATS:
                ds = f[name]
                assert ds.attrs["encoding"] == "bfloat16"
                if bits == 7:  # the default writes the files it always wrote
                    assert MANTISSA_ATTR not in ds.attrs
                else:
                    assert int(ds.attrs[MANTISSA_ATTR]) == bits
                    assert first_unrounded(ds[()], bits) is None
            small = f["gradients/small/weight/mu/mean_abs"].attrs  # too small to compress
            assert small.get(MANTISSA_ATTR, 7) == bits
        back = read_epoch_file(path)
        assert_tree_equal(snap.params, back.params)
        assert_tree_equal(as_stored(snap.gradients, bits), back.gradients)
        assert back.gradients is not None
        flat = back.gradients["big"]["weight"]["mu"]["mean_abs"].reshape(-1)
        assert flat[0] == 0 and 0 < flat[1] < 1e-38 and np.isfinite(flat[7])
        assert np.isinf(flat[8]) and np.isnan(flat[9])
        with EpochFile(path) as ef:
            assert ef.stat_bits() == bits
        # an upload: schema, values (the claimed bits included), and the stored summaries
        # recomputed from the arrays must agree with the file's own
        check_epoch_file(path, run_id="r", epoch=3, limits=UploadLimits())
    assert sizes[3] < 0.75 * sizes[7], sizes  # the statistics' bytes


def test_without_the_kernels_the_same_codes(tmp_path: Path, make_snapshot: SnapshotFactory) -> None:
    snap = _snapshot(make_snapshot)
    write_epoch_file(tmp_path / "on.h5", snap, stat_bits=2)
    with _native.disabled():
        write_epoch_file(tmp_path / "off.h5", snap, stat_bits=2)
    with h5py.File(tmp_path / "on.h5", "r") as on, h5py.File(tmp_path / "off.h5", "r") as off:
        for name in STATS:
            np.testing.assert_array_equal(on[name][()], off[name][()])
        assert on["summary/gradients"][()].tobytes() == off["summary/gradients"][()].tobytes()


def _claims(path: Path, value: object, name: str = STATS[0]) -> None:
    with h5py.File(path, "r+") as f:
        f[name].attrs[MANTISSA_ATTR] = value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.int8(9), "mantissa_bits=9, not from 0 to 7"),
        (np.int8(-1), "mantissa_bits=-1, not from 0 to 7"),
        (2.5, "mantissa_bits that is not an integer"),
        ("3", "mantissa_bits that is not an integer"),
        (np.int8(3), "claims mantissa_bits=3, but holds code"),  # codes of 7 bits
    ],
)
def test_an_upload_whose_bits_are_not_what_it_claims_is_refused(
    value: object, message: str, tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    path = tmp_path / "up.h5"
    write_epoch_file(path, _snapshot(make_snapshot), run_id="r")
    _claims(path, value)
    with pytest.raises(BnnError) as err:
        check_epoch_file(path, run_id="r", epoch=3, limits=UploadLimits())
    assert err.value.code is ErrorCode.CORRUPT
    assert message in err.value.message and "big/weight/mu/mean_abs" in err.value.message


# ----------------------------------------------------------------------------- compaction
@pytest.fixture
def store(tmp_path: Path, db_url: str | None) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "data", db_url)
    yield s
    s.close()


def _bits(store: RunStore, run_id: str) -> list[int]:
    out = []
    for info in store.list_epochs(run_id):
        with EpochFile(store.epoch_path(run_id, info.epoch)) as ef:
            out.append(ef.stat_bits())
    return out


def test_compaction_drops_bits_once_and_never_brings_them_back(store: RunStore) -> None:
    run_id = _import_fixture(store, (4, 5))
    store.set_status(run_id, "completed")
    old = read_epoch_file(FIXTURE)
    with pytest.raises(BnnError, match="stat_bits must be from 0 to 7, got 8"):
        compact_run(store, run_id, stat_bits=8)
    report = compact_run(store, run_id, compress_posteriors=True, stat_bits=3)
    assert [(e.action, e.detail) for e in report.epochs] == [
        ("compacted", "statistics at 3 mantissa bits")
    ] * 2
    assert _bits(store, run_id) == [3, 3]
    for epoch in (4, 5):
        new = read_epoch_file(store.epoch_path(run_id, epoch))
        assert_tree_equal(old.params, new.params)
        assert_tree_equal(as_stored(old.gradients, 3), new.gradients)
    assert store.fsck().clean
    RunReader(run_id, store=store, verify=True).verify()
    checksums = [e.checksum for e in store.list_epochs(run_id)]
    for bits in (3, 5, 7):  # as few bits or more: nothing to do
        again = compact_run(store, run_id, compress_posteriors=True, stat_bits=bits)
        assert [e.action for e in again.epochs] == ["skipped"] * 2
    assert again.epochs[0].detail == "schema_version 2, posteriors compressed"
    assert compact_run(store, run_id, stat_bits=5).epochs[0].detail == (
        "schema_version 2, statistics at 3 mantissa bits"
    )
    assert [e.checksum for e in store.list_epochs(run_id)] == checksums
    fewer = compact_run(store, run_id, stat_bits=1)  # fewer still: rewritten, still packed
    assert [e.action for e in fewer.epochs] == ["compacted"] * 2
    assert _bits(store, run_id) == [1, 1]
    new = read_epoch_file(store.epoch_path(run_id, 4))
    # rounded from the file's 3-bit codes: the original bits are gone (a tie at 3 bits can
    # round otherwise than the original would have)
    assert_tree_equal(as_stored(as_stored(old.gradients, 3), 1), new.gradients)
    with h5py.File(store.epoch_path(run_id, 4), "r") as f:
        assert f["params/layer1/posterior/weight/sigma"].chunks is not None
    assert store.fsck().clean


def test_bnn_runs_compact_stat_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    with RunStore(data_dir) as store:
        _import_fixture(store, (0, 1))
        store.set_status(FIXTURE_RUN, "completed")
    args = ["runs", "compact", FIXTURE_RUN, "--data-dir", str(data_dir), "--no-progress"]
    assert main([*args, "--stat-bits", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compacted"] == 2
    assert {e["detail"] for e in report["epochs"]} == {"statistics at 3 mantissa bits"}
    assert main([*args, "--stat-bits", "3"]) == 0
    assert "0 epochs compacted, 2 already current" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--stat-bits", "9"])
    assert exit_.value.code == 2
    assert "--stat-bits: invalid choice: 9" in capsys.readouterr().err
    with RunStore(data_dir) as store:
        assert _bits(store, FIXTURE_RUN) == [3, 3]
        assert store.fsck().clean


def test_the_unrounded_code_is_named_by_its_index_in_the_array(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    path = tmp_path / "e.h5"
    write_epoch_file(path, _snapshot(make_snapshot), stat_bits=3)
    name = "gradients/big/weight/rho/max_abs"
    with h5py.File(path, "r+") as f:
        codes = f[name][()]
        codes[250, 17] |= 1  # a dropped bit set, far past the first block read
        f[name][...] = codes
    with EpochFile(path) as ef, pytest.raises(BnnError) as err:
        ef.check_values(block=1000)
    assert err.value.code is ErrorCode.CORRUPT
    assert "big/weight/rho/max_abs claims mantissa_bits=3" in err.value.message
    assert "at index (250, 17)" in err.value.message
    assert err.value.details["array"] == name and err.value.details["layer"] == "big"


# ----------------------------------------------------------------------------- the environment
def _form(path: Path) -> tuple[int, bool]:
    """(the file's statistics' mantissa bits, whether its posteriors are compressed), as
    ``EpochFile.storage()`` says and as the datasets are."""
    with EpochFile(path) as ef:
        storage = ef.storage()
    with h5py.File(path, "r") as f:
        packed = f["params/big/posterior/weight/mu"].chunks is not None
    assert storage == {
        "schema_version": 2,
        "stat_bits": storage["stat_bits"],
        "posteriors_compressed": packed,
    }
    return storage["stat_bits"], packed


def test_the_environment_sets_what_trainers_write(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``BNN_STAT_BITS`` and ``BNN_COMPRESS_POSTERIORS`` give the files a process writes
    (the store's, a remote trainer's) the archive form; explicit arguments win, and
    version 1 files are left alone."""
    snap = _snapshot(make_snapshot)
    monkeypatch.setenv("BNN_STAT_BITS", "3")
    monkeypatch.setenv("BNN_COMPRESS_POSTERIORS", "yes")
    with RunStore(tmp_path / "data") as store:
        run = store.create_run("env", {})
        store.write_epoch(run.id, snap)
        assert _form(store.epoch_path(run.id, snap.epoch)) == (3, True)
        assert store.fsck().clean
    write_epoch_file(tmp_path / "explicit.h5", snap, stat_bits=7, compress_posteriors=False)
    assert _form(tmp_path / "explicit.h5") == (7, False)
    write_epoch_file(tmp_path / "v1.h5", snap, schema_version=1)
    assert_tree_equal(snap.gradients, read_epoch_file(tmp_path / "v1.h5").gradients)
    monkeypatch.setenv("BNN_STAT_BITS", " ")
    monkeypatch.setenv("BNN_COMPRESS_POSTERIORS", "off")
    write_epoch_file(tmp_path / "unset.h5", snap)
    assert _form(tmp_path / "unset.h5") == (7, False)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BNN_STAT_BITS", "8", "BNN_STAT_BITS must be an integer from 0 to 7, got '8'"),
        ("BNN_STAT_BITS", "three", "BNN_STAT_BITS must be an integer from 0 to 7, got 'three'"),
        ("BNN_COMPRESS_POSTERIORS", "maybe", "BNN_COMPRESS_POSTERIORS must be one of"),
    ],
)
def test_a_bad_environment_stops_a_trainer_before_its_run_exists(
    name: str,
    value: str,
    message: str,
    tmp_path: Path,
    make_snapshot: SnapshotFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trainer
    from trainer.config import parse_config
    from trainer.train import Trainer

    monkeypatch.setenv(name, value)
    with pytest.raises(BnnError) as err:
        write_epoch_file(tmp_path / "e.h5", make_snapshot(0))
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and message in err.value.message
    assert not (tmp_path / "e.h5").exists()
    with RunStore(tmp_path / "data") as store:
        config = parse_config({"dataset": "regression", "n_train": 64, "epochs": 1})
        with pytest.raises(BnnError, match=name):
            Trainer(config, sink=store, progress=False).fit()
        model = trainer.mlp(1, [4], 1, trainer.PriorSpec())
        with pytest.raises(BnnError, match=name):
            trainer.track(model, sink=store, epochs=1)
        assert store.list_runs() == []  # nothing half-made


# ----------------------------------------------------------------------- a run's own setting
def test_a_runs_config_sets_its_files_form_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TrainConfig.stat_bits`` / ``compress_posteriors`` (``bnn train --stat-bits N
    --compress-posteriors``, ``POST /runs``) decide how the run's epochs are written, over
    ``BNN_STAT_BITS`` / ``BNN_COMPRESS_POSTERIORS``; a run that sets nothing takes those."""
    from trainer.config import parse_config
    from trainer.train import Trainer

    monkeypatch.setenv("BNN_STAT_BITS", "5")
    monkeypatch.setenv("BNN_COMPRESS_POSTERIORS", "0")
    base = {"dataset": "regression", "n_train": 64, "epochs": 2, "widths": [40, 40]}

    def forms(config: dict[str, object]) -> set[tuple[int, bool]]:
        with RunStore(tmp_path / "data") as store:
            result = Trainer(parse_config({**base, **config}), sink=store, progress=False).fit()
            assert result.run_id is not None
            out = set()
            for epoch in result.captured_epochs:
                path = store.epoch_path(result.run_id, epoch)
                with EpochFile(path) as ef:
                    bits = ef.stat_bits()
                with h5py.File(path, "r") as f:
                    # layer2: 40x40, large enough to compress
                    out.add((bits, f["params/layer2/posterior/weight/mu"].chunks is not None))
            assert store.fsck().clean
            assert store.get_run(result.run_id).config["stat_bits"] == config.get("stat_bits")
            return out

    assert forms({"stat_bits": 3, "compress_posteriors": True}) == {(3, True)}
    assert forms({"stat_bits": 7}) == {(7, False)}  # 7 bits asked: lossless, env or not
    assert forms({}) == {(5, False)}  # the environment's


def test_a_snapshots_own_form_is_checked_and_arguments_win(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    snap = _snapshot(make_snapshot)
    snap.stat_bits, snap.compress_posteriors = 3, True
    write_epoch_file(tmp_path / "own.h5", snap)
    assert _form(tmp_path / "own.h5") == (3, True)
    write_epoch_file(tmp_path / "arg.h5", snap, stat_bits=6, compress_posteriors=False)
    assert _form(tmp_path / "arg.h5") == (6, False)
    for field, value, message in [
        ("stat_bits", 9, "stat_bits must be from 0 to 7, got 9"),
        ("stat_bits", "3", "stat_bits must be an integer from 0 to 7, got '3'"),
        ("compress_posteriors", "yes", "compress_posteriors must be True, False or None"),
    ]:
        bad = _snapshot(make_snapshot)
        setattr(bad, field, value)
        with pytest.raises(BnnError) as err:
            write_epoch_file(tmp_path / "bad.h5", bad)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT and message in err.value.message
        assert "bad snapshot for epoch 3" in err.value.message
        assert not (tmp_path / "bad.h5").exists()


def test_bnn_train_takes_the_form_as_options_and_checks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    args = ["train", "--data-dir", str(data), "--dataset", "regression", "--epochs", "1"]
    args += ["--n-train", "64", "--widths", "4", "--no-progress"]
    assert main([*args, "--stat-bits", "2", "--compress-posteriors"]) == 0
    run_id = capsys.readouterr().out.split()[-1]
    with RunStore(data) as store:
        config = store.get_run(run_id).config
        assert (config["stat_bits"], config["compress_posteriors"]) == (2, True)
        with EpochFile(store.epoch_path(run_id, 0)) as ef:
            assert ef.stat_bits() == 2
    assert main(["runs", "show", run_id, "--data-dir", str(data)]) == 0
    shown = capsys.readouterr().out
    assert "(statistics at 2 of 7 mantissa bits (lossy), posteriors compressed, as" in shown
    assert main([*args, "--stat-bits", "8"]) == 2
    assert "--stat-bits: Input should be less than or equal to 7 (got 8)" in capsys.readouterr().err
    with RunStore(data) as store:
        assert [r.id for r in store.list_runs()] == [run_id]  # none made for the bad one


def test_a_snapshot_read_from_a_lossy_file_keeps_its_precision(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read back and written again (no options), a 3-bit epoch stays a 3-bit file: its
    values have no more bits to claim, whatever the environment asks; a lossless file's
    snapshot leaves the choice to the writer."""
    snap = _snapshot(make_snapshot)
    write_epoch_file(tmp_path / "lossy.h5", snap, stat_bits=3)
    write_epoch_file(tmp_path / "full.h5", snap)
    monkeypatch.setenv("BNN_STAT_BITS", "6")
    lossy, full = (read_epoch_file(tmp_path / f"{n}.h5") for n in ("lossy", "full"))
    assert (lossy.stat_bits, full.stat_bits) == (3, None)
    write_epoch_file(tmp_path / "again.h5", lossy)
    assert _form(tmp_path / "again.h5") == (3, False)
    assert_tree_equal(lossy.gradients, read_epoch_file(tmp_path / "again.h5").gradients)
    write_epoch_file(tmp_path / "full_again.h5", full)
    assert _form(tmp_path / "full_again.h5") == (6, False)  # the environment's
    no_grads = read_epoch_file(tmp_path / "lossy.h5", gradients=False)
    assert no_grads.stat_bits is None
