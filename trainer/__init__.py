"""bnn-infosharing trainer: Bayesian layers with learnable layer-shared priors, the ELBO
trainer that captures every posterior, and the run store (HDF5 epoch files + catalog).

>>> from trainer import mlp, PriorSpec, get_all_distribution_params
>>> model = mlp(1, [10], 1, PriorSpec(kind="learnable"))
"""

from trainer.capture import GradientRecorder, get_all_distribution_params
from trainer.config import TrainConfig, parse_config
from trainer.data import load_dataset, make_regression
from trainer.errors import BnnError, ErrorCode
from trainer.layers import (
    BayesConv2d,
    BayesianLayer,
    BayesLinear,
    bayesian_layers,
    kl_by_layer,
    model_kl,
    use_mean,
)
from trainer.mixture import ScaleMixturePrior
from trainer.models import bayesianize, deterministic_mlp, mlp, small_cnn
from trainer.priors import (
    GaussianPrior,
    LayerPrior,
    LearnMode,
    PriorFamily,
    PriorKind,
    PriorScale,
    PriorSpec,
)
from trainer.snapshot import EpochSnapshot, GradLevel

# Bound eagerly: a lazy ``train`` would be shadowed by the submodule ``trainer.train``.
from trainer.train import Trainer, TrainResult, train

__all__ = [
    "BayesConv2d",
    "BayesLinear",
    "BayesianLayer",
    "BnnError",
    "EpochSnapshot",
    "ErrorCode",
    "GaussianPrior",
    "GradLevel",
    "GradientRecorder",
    "LayerPrior",
    "LearnMode",
    "PriorFamily",
    "PriorKind",
    "PriorScale",
    "PriorSpec",
    "RunReader",
    "RunStatus",
    "RunStore",
    "ScaleMixturePrior",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "bayesian_layers",
    "bayesianize",
    "deterministic_mlp",
    "get_all_distribution_params",
    "kl_by_layer",
    "load_dataset",
    "load_distribution_log",
    "make_regression",
    "mlp",
    "model_kl",
    "parse_config",
    "small_cnn",
    "train",
    "use_mean",
]

# The store (SQLAlchemy, h5py) loads on first use.
_LAZY = {
    "RunReader": "trainer.store",
    "RunStatus": "trainer.store",
    "RunStore": "trainer.store",
    "load_distribution_log": "trainer.store",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
