"""Per-layer prior sigmas from the Laplace-GGN marginal likelihood (trainer.laplace)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from torch import Tensor, nn

from trainer.errors import BnnError, ErrorCode
from trainer.laplace import laplace_prior_sigmas
from trainer.layers import BayesLinear, bayesian_layers, use_mean
from trainer.models import mlp, small_cnn
from trainer.priors import PriorSpec

needs_laplace = pytest.mark.skipif(
    importlib.util.find_spec("laplace") is None,
    reason="laplace-torch is not installed (pip install -c constraints.txt laplace-torch)",
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _classification_data(n: int = 64, d: int = 5, k: int = 3) -> tuple[Tensor, Tensor]:
    return torch.randn(n, d), torch.randint(0, k, (n,))


# --- results on small networks -------------------------------------------------------------------


@needs_laplace
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_mlp_gives_a_positive_finite_sigma_per_weight_and_bias(structure: str) -> None:
    model = mlp(5, [8], 3)
    x, y = _classification_data()
    out = laplace_prior_sigmas(
        model, x, y, likelihood="classification", hessian_structure=structure, batch_size=16
    )
    assert list(out) == [name for name, _ in bayesian_layers(model)] == ["layer1", "layer2"]
    for sigmas in out.values():
        assert set(sigmas) == {"weight", "bias"}
        assert all(math.isfinite(s) and s > 0 for s in sigmas.values())


@needs_laplace
def test_model_is_left_unchanged_and_result_is_deterministic() -> None:
    model = mlp(5, [8], 3, activation="gelu")
    model.layer1.use_mean = True  # type: ignore[union-attr]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _classification_data(n=80)
    first = laplace_prior_sigmas(model, x, y, likelihood="classification", max_examples=50)
    again = laplace_prior_sigmas(model, x, y, likelihood="classification", max_examples=50)
    other = laplace_prior_sigmas(model, x, y, likelihood="classification", max_examples=50, seed=1)
    assert first == again
    assert first != other  # another random subset of 50 of the 80 examples
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.layer1.use_mean and not model.layer2.use_mean  # type: ignore[union-attr]
    assert all(p.requires_grad for p in model.parameters() if p.is_floating_point())


@needs_laplace
def test_small_cnn_and_a_layer_without_bias() -> None:
    cnn = small_cnn(1, 3, 8, channels=(2, 3), hidden=4)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    out = laplace_prior_sigmas(cnn, x, y, likelihood="classification")
    assert list(out) == ["conv1", "conv2", "fc1", "fc2"]
    assert all(set(s) == {"weight", "bias"} for s in out.values())

    bare = BayesLinear(5, 3, bias=False)
    out = laplace_prior_sigmas(bare, *_classification_data(), likelihood="classification")
    assert list(out) == ["layer"] and list(out["layer"]) == ["weight"]


# --- linear regression: the GGN is exact, check the marglik stationarity by hand --------------


def _linear_regression(
    n: int = 120, d: int = 4, k: int = 2
) -> tuple[BayesLinear, Tensor, Tensor, float]:
    """A fitted-looking linear layer (float64) whose weights and biases want different priors."""
    layer = BayesLinear(d, k, prior=PriorSpec.fixed(0.2, 1.0)).double()
    with torch.no_grad():
        layer.weight_mu.copy_(0.3 * torch.randn(k, d, dtype=torch.float64))
        layer.bias_mu.copy_(torch.tensor([2.5, -3.0], dtype=torch.float64))  # type: ignore[union-attr]
    x = torch.randn(n, d, dtype=torch.float64)
    with use_mean(layer):
        y = layer(x).detach() + 0.5 * torch.randn(n, k, dtype=torch.float64)
    return layer, x, y, 0.5


def _stationarity_gap(
    precision: float, theta: Tensor, prior_mu: float, ggn: Tensor, diagonal: bool
) -> float:
    """Relative gap of d/dp log evidence = 0, i.e. p ||theta - mu||^2 = P - p tr(posterior cov).

    ``ggn``: the exact GGN block (P, P) of this tensor; ``diagonal`` keeps only its diagonal.
    """
    n_params = theta.numel()
    scatter = float(((theta.reshape(-1) - prior_mu) ** 2).sum())
    if diagonal:
        trace = float((1.0 / (torch.diagonal(ggn) + precision)).sum())
    else:
        eye = torch.eye(n_params, dtype=ggn.dtype)
        trace = float(torch.linalg.inv(ggn + precision * eye).trace())
    gamma = n_params - precision * trace  # effective number of parameters
    return abs(precision * scatter - gamma) / gamma


@needs_laplace
@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("n_train", [None, 360])
def test_linear_regression_precisions_satisfy_the_evidence_fixed_point(
    structure: str, n_train: int | None
) -> None:
    layer, x, y, noise = _linear_regression()
    out = laplace_prior_sigmas(
        layer, x, y, likelihood="regression", noise_sigma=noise, hessian_structure=structure,
        n_train=n_train,
    )  # fmt: skip
    scale = (n_train or len(x)) / len(x) / noise**2  # the subset's GGN stands for n_train
    k = layer.out_features
    ggn_weight = scale * torch.kron(torch.eye(k, dtype=x.dtype), x.T @ x)  # row-major (k, d)
    ggn_bias = scale * len(x) * torch.eye(k, dtype=x.dtype)
    sigmas = out["layer"]
    for which, ggn in (("weight", ggn_weight), ("bias", ggn_bias)):
        theta, _ = layer.posterior(which)
        precision = sigmas[which] ** -2
        gap = _stationarity_gap(precision, theta.detach(), 0.2, ggn, structure == "diag")
        # kron is exact here; diag is exact for its own (diagonal) GGN. The other formula is
        # off by ~3e-4 on these data, so the tolerance tells the two apart.
        assert gap < 1e-5, (which, precision, gap)
    # weights near 0 and biases near +-3 want clearly different priors: the mapping is right
    assert sigmas["bias"] > 5 * sigmas["weight"]


@needs_laplace
def test_linear_regression_optimum_beats_a_grid_of_precisions() -> None:
    layer, x, y, noise = _linear_regression()
    out = laplace_prior_sigmas(layer, x, y, likelihood="regression", noise_sigma=noise)
    ggn = torch.kron(torch.eye(2, dtype=x.dtype), x.T @ x) / noise**2
    theta = layer.weight_mu.detach().reshape(-1) - 0.2

    def log_evidence(p: float) -> float:  # the terms that depend on the precision
        logdet = torch.logdet(ggn + p * torch.eye(len(theta), dtype=x.dtype))
        return float(-0.5 * (p * theta @ theta - len(theta) * math.log(p) + logdet))

    best = out["layer"]["weight"] ** -2
    grid = torch.logspace(-3, 3, 121, dtype=torch.float64).tolist()
    assert log_evidence(best) >= max(log_evidence(p) for p in grid) - 1e-6


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (nn.Sequential(BayesLinear(5, 8), nn.BatchNorm1d(8), BayesLinear(8, 3)), "BatchNorm1d"),
        (nn.Sequential(BayesLinear(5, 8), nn.ReLU(), nn.Linear(8, 3)), "'2' is a Linear"),
        (nn.Sequential(nn.Sequential(BayesLinear(5, 3), nn.LSTM(3, 3))), "'0.1' is a LSTM"),
        (nn.Linear(5, 3), "the model is a Linear"),
    ],
)
def test_unsupported_modules_raise_a_clear_error(model: nn.Module, named: str) -> None:
    x, y = _classification_data()
    with pytest.raises(BnnError, match=named) as info:
        laplace_prior_sigmas(model, x, y, likelihood="classification")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert "BayesLinear" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"likelihood": "poisson"}, "'poisson'"),
        ({"likelihood": "classification", "hessian_structure": "full"}, "'full'"),
        ({"likelihood": "classification", "noise_sigma": 0.1}, "regression only"),
        ({"likelihood": "regression"}, "noise_sigma > 0 .got None"),
        ({"likelihood": "regression", "noise_sigma": -1.0}, "got -1.0"),
        ({"likelihood": "classification", "max_examples": 0}, "max_examples"),
        ({"likelihood": "classification", "batch_size": 2.5}, "batch_size"),
        ({"likelihood": "classification", "n_train": 10}, "smaller than the 64 examples"),
        ({"likelihood": "classification", "lr": 0.0}, "lr must be"),
    ],
)
def test_bad_options_raise_naming_the_value(kwargs: dict[str, object], named: str) -> None:
    x, y = _classification_data()
    with pytest.raises(BnnError, match=named) as info:
        laplace_prior_sigmas(mlp(5, [4], 3), x, y, **kwargs)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_bad_data_shapes_raise() -> None:
    model = mlp(5, [4], 3)
    x, y = _classification_data()
    with pytest.raises(BnnError, match="integer class labels"):
        laplace_prior_sigmas(model, x, y.double(), likelihood="classification")
    with pytest.raises(BnnError, match="same N"):
        laplace_prior_sigmas(model, x, y[:-1], likelihood="classification")
    with pytest.raises(BnnError, match=r"\(N, outputs\)"):
        laplace_prior_sigmas(model, x, y.double(), likelihood="regression", noise_sigma=1.0)


def test_missing_library_raises_unavailable_with_the_pip_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "laplace", None)  # import laplace -> ImportError
    x, y = _classification_data()
    with pytest.raises(BnnError, match=r"pip install -c constraints\.txt") as info:
        laplace_prior_sigmas(mlp(5, [4], 3), x, y, likelihood="classification")
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert "laplace-torch" in info.value.details["install"]
