"""``trainer.track``: your own loop recorded into a run store like ``bnn train`` records.

Local stores here; the service (HTTP, the API and the dashboard on a tracked run) in
tests/service/test_api_tracked.py; PyTorch Lightning in tests/trainer/test_lightning.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainer
from service.analysis import (
    compute_layer_kl_divergences,
    gradient_outliers,
    kl_to_prior,
    prior_trajectories,
)
from trainer import PriorSpec, RunStore, bayesianize, load_distribution_log, mlp, model_kl
from trainer.config import parse_config
from trainer.data import make_regression
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import GradLevel
from trainer.store import RunReader, read_epoch_file
from trainer.train import Trainer, build_model

REPO = Path(__file__).resolve().parents[2]
N, BATCH = 64, 16


@pytest.fixture(scope="module")
def data() -> Any:
    return make_regression(N, 32, seed=0)


def small_model(kind: str = "learnable") -> nn.Module:
    torch.manual_seed(0)
    return mlp(1, [16], 1, PriorSpec(kind=kind))


def train_epoch(model: nn.Module, data: Any, opt: torch.optim.Optimizer, run: Any = None) -> float:
    """One epoch of an ordinary ELBO loop; ``run.step(loss)`` after each backward."""
    total = 0.0
    for start in range(0, N, BATCH):
        x, y = data.x_train[start : start + BATCH], data.y_train[start : start + BATCH]
        loss = F.mse_loss(model(x), y) + model_kl(model) / N
        loss.backward()
        if run is not None:
            run.step(loss)
        opt.step()
        opt.zero_grad()
        total += loss.item()
    return total / (N // BATCH)


def test_a_tracked_loop_is_a_run_like_bnn_train(tmp_path: Path, data: Any) -> None:
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = {"lr": 1e-2, "dataset": "regression", "note": {"why": "test"}}
    with trainer.track(
        model, name="own-loop", config=config, tags=["t"], data_dir=tmp_path, epochs=5,
        capture_every=2, heartbeat_interval=0.05,
    ) as run:  # fmt: skip
        for epoch in range(5):
            loss = train_epoch(model, data, opt, run)
            assert run.log_epoch(epoch, {"loss": loss, "val_nll": torch.tensor(0.5)}) == (
                epoch in (0, 2, 4)
            )
    assert run.status == "completed" and run.captured_epochs == [0, 2, 4]
    assert [h["epoch"] for h in run.history] == [0.0, 1.0, 2.0, 3.0, 4.0]
    with RunStore(tmp_path) as store:
        info = store.get_run(run.id)
        epochs = store.list_epochs(run.id)
    assert info.status.value == "completed" and info.name == "own-loop" and info.tags == ["t"]
    assert info.heartbeat_at is not None and info.finished_at is not None
    assert info.config["note"] == {"why": "test"} and info.config["epochs"] == 5
    assert info.config["prior"] == "learnable" and info.config["prior_mode"] == "gradient"
    assert info.config["resolved_priors"]["layer1.weight"] == "learnable/gradient"
    assert info.config["tracking"]["capture_every"] == 2
    assert info.config["tracking"]["grad_level"] == "element"
    assert [e.epoch for e in epochs] == [0, 2, 4]
    metrics = epochs[-1].metrics
    assert metrics["val_nll"] == 0.5 and metrics["steps"] == N // BATCH
    assert metrics["kl"] == pytest.approx(metrics["kl/layer1"] + metrics["kl/layer2"])
    assert metrics["kl"] == pytest.approx(model_kl(model).item(), rel=1e-5)
    # the seed's distribution_log is the model's state at the last epoch
    log = load_distribution_log(run.id, data_dir=tmp_path)
    np.testing.assert_array_equal(
        log[4]["layer1"]["posterior"]["weight"]["mu"], model.layer1.weight_mu.detach().numpy()
    )
    # gradient statistics from run.step(): one step norm per step, per element stats
    with RunReader(run.id, data_dir=tmp_path) as reader:
        grads = reader.gradients(4, "layer1")
    assert grads["step_norm"].shape == (N // BATCH,)
    assert grads["weight"]["mu"]["max_abs"].shape == (16, 1)
    assert (grads["weight"]["mu"]["max_abs"] > 0).all()
    # the analysis reads it like any run
    assert list(compute_layer_kl_divergences(run.id, data_dir=tmp_path).index) == [
        "layer1",
        "layer2",
    ]
    assert len(kl_to_prior(run.id, data_dir=tmp_path)) == 6  # 3 epochs x 2 layers
    assert len(prior_trajectories(run.id, data_dir=tmp_path)) > 0
    assert len(gradient_outliers(run.id, k=3, data_dir=tmp_path)) == 3


def test_bnn_runs_lists_and_shows_a_tracked_run(
    tmp_path: Path, data: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = {"dataset": "my-data", "widths": {"odd": "value"}}
    with trainer.track(model, name="listed", config=config, data_dir=tmp_path) as run:
        run.log_epoch(0, {"loss": train_epoch(model, data, opt, run)})
    assert main(["runs", "--data-dir", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(run.id))
    assert line.split() == [run.id, "completed", "my-data", "learnable", "1", "listed"]
    assert main(["runs", "show", run.id, "--data-dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "completed" in shown and "loss = " in shown and "kl/layer1 = " in shown


def _structure(tree: Any) -> Any:
    """Keys, dtypes and dimensions (not the per-step lengths) of nested arrays."""
    if isinstance(tree, dict):
        return {key: _structure(value) for key, value in tree.items()}
    arr = np.asarray(tree)
    return (arr.dtype.str, arr.ndim if arr.ndim == 1 else arr.shape)


def test_the_epoch_files_are_those_bnn_train_writes(tmp_path: Path) -> None:
    config = parse_config(
        {"dataset": "regression", "epochs": 1, "n_train": N, "n_test": 16, "eval_samples": 2}
    )
    with RunStore(tmp_path) as store:
        trained = Trainer(config, sink=store, progress=False).fit()
    reference = read_epoch_file(tmp_path / "runs" / trained.run_id / "epoch_000000.h5")
    source = Trainer(config, progress=False)
    model = build_model(config, source.data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with trainer.track(model, data_dir=tmp_path, epochs=1) as run:
        for _ in range(3):
            loss = F.mse_loss(model(source.data.x_train), source.data.y_train) + model_kl(model)
            loss.backward()
            run.step(loss)
            opt.step()
            opt.zero_grad()
    assert run.captured_epochs == [0]  # the pending epoch, logged at the end
    tracked = read_epoch_file(tmp_path / "runs" / run.id / "epoch_000000.h5")
    assert tracked.layer_types == reference.layer_types
    assert tracked.grad_level is reference.grad_level is GradLevel.ELEMENT
    assert _structure(tracked.params) == _structure(reference.params)
    assert _structure(tracked.gradients) == _structure(reference.gradients)
    assert {"kl", "kl/layer1", "steps", "epoch_time_s"} <= set(tracked.metrics)
    assert tracked.metrics["steps"] == 3


def test_capture_every_the_planned_last_epoch_and_the_end(tmp_path: Path, data: Any) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    # no planned epochs: 0 and 3 by capture_every; 4 (the last logged) at the end, no gradients
    with trainer.track(model, data_dir=tmp_path, capture_every=3, grad_level="layer") as run:
        for _ in range(5):
            train_epoch(model, data, opt, run)
            run.log_epoch()  # epochs 0, 1, 2, ... by default
    assert run.captured_epochs == [0, 3, 4]
    with RunReader(run.id, data_dir=tmp_path) as reader:
        assert reader.epochs == [0, 3, 4]
        assert reader.header(3).grad_level is GradLevel.LAYER
        assert reader.header(4).grad_level is GradLevel.NONE
    # planned epochs: the last is due, with gradients
    with trainer.track(model, data_dir=tmp_path, capture_every=3, epochs=5) as planned:
        for epoch in range(5):
            train_epoch(model, data, opt, planned)
            planned.log_epoch(epoch)
    assert planned.captured_epochs == [0, 3, 4]
    with RunReader(planned.id, data_dir=tmp_path) as reader:
        assert reader.header(4).grad_level is GradLevel.ELEMENT


def test_an_optimizer_hook_records_the_steps(tmp_path: Path, data: Any) -> None:
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with trainer.track(model, data_dir=tmp_path, optimizer=opt) as run:
        train_epoch(model, data, opt)  # no run.step(): the hook records
        with pytest.raises(BnnError, match="step hook"):
            run.step()
        run.log_epoch(0)
    assert run.global_step == N // BATCH and run.captured_epochs == [0]
    with RunReader(run.id, data_dir=tmp_path) as reader:
        assert reader.gradients(0, "layer2")["step_norm"].shape == (N // BATCH,)
    opt.step()  # the hook is gone with the run: nothing is recorded, nothing raises
    assert run.global_step == N // BATCH


def test_a_recording_adam_hook_takes_the_statistics_in_its_pass(tmp_path: Path, data: Any) -> None:
    """track(optimizer=RecordingAdam): the statistics come from the update's own pass and equal
    those run.step() records before the update (same seeds, same run)."""
    grads = {}
    for mode in ("hook", "step"):
        model = small_model()
        opt = trainer.RecordingAdam(model.parameters(), lr=1e-2, one_pass_min=0)
        hooked = opt if mode == "hook" else None
        with trainer.track(
            model, data_dir=tmp_path / mode, optimizer=hooked, grad_level="element"
        ) as run:
            torch.manual_seed(5)
            train_epoch(model, data, opt, None if hooked else run)
            run.log_epoch(0)
        assert opt.fused_steps == N // BATCH
        with RunReader(run.id, data_dir=tmp_path / mode) as reader:
            grads[mode] = reader.gradients(0, "layer1")
    for key in ("step_norm",):
        np.testing.assert_array_equal(grads["hook"][key], grads["step"][key])
    for kind in ("weight", "bias"):
        for p in ("mu", "rho"):
            for stat in ("mean_abs", "max_abs", "nonfinite"):
                np.testing.assert_array_equal(
                    grads["hook"][kind][p][stat], grads["step"][kind][p][stat]
                )


def test_an_exception_fails_the_run_keeps_its_epochs_and_is_raised(
    tmp_path: Path, data: Any
) -> None:
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with (  # noqa: PT012 - the whole loop
        pytest.raises(RuntimeError, match="out of data"),
        trainer.track(model, data_dir=tmp_path) as run,
    ):
        train_epoch(model, data, opt, run)
        run.log_epoch(0)
        train_epoch(model, data, opt, run)
        raise RuntimeError("out of data")
    with RunStore(tmp_path) as store:
        info = store.get_run(run.id)
        assert info.status.value == "failed"
        assert info.error == "RuntimeError: out of data"
        assert [e.epoch for e in store.list_epochs(run.id)] == [0]  # nothing added at the end
    with pytest.raises(BnnError) as ended:
        run.log_epoch(1)
    assert ended.value.code is ErrorCode.CONFLICT


class FailingStore(RunStore):
    """A run store whose second epoch write fails (a full disk, say)."""

    writes = 0

    def write_epoch(self, run_id: str, snap: Any) -> Any:
        self.writes += 1
        if self.writes == 2:
            raise BnnError(ErrorCode.STORAGE, "no space left on device")
        return super().write_epoch(run_id, snap)


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_epoch_write_fails_the_run(tmp_path: Path, background: bool) -> None:
    store = FailingStore(tmp_path)
    model = small_model()
    with (  # noqa: PT012 - the loop
        pytest.raises(BnnError, match="no space left"),
        trainer.track(model, sink=store, background_writes=background) as run,
    ):
        assert run.log_epoch(0)
        run.log_epoch(1)  # its write fails: here, or in the background
        run.log_epoch(2)  # raises the background write's error
    assert run.status == "failed" and run.captured_epochs == [0]
    info = store.get_run(run.id)
    assert info.status.value == "failed" and "no space left" in (info.error or "")
    assert [e.epoch for e in store.list_epochs(run.id)] == [0]
    store.close()


def test_keyboard_interrupt_ends_the_run_interrupted(tmp_path: Path, data: Any) -> None:
    model = small_model()
    with pytest.raises(KeyboardInterrupt), trainer.track(model, data_dir=tmp_path) as run:  # noqa: PT012
        run.log_epoch(0)
        raise KeyboardInterrupt
    with RunStore(tmp_path) as store:
        info = store.get_run(run.id)
    assert info.status.value == "interrupted" and "KeyboardInterrupt" in (info.error or "")


def test_a_diverged_loop_ends_diverged_with_where(tmp_path: Path, data: Any) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with trainer.track(model, data_dir=tmp_path, epochs=3) as run:
        train_epoch(model, data, opt, run)
        run.log_epoch(0)
        x = data.x_train[:BATCH]
        loss = model(x).sum() * torch.tensor(float("nan"))
        loss.backward()
        run.step(loss)  # step 4 (0-based), epoch 1
        opt.zero_grad()
        run.log_epoch(1)
        assert run.divergence is not None
        assert (run.divergence.step, run.divergence.epoch) == (N // BATCH, 1)
    assert run.status == "diverged"
    with RunStore(tmp_path) as store:
        info = store.get_run(run.id)
        assert info.status.value == "diverged" and "non-finite loss at step 4" in (info.error or "")
        assert (info.diverged_step, info.diverged_epoch) == (4, 1)
        assert info.diverged_layer == "layer1.weight_mu"
        assert [e.epoch for e in store.list_epochs(run.id)] == [0, 1]


def test_a_bayesianized_model_and_a_user_config_like_a_training_config(tmp_path: Path) -> None:
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    model = bayesianize(plain, PriorSpec(kind="fixed"))
    config = {"dataset": "mnist", "model": "mlp", "widths": [7]}  # not what the model is
    with trainer.track(model, config=config, data_dir=tmp_path, grad_level="none") as run:
        model(torch.randn(4, 1, 6, 6)).sum().backward()
        run.step()
        run.log_epoch(0, {"acc": np.float32(0.25)})
    with RunStore(tmp_path) as store:
        info = store.get_run(run.id)
    assert info.config["prior"] == "fixed" and "prior_mode" not in info.config
    assert info.config["tracking"]["model"] == "Sequential"
    with RunReader(run.id, data_dir=tmp_path) as reader:
        header = reader.header(0)
    assert header.layer_types == {"0": "BayesConv2d", "3": "BayesLinear"}
    assert header.metrics["acc"] == 0.25 and not header.has_gradients


def test_defaults_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BNN_TRACKING_URL", raising=False)
    monkeypatch.setenv("BNN_DATA_DIR", str(tmp_path / "from-env"))
    with trainer.track(small_model()) as run:
        run.log_epoch(0)
    assert run.data_dir == tmp_path / "from-env" and run.url is None
    with RunStore(tmp_path / "from-env") as store:
        assert store.get_run(run.id).status.value == "completed"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BNN_DATA_DIR")
    with trainer.track(small_model()) as run:
        pass
    assert (tmp_path / "bnn-data" / "catalog.db").is_file()
    monkeypatch.setenv("BNN_HEARTBEAT_S", "soon")
    with pytest.raises(BnnError, match=r"\$BNN_HEARTBEAT_S must be a number.*'soon'"):
        trainer.track(small_model(), data_dir=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": nn.Linear(2, 2)}, "Linear has no Bayesian layer.*bayesianize"),
        ({"model": "a model"}, "needs an nn.Module, got str"),
        ({"grad_level": "weights"}, r"grad_level must be one of \['none', 'layer', 'element'\]"),
        ({"capture_every": 0}, "capture_every must be an integer >= 1, got 0"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"epochs": 3, "config": {"epochs": 4}}, r"epochs=3 but config\['epochs'\] is 4"),
        ({"config": {"epochs": "ten"}}, r"config\['epochs'\] must be an integer >= 0.*'ten'"),
        ({"config": {"dataset": {"name": "cifar"}}}, r"config\['dataset'\] must be a string"),
        ({"config": {"tracking": 1}}, "'tracking' is the tracker's own"),
        ({"config": {"seed": object()}}, r"config\['seed'\] is not JSON-serialisable"),
        ({"config": [1, 2]}, "config must be a dict of settings, got list"),
        ({"tags": "a,b"}, "tags must be a list of strings, got the string 'a,b'"),
        ({"name": " "}, "name must be a non-blank string"),
        ({"optimizer": "adam"}, "optimizer must be a torch.optim.Optimizer, got str"),
        ({"tracking_url": "ftp://x"}, "tracking_url must be an http:// or https:// URL"),
        ({"heartbeat_interval": -1}, "heartbeat_interval must be a number of seconds > 0"),
    ],
)
def test_bad_arguments_are_clear_errors_and_store_nothing(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"model": small_model(), "data_dir": tmp_path / "d", **kwargs}
    if "tracking_url" in kwargs:
        del args["data_dir"]
    with pytest.raises(BnnError, match=message) as caught:
        trainer.track(args.pop("model"), **args)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    if (tmp_path / "d" / "catalog.db").exists():
        with RunStore(tmp_path / "d") as store:
            assert store.list_runs() == []


def test_both_destinations_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BnnError, match=r"give tracking_url .* or data_dir .*, not both"):
        trainer.track(small_model(), tracking_url="http://127.0.0.1:9", data_dir=tmp_path)


def test_bad_epochs_and_metrics_are_clear_errors(tmp_path: Path) -> None:
    with trainer.track(small_model(), data_dir=tmp_path) as run:
        run.log_epoch(2)
        with pytest.raises(BnnError, match=r"epoch 1 comes after epoch 2.*next: 3"):
            run.log_epoch(1)
        with pytest.raises(BnnError, match="epoch must be an integer >= 0, got -1"):
            run.log_epoch(-1)
        with pytest.raises(BnnError, match="metric 'loss' must be a number or a one-element"):
            run.log_epoch(3, {"loss": torch.ones(2)})
        with pytest.raises(BnnError, match="metric 'ok' must be a number, got True"):
            run.log_epoch(3, {"ok": True})
        assert run.log_epoch(3, {"loss": 1})
    assert run.captured_epochs == [2, 3]


SCRIPT = """
import sys, time, torch
import torch.nn.functional as F
import trainer
from trainer import PriorSpec, mlp, model_kl

mode, data_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = mlp(1, [8], 1, PriorSpec(kind="learnable"))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
x = torch.linspace(-1, 1, 32).unsqueeze(1)

def epoch(run, n):
    loss = F.mse_loss(model(x), torch.sin(x)) + model_kl(model) / 32
    loss.backward(); run.step(loss); opt.step(); opt.zero_grad()
    run.log_epoch(n, {"loss": loss})
    print(f"epoch {n}", flush=True)

if mode == "with":
    with trainer.track(model, data_dir=data_dir, heartbeat_interval=0.2) as run:
        for n in range(10**6):
            epoch(run, n)
            time.sleep(0.05)
else:  # no with, no finish: the interpreter's exit ends the run
    run = trainer.track(model, data_dir=data_dir)
    for n in range(2):
        epoch(run, n)
    if mode == "open-raise":
        raise ValueError("lost the data")
"""


def _start(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), mode, str(tmp_path / "data")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_epochs(proc: subprocess.Popen[str], count: int) -> None:
    assert proc.stdout is not None
    for _ in range(count):
        line = proc.stdout.readline()
        assert line.startswith("epoch"), (line, proc.stderr.read() if proc.stderr else "")


def _only_run(tmp_path: Path, stale_after_s: float = 3600) -> Any:
    with RunStore(tmp_path / "data", stale_after_s=stale_after_s) as store:
        (run,) = store.list_runs()
        return run, [e.epoch for e in store.list_epochs(run.id)]


def test_sigterm_ends_the_run_interrupted(tmp_path: Path) -> None:
    proc = _start(tmp_path, "with")
    try:
        _wait_epochs(proc, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    run, epochs = _only_run(tmp_path)
    assert run.status.value == "interrupted" and run.error == "terminated by SIGTERM"
    assert epochs[:2] == [0, 1]


def test_a_sigkilled_process_ends_interrupted_by_its_stopped_heartbeat(tmp_path: Path) -> None:
    proc = _start(tmp_path, "with")
    try:
        _wait_epochs(proc, 2)
        deadline = time.monotonic() + 60  # stored: epochs are written in the background
        while len(_only_run(tmp_path)[1]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    run, epochs = _only_run(tmp_path)
    assert run.status.value == "running"  # not reaped while heartbeats are recent
    time.sleep(1.5)
    run, epochs = _only_run(tmp_path, stale_after_s=1.0)
    assert run.status.value == "interrupted" and "no heartbeat since" in (run.error or "")
    assert epochs[:2] == [0, 1]
    with RunStore(tmp_path / "data") as store:
        # killed while a later epoch was being written in the background: at most that
        # epoch is left half-done, as any killed writer leaves it -- its temp file (killed
        # before the rename; --repair removes it) or its complete file without a catalog row
        # (killed between the rename and the commit; --repair adopts it)
        report = store.fsck()
        problems = [f for f in report.findings if f.problem]
        left = {("tmp", "remove"), ("orphan", "adopt")}
        assert all((f.kind, f.action) in left for f in problems), report.table()
        assert len(problems) <= 1, report.table()
        store.fsck(repair=True)
        assert store.fsck().clean
        assert [e.epoch for e in store.list_epochs(run.id)][:2] == [0, 1]


@pytest.mark.parametrize(
    ("mode", "status", "error"),
    [("open", "completed", None), ("open-raise", "failed", "ValueError: lost the data")],
)
def test_a_run_left_open_ends_with_the_interpreter(
    tmp_path: Path, mode: str, status: str, error: str | None
) -> None:
    proc = _start(tmp_path, mode)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (0 if status == "completed" else 1), err
    assert "Traceback" in err if error else not err.strip()
    run, epochs = _only_run(tmp_path)
    assert run.status.value == status and epochs == [0, 1]
    assert (run.error is None) if error is None else (error in run.error)


def test_a_tracked_loop_can_ask_for_the_archive_form(tmp_path: Path, data: Any) -> None:
    """``track(stat_bits=..., compress_posteriors=...)`` as ``bnn train --stat-bits``: the
    epoch files carry it and the stored configuration says so; bad values are refused before
    the run exists."""
    from trainer.store import EpochFile

    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with trainer.track(model, data_dir=tmp_path, epochs=2, stat_bits=2) as run:
        for epoch in range(2):
            run.log_epoch(epoch, {"loss": train_epoch(model, data, opt, run)})
    with RunStore(tmp_path) as store:
        config = store.get_run(run.id).config
        assert config["tracking"]["stat_bits"] == 2
        assert "compress_posteriors" not in config["tracking"]
        for epoch in (0, 1):
            with EpochFile(store.epoch_path(run.id, epoch)) as ef:
                assert ef.stat_bits() == 2
        for bad, message in [
            ({"stat_bits": 8}, "stat_bits must be from 0 to 7, got 8"),
            ({"stat_bits": "3"}, "stat_bits must be an integer from 0 to 7, got '3'"),
            ({"compress_posteriors": "yes"}, "compress_posteriors must be True, False or None"),
        ]:
            with pytest.raises(BnnError, match=message):
                trainer.track(small_model(), sink=store, epochs=1, **bad)
        assert [r.id for r in store.list_runs()] == [run.id]
