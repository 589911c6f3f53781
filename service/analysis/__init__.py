"""Analysis of captured runs: the seed's tables and plots, made exact and fast at real sizes.

Every function takes ``run`` as the seed's ``distribution_log`` dict, a list of
``EpochSnapshot``, a stored run id (with ``data_dir=``) or a ``RunReader``; stored runs
are read per epoch and per layer, only the arrays needed::

    from service.analysis import compute_layer_kl_divergences, plot_percentile_bands
    kl = compute_layer_kl_divergences(distribution_log, epoch=95)
    png = plot_percentile_bands("3f2a9c1b7d4e", data_dir="bnn-data", layer="layer1")

Tables are pandas DataFrames; plots are PNG bytes (Agg, no pyplot). Errors are
``trainer.errors.BnnError`` naming the bad value (unknown epoch lists captured epochs).
"""

from ._numeric import (
    TB_PERCENTILES,
    gaussian_sums,
    pairwise_symmetric_kl,
    pairwise_symmetric_kl_reference,
    percentiles,
)
from .compare import kl_between_runs, width_study
from .gradient_series import gradient_norm_series, prior_gradient_series
from .gradients import GradKind, GradStat, gradient_diagnostics
from .kl import KL_COLUMNS, compute_layer_kl_divergences, kl_to_prior, pairwise_kl_trajectory
from .outliers import OutlierComparison, compare_gradient_outliers, gradient_outliers
from .plots import plot_epoch_distributions, plot_params_log_distributions, plot_percentile_bands
from .plots_runs import (
    plot_gradient_magnitudes,
    plot_kl_over_epochs,
    plot_prior_trajectories,
    plot_width_study,
)
from .scales import SCALE_COLUMNS, plot_scale_diagnostics, scale_diagnostics
from .source import DictSource, DistType, ReaderSource, RunLike, RunSource, as_source, open_source
from .stats import (
    PERCENTILE_COLUMNS,
    get_overall_weight_stats,
    percentile_bands,
    prior_trajectories,
)
from .summary import clear_cache
from .uncertainty import (
    bootstrap_mean_ci,
    comparison_table,
    paired_difference_ci,
    paired_seed_difference_ci,
    seed_mean_ci,
    t_quantile,
)

__all__ = [
    "KL_COLUMNS",
    "PERCENTILE_COLUMNS",
    "SCALE_COLUMNS",
    "TB_PERCENTILES",
    "DictSource",
    "DistType",
    "GradKind",
    "GradStat",
    "OutlierComparison",
    "ReaderSource",
    "RunLike",
    "RunSource",
    "as_source",
    "bootstrap_mean_ci",
    "clear_cache",
    "compare_gradient_outliers",
    "comparison_table",
    "compute_layer_kl_divergences",
    "gaussian_sums",
    "get_overall_weight_stats",
    "gradient_diagnostics",
    "gradient_norm_series",
    "gradient_outliers",
    "kl_between_runs",
    "kl_to_prior",
    "open_source",
    "paired_difference_ci",
    "paired_seed_difference_ci",
    "pairwise_kl_trajectory",
    "pairwise_symmetric_kl",
    "pairwise_symmetric_kl_reference",
    "percentile_bands",
    "percentiles",
    "plot_epoch_distributions",
    "plot_gradient_magnitudes",
    "plot_kl_over_epochs",
    "plot_params_log_distributions",
    "plot_percentile_bands",
    "plot_prior_trajectories",
    "plot_scale_diagnostics",
    "plot_width_study",
    "prior_gradient_series",
    "prior_trajectories",
    "scale_diagnostics",
    "seed_mean_ci",
    "t_quantile",
    "width_study",
]
