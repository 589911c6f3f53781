import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from service.analysis import (
    _figure,
    plot_epoch_distributions,
    plot_gradient_magnitudes,
    plot_kl_over_epochs,
    plot_params_log_distributions,
    plot_percentile_bands,
    plot_prior_trajectories,
    plot_width_study,
    plots,
    plots_runs,
    width_study,
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


def test_evolution_colours_are_colour_blind_safe_viridis() -> None:
    """Red-to-green is unreadable for the commonest colour-vision deficiency; viridis is
    not, and its lightness rises with the epoch (so it survives greyscale too)."""
    assert EVOLUTION_CMAP.name == "viridis"
    grey = [float(np.dot(EVOLUTION_CMAP(x)[:3], (0.299, 0.587, 0.114))) for x in (0.0, 0.5, 1.0)]
    assert grey == sorted(grey) and grey[-1] - grey[0] > 0.5


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


# --- what the figures show (the Figure is taken from to_png before it becomes bytes) -----


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure a plot function renders in this test, in order."""
    drawn: list[Figure] = []

    def capture(fig: Figure, save: Any = None, dpi: int = 100) -> bytes:
        drawn.append(fig)
        return _figure.to_png(fig, save, dpi)

    for module in (plots, plots_runs):
        monkeypatch.setattr(module, "to_png", capture)
    return drawn


def _epoch_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.get_xlabel().startswith("epoch")]


TWO_EPOCHS = [synthetic_snapshot(e, (6, 5, 1), seed=3, grad_level="element") for e in (0, 1)]


@pytest.mark.parametrize(
    "fn",
    [plot_percentile_bands, plot_kl_over_epochs, plot_prior_trajectories, plot_gradient_magnitudes],
    ids=lambda f: f.__name__,
)
def test_epoch_axes_have_whole_number_ticks(
    fn: Callable[..., bytes], figures: list[Figure]
) -> None:
    fn(TWO_EPOCHS)  # epochs 0 and 1: matplotlib's default ticks would be 0, 0.2, ..., 1
    axes = _epoch_axes(figures[-1])
    assert axes
    for ax in axes:
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_evolution_colour_bar_has_whole_epochs(figures: list[Figure]) -> None:
    plot_params_log_distributions(TWO_EPOCHS, top_k=2)
    bar = next(ax for ax in figures[-1].axes if "epoch" in ax.get_ylabel())
    assert "dark purple = early, yellow = late" in bar.get_ylabel()
    ticks = [t for t in bar.get_yticks() if 0 <= t <= 1]
    assert ticks and all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize(("n", "bins"), [(1, 1), (4, 5), (10, 6), (300, 34), (30_000, 100)])
def test_histogram_bins_follow_the_number_of_values(n: int, bins: int) -> None:
    assert _figure.histogram_bins(n) == bins
    assert _figure.histogram_bins(n, most=5) == min(bins, 5)


def test_epoch_plot_histograms_of_few_values_have_few_bins(figures: list[Figure]) -> None:
    plot_epoch_distributions([synthetic_snapshot(0, (2, 5, 1))])  # layer1: 10 weights
    fig = figures[-1]
    titles = {ax.get_title(): ax for ax in fig.axes}
    hist = titles["layer1.weight: mu of all 10, 6 bins"]
    assert len(hist.patches) == 1 and len(hist.patches[0].get_path().vertices) < 40
    curves = titles["layer1.weight: all 10 curves (alpha 0.6)"]
    (lines,) = curves.collections
    assert len({tuple(c) for c in lines.get_colors()}) == 1  # one colour, not a flat index
    assert len(fig.axes) == 6  # no colour bar for a meaningless index


def _legend_styles(fig: Figure) -> dict[str, tuple[Any, str]]:
    (legend,) = fig.legends
    return {
        t.get_text(): (h.get_linestyle(), h.get_marker())
        for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)
        if isinstance(h, Line2D)
    }


def test_compare_priors_legend_shows_each_runs_line_style(figures: list[Figure]) -> None:
    fixed = _snaps(seed=2, learnable=False)
    plot_prior_trajectories({"learnable": RUN, "fixed": fixed})
    fig = figures[-1]
    styles = _legend_styles(fig)
    assert styles["learnable"][0] == "-" and styles["fixed"][0] == "--"
    assert styles["learnable"][1] != styles["fixed"][1]  # and distinct markers
    assert "learnable, fixed" in fig.texts[0].get_text()  # the title names the runs
    # the second run is drawn above the first and translucent, so equal lines both show
    ax = fig.axes[0]
    first, second = ax.lines[0], ax.lines[-1]
    assert second.get_zorder() > first.get_zorder() and (second.get_alpha() or 1) < 1
    # the legend sits right of the panels, not over the data
    legend_box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    for panel in fig.axes:
        assert legend_box.x0 >= panel.get_window_extent().x1


def test_single_run_priors_plot_names_the_run(figures: list[Figure]) -> None:
    plot_prior_trajectories({"my-run": RUN})
    assert figures[-1].texts[0].get_text().startswith("my-run:")


def test_kl_legend_tells_weights_from_biases(figures: list[Figure]) -> None:
    plot_kl_over_epochs(RUN)
    styles = _legend_styles(figures[-1])
    assert styles["weights"][0] == "-" and styles["biases"][0] == "--"
    assert all(ax.get_legend() is None for ax in figures[-1].axes)


def test_width_study_needs_two_widths() -> None:
    with pytest.raises(BnnError, match=r"at least 2 different widths.*a: 30, b: 30") as err:
        plot_width_study({"a": RUN, "b": _snaps(seed=1)})
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(BnnError, match="at least 2 different widths"):
        width_study({"a": RUN, "b": _snaps((40, 60, 3))}, widths={"a": 10, "b": 10})
    assert len(width_study({"a": RUN, "b": _snaps(seed=1)}, widths={"a": 10, "b": 20})) == 4


def test_a_bad_explicit_index_names_itself_and_the_valid_range() -> None:
    with pytest.raises(BnnError) as err:
        plot_params_log_distributions(RUN, params=[("layer1", (3, 170))])
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert err.value.message == (
        "index (3, 170) is not in layer1.weight of shape (30, 40): give a flat index "
        "0..1199 or a tuple (i, j) with i < 30, j < 40"
    )
