"""Per-layer prior sigmas from a Laplace / GGN estimate of the marginal likelihood.

:func:`laplace_prior_sigmas` follows Immer et al. (2021), "Scalable marginal likelihood
estimation for model selection in deep learning": around the current posterior means theta (the
``weight_mu``/``bias_mu`` of every Bayesian layer) the log evidence of the training data is
approximated by::

    log p(D) ~ log p(D | theta) - 1/2 sum_t [ precision_t ||theta_t - mu_t||^2
                                             - P_t log precision_t ]
               - 1/2 log det(GGN + diag(precision))

with one prior precision per parameter tensor t (a layer's weights and, separately, its biases;
P_t elements, prior mean mu_t = the layer's current prior mean). The precisions that maximise it
are found by the ``laplace-torch`` library (its ``prior_structure="layerwise"`` means one
precision per parameter tensor, in ``model.parameters()`` order) and returned as prior standard
deviations sigma_t = 1 / sqrt(precision_t).

The library needs ordinary ``nn.Linear``/``nn.Conv2d`` modules, so the estimate runs on a
deterministic twin of the model whose weights are the posterior means; the model itself is not
changed. ``laplace-torch`` is an optional dependency (``pip install 'bnn-infosharing[laplace]'``),
imported only when the function runs.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict
from enum import StrEnum
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from trainer.errors import BnnError, ErrorCode
from trainer.layers import BayesConv2d, BayesianLayer, BayesLinear, bayesian_layers
from trainer.prior_spec import as_enum

__all__ = ["INSTALL_COMMAND", "HessianStructure", "Likelihood", "laplace_prior_sigmas"]

INSTALL_COMMAND = "pip install -c constraints.txt 'laplace-torch>=0.3,<0.4'"
"""How to install the optional dependency (constraints.txt keeps the pinned torch)."""


class Likelihood(StrEnum):
    """The data likelihood: categorical on logits, or Gaussian with a known noise sigma."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class HessianStructure(StrEnum):
    """Structure of the generalised Gauss-Newton (GGN) approximation of the Hessian.

    ``kron``: Kronecker-factored per parameter tensor (K-FAC, exact GGN factors); it keeps the
    correlations between a layer's weights, which the evidence needs (Immer et al. 2021).
    ``diag``: the exact GGN diagonal; cheaper in memory for very wide layers, but by Hadamard's
    inequality it overstates log det and so favours larger precisions.
    """

    KRON = "kron"
    DIAG = "diag"


# Modules without parameters that the twin may contain (besides nn.Sequential containers).
_STATELESS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Softplus,
    nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout,
)  # fmt: skip
_SUPPORTED = "nn.Sequential of BayesLinear, BayesConv2d, activations, pooling, Flatten, Dropout"


def _import_laplace() -> tuple[Any, dict[HessianStructure, Any]]:
    """(laplace.Laplace, structure -> curvature backend class), or BnnError UNAVAILABLE."""
    try:
        with warnings.catch_warnings():  # asdl's torch.jit.script use warns at import
            warnings.simplefilter("ignore", FutureWarning)
            from laplace import Laplace
            from laplace.curvature import AsdlGGN, CurvlinopsGGN
    except ImportError as exc:
        raise BnnError(
            ErrorCode.UNAVAILABLE,
            f"laplace_prior_sigmas needs the laplace-torch package ({exc}); install it with: "
            f"{INSTALL_COMMAND}",
            install=INSTALL_COMMAND,
        ) from exc
    # The default curvlinops backend builds the GGN diagonal from full per-example Jacobians
    # (batch x outputs x parameters floats: GBs for an MNIST MLP); ASDL computes it by
    # backpropagation and, unlike BackPACK, works with every activation of trainer.models.
    return Laplace, {HessianStructure.KRON: CurvlinopsGGN, HessianStructure.DIAG: AsdlGGN}


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise BnnError.invalid(
            f"{name} must be a positive integer (got {value!r})", **{name: value}
        )
    return int(value)


def _twin_layer(layer: BayesianLayer) -> nn.Module:
    """``nn.Linear``/``nn.Conv2d`` with the posterior means of ``layer`` as its weights."""
    mu = layer.weight_mu.detach()
    with_bias = layer.bias_mu is not None
    new: nn.Linear | nn.Conv2d
    if isinstance(layer, BayesLinear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=with_bias)
    elif isinstance(layer, BayesConv2d):
        new = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=with_bias,
        )  # fmt: skip
    else:
        raise BnnError.invalid(f"no deterministic twin for {type(layer).__name__}")
    new.to(device=mu.device, dtype=mu.dtype)
    with torch.no_grad():
        new.weight.copy_(mu)
        if layer.bias_mu is not None and new.bias is not None:
            new.bias.copy_(layer.bias_mu.detach())
    return new


def _twin(module: nn.Module, name: str, done: dict[int, nn.Module]) -> nn.Module:
    """The deterministic twin of ``module`` (same child names, a shared layer stays shared),
    BnnError if unsupported."""
    if isinstance(module, BayesianLayer):
        if id(module) not in done:
            done[id(module)] = _twin_layer(module)
        return done[id(module)]
    if type(module) is nn.Sequential:
        children = OrderedDict(
            (child_name, _twin(child, f"{name}.{child_name}" if name else child_name, done))
            for child_name, child in module._modules.items()  # every slot, shared ones too
        )
        return nn.Sequential(children)
    if type(module) in _STATELESS:
        return copy.deepcopy(module)  # no parameters: a cheap copy
    where = f"module {name!r}" if name else "the model"
    raise BnnError.invalid(
        f"laplace_prior_sigmas supports {_SUPPORTED}; {where} is a {type(module).__name__}",
        module=name,
        type=type(module).__name__,
    )


def _tensor_names(twin: nn.Module) -> list[tuple[str, str]]:
    """(layer name, "weight"|"bias") of every twin parameter, in ``twin.parameters()`` order."""
    by_id: dict[int, tuple[str, str]] = {}
    for name, module in twin.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            layer = name or "layer"  # a bare Bayesian layer is named "layer" (bayesian_layers)
            by_id[id(module.weight)] = (layer, "weight")
            if module.bias is not None:
                by_id[id(module.bias)] = (layer, "bias")
    return [by_id[id(p)] for p in twin.parameters()]


def _prior_means(model: nn.Module, names: list[tuple[str, str]], twin: nn.Module) -> Tensor:
    """The layers' current prior means, one per twin parameter element (flattened)."""
    layers = dict(bayesian_layers(model))
    parts = []
    for (layer, which), p in zip(names, twin.parameters(), strict=True):
        mu = layers[layer].priors()[which].mu.detach().reshape(())
        parts.append(mu.to(device=p.device, dtype=p.dtype).expand(p.numel()))
    return torch.cat(parts)


def _init_precisions(model: nn.Module, names: list[tuple[str, str]]) -> Tensor:
    """1 / sigma^2 of the layers' current priors, one per parameter tensor (warm start)."""
    layers = dict(bayesian_layers(model))
    sigmas = [float(layers[layer].priors()[which].sigma.detach()) for layer, which in names]
    return torch.tensor([1.0 / s**2 if math.isfinite(s) and s > 0 else 1.0 for s in sigmas])


def _noise_sigma(value: Any, likelihood: Likelihood) -> float | None:
    """The validated noise sigma: a finite float > 0 for regression, None for classification."""
    if likelihood is Likelihood.CLASSIFICATION:
        if value is not None:
            raise BnnError.invalid(
                f"noise_sigma is for regression only (got {value!r} with classification)",
                noise_sigma=value,
            )
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise BnnError.invalid(
            f"regression needs a finite noise_sigma > 0 (got {value!r})", noise_sigma=value
        )
    return float(value)


def _check_data(x: Tensor, y: Tensor, likelihood: Likelihood) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise BnnError.invalid("x and y must be tensors")
    if x.ndim < 2 or x.shape[0] == 0 or y.shape[:1] != x.shape[:1]:
        raise BnnError.invalid(
            f"x must be (N, ...) and y (N, ...) with the same N >= 1 "
            f"(got x {tuple(x.shape)}, y {tuple(y.shape)})"
        )
    if likelihood is Likelihood.CLASSIFICATION and (y.ndim != 1 or y.is_floating_point()):
        raise BnnError.invalid(
            f"classification needs integer class labels y of shape (N,) "
            f"(got {y.dtype} {tuple(y.shape)})"
        )
    if likelihood is Likelihood.REGRESSION and y.ndim != 2:
        raise BnnError.invalid(
            f"regression needs targets y of shape (N, outputs) (got {tuple(y.shape)})"
        )


def laplace_prior_sigmas(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    likelihood: str,
    noise_sigma: float | None = None,
    max_examples: int = 5000,
    batch_size: int = 500,
    hessian_structure: str = "kron",
    seed: int = 0,
    n_train: int | None = None,
    n_steps: int = 300,
    lr: float = 0.1,
) -> dict[str, dict[str, float]]:
    """Prior sigmas maximising the Laplace-GGN marginal likelihood at the posterior means.

    Args:
        model: a Bayesian model of :mod:`trainer.models` (an ``nn.Sequential`` of
            ``BayesLinear``/``BayesConv2d``, activations, pooling, Flatten) or a bare layer.
        x: training inputs (N, ...); y: class labels (N,) int64 for ``"classification"``,
            targets (N, outputs) for ``"regression"``.
        likelihood: ``"classification"`` (softmax on the outputs) or ``"regression"``
            (Gaussian with standard deviation ``noise_sigma``, required there).
        max_examples: the GGN is computed on a random subset of at most this many examples
            (chosen with ``seed``) and scaled by ``n_train / subset size``, an unbiased estimate
            of the GGN of ``n_train`` examples (default ``n_train = N``: x is the training set).
        batch_size: examples per curvature batch (memory only, not the result).
        hessian_structure: ``"kron"`` (K-FAC, default) or ``"diag"``; see
            :class:`HessianStructure`.
        n_steps, lr: Adam steps and learning rate on the log precisions (laplace-torch's
            ``method="marglik"``), started from the layers' current prior sigmas.

    Each tensor's prior mean stays the layer's current prior ``mu`` (the evidence's scatter
    term is precision * ||theta - mu||^2). Cost on 2 CPU cores for a 784-400-400-10 MLP and
    5000 examples: about 1.8 s ("kron" or "diag"), plus about 2.6 s for the first import.

    Returns:
        ``{layer_name: {"weight": sigma, "bias": sigma}}`` for every Bayesian layer, named as
        :func:`trainer.layers.bayesian_layers` names them ("bias" absent without a bias).

    Raises:
        BnnError: INVALID_ARGUMENT for a bad option, data or an unsupported module; UNAVAILABLE
            when laplace-torch is not installed.
    """
    lik = as_enum(Likelihood, likelihood, "likelihood")
    structure = as_enum(HessianStructure, hessian_structure, "hessian_structure")
    limit = _positive_int(max_examples, "max_examples")
    batch = _positive_int(batch_size, "batch_size")
    steps = _positive_int(n_steps, "n_steps")
    noise = _noise_sigma(noise_sigma, lik)
    if isinstance(lr, bool) or not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise BnnError.invalid(f"lr must be a finite number > 0 (got {lr!r})", lr=lr)
    if not isinstance(model, nn.Module):
        raise BnnError.invalid(f"model must be an nn.Module (got {type(model).__name__})")
    _check_data(x, y, lik)
    n_used = min(limit, len(x))
    n_total = len(x) if n_train is None else _positive_int(n_train, "n_train")
    if n_total < n_used:
        raise BnnError.invalid(
            f"n_train={n_train!r} is smaller than the {n_used} examples used", n_train=n_train
        )

    twin = _twin(model, "", {})
    names = _tensor_names(twin)
    if not names:
        raise BnnError.invalid(f"{type(model).__name__} has no Bayesian layer")
    means = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
    if not bool(torch.isfinite(means).all()):
        raise BnnError.invalid("the posterior means contain NaN or Inf")

    Laplace, backends = _import_laplace()
    param = next(twin.parameters())
    if n_used < len(x):
        generator = torch.Generator().manual_seed(int(seed))
        index = torch.randperm(len(x), generator=generator)[:n_used].to(x.device)
        x, y = x[index], y[index]
    x = x.to(device=param.device, dtype=param.dtype)
    y = y.to(device=param.device, dtype=param.dtype if lik is Likelihood.REGRESSION else y.dtype)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)

    kwargs: dict[str, Any] = {} if noise is None else {"sigma_noise": noise}
    la = Laplace(
        twin,
        lik.value,
        subset_of_weights="all",
        hessian_structure=structure.value,
        backend=backends[structure],
        prior_mean=_prior_means(model, names, twin),
        # GGN * n_total / n_used: temperature T divides the likelihood's curvature
        temperature=n_used / n_total,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*link_approx.*")  # predictive-only advice
        # ASDL's diagonal GGN hooks modules with register_backward_hook (deprecated in torch)
        warnings.filterwarnings(
            "ignore", message=".*non-full backward hook.*", category=FutureWarning
        )
        la.fit(loader)
        la.optimize_prior_precision(
            pred_type="glm",
            method="marglik",
            prior_structure="layerwise",
            init_prior_prec=_init_precisions(model, names).to(param.device, param.dtype),
            n_steps=steps,
            lr=float(lr),
        )
    precisions = la.prior_precision.detach().to("cpu", torch.float64)
    if precisions.shape != (len(names),) or not bool(torch.isfinite(precisions).all()):
        raise BnnError.invalid(
            f"the marginal-likelihood optimisation gave invalid precisions {precisions.tolist()}"
        )
    out: dict[str, dict[str, float]] = {}
    for (layer, which), precision in zip(names, precisions.tolist(), strict=True):
        out.setdefault(layer, {})[which] = 1.0 / math.sqrt(precision)
    return out
