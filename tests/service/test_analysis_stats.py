import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.analysis import (
    PERCENTILE_COLUMNS,
    TB_PERCENTILES,
    get_overall_weight_stats,
    percentile_bands,
    percentiles,
    prior_trajectories,
)
from service.analysis._numeric import Moments, robust_z, top_k
from service.analysis.synthetic import synthetic_log
from trainer.errors import BnnError


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 30_000),
    st.sampled_from(["normal", "ties", "heavy", "outlier"]),
    st.sampled_from([np.float32, np.float64]),
)
def test_percentiles_are_exactly_numpys(seed: int, n: int, kind: str, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    x = {
        "normal": lambda: rng.normal(0, 0.05, n),
        "ties": lambda: rng.integers(-3, 3, n).astype(float),
        "heavy": lambda: rng.standard_cauchy(n),
        "outlier": lambda: np.concatenate([rng.normal(size=n - 1), [1e30]]),
    }[kind]().astype(dtype)
    q = np.sort(np.concatenate([TB_PERCENTILES, rng.uniform(0, 100, 3)]))
    np.testing.assert_array_equal(percentiles(x, q), np.percentile(x, q).astype(np.float64))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=50), st.integers(0, 50))
def test_pooled_moments_match_numpy(values: list[float], cut: int) -> None:
    x = np.asarray(values)
    pooled = Moments.of(x[:cut]) + Moments.of(x[cut:])
    assert pooled.n == x.size
    if x.size:
        assert math.isclose(pooled.mean, x.mean(), rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(pooled.std, x.std(), rel_tol=1e-7, abs_tol=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=300), st.integers(1, 20))
def test_top_k_is_a_sorted_prefix(values: list[float], k: int) -> None:
    x = np.asarray(values)
    got = top_k(x, k)
    assert len(got) == min(k, x.size)
    np.testing.assert_array_equal(x[got], np.sort(x)[::-1][: len(got)])
    assert top_k(np.array([1.0, np.nan, 2.0]), 3).tolist() == [2, 0, 1]


def test_robust_z_formula_and_degenerate_cases() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0, np.nan, -np.inf])
    z, med, scale = robust_z(x)
    finite = x[np.isfinite(x)]
    mad = np.median(np.abs(finite - np.median(finite)))
    assert med == 3.0 and scale == pytest.approx(mad / 0.6745)
    assert z[4] == pytest.approx(0.6745 * 97 / mad)
    assert z[5] == np.inf and z[6] == -np.inf
    z_const, _, _ = robust_z(np.ones(10))
    assert not z_const.any()


def _reference(arrays: list[np.ndarray]) -> tuple[float, float]:
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    return flat.mean(), flat.std()


def test_overall_stats_match_a_numpy_reference() -> None:
    log = synthetic_log([0, 4], (9, 7, 3), seed=5)
    log[4]["layer2"]["posterior"]["weight"]["sigma"][1, 1] = np.nan
    table = get_overall_weight_stats(log)  # latest epoch: 4
    assert list(table.index) == ["Overall", "layer1", "layer2"]
    post = {k: v["posterior"] for k, v in log[4].items()}
    ok = np.isfinite(post["layer2"]["weight"]["sigma"])
    layer2 = {s: post["layer2"]["weight"][s][ok] for s in ("mu", "sigma")}
    for stat in ("mu", "sigma"):
        per_layer = [post["layer1"]["weight"][stat], layer2[stat]]
        mean, std = _reference(per_layer)
        assert table.loc["Overall", f"Weight {stat} mean"] == pytest.approx(mean, rel=1e-9)
        assert table.loc["Overall", f"Weight {stat} std"] == pytest.approx(std, rel=1e-9)
        for name, arr in zip(["layer1", "layer2"], per_layer, strict=True):
            assert table.loc[name, f"Weight {stat} mean"] == pytest.approx(
                arr.mean(dtype=np.float64), rel=1e-9
            )
            assert table.loc[name, f"Weight {stat} std"] == pytest.approx(
                arr.std(dtype=np.float64), rel=1e-7
            )
        bias = [post[n]["bias"][stat] for n in ("layer1", "layer2")]
        assert table.loc["Overall", f"Bias {stat} std"] == pytest.approx(
            _reference(bias)[1], rel=1e-9
        )
    assert table.loc["layer2", "Weight non-finite"] == 1
    assert table.loc["Overall", "Weight non-finite"] == 1
    assert table.loc["Overall", "Weight count"] == 9 * 7 + 7 * 3


def test_overall_stats_of_the_priors() -> None:
    log = synthetic_log([2], (4, 3, 2))
    table = get_overall_weight_stats(log, epoch=2, dist_type="prior")
    sigmas = [log[2][n]["prior"]["weight"]["sigma"][0] for n in ("layer1", "layer2")]
    assert table.loc["Overall", "Weight sigma mean"] == pytest.approx(np.mean(sigmas))
    assert table.loc["layer1", "Weight sigma std"] == 0.0
    assert table.loc["Overall", "Weight count"] == 2


def test_percentile_bands_over_epochs() -> None:
    log = synthetic_log([0, 1, 2], (80, 70), seed=2)  # 5,600 weights: the histogram path
    bands = percentile_bands(log, "layer1", stat="sigma")
    assert list(bands.columns) == [*PERCENTILE_COLUMNS, "count", "non-finite"]
    for e in (0, 1, 2):
        ref = np.percentile(log[e]["layer1"]["posterior"]["weight"]["sigma"], TB_PERCENTILES)
        np.testing.assert_allclose(
            bands.loc[e, list(PERCENTILE_COLUMNS)].to_numpy(float), ref, rtol=1e-12
        )
    with pytest.raises(BnnError, match=r"stat must be one of .* got 'var'"):
        percentile_bands(log, "layer1", stat="var")
    with pytest.raises(BnnError, match=r"no epoch 9; captured epochs: \[0, 1, 2\]"):
        percentile_bands(log, "layer1", epochs=[9])


def test_prior_trajectories() -> None:
    log = synthetic_log([0, 10], (3, 4, 2))
    traj = prior_trajectories(log)
    assert traj.index.names == ["epoch", "layer"]
    for (e, layer), row in traj.iterrows():
        prior = log[e][layer]["prior"]
        assert row["Weight prior sigma"] == pytest.approx(float(prior["weight"]["sigma"][0]))
        assert row["Bias prior mu"] == pytest.approx(float(prior["bias"]["mu"][0]))
    assert (
        traj.loc[(10, "layer2"), "Weight prior sigma"]
        > traj.loc[(0, "layer2"), "Weight prior sigma"]
    )
