"""The gradient-statistics paths (the CPU kernels' one-pass path, the CPU torch path and the
fused ``_foreach`` one that GPUs take) give the same statistics as a float64 reference,
non-finite gradients included; and ``sum64``."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from trainer import capture, kernels
from trainer.capture import GradientRecorder
from trainer.layers import BayesLinear, model_kl
from trainer.priors import PriorKind, PriorSpec, sum64
from trainer.snapshot import GradLevel


def _take(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """cpu: the kernels' path; cpu-torch: the CPU path without them; foreach: the GPUs'."""
    if path == "foreach":
        _force_foreach(monkeypatch)
    elif path == "cpu-torch":
        monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    else:
        assert kernels.available(), kernels.status()


def _force_foreach(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the recorder take its GPU path (``_foreach`` kernels) on CPU tensors."""
    monkeypatch.setattr(
        capture.GradientRecorder, "_record_cpu", capture.GradientRecorder._record_foreach
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    prior = PriorSpec(kind=PriorKind.LEARNABLE, min_group=1)
    # 520 x 512 = 266,240 weights: above the parallel threshold; the others below it
    return nn.Sequential(
        BayesLinear(512, 520, prior=prior), nn.ReLU(), BayesLinear(520, 3, prior=prior)
    )


def _record(model: nn.Module, level: GradLevel, steps: list[dict[str, torch.Tensor]]) -> dict:
    rec = GradientRecorder(model, level)
    named = dict(model.named_parameters())
    for grads in steps:
        for name, g in grads.items():
            named[name].grad = g.clone()
        rec.record_step()
    out = rec.result()
    assert out is not None
    return out


def _steps(model: nn.Module, n: int, poison: bool) -> list[dict[str, torch.Tensor]]:
    steps = []
    for step in range(n):
        model.zero_grad()
        (model(torch.randn(8, 512)).square().sum() + model_kl(model)).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        if poison and step == 1:
            grads["0.weight_mu"].view(-1)[[3, 70_000]] = torch.tensor([math.nan, math.inf])
            grads["2.bias_rho"][0] = -math.inf
        if step == 2:  # a tiny gradient far below float16's range stays exact
            grads["0.weight_rho"].view(-1)[5] = 1e-30
        steps.append(grads)
    return steps


def _reference(steps: list[dict[str, torch.Tensor]], name: str) -> dict[str, np.ndarray]:
    g = torch.stack([s[name] for s in steps]).double()
    finite = torch.isfinite(g)
    a = torch.where(finite, g.abs(), torch.zeros_like(g))
    count = finite.sum(0).clamp_min(1)
    return {
        "mean_abs": (a.sum(0) / count).numpy(),
        "max_abs": a.amax(0).numpy(),
        "nonfinite": (~finite).sum(0).numpy(),
    }


@pytest.mark.parametrize("poison", [False, True])
@pytest.mark.parametrize("path", ["cpu", "cpu-torch", "foreach"])
def test_element_statistics_match_the_float64_reference(
    path: str, poison: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _take(path, monkeypatch)
    model = _model()
    steps = _steps(model, 4, poison)
    got = _record(model, GradLevel.ELEMENT, steps)
    for layer in ("0", "2"):
        for kind in ("weight", "bias"):
            for p in ("mu", "rho"):
                ref = _reference(steps, f"{layer}.{kind}_{p}")
                stats = got[layer][kind][p]
                np.testing.assert_allclose(stats["mean_abs"], ref["mean_abs"], rtol=1e-6)
                np.testing.assert_array_equal(stats["max_abs"], ref["max_abs"].astype(np.float32))
                np.testing.assert_array_equal(stats["nonfinite"], ref["nonfinite"])
    assert got["0"]["weight"]["rho"]["max_abs"].reshape(-1)[5] >= 1e-30
    norms = got["0"]["step_norm"]
    assert norms.shape == (4,)
    assert math.isfinite(norms[0]) and norms[0] > 0
    assert math.isfinite(norms[1]) != poison  # a non-finite step has a non-finite norm
    want = math.sqrt(
        sum(
            float(steps[0][f"0.{n}"].double().square().sum())
            for n in ("weight_mu", "weight_rho", "bias_mu", "bias_rho")
        )
    )
    assert norms[0] == pytest.approx(want, rel=1e-5)  # float32 norms of ~270k elements


@pytest.mark.parametrize("path", ["cpu", "cpu-torch", "foreach"])
def test_layer_statistics_match_the_float64_reference(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _take(path, monkeypatch)
    model = _model()
    steps = _steps(model, 3, poison=True)
    got = _record(model, GradLevel.LAYER, steps)
    g = torch.stack([s["0.weight_mu"] for s in steps]).double()
    finite = torch.isfinite(g)
    a = torch.where(finite, g.abs(), torch.zeros_like(g))
    stats = got["0"]["weight"]["mu"]
    assert float(stats["mean_abs"]) == pytest.approx(float(a.sum() / finite.sum()), rel=1e-5)
    assert float(stats["max_abs"]) == pytest.approx(float(a.max()), rel=1e-6)
    assert int(stats["nonfinite"]) == 2


@pytest.mark.parametrize("n", [1, 1023, 1024, 1_440_000, 1_440_001])
def test_sum64_is_as_precise_as_a_float64_sum(n: int) -> None:
    torch.manual_seed(n)
    for x in (torch.full((n,), -2.9957323), torch.randn(n) * 0.05 - 3.0):
        ref = float(x.double().sum())
        assert float(sum64(x, center=True)) == pytest.approx(ref, rel=1e-11, abs=1e-9)
        assert float(sum64(x)) == pytest.approx(ref, rel=1e-6, abs=1e-9)  # float32 blocks
