import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service import analysis as an
from service.analysis.synthetic import synthetic_snapshot
from tests.trainer.conftest import as_stored
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot
from trainer.store import RunReader, RunStore

EPOCHS = (0, 3, 6)


def _snaps(seed: int = 0, learnable: bool = True) -> list[EpochSnapshot]:
    snaps = [
        synthetic_snapshot(e, (50, 40, 4), seed=seed, grad_level="element", learnable=learnable)
        for e in EPOCHS
    ]
    snaps[-1].params["layer1"]["posterior"]["weight"]["mu"][3, 4] = np.nan  # stored NaN
    for snap in snaps:  # statistics as the store keeps them (bfloat16), so both sides agree
        snap.gradients = as_stored(snap.gradients)
    return snaps


Stored = tuple[Path, dict[str, str], dict[str, list[EpochSnapshot]]]


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    data_dir = tmp_path_factory.mktemp("store")
    store = RunStore(data_dir)
    snaps = {"learnable": _snaps(0, True), "fixed": _snaps(1, False)}
    ids = {}
    for label, run in snaps.items():
        ids[label] = store.create_run(label, {}).id
        for snap in run:
            store.write_epoch(ids[label], snap)
    store.close()
    return data_dir, ids, snaps


TABLES: list[Callable[..., pd.DataFrame]] = [
    lambda run, **kw: an.compute_layer_kl_divergences(run, **kw),
    lambda run, **kw: an.compute_layer_kl_divergences(run, 3, "prior", **kw),
    lambda run, **kw: an.get_overall_weight_stats(run, **kw),
    lambda run, **kw: an.kl_to_prior(run, **kw),
    lambda run, **kw: an.pairwise_kl_trajectory(run, **kw),
    lambda run, **kw: an.percentile_bands(run, "layer2", "bias", "sigma", **kw),
    lambda run, **kw: an.prior_trajectories(run, **kw),
    lambda run, **kw: an.gradient_diagnostics(run, **kw),
    lambda run, **kw: an.gradient_outliers(run, 3, 4, **kw),
    lambda run, **kw: an.gradient_norm_series(run, **kw),
]


@pytest.mark.parametrize("table", TABLES)
def test_stored_runs_give_the_same_tables_as_dicts(
    table: Callable[..., pd.DataFrame], stored: Stored
) -> None:
    data_dir, ids, snaps = stored
    an.clear_cache()
    expected = table(snaps["learnable"])
    by_id = table(ids["learnable"], data_dir=data_dir)
    pd.testing.assert_frame_equal(by_id, expected, check_exact=False, rtol=1e-12)
    with RunReader(ids["learnable"], data_dir) as reader:
        pd.testing.assert_frame_equal(
            table(reader), expected, check_exact=False, rtol=1e-12
        )  # cached


def test_stored_nan_is_counted_not_fatal(stored: Stored) -> None:
    data_dir, ids, _ = stored
    table = an.compute_layer_kl_divergences(ids["learnable"], data_dir=data_dir)
    assert table.loc["layer1", "Weight non-finite"] == 1
    assert np.isfinite(table.loc["layer1", "Weight KL Sum"])


def test_cached_results_do_not_reopen_epoch_files(
    stored: Stored, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, ids, _ = stored
    an.clear_cache()
    opened: list[int] = []
    original = RunReader.open

    def counting(self: RunReader, epoch: int, **kw: object) -> object:
        opened.append(epoch)
        return original(self, epoch, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(RunReader, "open", counting)
    first = an.pairwise_kl_trajectory(ids["fixed"], data_dir=data_dir)
    assert sorted(set(opened)) == list(EPOCHS)
    opened.clear()
    again = an.kl_to_prior(ids["fixed"], data_dir=data_dir)
    again2 = an.pairwise_kl_trajectory(ids["fixed"], data_dir=data_dir)
    assert opened == []
    pd.testing.assert_frame_equal(first, again2)
    assert len(again) == len(first)


def test_comparisons_of_stored_runs(stored: Stored) -> None:
    data_dir, ids, snaps = stored
    diff = an.kl_between_runs(ids["learnable"], ids["fixed"], data_dir=data_dir)
    pd.testing.assert_frame_equal(
        diff, an.kl_between_runs(snaps["learnable"], snaps["fixed"]), check_like=True
    )
    assert diff.loc["layer1", "Weight non-finite"] == 1
    with pytest.raises(BnnError, match=r"at least 2 different widths.*fixed: 40"):
        an.width_study(ids, data_dir=data_dir)  # both runs are 40 wide: no width study
    widths = an.width_study(ids, data_dir=data_dir, min_widths=1)
    assert widths.loc[("fixed", "layer1"), "width"] == 40
    assert widths.loc[("fixed", "layer1"), "Weight prior mu"] == 0.0
    assert widths.loc[("learnable", "layer1"), "Weight prior mu"] > 0
    png = an.plot_width_study(ids, data_dir=data_dir, widths={"fixed": 40, "learnable": 80})
    assert png[:4] == b"\x89PNG"


def test_unknown_runs_and_bad_inputs(stored: Stored) -> None:
    data_dir, _, snaps = stored
    with pytest.raises(BnnError) as err:
        an.compute_layer_kl_divergences("feedbeef0000", data_dir=data_dir)
    assert err.value.code is ErrorCode.NOT_FOUND and "feedbeef0000" in err.value.message
    with pytest.raises(BnnError, match="data_dir/db_url are only used with a run id"):
        an.kl_to_prior(snaps["fixed"], data_dir=data_dir)
    with pytest.raises(BnnError, match=r"run must be a distribution_log dict.* got int"):
        an.kl_to_prior(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("threads", [1, 2])
def test_memory_stays_at_one_layer_per_thread_whatever_the_number_of_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setenv("BNN_ANALYSIS_THREADS", str(threads))
    store = RunStore(tmp_path)
    run = store.create_run("mem", {}).id
    for e in range(12):
        store.write_epoch(run, synthetic_snapshot(e, (400, 500)))  # 200,000 weights: 0.8 MB
    store.close()
    layer_bytes = 200_000 * 4
    peaks = []
    for epochs in ([0, 1], list(range(12))):
        an.clear_cache()
        tracemalloc.start()
        an.pairwise_kl_trajectory(run, epochs, data_dir=tmp_path)
        an.percentile_bands(run, "layer1", epochs=epochs, data_dir=tmp_path)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    if threads == 1:  # with threads, peaks depend on how the threads' work overlaps
        assert peaks[1] < 1.3 * peaks[0] + 1e6  # 12 epochs cost what 2 cost
    assert peaks[1] < 8 * threads * layer_bytes  # a few tensors per thread, not 12 x 2 tensors


def test_parts_computed_later_reuse_the_cached_summary(stored: Stored) -> None:
    data_dir, ids, snaps = stored
    an.clear_cache()
    an.percentile_bands(ids["learnable"], "layer1", data_dir=data_dir)  # percentiles, no prior
    pd.testing.assert_frame_equal(
        an.kl_to_prior(ids["learnable"], data_dir=data_dir), an.kl_to_prior(snaps["learnable"])
    )
    pd.testing.assert_frame_equal(
        an.percentile_bands(ids["learnable"], "layer1", data_dir=data_dir),
        an.percentile_bands(snaps["learnable"], "layer1"),
    )


def test_a_run_created_again_under_the_same_id_is_not_served_from_the_cache(
    tmp_path: Path,
) -> None:
    store = RunStore(tmp_path)
    store.create_run("a", {}, run_id="exp1")
    store.write_epoch("exp1", synthetic_snapshot(0, (6, 5), seed=1))
    first = an.compute_layer_kl_divergences("exp1", data_dir=tmp_path)
    store.delete_run("exp1")
    store.create_run("a", {}, run_id="exp1")
    store.write_epoch("exp1", synthetic_snapshot(0, (6, 5), seed=2))
    store.close()
    again = an.compute_layer_kl_divergences("exp1", data_dir=tmp_path)
    expected = an.compute_layer_kl_divergences([synthetic_snapshot(0, (6, 5), seed=2)])
    pd.testing.assert_frame_equal(again, expected)
    assert not again.equals(first)
