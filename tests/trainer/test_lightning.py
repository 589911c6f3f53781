"""``trainer.lightning.BnnTracking`` with a real ``lightning.Trainer`` on the CPU."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import PriorSpec, RunStore, bayesianize, model_kl
from trainer.data import make_regression
from trainer.snapshot import GradLevel
from trainer.store import RunReader

lightning = pytest.importorskip("lightning")
from trainer.lightning import BnnTracking  # noqa: E402 - needs lightning

N, BATCH = 64, 16


class Regressor(lightning.LightningModule):
    """A bayesianized MLP on the 1-D regression task; ``fail_at`` raises in that epoch."""

    def __init__(self, lr: float = 1e-2, fail_at: int | None = None, stop: str = "") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = bayesianize(
            nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1)), PriorSpec()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.hparams.fail_at == self.current_epoch:
            if self.hparams.stop == "interrupt":
                raise KeyboardInterrupt
            raise ValueError(f"bad batch {batch_idx}")
        x, y = batch
        loss = F.mse_loss(self(x), y) + model_kl(self) / N
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("epoch_end_metric", float(self.current_epoch + 10))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_mse", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def loaders() -> tuple[DataLoader, DataLoader]:
    data = make_regression(N, 32, seed=0)
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=BATCH)
    val = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=32)
    return train, val


def fit(module: Regressor, callback: BnnTracking, **options: Any) -> None:
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[callback],
        **options,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not have many workers", etc.
        trainer.fit(module, *loaders())


def test_a_lightning_fit_is_a_tracked_run(tmp_path: Path) -> None:
    callback = BnnTracking(name="lightning", config={"dataset": "regression"}, data_dir=tmp_path)
    fit(Regressor(), callback, gradient_clip_val=1e-6)
    run = callback.run
    assert run is not None and run.status == "completed" and run.captured_epochs == [0, 1]
    with RunStore(tmp_path) as store:
        info = store.get_run(run.id)
        epochs = store.list_epochs(run.id)
    assert info.status.value == "completed" and info.name == "lightning"
    assert info.config["lr"] == 0.01 and info.config["epochs"] == 2  # hparams, max_epochs
    assert (
        info.config["dataset"] == "regression" and info.config["tracking"]["model"] == "Regressor"
    )
    metrics = epochs[1].metrics
    assert {"train_loss", "val_mse", "kl", "kl/net.0", "steps"} <= set(metrics)
    assert metrics["epoch_end_metric"] == 11.0  # logged in the module's own epoch-end hook
    assert metrics["steps"] == N // BATCH
    with RunReader(run.id, data_dir=tmp_path) as reader:
        assert reader.header(1).grad_level is GradLevel.ELEMENT
        grads = reader.gradients(1, "net.0")
    assert grads["step_norm"].shape == (N // BATCH,)
    assert grads["step_norm"].max() > 1e-3  # recorded before Lightning clipped to 1e-6


def test_an_exception_in_the_fit_fails_the_run(tmp_path: Path) -> None:
    callback = BnnTracking(data_dir=tmp_path)
    with pytest.raises(ValueError, match="bad batch 0"):
        fit(Regressor(fail_at=1), callback)
    assert callback.run is not None
    with RunStore(tmp_path) as store:
        info = store.get_run(callback.run.id)
        assert info.status.value == "failed" and info.error == "ValueError: bad batch 0"
        assert [e.epoch for e in store.list_epochs(info.id)] == [0]


def test_keyboard_interrupt_ends_the_run_interrupted(tmp_path: Path) -> None:
    callback = BnnTracking(data_dir=tmp_path)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown exits with status 1
        fit(Regressor(fail_at=1, stop="interrupt"), callback)
    assert callback.run is not None
    with RunStore(tmp_path) as store:
        info = store.get_run(callback.run.id)
    assert info.status.value == "interrupted" and "KeyboardInterrupt" in (info.error or "")


def test_a_module_without_bayesian_layers_is_a_clear_error(tmp_path: Path) -> None:
    class Plain(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))

    from trainer.errors import BnnError

    with pytest.raises(BnnError, match="Plain has no Bayesian layer"):
        fit(Plain(), BnnTracking(data_dir=tmp_path))


def test_the_callback_takes_the_sampling_and_the_file_form(tmp_path: Path) -> None:
    from trainer.store import EpochFile

    callback = BnnTracking(data_dir=tmp_path, element_every=2, stat_bits=4)
    fit(Regressor(), callback)
    run = callback.run
    assert run is not None and run.status == "completed"
    with RunStore(tmp_path) as store:
        assert store.get_run(run.id).config["tracking"]["element_every"] == 2
        metrics = store.list_epochs(run.id)[0].metrics
        assert metrics["element_steps"] == math.ceil(metrics["steps"] / 2)
        with EpochFile(store.epoch_path(run.id, 0)) as ef:
            assert ef.stat_bits() == 4
