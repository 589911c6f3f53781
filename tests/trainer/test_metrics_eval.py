"""Evaluation metrics against brute-force references: classification, OOD AUROC, mixtures."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.errors import BnnError, ErrorCode
from trainer.metrics import (
    brier_score,
    classification_example_metrics,
    fit_noise_sigma,
    interval_coverage,
    mixture_nll,
    mixture_quantiles,
    ood_auroc,
    predictive_entropy,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- classification ----------------------------------------------------------------------------

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0]])
LABELS = torch.tensor([0, 1, 2])


def test_example_metrics_match_hand_computed_values() -> None:
    m = classification_example_metrics(PROBS, LABELS)
    assert set(m) == {"nll", "error", "brier"}
    assert all(v.dtype == torch.float64 and v.shape == (3,) for v in m.values())
    nll = [-math.log(0.7), -math.log(0.3), -math.log(1e-12)]  # p_true = 0 is clamped
    assert m["nll"].tolist() == pytest.approx(nll, rel=1e-6)
    assert m["error"].tolist() == [0.0, 1.0, 1.0]
    # (0.3^2 + 0.2^2 + 0.1^2), (0.1^2 + 0.7^2 + 0.6^2), (0.5^2 + 0.5^2 + 1^2)
    assert m["brier"].tolist() == pytest.approx([0.14, 0.86, 1.5], abs=1e-6)
    assert brier_score(PROBS, LABELS) == pytest.approx(2.5 / 3, abs=1e-6)


def test_brier_of_empty_is_nan_and_of_perfect_is_zero() -> None:
    assert math.isnan(brier_score(torch.empty(0, 3), torch.empty(0, dtype=torch.long)))
    eye = torch.eye(4)
    assert brier_score(eye, torch.arange(4)) == 0.0


@pytest.mark.parametrize(
    ("probs", "labels", "named"),
    [
        (torch.ones(3), LABELS, "(3,)"),
        (PROBS, torch.tensor([0, 1]), "(2,)"),
        (PROBS, torch.tensor([0, 1, 3]), "label 3"),
        (PROBS, torch.tensor([-1, 1, 2]), "label -1"),
    ],
)
def test_classification_rejects_bad_input_naming_it(
    probs: torch.Tensor, labels: torch.Tensor, named: str
) -> None:
    with pytest.raises(BnnError) as err:
        classification_example_metrics(probs, labels)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert named in str(err.value)


def test_predictive_entropy_against_definition() -> None:
    probs = torch.softmax(torch.randn(20, 5), dim=1)
    ref = torch.tensor([-sum(p * math.log(p) for p in row.tolist()) for row in probs])
    got = predictive_entropy(probs)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref.double(), atol=1e-6)
    # uniform: log C; one-hot (with zeros, 0 log 0 = 0): exactly 0
    assert predictive_entropy(torch.full((2, 4), 0.25)).tolist() == pytest.approx([math.log(4)] * 2)
    assert predictive_entropy(torch.eye(3)).tolist() == [0.0, 0.0, 0.0]


# --- OOD AUROC ---------------------------------------------------------------------------------


def _auroc_pairs(s_in: list[float], s_out: list[float]) -> float:
    wins = sum((o > i) + 0.5 * (o == i) for o in s_out for i in s_in)
    return wins / (len(s_in) * len(s_out))


scores = st.lists(st.integers(-4, 4).map(float), min_size=1, max_size=30)  # many ties


@settings(max_examples=60, deadline=None)
@given(s_in=scores, s_out=scores)
def test_auroc_matches_pairwise_count_with_ties(s_in: list[float], s_out: list[float]) -> None:
    got = ood_auroc(torch.tensor(s_in), torch.tensor(s_out))
    assert got == pytest.approx(_auroc_pairs(s_in, s_out), abs=1e-12)


def test_auroc_extremes_and_continuous_scores() -> None:
    low, high = torch.arange(5.0), torch.arange(5.0) + 10
    assert ood_auroc(low, high) == 1.0
    assert ood_auroc(high, low) == 0.0
    assert ood_auroc(low, low) == 0.5
    s_in, s_out = torch.randn(300), torch.randn(200) + 1.0
    assert ood_auroc(s_in, s_out) == pytest.approx(
        _auroc_pairs(s_in.tolist(), s_out.tolist()), abs=1e-12
    )
    assert ood_auroc(s_in.reshape(30, 10), s_out) == ood_auroc(s_in, s_out)


def test_auroc_rejects_empty_and_non_finite() -> None:
    with pytest.raises(BnnError, match="score_in is empty"):
        ood_auroc(torch.empty(0), torch.ones(2))
    with pytest.raises(BnnError, match="score_out has a non-finite score nan"):
        ood_auroc(torch.ones(2), torch.tensor([1.0, float("nan")]))


# --- mixture predictive ------------------------------------------------------------------------


def _mixture_cdf(q: float, f: list[float], sigma: float) -> float:
    return sum(NormalDist(m, sigma).cdf(q) for m in f) / len(f)


def test_mixture_nll_matches_explicit_loop() -> None:
    samples = torch.randn(7, 11, 1)
    target = torch.randn(11, 1)
    sigma = 0.4
    got = mixture_nll(samples, sigma, target)
    assert got.shape == (11,) and got.dtype == torch.float64
    for n in range(11):
        y = float(target[n, 0])
        dens = sum(NormalDist(float(samples[s, n, 0]), sigma).pdf(y) for s in range(7)) / 7
        assert float(got[n]) == pytest.approx(-math.log(dens), rel=1e-9)
    # (S, N) and (N,) layouts, and a scalar tensor sigma, give the same values
    same = mixture_nll(samples[..., 0], torch.tensor(sigma, dtype=torch.float64), target[:, 0])
    assert torch.equal(got, same)


def test_mixture_nll_per_example_sigma_and_far_tail() -> None:
    samples = torch.randn(4, 6)
    target = torch.randn(6)
    sigma = torch.linspace(0.1, 1.0, 6)
    got = mixture_nll(samples, sigma, target)
    for n in range(6):
        one = mixture_nll(samples[:, n : n + 1], float(sigma[n]), target[n : n + 1])
        assert float(got[n]) == pytest.approx(float(one[0]), rel=1e-6)
    # a target 1000 sigmas away: finite, ~ z^2 / 2 (a naive mean of densities gives inf)
    far = mixture_nll(torch.zeros(3, 1), 0.01, torch.tensor([10.0]))
    assert math.isfinite(float(far[0]))
    assert float(far[0]) == pytest.approx(0.5 * 1000.0**2, rel=1e-4)


def test_mixture_quantiles_invert_the_cdf() -> None:
    samples = torch.randn(9, 25) * 2.0
    sigma, levels = 0.3, [0.01, 0.1, 0.5, 0.9, 0.975]
    q = mixture_quantiles(samples, sigma, levels)
    assert q.shape == (5, 25) and q.dtype == torch.float64
    assert (q.diff(dim=0) > 0).all()
    for n in range(25):
        f = samples[:, n].tolist()
        for row, p in enumerate(levels):
            assert _mixture_cdf(float(q[row, n]), f, sigma) == pytest.approx(p, abs=1e-6)


def test_single_sample_quantiles_are_gaussian_quantiles() -> None:
    f = torch.tensor([[0.0, 5.0, -2.0]])
    q = mixture_quantiles(f, 2.0, [0.025, 0.975])
    z = NormalDist().inv_cdf(0.975)
    assert q[0].tolist() == pytest.approx([-2 * z, 5 - 2 * z, -2 - 2 * z], abs=1e-5)
    assert q[1].tolist() == pytest.approx([2 * z, 5 + 2 * z, -2 + 2 * z], abs=1e-5)


def test_coverage_of_correct_model_is_nominal() -> None:
    s, n = 10, 3000  # S * N under torch's parallel grain: no thread hand-offs per bisection step
    samples = torch.randn(s, n) + torch.randn(n) * 3.0  # a different mixture per example
    pick = torch.randint(0, s, (n,))
    sigma = 0.5
    target = samples[pick, torch.arange(n)] + sigma * torch.randn(n)  # y from the mixture itself
    cover = interval_coverage(samples, sigma, target, levels=(0.5, 0.9, 0.95))
    assert list(cover) == [0.5, 0.9, 0.95]
    for level, hits in cover.items():
        assert hits.shape == (n,) and set(hits.unique().tolist()) <= {0.0, 1.0}
        tol = 4 * math.sqrt(level * (1 - level) / n)  # 4 binomial standard errors
        assert float(hits.mean()) == pytest.approx(level, abs=tol)


def test_fit_noise_sigma_recovers_true_noise() -> None:
    n, true_sigma = 4000, 0.3
    x = torch.linspace(-3, 3, n)
    f = torch.sin(2 * x)
    target = f + true_sigma * torch.randn(n)
    samples = f.expand(5, n).unsqueeze(-1)  # a posterior collapsed on the true function
    got = fit_noise_sigma(samples, target.unsqueeze(-1))
    assert got == pytest.approx(true_sigma, rel=0.05)
    # with one sample the optimum is exactly the RMS residual
    rms = float(((target - f) ** 2).mean().sqrt())
    assert fit_noise_sigma(f[None], target) == pytest.approx(rms, rel=1e-6)


def test_fit_noise_sigma_beats_its_neighbours() -> None:
    samples = torch.randn(10, 300) * 0.5
    target = torch.randn(300)
    best = fit_noise_sigma(samples, target)

    def loss(sigma: float) -> float:
        return float(mixture_nll(samples, sigma, target).mean())

    assert loss(best) <= min(loss(best * 0.98), loss(best * 1.02))


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: mixture_nll(torch.randn(3, 4), 0.1, torch.randn(5)), "(5,)"),
        (lambda: mixture_nll(torch.randn(3, 4, 2), 0.1, torch.randn(4)), "(3, 4, 2)"),
        (lambda: mixture_nll(torch.randn(0, 4), 0.1, torch.randn(4)), "S=0"),
        (lambda: mixture_nll(torch.randn(3, 4), 0.0, torch.randn(4)), "got 0.0"),
        (lambda: mixture_nll(torch.randn(3, 4), -1.0, torch.randn(4)), "got -1.0"),
        (lambda: mixture_nll(torch.randn(3, 4), float("nan"), torch.randn(4)), "got nan"),
        (lambda: mixture_nll(torch.randn(3, 4), float("inf"), torch.randn(4)), "got inf"),
        (lambda: mixture_nll(torch.randn(3, 4), torch.ones(3), torch.randn(4)), "shape (3,)"),
        (lambda: mixture_quantiles(torch.randn(3, 4), 0.1, [0.5, 1.0]), "got 1.0"),
        (lambda: interval_coverage(torch.randn(3, 4), 0.1, torch.randn(4), [0.0]), "got 0.0"),
        (lambda: fit_noise_sigma(torch.randn(3, 4), torch.randn(4), lo=0.0), "got 0.0"),
        (lambda: fit_noise_sigma(torch.randn(3, 4), torch.randn(4), hi=1e-5), "got 1e-05"),
        (lambda: fit_noise_sigma(torch.randn(3, 4), torch.randn(3)), "(3,)"),
    ],
)
def test_mixture_functions_reject_bad_input_naming_it(call: object, named: str) -> None:
    with pytest.raises(BnnError) as err:
        call()  # type: ignore[operator]
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert named in str(err.value)
