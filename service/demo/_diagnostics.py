"""The diagnostic sections of a demo report, for stored runs ``{label: run_id}``: metrics over
the captured epochs, prior vs posterior scales, learned priors, posterior statistics, KL tables,
parameter evolution and gradient outliers (every number from :mod:`service.analysis`).

Quantities that every arm has (KL, gradient norms, percentile bands) are drawn as one figure
with the arms side by side on one shared y scale; the evolution and epoch plots, whose
weights differ from arm to arm, stay one figure per arm."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd

from service.analysis import (
    compare_gradient_outliers,
    compute_layer_kl_divergences,
    get_overall_weight_stats,
    gradient_diagnostics,
    kl_between_runs,
    kl_to_prior,
    plot_epoch_distributions,
    plot_params_log_distributions,
    plot_prior_trajectories,
    plot_scale_diagnostics,
    prior_trajectories,
    scale_diagnostics,
)
from service.demo._arm_figures import band_figures, gradient_figures, kl_figures
from service.demo._plots import DPI, plot_training_curves
from service.demo.report import Report
from trainer.store import RunReader, RunStore

__all__ = ["DPI", "GRAD_COLUMNS", "add_diagnostics", "slug"]

#: Weights drawn in each arm's evolution plot (2 keep the figure readable at page width).
EVOLUTION_TOP_K = 2
GRAD_COLUMNS = [
    "level",
    "elements",
    "exploding",
    "vanishing",
    "non-finite elements",
    "median |g|",
    "max |g|",
    "step norm mean",
    "step norm max",
    "step norm / last layer",
]


def slug(label: str) -> str:
    """``label`` as an image-name part: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") or "run"


# ------------------------------------------------------------------
def add_diagnostics(
    report: Report,
    store: RunStore,
    runs: Mapping[str, str],
    curve_keys: Sequence[str],
    *,
    note: str = "",
) -> None:
    """The sections every demo has, for stored runs ``{label: run_id}`` (the first label is
    the reference of the between-run KL): metrics over the captured epochs, prior vs
    posterior scales, learned priors, posterior statistics, KL tables, parameter evolution
    and gradient outliers."""
    readers = {label: store.reader(run_id) for label, run_id in runs.items()}
    try:
        _diagnostics(report, readers, list(curve_keys), note)
    finally:
        for reader in readers.values():
            reader.close()


def _diagnostics(
    report: Report, readers: dict[str, RunReader], curve_keys: list[str], note: str
) -> None:
    last = {label: r.epochs[-1] for label, r in readers.items()}
    labels = list(readers)
    ref = labels[0]

    sec = report.section("training", "Training curves")
    sec.text(
        "Diagnostics of one evaluation run per arm (the runs below). "
        + note
        + " Per-epoch loss (NLL + KL/N), its KL term and the validation metrics at the "
        "captured epochs, from the stored metrics."
    )
    sec.table(
        pd.DataFrame(
            {
                "run id": [r.run_id for r in readers.values()],
                "captured epochs": [", ".join(map(str, r.epochs)) for r in readers.values()],
            },
            index=pd.Index(labels, name="arm"),
        ),
        "runs shown in the diagnostic sections",
    )
    histories = {label: r.metrics_table() for label, r in readers.items()}
    keys = [k for k in curve_keys if any(k in h for hist in histories.values() for h in hist)]
    if keys:
        sec.image(
            "training_curves",
            plot_training_curves(histories, keys),
            "metrics at the captured epochs (colour: arm)",
        )

    sec = report.section("scales", "Prior scale against posterior scales")
    sec.text(
        "Why a learnable prior underfits: per layer, the prior sigma, the RMS of the posterior "
        "sigmas and the RMS of the posterior means over epochs. Fitting one prior per layer by "
        "the ELBO drives the prior sigma to the empirical-Bayes value sqrt(mean(sigma_i^2 + "
        "mu_i^2)), which the posterior noise dominates; the KL then pulls the means to zero "
        "like strong weight decay. 'prior / EB sigma' = 1 is that fixed point."
    )
    sec.image(
        "scale_diagnostics",
        plot_scale_diagnostics(readers, dpi=DPI),
        "weight scales per layer over epochs (colour: arm; line style: quantity)",
    )
    scale = pd.concat(
        {
            label: scale_diagnostics(r, [last[label]]).xs(last[label], level="epoch")
            for label, r in readers.items()
        },
        names=["arm", "layer"],
    )
    sec.table(scale, "weight scales at the last captured epoch")

    sec = report.section("priors", "Learned priors")
    sec.text(
        "Each layer's weights share one Gaussian prior and its biases another. Fixed arms keep "
        "N(mu0, sigma0^2); learnable arms learn sigma per layer (by gradient, empirical Bayes "
        "after a burn-in, under a hyperprior, or on the fan-in scale)."
    )
    for label, reader in readers.items():
        traj = prior_trajectories(reader)
        first = traj.xs(traj.index[0][0], level="epoch")
        final = traj.xs(last[label], level="epoch")
        table = final.add_suffix(" (last)").join(first.add_suffix(" (first)"))
        sec.table(table, f"{label}: shared priors per layer, last vs first captured epoch")
    sec.image(
        "prior_trajectories",
        plot_prior_trajectories(readers, dpi=DPI),
        "prior mu and sigma per layer over epochs (line style: arm)",
    )

    sec = report.section("stats", "Posterior statistics")
    sec.text(
        "The seed's table: mean and std of the posterior mu's and sigma's, overall and per "
        "layer, at the last captured epoch."
    )
    for label, reader in readers.items():
        sec.table(get_overall_weight_stats(reader), f"{label}, epoch {last[label]}")

    sec = report.section("kl", "KL divergences")
    sec.text(
        "Pairwise: the seed's table, the symmetric KL summed over all pairs of posteriors "
        "within a layer (exact, linear time) and its average per pair; a small average means "
        "the layer's posteriors are alike. To the prior: KL(q || p) per layer, the ELBO's KL "
        f"term split up. Between runs: KL between each arm's posteriors and {ref}'s, element "
        "by element (same architecture, same seed)."
    )
    for label, reader in readers.items():
        sec.table(compute_layer_kl_divergences(reader), f"{label}: pairwise symmetric KL")
    for label, reader in readers.items():
        table = kl_to_prior(reader, [last[label]]).xs(last[label], level="epoch")
        sec.table(table, f"{label}: KL(posterior || layer prior), epoch {last[label]}")
    for label in labels[1:]:
        sec.table(
            kl_between_runs(readers[label], readers[ref]),
            f"between runs: {label} (a) vs {ref} (b) posteriors",
        )
    for image, png, caption in kl_figures(readers):
        sec.image(image, png, caption)

    sec = report.section("evolution", "Parameter evolution")
    sec.text(
        f"The seed's plots. Evolution: the {EVOLUTION_TOP_K} weights whose posterior mean moved "
        "most in each arm (other weights in each arm, so one figure per arm), each epoch's "
        "Gaussian coloured from dark purple (early) to yellow (late). Epoch overlay: every "
        "layer's posteriors at the last epoch (a stated random subset of curves, histograms "
        "of all). Percentile bands: min-max and the 7/16/31 % bands of mu and sigma over "
        "epochs, the arms side by side on one scale."
    )
    for label, reader in readers.items():
        name = slug(label)
        sec.image(
            f"evolution_{name}",
            plot_params_log_distributions(
                reader, top_k=EVOLUTION_TOP_K, criterion="mu_change", dpi=DPI
            ),
            f"{label}: evolution of the {EVOLUTION_TOP_K} weights that moved most",
        )
        sec.image(
            f"overlay_{name}",
            plot_epoch_distributions(reader, max_curves=60, dpi=DPI),
            f"{label}: posteriors at epoch {last[label]}",
        )
    for image, png, caption in band_figures(readers):
        sec.image(image, png, caption)

    sec = report.section("gradients", "Gradient outliers compared")
    sec.text(
        "Gradient statistics of the last captured epoch, with the defaults of "
        "`gradient_diagnostics` (calibrated on healthy runs: docs/gradients.md). Per element "
        "(grad_capture 'element'): an element is flagged exploding when its robust z-score of "
        "log10 mean |g| within its layer passes max(6, Bonferroni) in a layer of at least 100 "
        "weights, when |g| > 1e2, or when a step's gradient was non-finite; vanishing when its "
        "|g| is exactly 0. 'step norm / last layer' is the layer's mean per-step gradient norm "
        "over the last layer's: far below 1 in the first layers means gradients vanish on "
        "their way back. Per layer (the protocol's 'layer' capture): only the absolute "
        "thresholds and non-finite counts apply."
    )
    per_element = True
    diags = {label: gradient_diagnostics(reader) for label, reader in readers.items()}
    for label, diag in diags.items():
        at_last = diag.xs(last[label], level="epoch")
        per_element &= bool((at_last["level"] == "element").all())
        sec.table(
            at_last[[c for c in GRAD_COLUMNS if c in at_last.columns]],
            f"{label}: gradient diagnostics, epoch {last[label]}",
        )
    if not per_element:
        sec.text(
            "The runs captured per-layer gradient statistics only, so the comparison of "
            "individual exploding elements across runs is left out (it needs "
            "grad_capture 'element')."
        )
    elif len(readers) >= 2:
        cmp = compare_gradient_outliers(readers, k=3)
        sec.table(cmp.counts, "flagged elements per layer and run")
        keep = ["run", "rank", "layer", "index"] + [
            f"{col} ({label})" for label in labels for col in ("robust z", "|g|")
        ]
        sec.table(
            cmp.table[[c for c in keep if c in cmp.table.columns]],
            "top-3 exploding candidates of each run, beside the other runs (robust z and "
            "|g| of the same weight in every run)",
        )
    for image, png, caption in gradient_figures(readers, diags):
        sec.image(image, png, caption)
