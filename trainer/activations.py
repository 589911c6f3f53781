"""The activation names the model builders accept, without torch (the command line and
:mod:`trainer.config` use them; :mod:`trainer.models` maps each to its ``nn`` module)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Activation"]


class Activation(StrEnum):
    """Activation functions the builders accept (by these names)."""

    RELU = "relu"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    GELU = "gelu"
    ELU = "elu"
    LEAKY_RELU = "leaky_relu"
    SILU = "silu"
    SOFTPLUS = "softplus"
