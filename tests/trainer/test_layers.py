"""Bayesian layers: shapes, sampling vs means, local reparameterisation, KL, helpers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import kernels
from trainer.errors import BnnError, ErrorCode
from trainer.layers import (
    BayesConv2d,
    BayesianLayer,
    BayesLinear,
    bayesian_layers,
    empirical_bayes_step,
    inverse_positive,
    kl_by_layer,
    model_kl,
    positive,
    prior_penalty,
    use_mean,
)
from trainer.priors import DEFAULT_PRIOR, EBSchedule, PriorSpec, kl_normal


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("local_reparam", [True, False])
def test_linear_shapes(bias: bool, local_reparam: bool) -> None:
    layer = BayesLinear(5, 3, bias=bias, local_reparam=local_reparam)
    assert layer.weight_mu.shape == layer.weight_rho.shape == (3, 5)
    if bias:
        assert layer.bias_mu is not None
        assert layer.bias_mu.shape == (3,)
        assert layer.bias_prior is not None
    else:
        assert layer.bias_mu is None
        assert layer.bias_rho is None
        assert layer.bias_prior is None
        assert set(layer.kl_terms()) == {"weight"}
    assert layer(torch.randn(4, 5)).shape == (4, 3)
    assert layer(torch.randn(2, 6, 5)).shape == (2, 6, 3)
    with use_mean(layer):
        assert layer(torch.randn(4, 5)).shape == (4, 3)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_shapes(bias: bool) -> None:
    layer = BayesConv2d(4, 6, 3, stride=2, padding=1, bias=bias)
    assert layer.weight_mu.shape == (6, 4, 3, 3)
    assert layer(torch.randn(2, 4, 9, 9)).shape == (2, 6, 5, 5)
    grouped = BayesConv2d(4, 6, (3, 1), groups=2, padding="same")
    assert grouped.weight_mu.shape == (6, 2, 3, 1)
    assert grouped(torch.randn(1, 4, 7, 7)).shape == (1, 6, 7, 7)
    assert (layer.bias_mu is not None) == bias


def test_mean_forward_equals_plain_ops() -> None:
    lin = BayesLinear(5, 3)
    conv = BayesConv2d(2, 4, 3, padding=1)
    x, img = torch.randn(4, 5), torch.randn(2, 2, 6, 6)
    lin.use_mean = conv.use_mean = True
    assert torch.equal(lin(x), F.linear(x, lin.weight_mu, lin.bias_mu))
    assert torch.equal(conv(img), F.conv2d(img, conv.weight_mu, conv.bias_mu, padding=1))


# --- sampling vs means -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer_fn",
    [
        lambda: BayesLinear(5, 3),
        lambda: BayesLinear(5, 3, local_reparam=True),
        lambda: BayesConv2d(2, 3, 3),
    ],
)
def test_use_mean_is_deterministic_and_sampling_is_not(layer_fn) -> None:  # type: ignore[no-untyped-def]
    layer: BayesianLayer = layer_fn()
    x = torch.randn(4, 5) if isinstance(layer, BayesLinear) else torch.randn(2, 2, 6, 6)
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)
    with use_mean(layer):
        c, d = layer(x), layer(x)
    assert torch.equal(c, d)
    assert layer.use_mean is False  # restored


def test_use_mean_context_restores_previous_flags() -> None:
    model = nn.Sequential(BayesLinear(3, 3), nn.ReLU(), BayesLinear(3, 2))
    model[2].use_mean = True
    with use_mean(model):
        assert model[0].use_mean
        assert model[2].use_mean
    assert model[0].use_mean is False
    assert model[2].use_mean is True
    with use_mean(model, False):
        assert not model[2].use_mean
    assert model[2].use_mean is True


def test_local_reparam_has_the_right_output_moments() -> None:
    layer = BayesLinear(4, 2, local_reparam=True, posterior_sigma_init=0.3).double()
    x = torch.randn(1, 4, dtype=torch.float64).expand(40_000, 4)
    with torch.no_grad():
        out = layer(x)
        mean = F.linear(x[:1], layer.weight_mu, layer.bias_mu)[0]
        bias_var = positive(layer.bias_rho).square()  # type: ignore[arg-type]
        var = F.linear(x[:1].square(), positive(layer.weight_rho).square(), bias_var)[0]
    std_err_mean = (var / out.shape[0]).sqrt()
    assert ((out.mean(0) - mean).abs() < 4 * std_err_mean).all()
    std_err_var = var * math.sqrt(2 / (out.shape[0] - 1))
    assert ((out.var(0) - var).abs() < 4 * std_err_var).all()


def test_weight_sampling_has_the_right_moments() -> None:
    layer = BayesLinear(1, 1, bias=False, posterior_sigma_init=0.2).double()
    x = torch.ones(1, 1, dtype=torch.float64)
    with torch.no_grad():
        draws = torch.cat([layer(x) for _ in range(4000)]).reshape(-1)
    assert draws.mean().item() == pytest.approx(layer.weight_mu.item(), abs=4 * 0.2 / 63)
    assert draws.std().item() == pytest.approx(0.2, rel=0.05)


# --- sigma and initialisation ------------------------------------------------------------------


def test_sigma_init_and_reset() -> None:
    layer = BayesLinear(50, 20, posterior_sigma_init=0.05)
    assert torch.allclose(layer.weight_sigma, torch.full((20, 50), 0.05))
    assert layer.bias_sigma is not None
    assert torch.allclose(layer.bias_sigma, torch.full((20,), 0.05))
    bound = 1 / math.sqrt(50)  # kaiming-uniform(a=sqrt(5)) and the bias both use 1/sqrt(fan_in)
    assert layer.weight_mu.abs().max() <= bound
    assert layer.bias_mu is not None
    assert layer.bias_mu.abs().max() <= bound
    with torch.no_grad():
        layer.weight_rho.fill_(3.0)
        layer.weight_prior.mu.fill_(2.0)
    layer.reset_parameters()
    assert torch.allclose(layer.weight_sigma, torch.full((20, 50), 0.05))
    assert layer.weight_prior.mu.item() == 0.0


def test_extreme_rho_keeps_sigma_kl_and_gradients_finite() -> None:
    layer = BayesLinear(3, 2)
    with torch.no_grad():
        layer.weight_rho[0].fill_(-100.0)
        layer.weight_rho[1].fill_(100.0)
    sigma = layer.weight_sigma
    assert (sigma > 0).all()
    assert torch.isfinite(sigma).all()
    loss = layer(torch.randn(4, 3)).sum() + layer.kl()
    assert torch.isfinite(loss)
    loss.backward()
    for p in layer.parameters():
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), 1e-9])
def test_bad_sigma_init_raises_naming_the_value(bad: float) -> None:
    with pytest.raises(BnnError) as err:
        BayesLinear(3, 2, posterior_sigma_init=bad)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: BayesLinear(0, 2), "in_features"),
        (lambda: BayesLinear(3, -1), "-1"),
        (lambda: BayesLinear(3, 2.5), "2.5"),  # type: ignore[arg-type]
        (lambda: BayesConv2d(3, 4, 0), "kernel_size"),
        (lambda: BayesConv2d(3, 4, 3, groups=2), "groups=2"),
        (lambda: BayesConv2d(3, 4, 3, padding="full"), "'full'"),
        (lambda: BayesConv2d(3, 4, 3, stride=2, padding="same"), "stride"),
        (lambda: BayesLinear(3, 2, prior="fixed"), "PriorSpec"),  # type: ignore[arg-type]
    ],
)
def test_bad_layer_arguments_raise(build, named: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BnnError, match=named.replace("(", r"\(")):
        build()


# --- KL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [PriorSpec(mu0=0.1, sigma0=0.5), PriorSpec.fixed(0.0, 0.2)])
def test_layer_kl_is_the_sum_of_elementwise_kls(prior: PriorSpec) -> None:
    layer = BayesConv2d(2, 3, 3, prior=prior)
    with torch.no_grad():
        layer.weight_rho.normal_(-2.0, 0.5)
    terms = layer.kl_terms()
    assert set(terms) == {"weight", "bias"}
    p = layer.weight_prior
    expected_w = kl_normal(layer.weight_mu, layer.weight_sigma, p.mu, p.sigma).sum()
    assert terms["weight"].shape == ()
    assert terms["weight"].item() == pytest.approx(expected_w.item(), rel=1e-5)
    assert layer.kl().item() == pytest.approx((terms["weight"] + terms["bias"]).item(), rel=1e-6)


def test_layer_kl_matches_monte_carlo() -> None:
    layer = BayesLinear(6, 4, prior=PriorSpec(mu0=0.05, sigma0=0.3), posterior_sigma_init=0.1)
    layer = layer.double()
    prior_w, prior_b = layer.weight_prior, layer.bias_prior
    assert prior_b is not None
    with torch.no_grad():
        n = 20_000
        log_ratios = torch.zeros(n, dtype=torch.float64)
        for mu, sigma, prior in (
            (layer.weight_mu, layer.weight_sigma, prior_w),
            (layer.bias_mu, layer.bias_sigma, prior_b),
        ):
            q = torch.distributions.Normal(mu, sigma)
            p = torch.distributions.Normal(prior.mu, prior.sigma)
            z = q.sample((n,))
            log_ratios += (q.log_prob(z) - p.log_prob(z)).reshape(n, -1).sum(1)
        std_err = log_ratios.std().item() / math.sqrt(n)
        assert abs(layer.kl().item() - log_ratios.mean().item()) < 4 * std_err


def test_gradients_reach_posteriors_and_learnable_priors() -> None:
    layer = BayesLinear(4, 3)
    (layer(torch.randn(8, 4)).square().mean() + layer.kl()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


# --- whole-model helpers -----------------------------------------------------------------------


def _net(prior: PriorSpec = DEFAULT_PRIOR) -> nn.Sequential:
    inner = nn.Sequential(BayesLinear(4, 4, prior=prior), nn.Tanh())
    return nn.Sequential(BayesConv2d(1, 2, 3, prior=prior), nn.Flatten(), nn.Linear(8, 4), inner)


def test_model_helpers_find_layers_in_order_and_sum_kl() -> None:
    model = _net()
    names = [name for name, _ in bayesian_layers(model)]
    assert names == ["0", "3.0"]
    per_layer = kl_by_layer(model)
    assert list(per_layer) == names
    total = sum(v.item() for v in per_layer.values())
    assert model_kl(model).item() == pytest.approx(total, rel=1e-6)
    assert prior_penalty(model).item() == 0.0
    assert model_kl(nn.Linear(2, 2)).item() == 0.0
    assert bayesian_layers(BayesLinear(2, 2))[0][0] == "layer"


def test_prior_penalty_sums_hierarchical_priors() -> None:
    model = _net(PriorSpec(mode="hierarchical"))
    expected = 0.0
    for _, layer in bayesian_layers(model):
        for prior in layer.priors().values():
            expected -= prior.log_hyperprior().item()
    assert prior_penalty(model).item() == pytest.approx(expected)
    assert expected != 0.0


def _kl_and_grads(model: nn.Module, kl: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(kl, params, allow_unused=True)
    pairs = zip(params, grads, strict=True)
    return kl.item(), [torch.zeros_like(p) if g is None else g for p, g in pairs]


@pytest.mark.parametrize(
    "prior",
    [
        PriorSpec(learn_mean=True, min_group=1),
        PriorSpec("fixed", sigma0=0.3),
        PriorSpec(family="scale_mixture"),
        PriorSpec(scale="fan_in", mode="hierarchical"),
    ],
    ids=["learnable-mean", "fixed", "mixture", "fan-in-hierarchical"],
)
def test_model_kl_batches_small_groups_with_the_same_value_and_gradients(
    prior: PriorSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model_kl sums the small groups in one batched pass: it must agree with the per-layer
    KL in value and in every parameter's gradient, layers above the batching threshold
    (129 x 128) included. The mixture's one-sample estimate draws its noise in one piece
    when batched, so eps is pinned to 0 here (w = mu: the same estimate either way)."""
    if prior.family.value == "scale_mixture":
        monkeypatch.setattr(torch, "randn_like", lambda t: torch.zeros_like(t))
    model = nn.Sequential(
        BayesLinear(3, 129, prior=prior),
        nn.ReLU(),
        BayesLinear(129, 128, prior=prior),  # 16,512 weights: above BATCHED_KL_MAX_NUMEL
        nn.ReLU(),
        BayesLinear(128, 2, prior=prior),
        BayesConv2d(1, 2, 3, prior=prior),
    ).double()
    with torch.no_grad():  # priors away from their start, so every gradient is non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.manual_seed(1)  # the mixture's Monte Carlo draws: the same in both passes
    got, g_got = _kl_and_grads(model, model_kl(model))
    torch.manual_seed(1)
    per_layer = sum(layer.kl() for _, layer in bayesian_layers(model))
    assert isinstance(per_layer, torch.Tensor)
    want, g_want = _kl_and_grads(model, per_layer)
    assert got == pytest.approx(want, rel=1e-12)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_model_kl_batched_in_float32_matches_float64() -> None:
    model = nn.Sequential(BayesLinear(1, 32), nn.Tanh(), BayesLinear(32, 32), BayesLinear(32, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # means far from the prior's: large, non-cancelling terms
    got = model_kl(model).item()
    want = model_kl(copy.deepcopy(model).double()).item()
    assert got == pytest.approx(want, rel=1e-6)


def test_model_kl_and_prior_penalty_use_a_layers_own_overrides() -> None:
    class Doubled(BayesLinear):
        def kl(self) -> torch.Tensor:
            return 2 * super().kl()

        def prior_penalty(self) -> torch.Tensor:
            return super().prior_penalty() + 1.0

    plain, doubled = BayesLinear(4, 3), Doubled(4, 3)
    doubled.load_state_dict(plain.state_dict())
    both = nn.Sequential(plain, doubled)
    assert model_kl(both).item() == pytest.approx(3 * plain.kl().item(), rel=1e-6)
    assert prior_penalty(both).item() == pytest.approx(1.0)


def test_prior_penalty_skips_priors_without_a_hyperprior() -> None:
    model = _net(PriorSpec(mode="gradient"))
    assert not any(
        p.has_hyperprior for _, layer in bayesian_layers(model) for p in layer.priors().values()
    )
    assert prior_penalty(model).item() == 0.0
    hier = _net(PriorSpec(mode="hierarchical"))
    layers = [layer for _, layer in bayesian_layers(hier)]
    assert any(p.has_hyperprior for layer in layers for p in layer.priors().values())


def test_empirical_bayes_step_respects_schedule() -> None:
    step_model = _net(PriorSpec(mode="empirical_bayes", eb_every="step", learn_mean=True))
    epoch_model = _net(PriorSpec(mode="empirical_bayes", eb_every="epoch", learn_mean=True))
    empirical_bayes_step(step_model, EBSchedule.EPOCH)  # wrong schedule: untouched
    empirical_bayes_step(epoch_model, "epoch")
    untouched = bayesian_layers(step_model)[1][1]
    assert untouched.weight_prior.sigma.item() == pytest.approx(1.0)
    for _, layer in bayesian_layers(epoch_model):
        mu, sigma = layer.posterior("weight")
        assert layer.weight_prior.mu.item() == pytest.approx(mu.mean().item(), abs=1e-6)
        second = (sigma.square() + (mu - mu.mean()).square()).mean().sqrt()
        assert layer.weight_prior.sigma.item() == pytest.approx(second.item(), rel=1e-5)
    # gradient-mode priors are left alone by the EB step
    grad_model = _net()
    empirical_bayes_step(grad_model)
    assert bayesian_layers(grad_model)[0][1].weight_prior.sigma.item() == pytest.approx(1.0)


def test_extra_repr_and_dtype_conversion() -> None:
    text = repr(BayesLinear(3, 2, local_reparam=True, prior=PriorSpec.fixed(sigma0=0.1)))
    assert "in_features=3" in text
    assert "local_reparam=True" in text
    assert "prior=fixed" in text
    assert "kernel_size=(3, 3)" in repr(BayesConv2d(1, 2, 3))
    layer = BayesLinear(3, 2).double()
    assert layer(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64
    assert layer.kl().dtype == torch.float64
    assert inverse_positive(torch.tensor(0.5, dtype=torch.float64)).dtype == torch.float64


def _reference_grads(layer: BayesLinear, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Gradients of sample-loss + KL computed from the textbook formulas, no shared sigma."""
    mu, rho = layer.weight_mu, layer.weight_rho
    bmu, brho = layer.bias_mu, layer.bias_rho
    torch.manual_seed(seed)
    sigma = torch.nn.functional.softplus(rho) + 1e-8
    w = mu + sigma * torch.randn_like(sigma)
    bsigma = torch.nn.functional.softplus(brho) + 1e-8
    b = bmu + bsigma * torch.randn_like(bsigma)
    out = torch.nn.functional.linear(x, w, b).square().sum()
    p = layer.weight_prior
    kl = (
        kl_normal(mu, sigma, p.mu, p.sigma).sum()
        + kl_normal(bmu, bsigma, layer.bias_prior.mu, layer.bias_prior.sigma).sum()
    )
    params = [mu, rho, bmu, brho, p.mu, p.rho]
    return list(torch.autograd.grad(out + kl, params))


def test_shared_sigma_gives_the_textbook_gradients_step_after_step() -> None:
    torch.manual_seed(0)
    layer = BayesLinear(6, 4, prior=PriorSpec(kind="learnable", learn_mean=True, min_group=1))
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    x = torch.randn(5, 6)
    for step in range(3):
        ref = _reference_grads(layer, x, seed=step)
        opt.zero_grad()
        torch.manual_seed(step)
        with kernels.disabled():  # torch.randn's noise, as the reference draws it (the fused
            # kernels' gradients: tests/trainer/test_kernels.py, with their own noise replayed)
            (layer(x).square().sum() + layer.kl()).backward()
        got = [
            layer.weight_mu.grad,
            layer.weight_rho.grad,
            layer.bias_mu.grad,
            layer.bias_rho.grad,
            layer.weight_prior.mu.grad,
            layer.weight_prior.rho.grad,
        ]
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        opt.step()


def test_shared_sigma_never_walks_a_freed_graph() -> None:
    layer = BayesLinear(3, 2)
    x = torch.randn(4, 3)
    for _ in range(2):  # backward twice without an optimiser step in between
        (layer(x).sum() + layer(x).sum() + layer.kl()).backward()
        layer.kl().backward()
    copy.deepcopy(layer)(x)  # a model holding a cached graph node still copies
    with torch.no_grad():
        layer(x)
    assert layer.kl().requires_grad  # a no-grad forward never feeds a grad-enabled KL
