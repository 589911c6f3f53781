"""Priors: spec validation, closed-form KL, empirical Bayes, learnable vs fixed, hyperprior."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.errors import BnnError, ErrorCode
from trainer.layers import BayesLinear
from trainer.priors import (
    EBSchedule,
    GaussianPrior,
    LearnMode,
    PriorKind,
    PriorSpec,
    inverse_positive,
    kl_normal,
    kl_normal_sum,
    kl_normal_sum_batched,
    kl_normal_sum_fused,
    positive,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- spec --------------------------------------------------------------------------------------


def test_spec_accepts_strings_and_defaults() -> None:
    spec = PriorSpec("fixed", "empirical_bayes", eb_every="epoch")
    assert spec.kind is PriorKind.FIXED
    assert spec.mode is LearnMode.EMPIRICAL_BAYES
    assert spec.eb_every is EBSchedule.EPOCH
    default = PriorSpec()
    assert (default.kind, default.mode, default.eb_every) == (
        PriorKind.LEARNABLE,
        LearnMode.GRADIENT,
        EBSchedule.STEP,
    )
    assert (default.learn_mean, default.min_group, default.scale) == (False, 10, "absolute")
    # hyperprior mode defaults to the initial prior variance: beta / (alpha + 1) = sigma0^2
    alpha, beta = PriorSpec(sigma0=0.5, hyper_alpha=3.0).hyperprior(1000, 0.5)
    assert (alpha, beta / (alpha + 1)) == (3.0, pytest.approx(0.25))
    assert PriorSpec(hyper_beta=2.0).hyperprior(10, 1.0)[1] == 2.0
    # without hyper_alpha the hyperprior is worth hyper_strength pseudo-observations per element
    assert PriorSpec(hyper_strength=0.5).hyperprior(1000, 1.0)[0] == 250.0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"sigma0": 0.0}, "0.0"),
        ({"sigma0": -1.0}, "-1.0"),
        ({"sigma0": float("nan")}, "nan"),
        ({"mu0": float("inf")}, "inf"),
        ({"kind": "wobbly"}, "'wobbly'"),
        ({"mode": "magic"}, "'magic'"),
        ({"eb_every": "hourly"}, "'hourly'"),
        ({"hyper_alpha": 0.0}, "0.0"),
        ({"hyper_beta": -2.0}, "-2.0"),
    ],
)
def test_spec_rejects_bad_values_naming_them(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(BnnError) as err:
        PriorSpec(**kwargs)  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert named in str(err.value)


# --- positive / inverse ------------------------------------------------------------------------


def test_positive_is_finite_and_positive_for_extreme_rho() -> None:
    rho = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], requires_grad=True)
    sigma = positive(rho)
    assert torch.isfinite(sigma).all()
    assert (sigma > 0).all()
    assert torch.isfinite(torch.log(sigma)).all()
    assert sigma[1].item() == pytest.approx(1e-8, rel=1e-3)
    assert sigma[5].item() == pytest.approx(100.0)
    sigma.sum().backward()
    assert rho.grad is not None
    assert torch.isfinite(rho.grad).all()


def test_inverse_positive_round_trip_and_validation() -> None:
    sigma = torch.tensor([1e-6, 0.05, 1.0, 30.0, 1e3], dtype=torch.float64)
    assert torch.allclose(positive(inverse_positive(sigma)), sigma, rtol=1e-9)
    assert inverse_positive(0.05).dtype == torch.get_default_dtype()
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(BnnError, match=repr(bad)):
            inverse_positive(bad)


# --- closed-form KL ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mu_q", "sigma_q", "mu_p", "sigma_p"),
    [(0.3, 0.5, 0.0, 1.0), (-1.0, 0.1, 0.5, 0.3), (2.0, 2.0, -1.0, 0.7)],
)
def test_kl_normal_matches_monte_carlo(
    mu_q: float, sigma_q: float, mu_p: float, sigma_p: float
) -> None:
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in
         {"mq": mu_q, "sq": sigma_q, "mp": mu_p, "sp": sigma_p}.items()}  # fmt: skip
    closed = kl_normal(t["mq"], t["sq"], t["mp"], t["sp"]).item()
    q = torch.distributions.Normal(t["mq"], t["sq"])
    p = torch.distributions.Normal(t["mp"], t["sp"])
    z = q.sample((200_000,))
    log_ratio = q.log_prob(z) - p.log_prob(z)
    estimate = log_ratio.mean().item()
    std_error = log_ratio.std().item() / math.sqrt(z.numel())
    assert abs(closed - estimate) < 4 * std_error + 1e-6
    assert closed >= 0


def test_kl_normal_sum_is_the_elementwise_sum() -> None:
    mu_q = torch.randn(30, 7, dtype=torch.float64)
    sigma_q = positive(torch.randn(30, 7, dtype=torch.float64))
    mu_p = torch.tensor([0.2], dtype=torch.float64)
    sigma_p = torch.tensor([0.4], dtype=torch.float64)
    fused = kl_normal_sum(mu_q, sigma_q, mu_p, sigma_p)
    assert fused.shape == ()
    assert fused.item() == pytest.approx(kl_normal(mu_q, sigma_q, mu_p, sigma_p).sum().item())
    # non-scalar prior falls back to the elementwise form
    sigma_p_full = sigma_p.expand(30, 7)
    assert kl_normal_sum(mu_q, sigma_q, mu_p, sigma_p_full).item() == pytest.approx(fused.item())


# --- empirical Bayes ---------------------------------------------------------------------------


def test_empirical_bayes_is_the_optimum_gradient_descent_reaches() -> None:
    mu_q = 0.3 + 0.2 * torch.randn(40, 10, dtype=torch.float64)
    sigma_q = 0.05 + 0.1 * torch.rand(40, 10, dtype=torch.float64)

    eb = GaussianPrior(PriorSpec(mode="empirical_bayes", learn_mean=True)).double()
    eb.empirical_bayes_(mu_q, sigma_q)
    mu_expected = mu_q.mean()
    sigma_expected = (sigma_q.square() + (mu_q - mu_expected).square()).mean().sqrt()
    assert eb.mu.item() == pytest.approx(mu_expected.item(), rel=1e-9)
    assert eb.sigma.item() == pytest.approx(sigma_expected.item(), rel=1e-9)

    gd = GaussianPrior(PriorSpec(mode="gradient", learn_mean=True)).double()
    opt = torch.optim.Adam(gd.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        gd.kl(mu_q, sigma_q).backward()
        opt.step()
    assert gd.mu.item() == pytest.approx(eb.mu.item(), abs=1e-4)
    assert gd.sigma.item() == pytest.approx(eb.sigma.item(), rel=1e-3)
    # and the EB prior really is a minimum of the KL
    kl_eb = eb.kl(mu_q, sigma_q).item()
    for dmu, dsig in ((0.01, 0), (-0.01, 0), (0, 0.01), (0, -0.01)):
        worse = kl_normal_sum(mu_q, sigma_q, eb.mu + dmu, eb.sigma + dsig).item()
        assert worse > kl_eb


def test_empirical_bayes_prior_is_not_trained_by_gradient_and_fixed_refuses() -> None:
    eb = GaussianPrior(PriorSpec(mode="empirical_bayes", learn_mean=True))
    assert all(isinstance(p, torch.nn.Parameter) for p in (eb.mu, eb.rho))
    assert not any(p.requires_grad for p in eb.parameters())
    fixed = GaussianPrior(PriorSpec.fixed(0.0, 0.1))
    with pytest.raises(BnnError, match="fixed"):
        fixed.empirical_bayes_(torch.zeros(3), torch.ones(3))
    with pytest.raises(BnnError, match="non-finite"):
        eb.empirical_bayes_(torch.tensor([0.0, float("nan")]), torch.ones(2))


# --- learnable vs fixed ------------------------------------------------------------------------


def _train_tiny_elbo(layer: BayesLinear, steps: int = 25) -> None:
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.1 * torch.randn(64, 1)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y) + layer.kl() / 64
        loss.backward()
        opt.step()


def test_learnable_prior_moves_and_fixed_prior_does_not() -> None:
    learn = BayesLinear(3, 1, prior=PriorSpec(mu0=0.0, sigma0=1.0, learn_mean=True, min_group=1))
    before = (learn.weight_prior.mu.item(), learn.weight_prior.sigma.item())
    bias_before = learn.bias_prior.sigma.item() if learn.bias_prior is not None else None
    _train_tiny_elbo(learn)
    after = (learn.weight_prior.mu.item(), learn.weight_prior.sigma.item())
    assert abs(after[0] - before[0]) > 1e-3
    assert abs(after[1] - before[1]) > 1e-3
    assert learn.bias_prior is not None
    assert learn.bias_prior.sigma.item() != bias_before

    fixed = BayesLinear(3, 1, prior=PriorSpec.fixed(0.0, 1.0))
    assert list(fixed.weight_prior.parameters()) == []
    assert fixed.bias_prior is not None
    assert list(fixed.bias_prior.parameters()) == []
    assert set(dict(fixed.weight_prior.named_buffers())) == {"mu", "sigma"}
    _train_tiny_elbo(fixed)
    assert fixed.weight_prior.mu.item() == 0.0
    assert fixed.weight_prior.sigma.item() == 1.0


def test_prior_state_dict_round_trip() -> None:
    for spec in (PriorSpec.fixed(0.5, 0.2), PriorSpec()):
        a = GaussianPrior(spec)
        with torch.no_grad():
            a.mu.fill_(0.7)
        b = GaussianPrior(spec)
        b.load_state_dict(a.state_dict())
        assert b.mu.item() == pytest.approx(0.7)
        assert b.sigma.item() == pytest.approx(a.sigma.item())


# --- hierarchical ------------------------------------------------------------------------------


def _fit_prior(spec: PriorSpec, mu_q: torch.Tensor, sigma_q: torch.Tensor) -> float:
    prior = GaussianPrior(spec).double()
    opt = torch.optim.Adam(prior.parameters(), lr=0.05)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, 0.997)  # settle into the sharp optimum
    for _ in range(2000):
        opt.zero_grad()
        (prior.kl(mu_q, sigma_q) - prior.log_hyperprior()).backward()
        opt.step()
        decay.step()
    return prior.sigma.item()


def test_hierarchical_hyperprior_keeps_prior_from_collapsing() -> None:
    n, s = 50, 0.01  # identical posteriors N(0.3, 0.01^2)
    mu_q = torch.full((n,), 0.3, dtype=torch.float64)
    sigma_q = torch.full((n,), s, dtype=torch.float64)
    collapsed = _fit_prior(PriorSpec(mode="gradient", learn_mean=True), mu_q, sigma_q)
    assert collapsed == pytest.approx(s, rel=1e-2)  # the KL alone collapses onto the posteriors

    spec = PriorSpec(mode="hierarchical", sigma0=1.0, hyper_alpha=3.0, learn_mean=True)
    held = _fit_prior(spec, mu_q, sigma_q)
    alpha, beta = spec.hyperprior(n, 1.0)
    # stationary point of KL - log InvGamma(v): v = (n s^2 + 2 beta) / (n + 2 alpha + 2)
    expected = math.sqrt((n * s**2 + 2 * beta) / (n + 2 * alpha + 2))
    assert held == pytest.approx(expected, rel=1e-2)
    assert held > 10 * collapsed


def test_log_hyperprior_is_inverse_gamma_density_of_the_variance() -> None:
    spec = PriorSpec(mode="hierarchical", hyper_alpha=2.5, hyper_beta=0.7)
    prior = GaussianPrior(spec)
    with torch.no_grad():
        prior.rho.copy_(inverse_positive(0.4))  # type: ignore[union-attr]
    expected = torch.distributions.InverseGamma(2.5, 0.7).log_prob(torch.tensor(0.16))
    assert prior.log_hyperprior().item() == pytest.approx(expected.item(), rel=1e-5)
    for spec in (PriorSpec(), PriorSpec(mode="empirical_bayes"), PriorSpec.fixed()):
        assert GaussianPrior(spec).log_hyperprior().item() == 0.0


def test_extra_repr_names_kind_mode_and_values() -> None:
    text = repr(GaussianPrior(PriorSpec(mode="empirical_bayes", eb_every="epoch", mu0=0.5)))
    assert "kind=learnable" in text
    assert "mode=empirical_bayes" in text
    assert "eb_every=epoch" in text
    assert "mu=0.5" in text
    assert "kind=fixed" in repr(GaussianPrior(PriorSpec.fixed(sigma0=0.1)))
    with pytest.raises(BnnError, match="PriorSpec"):
        GaussianPrior("learnable")  # type: ignore[arg-type]


@pytest.mark.parametrize("learnable", [True, False])
def test_fused_kl_matches_autograd_of_the_elementwise_formula(learnable: bool) -> None:
    torch.manual_seed(3)
    mu_q = (torch.randn(7, 5, dtype=torch.float64) * 2).requires_grad_()
    rho_q = (torch.randn(7, 5, dtype=torch.float64) * 3).requires_grad_()
    mu_p = torch.tensor([0.3], dtype=torch.float64, requires_grad=learnable)
    rho_p = torch.tensor([-0.5], dtype=torch.float64, requires_grad=learnable)

    def fused(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return kl_normal_sum_fused(a, positive(b), c, positive(d))

    ref = kl_normal(mu_q, positive(rho_q), mu_p, positive(rho_p)).sum()
    got = fused(mu_q, rho_q, mu_p, rho_p)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    inputs = (mu_q, rho_q, mu_p, rho_p)
    wanted = [t for t in inputs if t.requires_grad]
    g_ref = torch.autograd.grad(ref, wanted)
    g_got = torch.autograd.grad(fused(*inputs), wanted)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(fused, inputs)


def test_batched_kl_matches_autograd_of_the_elementwise_formula() -> None:
    torch.manual_seed(5)
    shapes = [(7, 5), (5,), (1,), (3, 2, 2)]
    mus = [(torch.randn(s, dtype=torch.float64) * 2).requires_grad_() for s in shapes]
    rhos = [(torch.randn(s, dtype=torch.float64) * 3).requires_grad_() for s in shapes]
    mu_ps = [torch.randn(1, dtype=torch.float64, requires_grad=k % 2 == 0) for k in range(4)]
    rho_ps = [torch.randn(1, dtype=torch.float64, requires_grad=k < 2) for k in range(4)]

    def batched(*flat: torch.Tensor) -> torch.Tensor:
        mu, rho, mp, rp = (flat[i : i + 4] for i in range(0, 16, 4))
        quads = zip(mu, rho, mp, rp, strict=True)
        groups = [(a, positive(b), c, positive(d)) for a, b, c, d in quads]
        return kl_normal_sum_batched(groups)

    inputs = (*mus, *rhos, *mu_ps, *rho_ps)
    ref = sum(
        kl_normal(a, positive(b), c, positive(d)).sum()
        for a, b, c, d in zip(mus, rhos, mu_ps, rho_ps, strict=True)
    )
    assert isinstance(ref, torch.Tensor)
    got = batched(*inputs)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    wanted = [t for t in inputs if t.requires_grad]
    for a, b in zip(
        torch.autograd.grad(got, wanted), torch.autograd.grad(ref, wanted), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(batched, inputs)
    with pytest.raises(BnnError, match="at least one group"):
        kl_normal_sum_batched([])


def test_fused_kl_in_float32_matches_float64() -> None:
    torch.manual_seed(4)
    mu_q = torch.randn(300, 200) * 0.05 + 1.0  # mean far from zero: no cancellation
    rho_q = torch.randn(300, 200) - 3
    mu_p, sigma_p = torch.tensor([0.9]), torch.tensor([0.2])
    got = kl_normal_sum_fused(mu_q, positive(rho_q), mu_p, sigma_p).item()
    ref = kl_normal(mu_q.double(), positive(rho_q.double()), mu_p.double(), sigma_p.double())
    assert got == pytest.approx(ref.sum().item(), rel=1e-5)
