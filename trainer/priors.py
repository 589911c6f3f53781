"""Gaussian priors shared by all weights (or all biases) of one Bayesian layer.

A layer holds two :class:`GaussianPrior` modules, ``weight_prior`` and ``bias_prior``; each is one
scalar Gaussian N(mu_p, sigma_p^2) shared by every element of that parameter tensor (the seed's
"Bayesian information sharing"). The prior is either

* ``fixed``: ``mu`` and ``sigma`` are buffers (no parameters, never trained), or
* ``learnable``: ``mu`` and ``rho`` are parameters, ``sigma = positive(rho)``, learned by

  - ``gradient``: jointly with the posteriors by gradient descent on the ELBO (default);
  - ``empirical_bayes``: set in closed form to the minimiser of the layer's KL given the current
    posteriors, mu_p = mean(mu_i), sigma_p^2 = mean(sigma_i^2 + (mu_i - mu_p)^2), every step or
    every epoch (``PriorSpec.eb_every``; the trainer calls
    :func:`trainer.layers.empirical_bayes_step`); the parameters then have ``requires_grad=False``;
  - ``hierarchical``: by gradient, plus an inverse-gamma hyperprior on the prior variance,
    sigma_p^2 ~ InvGamma(hyper_alpha, hyper_beta), which adds ``-log p(sigma_p^2)`` to the loss so
    the prior cannot collapse onto the posteriors. Defaults: ``hyper_alpha = 3`` and
    ``hyper_beta = (hyper_alpha + 1) * sigma0^2``, which puts the hyperprior's mode at the initial
    prior variance ``sigma0^2``.

sigma is always a standard deviation; variance = sigma^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.errors import BnnError

__all__ = [
    "DEFAULT_PRIOR",
    "SIGMA_FLOOR",
    "EBSchedule",
    "GaussianPrior",
    "LearnMode",
    "PriorKind",
    "PriorSpec",
    "inverse_positive",
    "kl_normal",
    "kl_normal_sum",
    "kl_normal_sum_fused",
    "positive",
]

SIGMA_FLOOR = 1e-8
"""Added to softplus(rho), so no sigma is ever exactly 0 (and log(sigma) stays finite)."""


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
    Sums are float32 cascades combined in float64; deviations are taken from mu_p before
    squaring, so nothing cancels.
    """

    @staticmethod
    def forward(ctx: Any, mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
        n = mu_q.numel()
        d = mu_q - mu_p.detach().reshape(())
        sp = sigma_p.detach().reshape(()).to(torch.float64)
        sum_log = torch.log(sigma_q).sum().to(torch.float64)
        second = (
            torch.linalg.vector_norm(sigma_q).to(torch.float64).square()
            + torch.linalg.vector_norm(d).to(torch.float64).square()
        )  # sum_i sigma_i^2 + (mu_i - mu_p)^2
        kl = n * torch.log(sp) - sum_log + second / (2 * sp * sp) - 0.5 * n
        ctx.save_for_backward(d, sigma_q, sigma_p)
        ctx.n, ctx.second = n, second
        return kl.to(mu_q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        d, sigma_q, sigma_p = ctx.saved_tensors
        var_p = sigma_p.detach().square()
        scale = grad / var_p
        g_mu = g_sigma = g_mup = g_sp = None
        if ctx.needs_input_grad[0]:
            g_mu = d * scale
        if ctx.needs_input_grad[1]:
            g_sigma = torch.reciprocal(sigma_q).mul_(-grad).add_(sigma_q * scale)
        if ctx.needs_input_grad[2]:
            sum_d = d.sum().to(torch.float64)
            g_mup = (-sum_d * scale.to(torch.float64)).to(sigma_p.dtype).reshape(sigma_p.shape)
        if ctx.needs_input_grad[3]:
            sp = sigma_p.detach().to(torch.float64)
            g = grad.to(torch.float64) * (ctx.n / sp - ctx.second / sp**3)
            g_sp = g.to(sigma_p.dtype).reshape(sigma_p.shape)
        return g_mu, g_sigma, g_mup, g_sp


def kl_normal_sum_fused(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """``kl_normal_sum`` with analytic gradients when the prior is one scalar (the layers' path).

    Same value and gradients; a fraction of the memory traffic and no transcendental function
    in the backward pass.
    """
    if mu_p.numel() != 1 or sigma_p.numel() != 1:
        return kl_normal_sum(mu_q, sigma_q, mu_p, sigma_p)
    out: Tensor = _SharedPriorKL.apply(mu_q, sigma_q, mu_p, sigma_p)
    return out


class PriorKind(StrEnum):
    """Whether the layer prior is a fixed Gaussian or learned."""

    FIXED = "fixed"
    LEARNABLE = "learnable"


class LearnMode(StrEnum):
    """How a learnable prior is learned (see the module docstring)."""

    GRADIENT = "gradient"
    EMPIRICAL_BAYES = "empirical_bayes"
    HIERARCHICAL = "hierarchical"


class EBSchedule(StrEnum):
    """When the trainer applies the closed-form empirical-Bayes update."""

    STEP = "step"
    EPOCH = "epoch"


_E = TypeVar("_E", bound=Enum)


def _as_enum(enum: type[_E], value: Any, name: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        options = ", ".join(repr(e.value) for e in enum)
        raise BnnError.invalid(
            f"{name} must be one of {options} (got {value!r})", **{name: value}
        ) from None


def _finite(value: Any, name: str, *, positive_only: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive_only and value <= 0):
        what = "a finite number > 0" if positive_only else "a finite number"
        raise BnnError.invalid(f"{name} must be {what} (got {value!r})", **{name: value})
    return float(value)


@dataclass(frozen=True)
class PriorSpec:
    """Configuration of the priors of a layer (the same spec builds its weight and bias prior).

    Strings are accepted for the enum fields (``PriorSpec("fixed", sigma0=0.1)``).
    ``hyper_beta=None`` means ``(hyper_alpha + 1) * sigma0**2`` (see :attr:`resolved_hyper_beta`).
    """

    kind: PriorKind = PriorKind.LEARNABLE
    mode: LearnMode = LearnMode.GRADIENT
    mu0: float = 0.0
    sigma0: float = 1.0
    eb_every: EBSchedule = EBSchedule.STEP
    hyper_alpha: float = 3.0
    hyper_beta: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _as_enum(PriorKind, self.kind, "kind"))
        object.__setattr__(self, "mode", _as_enum(LearnMode, self.mode, "mode"))
        object.__setattr__(self, "eb_every", _as_enum(EBSchedule, self.eb_every, "eb_every"))
        object.__setattr__(self, "mu0", _finite(self.mu0, "mu0", positive_only=False))
        sigma0 = _finite(self.sigma0, "sigma0", positive_only=True)
        if sigma0 <= 10 * SIGMA_FLOOR:
            raise BnnError.invalid(f"sigma0 must be > {10 * SIGMA_FLOOR:g} (got {sigma0!r})")
        object.__setattr__(self, "sigma0", sigma0)
        alpha = _finite(self.hyper_alpha, "hyper_alpha", positive_only=True)
        object.__setattr__(self, "hyper_alpha", alpha)
        if self.hyper_beta is not None:
            beta = _finite(self.hyper_beta, "hyper_beta", positive_only=True)
            object.__setattr__(self, "hyper_beta", beta)

    @property
    def learnable(self) -> bool:
        return self.kind is PriorKind.LEARNABLE

    @property
    def resolved_hyper_beta(self) -> float:
        """Inverse-gamma scale: ``hyper_beta`` or, when None, ``(hyper_alpha + 1) * sigma0^2``."""
        if self.hyper_beta is not None:
            return self.hyper_beta
        return (self.hyper_alpha + 1.0) * self.sigma0**2

    @classmethod
    def fixed(cls, mu0: float = 0.0, sigma0: float = 1.0) -> PriorSpec:
        """A fixed N(mu0, sigma0^2) prior."""
        return cls(PriorKind.FIXED, mu0=mu0, sigma0=sigma0)

    def describe(self) -> str:
        """Short text, e.g. ``"learnable/gradient"`` or ``"fixed"``."""
        return f"learnable/{self.mode.value}" if self.learnable else "fixed"


DEFAULT_PRIOR = PriorSpec()
"""The default spec: a learnable N(0, 1) prior learned by gradient."""


class GaussianPrior(nn.Module):
    """One scalar Gaussian prior N(mu, sigma^2) shared by all elements of one parameter tensor.

    Fixed: buffers ``mu`` and ``sigma`` of shape (1,). Learnable: parameters ``mu`` and ``rho`` of
    shape (1,) and ``sigma = positive(rho)``. ``mode`` is None for a fixed prior.
    """

    mu: Tensor
    rho: nn.Parameter | None

    def __init__(self, spec: PriorSpec = DEFAULT_PRIOR) -> None:
        super().__init__()
        if not isinstance(spec, PriorSpec):
            raise BnnError.invalid(f"prior must be a PriorSpec (got {spec!r})")
        self.spec = spec
        self.learnable = spec.learnable
        self.mode: LearnMode | None = spec.mode if spec.learnable else None
        self.eb_every = spec.eb_every
        if self.learnable:
            trainable = self.mode is not LearnMode.EMPIRICAL_BAYES
            self.mu = nn.Parameter(torch.empty(1), requires_grad=trainable)
            self.rho = nn.Parameter(torch.empty(1), requires_grad=trainable)
        else:
            self.register_parameter("rho", None)
            self.register_buffer("mu", torch.empty(1))
            self.register_buffer("sigma", torch.empty(1))
        self.reset_parameters()

    @property
    def sigma(self) -> Tensor:
        """Prior standard deviation, shape (1,)."""
        if self.rho is not None:
            return positive(self.rho)
        buffer = self._buffers.get("sigma")
        if buffer is None:  # only while __init__ registers the buffer
            raise AttributeError("sigma")
        return buffer

    @property
    def variance(self) -> Tensor:
        """sigma^2, shape (1,)."""
        return self.sigma.square()

    def reset_parameters(self) -> None:
        """Set the prior back to N(mu0, sigma0^2)."""
        with torch.no_grad():
            self.mu.fill_(self.spec.mu0)
            if self.rho is not None:
                sigma0 = torch.tensor(self.spec.sigma0, dtype=torch.float64)
                self.rho.copy_(inverse_positive(sigma0))
            else:
                self.sigma.fill_(self.spec.sigma0)

    def kl(self, mu_q: Tensor, sigma_q: Tensor) -> Tensor:
        """sum_i KL(N(mu_q[i], sigma_q[i]^2) || prior), a scalar; mu_q, sigma_q: any shape."""
        return kl_normal_sum(mu_q, sigma_q, self.mu, self.sigma)

    def kl_fused(self, mu_q: Tensor, sigma_q: Tensor) -> Tensor:
        """:meth:`kl` with analytic gradients (faster; what the layers use)."""
        return kl_normal_sum_fused(mu_q, sigma_q, self.mu, self.sigma)

    @torch.no_grad()
    def empirical_bayes_(self, mu_q: Tensor, sigma_q: Tensor) -> None:
        """Set the prior to the minimiser of :meth:`kl` for the given posteriors (any shape).

        mu_p = mean(mu_q), sigma_p^2 = mean(sigma_q^2 + (mu_q - mu_p)^2), summed in float64.
        """
        if self.rho is None:
            raise BnnError.invalid("empirical_bayes_ needs a learnable prior (this one is fixed)")
        if mu_q.numel() == 0:
            raise BnnError.invalid("empirical_bayes_ needs at least one posterior (got none)")
        mu_p = mu_q.mean(dtype=torch.float64)
        d = mu_q - mu_p.to(mu_q.dtype)
        var_p = torch.addcmul(sigma_q.square(), d, d).mean(dtype=torch.float64)
        if not bool(torch.isfinite(mu_p + var_p)):  # one device sync
            raise BnnError.invalid(
                "empirical_bayes_ got non-finite posteriors "
                f"(mean mu={float(mu_p)!r}, mean second moment={float(var_p)!r})"
            )
        sigma_p = var_p.sqrt().clamp_min(10 * SIGMA_FLOOR)  # > floor: invertible
        self.mu.copy_(mu_p.reshape(1))
        self.rho.copy_(_inverse_positive_unchecked(sigma_p).reshape(1))

    def log_hyperprior(self) -> Tensor:
        """log InvGamma(sigma^2 | alpha, beta) when hierarchical, else 0; a scalar.

        log p(v) = alpha log beta - lgamma(alpha) - (alpha + 1) log v - beta / v, v = sigma^2.
        """
        if self.mode is not LearnMode.HIERARCHICAL:
            return self.mu.new_zeros(())
        alpha, beta = self.spec.hyper_alpha, self.spec.resolved_hyper_beta
        sigma = self.sigma.reshape(())
        log_var = 2 * torch.log(sigma)
        const = alpha * math.log(beta) - math.lgamma(alpha)
        return const - (alpha + 1) * log_var - beta / sigma.square()

    def extra_repr(self) -> str:
        text = f"kind={self.spec.kind.value}"
        if self.mode is not None:
            text += f", mode={self.mode.value}"
            if self.mode is LearnMode.EMPIRICAL_BAYES:
                text += f", eb_every={self.eb_every.value}"
            if self.mode is LearnMode.HIERARCHICAL:
                text += (
                    f", hyper_alpha={self.spec.hyper_alpha:g}"
                    f", hyper_beta={self.spec.resolved_hyper_beta:g}"
                )
        with torch.no_grad():
            return text + f", mu={float(self.mu):.4g}, sigma={float(self.sigma):.4g}"
