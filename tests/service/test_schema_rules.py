"""Rules between fields: where JSON Schema can state one, the OpenAPI schema and the server
agree on every body here (valid by the schema <=> accepted); where it cannot (a study's
``baseline`` among its arms, ...), the contract tests' generator repairs a body to keep it
(tests/service/contract_hooks.py), and the repaired body is accepted."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema_rs import Draft202012Validator  # installed with schemathesis

from service.demo.study import StudySpec
from tests.service.contract_hooks import repair_study


@pytest.fixture
def openapi(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def _valid(openapi: dict[str, Any], component: str, body: Any) -> bool:
    root = {"$ref": f"#/components/schemas/{component}", "components": openapi["components"]}
    return Draft202012Validator(root).is_valid(body)


RUNS = [  # model / dataset pairs: cnn needs an image dataset
    {"model": "cnn", "execute": False},
    {"model": "cnn", "dataset": "regression", "execute": False},
    {"model": "cnn", "dataset": "mnist", "execute": False},
    {"model": "cnn", "dataset": "kmnist", "execute": False},
    {"model": "mlp", "dataset": "regression", "execute": False},
    {"dataset": "fashion_mnist", "execute": False},
    {"execute": False},
    {"prior_family": "scale_mixture", "prior_mode": "empirical_bayes", "execute": False},
    {"prior_family": "scale_mixture", "execute": False},
    {"prior": "fixed", "prior_family": "scale_mixture", "prior_mode": "laplace", "execute": False},
    {"activation": ".exe", "execute": False},  # an enum in the schema too
    {"activation": "gelu", "execute": False},
    {"epochs": 3.0, "widths": [4.0, 8], "execute": False},  # JSON Schema integers
    {"epochs": 3.5, "execute": False},
    {"epochs": True, "execute": False},
    {"device": "\u00b9", "execute": False},  # the form of a device is in the schema
    {"device": "cuda:7", "execute": False},  # the form is right (the machine is not asked)
]


@pytest.mark.parametrize("body", RUNS, ids=str)
def test_run_create_schema_states_the_model_dataset_rule(
    client: TestClient, openapi: dict[str, Any], body: dict[str, Any]
) -> None:
    response = client.post("/runs", json=body)
    assert response.status_code in (201, 422), response.text
    assert _valid(openapi, "RunCreate", body) == (response.status_code == 201), response.text
    if response.status_code == 201:
        config = client.get(f"/runs/{response.json()['id']}").json()["config"]
        assert config["epochs"] == 3 or "epochs" not in body  # stored as an integer
        assert all(isinstance(w, int) for w in config["widths"])


SWEEP_BASE = {"epochs": 2, "n_train": 64, "n_test": 32}
SWEEPS = [
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"grad_clip": [None, 1.0, 5.0]}},
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"lr_schedule": ["cosine"]}},
    {
        "kind": "optim",
        "base": SWEEP_BASE,
        "grid": {"grad_clip": [None, 1.0, 5.0]},
        "design": "full",
    },
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"grad_clip": [None, 0.5]}},
    {"kind": "width", "base": SWEEP_BASE, "grid": {"widths": [4, 8], "grad_clip": [None]}},
    {"kind": "optim", "base": {**SWEEP_BASE, "model": "cnn"}, "grid": {}},
    {"kind": "optim", "base": {**SWEEP_BASE, "model": "cnn", "dataset": "mnist"}, "grid": {}},
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"lr": {"sgd": 0.1, "adam": 0.01}}},
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"lr": {"rmsprop": 0.1}}},
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"lr": {"sgd": None}}},
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"lr": {"sgd": 0}}},
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"lr": {"sgd": 11}}},
    {"kind": "optim", "base": {**SWEEP_BASE, "lr": 2.5}, "grid": {}},  # sgd too: not 25
    {"kind": "width", "base": {**SWEEP_BASE, "widths": []}, "grid": {"widths": [4, 8]}},
    {"kind": "width", "base": SWEEP_BASE, "grid": {"widths": [4.0, 8]}},
    {"kind": "width", "base": SWEEP_BASE, "grid": {"widths": [4.5]}},
    {"kind": "width", "base": SWEEP_BASE, "grid": {"widths": [100_000]}},  # BNN_MAX_WIDTH
    {"kind": "width", "base": SWEEP_BASE, "grid": {"widths": [4, 4.0]}},  # not unique
    {"kind": "width", "base": SWEEP_BASE, "grid": {"optimizer": ["nadam"]}},  # not a level
    {"kind": "width", "base": SWEEP_BASE, "grid": {"optimizer": ["sgd"]}},  # not a width factor
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"widths": [4]}},  # not an optim factor
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"grad_clip": [None, -1.0]}},
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"grad_clip": [None, 1]}, "design": "full"},
    {"kind": "optim", "base": SWEEP_BASE, "grid": {"prior": ["fixed", "fixed"]}},
    # null annealing (a quarter of 12 epochs = 3) and 3: the same run twice, as replicates
    {
        "kind": "optim",
        "base": {**SWEEP_BASE, "epochs": 12},
        "grid": {"kl_anneal_epochs": [None, 3]},
    },
]


@pytest.mark.parametrize("body", SWEEPS, ids=str)
def test_sweep_schema_states_design_and_lr_rules(
    client: TestClient, openapi: dict[str, Any], body: dict[str, Any]
) -> None:
    response = client.post("/sweeps", json=body)
    assert response.status_code in (202, 422), response.text
    assert _valid(openapi, "SweepSpec", body) == (response.status_code == 202), response.text


def test_replicated_levels_get_distinct_labels(client: TestClient) -> None:
    body = {"kind": "optim", "base": {**SWEEP_BASE, "epochs": 12}, "design": "full"}
    body["grid"] = {"kl_anneal_epochs": [None, 3], "optimizer": ["adam"], "prior": ["fixed"]}
    body["grid"] |= {"grad_clip": [None], "lr_schedule": ["none"]}
    response = client.post("/sweeps", json=body)
    assert response.status_code == 202, response.text
    labels = [r["label"] for r in response.json()["runs"]]
    assert labels == ["adam+anneal3/fixed", "adam+anneal3/fixed#2"]


STUDY: dict[str, Any] = {
    "base": {"epochs": 2, "n_train": 64, "n_test": 32},
    "arms": {
        "fixed": {"config": {"prior": "fixed"}},
        "learnable": {"config": {"prior": "learnable"}, "tune": {"lr": [0.003, 0.01]}},
    },
    "seeds": [0, 1],
}
LEVELS = [round(0.01 * i, 2) for i in range(1, 31)]
LEVELS_INT = list(range(10, 40))
BROKEN_STUDIES = [  # (change, what the server says)
    ({"baseline": "nope"}, "is not an arm"),
    ({"tune_seed": 1, "seeds": [0, 1, 2]}, "must not be one of the seeds"),
    ({"seeds": [1000]}, "must not be one of the seeds"),  # the default tune_seed
    (
        {"arms": {**STUDY["arms"], "wide": {"tune": {"lr": [0.1, 0.2, 0.3]}}}},
        "same tuning budget",
    ),
    ({"base": {**STUDY["base"], "model": "cnn"}}, "needs an image dataset"),
    (
        {"arms": {"a": {"tune": {"lr": [0.1, 0.2, 0.3], "kl_weight": [0.1, 0.5, 1.0]}}}}
        | {"seeds": list(range(600))},
        "more than the limit 512",
    ),
    (  # 10 x 10 x 30 tuning runs: over StudySpec's own cap of 2,000
        {
            "arms": {
                "a": {"tune": {"lr": LEVELS[:10], "kl_weight": LEVELS[:10], "n_val": LEVELS_INT}}
            }
        },
        "the study would train 3002 runs",
    ),
    (
        {
            "base": {**STUDY["base"], "prior_family": "scale_mixture"},
            "arms": {"a": {"tune": {"prior_mode": ["gradient", "empirical_bayes"]}}},
        },
        "learned by gradient only",
    ),
    (
        {
            "base": {**STUDY["base"], "dataset": "mnist"},
            "arms": {"a": {"tune": {"model": ["cnn", "mlp"], "dataset": ["mnist", "regression"]}}},
        },
        "needs an image dataset",
    ),
]


STUDIES = [  # what the schema states of arms' tune levels, seeds and tune_epochs
    {"arms": {"a": {"tune": {"activation": [{"": {}}]}}}},
    {"arms": {"a": {"tune": {"activation": ["tanh", "relu"]}}}},
    {"arms": {"a": {"tune": {"epochs": [2, 5000]}}}},  # BNN_MAX_EPOCHS
    {"arms": {"a": {"tune": {"seed": [1, 2]}}}},
    {"arms": {"a": {"tune": {"lr": []}}}},
    {"arms": {"a": {"tune": {"resolved_priors": [{"layer1": "x" * 300}]}}}},
    {"arms": {"a": {"tune": {"resolved_priors": [{"layer1": "gaussian"}]}}}},
    {"arms": {"a": {}}, "seeds": [0.0, 1]},
    {"arms": {"a": {}}, "seeds": [0.5]},
    {"arms": {"a": {"tune": {"lr": [0.1]}}}, "tune_epochs": 5000},
    {"arms": {"a": {"tune": {"lr": [0.1]}}}, "tune_epochs": 1.0},
    # a config value every run overrides is still bounded (BNN_MAX_N_TRAIN)
    {"arms": {"a": {"config": {"n_val": 10**7}, "tune": {"n_val": [10, 20]}}}},
    {"base": {"device": "gpu"}},
    {"arms": {"a": {"config": {"device": "gpu"}, "tune": {"device": ["cpu"]}}}},
    {"arms": {"a": {"config": {"activation": "swish"}, "tune": {"activation": ["relu"]}}}},
]


@pytest.mark.parametrize("change", STUDIES, ids=str)
def test_study_schema_states_field_values(
    client: TestClient, openapi: dict[str, Any], change: dict[str, Any]
) -> None:
    body = {**copy.deepcopy(STUDY), **change}
    response = client.post("/studies", json=body)
    assert response.status_code in (202, 422), response.text
    assert _valid(openapi, "StudySpec", body) == (response.status_code == 202), response.text


@pytest.mark.parametrize(("change", "words"), BROKEN_STUDIES, ids=str)
def test_study_rules_a_schema_cannot_state_are_422_and_the_generator_keeps_them(
    client: TestClient, openapi: dict[str, Any], change: dict[str, Any], words: str
) -> None:
    body = {**copy.deepcopy(STUDY), **copy.deepcopy(change)}
    assert _valid(openapi, "StudySpec", body)  # the schema cannot tell
    response = client.post("/studies", json=body)
    assert response.status_code == 422 and words in response.json()["error"]["message"]
    repaired = copy.deepcopy(body)
    repair_study(repaired)
    assert repaired != body and _valid(openapi, "StudySpec", repaired)
    spec = StudySpec.model_validate(repaired)
    spec.validate_configs()  # every run's configuration builds


def test_the_generator_knows_the_service_cap_on_study_runs() -> None:
    from service.routers.studies import MAX_STUDY_RUNS
    from tests.service.contract_hooks import STUDY_RUN_LIMIT

    assert STUDY_RUN_LIMIT == MAX_STUDY_RUNS


def test_the_repair_leaves_a_valid_study_alone() -> None:
    body = copy.deepcopy(STUDY) | {"baseline": "learnable", "tune_seed": 7}
    repaired = copy.deepcopy(body)
    repair_study(repaired)
    assert repaired == body
    for junk in (None, [], {"arms": []}, {"arms": {"a": 1}}, {"arms": {}}):
        repair_study(junk)  # bodies of negative cases: left as they are, no exception
