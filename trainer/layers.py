"""Bayesian linear and convolutional layers with a Gaussian posterior per weight and per bias.

Every weight and bias element w_i has a posterior q(w_i) = N(mu_i, sigma_i^2), stored as
``*_mu`` and the unconstrained ``*_rho`` with sigma_i = :func:`positive` (rho_i) =
softplus(rho_i) + 1e-8. All weights of a layer share one prior (``weight_prior``) and all its
biases another (``bias_prior``); see :mod:`trainer.priors`.

``forward`` returns a tensor only. In training it draws a fresh sample per call with the
reparameterisation trick, w = mu + sigma * eps, eps ~ N(0, I) (``BayesLinear(local_reparam=True)``
samples the pre-activations instead: mean = x W_mu^T + b_mu, variance = x^2 (W_sigma^2)^T +
b_sigma^2). With ``layer.use_mean = True`` (or ``with use_mean(model):``) it uses the means and is
deterministic.

The ELBO, used everywhere in this project
-----------------------------------------
For a mini-batch of a training set of ``N_train`` examples the loss minimised per step is::

    loss = NLL + kl_weight * (KL + prior_penalty) / N_train

* ``NLL``: -log p(y | x, w) averaged over the batch (and over the MC samples of w);
* ``KL = model_kl(model)``: closed-form KL(q || p) summed over every weight and bias element of
  every Bayesian layer (:meth:`BayesianLayer.kl`), not averaged;
* ``prior_penalty = prior_penalty(model)``: -sum of log hyperprior densities of hierarchical
  priors (0 for fixed, gradient and empirical-Bayes priors);
* ``kl_weight``: 1 for the exact ELBO (KL annealing ramps it from 0 to 1).

With kl_weight = 1 the loss is -ELBO / N_train (plus the hyperprior term).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from trainer import kernels
from trainer.errors import BnnError
from trainer.mixture import ScaleMixturePrior, mixture_kl_batched
from trainer.priors import (
    BATCHED_KL_MAX_NUMEL,
    DEFAULT_PRIOR,
    EBSchedule,
    GaussianPrior,
    LayerPrior,
    LearnMode,
    PriorFamily,
    PriorSpec,
    inverse_positive,
    kl_normal_sum_batched,
    log_hyperprior_batched,
    positive,
)

__all__ = [
    "BayesConv2d",
    "BayesLinear",
    "BayesianLayer",
    "bayesian_layers",
    "empirical_bayes_step",
    "inverse_positive",
    "kl_by_layer",
    "make_prior",
    "model_kl",
    "positive",
    "prior_penalty",
    "resolved_priors",
    "use_mean",
]

_MIN_SIGMA_INIT = 1e-6
_VAR_FLOOR = 1e-16  # keeps sqrt differentiable where a pre-activation variance is exactly 0


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise BnnError.invalid(
            f"{name} must be a positive integer (got {value!r})", **{name: value}
        )
    return int(value)


def _sigma_init(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < _MIN_SIGMA_INIT:
        raise BnnError.invalid(
            "posterior_sigma_init must be a finite standard deviation >= "
            f"{_MIN_SIGMA_INIT:g} (got {value!r})",
            posterior_sigma_init=value,
        )
    return float(value)


def _pair_of(value: Any, name: str, *, minimum: int) -> tuple[int, int]:
    pair = _pair(value)
    ok = len(pair) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair
    )
    if not ok:
        raise BnnError.invalid(
            f"{name} must be an int >= {minimum} or a pair of them (got {value!r})",
            **{name: value},
        )
    return (int(pair[0]), int(pair[1]))


def _sample(mu: Tensor, sigma: Tensor) -> Tensor:
    """One reparameterised draw mu + sigma * eps, eps ~ N(0, I), same shape as ``mu``."""
    return torch.addcmul(mu, sigma, torch.randn_like(sigma))


def make_prior(spec: PriorSpec, *, numel: int, fan_in: int) -> LayerPrior:
    """The prior ``spec`` describes for a group of ``numel`` elements with this fan-in.

    A learnable spec on a group smaller than ``spec.min_group`` gives a fixed prior of the same
    family and scale (see :meth:`PriorSpec.for_group`).
    """
    spec = spec.for_group(numel)
    if spec.family is PriorFamily.SCALE_MIXTURE:
        return ScaleMixturePrior(spec, numel=numel, fan_in=fan_in)
    return GaussianPrior(spec, numel=numel, fan_in=fan_in)


def _drop_cached_sigma(cache: dict[str, Any], which: str, grad: Tensor) -> None:
    cache.pop(which, None)


class BayesianLayer(nn.Module):
    """Base of the Bayesian layers: posterior parameters, priors, KL and empirical Bayes.

    ``weight_mu``/``weight_rho`` have the weight's shape, ``bias_mu``/``bias_rho`` shape
    (out_features,) or are None when the layer has no bias (then ``bias_prior`` is None too).
    """

    weight_mu: nn.Parameter
    weight_rho: nn.Parameter
    bias_mu: nn.Parameter | None
    bias_rho: nn.Parameter | None
    weight_prior: LayerPrior
    bias_prior: LayerPrior | None

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        prior: PriorSpec,
        posterior_sigma_init: float,
    ) -> None:
        super().__init__()
        if not isinstance(prior, PriorSpec):
            raise BnnError.invalid(f"prior must be a PriorSpec (got {prior!r})")
        self.prior_spec = prior
        self.posterior_sigma_init = _sigma_init(posterior_sigma_init)
        self.use_mean = False
        self._sigma_cache: dict[str, tuple[tuple[int, int], Tensor]] = {}
        self.weight_mu = nn.Parameter(torch.empty(weight_shape))
        self.weight_rho = nn.Parameter(torch.empty(weight_shape))
        fan_in = math.prod(weight_shape[1:])
        self.weight_prior = make_prior(prior, numel=math.prod(weight_shape), fan_in=fan_in)
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(weight_shape[0]))
            self.bias_rho = nn.Parameter(torch.empty(weight_shape[0]))
            self.bias_prior = make_prior(prior, numel=weight_shape[0], fan_in=fan_in)
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
            self.register_module("bias_prior", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Posterior means as ``nn.Linear``/``nn.Conv2d`` initialise weights (kaiming-uniform,
        bias uniform(+-1/sqrt(fan_in))); every sigma = ``posterior_sigma_init``; priors reset."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        rho = float(inverse_positive(torch.tensor(self.posterior_sigma_init, dtype=torch.float64)))
        with torch.no_grad():
            self.weight_rho.fill_(rho)
            if self.bias_mu is not None and self.bias_rho is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight_mu)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                self.bias_mu.uniform_(-bound, bound)
                self.bias_rho.fill_(rho)
        for prior in self.priors().values():
            prior.reset_parameters()

    def _sigma(self, which: str) -> Tensor:
        """positive(rho) of ``"weight"`` or ``"bias"``, computed once per optimisation step.

        While gradients are on, the sample drawn in ``forward`` (once per MC sample) and the KL
        share one sigma node, so softplus runs once forward and once backward per step. The
        cache is keyed by rho's version (an optimiser step invalidates it) and dropped when
        backward reaches it, so no graph is ever walked twice.
        """
        rho = self.weight_rho if which == "weight" else self.bias_rho
        assert rho is not None
        cached = self._cached_sigma(rho, which)
        if cached is not None:
            return cached
        sigma = positive(rho)
        self._remember_sigma(rho, which, sigma)
        return sigma

    @staticmethod
    def _shares_sigma(rho: Tensor) -> bool:
        """Whether this step's sigma node is kept for reuse: only while gradients are on and
        outside torch.compile (a compiled graph shares the node by itself) and torch.func
        transforms (whose tensors have no storage to key the cache by)."""
        return (
            torch.is_grad_enabled()
            and rho.requires_grad
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(rho)
        )

    def _cached_sigma(self, rho: Tensor, which: str) -> Tensor | None:
        """This step's sigma node of ``which``, if one was made (see :meth:`_sigma`)."""
        cached = self._sigma_cache.get(which)
        if cached is None or not self._shares_sigma(rho):
            return None
        return cached[1] if cached[0] == (rho._version, rho.data_ptr()) else None

    def _remember_sigma(self, rho: Tensor, which: str, sigma: Tensor) -> None:
        if not self._shares_sigma(rho):
            return  # no graph to share
        sigma.register_hook(functools.partial(_drop_cached_sigma, self._sigma_cache, which))
        self._sigma_cache[which] = ((rho._version, rho.data_ptr()), sigma)

    def _draw(self, which: str) -> Tensor:
        """One reparameterised draw of ``"weight"`` or ``"bias"``: on the CPU through the
        fused kernels (:mod:`trainer.kernels`: softplus, the draw and their backward in one
        pass each, Philox random numbers on every core), else with torch operations."""
        mu = self.weight_mu if which == "weight" else self.bias_mu
        rho = self.weight_rho if which == "weight" else self.bias_rho
        assert mu is not None and rho is not None
        if not kernels.usable(mu, rho):
            return _sample(mu, self._sigma(which))
        sigma = self._cached_sigma(rho, which)
        if sigma is not None:  # a second draw this step (or the KL came first): share sigma
            return torch.addcmul(mu, sigma, kernels.normal(sigma))
        weight, sigma = kernels.sample(mu, rho)
        self._remember_sigma(rho, which, sigma)
        return weight

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sigma_cache"] = {}  # graph nodes are neither copied nor pickled
        return state

    @property
    def has_bias(self) -> bool:
        return self.bias_mu is not None

    @property
    def weight_sigma(self) -> Tensor:
        """Posterior standard deviations of the weights, the weight's shape."""
        return positive(self.weight_rho)

    @property
    def bias_sigma(self) -> Tensor | None:
        """Posterior standard deviations of the biases, shape (out,), or None."""
        return None if self.bias_rho is None else positive(self.bias_rho)

    def priors(self) -> dict[str, LayerPrior]:
        """``{"weight": weight_prior, "bias": bias_prior}`` ("bias" absent without bias)."""
        out = {"weight": self.weight_prior}
        if self.bias_prior is not None:
            out["bias"] = self.bias_prior
        return out

    def posterior(self, which: str) -> tuple[Tensor, Tensor]:
        """(mu, sigma) of the ``"weight"`` or ``"bias"`` posterior."""
        if which == "weight":
            return self.weight_mu, positive(self.weight_rho)
        if which == "bias" and self.bias_mu is not None and self.bias_rho is not None:
            return self.bias_mu, positive(self.bias_rho)
        raise BnnError.not_found(f"layer has no posterior {which!r}", which=which)

    def sample_parameters(self) -> tuple[Tensor, Tensor | None]:
        """One reparameterised draw of (weight, bias)."""
        weight = self._draw("weight")
        if self.bias_mu is None or self.bias_rho is None:
            return weight, None
        return weight, self._draw("bias")

    def kl_terms(self) -> dict[str, Tensor]:
        """Closed-form KL(q || p) summed over elements: ``{"weight": .., "bias": ..}``, scalars."""
        terms = {"weight": self.weight_prior.kl_fused(self.weight_mu, self._sigma("weight"))}
        if self.bias_prior is not None and self.bias_mu is not None:
            terms["bias"] = self.bias_prior.kl_fused(self.bias_mu, self._sigma("bias"))
        return terms

    def kl_groups(self) -> list[tuple[LayerPrior, Tensor, Tensor]]:
        """``(prior, mu_q, sigma_q)`` of the weights and (if any) the biases: what
        :meth:`kl_terms` sums, for :func:`model_kl` to batch across layers."""
        groups: list[tuple[LayerPrior, Tensor, Tensor]] = [
            (self.weight_prior, self.weight_mu, self._sigma("weight"))
        ]
        if self.bias_prior is not None and self.bias_mu is not None:
            groups.append((self.bias_prior, self.bias_mu, self._sigma("bias")))
        return groups

    def kl(self) -> Tensor:
        """KL(q || p) summed over all weight and bias elements, a scalar."""
        terms = self.kl_terms()
        total = terms["weight"]
        return total + terms["bias"] if "bias" in terms else total

    def prior_penalty(self) -> Tensor:
        """-(sum of the priors' log hyperprior densities), a scalar (0 unless hierarchical)."""
        priors = list(self.priors().values())
        total = priors[0].log_hyperprior()
        for prior in priors[1:]:
            total = total + prior.log_hyperprior()
        return -total

    def empirical_bayes_(self, schedule: EBSchedule | str | None = None) -> None:
        """Closed-form update of this layer's empirical-Bayes priors (no-op for other priors).

        With ``schedule`` given, only priors whose ``eb_every`` equals it are updated.
        """
        wanted = None if schedule is None else EBSchedule(schedule)
        with torch.no_grad():
            for name, prior in self.priors().items():
                if not isinstance(prior, GaussianPrior):
                    continue
                if prior.mode is not LearnMode.EMPIRICAL_BAYES:
                    continue
                if wanted is not None and prior.eb_every is not wanted:
                    continue
                prior.empirical_bayes_(*self.posterior(name))

    def extra_repr(self) -> str:
        return (
            f"bias={self.has_bias}, prior={self.prior_spec.describe()}, "
            f"posterior_sigma_init={self.posterior_sigma_init:g}"
        )


_KL_TERMS = BayesianLayer.kl_terms
_PRIOR_PENALTY = BayesianLayer.prior_penalty


class BayesLinear(BayesianLayer):
    """Bayesian ``nn.Linear``: input (..., in_features) -> output (..., out_features).

    ``local_reparam=True`` samples the pre-activations (one independent draw per example and unit)
    instead of one weight matrix per forward: lower-variance gradients, same expected loss.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        prior: PriorSpec = DEFAULT_PRIOR,
        posterior_sigma_init: float = 0.05,
        local_reparam: bool = False,
    ) -> None:
        n_in = _positive_int(in_features, "in_features")
        n_out = _positive_int(out_features, "out_features")
        super().__init__((n_out, n_in), bias, prior, posterior_sigma_init)
        self.in_features = n_in
        self.out_features = n_out
        self.local_reparam = bool(local_reparam)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_mean:
            return F.linear(x, self.weight_mu, self.bias_mu)
        if self.local_reparam:
            mean = F.linear(x, self.weight_mu, self.bias_mu)
            bias_var = None if self.bias_rho is None else self._sigma("bias").square()
            var = F.linear(x.square(), self._sigma("weight").square(), bias_var)
            std = var.add_(_VAR_FLOOR).sqrt_()
            noise = kernels.normal(mean) if kernels.usable(mean) else torch.randn_like(mean)
            return torch.addcmul(mean, std, noise)
        weight, bias = self.sample_parameters()
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"local_reparam={self.local_reparam}, {super().extra_repr()}"
        )


class BayesConv2d(BayesianLayer):
    """Bayesian ``nn.Conv2d`` (zero padding): input (N, C_in, H, W) -> (N, C_out, H', W').

    Weight shape (out_channels, in_channels // groups, kH, kW). One weight sample per forward
    (no local reparameterisation: output positions share weights, so it would change the loss).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        prior: PriorSpec = DEFAULT_PRIOR,
        posterior_sigma_init: float = 0.05,
    ) -> None:
        c_in = _positive_int(in_channels, "in_channels")
        c_out = _positive_int(out_channels, "out_channels")
        n_groups = _positive_int(groups, "groups")
        if c_in % n_groups or c_out % n_groups:
            raise BnnError.invalid(
                f"groups={groups!r} must divide in_channels={in_channels!r} "
                f"and out_channels={out_channels!r}",
                groups=groups,
            )
        kernel = _pair_of(kernel_size, "kernel_size", minimum=1)
        stride_ = _pair_of(stride, "stride", minimum=1)
        dilation_ = _pair_of(dilation, "dilation", minimum=1)
        padding_: tuple[int, int] | str
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise BnnError.invalid(
                    f"padding must be an int, a pair, 'same' or 'valid' (got {padding!r})",
                    padding=padding,
                )
            if padding == "same" and stride_ != (1, 1):
                raise BnnError.invalid(f"padding='same' needs stride 1 (got {stride!r})")
            padding_ = padding
        else:
            padding_ = _pair_of(padding, "padding", minimum=0)
        super().__init__((c_out, c_in // n_groups, *kernel), bias, prior, posterior_sigma_init)
        self.in_channels, self.out_channels, self.groups = c_in, c_out, n_groups
        self.kernel_size, self.stride, self.dilation = kernel, stride_, dilation_
        self.padding = padding_

    def forward(self, x: Tensor) -> Tensor:
        weight: Tensor
        bias: Tensor | None
        if self.use_mean:
            weight, bias = self.weight_mu, self.bias_mu
        else:
            weight, bias = self.sample_parameters()
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return f"{text}, {super().extra_repr()}"


# --- whole-model helpers ---------------------------------------------------------------------


def bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    """(name, layer) of every Bayesian layer in ``model.named_modules()`` order.

    A bare layer passed as ``model`` is named ``"layer"`` (its own name would be empty).
    """
    return [
        (name or "layer", m) for name, m in model.named_modules() if isinstance(m, BayesianLayer)
    ]


def _zero(model: nn.Module) -> Tensor:
    for tensor in model.parameters():
        return tensor.new_zeros(())
    return torch.zeros(())


def kl_by_layer(model: nn.Module) -> dict[str, Tensor]:
    """Layer name -> that layer's KL(q || p) (scalar tensors, in module order)."""
    return {name: layer.kl() for name, layer in bayesian_layers(model)}


def model_kl(model: nn.Module) -> Tensor:
    """The ELBO's KL term: sum of every Bayesian layer's KL, a scalar (0 without such layers).

    Gaussian-prior groups of at most ``BATCHED_KL_MAX_NUMEL`` elements (small layers, biases)
    are summed by one :func:`~trainer.priors.kl_normal_sum_batched` per device and dtype,
    larger ones by their prior's fused KL, and layers that override :meth:`BayesianLayer.kl`
    by their own method: the same value as the sum of ``layer.kl()``, with a fixed number of
    operations for the small groups instead of a dozen per group.
    """
    total = _zero(model)
    Key = tuple[torch.device, torch.dtype]
    gaussian: dict[Key, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {}
    mixture: dict[Key, list[tuple[ScaleMixturePrior, Tensor, Tensor]]] = {}
    for _, layer in bayesian_layers(model):
        if type(layer).kl is not BayesianLayer.kl or type(layer).kl_terms is not _KL_TERMS:
            total = total + layer.kl()
            continue
        for prior, mu, sigma in layer.kl_groups():
            key = (mu.device, mu.dtype)
            if mu.numel() > BATCHED_KL_MAX_NUMEL:
                total = total + prior.kl_fused(mu, sigma)
            elif type(prior) is GaussianPrior:
                gaussian.setdefault(key, []).append((mu, sigma, prior.mu, prior.sigma))
            elif type(prior) is ScaleMixturePrior:
                mixture.setdefault(key, []).append((prior, mu, sigma))
            else:
                total = total + prior.kl_fused(mu, sigma)
    for groups in gaussian.values():
        total = total + kl_normal_sum_batched(groups)
    for mixed in mixture.values():
        total = total + mixture_kl_batched(mixed)
    return total


def prior_penalty(model: nn.Module) -> Tensor:
    """The ELBO's hyperprior term: sum of every layer's ``prior_penalty()``, a scalar.

    Priors without a hyperprior (``has_hyperprior`` False: all but hierarchical ones)
    contribute exactly 0 and are skipped, so a model without any costs one operation.
    """
    total = _zero(model)
    hierarchical: dict[tuple[torch.device, torch.dtype], list[GaussianPrior]] = {}
    for _, layer in bayesian_layers(model):
        if type(layer).prior_penalty is not _PRIOR_PENALTY:
            total = total + layer.prior_penalty()
            continue
        for prior in layer.priors().values():
            if type(prior) is GaussianPrior and prior.has_hyperprior and prior.rho is not None:
                hierarchical.setdefault((prior.rho.device, prior.rho.dtype), []).append(prior)
            elif prior.has_hyperprior:
                total = total - prior.log_hyperprior()
    for priors in hierarchical.values():
        total = total - log_hyperprior_batched(priors)
    return total


def resolved_priors(model: nn.Module) -> dict[str, str]:
    """``"layer.weight"`` / ``"layer.bias"`` -> the prior that group got (after the
    ``min_group`` fallback), e.g. ``"learnable/gradient"`` or ``"fixed (1 < min_group 10)"``."""
    out = {}
    for name, layer in bayesian_layers(model):
        for which, prior in layer.priors().items():
            text = prior.spec.describe()
            if layer.prior_spec.learnable and not prior.spec.learnable:
                text += f" ({prior.numel} < min_group {prior.spec.min_group})"
            out[f"{name}.{which}"] = text
    return out


def empirical_bayes_step(model: nn.Module, schedule: EBSchedule | str | None = None) -> None:
    """Apply the closed-form update to every empirical-Bayes prior of ``model``.

    The trainer calls it with ``EBSchedule.STEP`` after each optimiser step and with
    ``EBSchedule.EPOCH`` after each epoch; ``schedule=None`` updates all of them.
    """
    for _, layer in bayesian_layers(model):
        layer.empirical_bayes_(schedule)


@contextmanager
def use_mean(model: nn.Module, flag: bool = True) -> Iterator[nn.Module]:
    """Within the block every Bayesian layer of ``model`` uses its posterior means (``flag``);
    the previous settings are restored afterwards."""
    layers = [layer for _, layer in bayesian_layers(model)]
    before = [layer.use_mean for layer in layers]
    for layer in layers:
        layer.use_mean = flag
    try:
        yield model
    finally:
        for layer, old in zip(layers, before, strict=True):
            layer.use_mean = old
