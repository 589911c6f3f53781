"""Sampled per-element mean |g| (``element_every`` N): every path gives each element's mean
exactly as an every-step recorder gives it on steps 0, N, 2N, ... alone, and its max |g|,
non-finite counts, the step norms and the prior gradients exactly as an every-step
recorder gives them over every step; the epoch says how many steps the mean took."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.trainer.test_fused_capture import _model, _steps, _take
from trainer.capture import GradientRecorder
from trainer.errors import BnnError
from trainer.optim import RecordingAdam, record_with
from trainer.snapshot import GradLevel
from trainer.store import RunStore, read_epoch_file


def _assert_same(got: object, want: object, where: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}/{key}")
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=where)


def _pick(stats: dict, keys: tuple[str, ...]) -> dict:
    """Only ``keys`` (of mean_abs, max_abs, nonfinite) of each parameter's statistics."""
    return {
        layer: {
            kind: {p: {k: v for k, v in s.items() if k in keys} for p, s in per_param.items()}
            for kind, per_param in per_kind.items()
        }
        for layer, per_kind in stats.items()
    }


def _split(out: dict) -> tuple[dict, dict, dict]:
    """(per-element statistics, step norms, prior gradients) of a recorder's result."""
    stats = {
        layer: {k: v for k, v in entry.items() if k in ("weight", "bias")}
        for layer, entry in out.items()
    }
    norms = {layer: entry["step_norm"] for layer, entry in out.items()}
    priors = {layer: entry.get("prior") for layer, entry in out.items()}
    return stats, norms, priors


@pytest.mark.parametrize("path", ["cpu", "cpu-torch", "foreach"])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("poisoned_first", [False, True])
def test_the_mean_samples_steps_and_the_rest_takes_every_step(
    path: str, every: int, poisoned_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _take(path, monkeypatch)
    model = _model()
    steps = _steps(model, 7, poison=True)  # step 1 non-finite: not sampled at every=3
    if poisoned_first:  # ... unless it comes first: its non-finite values out of the mean
        steps = [steps[1], steps[0], *steps[2:]]
    named = dict(model.named_parameters())

    def feed(rec: GradientRecorder, which: range | list[int]) -> dict:
        for i in which:
            for name, g in steps[i].items():
                named[name].grad = g.clone()
            rec.record_step()
        out = rec.result()
        assert out is not None
        return out

    sampled = GradientRecorder(model, GradLevel.ELEMENT, element_every=every)
    got = feed(sampled, range(len(steps)))
    assert sampled.element_steps == len(range(0, len(steps), every))
    only = feed(GradientRecorder(model, GradLevel.ELEMENT), list(range(0, len(steps), every)))
    every_step = feed(GradientRecorder(model, GradLevel.ELEMENT), range(len(steps)))
    got_stats, got_norms, got_priors = _split(got)
    # bit for bit: the mean over the sampled steps (the poisoned step's non-finite values
    # left out of its count where it is sampled), the max and counts over every step
    _assert_same(_pick(got_stats, ("mean_abs",)), _pick(_split(only)[0], ("mean_abs",)))
    keys = ("max_abs", "nonfinite")
    _assert_same(_pick(got_stats, keys), _pick(_split(every_step)[0], keys))
    _assert_same(got_norms, _split(every_step)[1])  # every step's norm
    _assert_same(got_priors, _split(every_step)[2])
    assert all(len(n) == len(steps) for n in got_norms.values())
    counts = got_stats["0"]["weight"]["mu"]["nonfinite"].reshape(-1)
    assert int(counts[3]) == 1  # the poisoned step 1 counted, sampled for the mean or not
    if every == 3:  # that element's mean over the finite of steps 0, 3, 6
        mean = got_stats["0"]["weight"]["mu"]["mean_abs"].reshape(-1)[3]
        taken = [float(steps[i]["0.weight_mu"].reshape(-1)[3]) for i in (0, 3, 6)]
        want = [abs(g) for g in taken if math.isfinite(g)]
        assert len(want) == (2 if poisoned_first else 3)
        assert math.isclose(float(mean), sum(want) / len(want), rel_tol=1e-6)
    sampled.reset()
    assert (sampled.element_steps, sampled.samples_mean()) == (0, True)


def test_the_optimisers_pass_samples_the_same_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RecordingAdam`` adds to the per-element mean in its pass only on sampled steps (the
    max and counts on every step), equal to the recorder's own pass."""
    _take("cpu", monkeypatch)
    model = _model()
    steps = _steps(model, 5, poison=False)
    named = dict(model.named_parameters())
    results = []
    for use_optimiser in (True, False):
        torch.manual_seed(1)
        params = [p for p in model.parameters()]
        start = [p.detach().clone() for p in params]
        opt = RecordingAdam(params, lr=1e-3, one_pass_min=1)
        rec = GradientRecorder(model, GradLevel.ELEMENT, element_every=2)
        for grads in steps:
            for name, g in grads.items():
                named[name].grad = g.clone()
            if use_optimiser:
                record_with(opt, rec)
            else:
                rec.record_step()
            opt.step()
        assert (rec.element_steps, opt.fused_steps) == (3, 5)
        results.append(rec.result())
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
    _assert_same(results[0], results[1])


def test_bad_element_every_is_refused_naming_it() -> None:
    model = _model()
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(BnnError, match="element_every must be an integer >= 1"):
            GradientRecorder(model, GradLevel.ELEMENT, element_every=bad)  # type: ignore[arg-type]


def test_a_run_with_sampled_statistics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``bnn train --element-every N``: the epoch's metric ``element_steps`` says how many
    steps its per-element statistics cover (``steps`` still counts them all), and the
    configuration keeps N; a track()ed loop takes it too."""
    import trainer
    from service.cli import main
    from trainer.layers import model_kl

    data = tmp_path / "data"
    args = ["train", "--data-dir", str(data), "--dataset", "regression", "--epochs", "2"]
    args += ["--n-train", "96", "--batch-size", "16", "--widths", "8", "--no-progress"]
    assert main([*args, "--element-every", "4"]) == 0
    with RunStore(data) as store:
        (run,) = store.list_runs()
        assert run.config["element_every"] == 4
        for epoch in (0, 1):
            snap = read_epoch_file(store.epoch_path(run.id, epoch))
            assert snap.metrics["steps"] == 6 and snap.metrics["element_steps"] == 2
            assert snap.grad_level is GradLevel.ELEMENT
            assert snap.gradients is not None
            assert len(snap.gradients["layer1"]["step_norm"]) == 6
    assert main(["runs", "show", run.id, "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "mean |g| sampled every 4 steps, its max |g| and non-finite count every step" in out
    assert main([*args, "--element-every", "0"]) == 2

    torch.manual_seed(0)
    net = trainer.mlp(1, [8], 1, trainer.PriorSpec())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xs = torch.linspace(-1, 1, 32).unsqueeze(1)
    with trainer.track(net, data_dir=data, epochs=1, element_every=3) as tracked:
        for _ in range(5):
            loss = nn.functional.mse_loss(net(xs), xs) + model_kl(net) / 32
            loss.backward()
            tracked.step(loss)
            opt.step()
            opt.zero_grad()
        tracked.log_epoch(0, {"loss": loss.item()})
    with RunStore(data) as store:
        assert store.get_run(tracked.id).config["tracking"]["element_every"] == 3
        snap = read_epoch_file(store.epoch_path(tracked.id, 0))
        assert snap.metrics["element_steps"] == 2 and snap.metrics["steps"] == 5
        with pytest.raises(BnnError, match="element_every must be an integer >= 1, got 0"):
            trainer.track(net, sink=store, epochs=1, element_every=0)
    assert math.isfinite(loss.item())
