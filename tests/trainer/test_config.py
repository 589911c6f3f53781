import pytest

from trainer.config import Dataset, TrainConfig, parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.priors import LearnMode, PriorKind


def test_minimal_config_fills_dataset_defaults() -> None:
    cfg = parse_config({"dataset": "regression", "prior": "learnable", "epochs": 5})
    assert cfg.dataset is Dataset.REGRESSION
    assert cfg.prior is PriorKind.LEARNABLE and cfg.prior_mode is LearnMode.GRADIENT
    assert cfg.widths == [10] and cfg.batch_size == 64 and cfg.epochs == 5 and cfg.lr == 1e-2
    mnist = parse_config({"dataset": "mnist"})
    assert mnist.widths == [400, 400] and mnist.batch_size == 128


def test_overrides_win_and_none_overrides_are_ignored() -> None:
    cfg = parse_config({"epochs": 3, "lr": 0.1}, epochs=7, lr=None)
    assert cfg.epochs == 7 and cfg.lr == 0.1


def test_prior_spec_carries_the_prior_fields() -> None:
    cfg = parse_config({"prior": "fixed", "prior_sigma0": 0.3, "prior_mu0": 0.1})
    spec = cfg.prior_spec()
    assert spec.kind is PriorKind.FIXED and spec.sigma0 == 0.3 and spec.mu0 == 0.1


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"dataset": "cifar100"}, "cifar100"),
        ({"widths": [10, 0]}, "0"),
        ({"widths": [-5]}, "-5"),
        ({"epochs": -1}, "epochs"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0}, "lr"),
        ({"device": "tpu"}, "tpu"),
        ({"optimizer": "lbfgs"}, "lbfgs"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"model": "cnn", "dataset": "regression"}, "cnn"),
    ],
)
def test_bad_values_are_named(data: dict, needle: str) -> None:
    with pytest.raises(BnnError) as info:
        parse_config(data)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert needle in str(info.value)


def test_config_round_trips_through_json() -> None:
    cfg = parse_config({"dataset": "mnist", "widths": [20], "tags": ["a"]})
    again = TrainConfig.model_validate(cfg.to_json_dict())
    assert again == cfg
