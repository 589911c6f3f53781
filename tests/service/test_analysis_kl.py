import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.analysis import (
    KL_COLUMNS,
    compute_layer_kl_divergences,
    gaussian_sums,
    kl_between_runs,
    kl_to_prior,
    pairwise_kl_trajectory,
    pairwise_symmetric_kl,
    pairwise_symmetric_kl_reference,
)
from service.analysis._numeric import kl_normal_elementwise
from service.analysis.synthetic import synthetic_log
from trainer.capture import get_all_distribution_params
from trainer.errors import BnnError, ErrorCode
from trainer.layers import kl_by_layer
from trainer.models import mlp
from trainer.priors import PriorSpec


def _brute(mu: np.ndarray, sigma: np.ndarray) -> float:
    """Literal double loop over pairs i < j with the closed-form KLs (independent reference)."""
    m, s = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    total = 0.0
    for i in range(m.size):
        for j in range(i + 1, m.size):
            kl_ij = math.log(s[j] / s[i]) + (s[i] ** 2 + (m[i] - m[j]) ** 2) / (2 * s[j] ** 2) - 0.5
            kl_ji = math.log(s[i] / s[j]) + (s[j] ** 2 + (m[i] - m[j]) ** 2) / (2 * s[i] ** 2) - 0.5
            total += kl_ij + kl_ji
    return total


log_sigma = st.floats(math.log(1e-8), math.log(1e4))
layer_sizes = st.integers(0, 40)


@st.composite
def layers(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(layer_sizes)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    mu = draw(hnp.arrays(np.float64, n, elements=st.floats(-1e3, 1e3)))
    sigma = np.exp(draw(hnp.arrays(np.float64, n, elements=log_sigma)))
    return mu.astype(dtype), sigma.astype(dtype)


@st.composite
def near_identical(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Values a few float32 ulps apart: the case where centring must not lose digits."""
    n = draw(st.integers(2, 30))
    m0 = np.float32(draw(st.floats(-1e3, 1e3)))
    s0 = np.float32(math.exp(draw(log_sigma)))
    steps = draw(hnp.arrays(np.int64, (2, n), elements=st.integers(-3, 3)))
    mu = np.array([m0 + k * np.spacing(m0) for k in steps[0]], np.float32)
    sigma = np.array([s0 + k * np.spacing(s0) for k in steps[1]], np.float32)
    return mu, sigma


def _close(a: float, b: float) -> bool:
    """1e-9 relative; sums below 1e-300 are underflow noise (subnormal squares)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300)


@settings(max_examples=300, deadline=None)
@given(layers())
def test_exact_pairwise_kl_equals_brute_force(layer: tuple[np.ndarray, np.ndarray]) -> None:
    mu, sigma = layer
    assert _close(pairwise_symmetric_kl(mu, sigma), pairwise_symmetric_kl_reference(mu, sigma))


@settings(max_examples=150, deadline=None)
@given(near_identical())
def test_exact_pairwise_kl_keeps_digits_for_near_identical_values(
    layer: tuple[np.ndarray, np.ndarray],
) -> None:
    mu, sigma = layer
    assert _close(pairwise_symmetric_kl(mu, sigma), pairwise_symmetric_kl_reference(mu, sigma))


def test_reference_agrees_with_a_literal_double_loop() -> None:
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=25), np.exp(rng.normal(-2, 1, 25))
    assert math.isclose(
        pairwise_symmetric_kl_reference(mu, sigma), _brute(mu, sigma), rel_tol=1e-11
    )
    assert pairwise_symmetric_kl(mu[:1], sigma[:1]) == 0.0
    assert pairwise_symmetric_kl(mu[:0], sigma[:0]) == 0.0


@settings(max_examples=150, deadline=None)
@given(layers(), st.floats(-10, 10), st.floats(1e-3, 1e2))
def test_kl_to_any_prior_from_the_sums(
    layer: tuple[np.ndarray, np.ndarray], mp: float, sp: float
) -> None:
    mu, sigma = layer
    ref = kl_normal_elementwise(mu, sigma, mp, sp)
    got = gaussian_sums(mu, sigma).kl_to(mp, sp)
    assert math.isclose(
        got, float(ref.sum()), rel_tol=1e-9, abs_tol=1e-9 * float(np.abs(ref).sum())
    )


def _log_with_nan() -> dict:
    log = synthetic_log([0, 3, 7], (12, 9, 1), seed=4)
    log[7]["layer1"]["posterior"]["weight"]["mu"][2, 3] = np.nan
    log[7]["layer1"]["posterior"]["weight"]["sigma"][0, 0] = np.inf
    log[7]["layer1"]["posterior"]["bias"]["sigma"][1] = 0.0
    return log


def test_layer_table_has_the_seed_columns_and_exact_values() -> None:
    log = _log_with_nan()
    table = compute_layer_kl_divergences(log)  # epoch None: the latest (7)
    assert list(table.columns[:4]) == list(KL_COLUMNS)
    assert list(table.columns[4:]) == ["Weight non-finite", "Bias non-finite"]
    assert list(table.index) == ["layer1", "layer2"]
    post = log[7]["layer1"]["posterior"]
    ok = np.isfinite(post["weight"]["mu"]) & np.isfinite(post["weight"]["sigma"])
    ref = pairwise_symmetric_kl_reference(post["weight"]["mu"][ok], post["weight"]["sigma"][ok])
    n = int(ok.sum())
    row = table.loc["layer1"]
    assert math.isclose(row["Weight KL Sum"], ref, rel_tol=1e-9)
    assert math.isclose(row["Weight KL Average"], ref / (n * (n - 1) / 2), rel_tol=1e-9)
    assert (row["Weight non-finite"], row["Bias non-finite"]) == (2, 1)
    # layer2 has one output: a single bias, no pairs
    assert table.loc["layer2", "Bias KL Sum"] == 0.0
    assert math.isnan(table.loc["layer2", "Bias KL Average"])
    earlier = compute_layer_kl_divergences(log, epoch=0)
    assert earlier.loc["layer1", "Weight non-finite"] == 0
    assert not np.isclose(earlier.loc["layer1", "Weight KL Sum"], row["Weight KL Sum"])


def test_layer_table_for_the_priors_and_without_bias() -> None:
    log = synthetic_log([1], (4, 3), bias=False)
    table = compute_layer_kl_divergences(log, dist_type="prior")
    assert table.loc["layer1", "Weight KL Sum"] == 0.0
    assert math.isnan(table.loc["layer1", "Bias KL Sum"])
    assert math.isnan(compute_layer_kl_divergences(log).loc["layer1", "Bias KL Average"])


def test_errors_name_the_bad_value() -> None:
    log = synthetic_log([0, 5], (3, 2))
    with pytest.raises(BnnError, match=r"no epoch 4; captured epochs: \[0, 5\]") as err:
        compute_layer_kl_divergences(log, epoch=4)
    assert err.value.code is ErrorCode.NOT_FOUND and err.value.details["epochs"] == [0, 5]
    with pytest.raises(BnnError, match=r"dist_type must be one of .* got 'posterior '"):
        compute_layer_kl_divergences(log, dist_type="posterior ")
    with pytest.raises(BnnError, match=r"unknown layer 'fc1'.*\['layer1'\]"):
        kl_to_prior(log, layers="fc1")
    with pytest.raises(BnnError, match="keys must be integer epochs"):
        compute_layer_kl_divergences({"0": log[0]})


def test_kl_to_prior_matches_the_models_own_kl() -> None:
    torch.manual_seed(0)
    model = mlp(6, [7, 5], 3, PriorSpec(kind="learnable", sigma0=0.3))
    with torch.no_grad():
        model.layer2.weight_prior.mu.fill_(0.05)
    log = {0: get_all_distribution_params(model, 0, force=True)}
    table = kl_to_prior(log)
    expected = {k: float(v.detach()) for k, v in kl_by_layer(model).items()}
    for layer, kl in expected.items():
        assert math.isclose(table.loc[(0, layer), "KL"], kl, rel_tol=1e-4)
    assert table.loc[(0, "layer1"), "Weight KL per element"] == pytest.approx(
        table.loc[(0, "layer1"), "Weight KL"] / 42
    )


def test_trajectory_stacks_the_epoch_tables() -> None:
    log = _log_with_nan()
    traj = pairwise_kl_trajectory(log)
    assert traj.index.names == ["epoch", "layer"]
    assert list(traj.index.get_level_values("epoch").unique()) == [0, 3, 7]
    pd.testing.assert_frame_equal(traj.xs(7, level="epoch"), compute_layer_kl_divergences(log, 7))
    only = pairwise_kl_trajectory(log, epochs=[3], layers=["layer2"])
    assert list(only.index) == [(3, "layer2")]


def test_kl_between_runs_layer_by_layer() -> None:
    a = synthetic_log([0, 2], (5, 4, 2), seed=1)
    b = synthetic_log([0, 2], (5, 4, 2), seed=2)
    same = kl_between_runs(a, a)
    assert np.allclose(same.filter(like="KL").to_numpy(), 0.0, atol=1e-9)
    diff = kl_between_runs(a, b, epoch=0)
    pa, pb = a[0]["layer1"]["posterior"]["weight"], b[0]["layer1"]["posterior"]["weight"]
    ref = kl_normal_elementwise(pa["mu"], pa["sigma"], pb["mu"], pb["sigma"]).sum()
    assert math.isclose(diff.loc["layer1", "Weight KL(a||b)"], ref, rel_tol=1e-9)
    row = diff.loc["layer2"]
    assert row["Bias symmetric KL"] == pytest.approx(row["Bias KL(a||b)"] + row["Bias KL(b||a)"])
    assert diff.attrs["runs"]["epoch_a"] == 0
    other = synthetic_log([0], (5, 3, 2))
    with pytest.raises(
        BnnError, match=r"same architecture: layer 'layer1.weight'.*\(4, 5\) vs \(3, 5\)"
    ):
        kl_between_runs(a, other, epoch=0)
