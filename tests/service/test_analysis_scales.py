"""scale_diagnostics and its plot: values by hand, stored runs = dicts, PNGs, errors, memory."""

import io
import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from service import analysis as an
from service.analysis import SCALE_COLUMNS, RunLike, plot_scale_diagnostics, scale_diagnostics
from service.analysis.synthetic import synthetic_snapshot
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot
from trainer.store import RunReader, RunStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gauss(mu: list[float], sigma: list[float], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {
        "mu": np.array(mu, np.float32).reshape(shape),
        "sigma": np.array(sigma, np.float32).reshape(shape),
    }


def _prior(mu: float, sigma: float) -> dict[str, np.ndarray]:
    return {"mu": np.array([mu], np.float32), "sigma": np.array([sigma], np.float32)}


def _tiny_log() -> dict[int, dict[str, Any]]:
    """Layer ``a``: weight (2, 3) and bias (2,); layer ``b``: weight (4,), no bias."""
    log: dict[int, dict[str, Any]] = {}
    for epoch, scale in ((0, 1.0), (5, 0.5)):
        log[epoch] = {
            "a": {
                "posterior": {
                    "weight": _gauss(
                        [0.3 * scale, -0.1, 0.2, 0.0, 0.5, -0.4],
                        [0.1, 0.2, 0.05, 0.1, 0.3, 0.1],
                        (2, 3),
                    ),
                    "bias": _gauss([0.1, 0.2], [0.01, 0.04], (2,)),
                },
                "prior": {"weight": _prior(0.05, 0.25 * scale), "bias": _prior(0.0, 1.0)},
            },
            "b": {
                "posterior": {"weight": _gauss([-1.0, 1.0, -2.0, 2.0], [0.5, 0.5, 1.0, 1.0], (4,))},
                "prior": {"weight": _prior(0.0, 2.0 * scale)},
            },
        }
    return log


def _rows(table: pd.DataFrame) -> dict[tuple[str, int], list[float]]:
    """``{(layer, epoch): [values of SCALE_COLUMNS]}``."""
    return dict(zip(table.index.tolist(), table.to_numpy(np.float64).tolist(), strict=True))


def _row(table: pd.DataFrame, layer: str, epoch: int) -> dict[str, float]:
    return dict(zip(SCALE_COLUMNS, _rows(table)[(layer, epoch)], strict=True))


def _by_hand(mu: np.ndarray, sigma: np.ndarray, prior_sigma: float) -> list[float]:
    m = [float(x) for x in mu.ravel()]
    s = [float(x) for x in sigma.ravel()]
    n = len(m)
    mean_mu = sum(m) / n
    eb = math.sqrt(sum(si * si + (mi - mean_mu) ** 2 for mi, si in zip(m, s, strict=True)) / n)
    ordered = sorted(s)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return [
        prior_sigma,
        math.sqrt(sum(si * si for si in s) / n),
        median,
        math.sqrt(sum(mi * mi for mi in m) / n),
        prior_sigma / eb,
        0,
    ]


@pytest.mark.parametrize("param", ["weight", "bias"])
def test_values_match_a_hand_computation(param: str) -> None:
    log = _tiny_log()
    table = scale_diagnostics(log, param=param)
    assert list(table.columns) == list(SCALE_COLUMNS)
    assert table.index.names == ["layer", "epoch"]
    layers = ["a", "b"] if param == "weight" else ["a"]  # b has no bias: skipped
    assert list(table.index) == [(layer, e) for layer in layers for e in (0, 5)]
    for (layer, epoch), row in _rows(table).items():
        post = log[epoch][layer]["posterior"][param]
        prior_sigma = float(log[epoch][layer]["prior"][param]["sigma"][0])
        expected = _by_hand(post["mu"], post["sigma"], prior_sigma)
        assert row == pytest.approx(expected, rel=1e-12), (layer, epoch)


def test_centred_means_give_the_ratio_to_sqrt_of_mean_sigma2_plus_mu2() -> None:
    row = _row(scale_diagnostics(_tiny_log(), layers="b"), "b", 5)
    # layer b's means have mean 0: EB sigma^2 = mean(sigma^2 + mu^2) = 0.625 + 2.5; prior 1.0
    assert row["prior / EB sigma"] == pytest.approx(1.0 / math.sqrt(3.125), rel=1e-12)
    assert row["posterior sigma (RMS)"] == pytest.approx(math.sqrt(0.625), rel=1e-12)
    assert row["posterior sigma (median)"] == 0.75
    assert row["mean RMS"] == pytest.approx(math.sqrt(2.5), rel=1e-12)


def test_a_prior_at_the_empirical_bayes_value_has_ratio_one() -> None:
    rng = np.random.default_rng(3)
    mu = rng.normal(0.02, 0.05, (30, 20))
    sigma = np.exp(rng.normal(np.log(0.05), 0.3, (30, 20)))
    eb_sigma = np.sqrt(np.mean(sigma**2 + (mu - mu.mean()) ** 2))
    log = {0: {"l": {"posterior": {"weight": {"mu": mu, "sigma": sigma}},
                     "prior": {"weight": {"mu": np.array([mu.mean()]),
                                          "sigma": np.array([eb_sigma])}}}}}  # fmt: skip
    assert _row(scale_diagnostics(log), "l", 0)["prior / EB sigma"] == pytest.approx(1.0, 1e-13)


def test_non_finite_elements_are_counted_and_left_out() -> None:
    log = _tiny_log()
    clean = scale_diagnostics(log, layers="b")
    log[0]["b"]["posterior"]["weight"]["mu"] = np.array([-1.0, 1.0, np.nan, 2.0], np.float32)
    table = scale_diagnostics(log, layers="b")
    post = log[0]["b"]["posterior"]["weight"]
    ok = np.isfinite(post["mu"])
    expected = _by_hand(post["mu"][ok], post["sigma"][ok], 2.0)
    assert _rows(table)[("b", 0)] == pytest.approx([*expected[:5], 1], rel=1e-12)
    assert _rows(table)[("b", 5)] == _rows(clean)[("b", 5)]


def test_epochs_and_layers_select_rows() -> None:
    table = scale_diagnostics(_tiny_log(), [5], layers=["b", "a"])
    assert list(table.index) == [("b", 5), ("a", 5)]


def test_bad_arguments_are_clear_errors() -> None:
    log = _tiny_log()
    with pytest.raises(BnnError, match=r"unknown layer 'nope' at epoch 0; layers are \['a', 'b'\]"):
        scale_diagnostics(log, layers="nope")
    with pytest.raises(BnnError, match="layer 'b' has no bias") as err:
        scale_diagnostics(log, param="bias", layers="b")
    assert err.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(BnnError, match=r"param must be one of \['weight', 'bias'\], got 'kernel'"):
        scale_diagnostics(log, param="kernel")
    with pytest.raises(BnnError, match="has no epoch 3"):
        scale_diagnostics(log, [3])
    with pytest.raises(BnnError, match="unknown layer 'nope'") as err:
        plot_scale_diagnostics({"x": log, "y": log}, layers="nope")
    assert err.value.code is ErrorCode.NOT_FOUND


def _snaps(seed: int = 0, learnable: bool = True) -> list[EpochSnapshot]:
    snaps = [synthetic_snapshot(e, (30, 20, 3), seed=seed, learnable=learnable) for e in (0, 2, 4)]
    snaps[-1].params["layer1"]["posterior"]["weight"]["sigma"][2, 3] = np.inf
    return snaps


@pytest.mark.parametrize("param", ["weight", "bias"])
def test_stored_runs_equal_in_memory_runs(tmp_path: Path, param: str) -> None:
    snaps = _snaps()
    store = RunStore(tmp_path)
    run = store.create_run("scales", {}).id
    for snap in snaps:
        store.write_epoch(run, snap)
    store.close()
    an.clear_cache()
    expected = scale_diagnostics(snaps, param=param)
    assert _row(expected, "layer1", 4)["non-finite"] == (1 if param == "weight" else 0)
    by_id = scale_diagnostics(run, param=param, data_dir=tmp_path)
    pd.testing.assert_frame_equal(by_id, expected, check_exact=False, rtol=1e-12)
    log = {s.epoch: s.params for s in snaps}
    pd.testing.assert_frame_equal(scale_diagnostics(log, param=param), expected)
    with RunReader(run, tmp_path) as reader:  # the second time from the cache
        pd.testing.assert_frame_equal(
            scale_diagnostics(reader, param=param), expected, check_exact=False, rtol=1e-12
        )
    stored_png = plot_scale_diagnostics(run, param=param, title="t", data_dir=tmp_path)
    assert stored_png == plot_scale_diagnostics(snaps, param=param, title="t")


def _check_png(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(png))
    image.load()
    assert np.asarray(image.convert("L")).std() > 5, "a blank figure"
    return image.size


def test_plot_of_one_run_is_a_deterministic_png(tmp_path: Path) -> None:
    path = tmp_path / "scales.png"
    png = plot_scale_diagnostics(_snaps(), save=path)
    width, height = _check_png(png)
    assert 800 <= width <= 2000 and 250 <= height <= 1000, (width, height)
    assert path.read_bytes() == png
    assert plot_scale_diagnostics(_snaps()) == png
    assert plot_scale_diagnostics(_snaps(), title="my title") != png
    assert plot_scale_diagnostics(_snaps(), layers="layer2", param="bias") != png


def test_plot_overlays_several_runs() -> None:
    runs = {"learnable": _snaps(), "fixed": _snaps(seed=1, learnable=False)}
    png = plot_scale_diagnostics(runs)
    _check_png(png)
    assert png != plot_scale_diagnostics(runs["learnable"])
    mixed: list[RunLike] = [runs["learnable"], _tiny_log()]  # four layers, two runs
    _check_png(plot_scale_diagnostics(mixed))


def test_memory_stays_at_one_layer_whatever_the_number_of_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BNN_ANALYSIS_THREADS", "1")
    store = RunStore(tmp_path)
    run = store.create_run("mem", {}).id
    for e in range(8):
        store.write_epoch(run, synthetic_snapshot(e, (400, 500)))  # 200,000 weights: 0.8 MB
    store.close()
    peaks = []
    for epochs in ([0, 1], list(range(8))):
        # tracemalloc counts every thread: the least of 3 peaks leaves out what a thread
        # that an earlier test left running allocated meanwhile (seen once in a full run)
        tries = []
        for _ in range(3):
            an.clear_cache()
            tracemalloc.start()
            table = scale_diagnostics(run, epochs, data_dir=tmp_path)
            tries.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert len(table) == len(epochs)
        peaks.append(min(tries))
    assert peaks[1] < 1.3 * peaks[0] + 1e6  # 8 epochs cost what 2 cost
    assert peaks[1] < 8 * 200_000 * 4  # a few arrays of one layer, not 8 x 2
