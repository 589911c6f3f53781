"""Gaussian priors shared by all weights (or all biases) of one Bayesian layer.

A layer holds two priors, ``weight_prior`` and ``bias_prior``; a :class:`GaussianPrior` is one
scalar Gaussian N(mu_p, sigma_p^2) shared by every element of that parameter tensor (the seed's
"Bayesian information sharing"; the options are described in :mod:`trainer.prior_spec`, the
scale-mixture family in :mod:`trainer.mixture`). The prior is either

* ``fixed``: ``mu`` and ``sigma`` are buffers (no parameters, never trained), or
* ``learnable``: ``rho`` is a parameter, ``sigma = factor * positive(rho)`` (factor 1, or
  1/sqrt(fan_in) on the ``fan_in`` scale); ``mu`` a parameter only with ``learn_mean``. Modes:

  - ``gradient``: jointly with the posteriors by gradient descent on the ELBO, in an optimiser
    group of its own (``TrainConfig.prior_lr`` / ``prior_optimizer``);
  - ``empirical_bayes``: set in closed form to the minimiser of the layer's KL given the current
    posteriors, sigma_p^2 = mean(sigma_i^2 + (mu_i - mu_p)^2), every step or every epoch after
    ``TrainConfig.prior_burnin_epochs`` (the trainer calls
    :func:`trainer.layers.empirical_bayes_step`); the parameters have ``requires_grad=False``;
  - ``hierarchical``: by gradient, plus an inverse-gamma hyperprior on the prior variance,
    sigma_p^2 ~ InvGamma(alpha, beta), which adds ``-log p(sigma_p^2)`` to the loss. alpha is
    ``hyper_strength * numel / 2`` (pseudo-observations in proportion to the group's size, so
    it constrains a large layer as much as a small one) unless ``hyper_alpha`` is given;
    beta = (alpha + 1) * sigma_init^2 puts the hyperprior's mode at the initial prior variance;
  - ``laplace``: set by the trainer every K epochs from a Laplace/GGN marginal-likelihood
    estimate (:mod:`trainer.laplace`).

sigma is always a standard deviation; variance = sigma^2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer import kernels
from trainer.errors import BnnError
from trainer.prior_spec import (
    DEFAULT_PRIOR,
    SIGMA_FLOOR,
    EBSchedule,
    LearnMode,
    PriorFamily,
    PriorKind,
    PriorScale,
    PriorSpec,
)

__all__ = [
    "BATCHED_KL_MAX_NUMEL",
    "DEFAULT_PRIOR",
    "SIGMA_FLOOR",
    "EBSchedule",
    "GaussianPrior",
    "LayerPrior",
    "LearnMode",
    "PriorFamily",
    "PriorKind",
    "PriorScale",
    "PriorSpec",
    "inverse_positive",
    "kl_normal",
    "kl_normal_sum",
    "kl_normal_sum_batched",
    "kl_normal_sum_fused",
    "log_hyperprior_batched",
    "positive",
]


def positive(rho: Tensor) -> Tensor:
    """The one map from an unconstrained ``rho`` to a standard deviation: softplus(rho) + 1e-8.

    ``F.softplus`` is evaluated stably (``rho`` itself above 20, ``log1p(exp(rho))`` below), so
    rho = 100 gives 100 and rho = -100 gives 1e-8: never NaN, inf or 0 for finite rho.
    Re-exported as ``trainer.layers.positive``.
    """
    return F.softplus(rho).add_(SIGMA_FLOOR)


def inverse_positive(sigma: float | Tensor) -> Tensor:
    """``rho`` with ``positive(rho) == sigma``; sigma must be finite and > 1e-8.

    Computed in float64 as x + log(-expm1(-x)), x = sigma - 1e-8 (stable for tiny and huge x).
    Returns a tensor of ``sigma``'s floating dtype (the default dtype for a Python float).
    """
    if isinstance(sigma, Tensor):
        dtype = sigma.dtype if sigma.is_floating_point() else torch.get_default_dtype()
        s = sigma.detach().to(torch.float64)
    else:
        dtype, s = torch.get_default_dtype(), torch.tensor(float(sigma), dtype=torch.float64)
    bad = ~(torch.isfinite(s) & (s > SIGMA_FLOOR))
    if bool(bad.any()):
        value = float(s[bad].reshape(-1)[0])
        raise BnnError.invalid(
            f"sigma must be a finite number > {SIGMA_FLOOR:g} (got {value!r})", sigma=value
        )
    return _inverse_positive_unchecked(s).to(dtype)


def _inverse_positive_unchecked(sigma: Tensor) -> Tensor:
    x = sigma - SIGMA_FLOOR
    return x + torch.log(-torch.expm1(-x))


def kl_normal(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """Elementwise KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)); arguments broadcast.

    KL = log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2.
    """
    var_p = sigma_p.square()
    return (
        torch.log(sigma_p)
        - torch.log(sigma_q)
        + (sigma_q.square() + (mu_q - mu_p).square()) / (2 * var_p)
        - 0.5
    )


def kl_normal_sum(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """``kl_normal(...).sum()`` as a scalar, fused for a shared scalar prior.

    With one (mu_p, sigma_p) for all n elements:
    KL = n log sigma_p - sum log sigma_q + sum(sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - n/2,
    which needs no elementwise tensor of the prior's size.
    """
    if mu_p.numel() != 1 or sigma_p.numel() != 1:
        return kl_normal(mu_q, sigma_q, mu_p, sigma_p).sum()
    n = mu_q.numel()
    d = mu_q - mu_p.reshape(())
    sigma_p0 = sigma_p.reshape(())
    return (
        n * torch.log(sigma_p0)
        - torch.log(sigma_q).sum()
        + torch.addcmul(sigma_q.square(), d, d).sum() / (2 * sigma_p0.square())
        - 0.5 * n
    )


class _SharedPriorKL(torch.autograd.Function):
    """sum_i KL(N(mu_i, sigma_i^2) || N(mu_p, sigma_p^2)) for one scalar prior, fused.

    Autograd through the elementwise expression keeps about a dozen tensors of the layer's
    size alive and walks them twice; this takes one log and three reductions forward and
    the analytic gradients backward (cheap arithmetic only):
    dKL/dmu_i = (mu_i - mu_p) / sigma_p^2,   dKL/dsigma_i = sigma_i / sigma_p^2 - 1 / sigma_i,
    dKL/dmu_p = -sum_i (mu_i - mu_p) / sigma_p^2,
    dKL/dsigma_p = n / sigma_p - sum_i (sigma_i^2 + (mu_i - mu_p)^2) / sigma_p^3.
    Every sum is accumulated as in float64 (:func:`sum64`; a float32 sum of 1.4M squares
    was off by ~100 nats);
    deviations are taken from mu_p before squaring, so nothing cancels. On the CPU
    (:func:`trainer.kernels.usable`) the sums take one pass and the gradients of mu and
    sigma another (:func:`trainer.kernels.kl_sums`, :func:`trainer.kernels.kl_backward`).
    """

    @staticmethod
    def forward(ctx: Any, mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
        n = mu_q.numel()
        sp = sigma_p.detach().reshape(()).to(torch.float64)
        ctx.fused = kernels.usable(mu_q, sigma_q)
        if ctx.fused:  # the CPU kernels: the three sums in one pass, in float64
            ctx.mp = float(mu_p.detach().reshape(()))
            sums = kernels.kl_sums(mu_q, sigma_q, ctx.mp)
            sum_log, second = (torch.tensor(v, dtype=torch.float64) for v in sums[:2])
            ctx.sum_d = sums[2]
            ctx.save_for_backward(mu_q, sigma_q, sigma_p)
        else:
            d = mu_q - mu_p.detach().reshape(())
            sum_log = sum64(torch.log(sigma_q), center=True)
            second = sum64(torch.addcmul(sigma_q * sigma_q, d, d))  # sum_i sigma_i^2 + d_i^2
            ctx.save_for_backward(d, sigma_q, sigma_p)
        kl = n * torch.log(sp) - sum_log + second / (2 * sp * sp) - 0.5 * n
        ctx.n, ctx.second = n, second
        return kl.to(mu_q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        d, sigma_q, sigma_p = ctx.saved_tensors  # d: mu_q itself on the fused path
        var_p = sigma_p.detach().square()
        scale = (grad / var_p).reshape(())
        g_mu = g_sigma = g_mup = g_sp = None
        if ctx.fused:
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                g_mu, g_sigma = kernels.kl_backward(
                    d, sigma_q, ctx.mp, float(scale), float(grad.reshape(()))
                )
            if ctx.needs_input_grad[2]:
                g_mup = (-ctx.sum_d * scale.to(torch.float64)).to(sigma_p.dtype)
                g_mup = g_mup.reshape(sigma_p.shape)
        elif ctx.needs_input_grad[0]:
            g_mu = d * scale
        if ctx.needs_input_grad[1] and not ctx.fused:  # sigma / sigma_p^2 - 1 / sigma, * grad
            g_sigma = torch.addcdiv(sigma_q * scale, grad.reshape(()), sigma_q, value=-1)
        if ctx.needs_input_grad[2] and not ctx.fused:
            sum_d = sum64(d)
            g_mup = (-sum_d * scale.to(torch.float64)).to(sigma_p.dtype).reshape(sigma_p.shape)
        if ctx.needs_input_grad[3]:
            sp = sigma_p.detach().to(torch.float64)
            g = grad.to(torch.float64) * (ctx.n / sp - ctx.second / sp**3)
            g_sp = g.to(sigma_p.dtype).reshape(sigma_p.shape)
        return g_mu, g_sigma, g_mup, g_sp


_SUM_BLOCK = 1024


def sum64(x: Tensor, *, center: bool = False) -> Tensor:
    """The sum of ``x`` as a float64 scalar, accumulated as precisely as in float64 without
    converting the whole tensor: float32 (cascade-summed) sums of blocks of
    ``_SUM_BLOCK`` elements, then the block sums in float64. 2-8x faster than
    ``x.sum(dtype=torch.float64)`` on the CPU, which copies ``x`` to float64 first (measured
    on a 1200x1200 layer, one thread).

    A block's float32 sum is rounded at each level of the cascade; for nearly constant
    values (every sigma of a fresh layer is the same) those roundings do not cancel and a
    1.44M-element sum of log-sigmas drifts by ~1 nat. ``center=True`` sums ``x - x[0]``
    instead (one more pass, exact for constant values), for sums much larger than the
    spread of their terms.
    """
    if x.dtype == torch.float64 or x.numel() <= 4 * _SUM_BLOCK:
        return x.sum(dtype=torch.float64)  # (a small copy)
    flat = x.reshape(-1)
    offset: Tensor | None = None
    if center:
        offset = flat[0].detach().to(torch.float64)
        flat = flat - flat[0].detach()
    whole = flat.numel() // _SUM_BLOCK * _SUM_BLOCK
    total = flat[:whole].view(-1, _SUM_BLOCK).sum(dim=1).to(torch.float64).sum()
    if whole != flat.numel():
        total = total + flat[whole:].sum(dtype=torch.float64)
    return total if offset is None else total + offset * x.numel()


def kl_normal_sum_fused(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """``kl_normal_sum`` with analytic gradients when the prior is one scalar (the layers' path).

    Same value and gradients; a fraction of the memory traffic and no transcendental function
    in the backward pass.
    """
    if mu_p.numel() != 1 or sigma_p.numel() != 1:
        return kl_normal_sum(mu_q, sigma_q, mu_p, sigma_p)
    out: Tensor = _SharedPriorKL.apply(mu_q, sigma_q, mu_p, sigma_p)
    return out


#: Groups of at most this many elements go through :func:`kl_normal_sum_batched` together.
BATCHED_KL_MAX_NUMEL = 1 << 14


def kl_normal_sum_batched(groups: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]]) -> Tensor:
    """sum over groups g of sum_i KL(N(mu_gi, sigma_gi^2) || N(mu_pg, sigma_pg^2)), a scalar.

    Each group is ``(mu_q, sigma_q, mu_p, sigma_p)`` with a scalar prior (shape (1,) or ()),
    all on one device and of one dtype. For small tensors every operation costs its dispatch,
    not its arithmetic, so the groups are concatenated and reduced together: about twenty
    operations forward and backward however many groups there are, where one
    :func:`kl_normal_sum_fused` per group costs as many per group (a 1-32-32-1 MLP's six
    groups on one CPU thread: 1.0 ms instead of 2.7 ms forward plus backward). The same
    formula and precision as the fused path: deviations from mu_p taken before squaring,
    every sum accumulated in float64 (per group, then over groups); plain autograd for the
    gradients (an analytic backward, as in the fused path, measured no faster here).
    """
    if not groups:
        raise BnnError.invalid("kl_normal_sum_batched needs at least one group (got none)")
    mu_q = torch.cat([_flat(g[0]) for g in groups])
    sigma_q = torch.cat([_flat(g[1]) for g in groups])
    mu_p = torch.cat([_flat(g[2]) for g in groups])
    sigma_p = torch.cat([_flat(g[3]) for g in groups]).to(torch.float64)
    counts = tuple(g[0].numel() for g in groups)
    index_of = group_index.__wrapped__ if torch.compiler.is_compiling() else group_index
    n, index = index_of(counts, mu_q.device)
    d = (mu_q - mu_p.index_select(0, index)).to(torch.float64)
    s = sigma_q.to(torch.float64)
    zeros = n.new_zeros(len(groups))
    second = zeros.index_add(0, index, torch.addcmul(s * s, d, d))  # sum sigma^2 + d^2
    sum_log = zeros.index_add(0, index, torch.log(sigma_q).to(torch.float64))
    kl = n * torch.log(sigma_p) - sum_log + second / (2 * sigma_p * sigma_p) - 0.5 * n
    return kl.sum().to(mu_q.dtype)


def _flat(t: Tensor) -> Tensor:
    return t if t.dim() == 1 else t.reshape(-1)


@functools.lru_cache(maxsize=64)
def group_index(counts: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(element count per group as float64, the group of every element) for groups of
    ``counts`` elements laid end to end: a model's groups do not change between steps, so
    these are built once per model layout and device (cached)."""
    n = torch.tensor(counts, dtype=torch.float64, device=device)
    index = torch.repeat_interleave(
        torch.arange(len(counts), device=device),
        torch.tensor(counts, device=device),
        output_size=sum(counts),
    )
    return n, index


def log_hyperprior_batched(priors: Sequence[GaussianPrior]) -> Tensor:
    """sum of ``prior.log_hyperprior()`` over hierarchical ``priors`` (learnable, one device
    and dtype), a scalar: their sigmas and inverse-gamma terms computed together, a fixed
    number of operations however many priors (see :func:`kl_normal_sum_batched`)."""
    if not priors:
        raise BnnError.invalid("log_hyperprior_batched needs at least one prior (got none)")
    rho = torch.cat([p.rho.reshape(1) for p in priors if p.rho is not None])
    if rho.numel() != len(priors) or any(p.mode is not LearnMode.HIERARCHICAL for p in priors):
        raise BnnError.invalid("log_hyperprior_batched takes hierarchical priors only")
    terms = [(*p.hyperprior(), p.factor) for p in priors]
    constants = _hyper_constants.__wrapped__ if torch.compiler.is_compiling() else _hyper_constants
    alpha, beta, factor, const = constants(tuple(terms), rho.device, rho.dtype)
    sigma = positive(rho) * factor
    log_var = 2 * torch.log(sigma)
    return (const - (alpha + 1) * log_var - beta / sigma.square()).sum()


@functools.lru_cache(maxsize=64)
def _hyper_constants(
    terms: tuple[tuple[float, float, float], ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha, beta, factor, alpha log beta - lgamma(alpha)) as tensors, one entry per prior."""
    columns = zip(*terms, strict=True)
    alpha, beta, factor = (torch.tensor(c, dtype=dtype, device=device) for c in columns)
    const = torch.tensor(
        [a * math.log(b) - math.lgamma(a) for a, b, _ in terms], dtype=dtype, device=device
    )
    return alpha, beta, factor, const


class LayerPrior(nn.Module):
    """What a layer asks of its weight or bias prior (Gaussian or scale mixture).

    ``mu`` / ``sigma``: shape (1,), the prior's mean and standard deviation (for a mixture its
    moment-matched sigma), which the trainer captures. ``kl(mu_q, sigma_q)``: the summed
    KL(q || p), a scalar (a Monte Carlo estimate where no closed form exists).
    """

    spec: PriorSpec
    learnable: bool
    mode: LearnMode | None
    numel: int  # elements in the group
    fan_in: int
    mu: Tensor  # shape (1,)

    @property
    def sigma(self) -> Tensor:
        """The prior's standard deviation, shape (1,); each prior defines it."""
        raise AttributeError("sigma")

    def kl(self, mu_q: Tensor, sigma_q: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def kl_fused(self, mu_q: Tensor, sigma_q: Tensor) -> Tensor:
        """:meth:`kl`, by the fastest exact path the prior has."""
        return self.kl(mu_q, sigma_q)

    @property
    def has_hyperprior(self) -> bool:
        """Whether :meth:`log_hyperprior` can be non-zero (the ELBO skips it otherwise)."""
        return type(self).log_hyperprior is not LayerPrior.log_hyperprior

    def log_hyperprior(self) -> Tensor:
        """log density of the prior's hyperprior (0 when it has none), a scalar."""
        return self.mu.new_zeros(())

    def reset_parameters(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class GaussianPrior(LayerPrior):
    """One scalar Gaussian prior N(mu, sigma^2) shared by all elements of one parameter tensor.

    ``numel`` and ``fan_in`` describe the group (they size the hierarchical hyperprior and the
    ``fan_in`` scale). Fixed: buffers ``mu`` and ``sigma`` of shape (1,). Learnable: parameter
    ``rho`` of shape (1,) with ``sigma = factor * positive(rho)`` (``factor`` = 1/sqrt(fan_in)
    for the ``fan_in`` scale, else 1), and ``mu`` a parameter when ``spec.learn_mean`` (else a
    buffer at ``mu0``). ``mode`` is None for a fixed prior.
    """

    rho: nn.Parameter | None

    def __init__(self, spec: PriorSpec = DEFAULT_PRIOR, *, numel: int = 1, fan_in: int = 1) -> None:
        super().__init__()
        if not isinstance(spec, PriorSpec):
            raise BnnError.invalid(f"prior must be a PriorSpec (got {spec!r})")
        self.spec = spec
        self.numel, self.fan_in = int(numel), int(fan_in)
        self.factor = (
            1.0 / math.sqrt(max(1, self.fan_in)) if spec.scale is PriorScale.FAN_IN else 1.0
        )
        self.learnable = spec.learnable
        self.mode: LearnMode | None = spec.mode if spec.learnable else None
        self.eb_every = spec.eb_every
        if self.learnable:
            by_gradient = self.mode in (LearnMode.GRADIENT, LearnMode.HIERARCHICAL)
            self.rho = nn.Parameter(torch.empty(1), requires_grad=by_gradient)
            if spec.learn_mean:
                self.mu = nn.Parameter(torch.empty(1), requires_grad=by_gradient)
            else:
                self.register_buffer("mu", torch.empty(1))
        else:
            self.register_parameter("rho", None)
            self.register_buffer("mu", torch.empty(1))
            self.register_buffer("sigma", torch.empty(1))
        self.reset_parameters()

    @property
    def sigma(self) -> Tensor:
        """Prior standard deviation, shape (1,)."""
        if self.rho is not None:
            s = positive(self.rho)
            return s if self.factor == 1.0 else s * self.factor
        buffer = self._buffers.get("sigma")
        if buffer is None:  # only while __init__ registers the buffer
            raise AttributeError("sigma")
        return buffer

    @property
    def variance(self) -> Tensor:
        """sigma^2, shape (1,)."""
        return self.sigma.square()

    @property
    def base_sigma(self) -> float:
        """The initial prior sigma: ``sigma0`` (times 1/sqrt(fan_in) on the ``fan_in`` scale)."""
        return self.spec.sigma0 * self.factor

    def reset_parameters(self) -> None:
        """Set the prior back to its initial N(mu0, base_sigma^2)."""
        with torch.no_grad():
            self.mu.fill_(self.spec.mu0)
            if self.rho is not None:
                self.rho.copy_(
                    inverse_positive(torch.tensor(self.spec.sigma0, dtype=torch.float64))
                )
            else:
                self.sigma.fill_(self.base_sigma)

    def kl(self, mu_q: Tensor, sigma_q: Tensor) -> Tensor:
        """sum_i KL(N(mu_q[i], sigma_q[i]^2) || prior), a scalar; mu_q, sigma_q: any shape."""
        return kl_normal_sum(mu_q, sigma_q, self.mu, self.sigma)

    def kl_fused(self, mu_q: Tensor, sigma_q: Tensor) -> Tensor:
        """:meth:`kl` with analytic gradients (faster; what the layers use)."""
        return kl_normal_sum_fused(mu_q, sigma_q, self.mu, self.sigma)

    @torch.no_grad()
    def set_sigma_(self, sigma: float | Tensor) -> None:
        """Set a learnable prior's sigma (what the Laplace mode does every K epochs)."""
        if self.rho is None:
            raise BnnError.invalid("set_sigma_ needs a learnable prior (this one is fixed)")
        value = torch.as_tensor(sigma, dtype=torch.float64).reshape(()) / self.factor
        self.rho.copy_(inverse_positive(value).reshape(1))

    @torch.no_grad()
    def empirical_bayes_(self, mu_q: Tensor, sigma_q: Tensor) -> None:
        """Set the prior to the minimiser of :meth:`kl` for the given posteriors (any shape).

        mu_p = mean(mu_q) when the mean is learned (else it stays mu0),
        sigma_p^2 = mean(sigma_q^2 + (mu_q - mu_p)^2), summed in float64.
        """
        if self.rho is None:
            raise BnnError.invalid("empirical_bayes_ needs a learnable prior (this one is fixed)")
        if mu_q.numel() == 0:
            raise BnnError.invalid("empirical_bayes_ needs at least one posterior (got none)")
        if self.spec.learn_mean:
            mu_p = mu_q.mean(dtype=torch.float64)
        else:
            mu_p = torch.tensor(self.spec.mu0, dtype=torch.float64, device=mu_q.device)
        d = mu_q - mu_p.to(mu_q.dtype)
        var_p = torch.addcmul(sigma_q.square(), d, d).mean(dtype=torch.float64)
        if not bool(torch.isfinite(mu_p + var_p)):  # one device sync
            raise BnnError.invalid(
                "empirical_bayes_ got non-finite posteriors "
                f"(mean mu={float(mu_p)!r}, mean second moment={float(var_p)!r})"
            )
        c = (var_p.sqrt() / self.factor).clamp_min(10 * SIGMA_FLOOR)  # > floor: invertible
        self.mu.copy_(mu_p.reshape(1))
        self.rho.copy_(_inverse_positive_unchecked(c).reshape(1))

    def hyperprior(self) -> tuple[float, float]:
        """(alpha, beta) of the inverse-gamma hyperprior on sigma^2 (``PriorSpec.hyperprior``)."""
        return self.spec.hyperprior(self.numel, self.base_sigma)

    @property
    def has_hyperprior(self) -> bool:
        return self.mode is LearnMode.HIERARCHICAL

    def log_hyperprior(self) -> Tensor:
        """log InvGamma(sigma^2 | alpha, beta) when hierarchical, else 0; a scalar.

        log p(v) = alpha log beta - lgamma(alpha) - (alpha + 1) log v - beta / v, v = sigma^2.
        """
        if self.mode is not LearnMode.HIERARCHICAL:
            return self.mu.new_zeros(())
        alpha, beta = self.hyperprior()
        sigma = self.sigma.reshape(())
        log_var = 2 * torch.log(sigma)
        const = alpha * math.log(beta) - math.lgamma(alpha)
        return const - (alpha + 1) * log_var - beta / sigma.square()

    def extra_repr(self) -> str:
        text = f"kind={self.spec.kind.value}"
        if self.spec.scale is not PriorScale.ABSOLUTE:
            text += f", scale={self.spec.scale.value} (fan_in={self.fan_in})"
        if self.mode is not None:
            text += f", mode={self.mode.value}, learn_mean={self.spec.learn_mean}"
            if self.mode is LearnMode.EMPIRICAL_BAYES:
                text += f", eb_every={self.eb_every.value}"
            if self.mode is LearnMode.HIERARCHICAL:
                alpha, beta = self.hyperprior()
                text += f", hyper_alpha={alpha:g}, hyper_beta={beta:g}"
        with torch.no_grad():
            return text + f", mu={float(self.mu):.4g}, sigma={float(self.sigma):.4g}"
