"""What the cold plots read, and the service's warm-up (benchmarks/cold_plots.py times them).

``plot_gradient_magnitudes`` draws the examined |g| statistic, the non-finite counts and
the step norms. From epoch files with stored summaries (written now) it reads the step
norms alone; from files without them (``arrays``: older files) it reads only those
arrays (not ``max_abs``, the largest single-step |g|), and a gradient table asked for
afterwards still gets its peak, read then, equal to the one a fresh cache computes.
``service.app.warm_up`` draws one figure per process.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from service import analysis as an
from service.analysis import source
from service.analysis.synthetic import synthetic_snapshot
from trainer.snapshot import GradLevel
from trainer.store import RunStore, runstore, write_epoch_file

SIZES = (20, 30, 4)


@pytest.fixture(params=["summaries", "arrays"])
def run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> tuple[Path, str]:
    """A stored run whose files keep their summaries, or not (as older files)."""
    if request.param == "arrays":
        monkeypatch.setattr(
            runstore, "write_epoch_file", functools.partial(write_epoch_file, summaries=False)
        )
    data = tmp_path / "data"
    with RunStore(data) as store:
        run_id = store.create_run("cold", {}).id
        for epoch in range(3):
            snap = synthetic_snapshot(epoch, SIZES, seed=epoch, grad_level=GradLevel.ELEMENT)
            if epoch == 1:  # a non-finite gradient: the plot marks it, the peak skips it
                mu = snap.gradients["layer1"]["weight"]["mu"]  # type: ignore[index]
                mu["max_abs"][0, 0] = np.inf
                mu["nonfinite"][0, 0] = 1
            store.write_epoch(run_id, snap)
    an.clear_cache()
    return data, run_id


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every gradient array path read from a stored epoch."""
    seen: list[tuple[str, ...]] = []
    original = source._ReaderView.gradient_array

    def spy(self: Any, layer: str, *path: str, **kwargs: Any) -> Any:
        seen.append(path)
        return original(self, layer, *path, **kwargs)

    monkeypatch.setattr(source._ReaderView, "gradient_array", spy)
    return seen


def test_the_gradient_plot_reads_what_it_draws(
    run: tuple[Path, str], reads: list[tuple[str, ...]]
) -> None:
    data, run_id = run
    png = an.plot_gradient_magnitudes(run_id, data_dir=data)
    assert png.startswith(b"\x89PNG")
    assert ("step_norm",) in reads
    if _stored(data, run_id):
        assert set(reads) == {("step_norm",)}  # the rest comes from the stored summaries
    else:
        assert ("weight", "mu", "mean_abs") in reads and ("weight", "mu", "nonfinite") in reads
    assert not [p for p in reads if "max_abs" in p]
    reads.clear()
    assert an.plot_gradient_magnitudes(run_id, data_dir=data) == png  # cached: nothing read
    assert not [p for p in reads if p != ("step_norm",)]


def test_a_table_after_the_plot_equals_one_from_a_fresh_cache(
    run: tuple[Path, str], reads: list[tuple[str, ...]]
) -> None:
    data, run_id = run
    an.plot_gradient_magnitudes(run_id, data_dir=data)
    reads.clear()
    after_plot = an.gradient_diagnostics(run_id, data_dir=data)
    # the peak: read now from the arrays, or stored; the flags read the statistic
    assert (("weight", "mu", "max_abs") in reads) is not _stored(data, run_id)
    assert ("weight", "mu", "mean_abs") in reads
    an.clear_cache()
    fresh = an.gradient_diagnostics(run_id, data_dir=data)
    pd.testing.assert_frame_equal(after_plot, fresh)
    peaks = fresh["peak |g|"].xs("layer1", level="layer")
    assert np.isfinite(peaks).all()  # epoch 1's inf is left out of the peak
    assert fresh.loc[(1, "layer1"), "non-finite elements"] == 1


def _stored(data: Path, run_id: str) -> bool:
    """Whether the run's last epoch file keeps its summaries."""
    with RunStore(data) as store, store.reader(run_id) as reader, reader.open(2) as ef:
        return ef.summaries() is not None


def test_warm_up_draws_once_and_freezes_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.app as app_module

    drawn: list[bytes] = []
    frozen: list[bool] = []
    from service.analysis import _figure

    original = _figure.to_png
    monkeypatch.setattr(_figure, "to_png", lambda fig, *a, **k: drawn.append(original(fig)))
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    monkeypatch.setattr(app_module, "_warmed", type(app_module._warmed)())  # a fresh Event
    app_module.warm_up()
    app_module.warm_up()
    assert len(drawn) == 1 and drawn[0].startswith(b"\x89PNG")
    assert frozen == [True]
