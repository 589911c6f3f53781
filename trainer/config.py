"""The training configuration: one validated object for the CLI, the API and the trainer.

Every field has a default, so ``TrainConfig(dataset="regression", prior="learnable",
epochs=5)`` is a complete configuration. Validation errors name the bad value.

Every float must be finite (``inf``, ``nan``, ``"inf"`` and ``1e400`` are refused) and lie
in a range where training is numerically meaningful. ``device`` is checked for its form
only, so a stored run's configuration loads on any machine; whether this machine has the
device is :func:`check_device`'s question, asked where training starts.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.errors import BnnError
from trainer.models import Activation
from trainer.priors import EBSchedule, LearnMode, PriorFamily, PriorKind, PriorScale, PriorSpec
from trainer.snapshot import GradLevel

__all__ = [
    "DATASET_DEFAULTS",
    "Dataset",
    "LRSchedule",
    "ModelKind",
    "ModelSelection",
    "OnDivergence",
    "Optimizer",
    "PriorOptimizer",
    "TrainConfig",
    "check_device",
    "parse_config",
]


class Dataset(StrEnum):
    """Datasets the trainer knows. ``regression`` is the seed's 1-D synthetic task."""

    REGRESSION = "regression"
    MNIST = "mnist"
    FASHION_MNIST = "fashion_mnist"
    KMNIST = "kmnist"


class ModelKind(StrEnum):
    MLP = "mlp"
    CNN = "cnn"


class Optimizer(StrEnum):
    SGD = "sgd"  # with momentum
    ADAM = "adam"
    ADAMW = "adamw"


class PriorOptimizer(StrEnum):
    """The optimiser of the prior's own parameter group (gradient and hierarchical modes)."""

    SGD = "sgd"  # plain, no momentum: the step follows the gradient's size
    ADAM = "adam"


class ModelSelection(StrEnum):
    """Which weights the final test evaluation uses."""

    BEST_VAL = "best_val"  # the epoch with the lowest validation NLL
    LAST = "last"


class OnDivergence(StrEnum):
    """What a run does once its loss or gradients become non-finite (always recorded)."""

    STOP = "stop"  # capture the epoch, end the run as 'diverged'
    CONTINUE = "continue"  # train on to the last epoch (the run may end 'completed')


class LRSchedule(StrEnum):
    NONE = "none"
    COSINE = "cosine"
    STEP = "step"  # x0.1 at 50% and 75% of the epochs


# Hidden widths, batch size and learning rate used when a configuration leaves them out.
DATASET_DEFAULTS: dict[Dataset, dict[str, Any]] = {
    Dataset.REGRESSION: {"widths": [10], "batch_size": 64, "lr": 1e-2},
    Dataset.MNIST: {"widths": [400, 400], "batch_size": 128, "lr": 1e-3},
    Dataset.FASHION_MNIST: {"widths": [400, 400], "batch_size": 128, "lr": 1e-3},
    Dataset.KMNIST: {"widths": [400, 400], "batch_size": 128, "lr": 1e-3},
}


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,4})?")


def check_device(device: str) -> None:
    """INVALID_ARGUMENT unless this machine has ``device`` (a valid ``TrainConfig.device``).

    ``auto`` and ``cpu`` are always there; ``cuda`` needs a CUDA device, ``cuda:N`` needs
    N < ``torch.cuda.device_count()``, ``mps`` needs Apple's Metal backend. Called where
    training starts (the trainer, ``POST /runs``), not when a configuration is read.
    """
    import torch

    if device in ("auto", "cpu"):
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise BnnError.invalid(
                "device 'mps' requested but this machine has no MPS backend", device=device
            )
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        have = f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})" if count else "no CUDA device"
        raise BnnError.invalid(
            f"device {device!r} requested but this machine has {have}",
            device=device,
            cuda_devices=count,
        )


class TrainConfig(BaseModel):
    """Everything that defines a training run. Stored with the run in the catalog."""

    model_config = ConfigDict(
        extra="forbid", use_enum_values=False, validate_default=True, allow_inf_nan=False
    )

    dataset: Dataset = Dataset.REGRESSION
    model: ModelKind = ModelKind.MLP
    widths: list[int] | None = Field(
        default=None, description="hidden layer widths; None: the dataset's default"
    )
    activation: str = "relu"
    # prior (see trainer.prior_spec for what each option means)
    prior: PriorKind = PriorKind.LEARNABLE
    prior_mode: LearnMode = LearnMode.GRADIENT
    prior_family: PriorFamily = PriorFamily.GAUSSIAN
    prior_scale: PriorScale = Field(
        default=PriorScale.ABSOLUTE,
        description="'fan_in': prior sigma = prior_sigma0 / sqrt(fan_in) in every layer",
    )
    prior_mu0: float = Field(default=0.0, ge=-1e3, le=1e3)
    prior_sigma0: float = Field(default=1.0, gt=1e-7, le=1e3)
    prior_learn_mean: bool = Field(default=False, description="learn the prior mean too")
    prior_min_group: int = Field(
        default=10, ge=1, description="learnable priors on smaller groups are fixed instead"
    )
    prior_optimizer: PriorOptimizer = PriorOptimizer.ADAM
    prior_lr: float | None = Field(
        default=None, gt=0, le=10, description="learning rate of the prior group; None: lr"
    )
    prior_burnin_epochs: int = Field(
        default=0, ge=0, description="epochs before empirical-Bayes / Laplace updates start"
    )
    eb_every: EBSchedule = EBSchedule.STEP
    laplace_every: int = Field(default=1, ge=1, description="Laplace mode: update every K epochs")
    laplace_examples: int = Field(default=5000, ge=1, le=1_000_000)
    hyper_alpha: float | None = Field(default=None, gt=0, le=1e12)
    hyper_beta: float | None = Field(default=None, gt=0, le=1e12)
    hyper_strength: float = Field(
        default=1.0, gt=0, le=1e6, description="hyperprior pseudo-observations per element"
    )
    mixture_pi: float = Field(default=0.5, gt=0, lt=1)
    mixture_sigma2: float = Field(default=math.exp(-6), gt=1e-7, le=1e6)
    resolved_priors: dict[str, str] | None = Field(
        default=None, description="filled by the trainer: the prior each group actually got"
    )
    # posterior
    posterior_sigma_init: float = Field(default=0.05, gt=0, le=10)
    local_reparam: bool = False
    # optimisation
    optimizer: Optimizer = Optimizer.ADAM
    lr: float | None = Field(
        default=None, gt=0, le=10, description="learning rate; None: dataset default"
    )
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    lr_schedule: LRSchedule = LRSchedule.NONE
    epochs: int = Field(default=20, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    mc_samples: int = Field(default=1, ge=1, description="posterior samples per training step")
    eval_samples: int = Field(
        default=100, ge=1, le=10_000, description="posterior samples for the final test metrics"
    )
    val_samples: int = Field(
        default=10, ge=1, le=10_000, description="posterior samples for the per-epoch validation"
    )
    kl_weight: float = Field(
        default=1.0,
        ge=0,
        le=1e3,
        description="posterior temperature: loss = NLL + kl_weight * KL / N (1: the exact ELBO)",
    )
    kl_anneal_epochs: int = Field(default=0, ge=0, description="linear KL warm-up length")
    grad_clip: float | None = Field(default=None, gt=0, le=1e6, description="max gradient norm")
    seed: int = 0
    device: str = Field(
        default="auto",
        description="'auto' (CUDA when there is one), 'cpu', 'cuda', 'cuda:N' or 'mps'; "
        "checked against the machine when training starts",
    )
    # data size (None: the whole split)
    n_train: int | None = Field(default=None, ge=1)
    n_test: int | None = Field(default=None, ge=1)
    n_val: int | None = Field(
        default=None, ge=0, description="validation examples (None: 10k MNIST, 256 regression)"
    )
    # model selection on validation NLL
    model_selection: ModelSelection = ModelSelection.BEST_VAL
    skip_test: bool = Field(
        default=False, description="no final test evaluation (a study's tuning runs)"
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="stop after this many epochs without a better val NLL"
    )
    on_divergence: OnDivergence = Field(
        default=OnDivergence.STOP,
        description="on a non-finite loss or gradient: 'stop' (status diverged) or 'continue'",
    )
    # capture
    capture_every: int = Field(default=1, ge=1, description="capture every N epochs (and the last)")
    grad_capture: GradLevel = GradLevel.ELEMENT
    # bookkeeping
    name: str | None = None
    tags: list[str] = Field(default_factory=list)

    @field_validator("widths")
    @classmethod
    def _check_widths(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            bad = [w for w in value if w < 1]
            if bad:
                raise ValueError(f"widths must be positive integers, got {bad[0]} in {value}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}"
            )
        return value

    @field_validator("activation")
    @classmethod
    def _check_activation(cls, value: str) -> str:
        allowed = tuple(a.value for a in Activation)
        if value not in allowed:
            raise ValueError(f"activation must be one of {allowed}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> TrainConfig:
        defaults = DATASET_DEFAULTS[self.dataset]
        if self.widths is None:
            self.widths = list(defaults["widths"])
        if self.batch_size is None:
            self.batch_size = int(defaults["batch_size"])
        if self.lr is None:
            self.lr = float(defaults["lr"])
        if self.model is ModelKind.CNN and self.dataset is Dataset.REGRESSION:
            raise ValueError("model 'cnn' needs an image dataset, not 'regression'")
        try:
            self.prior_spec()
        except BnnError as exc:
            raise ValueError(exc.message) from None
        return self

    @property
    def hidden(self) -> list[int]:
        """The hidden widths (always set after validation)."""
        assert self.widths is not None
        return self.widths

    @property
    def batch(self) -> int:
        assert self.batch_size is not None
        return self.batch_size

    @property
    def learning_rate(self) -> float:
        assert self.lr is not None
        return self.lr

    @property
    def is_classification(self) -> bool:
        return self.dataset is not Dataset.REGRESSION

    def prior_spec(self) -> PriorSpec:
        """The :class:`PriorSpec` every Bayesian layer of the model gets."""
        kwargs: dict[str, Any] = {
            "kind": self.prior,
            "mode": self.prior_mode,
            "mu0": self.prior_mu0,
            "sigma0": self.prior_sigma0,
            "eb_every": self.eb_every,
            "hyper_alpha": self.hyper_alpha,
            "hyper_beta": self.hyper_beta,
            "family": self.prior_family,
            "scale": self.prior_scale,
            "learn_mean": self.prior_learn_mean,
            "min_group": self.prior_min_group,
            "hyper_strength": self.hyper_strength,
            "mixture_pi": self.mixture_pi,
            "mixture_sigma2": self.mixture_sigma2,
        }
        return PriorSpec(**kwargs)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_config(data: dict[str, Any] | TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """Validate a configuration; raise :class:`BnnError` (invalid_argument) naming bad fields."""
    if isinstance(data, TrainConfig):
        data = data.model_dump()
    merged = {**(data or {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        fields = {}
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            given = err.get("input")
            msg = err["msg"].removeprefix("Value error, ")
            fields[loc] = f"{msg} (got {given!r})" if "got" not in msg else msg
        text = "; ".join(f"{k}: {v}" for k, v in fields.items())
        raise BnnError.invalid(f"invalid training configuration: {text}", fields=fields) from None
