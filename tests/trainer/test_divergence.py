"""A run whose loss or gradients become non-finite: detected at its first step, recorded in
the catalog (migration 0003), stopped as DIVERGED (or trained on with ``continue``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from alembic import command
from sqlalchemy import MetaData, Table, inspect

from service.cli import EXIT_DIVERGED, main
from trainer.config import parse_config
from trainer.data import num_batches
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore
from trainer.store.migrations import alembic_config, make_engine
from trainer.train import Divergence, Trainer

# 256 examples in batches of 64: 4 steps per epoch
TINY: dict[str, Any] = {"dataset": "regression", "n_train": 256, "batch_size": 64}
TINY |= {"eval_samples": 2, "val_samples": 2, "seed": 0}
STEPS = 4


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "data", stale_after_s=0)
    yield s
    s.close()


def _trainer(store: RunStore | None, **overrides: Any) -> Trainer:
    return Trainer(parse_config({**TINY, **overrides}), sink=store, progress=False)


def _nan_gradient_at(trainer: Trainer, name: str, step: int) -> list[int]:
    """Make parameter ``name``'s gradient NaN at global step ``step`` (the loss stays
    finite; the update then makes the parameter NaN). Returns the list of steps seen."""
    param = dict(trainer.model.named_parameters())[name]
    seen: list[int] = []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        seen.append(len(seen))
        return grad * math.nan if len(seen) - 1 == step else grad

    param.register_hook(hook)
    return seen


def _nan_weight_after(trainer: Trainer, name: str, step: int) -> None:
    """Set one element of parameter ``name`` to NaN right after the update of ``step``."""
    param = dict(trainer.model.named_parameters())[name]
    count = [0]

    def post_step(*_: Any) -> None:
        if count[0] == step:
            with torch.no_grad():
                param.view(-1)[0] = math.nan
        count[0] += 1

    trainer.optimizer.register_step_post_hook(post_step)


def test_a_nan_gradient_stops_the_run_at_its_step_and_keeps_the_epochs(store: RunStore):
    trainer = _trainer(store, epochs=5)
    assert num_batches(256, 64) == STEPS
    seen = _nan_gradient_at(trainer, "layer2.bias_mu", step=6)  # epoch 1, its third step
    result = trainer.fit()
    assert result.status == "diverged" and result.diverged and not result.cancelled
    assert result.divergence == Divergence(
        step=6, epoch=1, layer="layer2.bias_mu", loss_finite=True
    )
    assert len(seen) == 2 * STEPS  # stopped at the end of the diverging epoch
    assert result.captured_epochs == [0, 1] and len(result.history) == 2
    assert result.evaluation is None and result.selected_epoch is None
    run = store.get_run(result.run_id)
    assert run.status is RunStatus.DIVERGED and run.status.terminal
    assert (run.diverged_step, run.diverged_epoch, run.diverged_layer) == (
        6,
        1,
        "layer2.bias_mu",
    )
    assert run.error is not None and "step 6 (epoch 1)" in run.error
    assert run.finished_at is not None
    assert run.to_dict()["diverged_step"] == 6
    with store.reader(run.id, verify=True) as reader:
        assert reader.epochs == [0, 1]
        assert math.isfinite(reader.metrics(0)["loss"])
        assert not math.isfinite(reader.metrics(1)["loss"])
        assert "val_nll" not in reader.metrics(1)  # no validation on NaN weights
        before = reader.epoch_params(0)["layer2"]["posterior"]["bias"]["mu"]
        after = reader.epoch_params(1)["layer2"]["posterior"]["bias"]["mu"]
        assert np.isfinite(before).all() and np.isnan(after).all()
        grads = reader.gradients(1, "layer2")  # the diverging epoch's non-finite counts
        assert int(np.sum(grads["bias"]["mu"]["nonfinite"])) >= 1
        assert int(np.sum(reader.gradients(0, "layer2")["bias"]["mu"]["nonfinite"])) == 0
    with pytest.raises(BnnError) as err:
        store.heartbeat(run.id)
    assert err.value.code is ErrorCode.CONFLICT


def test_a_nan_weight_is_caught_by_the_next_steps_loss(store: RunStore):
    trainer = _trainer(store, epochs=4, capture_every=3)  # epoch 1 is not a capture epoch
    _nan_weight_after(trainer, "layer1.weight_mu", step=4)  # first update of epoch 1
    result = trainer.fit()
    assert result.divergence is not None
    assert (result.divergence.step, result.divergence.epoch) == (5, 1)
    assert not result.divergence.loss_finite
    assert "non-finite loss at step 5" in result.divergence.describe()
    # the diverging epoch is captured although not due (without gradient statistics)
    assert result.captured_epochs == [0, 1]
    with store.reader(result.run_id) as reader:
        assert not reader.header(1).has_gradients
    assert store.get_run(result.run_id).status is RunStatus.DIVERGED


def test_continue_trains_on_but_records_the_first_step(store: RunStore):
    trainer = _trainer(store, epochs=3, on_divergence="continue")
    _nan_gradient_at(trainer, "layer2.bias_mu", step=2)
    result = trainer.fit()
    assert result.status == "completed" and not result.diverged
    assert result.divergence == Divergence(2, 0, "layer2.bias_mu", loss_finite=True)
    assert result.captured_epochs == [0, 1, 2]
    run = store.get_run(result.run_id)
    assert run.status is RunStatus.COMPLETED and run.error is None
    assert (run.diverged_step, run.diverged_epoch, run.diverged_layer) == (2, 0, "layer2.bias_mu")


def _finite_steps(monkeypatch: pytest.MonkeyPatch, trainer: Trainer) -> list[bool]:
    """Wrap ``Tensor.backward``: per call (training step), whether the loss and every
    gradient were finite, checked independently of the trainer's own watch."""
    steps: list[bool] = []
    original = torch.Tensor.backward

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        params = [*trainer.model.parameters(), trainer.noise_rho]
        grads = [p.grad for p in params if p is not None and p.grad is not None]
        ok = bool(torch.isfinite(self).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
        steps.append(ok)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    return steps


def test_a_large_learning_rate_diverges_within_one_epoch_of_its_first_bad_step(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
):
    trainer = _trainer(store, epochs=6, optimizer="sgd", lr=10.0, n_train=1024)
    steps = _finite_steps(monkeypatch, trainer)
    result = trainer.fit()
    first = steps.index(False)  # the independent count agrees exactly
    d = result.divergence
    assert d is not None and d.step == first and d.epoch == first // 16
    assert result.status == "diverged"
    assert len(steps) == 16 * (d.epoch + 1)  # stopped at the end of that epoch
    assert result.captured_epochs == list(range(d.epoch + 1))
    assert store.get_run(result.run_id).diverged_step == first


def test_train_epoch_counts_global_steps_and_keeps_the_first_divergence():
    trainer = _trainer(None, epochs=2)
    trainer.train_epoch(0, capture=False)
    assert trainer.divergence is None and trainer.global_step == STEPS
    _nan_gradient_at(trainer, "layer1.weight_rho", step=1)  # hook counts from now: step 5
    trainer.train_epoch(1, capture=False)
    assert trainer.divergence == Divergence(5, 1, "layer1.weight_rho", loss_finite=True)
    trainer.train_epoch(2, capture=False)  # later non-finite steps do not move it
    assert trainer.divergence.step == 5 and trainer.global_step == 3 * STEPS


# ----------------------------------------------------------------------------- catalog
def test_catalog_records_the_first_divergence_once(tmp_path: Path, db_url: str | None):
    with RunStore(tmp_path / "data", db_url, stale_after_s=0) as store:
        run = store.create_run("d", {})
        assert run.diverged_step is None and run.to_dict()["diverged_layer"] is None
        got = store.set_divergence(run.id, 12, 3, "layer1.weight_mu")
        assert (got.diverged_step, got.diverged_epoch, got.diverged_layer) == (
            12,
            3,
            "layer1.weight_mu",
        )
        assert store.set_divergence(run.id, 12, 3, "layer1.weight_mu") == store.get_run(run.id)
        with pytest.raises(BnnError) as err:
            store.set_divergence(run.id, 13, 3, "layer1.weight_mu")
        assert err.value.code is ErrorCode.CONFLICT and "step 12" in str(err.value)
        for bad in ((-1, 0, None), (True, 0, None), (1, -1, None), (1, 0, ""), (1, 0, "x" * 257)):
            with pytest.raises(BnnError) as err:
                store.set_divergence(run.id, *bad)
            assert err.value.code is ErrorCode.INVALID_ARGUMENT
        big = store.set_divergence(store.create_run("big", {}).id, 2**40, 0)
        assert big.diverged_step == 2**40 and big.diverged_layer is None
        done = store.set_status(run.id, RunStatus.DIVERGED, error="non-finite loss")
        assert done.status is RunStatus.DIVERGED and done.finished_at is not None
        for status in (RunStatus.RUNNING, RunStatus.COMPLETED, RunStatus.FAILED):
            with pytest.raises(BnnError) as err:
                store.set_status(run.id, status)
            assert err.value.code is ErrorCode.CONFLICT
        assert [r.id for r in store.list_runs(status="diverged")] == [run.id]
        queued = store.create_run("q", {}, status=RunStatus.QUEUED)
        with pytest.raises(BnnError):
            store.set_status(queued.id, RunStatus.DIVERGED)
        lost = store.create_run("lost", {})
        store.set_status(lost.id, RunStatus.INTERRUPTED)  # presumed dead, then reports back
        assert store.set_status(lost.id, RunStatus.DIVERGED).status is RunStatus.DIVERGED


def test_head_revision_constant_is_alembics_head() -> None:
    """Opening a catalog at head skips Alembic by comparing with HEAD_REVISION: it must be the
    newest revision of versions/ (add a migration, update the constant)."""
    from alembic.script import ScriptDirectory

    from trainer.store.migrations import HEAD_REVISION

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD_REVISION


def _migrate(url: str, revision: str, action: Callable[..., None]) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            action(cfg, revision)
    finally:
        engine.dispose()


def test_a_catalog_of_the_previous_version_is_upgraded_at_open(tmp_path: Path, db_url: str | None):
    data = tmp_path / "data"
    data.mkdir()
    url = db_url or f"sqlite:///{(data / 'catalog.db').resolve()}"
    _migrate(url, "0002", command.upgrade)
    engine = make_engine(url)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    now = now.replace(tzinfo=None) if db_url is None else now  # as the catalog stores it
    try:
        with engine.begin() as conn:
            assert "diverged_step" not in {c["name"] for c in inspect(conn).get_columns("runs")}
            runs = Table("runs", MetaData(), autoload_with=conn)
            epochs = Table("epochs", MetaData(), autoload_with=conn)
            conn.execute(
                runs.insert(),
                {
                    "id": "old1",
                    "name": "old",
                    "status": "completed",
                    "config": {"lr": 0.01},
                    "tags": ["v2"],
                    "created_at": now,
                    "updated_at": now,
                    "heartbeat_at": None,
                    "finished_at": now,
                    "host": "h",
                    "error": None,
                    "summary": {},
                },
            )
            conn.execute(
                epochs.insert(),
                {
                    "run_id": "old1",
                    "epoch": 0,
                    "metrics": {"loss": 1.0},
                    "file": "runs/old1/epoch_000000.h5",
                    "size": 10,
                    "checksum": "0" * 64,
                    "created_at": now,
                },
            )
    finally:
        engine.dispose()
    with RunStore(data, db_url, stale_after_s=0) as store:  # upgrades 0002 -> 0003
        old = store.get_run("old1")
        assert old.status is RunStatus.COMPLETED and old.config == {"lr": 0.01}
        assert old.created_at == datetime(2026, 1, 1, tzinfo=UTC)
        assert (old.diverged_step, old.diverged_epoch, old.diverged_layer) == (None, None, None)
        assert [e.epoch for e in store.list_epochs("old1")] == [0]
        new = store.create_run("new", {})
        store.set_divergence(new.id, 7, 1, "layer2.weight_mu")
        store.set_status(new.id, RunStatus.DIVERGED, error="x")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            cols = {c["name"]: c for c in inspect(conn).get_columns("runs")}
            assert {"diverged_step", "diverged_epoch", "diverged_layer"} <= set(cols)
            assert all(cols[n]["nullable"] for n in ("diverged_step", "diverged_layer"))
    finally:
        engine.dispose()
    # and back: the columns go, every run and epoch row stays (no cascading table copy)
    _migrate(url, "0002", command.downgrade)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert "diverged_step" not in {c["name"] for c in inspect(conn).get_columns("runs")}
            assert conn.exec_driver_sql("SELECT count(*) FROM runs").scalar() == 2
            assert conn.exec_driver_sql("SELECT count(*) FROM epochs").scalar() == 1
    finally:
        engine.dispose()
    with RunStore(data, db_url, stale_after_s=0) as store:  # up again at the next open
        assert store.get_run("old1").diverged_step is None


# ----------------------------------------------------------------------------- CLI
def test_bnn_train_exits_non_zero_when_the_run_diverges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    args = ["train", "--data-dir", str(tmp_path), "--no-progress", "--epochs", "4"]
    args += ["--n-train", "256", "--optimizer", "sgd", "--lr", "10", "--eval-samples", "2"]
    assert main(args) == EXIT_DIVERGED != 0
    out, err = capsys.readouterr()
    run_id = out.strip().splitlines()[-1]
    assert f"error: run {run_id} diverged: non-finite" in err
    assert main(["runs", "--data-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "diverged" in listing and "[diverged at step" in listing
    assert main(["runs", "--data-dir", str(tmp_path), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["status"] == "diverged" and shown["diverged_step"] is not None
    assert main(["runs", "show", run_id, "--data-dir", str(tmp_path)]) == 0
    assert "diverged: step" in capsys.readouterr().out
    # lr 1e8 is refused outright (invalid configuration), also non-zero
    assert main([*args[:-4], "--lr", "1e8"]) != 0
    # with `continue` the run completes, exit 0, and a warning says where it diverged
    assert main([*args, "--on-divergence", "continue"]) == 0
    assert "warning:" in capsys.readouterr().err
