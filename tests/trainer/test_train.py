from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import parse_config
from trainer.errors import BnnError
from trainer.store import RunStatus, RunStore, load_distribution_log
from trainer.train import Trainer, train

TINY = {"dataset": "regression", "n_train": 128, "n_test": 64, "eval_samples": 4}


def test_regression_run_writes_every_captured_epoch(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    result = train({**TINY, "epochs": 5, "prior": "learnable"}, sink=store, progress=False)
    assert result.run_id is not None
    run = store.get_run(result.run_id)
    assert run.status is RunStatus.COMPLETED
    epochs = store.list_epochs(run.id)
    assert [e.epoch for e in epochs] == [0, 1, 2, 3, 4]
    assert all((tmp_path / e.file).is_file() and e.size > 0 for e in epochs)
    log = load_distribution_log(run.id, data_dir=tmp_path)
    assert sorted(log) == [0, 1, 2, 3, 4]
    assert log[4]["layer1"]["posterior"]["weight"]["mu"].shape == (10, 1)
    assert log[4]["layer2"]["posterior"]["bias"]["sigma"].shape == (1,)
    m = epochs[-1].metrics
    for key in (
        "loss",
        "nll",
        "kl",
        "kl/layer1",
        "kl/layer2",
        "train_rmse",
        "test_rmse",
        "test_nll",
        "noise_sigma",
    ):
        assert key in m and np.isfinite(m[key]), key
    assert m["kl"] == pytest.approx(m["kl/layer1"] + m["kl/layer2"], rel=1e-6)


def test_capture_every_n_keeps_the_last_epoch(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    result = train(
        {**TINY, "epochs": 8, "capture_every": 3, "grad_capture": "layer"},
        sink=store,
        progress=False,
    )
    assert result.captured_epochs == [0, 3, 6, 7]
    assert [e.epoch for e in store.list_epochs(result.run_id)] == [0, 3, 6, 7]


def test_learnable_prior_moves_and_fixed_prior_does_not() -> None:
    learn_cfg = {**TINY, "epochs": 3, "prior": "learnable", "lr": 0.01, "prior_learn_mean": True}
    learn = train(learn_cfg, progress=False).model
    fixed = train({**TINY, "epochs": 3, "prior": "fixed", "lr": 0.01}, progress=False).model
    assert float(learn.layer1.weight_prior.mu.detach().abs().sum()) > 0
    assert float(fixed.layer1.weight_prior.mu.abs().sum()) == 0
    assert float(fixed.layer1.weight_prior.sigma[0]) == pytest.approx(1.0)


def test_empirical_bayes_prior_is_the_closed_form_of_the_posteriors() -> None:
    model = train(
        {
            **TINY,
            "epochs": 2,
            "prior_mode": "empirical_bayes",
            "eb_every": "epoch",
            "prior_learn_mean": True,
        },
        progress=False,
    ).model
    layer = model.layer1
    mu = layer.weight_mu.detach().double()
    var = layer.weight_sigma.detach().double() ** 2
    mu_p = mu.mean()
    assert float(layer.weight_prior.mu[0]) == pytest.approx(float(mu_p), rel=1e-5, abs=1e-6)
    expected_sigma = float(torch.sqrt((var + (mu - mu_p) ** 2).mean()))
    assert float(layer.weight_prior.sigma[0]) == pytest.approx(expected_sigma, rel=1e-4)


def test_kl_annealing_and_schedules() -> None:
    cfg = parse_config(
        {**TINY, "epochs": 4, "kl_anneal_epochs": 2, "lr_schedule": "step", "optimizer": "sgd"}
    )
    trainer = Trainer(cfg, progress=False)
    assert [trainer.kl_weight_at(e) for e in range(3)] == [0.5, 1.0, 1.0]
    result = trainer.fit()
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < lrs[0]  # the regression default


def test_mnist_classification_metrics(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    cfg = {
        "dataset": "mnist",
        "widths": [32],
        "epochs": 2,
        "n_train": 512,
        "n_val": 256,
        "n_test": 256,
        "eval_samples": 2,
        "grad_clip": 5.0,
        "optimizer": "adamw",
        "lr": 3e-3,
    }
    result = train(cfg, sink=store, progress=False)
    m = result.history[-1]
    keys = ("train_acc", "val_acc", "val_nll", "test_acc", "test_nll", "test_ece", "test_brier")
    for key in (*keys, "test_ood_auroc", "elbo"):
        assert np.isfinite(m[key]), key
    assert 0 <= m["test_ece"] <= 1 and m["test_acc"] > 0.3
    assert "test_acc" not in result.history[0]  # the test split is evaluated once, at the end
    assert m["selected_epoch"] in (0.0, 1.0)
    evaluation = store.reader(result.run_id).evaluation()
    assert evaluation is not None and set(evaluation) == {"nll", "error", "brier"}
    assert evaluation["nll"].shape == (256,)
    assert evaluation["error"].mean() == pytest.approx(1 - m["test_acc"])
    log = load_distribution_log(result.run_id, data_dir=tmp_path, epochs=[1])
    assert log[1]["layer1"]["posterior"]["weight"]["mu"].shape == (32, 784)


def test_cnn_trains() -> None:
    cfg = {
        "dataset": "mnist",
        "model": "cnn",
        "epochs": 1,
        "n_train": 64,
        "n_test": 32,
        "eval_samples": 1,
    }
    result = train(cfg, progress=False)
    assert result.captured_epochs == [0]


def test_a_failing_run_is_marked_failed_and_keeps_its_epochs(tmp_path: Path) -> None:
    store = RunStore(tmp_path)

    def boom(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise RuntimeError("disk on fire")

    trainer = Trainer(
        parse_config({**TINY, "epochs": 4}), sink=store, progress=False, on_epoch=boom
    )
    with pytest.raises(RuntimeError):
        trainer.fit()
    run = store.list_runs()[0]
    assert run.status is RunStatus.FAILED and "disk on fire" in (run.error or "")
    assert [e.epoch for e in store.list_epochs(run.id)] == [0, 1]


def test_unknown_dataset_fails_before_a_run_is_created(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(BnnError):
        train({"dataset": "nope"}, sink=store, progress=False)
    assert store.list_runs() == []
