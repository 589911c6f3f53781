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
    for rc in ZERO:
        stats["mean_abs"][rc] = 0.0
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
    ratio = diag.loc[(1, "layer1"), "first/last norm ratio"]
    norms = gradient_norm_series(_planted(), 1)
    assert ratio == pytest.approx(norms["layer1"].mean() / norms["layer2"].mean())
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
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


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
        assert row[f"|g| ({ids['fixed']})"] == pytest.approx(float(g))
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
