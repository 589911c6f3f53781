import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.analysis import (
    plot_epoch_distributions,
    plot_gradient_magnitudes,
    plot_kl_over_epochs,
    plot_params_log_distributions,
    plot_percentile_bands,
    plot_prior_trajectories,
    plot_width_study,
)
from service.analysis._figure import EVOLUTION_CMAP
from service.analysis.synthetic import synthetic_snapshot
from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _snaps(
    sizes: tuple[int, ...] = (40, 30, 3), seed: int = 0, learnable: bool = True
) -> list[EpochSnapshot]:
    return [
        synthetic_snapshot(e, sizes, seed=seed, grad_level="element", learnable=learnable)
        for e in (0, 2, 4, 6)
    ]


RUN = _snaps()
WIDE = {"w30": RUN, "w60": _snaps((40, 60, 3), seed=1)}

CASES: list[tuple[str, Callable[..., bytes], Any, dict[str, Any]]] = [
    ("evolution mu_change", plot_params_log_distributions, RUN, {}),
    ("evolution sigma", plot_params_log_distributions, RUN, {"criterion": "sigma", "top_k": 3}),
    ("evolution gradient", plot_params_log_distributions, RUN, {"criterion": "gradient"}),
    (
        "evolution explicit",
        plot_params_log_distributions,
        RUN,
        {"params": [("layer1", 7), ("layer2", (2, 5))]},
    ),
    ("evolution prior", plot_params_log_distributions, RUN, {"dist_type": "prior"}),
    ("epoch", plot_epoch_distributions, RUN, {"epoch": 2}),
    ("epoch prior", plot_epoch_distributions, RUN, {"dist_type": "prior"}),
    ("bands", plot_percentile_bands, RUN, {}),
    ("kl", plot_kl_over_epochs, RUN, {}),
    ("priors", plot_prior_trajectories, RUN, {}),
    (
        "priors of two runs",
        plot_prior_trajectories,
        {"a": RUN, "b": _snaps(seed=2, learnable=False)},
        {},
    ),
    ("gradients", plot_gradient_magnitudes, RUN, {}),
    ("width", plot_width_study, WIDE, {}),
]


@pytest.mark.parametrize(("name", "fn", "run", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_plots_are_deterministic_pngs(
    name: str, fn: Callable[..., bytes], run: Any, kwargs: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "plot.png"
    png = fn(run, save=path, **kwargs)
    assert png[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(png))
    image.load()
    width, height = image.size
    assert 400 <= width <= 4000 and 250 <= height <= 3000, image.size
    pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5, "a blank figure"
    assert path.read_bytes() == png
    assert fn(run, **kwargs) == png  # same inputs, same bytes


def test_evolution_colours_run_from_dark_red_to_neon_green() -> None:
    assert EVOLUTION_CMAP(0.0)[:3] == pytest.approx((0x8B / 255, 0, 0))
    assert EVOLUTION_CMAP(1.0)[:3] == pytest.approx((0x39 / 255, 1.0, 0x14 / 255))


def test_large_layer_draws_a_subset_quickly_and_seeded() -> None:
    big = [synthetic_snapshot(0, (600, 500))]  # 300,000 weights in one layer
    start = time.perf_counter()
    a = plot_epoch_distributions(big, max_curves=150, seed=1)
    assert time.perf_counter() - start < 10
    assert plot_epoch_distributions(big, max_curves=150, seed=1) == a
    assert plot_epoch_distributions(big, max_curves=150, seed=2) != a


def test_plot_arguments_are_checked() -> None:
    with pytest.raises(BnnError, match=r"criterion must be one of .* got 'change'"):
        plot_params_log_distributions(RUN, criterion="change")
    with pytest.raises(BnnError, match="17 params is more than one figure shows"):
        plot_params_log_distributions(RUN, params=[("layer1", i) for i in range(17)])
    with pytest.raises(BnnError, match=r"index 5000 is not in layer1.weight of shape \(30, 40\)"):
        plot_params_log_distributions(RUN, params=[("layer1", 5000)])
    with pytest.raises(BnnError, match=r"param must be one of .* got 'weights'"):
        plot_percentile_bands(RUN, param="weights")
    with pytest.raises(BnnError, match="cannot save plot") as err:
        plot_kl_over_epochs(RUN, save="/nonexistent-dir/x.png")
    assert err.value.code is ErrorCode.STORAGE
