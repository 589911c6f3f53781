"""bnn-infosharing trainer: Bayesian layers with learnable layer-shared priors, the ELBO
trainer that captures every posterior, and the run store (HDF5 epoch files + catalog).

>>> from trainer import mlp, PriorSpec, get_all_distribution_params
>>> model = mlp(1, [10], 1, PriorSpec(kind="learnable"))

``trainer.track(model, ...)`` records your own training loop into a run store or a service
(:mod:`trainer.tracking`).

Every public name loads its submodule on first use (PEP 562), so ``import trainer`` and the
torch-free parts (``trainer.config``, ``trainer.store``, ``trainer.errors``) load no torch.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from trainer._lazy import lazy_exports

if TYPE_CHECKING:
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
    from trainer.optim import RecordingAdam
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
    from trainer.store import RunReader, RunStatus, RunStore, load_distribution_log
    from trainer.tracked_run import TrackedRun
    from trainer.tracking import track
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
    "RecordingAdam",
    "RunReader",
    "RunStatus",
    "RunStore",
    "ScaleMixturePrior",
    "TrackedRun",
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
    "track",
    "train",
    "use_mean",
]

# Public name -> the submodule that defines it. The enums come from the torch-free modules
# (trainer.prior_spec) that trainer.priors re-exports: the same objects either way.
_LAZY = {
    "GradientRecorder": "trainer.capture",
    "RecordingAdam": "trainer.optim",
    "get_all_distribution_params": "trainer.capture",
    "TrainConfig": "trainer.config",
    "parse_config": "trainer.config",
    "load_dataset": "trainer.data",
    "make_regression": "trainer.data",
    "BnnError": "trainer.errors",
    "ErrorCode": "trainer.errors",
    "BayesConv2d": "trainer.layers",
    "BayesianLayer": "trainer.layers",
    "BayesLinear": "trainer.layers",
    "bayesian_layers": "trainer.layers",
    "kl_by_layer": "trainer.layers",
    "model_kl": "trainer.layers",
    "use_mean": "trainer.layers",
    "ScaleMixturePrior": "trainer.mixture",
    "bayesianize": "trainer.models",
    "deterministic_mlp": "trainer.models",
    "mlp": "trainer.models",
    "small_cnn": "trainer.models",
    "GaussianPrior": "trainer.priors",
    "LayerPrior": "trainer.priors",
    "LearnMode": "trainer.prior_spec",
    "PriorFamily": "trainer.prior_spec",
    "PriorKind": "trainer.prior_spec",
    "PriorScale": "trainer.prior_spec",
    "PriorSpec": "trainer.prior_spec",
    "EpochSnapshot": "trainer.snapshot",
    "GradLevel": "trainer.snapshot",
    "RunReader": "trainer.store",
    "RunStatus": "trainer.store",
    "RunStore": "trainer.store",
    "load_distribution_log": "trainer.store",
    "TrackedRun": "trainer.tracked_run",
    "track": "trainer.tracking",
    "Trainer": "trainer.train",
    "TrainResult": "trainer.train",
    "train": "trainer.train",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)


class _Package(types.ModuleType):
    """Keeps ``trainer.train`` the function: importing the submodule ``trainer.train`` would
    otherwise bind the module over the public name (the import system sets the attribute)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
