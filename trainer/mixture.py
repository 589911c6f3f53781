"""The scale-mixture prior of Bayes by Backprop (Blundell et al. 2015), shared by a layer.

p(w) = pi N(w | mu0, sigma1^2) + (1 - pi) N(w | mu0, sigma2^2), one (pi, sigma1, sigma2) for all
elements of a parameter group: a wide component (``sigma1 = sigma0``) and a narrow one
(``sigma2 = mixture_sigma2``), both times 1/sqrt(fan_in) on the ``fan_in`` scale. Fixed: buffers.
Learnable (by gradient): ``logit_pi``, ``rho1`` and ``rho2`` are parameters.

The KL to a mixture has no closed form. :meth:`ScaleMixturePrior.kl` returns the unbiased
estimate KL = -H[q] - E_q[log p(w)] with the Gaussian entropy exact and the cross term from one
reparameterised draw w = mu + sigma * eps (lower variance than estimating both terms by
sampling). The captured ``sigma`` is the moment-matched sqrt(pi sigma1^2 + (1 - pi) sigma2^2);
the pairwise-KL analysis, which is about posteriors, is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from trainer.errors import BnnError
from trainer.prior_spec import PriorScale, PriorSpec
from trainer.priors import LayerPrior, group_index, inverse_positive, positive

__all__ = ["ScaleMixturePrior", "mixture_kl_batched"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class ScaleMixturePrior(LayerPrior):
    """pi N(mu0, sigma1^2) + (1 - pi) N(mu0, sigma2^2) shared by one parameter group."""

    logit_pi: nn.Parameter
    rho1: nn.Parameter
    rho2: nn.Parameter
    pi_: Tensor
    sigma1_: Tensor
    sigma2_: Tensor

    def __init__(self, spec: PriorSpec, *, numel: int = 1, fan_in: int = 1) -> None:
        super().__init__()
        if not isinstance(spec, PriorSpec):
            raise BnnError.invalid(f"prior must be a PriorSpec (got {spec!r})")
        self.spec = spec
        self.numel, self.fan_in = int(numel), int(fan_in)
        scaled = spec.scale is PriorScale.FAN_IN
        self.factor = 1.0 / math.sqrt(max(1, self.fan_in)) if scaled else 1.0
        self.learnable = spec.learnable
        self.mode = spec.mode if spec.learnable else None
        self.register_buffer("mu", torch.empty(1))
        if self.learnable:
            self.logit_pi = nn.Parameter(torch.empty(1))
            self.rho1 = nn.Parameter(torch.empty(1))
            self.rho2 = nn.Parameter(torch.empty(1))
        else:
            self.register_buffer("pi_", torch.empty(1))
            self.register_buffer("sigma1_", torch.empty(1))
            self.register_buffer("sigma2_", torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        s = self.spec
        with torch.no_grad():
            self.mu.fill_(s.mu0)
            if self.learnable:
                self.logit_pi.fill_(math.log(s.mixture_pi / (1 - s.mixture_pi)))
                self.rho1.copy_(inverse_positive(torch.tensor(s.sigma0, dtype=torch.float64)))
                sigma2 = torch.tensor(s.mixture_sigma2, dtype=torch.float64)
                self.rho2.copy_(inverse_positive(sigma2))
            else:
                self.pi_.fill_(s.mixture_pi)
                self.sigma1_.fill_(s.sigma0 * self.factor)
                self.sigma2_.fill_(s.mixture_sigma2 * self.factor)

    def components(self) -> tuple[Tensor, Tensor, Tensor]:
        """(pi, sigma1, sigma2), each of shape (1,)."""
        if self.learnable:
            pi = torch.sigmoid(self.logit_pi)
            return pi, positive(self.rho1) * self.factor, positive(self.rho2) * self.factor
        return self.pi_, self.sigma1_, self.sigma2_

    @property
    def sigma(self) -> Tensor:
        """Moment-matched standard deviation sqrt(pi sigma1^2 + (1 - pi) sigma2^2), shape (1,)."""
        pi, s1, s2 = self.components()
        return (pi * s1.square() + (1 - pi) * s2.square()).sqrt()

    def log_prob(self, w: Tensor) -> Tensor:
        """Elementwise log p(w), computed stably with logsumexp."""
        pi, s1, s2 = (t.reshape(()) for t in self.components())
        z = w - self.mu.reshape(())
        comp1 = torch.log(pi) - torch.log(s1) - 0.5 * (z / s1).square()
        comp2 = torch.log1p(-pi) - torch.log(s2) - 0.5 * (z / s2).square()
        return torch.logaddexp(comp1, comp2) - _LOG_SQRT_2PI

    def kl(self, mu_q: Tensor, sigma_q: Tensor) -> Tensor:
        """Unbiased one-sample estimate of sum_i KL(N(mu_i, sigma_i^2) || p), a scalar."""
        n = mu_q.numel()
        w = torch.addcmul(mu_q, sigma_q, torch.randn_like(sigma_q))
        neg_entropy = -torch.log(sigma_q).sum(dtype=torch.float64) - n * (0.5 + _LOG_SQRT_2PI)
        cross = self.log_prob(w).sum(dtype=torch.float64)
        return (neg_entropy - cross).to(mu_q.dtype)

    def extra_repr(self) -> str:
        with torch.no_grad():
            pi, s1, s2 = (float(t) for t in self.components())
        text = f"kind={self.spec.kind.value}, family=scale_mixture"
        if self.spec.scale is not PriorScale.ABSOLUTE:
            text += f", scale={self.spec.scale.value} (fan_in={self.fan_in})"
        return text + f", pi={pi:.4g}, sigma1={s1:.4g}, sigma2={s2:.4g}"


def mixture_kl_batched(groups: Sequence[tuple[ScaleMixturePrior, Tensor, Tensor]]) -> Tensor:
    """sum over ``(prior, mu_q, sigma_q)`` groups of ``prior.kl(mu_q, sigma_q)``, a scalar.

    The same one-sample estimate, computed once over the concatenated elements (one draw of
    eps for all groups, each element scored under its own group's mixture): a fixed number
    of operations instead of about twenty per group, which is what small layers and biases
    cost (see :func:`trainer.priors.kl_normal_sum_batched`). All groups on one device and of
    one dtype.
    """
    if not groups:
        raise BnnError.invalid("mixture_kl_batched needs at least one group (got none)")
    mu_q = torch.cat([g[1].reshape(-1) for g in groups])
    sigma_q = torch.cat([g[2].reshape(-1) for g in groups])
    parts = [g[0].components() for g in groups]
    pi, s1, s2 = (torch.cat([c[k].reshape(1) for c in parts]) for k in range(3))
    mu_p = torch.cat([g[0].mu.reshape(1) for g in groups])
    _, index = group_index(tuple(g[1].numel() for g in groups), mu_q.device)
    n = mu_q.numel()
    w = torch.addcmul(mu_q, sigma_q, torch.randn_like(sigma_q))
    z = w - mu_p.index_select(0, index)
    comp1 = (torch.log(pi) - torch.log(s1)).index_select(0, index) - 0.5 * (
        z / s1.index_select(0, index)
    ).square()
    comp2 = (torch.log1p(-pi) - torch.log(s2)).index_select(0, index) - 0.5 * (
        z / s2.index_select(0, index)
    ).square()
    cross = torch.logaddexp(comp1, comp2).sum(dtype=torch.float64) - n * _LOG_SQRT_2PI
    neg_entropy = -torch.log(sigma_q).sum(dtype=torch.float64) - n * (0.5 + _LOG_SQRT_2PI)
    return (neg_entropy - cross).to(mu_q.dtype)
