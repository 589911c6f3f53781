"""What a layer prior is: the options of :class:`PriorSpec` (the interface every prior has,
:class:`~trainer.priors.LayerPrior`, lives in :mod:`trainer.priors`).

A spec builds one prior per parameter group (a layer's weights; separately its biases):

* ``kind``: ``fixed`` (never trained) or ``learnable``;
* ``family``: ``gaussian`` N(mu, sigma^2), or ``scale_mixture``
  pi N(mu, sigma1^2) + (1 - pi) N(mu, sigma2^2) (Blundell et al. 2015; ``sigma0`` is sigma1,
  ``mixture_sigma2`` sigma2); the mixture's KL has no closed form and is estimated by Monte Carlo;
* ``scale``: ``absolute`` (sigma = sigma0) or ``fan_in`` (sigma = c / sqrt(fan_in) with
  c = sigma0 initially; learnable priors learn c), so one value suits layers of any width;
* ``mode`` (learnable only): ``gradient`` (jointly with the posteriors, in the optimiser group
  of :class:`~trainer.config.TrainConfig` ``prior_lr`` / ``prior_optimizer``),
  ``empirical_bayes`` (closed form, after a burn-in, every step or epoch), ``hierarchical``
  (gradient plus an inverse-gamma hyperprior on the prior variance whose strength grows with the
  group: ``hyper_strength`` pseudo-observations per element unless ``hyper_alpha`` is given), or
  ``laplace`` (the trainer sets sigma from a Laplace/GGN marginal-likelihood estimate every
  K epochs; Immer et al. 2021);
* ``learn_mean``: learn the prior mean too (default False: weights shrink towards ``mu0``);
* ``min_group``: a learnable prior on a group of fewer elements than this falls back to a fixed
  prior of the same family and scale (a learned prior on one bias would make its KL vanish).

sigma is always a standard deviation; variance = sigma^2. This module imports no torch, so the
command line and :mod:`trainer.config` can use the options without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import Any, TypeVar

from trainer.errors import BnnError

__all__ = [
    "DEFAULT_PRIOR",
    "SIGMA_FLOOR",
    "EBSchedule",
    "LearnMode",
    "PriorFamily",
    "PriorKind",
    "PriorScale",
    "PriorSpec",
    "as_enum",
]

SIGMA_FLOOR = 1e-8
"""Added to softplus(rho), so no sigma is ever exactly 0 (and log(sigma) stays finite)."""


class PriorKind(StrEnum):
    """Whether the layer prior is a fixed distribution or learned."""

    FIXED = "fixed"
    LEARNABLE = "learnable"


class LearnMode(StrEnum):
    """How a learnable prior is learned (see the module docstring)."""

    GRADIENT = "gradient"
    EMPIRICAL_BAYES = "empirical_bayes"
    HIERARCHICAL = "hierarchical"
    LAPLACE = "laplace"


class PriorFamily(StrEnum):
    """The prior's distribution: one Gaussian, or Blundell's two-Gaussian scale mixture."""

    GAUSSIAN = "gaussian"
    SCALE_MIXTURE = "scale_mixture"


class PriorScale(StrEnum):
    """``absolute``: sigma = sigma0; ``fan_in``: sigma = sigma0 / sqrt(fan_in)."""

    ABSOLUTE = "absolute"
    FAN_IN = "fan_in"


class EBSchedule(StrEnum):
    """When the trainer applies the closed-form empirical-Bayes update."""

    STEP = "step"
    EPOCH = "epoch"


_E = TypeVar("_E", bound=Enum)


def as_enum(enum: type[_E], value: Any, name: str) -> _E:
    """``enum(value)``, or INVALID_ARGUMENT naming ``name``, the value and the options."""
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
    """

    kind: PriorKind = PriorKind.LEARNABLE
    mode: LearnMode = LearnMode.GRADIENT
    mu0: float = 0.0
    sigma0: float = 1.0
    eb_every: EBSchedule = EBSchedule.STEP
    hyper_alpha: float | None = None
    hyper_beta: float | None = None
    family: PriorFamily = PriorFamily.GAUSSIAN
    scale: PriorScale = PriorScale.ABSOLUTE
    learn_mean: bool = False
    min_group: int = 10
    hyper_strength: float = 1.0
    mixture_pi: float = 0.5
    mixture_sigma2: float = math.exp(-6)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "kind", as_enum(PriorKind, self.kind, "kind"))
        set_(self, "mode", as_enum(LearnMode, self.mode, "mode"))
        set_(self, "eb_every", as_enum(EBSchedule, self.eb_every, "eb_every"))
        set_(self, "family", as_enum(PriorFamily, self.family, "family"))
        set_(self, "scale", as_enum(PriorScale, self.scale, "scale"))
        set_(self, "mu0", _finite(self.mu0, "mu0", positive_only=False))
        for name in ("sigma0", "mixture_sigma2"):
            value = _finite(getattr(self, name), name, positive_only=True)
            if value <= 10 * SIGMA_FLOOR:
                raise BnnError.invalid(f"{name} must be > {10 * SIGMA_FLOOR:g} (got {value!r})")
            set_(self, name, value)
        set_(
            self,
            "hyper_strength",
            _finite(self.hyper_strength, "hyper_strength", positive_only=True),
        )
        for name in ("hyper_alpha", "hyper_beta"):
            if getattr(self, name) is not None:
                set_(self, name, _finite(getattr(self, name), name, positive_only=True))
        pi = _finite(self.mixture_pi, "mixture_pi", positive_only=True)
        if not 0 < pi < 1:
            raise BnnError.invalid(f"mixture_pi must be in (0, 1) (got {pi!r})", mixture_pi=pi)
        set_(self, "mixture_pi", pi)
        if (
            isinstance(self.min_group, bool)
            or not isinstance(self.min_group, int)
            or self.min_group < 1
        ):
            raise BnnError.invalid(
                f"min_group must be a positive integer (got {self.min_group!r})",
                min_group=self.min_group,
            )
        set_(self, "learn_mean", bool(self.learn_mean))
        mixture = self.family is PriorFamily.SCALE_MIXTURE
        if self.learnable and mixture and self.mode is not LearnMode.GRADIENT:
            raise BnnError.invalid(
                "a learnable scale-mixture prior is learned by gradient only "
                f"(got mode {self.mode.value!r})",
                mode=self.mode.value,
            )

    @property
    def learnable(self) -> bool:
        return self.kind is PriorKind.LEARNABLE

    def hyperprior(self, numel: int, base_sigma: float) -> tuple[float, float]:
        """(alpha, beta) of the inverse-gamma hyperprior on a group of ``numel`` elements.

        alpha = ``hyper_alpha`` or ``hyper_strength * numel / 2`` (worth ``hyper_strength``
        pseudo-observations per element, so it constrains a 300,000-weight layer as much as a
        10-element one); beta = ``hyper_beta`` or ``(alpha + 1) * base_sigma^2`` (mode at the
        initial prior variance).
        """
        alpha = (
            self.hyper_alpha if self.hyper_alpha is not None else self.hyper_strength * numel / 2
        )
        alpha = max(alpha, 1e-3)
        beta = self.hyper_beta if self.hyper_beta is not None else (alpha + 1.0) * base_sigma**2
        return alpha, beta

    def for_group(self, numel: int) -> PriorSpec:
        """This spec, or its fixed fallback when a learnable group has < ``min_group`` elements."""
        if self.learnable and numel < self.min_group:
            return replace(self, kind=PriorKind.FIXED)
        return self

    @classmethod
    def fixed(cls, mu0: float = 0.0, sigma0: float = 1.0, **kwargs: Any) -> PriorSpec:
        """A fixed prior (N(mu0, sigma0^2) unless ``kwargs`` change the family or scale)."""
        return cls(PriorKind.FIXED, mu0=mu0, sigma0=sigma0, **kwargs)

    def describe(self) -> str:
        """Short text, e.g. ``"learnable/gradient"``, ``"fixed/scale_mixture/fan_in"``."""
        text = f"learnable/{self.mode.value}" if self.learnable else "fixed"
        if self.family is not PriorFamily.GAUSSIAN:
            text += f"/{self.family.value}"
        if self.scale is not PriorScale.ABSOLUTE:
            text += f"/{self.scale.value}"
        return text


DEFAULT_PRIOR = PriorSpec()
"""The default: a learnable zero-mean Gaussian prior, initially sigma 1, learned by gradient."""
