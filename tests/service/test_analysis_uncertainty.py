"""Paired bootstrap and Student-t intervals for comparing arms trained with the same seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from service.analysis import uncertainty
from service.analysis.uncertainty import (
    bootstrap_mean_ci,
    comparison_table,
    paired_difference_ci,
    paired_seed_difference_ci,
    seed_mean_ci,
    t_quantile,
)
from trainer.errors import BnnError, ErrorCode


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _arm(rng: np.random.Generator, k: int = 4, n: int = 50, shift: float = 0.0) -> np.ndarray:
    return 1.0 + shift + 0.3 * rng.standard_normal((k, 1)) + rng.standard_normal((k, n))


# --- Student t ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [  # standard tables (scipy.stats.t.ppf)
        (0.975, 1, 12.706204736174705),
        (0.975, 2, 4.302652729749464),
        (0.975, 4, 2.7764451051977934),
        (0.975, 30, 2.0422724563012373),
        (0.95, 3, 2.353363434801823),
        (0.9995, 1, 636.6192487687196),
        (0.025, 4, -2.7764451051977934),
        (0.5, 7, 0.0),
    ],
)
def test_t_quantile_matches_tables(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_t_quantile_inverts_numerically_integrated_density() -> None:
    df = 5.0
    q = t_quantile(0.9, df)
    x = np.linspace(0.0, q, 20001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x**2 / df))
    area = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))  # trapezoid, P(0 < T < q)
    assert 0.5 + area == pytest.approx(0.9, abs=1e-8)


# --- per-seed intervals ------------------------------------------------------------------------


def test_seed_mean_ci_by_hand() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0])
    mean, lo, hi = seed_mean_ci(values)
    half = 3.182446305284263 * values.std(ddof=1) / 2.0  # t_{0.975, 3} * s / sqrt(4)
    assert (mean, lo, hi) == pytest.approx((2.5, 2.5 - half, 2.5 + half), rel=1e-9)
    one = seed_mean_ci(np.array([0.7]))
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])


def test_paired_seed_difference_by_hand() -> None:
    b = np.array([0.3, 0.1, 0.5, 0.2])
    a = b + np.array([1.0, 2.0, 3.0, 4.0])
    d, lo, hi, p = paired_seed_difference_ci(a, b)
    assert d == pytest.approx(2.5)
    assert (lo, hi) == pytest.approx(seed_mean_ci(a - b)[1:])
    # t = 2.5 / (1.2910 / 2) = 3.873 on 3 df: two-sided p = 0.030466
    assert p == pytest.approx(0.030466, abs=2e-6)
    same = paired_seed_difference_ci(b, b)
    assert same == (0.0, 0.0, 0.0, 1.0)
    single = paired_seed_difference_ci(np.array([2.0]), np.array([1.0]))
    assert single[0] == 1.0 and all(math.isnan(v) for v in single[1:])


# --- bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_ci_covers_the_truth_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(200):  # seed effects (sd 0.3) and example noise (sd 1): truth 1.0
        x = 1.0 + 0.3 * rng.standard_normal((8, 1)) + rng.standard_normal((8, 40))
        estimate, lo, hi = bootstrap_mean_ci(x, n_boot=500, seed=rep)
        assert lo <= estimate <= hi
        hits += lo <= 1.0 <= hi
    assert 0.90 <= hits / 200 <= 0.99


def test_estimate_is_mean_of_seed_means_and_seed_reproduces(rng: np.random.Generator) -> None:
    x = _arm(rng)
    got = bootstrap_mean_ci(x, n_boot=300, seed=7)
    assert got[0] == pytest.approx(float(x.mean(axis=1).mean()))
    assert bootstrap_mean_ci(x, n_boot=300, seed=7) == got
    assert bootstrap_mean_ci(x, n_boot=300, seed=8) != got
    gen = bootstrap_mean_ci(x, n_boot=300, seed=np.random.default_rng(7))
    assert gen == got


def test_resampling_uses_both_levels() -> None:
    # one seed: only examples vary; constant rows: only seeds vary; both give a real interval
    _, lo, hi = bootstrap_mean_ci(np.arange(10.0)[None], n_boot=400)
    assert lo < 4.5 < hi
    _, lo, hi = bootstrap_mean_ci(np.repeat(np.arange(5.0)[:, None], 3, axis=1), n_boot=400)
    assert lo < 2.0 < hi
    assert bootstrap_mean_ci(np.full((3, 4), 2.5), n_boot=50) == (2.5, 2.5, 2.5)


def test_paired_interval_is_narrower_than_unpaired(rng: np.random.Generator) -> None:
    a = _arm(rng, k=5, n=200)
    b = a + 0.05 + 0.1 * rng.standard_normal(a.shape)  # strongly correlated with a
    d, lo, hi, p = paired_difference_ci(b, a, n_boot=500)
    assert d == pytest.approx(float(b.mean() - a.mean()))
    _, a_lo, a_hi = bootstrap_mean_ci(a, n_boot=500, seed=1)
    _, b_lo, b_hi = bootstrap_mean_ci(b, n_boot=500, seed=2)
    unpaired_width = math.hypot(a_hi - a_lo, b_hi - b_lo)
    assert hi - lo < 0.2 * unpaired_width
    assert lo > 0 and p == pytest.approx(1 / 500)  # every replicate above 0: floored


def test_identical_arms_give_zero_difference_not_significant(rng: np.random.Generator) -> None:
    a = _arm(rng)
    d, lo, hi, p = paired_difference_ci(a, a.copy(), n_boot=200)
    assert (d, lo, hi) == (0.0, 0.0, 0.0)
    assert p == 1.0
    _, diffs = comparison_table(
        {"base": {"nll": a}, "same": {"nll": a.copy()}}, "base", per_example=["nll"], n_boot=200
    )
    assert not diffs.loc["same", "nll significant"]


def test_noise_only_difference_is_usually_not_significant(rng: np.random.Generator) -> None:
    a, b = _arm(rng, n=100), _arm(rng, n=100)  # same distribution, independent draws
    _, lo, hi, p = paired_difference_ci(a, b, n_boot=400)
    assert lo < 0 < hi and p > 0.05


def test_clear_shift_is_significant(rng: np.random.Generator) -> None:
    base = _arm(rng)
    shifted = base + 0.5 + 0.2 * rng.standard_normal(base.shape)
    d, lo, hi, p = paired_difference_ci(shifted, base, n_boot=400)
    assert 0 < lo < d < hi and p <= 0.01


def test_chunked_draws_match_a_per_replicate_loop(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vectorised two-level bootstrap is the textbook loop: per replicate, K seeds with
    replacement, then N examples with replacement within each drawn seed."""
    x = rng.standard_normal((3, 7))
    monkeypatch.setattr(uncertainty, "_CHUNK_VALUES", 1)  # one replicate per chunk
    got = uncertainty._bootstrap_means([x, 2 * x], 25, 11)
    draws = np.random.default_rng(11)
    expected = []
    for _ in range(25):
        seeds = draws.integers(0, 3, size=(1, 3, 1), dtype=np.int32)[0, :, 0]
        examples = draws.integers(0, 7, size=(1, 3, 7), dtype=np.int32)[0]
        expected.append(np.mean([x[s, examples[j]].mean() for j, s in enumerate(seeds)]))
    assert np.allclose(got[0], expected, rtol=1e-12)
    assert np.allclose(got[1], 2 * np.array(expected), rtol=1e-12)
    # several replicates per chunk, a partial last chunk: every replicate filled
    monkeypatch.setattr(uncertainty, "_CHUNK_VALUES", 4 * x.size)
    reps = uncertainty._bootstrap_means([x], 27, 0)[0]
    assert np.isfinite(reps).all() and (reps >= x.min()).all() and (reps <= x.max()).all()


def test_realistic_size_stays_fast(rng: np.random.Generator) -> None:
    x = rng.random((3, 10_000))
    est, lo, hi = bootstrap_mean_ci(x, n_boot=300)  # 9M draws in 5 chunks
    assert lo < est < hi and hi - lo < 0.02


# --- comparison table --------------------------------------------------------------------------


def _arms(rng: np.random.Generator, k: int = 4, n: int = 30) -> dict[str, dict[str, np.ndarray]]:
    base = _arm(rng, k, n)
    return {
        "fixed": {"nll": base, "ece": 0.05 + 0.002 * rng.standard_normal(k)},
        "learnable": {"nll": base + 0.8, "ece": 0.03 + 0.002 * rng.standard_normal(k)},
        "tempered": {"nll": base + 0.01 * rng.standard_normal((k, n)), "ece": np.full(k, 0.05)},
    }


def test_comparison_table_layout_and_values(rng: np.random.Generator) -> None:
    arms = _arms(rng)
    summary, diffs = comparison_table(
        arms, "fixed", per_example=["nll"], per_seed=["ece"], n_boot=300, seed=3
    )
    assert list(summary.index) == ["fixed", "learnable", "tempered"]
    assert summary.index.name == "arm"
    assert list(summary.columns) == ["nll", "nll lo", "nll hi", "ece", "ece lo", "ece hi"]
    assert list(diffs.index) == ["learnable", "tempered"]
    assert list(diffs.columns) == [
        f"{m} {s}" for m in ("nll", "ece") for s in ("diff", "lo", "hi", "p", "significant")
    ]
    assert diffs.attrs["baseline"] == "fixed"
    assert pd.api.types.is_bool_dtype(diffs["nll significant"])
    # the table's numbers are the standalone functions' with the same seed
    learn = arms["learnable"]
    assert tuple(summary.loc["learnable", ["nll", "nll lo", "nll hi"]]) == pytest.approx(
        bootstrap_mean_ci(learn["nll"], n_boot=300, seed=3)
    )
    assert tuple(summary.loc["fixed", ["ece", "ece lo", "ece hi"]]) == pytest.approx(
        seed_mean_ci(arms["fixed"]["ece"])
    )
    nll_cols = [f"nll {s}" for s in ("diff", "lo", "hi", "p")]
    assert tuple(diffs.loc["learnable", nll_cols]) == pytest.approx(
        paired_difference_ci(learn["nll"], arms["fixed"]["nll"], n_boot=300, seed=3)
    )
    assert diffs.loc["learnable", "nll diff"] == pytest.approx(0.8)
    assert diffs.loc["learnable", "nll significant"]
    assert diffs.loc["learnable", "ece significant"]
    assert not diffs.loc["tempered", "nll significant"]


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (lambda arms: arms["learnable"].pop("ece"), "arm 'learnable' has no metric 'ece'"),
        (lambda arms: arms["tempered"].update(nll=np.zeros((4, 29))), "'tempered'"),
        (lambda arms: arms["learnable"].update(ece=np.zeros(3)), "K=3"),
        (lambda arms: arms["fixed"].update(nll=np.zeros(4)), "(4,)"),
    ],
)
def test_comparison_table_names_the_bad_arm(
    rng: np.random.Generator, mutate: object, named: str
) -> None:
    arms = _arms(rng)
    mutate(arms)  # type: ignore[operator]
    with pytest.raises(BnnError) as err:
        comparison_table(arms, "fixed", per_example=["nll"], per_seed=["ece"], n_boot=20)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert named in str(err.value)


def test_comparison_table_rejects_unknown_baseline_and_double_listed_metric(
    rng: np.random.Generator,
) -> None:
    arms = _arms(rng)
    with pytest.raises(BnnError, match="baseline 'nope'"):
        comparison_table(arms, "nope", per_example=["nll"])
    with pytest.raises(BnnError, match="'nll'"):
        comparison_table(arms, "fixed", per_example=["nll"], per_seed=["nll"])


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: bootstrap_mean_ci(np.zeros(5)), "(5,)"),
        (lambda: bootstrap_mean_ci(np.zeros((0, 5))), "(0, 5)"),
        (lambda: bootstrap_mean_ci(np.zeros((2, 5)), level=1.0), "1.0"),
        (lambda: bootstrap_mean_ci(np.zeros((2, 5)), level=0), "got 0"),
        (lambda: bootstrap_mean_ci(np.zeros((2, 5)), n_boot=0), "got 0"),
        (lambda: paired_difference_ci(np.zeros((2, 5)), np.zeros((2, 4))), "(2, 4)"),
        (lambda: seed_mean_ci(np.zeros((2, 2))), "(2, 2)"),
        (lambda: seed_mean_ci(np.zeros(0)), "(0,)"),
        (lambda: paired_seed_difference_ci(np.zeros(3), np.zeros(4)), "(4,)"),
        (lambda: t_quantile(0.9, 0.0), "0.0"),
    ],
)
def test_bad_shapes_and_levels_are_named(call: object, named: str) -> None:
    with pytest.raises(BnnError) as err:
        call()  # type: ignore[operator]
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert named in str(err.value)
