"""RunReader and load_distribution_log: the seed's structure, partial reads, live runs."""

from __future__ import annotations

import math
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.trainer.conftest import SnapshotFactory, assert_grads_equal, assert_tree_equal
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunReader, RunStore, load_distribution_log


@pytest.fixture
def written(tmp_path: Path, make_snapshot: SnapshotFactory) -> tuple[Path, str]:
    """A run with epochs 0, 2, 4 captured."""
    with RunStore(tmp_path / "data") as store:
        run = store.create_run("reader", {"widths": [5]})
        for epoch in (0, 2, 4):
            store.write_epoch(run.id, make_snapshot(epoch))
    return tmp_path / "data", run.id


def test_load_distribution_log_is_the_seed_structure(
    written: tuple[Path, str], make_snapshot: SnapshotFactory
):
    data_dir, run_id = written
    log = load_distribution_log(run_id, data_dir=data_dir)
    assert list(log) == [0, 2, 4]
    for epoch, layers in log.items():
        assert_tree_equal(make_snapshot(epoch).params, layers)
        for layer in layers.values():
            assert list(layer) == ["posterior", "prior"]
            assert list(layer["posterior"]["weight"]) == ["mu", "sigma"]
    assert log[4]["conv"]["posterior"]["weight"]["mu"].shape == (4, 2, 3, 3)
    assert log[4]["conv"]["prior"]["bias"]["sigma"].shape == (1,)
    some = load_distribution_log(run_id, data_dir=data_dir, epochs=[4, 0], layers=["out"])
    assert list(some) == [4, 0]
    assert all(list(v) == ["out"] for v in some.values())


def test_unknown_epoch_and_layer(written: tuple[Path, str]):
    data_dir, run_id = written
    with pytest.raises(BnnError) as err:
        load_distribution_log(run_id, data_dir=data_dir, epochs=[1])
    assert err.value.code is ErrorCode.NOT_FOUND
    assert err.value.details["epochs"] == [0, 2, 4]
    assert "[0, 2, 4]" in str(err.value)
    with pytest.raises(BnnError) as err:
        load_distribution_log(run_id, data_dir=data_dir, layers=["layer9"])
    assert err.value.code is ErrorCode.NOT_FOUND
    assert err.value.details["layers"] == ["layer1", "conv", "out"]
    with pytest.raises(BnnError) as err:
        load_distribution_log("feedfacecafe", data_dir=data_dir)
    assert err.value.code is ErrorCode.NOT_FOUND


def test_reader_views(written: tuple[Path, str], make_snapshot: SnapshotFactory):
    data_dir, run_id = written
    with RunReader(run_id, data_dir) as reader:
        assert reader.run.config == {"widths": [5]}
        assert reader.epochs == [0, 2, 4]
        assert reader.layers() == ["layer1", "conv", "out"]
        assert reader.header(2).layer_types["conv"] == "BayesConv2d"
        assert reader.metrics(2)["loss"] == pytest.approx(0.5)
        table = reader.metrics_table()
        assert [row["epoch"] for row in table] == [0, 2, 4]
        assert "kl/layer1" in table[0]
        want = make_snapshot(2).gradients
        assert want is not None
        assert_grads_equal(want["conv"], reader.gradients(2, "conv"))
        reader.verify()
        for kwargs, code in [
            ({"dist": "posterior2"}, ErrorCode.INVALID_ARGUMENT),
            ({"stat": "variance"}, ErrorCode.INVALID_ARGUMENT),
            ({"param": "bias", "layer": "out"}, ErrorCode.NOT_FOUND),
            ({"index": (slice(0, 2), 7)}, ErrorCode.INVALID_ARGUMENT),
        ]:
            args: dict[str, Any] = {"layer": "layer1", **kwargs}
            with pytest.raises(BnnError) as err:
                reader.array(2, **args)
            assert err.value.code is code, kwargs


def test_verified_reader_catches_a_silent_bit_flip(written: tuple[Path, str]):
    data_dir, run_id = written
    with RunStore(data_dir) as store:
        path = store.epoch_path(run_id, 2)
        raw = bytearray(path.read_bytes())
        raw[-200] ^= 0x01
        path.write_bytes(bytes(raw))
        with pytest.raises(BnnError) as err:
            store.reader(run_id, verify=True).epoch_params(2)
        assert err.value.code is ErrorCode.CORRUPT
        assert "sha256" in str(err.value)
        store.reader(run_id, verify=True).epoch_params(4)


def _writer(data_dir: str, run_id: str, epochs: int) -> None:
    from tests.trainer.conftest import _snapshot

    with RunStore(data_dir) as store:
        for epoch in range(epochs):
            store.write_epoch(run_id, _snapshot(epoch, layers={"w": (60, 60)}, grad_level=None))


def test_reader_during_writes_sees_only_complete_epochs(tmp_path: Path):
    data_dir = tmp_path / "live"
    with RunStore(data_dir) as store:
        run_id = store.create_run("live", {}).id
    proc = mp.get_context("fork").Process(target=_writer, args=(str(data_dir), run_id, 25))
    proc.start()
    seen: set[int] = set()
    with RunReader(run_id, data_dir) as reader:
        while proc.is_alive() or len(seen) < 25:
            for epoch in reader.epochs:
                if epoch not in seen:
                    params = reader.epoch_params(epoch)  # must never be partial or corrupt
                    assert params["w"]["posterior"]["weight"]["mu"].shape == (60, 60)
                    seen.add(epoch)
            if not proc.is_alive() and len(seen) < 25:
                break
    proc.join(timeout=30)
    assert proc.exitcode == 0
    assert seen == set(range(25))


def test_arrays_are_numpy_and_values_finite(written: tuple[Path, str]):
    data_dir, run_id = written
    log = load_distribution_log(run_id, data_dir=data_dir, epochs=[0])
    sigma = log[0]["layer1"]["posterior"]["weight"]["sigma"]
    assert isinstance(sigma, np.ndarray)
    assert sigma.dtype == np.float32
    assert np.all(sigma > 0)
    assert all(math.isfinite(float(v)) for v in sigma.ravel())
