"""Diverged runs over the API: PATCH reports where, GET/list show it, remote trainers and
``push_run`` carry it."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import torch

from tests.service.conftest import TINY, TestClient, external_run
from trainer.config import parse_config
from trainer.remote import HttpRunSink, push_run
from trainer.store import RunStore
from trainer.train import Trainer

BASE = "http://testserver"


def _nan_gradient_at(trainer: Trainer, name: str, step: int) -> None:
    param = dict(trainer.model.named_parameters())[name]
    seen = [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        seen[0] += 1
        return grad * math.nan if seen[0] - 1 == step else grad

    param.register_hook(hook)


def test_patch_reports_a_divergence_and_the_run_shows_it(client: TestClient) -> None:
    run_id = external_run(client)
    body = {"diverged_step": 41, "diverged_epoch": 2, "diverged_layer": "layer1.weight_mu"}
    response = client.patch(f"/runs/{run_id}", json={**body, "status": "diverged", "error": "x"})
    assert response.status_code == 200, response.text
    run = client.get(f"/runs/{run_id}").json()
    assert run["status"] == "diverged" and run["finished_at"] and run["error"] == "x"
    assert {k: run[k] for k in body} == body
    listed = client.get("/runs?status=diverged").json()
    assert [r["id"] for r in listed["runs"]] == [run_id]
    assert listed["runs"][0]["diverged_step"] == 41
    rows = list(csv.DictReader(io.StringIO(client.get("/runs?format=csv").text)))
    assert rows[0]["diverged_step"] == "41" and rows[0]["diverged_layer"] == "layer1.weight_mu"
    assert client.patch(f"/runs/{run_id}", json=body).status_code == 200  # a retry: no-op
    again = client.patch(f"/runs/{run_id}", json={**body, "diverged_step": 42})
    assert again.status_code == 409 and "step 41" in again.text
    assert client.patch(f"/runs/{run_id}", json={"status": "running"}).status_code == 409
    assert client.patch(f"/runs/{run_id}", json={"heartbeat": True}).status_code == 409
    other = external_run(client)
    assert client.get(f"/runs/{other}").json()["diverged_step"] is None
    for bad in (
        {"diverged_step": 1},
        {"diverged_layer": "a"},
        {"diverged_step": -1, "diverged_epoch": 0},
        {"diverged_step": 1, "diverged_epoch": 0, "diverged_layer": "x" * 257},
        {"diverged_step": 1, "diverged_epoch": 0, "diverged_layer": "a\x00b"},
        {"diverged_step": "many", "diverged_epoch": 0},
    ):
        response = client.patch(f"/runs/{other}", json=bad)
        assert response.status_code in (400, 422), (bad, response.text)
    assert client.get(f"/runs/{other}").json()["diverged_step"] is None


def test_a_remote_trainer_reports_its_divergence(client: TestClient) -> None:
    sink = HttpRunSink(BASE, client=client)
    config = parse_config({**TINY, "epochs": 4, "batch_size": 16})  # 4 steps per epoch
    trainer = Trainer(config, sink=sink, progress=False, heartbeat_interval=60)
    _nan_gradient_at(trainer, "layer2.bias_mu", step=5)
    result = trainer.fit()
    assert result.status == "diverged"
    run = client.get(f"/runs/{result.run_id}").json()
    assert run["status"] == "diverged" and "step 5 (epoch 1)" in run["error"]
    assert (run["diverged_step"], run["diverged_epoch"], run["diverged_layer"]) == (
        5,
        1,
        "layer2.bias_mu",
    )
    assert run["epochs"] == result.captured_epochs
    # the diverging epoch holds NaN parameters: stored, or refused by a service that takes
    # only finite ones (then the run still ends diverged and its error says so)
    if result.captured_epochs == [0]:
        assert result.refused_epochs.keys() == {1}
        assert "epoch 1 was not stored" in run["error"]
    else:
        assert result.captured_epochs == [0, 1] and not result.refused_epochs


@pytest.mark.parametrize("catalog_url", [None])
def test_push_carries_the_divergence(client: TestClient, tmp_path: Path) -> None:
    local = tmp_path / "local"
    with RunStore(local) as store:
        trainer = Trainer(parse_config(TINY), progress=False)  # finite weights, as epoch 0
        run_id = store.create_run("local", trainer.config.to_json_dict()).id
        store.write_epoch(run_id, trainer.snapshot(0, {"loss": 1.0}, recorded=False))
        store.set_divergence(run_id, 2, 0, "layer1.weight_mu")
        store.set_status(run_id, "diverged", error="non-finite loss at step 2 (epoch 0)")
    pushed = push_run(run_id, local, BASE, sink=HttpRunSink(BASE, client=client))
    assert pushed["status"] == "diverged" and pushed["epochs"] == 1
    run = client.get(f"/runs/{run_id}").json()
    assert run["status"] == "diverged"
    assert (run["diverged_step"], run["diverged_epoch"], run["diverged_layer"]) == (
        2,
        0,
        "layer1.weight_mu",
    )
    again = push_run(run_id, local, BASE, sink=HttpRunSink(BASE, client=client))
    assert again["created"] is False
