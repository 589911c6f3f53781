"""trainer.optim.RecordingAdam: the one-pass Adam/AdamW update agrees with torch.optim's, the
statistics it records in that pass are the recorder's own, recording never changes the
update, and everything it cannot take falls back to torch's update."""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import kernels
from trainer.capture import GradientRecorder
from trainer.config import parse_config
from trainer.layers import BayesLinear, model_kl
from trainer.optim import RecordingAdam, record_with
from trainer.priors import PriorKind, PriorSpec
from trainer.snapshot import GradLevel
from trainer.store import RunStore
from trainer.train import Trainer, train

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and (shutil.which("cc") or shutil.which("gcc"))),
    reason="the fused kernels are built with a C compiler on Linux",
)


def _bayes_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    prior = PriorSpec(kind=PriorKind.LEARNABLE, min_group=1)
    # 300 x 260 = 78,000 weights: above the kernels' parallel threshold; the rest below it
    return nn.Sequential(
        BayesLinear(260, 300, prior=prior), nn.ReLU(), BayesLinear(300, 4, prior=prior)
    )


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 260, generator=gen)
    y = torch.randint(0, 4, (16,), generator=gen)
    torch.manual_seed(2000 + step)  # the same weight draw in both models
    return F.cross_entropy(model(x), y) + model_kl(model) / 500


def _train_side_by_side(
    recorded: tuple[nn.Module, torch.optim.Optimizer],
    other: tuple[nn.Module, torch.optim.Optimizer],
    recorder: GradientRecorder,
    steps: int,
) -> None:
    """The same steps for two models; the first's recorded as bnn train records them."""
    for step in range(steps):
        for model, opt in (recorded, other):
            opt.zero_grad()
            _loss(model, step).backward()
        record_with(recorded[1], recorder)
        recorded[1].step()
        other[1].step()


def _flat(d: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


@pytest.mark.parametrize(("weight_decay", "decoupled"), [(0.0, False), (0.05, False), (0.05, True)])
def test_update_agrees_with_torch_adam_and_adamw(weight_decay: float, decoupled: bool) -> None:
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(300, 400), nn.Tanh(), nn.Linear(400, 3))
    ref = copy.deepcopy(ours)
    groups = lambda m: [  # noqa: E731 - two groups with their own learning rates
        {"params": m[0].parameters(), "lr": 3e-3},
        {"params": m[2].parameters()},
    ]
    opt = RecordingAdam(
        groups(ours),
        one_pass_min=0,
        lr=1e-3,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
    )
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref_opt = kind(groups(ref), lr=1e-3, weight_decay=weight_decay)
    for step in range(30):
        x = torch.randn(32, 300, generator=torch.Generator().manual_seed(step))
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    assert opt.fused_steps == 30, kernels.status()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        # float32 rounding only: the parameters moved by up to 0.09; Adam's m / sqrt(v) of
        # a gradient near 0 amplifies a rounding difference in a few elements
        diff = (p - q).detach().abs()
        assert float(diff.max()) < 2e-5 and float(diff.mean()) < 2e-7
    for a, b in zip(opt.state.values(), ref_opt.state.values(), strict=True):
        assert float(a["step"]) == float(b["step"]) == 30
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("level", [GradLevel.LAYER, GradLevel.ELEMENT])
def test_statistics_from_the_update_pass_are_the_recorders(level: GradLevel) -> None:
    """Recorded in the optimiser's pass or by record_step before torch's update: the same
    statistics (non-finite gradients included), and recording does not change the run."""
    fused_model, plain_model, unrecorded = _bayes_model(), _bayes_model(), _bayes_model()
    fused_opt = RecordingAdam(fused_model.parameters(), one_pass_min=0, lr=1e-3)
    plain_opt = RecordingAdam(plain_model.parameters(), one_pass_min=0, lr=1e-3)
    free_opt = RecordingAdam(unrecorded.parameters(), one_pass_min=0, lr=1e-3)
    fused_rec, plain_rec = (
        GradientRecorder(fused_model, level),
        GradientRecorder(plain_model, level),
    )
    for step in range(4):
        for model, opt in (
            (fused_model, fused_opt),
            (plain_model, plain_opt),
            (unrecorded, free_opt),
        ):
            opt.zero_grad()
            _loss(model, step).backward()
        if step == 3:  # non-finite gradients (in the last step: the NaN reaches the weights)
            for model in (fused_model, plain_model):
                model[0].weight_mu.grad.view(-1)[[5, 70_000]] = torch.tensor([math.nan, math.inf])
        fused_opt.record_next_step(fused_rec)
        fused_opt.step()
        plain_rec.record_step()
        plain_opt.step()
        free_opt.step()
    assert fused_opt.fused_steps == 4 and plain_opt.fused_steps == 4
    got, want = _flat(fused_rec.result() or {}), _flat(plain_rec.result() or {})
    assert got.keys() == want.keys() and any(k.endswith("step_norm") for k in got)
    for key in got:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert int(np.sum(got["0/weight/mu/nonfinite"])) == 2
    # the NaN reached both updates alike; recording changed nothing
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert bool(fused_model[0].weight_mu.detach().isnan().any())


def test_recording_never_changes_the_update() -> None:
    recorded, unrecorded = _bayes_model(), _bayes_model()
    opt_r = RecordingAdam(recorded.parameters(), one_pass_min=0, lr=1e-3, weight_decay=0.01)
    opt_u = RecordingAdam(unrecorded.parameters(), one_pass_min=0, lr=1e-3, weight_decay=0.01)
    rec = GradientRecorder(recorded, GradLevel.ELEMENT)
    _train_side_by_side((recorded, opt_r), (unrecorded, opt_u), rec, 5)
    for a, b in zip(recorded.parameters(), unrecorded.parameters(), strict=True):
        assert torch.equal(a, b)
    assert rec.result() is not None


@pytest.mark.parametrize("case", ["amsgrad", "maximize", "kernels-off", "tensor-lr"])
def test_what_the_kernel_cannot_take_is_torchs_update_and_still_recorded(case: str) -> None:
    model = _bayes_model()
    ref = copy.deepcopy(model)
    options: dict = {"lr": 1e-3}
    if case in ("amsgrad", "maximize"):
        options[case] = True
    if case == "tensor-lr":
        options["lr"] = torch.tensor(1e-3)
    opt = RecordingAdam(model.parameters(), one_pass_min=0, **options)
    ref_opt = torch.optim.Adam(ref.parameters(), **options)
    rec = GradientRecorder(model, GradLevel.LAYER)
    off = kernels.disabled() if case == "kernels-off" else contextlib.nullcontext()
    with off:
        for step in range(3):
            for m, o in ((model, opt), (ref, ref_opt)):
                o.zero_grad()
                _loss(m, step).backward()
            opt.record_next_step(rec)
            opt.step()
            ref_opt.step()
    assert opt.fused_steps == 0
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)  # torch's own update, bit for bit
    norms = (rec.result() or {})["0"]["step_norm"]
    assert norms.shape == (3,) and np.all(norms > 0)


def test_state_dict_moves_between_recording_adam_and_torch_adam() -> None:
    model = _bayes_model()
    opt = RecordingAdam(model.parameters(), one_pass_min=0, lr=1e-3)
    for step in range(3):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    twin = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (else they share tensors)
    back = RecordingAdam(model.parameters(), one_pass_min=0, lr=5.0)
    back.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    assert back.param_groups[0]["lr"] == 1e-3
    for step in range(3, 6):
        for m, o in ((model, back), (twin, ref_opt)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    assert back.fused_steps == 3
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_step_hooks_run_once_per_step_and_closure_loss_is_returned() -> None:
    model = _bayes_model()
    opt = RecordingAdam(model.parameters(), one_pass_min=0, lr=1e-3)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))

    def closure() -> float:
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return float(loss.detach())

    loss = opt.step(closure)
    assert isinstance(loss, float) and math.isfinite(loss)
    amsgrad = RecordingAdam(_bayes_model().parameters(), one_pass_min=0, amsgrad=True)
    amsgrad.register_step_pre_hook(lambda *a: calls.append("pre"))
    amsgrad.step()  # no gradients: torch's update, a no-op
    assert calls == ["pre", "post", "pre"]


def test_bnn_train_uses_it_on_the_cpu_and_capture_does_not_change_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RecordingAdam, "ONE_PASS_MIN", 0)  # the kernel path, small as it is
    calls = []
    real = kernels.adam_step

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("accumulators", args[6] if len(args) > 6 else None) is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "adam_step", counted)
    cfg = {
        "dataset": "regression",
        "n_train": 128,
        "n_test": 32,
        "eval_samples": 2,
        "epochs": 3,
        "prior": "learnable",
        "seed": 7,
    }
    trainer = Trainer(parse_config(cfg), progress=False)
    assert isinstance(trainer.optimizer, RecordingAdam)
    adamw = Trainer(parse_config({**cfg, "optimizer": "adamw"}), progress=False)
    assert isinstance(adamw.optimizer, RecordingAdam)
    assert adamw.optimizer.param_groups[0]["decoupled_weight_decay"]
    captured = train({**cfg, "grad_capture": "element"}, sink=RunStore(tmp_path), progress=False)
    plain = train({**cfg, "grad_capture": "none"}, progress=False)
    assert captured.run_id is not None
    assert any(calls) and not all(calls)  # recorded steps (element level) and plain ones
    for a, b in zip(
        captured.model.state_dict().values(), plain.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_a_small_model_takes_torchs_update() -> None:
    """Below one_pass_min elements the kernel's set-up costs more than it saves: torch's
    update, bit for bit, recorded by the recorder's own pass."""
    model = _bayes_model()
    ref = copy.deepcopy(model)
    opt = RecordingAdam(model.parameters(), lr=1e-3, fused=True)
    size = sum(p.numel() for p in model.parameters())
    assert opt.one_pass_min == RecordingAdam.ONE_PASS_MIN > size
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, fused=True)
    rec = GradientRecorder(model, GradLevel.ELEMENT)
    _train_side_by_side((model, opt), (ref, ref_opt), rec, 3)
    assert opt.fused_steps == 0
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (rec.result() or {})["0"]["step_norm"].shape == (3,)


def test_a_loaded_state_in_another_layout_takes_torchs_update() -> None:
    """States come from load_state_dict as they were saved: a non-contiguous one (or any the
    kernel cannot address as one array) means torch's update, checked again after each load."""
    model = _bayes_model()
    opt = RecordingAdam(model.parameters(), one_pass_min=0, lr=1e-3)
    opt.zero_grad()
    _loss(model, 0).backward()
    opt.step()
    assert opt.fused_steps == 1
    state = copy.deepcopy(opt.state_dict())
    weight = state["state"][0]["exp_avg"]  # 0.weight_mu, 300 x 260
    state["state"][0]["exp_avg"] = weight.t().contiguous().t()  # same values, transposed strides
    opt.load_state_dict(state)
    assert not opt.state[model[0].weight_mu]["exp_avg"].is_contiguous()
    opt.zero_grad()
    _loss(model, 1).backward()
    opt.step()
    assert opt.fused_steps == 1  # torch's update took this step
    opt.load_state_dict(copy.deepcopy(opt.state_dict()) | {"state": {}})
    opt.zero_grad()
    _loss(model, 2).backward()
    opt.step()
    assert opt.fused_steps == 2  # fresh states: the kernel again
