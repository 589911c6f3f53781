"""TrainConfig's numeric ranges and device checks: every float finite and in range, errors
naming the field and the value; the device checked where training starts, not on load."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from service.cli import main
from trainer.config import TrainConfig, check_device, parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.train import Trainer

NON_FINITE = [math.inf, -math.inf, math.nan, "inf", "-inf", "nan", "Infinity", 1e400]
FLOAT_FIELDS = [
    "lr",
    "kl_weight",
    "prior_sigma0",
    "prior_mu0",
    "posterior_sigma_init",
    "momentum",
    "weight_decay",
    "grad_clip",
    "prior_lr",
    "hyper_alpha",
    "hyper_beta",
    "hyper_strength",
    "mixture_pi",
    "mixture_sigma2",
]
MISSING_CUDA = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 99}"


def _refused(data: dict[str, Any]) -> BnnError:
    with pytest.raises(BnnError) as info:
        parse_config(data)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return info.value


def test_every_float_field_is_covered() -> None:
    floats = {
        name
        for name, info in TrainConfig.model_fields.items()
        if info.annotation in (float, float | None)
    }
    assert floats == set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_floats_are_refused_naming_field_and_value(field: str, value: Any) -> None:
    err = _refused({field: value})
    assert field in err.details["fields"]
    assert "finite number" in err.details["fields"][field]
    assert repr(value) in err.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 1e308),
        ("lr", 10.5),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("kl_weight", 1001.0),
        ("kl_weight", -1.0),
        ("prior_sigma0", 0.0),
        ("prior_sigma0", -1.0),
        ("prior_sigma0", 1e4),
        ("prior_mu0", 1001.0),
        ("prior_mu0", -1e300),
        ("posterior_sigma_init", 0.0),
        ("posterior_sigma_init", 11.0),
        ("momentum", -0.1),
        ("momentum", 1.0),
        ("weight_decay", -1.0),
        ("weight_decay", 10.5),
        ("grad_clip", 0.0),
        ("grad_clip", 2e6),
        ("prior_lr", 0.0),
        ("prior_lr", 11.0),
        ("hyper_alpha", 0.0),
        ("hyper_beta", 1e13),
        ("mixture_pi", 1.0),
        ("mixture_sigma2", 0.0),
    ],
)
def test_out_of_range_floats_are_refused_naming_field_and_value(field: str, value: float) -> None:
    err = _refused({field: value})
    assert set(err.details["fields"]) == {field}
    assert f"{field}: " in err.message and repr(value) in err.message


@pytest.mark.parametrize(
    "data",
    [
        {"lr": 10.0},
        {"lr": 1e-12},
        {"kl_weight": 0.0},
        {"kl_weight": 1e3},
        {"prior_sigma0": 1e3},
        {"prior_mu0": -1e3},
        {"posterior_sigma_init": 10.0},
        {"weight_decay": 10.0},
        {"grad_clip": 1e6},
        {"prior_lr": 10.0},
        {"momentum": 0.0},
    ],
)
def test_range_ends_are_accepted(data: dict[str, float]) -> None:
    cfg = parse_config(data)
    for key, value in data.items():
        assert getattr(cfg, key) == value


def test_refusals_hold_for_direct_construction_and_json() -> None:
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=math.inf)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig.model_validate_json('{"lr": 1e400}')
    with pytest.raises(ValueError, match="kl_weight"):
        TrainConfig.model_validate(json.loads('{"kl_weight": NaN}'))


# ----------------------------------------------------------------------------- device
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:99", "mps"])
def test_any_well_formed_device_loads_on_any_machine(device: str) -> None:
    # a stored run's configuration must load where its device is missing
    assert parse_config({"device": device}).device == device


@pytest.mark.parametrize("device", ["tpu", "cudafoo", "cuda:", "cuda:-1", "CUDA", "cuda:0,1", ""])
def test_ill_formed_devices_are_refused(device: str) -> None:
    err = _refused({"device": device})
    assert "device" in err.details["fields"] and repr(device) in err.message


def test_check_device_knows_this_machine() -> None:
    check_device("auto")
    check_device("cpu")
    with pytest.raises(BnnError) as info:
        check_device(MISSING_CUDA)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert MISSING_CUDA in info.value.message and info.value.details["device"] == MISSING_CUDA
    if torch.cuda.is_available():
        check_device("cuda")
        check_device(f"cuda:{torch.cuda.device_count() - 1}")
    else:
        with pytest.raises(BnnError, match="no CUDA device"):
            check_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(BnnError, match="mps"):
            check_device("mps")


def test_the_trainer_refuses_a_missing_device_before_loading_data() -> None:
    config = parse_config({"dataset": "mnist", "device": MISSING_CUDA, "epochs": 1})
    with pytest.raises(BnnError, match=re.escape(MISSING_CUDA)):
        Trainer(config, progress=False, data_root="/nonexistent-bnn-datasets")


# ----------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--lr=inf"], ["--lr", "finite number", "inf"]),
        (["--lr", "1e308"], ["--lr", "1e+308"]),
        (["--kl-weight", "nan"], ["--kl-weight", "nan"]),
        (["--prior-sigma0", "-1"], ["--prior-sigma0", "-1.0"]),
        (["--device", MISSING_CUDA], [MISSING_CUDA]),
    ],
)
def test_bnn_train_refuses_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needles: list[str]
) -> None:
    code = main(["train", *args, "--epochs", "1", "--data-dir", str(tmp_path), "--no-progress"])
    assert code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err
