"""The trainer on a GPU; skipped where CUDA is absent (CI has none)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.capture import GradientRecorder, get_all_distribution_params
from trainer.config import parse_config
from trainer.layers import empirical_bayes_step, model_kl, prior_penalty
from trainer.models import bayesianize, mlp, small_cnn
from trainer.priors import PriorSpec
from trainer.snapshot import GradLevel
from trainer.store import RunStore, load_distribution_log
from trainer.train import Trainer, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("mode", ["gradient", "empirical_bayes", "hierarchical"])
def test_layers_and_capture_on_cuda(mode: str) -> None:
    dev = torch.device("cuda")
    model = mlp(784, [64, 64], 10, PriorSpec(mode=mode), local_reparam=mode == "gradient").to(dev)
    rec = GradientRecorder(model, GradLevel.ELEMENT)
    for _ in range(3):
        model.zero_grad()
        x = torch.randn(32, 784, device=dev)
        y = torch.randint(0, 10, (32,), device=dev)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (loss + (model_kl(model) + prior_penalty(model)) / 1000).backward()
        rec.record_step()
        empirical_bayes_step(model)
    stats = rec.result()
    assert stats is not None
    assert stats["layer1"]["weight"]["mu"]["mean_abs"].shape == (64, 784)
    log = get_all_distribution_params(model, 0, force=True)
    assert log is not None
    assert isinstance(log["layer2"]["posterior"]["weight"]["sigma"], np.ndarray)
    plain = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 26 * 26, 10),
    ).to(dev)
    conv = bayesianize(plain, PriorSpec.fixed())
    assert conv(torch.randn(2, 1, 28, 28, device=dev)).shape == (2, 10)
    assert small_cnn()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_training_on_cuda_stores_every_epoch(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    cfg = {
        "dataset": "mnist",
        "widths": [128],
        "epochs": 2,
        "n_train": 2048,
        "n_test": 512,
        "device": "cuda",
        "mc_samples": 2,
    }
    result = train(cfg, sink=store, progress=False)
    assert next(result.model.parameters()).is_cuda
    log = load_distribution_log(result.run_id, data_dir=tmp_path)
    assert sorted(log) == [0, 1]
    assert result.history[-1]["test_acc"] > 0.5


def _sync_warnings(trainer: Trainer, epoch: int) -> int:
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_epoch(epoch, capture=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return len(caught)


def test_no_host_synchronisation_per_step_on_cuda() -> None:
    """A training epoch waits for the GPU a fixed number of times (its end-of-epoch
    metrics), however many steps it takes: none per step, capture included."""
    counts = {}
    for n_train in (256, 2048):
        cfg = parse_config(
            {
                "dataset": "mnist",
                "widths": [64],
                "n_train": n_train,
                "n_test": 64,
                "batch_size": 64,
                "device": "cuda",
                "grad_capture": "element",
                "prior": "learnable",
            }
        )
        trainer = Trainer(cfg, progress=False)
        trainer.train_epoch(0, capture=True)  # warm-up (allocations, lazy initialisation)
        counts[n_train] = _sync_warnings(trainer, 1)
    assert counts[256] == counts[2048], counts  # 4 steps or 32 steps: the same waits


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_on_cuda_stores_every_epoch(tmp_path: Path, mode: str) -> None:
    store = RunStore(tmp_path)
    cfg = {
        "dataset": "mnist",
        "widths": [128],
        "epochs": 2,
        "n_train": 2048,
        "n_test": 512,
        "device": "cuda",
        "grad_capture": "element",
        "prior": "learnable",
    }
    result = train(cfg, sink=store, progress=False, compile=mode)
    assert result.captured_epochs == [0, 1]
    assert result.history[-1]["test_acc"] > 0.5
