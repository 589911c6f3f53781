"""Model builders and conversion of plain networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.errors import BnnError, ErrorCode
from trainer.layers import BayesConv2d, BayesLinear, bayesian_layers, use_mean
from trainer.models import bayesianize, deterministic_mlp, mlp, small_cnn
from trainer.priors import LearnMode, PriorKind, PriorSpec


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- mlp ---------------------------------------------------------------------------------------


def test_mlp_names_shapes_and_options() -> None:
    model = mlp(6, [8, 5], 3, PriorSpec(mode="hierarchical"), activation="tanh",
                local_reparam=True, posterior_sigma_init=0.1)  # fmt: skip
    assert [name for name, _ in model.named_children()] == [
        "layer1", "act1", "layer2", "act2", "layer3",
    ]  # fmt: skip
    assert [name for name, _ in bayesian_layers(model)] == ["layer1", "layer2", "layer3"]
    assert isinstance(model.act1, nn.Tanh)
    layers = [layer for _, layer in bayesian_layers(model)]
    assert [(lyr.in_features, lyr.out_features) for lyr in layers] == [(6, 8), (8, 5), (5, 3)]  # type: ignore[attr-defined]
    assert all(isinstance(lyr, BayesLinear) and lyr.local_reparam for lyr in layers)
    assert all(lyr.weight_prior.mode is LearnMode.HIERARCHICAL for lyr in layers)
    assert torch.allclose(layers[0].weight_sigma, torch.full((8, 6), 0.1))
    assert model(torch.randn(4, 6)).shape == (4, 3)
    # every layer has its own priors
    assert layers[0].weight_prior is not layers[1].weight_prior


def test_mlp_without_hidden_layers() -> None:
    model = mlp(1, [], 1, PriorSpec.fixed(0.0, 0.1))
    assert [name for name, _ in model.named_children()] == ["layer1"]
    assert model.layer1.weight_prior.spec.kind is PriorKind.FIXED
    assert model(torch.randn(7, 1)).shape == (7, 1)


def test_seed_sized_network_has_one_hidden_layer_of_ten() -> None:
    model = mlp(1, [10], 1)
    assert [tuple(layer.weight_mu.shape) for _, layer in bayesian_layers(model)] == [
        (10, 1), (1, 10),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("widths", "named"),
    [([0], "0"), ([4, -2], "-2"), ([2.5], "2.5"), (["a"], "'a'"), ([True], "True"),
     ("12", "'12'"), (None, "None")],
)  # fmt: skip
def test_mlp_bad_widths_raise_naming_the_value(widths: object, named: str) -> None:
    for build in (mlp, deterministic_mlp):
        with pytest.raises(BnnError) as err:
            build(4, widths, 2)  # type: ignore[operator]
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        assert named in str(err.value)


def test_bad_sizes_and_activation_raise() -> None:
    with pytest.raises(BnnError, match="in_features"):
        mlp(0, [3], 2)
    with pytest.raises(BnnError, match="out_features"):
        mlp(3, [3], -1)
    with pytest.raises(BnnError, match="'swish2'"):
        mlp(3, [3], 2, activation="swish2")
    with pytest.raises(BnnError, match="'nope'"):
        deterministic_mlp(3, [3], 2, activation="nope")


def test_deterministic_mlp_mirrors_mlp() -> None:
    model = deterministic_mlp(6, [8], 3, activation="gelu")
    assert [name for name, _ in model.named_children()] == ["layer1", "act1", "layer2"]
    assert isinstance(model.layer1, nn.Linear)
    assert isinstance(model.act1, nn.GELU)
    assert model(torch.randn(2, 6)).shape == (2, 3)
    assert bayesian_layers(model) == []


# --- small_cnn ---------------------------------------------------------------------------------


def test_small_cnn_shapes_and_layers() -> None:
    model = small_cnn()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert [name for name, _ in bayesian_layers(model)] == ["conv1", "conv2", "fc1", "fc2"]
    assert isinstance(model.conv1, BayesConv2d)
    assert isinstance(model.fc2, BayesLinear)
    other = small_cnn(3, 5, image_size=10, channels=(4, 6), hidden=16,
                      prior=PriorSpec.fixed(sigma0=0.1))  # fmt: skip
    assert other(torch.randn(2, 3, 10, 10)).shape == (2, 5)
    assert all(
        layer.weight_prior.spec.kind is PriorKind.FIXED for _, layer in bayesian_layers(other)
    )


def test_small_cnn_bad_arguments() -> None:
    with pytest.raises(BnnError, match="image_size"):
        small_cnn(image_size=3)
    with pytest.raises(BnnError, match="num_classes"):
        small_cnn(num_classes=0)
    with pytest.raises(BnnError, match="channels"):
        small_cnn(channels=(4,))  # type: ignore[arg-type]


# --- bayesianize -------------------------------------------------------------------------------


def _plain() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2)),
        nn.Flatten(),
        nn.Sequential(nn.Linear(36, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2, bias=False))),
    )


def test_bayesianize_keeps_the_output_under_use_mean() -> None:
    plain = _plain()
    x = torch.randn(5, 1, 7, 7)
    expected = plain(x)
    bayes = bayesianize(plain, PriorSpec(mode="empirical_bayes"), posterior_sigma_init=0.02)
    names = [name for name, _ in bayesian_layers(bayes)]
    assert names == ["0.0", "0.2", "2.0", "2.2.0"]
    assert not any(isinstance(m, nn.Linear | nn.Conv2d) for m in bayes.modules())
    with use_mean(bayes):
        assert torch.allclose(bayes(x), expected, atol=1e-6)
    assert not torch.allclose(bayes(x), expected, atol=1e-6)  # sampling differs
    last = dict(bayesian_layers(bayes))["2.2.0"]
    assert last.bias_mu is None
    assert torch.allclose(last.weight_sigma, torch.full_like(last.weight_mu, 0.02))
    # not in place: the original is untouched
    assert isinstance(plain[0][0], nn.Conv2d)  # type: ignore[index]


def test_bayesianize_inplace_shared_and_top_level() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    out = bayesianize(model, inplace=True)
    assert out is model
    assert model[0] is model[2]
    assert isinstance(model[0], BayesLinear)
    single = bayesianize(nn.Linear(3, 2).double())
    assert isinstance(single, BayesLinear)
    assert single.weight_mu.dtype == torch.float64


def test_bayesianize_rejects_what_it_cannot_convert() -> None:
    with pytest.raises(BnnError, match="Sequential has no"):
        bayesianize(nn.Sequential(nn.ReLU()))
    with pytest.raises(BnnError, match="'reflect'"):
        bayesianize(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(BnnError, match="lazy"):
        bayesianize(nn.Sequential(nn.LazyLinear(3)))
    with pytest.raises(BnnError, match=r"nn\.Module"):
        bayesianize("model")  # type: ignore[arg-type]
