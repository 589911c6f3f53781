"""The analysis reads the summaries stored in epoch files (trainer.store.summaries) instead
of the arrays, and gets exactly what the arrays give; files without them (older files,
the committed version 1 fixture) are read from the arrays as before."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest

from service import analysis as an
from service.analysis import gradients, source, summary
from service.analysis.synthetic import synthetic_snapshot
from trainer.snapshot import EpochSnapshot, GradLevel
from trainer.store import RunStore, runstore, write_epoch_file
from trainer.store.compact import compact_run

RUN = "summaries-run"
SIZES = (40, 30, 4)
FIXTURE = Path(__file__).parents[1] / "trainer" / "data" / "epoch_v1.h5"


def _snapshot(epoch: int, level: GradLevel) -> EpochSnapshot:
    """Synthetic epochs with the hard cases: non-finite posteriors (a diverging epoch),
    non-finite gradients, a zero statistic; layer2 without bias in every epoch."""
    snap = synthetic_snapshot(epoch, SIZES, seed=epoch, grad_level=level)
    del snap.params["layer2"]["posterior"]["bias"], snap.params["layer2"]["prior"]["bias"]
    if snap.gradients is not None:
        del snap.gradients["layer2"]["bias"], snap.gradients["layer2"]["prior"]["bias"]
    if epoch == 1:
        post = snap.params["layer1"]["posterior"]["weight"]
        post["mu"][0, :2] = [np.nan, np.inf]
        post["sigma"][1, 0] = 0.0
        if level is GradLevel.ELEMENT:
            stats = snap.gradients["layer1"]["weight"]["mu"]  # type: ignore[index]
            stats["mean_abs"][0, :3] = [np.inf, 0.0, np.nan]
            stats["max_abs"][0, 0] = np.inf
            stats["nonfinite"][0, :2] = [2, 1]
    return snap


def _store(data: Path, level: GradLevel, with_summaries: bool, mp: pytest.MonkeyPatch) -> Path:
    with mp.context() as m:
        if not with_summaries:
            m.setattr(
                runstore, "write_epoch_file", functools.partial(write_epoch_file, summaries=False)
            )
        with RunStore(data) as store:
            store.create_run("s", {}, run_id=RUN)
            for epoch in range(3):
                store.write_epoch(RUN, _snapshot(epoch, level))
    return data


@pytest.fixture(params=[GradLevel.ELEMENT, GradLevel.LAYER])
def runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> tuple[Path, Path]:
    """The same run stored twice: with summaries, and without (as older files)."""
    level = request.param
    stored = _store(tmp_path / "stored", level, True, monkeypatch)
    arrays = _store(tmp_path / "arrays", level, False, monkeypatch)
    an.clear_cache()
    return stored, arrays


TABLES: dict[str, Callable[[Path], Any]] = {
    "kl_tables": lambda d: an.kl_to_prior(RUN, data_dir=d),
    "pairwise": lambda d: an.pairwise_kl_trajectory(RUN, data_dir=d),
    "pairwise_prior": lambda d: an.pairwise_kl_trajectory(RUN, dist_type="prior", data_dir=d),
    "layer_kl": lambda d: an.compute_layer_kl_divergences(RUN, epoch=1, data_dir=d),
    "bands_mu": lambda d: an.percentile_bands(RUN, "layer1", data_dir=d),
    "bands_sigma": lambda d: an.percentile_bands(RUN, "layer1", "bias", "sigma", data_dir=d),
    "overall": lambda d: an.get_overall_weight_stats(RUN, epoch=1, data_dir=d),
    "overall_prior": lambda d: an.get_overall_weight_stats(RUN, dist_type="prior", data_dir=d),
    "priors": lambda d: an.prior_trajectories(RUN, data_dir=d),
    "scales": lambda d: an.scale_diagnostics(RUN, data_dir=d),
    "width": lambda d: an.width_study([RUN], data_dir=d, min_widths=1),
    "gradients": lambda d: an.gradient_diagnostics(RUN, data_dir=d),
    "gradients_max": lambda d: an.gradient_diagnostics(RUN, stat="max_abs", data_dir=d),
    "gradients_rho": lambda d: an.gradient_diagnostics(
        RUN, param="bias", grad_param="rho", layers="layer1", data_dir=d
    ),
}
PLOTS: dict[str, Callable[[Path], bytes]] = {
    "kl": lambda d: an.plot_kl_over_epochs(RUN, data_dir=d),
    "bands": lambda d: an.plot_percentile_bands(RUN, "layer1", data_dir=d),
    "gradients": lambda d: an.plot_gradient_magnitudes(RUN, data_dir=d),
}


def test_stored_summaries_give_exactly_what_the_arrays_give(runs: tuple[Path, Path]) -> None:
    stored, arrays = runs
    for name, table in TABLES.items():
        want = table(arrays)
        an.clear_cache()
        got = table(stored)
        an.clear_cache()
        pd.testing.assert_frame_equal(got, want, check_exact=True, obj=name)
    assert an.kl_to_prior(RUN, data_dir=stored).loc[(1, "layer1"), "Weight non-finite"] == 3
    for name, plot in PLOTS.items():
        assert plot(stored) == plot(arrays), name  # the same figure, byte for byte


def _forbid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any computation from the arrays of a parameter or gradient statistic fails."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("read from the arrays although the file keeps summaries")

    monkeypatch.setattr(summary, "_compute", refuse)
    monkeypatch.setattr(gradients, "grad_tree", refuse)
    monkeypatch.setattr(source._ReaderView, "array", refuse)
    monkeypatch.setattr(source._ReaderView, "gradients", refuse)
    original = source._ReaderView.gradient_array

    def norms_only(self: Any, layer: str, *path: str, **kwargs: Any) -> Any:
        assert path == ("step_norm",), path
        return original(self, layer, *path, **kwargs)

    monkeypatch.setattr(source._ReaderView, "gradient_array", norms_only)


def test_the_cold_plots_read_no_array_when_files_keep_summaries(
    runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    stored, arrays = runs
    want = {name: plot(arrays) for name, plot in PLOTS.items()}
    an.clear_cache()
    _forbid(monkeypatch)
    for name, plot in PLOTS.items():
        assert plot(stored) == want[name], name
    for name in ("kl_tables", "pairwise", "bands_mu", "overall", "priors", "scales", "width"):
        TABLES[name](stored)
    with pytest.raises(AssertionError, match="from the arrays"):  # the flags need them
        an.gradient_diagnostics(RUN, data_dir=stored)


def test_files_without_summaries_are_computed_from_their_arrays(
    runs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, arrays = runs
    calls: list[str] = []
    original = summary._compute

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(summary, "_compute", counted)
    an.plot_kl_over_epochs(RUN, data_dir=arrays)
    assert calls.count("layer1") == 3 * 2  # every epoch, weight and bias


def _fixture_run(data: Path, epochs: tuple[int, ...] = (0, 1, 2)) -> None:
    """The committed schema version 1 file uploaded as a few epochs of a stopped run."""
    with RunStore(data) as store:
        store.create_run("fixture", {}, run_id=RUN)
        for epoch in epochs:
            path = data.parent / f"upload_{epoch}.h5"
            shutil.copyfile(FIXTURE, path)
            with h5py.File(path, "r+") as f:
                f.attrs["epoch"], f.attrs["run_id"] = epoch, RUN
            store.import_epoch_file(RUN, epoch, path)
        store.set_status(RUN, "completed")


def test_a_version_1_run_reads_as_before_and_the_same_once_compacted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _fixture_run(data)
    names = ("kl_tables", "pairwise", "bands_mu", "bands_sigma", "overall", "priors", "scales")
    before = {name: TABLES[name](data) for name in names}
    plot = an.plot_kl_over_epochs(RUN, data_dir=data)
    with RunStore(data) as store:
        report = compact_run(store, RUN)
        assert {e.action for e in report.epochs} == {"compacted"}
        with store.reader(RUN) as reader, reader.open(1) as ef:
            assert ef.header.schema_version == 2 and ef.summaries() is not None
    an.clear_cache()
    for name in names:  # the posteriors are unchanged by compaction: identical tables
        pd.testing.assert_frame_equal(TABLES[name](data), before[name], check_exact=True)
    assert an.plot_kl_over_epochs(RUN, data_dir=data) == plot
