import numpy as np
import pytest
import torch

from trainer.capture import GradientRecorder, get_all_distribution_params, is_capture_epoch
from trainer.layers import BayesLinear, model_kl
from trainer.models import mlp
from trainer.priors import PriorKind, PriorSpec
from trainer.snapshot import GradLevel
from trainer.store._codec import decode_bf16, encode_bf16


def _model(kind: PriorKind = PriorKind.LEARNABLE) -> torch.nn.Module:
    torch.manual_seed(0)
    return mlp(3, [5, 4], 2, PriorSpec(kind=kind))


def test_capture_has_exactly_the_seed_structure() -> None:
    log = get_all_distribution_params(_model(), epoch=10, step_size=5)
    assert log is not None
    assert list(log) == ["layer1", "layer2", "layer3"]
    shapes = {"layer1": (5, 3), "layer2": (4, 5), "layer3": (2, 4)}
    for name, layer in log.items():
        assert set(layer) == {"posterior", "prior"}
        for dist in ("posterior", "prior"):
            assert set(layer[dist]) == {"weight", "bias"}
            for kind in ("weight", "bias"):
                entry = layer[dist][kind]
                assert set(entry) == {"mu", "sigma"}
                assert all(isinstance(v, np.ndarray) for v in entry.values())
                assert (entry["sigma"] > 0).all()
        assert layer["posterior"]["weight"]["mu"].shape == shapes[name]
        assert layer["posterior"]["bias"]["sigma"].shape == (shapes[name][0],)
        assert layer["prior"]["weight"]["mu"].shape == (1,)


def test_capture_only_on_step_epochs_and_copies_values() -> None:
    model = _model()
    assert get_all_distribution_params(model, epoch=3, step_size=5) is None
    assert get_all_distribution_params(model, epoch=3, step_size=5, force=True) is not None
    log = get_all_distribution_params(model, epoch=0, step_size=5)
    assert log is not None
    before = log["layer1"]["posterior"]["weight"]["mu"].copy()
    with torch.no_grad():
        model.layer1.weight_mu.add_(1.0)
    assert np.array_equal(log["layer1"]["posterior"]["weight"]["mu"], before)


def test_is_capture_epoch_includes_the_last() -> None:
    assert [e for e in range(8) if is_capture_epoch(e, 3, last_epoch=7)] == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="0"):
        is_capture_epoch(1, 0)


def test_element_statistics_match_a_manual_computation() -> None:
    model = _model()
    rec = GradientRecorder(model, GradLevel.ELEMENT)
    grads = []
    for step in range(4):
        model.zero_grad()
        out = model(torch.randn(6, 3))
        ((out**2).sum().mul(step + 1) + model_kl(model)).backward()
        grads.append(model.layer2.weight_mu.grad.clone())
        rec.record_step()
    res = rec.result()
    assert res is not None
    g = torch.stack(grads).abs()
    stats = res["layer2"]["weight"]["mu"]
    np.testing.assert_allclose(stats["mean_abs"], g.mean(0).numpy(), rtol=1e-5, atol=1e-8)
    # per element the max is kept at bfloat16 precision, as stored: the rounded largest |g|
    want_max = decode_bf16(encode_bf16(g.max(0).values.numpy()))
    np.testing.assert_array_equal(stats["max_abs"], want_max)
    assert stats["nonfinite"].sum() == 0
    assert res["layer2"]["step_norm"].shape == (4,)
    assert set(res["layer1"]) >= {"weight", "bias", "step_norm", "prior"}
    assert "mu" not in res["layer1"]["prior"]["weight"]  # the prior mean is fixed by default
    assert res["layer1"]["prior"]["weight"]["rho"].shape == (4,)
    assert np.isfinite(res["layer1"]["prior"]["weight"]["rho"]).all()
    assert np.abs(res["layer1"]["prior"]["weight"]["rho"]).sum() > 0


def test_nonfinite_gradients_are_counted_not_propagated() -> None:
    layer = BayesLinear(3, 2)
    model = torch.nn.Sequential(layer)
    for level in (GradLevel.ELEMENT, GradLevel.LAYER):
        rec = GradientRecorder(model, level)
        for step in range(3):
            model.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            if step == 1:
                layer.weight_mu.grad[0, 1] = float("nan")
                layer.weight_mu.grad[1, 2] = float("inf")
            rec.record_step()
        stats = rec.result()["0"]["weight"]["mu"]
        assert int(stats["nonfinite"].sum()) == 2
        assert np.isfinite(stats["mean_abs"]).all() and np.isfinite(stats["max_abs"]).all()
        if level is GradLevel.ELEMENT:
            assert stats["nonfinite"][0, 1] == 1 and stats["nonfinite"][0, 0] == 0
        else:
            assert stats["mean_abs"].shape == ()


def test_fixed_prior_has_no_prior_gradients_and_none_level_records_nothing() -> None:
    model = _model(PriorKind.FIXED)
    rec = GradientRecorder(model, GradLevel.LAYER)
    model(torch.randn(2, 3)).sum().backward()
    rec.record_step()
    res = rec.result()
    assert res is not None and "prior" not in res["layer1"]
    assert GradientRecorder(model, "none").result() is None


def test_step_series_grow_past_their_initial_capacity() -> None:
    layer = BayesLinear(2, 1, prior=PriorSpec(learn_mean=True, min_group=1))
    model = torch.nn.Sequential(layer)
    rec = GradientRecorder(model, GradLevel.LAYER)
    norms = []
    for _ in range(1300):  # more than the preallocated 512 steps, twice over
        model.zero_grad()
        (model(torch.randn(3, 2)).sum() + model_kl(model)).backward()
        rec.record_step()
        grads = [
            layer.weight_mu.grad,
            layer.weight_rho.grad,
            layer.bias_mu.grad,
            layer.bias_rho.grad,
        ]
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    res = rec.result()["0"]
    np.testing.assert_allclose(res["step_norm"], norms, rtol=1e-6)
    assert res["prior"]["weight"]["mu"].shape == (1300,)


def test_prior_gradient_series_are_the_gradients_step_by_step() -> None:
    """Each learnable prior parameter's series holds its gradient at every recorded step, and
    0 at a step where no gradient reached it (here: its ``.grad`` set to None)."""
    torch.manual_seed(3)
    model = mlp(3, [5], 2, PriorSpec(kind=PriorKind.LEARNABLE, sigma0=0.3))
    rec = GradientRecorder(model, GradLevel.LAYER)
    rho = model.layer1.weight_prior.rho
    want = []
    for step in range(5):
        model.zero_grad()
        (model(torch.randn(4, 3)).pow(2).sum() + model_kl(model)).backward()
        if step == 2:
            rho.grad = None
        want.append(0.0 if rho.grad is None else float(rho.grad.reshape(-1)[0]))
        rec.record_step()
    res = rec.result()
    assert res is not None
    got = res["layer1"]["prior"]["weight"]["rho"]
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np.array(want, np.float64))
    assert got[2] == 0.0 and np.count_nonzero(got) == 4
