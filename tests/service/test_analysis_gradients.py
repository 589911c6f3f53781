from pathlib import Path

import numpy as np
import pytest

from service.analysis import (
    compare_gradient_outliers,
    gradient_diagnostics,
    gradient_norm_series,
    gradient_outliers,
    prior_gradient_series,
)
from service.analysis.gradients import (
    MIN_LOG_SCALE,
    MIN_Z_ELEMENTS,
    Z_EXPLODING,
    GradThresholds,
    layer_scores,
)
from service.analysis.synthetic import synthetic_snapshot
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot
from trainer.store import RunReader, RunStore
from trainer.train import train

SIZES = (300, 200, 10)  # layer1: 60,000 weights, layer2: 2,000
# layer2 weights have shape (10, 200)
EXPLODING = [(3, 7), (5, 150), (9, 199)]  # |g| x 1e4
NAN_STEP = (4, 100)  # non-finite at some steps
ZERO = [(0, 0), (7, 9)]  # vanished


def _planted(seed: int = 0, learnable: bool = True) -> list[EpochSnapshot]:
    snaps = [
        synthetic_snapshot(e, SIZES, seed=seed, grad_level="element", learnable=learnable)
        for e in (0, 1)
    ]
    g = snaps[1].gradients
    assert g is not None
    stats = g["layer2"]["weight"]["mu"]
    for rc in EXPLODING:
        stats["mean_abs"][rc] *= 1e4
    stats["nonfinite"][NAN_STEP] = 2
    for rc in ZERO:  # 0 at every step: its max too
        stats["mean_abs"][rc] = 0.0
        stats["max_abs"][rc] = 0.0
    return snaps


def test_planted_exploding_gradients_are_found_first() -> None:
    snaps = _planted()
    top = gradient_outliers(snaps, k=5)  # latest epoch, all layers
    assert list(top.index) == [1, 2, 3, 4, 5]
    assert top.iloc[0]["index"] == NAN_STEP  # non-finite ranks first
    assert top.iloc[0]["mu non-finite steps"] == 2
    assert set(top["index"].iloc[1:4]) == set(EXPLODING)
    assert (top["layer"].iloc[:4] == "layer2").all()
    assert top["flagged"].iloc[:4].all() and not top["flagged"].iloc[4]
    w = snaps[1].params["layer2"]
    i, j = top.iloc[1]["index"]
    assert top.iloc[1]["posterior mu"] == pytest.approx(float(w["posterior"]["weight"]["mu"][i, j]))
    assert top.iloc[1]["posterior sigma"] == pytest.approx(
        float(w["posterior"]["weight"]["sigma"][i, j])
    )
    assert top.iloc[1]["prior sigma"] == pytest.approx(float(w["prior"]["weight"]["sigma"][0]))
    assert top.iloc[1]["flat index"] == i * 200 + j


def test_planted_vanishing_gradients_and_one_layer() -> None:
    top = gradient_outliers(_planted(), 1, 3, kind="vanishing", layer="layer2")
    assert set(top["index"].iloc[:2]) == set(ZERO)
    assert (top["|g|"].iloc[:2] == 0).all() and top["flagged"].iloc[:2].all()
    assert not top["flagged"].iloc[2]


def test_diagnostics_flag_planted_layers_and_not_clean_ones() -> None:
    diag = gradient_diagnostics(_planted())
    clean = diag.xs("layer1", level="layer")
    assert not clean["exploding flag"].any() and not clean["vanishing flag"].any()
    assert (clean["exploding"] == 0).all() and (clean["non-finite elements"] == 0).all()
    hit = diag.loc[(1, "layer2")]
    assert hit["exploding"] == len(EXPLODING) + 1 and hit["non-finite elements"] == 1
    assert hit["vanishing"] == len(ZERO) and hit["zero"] == len(ZERO)
    assert hit["non-finite steps"] == 2
    assert not diag.loc[(0, "layer2"), "exploding flag"]
    assert diag.loc[(1, "layer1"), "z threshold"] > 5  # Bonferroni for 60,000 elements
    norms = gradient_norm_series(_planted(), 1)
    assert "first/last norm ratio" not in diag.columns  # one model-wide value per row, once
    ratio = diag.xs(1, level="epoch")["step norm / last layer"]
    assert ratio["layer1"] == pytest.approx(norms["layer1"].mean() / norms["layer2"].mean())
    assert ratio["layer2"] == 1.0
    alone = gradient_diagnostics(_planted(), [1], layers="layer1")  # still over the last layer
    assert alone.loc[(1, "layer1"), "step norm / last layer"] == pytest.approx(ratio["layer1"])
    assert list(norms.columns) == ["layer1", "layer2"] and norms.index.name == "step"


def test_prior_gradient_series_of_learnable_and_fixed_priors() -> None:
    snaps = _planted()
    series = prior_gradient_series(snaps, 0)
    assert list(series.columns)[:4] == [
        "layer1.weight.mu",
        "layer1.weight.rho",
        "layer1.bias.mu",
        "layer1.bias.rho",
    ]
    assert snaps[0].gradients is not None
    expected = snaps[0].gradients["layer2"]["prior"]["bias"]["rho"]
    np.testing.assert_array_equal(series["layer2.bias.rho"].to_numpy(), expected)
    assert prior_gradient_series(_planted(learnable=False)).empty


def test_layer_level_statistics_use_absolute_thresholds() -> None:
    snap = synthetic_snapshot(0, (4, 3), grad_level="layer")
    assert snap.gradients is not None
    snap.gradients["layer1"]["weight"]["mu"]["mean_abs"] = np.array(5e2, np.float32)
    diag = gradient_diagnostics([snap])
    assert diag.loc[(0, "layer1"), "level"] == "layer"
    assert diag.loc[(0, "layer1"), "exploding flag"]
    assert not gradient_diagnostics([snap], explode_abs=1e3).loc[(0, "layer1"), "exploding flag"]
    with pytest.raises(BnnError, match=r"element-level .* grad_level 'layer'") as err:
        gradient_outliers([snap])
    assert err.value.code is ErrorCode.NOT_FOUND  # 404: no such data in this run


def test_bad_arguments_are_named() -> None:
    snaps = _planted()
    with pytest.raises(BnnError, match=r"kind must be one of .* got 'exploded'"):
        gradient_outliers(snaps, kind="exploded")
    with pytest.raises(BnnError, match="k must be an integer >= 1, got 0"):
        gradient_outliers(snaps, k=0)
    with pytest.raises(BnnError, match=r"stat must be one of .* got 'mean'"):
        gradient_diagnostics(snaps, stat="mean")
    no_grads = [synthetic_snapshot(0, (3, 2))]
    with pytest.raises(BnnError, match="no gradient statistics") as err:
        gradient_diagnostics(no_grads)
    assert err.value.code is ErrorCode.NOT_FOUND


def test_compare_planted_outliers_across_two_stored_runs(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    ids = {}
    for label, snaps in (("learnable", _planted(0, True)), ("fixed", _planted(1, False)[:1])):
        ids[label] = store.create_run(label, {}).id
        for snap in snaps:
            store.write_epoch(ids[label], snap)
    store.close()
    readers = {k: RunReader(v, tmp_path) for k, v in ids.items()}
    with pytest.raises(BnnError, match=rf"run '{ids['fixed']}' has no epoch 1"):
        compare_gradient_outliers(readers, epoch=1)
    with pytest.raises(BnnError, match="need at least 2 runs"):
        compare_gradient_outliers([readers["fixed"]])
    for reader in readers.values():
        reader.close()
    result = compare_gradient_outliers(list(ids.values()), epoch=0, k=3, data_dir=tmp_path)
    assert list(result.table["run"]) == [ids["learnable"]] * 3 + [ids["fixed"]] * 3
    assert result.counts.index.tolist() == ["layer1", "layer2"]
    # each row's statistics in the other run are that run's own values at the same element
    fixed = synthetic_snapshot(0, SIZES, seed=1, grad_level="element", learnable=False)
    assert fixed.gradients is not None
    for _, row in result.table.iterrows():
        g = fixed.gradients[row["layer"]]["weight"]["mu"]["mean_abs"][row["index"]]
        assert row[f"|g| ({ids['fixed']})"] == pytest.approx(float(g), rel=2**-8)  # bfloat16
        assert row[f"prior mu ({ids['fixed']})"] == 0.0


def test_compare_runs_with_different_priors_trained_for_real(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    cfg = dict(dataset="regression", widths=[16], epochs=2, n_train=64, n_test=16, device="cpu")
    runs = {
        p: train(cfg | {"prior": p}, sink=store, progress=False).run_id
        for p in ("fixed", "learnable")
    }
    store.close()
    result = compare_gradient_outliers(runs, k=4, data_dir=tmp_path)
    assert set(result.table["run"]) == {"fixed", "learnable"}
    for col in ("robust z", "|g|", "posterior mu", "prior sigma"):
        assert {f"{col} (fixed)", f"{col} (learnable)"} <= set(result.table.columns)
    assert set(result.counts.columns) == {
        f"{c} ({r})" for c in ("exploding", "vanishing", "non-finite") for r in runs
    }
    other = train(cfg | {"widths": [8]}, sink=RunStore(tmp_path), progress=False).run_id
    with pytest.raises(BnnError, match="same architecture") as err:
        compare_gradient_outliers([runs["fixed"], other], data_dir=tmp_path)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


# ------------------------------------------------- calibrated flags on real training runs
def _trained(tmp_path: Path, **cfg: object) -> RunReader:
    store = RunStore(tmp_path)
    base = dict(dataset="regression", n_test=64, eval_samples=4, device="cpu", seed=0)
    run_id = train(base | cfg, sink=store, progress=False).run_id
    store.close()
    assert run_id is not None
    return RunReader(run_id, tmp_path)


def _tree(g: np.ndarray) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    stats = {"mean_abs": g.astype(np.float32), "nonfinite": np.zeros(g.shape, np.int64)}
    return {"weight": {"mu": stats}}


def test_healthy_runs_raise_no_default_flags(tmp_path: Path) -> None:
    # the 5-epoch 1-10-1 run (10-weight layers, a z of -4 was flagged vanishing)
    # and a 1-50-50-1 run; benchmarks/gradient_false_alarms.py measures many more
    for i, cfg in enumerate(({"epochs": 5}, {"widths": [50, 50], "epochs": 5})):
        with _trained(tmp_path / str(i), **cfg) as reader:
            diag = gradient_diagnostics(reader)
            assert (diag["exploding"] == 0).all() and (diag["vanishing"] == 0).all(), diag
            small = diag["elements"] < MIN_Z_ELEMENTS
            assert np.isinf(diag.loc[small, "z threshold"]).all()
            assert (diag.loc[~small, "z threshold"] >= Z_EXPLODING).all()
            assert np.isinf(diag["vanishing z threshold"]).all()
            # an explicit threshold is used as given, in layers of any size
            loose = gradient_diagnostics(reader, z_threshold=1.0)
            assert (loose["vanishing"] > 0).any() and (loose["z threshold"] == 1.0).all()


def test_a_zero_mean_is_vanishing_only_where_the_max_is_zero_too(tmp_path: Path) -> None:
    """A zero mean |g| whose max |g| is not zero (a mean sampled on steps where that weight
    had no gradient, element_every; or a sum of tiny |g| that the division rounded to 0) is
    not "exactly 0 over the epoch": the max, taken at every step, decides, in the outlier
    ranking and in the stored run's diagnostics alike."""
    snaps = _planted()
    stats = snaps[1].gradients["layer2"]["weight"]["mu"]  # type: ignore[index]
    not_zero = [(2, 2), (6, 60)]  # a zero mean, a non-zero max
    for rc in not_zero:
        stats["mean_abs"][rc] = 0.0
    stats["max_abs"][not_zero[1]] = 1e-45  # the smallest float32: n steps of it mean 0
    th = GradThresholds()
    tree = snaps[1].gradients["layer2"]  # type: ignore[index]
    flagged = layer_scores(tree, th).vanishing(th).reshape(10, 200)
    assert sorted(zip(*np.nonzero(flagged), strict=True)) == sorted(ZERO)
    without_max = {"weight": {"mu": {k: v for k, v in stats.items() if k != "max_abs"}}}
    assert layer_scores(without_max, th).vanishing(th).sum() == 4  # no max: the mean's zeros
    top = gradient_outliers(snaps, 1, 4, kind="vanishing", layer="layer2")
    assert top["flagged"].tolist() == [True, True, False, False]
    assert set(top["index"].iloc[:2]) == set(ZERO)
    store = RunStore(tmp_path)
    run = store.create_run("sampled", {}).id
    for snap in snaps:
        store.write_epoch(run, snap)
    store.close()
    with RunReader(run, tmp_path) as reader:
        diag = gradient_diagnostics(reader)
    assert diag.loc[(1, "layer2"), "vanishing"] == len(ZERO)


def test_small_layers_get_no_default_z_flags() -> None:
    g = 10.0 ** np.array([-3.0, -3.1, -2.9, -3.05, -2.95, -3.0, -3.02, -2.98, -7.0, 1.0])
    th = GradThresholds()
    sc = layer_scores(_tree(g), th)
    assert sc.z()[-2] < -4 and sc.z()[-1] > 4  # far out, but only 10 elements
    assert not sc.exploding(th).any() and not sc.vanishing(th).any()
    assert sc.z_threshold == sc.z_vanishing == np.inf
    explicit = GradThresholds(z_threshold=3.5)
    sc = layer_scores(_tree(g), explicit)
    assert sc.exploding(explicit).tolist() == [False] * 9 + [True]
    assert sc.vanishing(explicit).tolist() == [False] * 8 + [True, False]
    # the absolute bounds and non-finite steps apply at any size
    assert layer_scores(_tree(g * 1e5), th).exploding(th)[-1]  # 1e5 > explode_abs


def test_scale_has_a_floor_of_half_a_decade() -> None:
    # |g| nearly all alike (a rho gradient that the KL term dominates): MAD ~ 1e-4 decades
    rng = np.random.default_rng(0)
    g = 1e-3 * (1 + 1e-4 * rng.standard_normal(1000))
    g[0] = 1e-2  # 10x: z would be ~ 1e4 with the raw MAD
    th = GradThresholds()
    sc = layer_scores(_tree(g), th)
    assert sc.scale == MIN_LOG_SCALE and sc.z(np.array([0]))[0] == pytest.approx(2.0, abs=1e-3)
    assert not sc.exploding(th).any()
    g[0] = 1e-3 * 10**3.5  # 3.5 decades above: beyond 6 * 0.5
    assert layer_scores(_tree(g), th).exploding(th).tolist() == [True] + [False] * 999


def test_an_injected_exploding_gradient_in_a_real_run_is_flagged(tmp_path: Path) -> None:
    with _trained(tmp_path, widths=[50, 50], epochs=3) as reader:
        last = reader.epochs[-1]
        tree = reader.gradients(last, "layer2")
    g = np.abs(np.asarray(tree["weight"]["mu"]["mean_abs"], np.float32))
    th = GradThresholds()
    assert not layer_scores(tree, th).exploding(th).any()
    spike = (7, 31)
    g[spike] = float(g.max()) * 1e4  # a spike 4 decades above the layer's largest |g|
    tree["weight"]["mu"]["mean_abs"] = g
    sc = layer_scores(tree, th)
    assert np.flatnonzero(sc.exploding(th)).tolist() == [7 * 50 + 31]
    assert not sc.vanishing(th).any()


def test_a_diverging_run_is_flagged_exploding(tmp_path: Path) -> None:
    with _trained(tmp_path, widths=[50, 50], epochs=5, optimizer="sgd", lr=10.0) as reader:
        diag = gradient_diagnostics(reader, [reader.epochs[-1]])
    assert diag["exploding flag"].any()
    assert (diag["exploding"] >= diag["non-finite elements"]).all()
    assert diag["non-finite elements"].sum() > 0
