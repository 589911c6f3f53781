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
from trainer.store._codec import decode_bf16, encode_bf16


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


def _float_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the per-element max in float32 (as on a GPU) on CPU tensors too."""
    init = capture._ParamStats.__init__

    def float_init(
        self: capture._ParamStats, param: nn.Parameter, level: GradLevel, **kw: bool
    ) -> None:
        init(self, param, level, **kw)
        self.codes = False
        self.max_abs = torch.zeros_like(self.sum_abs)

    monkeypatch.setattr(capture._ParamStats, "__init__", float_init)


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
                # the max is kept at the bfloat16 precision a file stores: exactly the
                # stored value of the largest |g|
                want_max = decode_bf16(encode_bf16(ref["max_abs"].astype(np.float32)))
                np.testing.assert_array_equal(stats["max_abs"], want_max)
                np.testing.assert_array_equal(stats["nonfinite"], ref["nonfinite"])
    tiny = decode_bf16(encode_bf16(np.float32([1e-30])))[0]  # bfloat16 keeps float32's range
    assert got["0"]["weight"]["rho"]["max_abs"].reshape(-1)[5] >= tiny > 0
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


# |g| values where bfloat16 rounding needs care: zero, denormals, float32's smallest normal,
# ties (rounded away from zero), one just below a tie, the largest bfloat16 and values that
# would round to Inf (kept at the largest finite code)
EDGES = [
    0.0, 1e-45, 1e-40, 2.0**-126, 1.0, 1.0 + 2.0**-8, 1.0 + 2.0**-8 - 2.0**-23, 1.0 + 3 * 2.0**-8,
    3.3895313892515355e38, 3.3961e38, 3.4028234663852886e38, 0.1, 7.0e-3,
]  # fmt: skip


@pytest.mark.parametrize("path", ["cpu", "cpu-torch", "foreach", "foreach-float"])
def test_the_element_max_is_the_stored_bfloat16_of_the_largest_gradient(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the path, the per-element max equals what a version-2 file stores of the
    largest |g|: encode_bf16's code, rounding and range handling included."""
    _take("foreach" if path == "foreach-float" else path, monkeypatch)
    if path == "foreach-float":
        _float_max(monkeypatch)
    model = _model()
    named = dict(model.named_parameters())
    n = len(EDGES)
    steps = []
    for step in range(3):
        grads = {k: torch.zeros_like(p) for k, p in named.items()}
        g = grads["0.weight_rho"].view(-1)
        g.copy_(torch.randn(g.numel()) * 0.01)
        edges = torch.tensor(EDGES, dtype=torch.float32)
        # the edge values arrive at different steps, with either sign, next to smaller ones
        g[:n] = torch.roll(edges, step) * (-1) ** step
        g[n : 2 * n] = edges * 0.5 if step else edges
        g[2 * n] = math.nan if step == 1 else 2.0
        steps.append(grads)
    got = _record(model, GradLevel.ELEMENT, steps)["0"]["weight"]["rho"]["max_abs"].reshape(-1)
    a = torch.stack([s["0.weight_rho"].view(-1) for s in steps]).abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    want = decode_bf16(encode_bf16(a.amax(0).numpy()))
    np.testing.assert_array_equal(got, want)
    assert got[n + 1] > 0 and got[n + 10] == np.float32(3.3895313892515355e38)
    assert got[2 * n] == 2.0 and np.isfinite(got).all()


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


def test_empty_gradients_have_zero_totals_from_unzeroed_partials() -> None:
    """The kernels' block-partials buffer is not zeroed: an empty tensor's totals must read
    none of it, and every block of the others must be written before it is read."""
    assert kernels.available(), kernels.status()
    empty, full = torch.zeros(0), torch.randn(70_000)
    want_sq = float(full.double().square().sum())
    for _ in range(3):  # the buffer comes from a heap that earlier calls filled
        garbage = torch.full((1 << 16,), 7.0, dtype=torch.float64)
        del garbage
        got = kernels.grad_stats_many([empty, full, empty])
        assert got[0] == got[2] == (0.0, 0.0, 0.0, 0)
        assert got[1][0] == pytest.approx(want_sq, rel=1e-6)
        assert got[1][2] == float(full.abs().max())
        params = [torch.zeros(0), torch.zeros(70_000)]
        hyper = kernels.AdamHyper(
            beta1=0.9, beta2=0.999, eps=1e-8, decay=1.0, step_size=1e-3, bias2_sqrt=0.03
        )
        stats = kernels.adam_step(
            params, [empty, full], [torch.zeros(0), torch.zeros(70_000)],
            [torch.zeros(0), torch.zeros(70_000)], [hyper, hyper], [1, 1],
        )  # fmt: skip
        assert stats[0] == (0.0, 0.0, 0.0, 0)
        assert stats[1] is not None and stats[1][0] == pytest.approx(want_sq, rel=1e-6)
