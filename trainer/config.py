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
import types
from collections.abc import Mapping
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from trainer.activations import Activation
from trainer.errors import BnnError
from trainer.prior_spec import (
    EBSchedule,
    LearnMode,
    PriorFamily,
    PriorKind,
    PriorScale,
    PriorSpec,
)
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
    "check_json_types",
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


def json_int(value: Any) -> Any:
    """An integer as JSON Schema counts one: ``3`` or ``3.0`` (a number without a fraction),
    as an int; not ``true``, ``"3"`` or ``3.5``. ``None`` passes (left to the field). For
    JSON bodies, in ``mode="before"`` field validators (they keep the field's constraints
    in its schema, where an annotated validator would not)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"must be an integer, got {value!r}")
        return int(value)
    return value


IMAGE_DATASETS = tuple(d.value for d in Dataset if d is not Dataset.REGRESSION)
# The rule between fields that `_fill_defaults` keeps, in JSON Schema: "model is mlp (or
# absent), or dataset is an image dataset". Put in the schemas of RunCreate and of the
# sweep / study ``base`` objects (service.schemas, service.routers.complete_openapi).
CNN_NEEDS_IMAGES: dict[str, Any] = {
    "anyOf": [
        {"properties": {"model": {"const": ModelKind.MLP.value}}},
        {"required": ["dataset"], "properties": {"dataset": {"enum": list(IMAGE_DATASETS)}}},
    ]
}


# PriorSpec's rule in JSON Schema: a learnable scale-mixture prior is learned by gradient
# ("prior fixed, or family gaussian (or absent), or mode gradient (or absent)").
MIXTURE_BY_GRADIENT: dict[str, Any] = {
    "anyOf": [
        {"required": ["prior"], "properties": {"prior": {"const": "fixed"}}},
        {"properties": {"prior_family": {"const": "gaussian"}}},
        {"properties": {"prior_mode": {"const": "gradient"}}},
    ]
}
# Every rule between TrainConfig fields that a schema can state (see CNN_NEEDS_IMAGES).
CONFIG_RULES: list[dict[str, Any]] = [CNN_NEEDS_IMAGES, MIXTURE_BY_GRADIENT]


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


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]{0,3}))?")


def available_devices() -> list[str]:
    """The devices :func:`check_device` accepts on this machine: 'auto', 'cpu', and
    'cuda', 'cuda:0'..'cuda:N-1' with N CUDA devices, 'mps' with Apple's Metal backend."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = ["cuda", *(f"cuda:{i}" for i in range(count))] if count else []
    return ["auto", "cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


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

    dataset: Dataset = Field(
        default=Dataset.REGRESSION,
        description="the task: 'regression' (the seed's 1-D synthetic task) or an image "
        "dataset ('mnist', 'fashion_mnist', 'kmnist')",
    )
    model: ModelKind = Field(
        default=ModelKind.MLP,
        description="'mlp' (fully connected) or 'cnn' (a small convnet; image datasets only)",
    )
    widths: list[int] | None = Field(
        default=None,
        description="hidden layer widths, e.g. 400,400 (default: the dataset's: 10 for "
        "regression, 400,400 for the image datasets)",
    )
    activation: str = Field(
        default="relu",
        description="activation of the hidden layers",
        json_schema_extra={"enum": [a.value for a in Activation]},
    )
    # prior (see trainer.prior_spec for what each option means)
    prior: PriorKind = Field(
        default=PriorKind.LEARNABLE,
        description="'fixed' (never trained) or 'learnable' (learned as prior_mode says)",
    )
    prior_mode: LearnMode = Field(
        default=LearnMode.GRADIENT,
        description="how a learnable prior is learned: by gradient, closed-form empirical "
        "Bayes, gradient under a hyperprior (hierarchical), or the Laplace evidence",
    )
    prior_family: PriorFamily = Field(
        default=PriorFamily.GAUSSIAN,
        description="'gaussian' N(mu0, sigma0^2) or Blundell's 'scale_mixture' "
        "pi N(0, sigma0^2) + (1 - pi) N(0, sigma2^2)",
    )
    prior_scale: PriorScale = Field(
        default=PriorScale.ABSOLUTE,
        description="'absolute': prior sigma = prior_sigma0; 'fan_in': prior sigma = "
        "prior_sigma0 / sqrt(fan_in) in every layer",
    )
    prior_mu0: float = Field(
        default=0.0, ge=-1e3, le=1e3, description="prior mean (the initial one when learned)"
    )
    prior_sigma0: float = Field(
        default=1.0,
        gt=1e-7,
        le=1e3,
        description="prior standard deviation (the initial one when learned; with "
        "prior_scale fan_in, the constant c of c / sqrt(fan_in))",
    )
    prior_learn_mean: bool = Field(
        default=False, description="learn the prior mean too (otherwise it stays prior_mu0)"
    )
    prior_min_group: int = Field(
        default=10,
        ge=1,
        description="learnable priors shared by fewer elements than this are fixed instead",
    )
    prior_optimizer: PriorOptimizer = Field(
        default=PriorOptimizer.ADAM,
        description="optimiser of the prior's own parameter group (gradient and "
        "hierarchical modes): 'adam', or plain 'sgd' without momentum",
    )
    prior_lr: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="learning rate of the prior's parameter group (default: lr)",
    )
    prior_burnin_epochs: int = Field(
        default=0, ge=0, description="epochs before empirical-Bayes / Laplace updates start"
    )
    eb_every: EBSchedule = Field(
        default=EBSchedule.STEP,
        description="empirical-Bayes mode: apply the closed-form prior update every 'step' "
        "or every 'epoch'",
    )
    laplace_every: int = Field(
        default=1, ge=1, description="Laplace mode: update the prior every K epochs"
    )
    laplace_examples: int = Field(
        default=5000,
        ge=1,
        le=1_000_000,
        description="Laplace mode: training examples used for the marginal likelihood",
    )
    hyper_alpha: float | None = Field(
        default=None,
        gt=0,
        le=1e12,
        description="hierarchical mode: the inverse-gamma shape alpha (default: "
        "hyper_strength * elements / 2)",
    )
    hyper_beta: float | None = Field(
        default=None,
        gt=0,
        le=1e12,
        description="hierarchical mode: the inverse-gamma scale beta (default: "
        "(alpha + 1) * the initial prior variance, which puts the mode there)",
    )
    hyper_strength: float = Field(
        default=1.0,
        gt=0,
        le=1e6,
        description="hierarchical mode: hyperprior pseudo-observations per element",
    )
    mixture_pi: float = Field(
        default=0.5, gt=0, lt=1, description="scale mixture: the weight pi of N(0, sigma0^2)"
    )
    mixture_sigma2: float = Field(
        default=math.exp(-6),
        gt=1e-7,
        le=1e6,
        description="scale mixture: the standard deviation sigma2 of the narrow component",
    )
    resolved_priors: dict[str, str] | None = Field(
        default=None, description="filled by the trainer: the prior each group actually got"
    )
    # posterior
    posterior_sigma_init: float = Field(
        default=0.05, gt=0, le=10, description="initial posterior standard deviation"
    )
    local_reparam: bool = Field(
        default=False,
        description="sample the pre-activations of linear layers (local reparameterisation) "
        "instead of the weights",
    )
    # optimisation
    optimizer: Optimizer = Field(
        default=Optimizer.ADAM,
        description="optimiser of the posterior: 'sgd' (with momentum), 'adam' or 'adamw'",
    )
    lr: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="learning rate (default: the dataset's: 0.01 regression, 0.001 images)",
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="momentum of 'sgd'")
    weight_decay: float = Field(
        default=0.0, ge=0, le=10, description="weight decay of the optimiser"
    )
    lr_schedule: LRSchedule = Field(
        default=LRSchedule.NONE,
        description="learning-rate schedule: 'none', 'cosine', or 'step' (x0.1 at 50% and "
        "75% of the epochs)",
    )
    epochs: int = Field(default=20, ge=1, description="training epochs")
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="examples per step (default: the dataset's: 64 regression, 128 images)",
    )
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
    kl_anneal_epochs: int = Field(default=0, ge=0, description="epochs of linear KL warm-up from 0")
    grad_clip: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        description="clip the gradient norm to this value (default: no clipping)",
    )
    seed: int = Field(
        default=0, description="random seed of the data, the initialisation and the sampling"
    )
    device: str = Field(
        default="auto",
        description="'auto' (CUDA when there is one), 'cpu', 'cuda', 'cuda:N' or 'mps'; "
        "checked against the machine when training starts",
        json_schema_extra={"pattern": f"^({_DEVICE.pattern})$"},
    )
    # data size (None: the whole split)
    n_train: int | None = Field(
        default=None,
        ge=1,
        description="training examples (default: the whole split: 50k MNIST, 1024 regression)",
    )
    n_test: int | None = Field(
        default=None,
        ge=1,
        description="test examples (default: the whole split: 10k MNIST, 512 regression)",
    )
    n_val: int | None = Field(
        default=None,
        ge=0,
        description="validation examples (default: 10k MNIST, 256 regression)",
    )
    # model selection on validation NLL
    model_selection: ModelSelection = Field(
        default=ModelSelection.BEST_VAL,
        description="weights the test metrics use: 'best_val' (the epoch with the lowest "
        "validation NLL) or 'last'",
    )
    skip_test: bool = Field(
        default=False, description="no final test evaluation (a study's tuning runs)"
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        description="stop after this many epochs without a better validation NLL (default: never)",
    )
    on_divergence: OnDivergence = Field(
        default=OnDivergence.STOP,
        description="on a non-finite loss or gradient: 'stop' (status diverged) or 'continue'",
    )
    # capture
    capture_every: int = Field(
        default=1, ge=1, description="capture the parameters every N epochs (and the last)"
    )
    grad_capture: GradLevel = Field(
        default=GradLevel.ELEMENT,
        description="gradient statistics captured: 'none', per 'layer', or per 'element'",
    )
    element_every: int = Field(
        default=1,
        ge=1,
        le=1_000_000,
        description="each weight's mean |g| from every N-th step of an epoch only (sampled: "
        "an unbiased estimate, its float32 sum at about 1/N of its cost; each weight's max |g| "
        "and non-finite count, the step norms and the prior gradients still every step, "
        "exactly; 1: the mean over every step too)",
    )
    stat_bits: int | None = Field(
        default=None,
        ge=0,
        le=7,
        description="epoch files: mantissa bits kept of the per-element gradient statistics' 7 "
        "(bfloat16), rounded to nearest; fewer is smaller and lossy (3: each within 6.25%) "
        "(default: $BNN_STAT_BITS, else 7, lossless)",
    )
    compress_posteriors: bool | None = Field(
        default=None,
        description="epoch files: compress the posterior mu/sigma too (about 13% smaller, "
        "decompressed at every read) (default: $BNN_COMPRESS_POSTERIORS, else off)",
    )
    # bookkeeping
    name: str | None = Field(default=None, description="a name for the run (default: none)")
    tags: list[str] = Field(default_factory=list, description="labels to filter runs by")

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


def _json_kind(annotation: Any) -> str | None:
    """ "boolean", "integer", "number", "array:<kind>" or None (not checked) for a field type."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _json_kind(args[0]) if len(args) == 1 else None
    if origin is list:
        inner = get_args(annotation)
        kind = _json_kind(inner[0]) if inner else None
        return f"array:{kind}" if kind else None
    return {bool: "boolean", int: "integer", float: "number"}.get(annotation)


def _json_type_ok(kind: str, value: Any) -> bool:
    if kind.startswith("array:"):
        return isinstance(value, list) and all(_json_type_ok(kind[6:], v) for v in value)
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":  # JSON Schema: a number without a fraction (2.0 is one)
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float))


_EXPECTED = {
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
    "array:integer": "an array of integers",
    "array:number": "an array of numbers",
    "array:boolean": "an array of true/false",
}


def check_json_types(data: Mapping[str, Any], where: str = "") -> None:
    """Raise ValueError unless every known field of ``data`` has its JSON type exactly.

    Pydantic's lax mode (what the CLI and Python callers get) takes ``0`` for a boolean or
    ``"2"`` for an integer; a JSON API should not, so its bodies are checked with this
    first: booleans ``true``/``false``, integers as JSON Schema has them (a number without
    a fraction: ``2`` or ``2.0``; not a boolean), numbers not booleans, arrays item by
    item. ``null`` and unknown fields are left to the model.
    """
    for name, value in data.items():
        field = TrainConfig.model_fields.get(name)
        if field is None or value is None:
            continue
        kind = _json_kind(field.annotation)
        if kind is not None and not _json_type_ok(kind, value):
            raise ValueError(f"{where}{name} must be {_EXPECTED[kind]}, got {value!r}")


_FIELD_VALIDATORS = {
    "widths": "_check_widths",
    "device": "_check_device",
    "activation": "_check_activation",
}


@cache
def _field_adapter(name: str) -> TypeAdapter[Any]:
    field = TrainConfig.model_fields[name]
    return TypeAdapter(Annotated[field.annotation, field])  # type: ignore[arg-type]


def check_field_values(data: Mapping[str, Any], where: str = "") -> None:
    """Raise ValueError unless each known field of ``data`` is a valid value on its own.

    For partial configurations (a sweep's or study's ``base``, an arm's overrides): every
    value is checked against its field's type and constraints, without the rules between
    fields (those run when the whole configuration is built). Types are checked exactly
    as in JSON (:func:`check_json_types`).
    """
    check_json_types(data, where)
    for name, value in data.items():
        if name not in TrainConfig.model_fields:
            continue
        try:
            _field_adapter(name).validate_python(value)
            if name in _FIELD_VALIDATORS and value is not None:
                # the model's own field validators (the adapter runs only the type's)
                getattr(TrainConfig, _FIELD_VALIDATORS[name])(value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}{name}: {msg} (got {value!r})") from None
        except ValueError as exc:
            raise ValueError(f"{where}{name}: {exc}") from None
