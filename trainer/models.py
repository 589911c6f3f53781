"""Model builders: Bayesian MLPs and a small CNN, and conversion of ordinary networks.

Bayesian layers of :func:`mlp` are named ``layer1`` .. ``layerK`` (K = len(widths) + 1) and its
activations ``act1`` .. ``act{K-1}``; these names are the layer names in logs and epoch files.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from trainer.activations import Activation
from trainer.errors import BnnError
from trainer.layers import BayesConv2d, BayesianLayer, BayesLinear
from trainer.priors import DEFAULT_PRIOR, PriorSpec

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "bayesianize",
    "deterministic_mlp",
    "make_activation",
    "mlp",
    "small_cnn",
]


ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.RELU: nn.ReLU,
    Activation.TANH: nn.Tanh,
    Activation.SIGMOID: nn.Sigmoid,
    Activation.GELU: nn.GELU,
    Activation.ELU: nn.ELU,
    Activation.LEAKY_RELU: nn.LeakyReLU,
    Activation.SILU: nn.SiLU,
    Activation.SOFTPLUS: nn.Softplus,
}


def make_activation(name: str | Activation) -> nn.Module:
    """A new activation module by name; BnnError naming the value if unknown."""
    try:
        key = Activation(name)
    except ValueError:
        options = ", ".join(repr(a.value) for a in Activation)
        raise BnnError.invalid(
            f"activation must be one of {options} (got {name!r})", activation=name
        ) from None
    return ACTIVATIONS[key]()


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise BnnError.invalid(
            f"{name} must be a positive integer (got {value!r})", **{name: value}
        )
    return int(value)


def _sizes(in_features: Any, widths: Any, out_features: Any) -> list[int]:
    """[in_features, *widths, out_features], validated."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence):
        raise BnnError.invalid(
            f"widths must be a sequence of positive integers (got {widths!r})", widths=widths
        )
    hidden = []
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, Integral) or width <= 0:
            raise BnnError.invalid(
                f"widths must be positive integers (got {width!r} in {list(widths)!r})",
                widths=list(widths),
            )
        hidden.append(int(width))
    return [_positive(in_features, "in_features"), *hidden, _positive(out_features, "out_features")]


def mlp(
    in_features: int,
    widths: Sequence[int],
    out_features: int,
    prior: PriorSpec = DEFAULT_PRIOR,
    *,
    activation: str | Activation = "relu",
    local_reparam: bool = False,
    posterior_sigma_init: float = 0.05,
) -> nn.Sequential:
    """Bayesian MLP ``in_features -> widths... -> out_features`` (input (N, in_features)).

    ``widths`` may be empty (one Bayesian layer). Every layer gets its own priors from ``prior``.
    """
    sizes = _sizes(in_features, widths, out_features)
    make_activation(activation)  # validate before building anything
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    n_layers = len(sizes) - 1
    for i in range(1, n_layers + 1):
        modules[f"layer{i}"] = BayesLinear(
            sizes[i - 1], sizes[i], prior=prior,
            posterior_sigma_init=posterior_sigma_init, local_reparam=local_reparam,
        )  # fmt: skip
        if i < n_layers:
            modules[f"act{i}"] = make_activation(activation)
    return nn.Sequential(modules)


def deterministic_mlp(
    in_features: int,
    widths: Sequence[int],
    out_features: int,
    activation: str | Activation = "relu",
) -> nn.Sequential:
    """The plain ``nn.Linear`` counterpart of :func:`mlp` (same names), for baselines."""
    sizes = _sizes(in_features, widths, out_features)
    make_activation(activation)
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    n_layers = len(sizes) - 1
    for i in range(1, n_layers + 1):
        modules[f"layer{i}"] = nn.Linear(sizes[i - 1], sizes[i])
        if i < n_layers:
            modules[f"act{i}"] = make_activation(activation)
    return nn.Sequential(modules)


def small_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    prior: PriorSpec = DEFAULT_PRIOR,
    *,
    channels: tuple[int, int] = (16, 32),
    hidden: int = 128,
    activation: str | Activation = "relu",
    posterior_sigma_init: float = 0.05,
    local_reparam: bool = False,
) -> nn.Sequential:
    """Bayesian CNN for (N, in_channels, image_size, image_size) images -> (N, num_classes).

    conv1 (3x3, pad 1) - act1 - pool1 (2x2) - conv2 (3x3, pad 1) - act2 - pool2 - flatten -
    fc1 (hidden) - act3 - fc2. Bayesian layers: ``conv1``, ``conv2``, ``fc1``, ``fc2``.
    ``local_reparam`` applies to the linear layers only.
    """
    c_in = _positive(in_channels, "in_channels")
    n_out = _positive(num_classes, "num_classes")
    size = _positive(image_size, "image_size")
    if size < 4:
        raise BnnError.invalid(f"image_size must be >= 4 (got {image_size!r})", image_size=size)
    pair = isinstance(channels, Sequence) and not isinstance(channels, str | bytes)
    if not pair or len(channels) != 2:
        raise BnnError.invalid(f"channels must be a pair of positive integers (got {channels!r})")
    c1, c2 = (_positive(c, "channels") for c in channels)
    n_hidden = _positive(hidden, "hidden")
    make_activation(activation)
    feat = c2 * (size // 4) ** 2
    common: dict[str, Any] = {"prior": prior, "posterior_sigma_init": posterior_sigma_init}
    conv: dict[str, Any] = {"kernel_size": 3, "padding": 1, **common}
    lin: dict[str, Any] = {"local_reparam": local_reparam, **common}
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", BayesConv2d(c_in, c1, **conv)),
                ("act1", make_activation(activation)),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", BayesConv2d(c1, c2, **conv)),
                ("act2", make_activation(activation)),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", BayesLinear(feat, n_hidden, **lin)),
                ("act3", make_activation(activation)),
                ("fc2", BayesLinear(n_hidden, n_out, **lin)),
            ]
        )
    )


def _convert(
    m: nn.Module, prior: PriorSpec, sigma_init: float, local_reparam: bool
) -> BayesianLayer | None:
    """The Bayesian replacement of ``m`` (posterior mu = its weights), or None to keep ``m``."""
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        raise BnnError.invalid(
            f"cannot convert an uninitialised lazy module ({type(m).__name__}); "
            "run one forward pass first"
        )
    new: BayesianLayer
    if type(m) is nn.Linear:
        new = BayesLinear(
            m.in_features, m.out_features, bias=m.bias is not None, prior=prior,
            posterior_sigma_init=sigma_init, local_reparam=local_reparam,
        )  # fmt: skip
    elif type(m) is nn.Conv2d:
        if m.padding_mode != "zeros":
            raise BnnError.invalid(
                f"only padding_mode='zeros' can be converted (got {m.padding_mode!r})",
                padding_mode=m.padding_mode,
            )
        kernel = (int(m.kernel_size[0]), int(m.kernel_size[1]))
        stride = (int(m.stride[0]), int(m.stride[1]))
        dilation = (int(m.dilation[0]), int(m.dilation[1]))
        padding = m.padding if isinstance(m.padding, str) else (m.padding[0], m.padding[1])
        new = BayesConv2d(
            m.in_channels, m.out_channels, kernel, stride=stride, padding=padding,
            dilation=dilation, groups=m.groups, bias=m.bias is not None, prior=prior,
            posterior_sigma_init=sigma_init,
        )  # fmt: skip
    else:
        return None
    new.to(device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight_mu.copy_(m.weight)
        if m.bias is not None and new.bias_mu is not None:
            new.bias_mu.copy_(m.bias)
    new.train(m.training)
    return new


def bayesianize(
    module: nn.Module,
    prior: PriorSpec = DEFAULT_PRIOR,
    *,
    posterior_sigma_init: float = 0.05,
    inplace: bool = False,
    local_reparam: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear``/``nn.Conv2d`` in ``module`` (nested too) by a Bayesian layer.

    Posterior means are copied from the original weights and biases, so with ``use_mean`` the
    result computes what ``module`` computed. Only exact ``nn.Linear``/``nn.Conv2d`` instances
    are converted (subclasses, e.g. ``MultiheadAttention.out_proj``, keep working as they were).
    A module shared by several parents stays shared. ``inplace=False`` converts a deep copy.
    """
    if not isinstance(module, nn.Module):
        raise BnnError.invalid(f"bayesianize needs an nn.Module (got {type(module).__name__})")
    root = module if inplace else copy.deepcopy(module)
    args = (prior, posterior_sigma_init, local_reparam)
    top = _convert(root, *args)
    if top is not None:
        return top
    done: dict[int, BayesianLayer] = {}
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):  # every slot, shared ones too
            if child is None:
                continue
            new = done.get(id(child))
            if new is None:
                new = _convert(child, *args)
            if new is not None:
                done[id(child)] = new
                setattr(parent, name, new)
    if not done:
        raise BnnError.invalid(
            f"{type(module).__name__} has no nn.Linear or nn.Conv2d layer to convert"
        )
    return root
