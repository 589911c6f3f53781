"""Comparisons across runs: KL between two runs' posteriors, and the width study."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainer.errors import BnnError

from ._multi import check_same_architecture, open_sources
from ._numeric import kl_normal_elementwise, valid_mask
from .source import EpochView, RunLike
from .summary import PARAMS, frame_from_rows, select_layers, summarize

__all__ = ["kl_between_runs", "width_study"]

_NAN = float("nan")


def _pair_kl(
    a: EpochView, b: EpochView, layer: str, param: str, labels: tuple[str, str]
) -> dict[str, float]:
    mu_a, sig_a = (
        a.array(layer, "posterior", param, "mu"),
        a.array(layer, "posterior", param, "sigma"),
    )
    mu_b, sig_b = (
        b.array(layer, "posterior", param, "mu"),
        b.array(layer, "posterior", param, "sigma"),
    )
    check_same_architecture(
        {labels[0]: {f"{layer}.{param}": mu_a.shape}, labels[1]: {f"{layer}.{param}": mu_b.shape}}
    )
    ok_a, ok_b = valid_mask(mu_a, sig_a), valid_mask(mu_b, sig_b)
    bad = 0
    if ok_a is not None or ok_b is not None:
        ok = np.ones(mu_a.shape, bool) if ok_a is None else ok_a
        if ok_b is not None:
            ok = ok & ok_b
        bad = int(ok.size - np.count_nonzero(ok))
        mu_a, sig_a, mu_b, sig_b = mu_a[ok], sig_a[ok], mu_b[ok], sig_b[ok]
    ab = float(kl_normal_elementwise(mu_a, sig_a, mu_b, sig_b).sum())
    ba = float(kl_normal_elementwise(mu_b, sig_b, mu_a, sig_a).sum())
    n = int(np.size(mu_a))
    name = param.capitalize()
    return {
        f"{name} KL(a||b)": ab,
        f"{name} KL(b||a)": ba,
        f"{name} symmetric KL": ab + ba,
        f"{name} symmetric KL per element": (ab + ba) / n if n else _NAN,
        f"{name} non-finite": bad,
    }


def kl_between_runs(
    run_a: RunLike,
    run_b: RunLike,
    epoch: int | None = None,
    epoch_b: int | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """KL between two runs' posteriors, element by element, summed per layer.

    Element i of run a is compared with element i of run b, so the runs must have the same
    architecture (INVALID_ARGUMENT naming the first differing layer or shape); this is
    meaningful for runs started from the same initialisation (same seed), e.g. a fixed and a
    learnable prior: it measures how far the learnable prior moves the solution.
    ``epoch=None``: each run's latest epoch; ``epoch_b=None``: ``epoch`` (or b's latest).
    Returns a DataFrame indexed by layer with, for ``Weight`` and ``Bias``: ``KL(a||b)``,
    ``KL(b||a)``, ``symmetric KL``, ``symmetric KL per element`` and ``non-finite``
    (elements invalid in either run, left out). ``attrs`` records the runs and epochs.
    """
    with open_sources([run_a, run_b], data_dir=data_dir, db_url=db_url) as named:
        (la, src_a), (lb, src_b) = named
        ea = src_a.resolve_epoch(epoch)
        eb = src_b.resolve_epoch(epoch_b if epoch_b is not None else epoch)
        rows: dict[str, dict[str, Any]] = {}
        with src_a.open(ea) as a, src_b.open(eb) as b:
            check_same_architecture({la: dict.fromkeys(a.layers), lb: dict.fromkeys(b.layers)})
            for layer in select_layers(a, layers):
                row: dict[str, Any] = {}
                for p in PARAMS:
                    has = {la: a.has_param(layer, p), lb: b.has_param(layer, p)}
                    check_same_architecture(
                        {lab: {f"{layer}.{p}": h} for lab, h in has.items()}, "present"
                    )
                    if has[la]:
                        row |= _pair_kl(a, b, layer, p, (la, lb))
                    else:
                        name = p.capitalize()
                        row |= {
                            f"{name} {c}": _NAN for c in ("KL(a||b)", "KL(b||a)", "symmetric KL")
                        }
                        row |= {f"{name} symmetric KL per element": _NAN, f"{name} non-finite": 0}
                rows[layer] = row
    frame = frame_from_rows(rows, ["layer"])
    frame.attrs["runs"] = {"a": la, "b": lb, "epoch_a": ea, "epoch_b": eb}
    return frame


def width_study(
    runs: Mapping[str, RunLike] | Sequence[RunLike],
    epoch: int | None = None,
    *,
    widths: Mapping[str, float] | None = None,
    min_widths: int = 2,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """Learned priors against layer width across runs (the seed's width question).

    Returns a DataFrame indexed by (run, layer) with ``width`` (``widths[label]``, or by
    default the run's hidden width: the largest output size of all layers but the last),
    ``fan_in``, ``fan_out``, ``weights``, ``Weight prior mu``/``sigma``, ``Bias prior
    mu``/``sigma``, ``Weight mu std``, ``Weight sigma mean`` and ``Weight KL per element``
    (to the layer prior). ``epoch=None``: each run's latest epoch.

    The runs must have at least ``min_widths`` (2) different widths (INVALID_ARGUMENT
    listing each run's width otherwise): against a single width, priors can only be
    compared, not related to width (:func:`kl_between_runs` and ``plot_prior_trajectories``
    compare runs of one width). ``min_widths=1`` takes any runs (a report's table of
    whatever completed).
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    run_widths: dict[str, float] = {}
    with open_sources(runs, data_dir=data_dir, db_url=db_url) as named:
        for label, src in named:
            e = src.resolve_epoch(epoch)
            run_rows: dict[str, dict[str, Any]] = {}
            with src.open(e) as view:
                for layer in view.layers:
                    w = summarize(src, view, layer, "weight")
                    b = summarize(src, view, layer, "bias")
                    assert w is not None
                    fan_out = w.shape[0] if w.shape else 1
                    fan_in = int(np.prod(w.shape[1:], dtype=np.int64)) if len(w.shape) > 1 else 1
                    run_rows[layer] = {
                        "epoch": e,
                        "fan_in": fan_in,
                        "fan_out": fan_out,
                        "weights": w.size,
                        "Weight prior mu": w.prior_mu,
                        "Weight prior sigma": w.prior_sigma,
                        "Bias prior mu": b.prior_mu if b else _NAN,
                        "Bias prior sigma": b.prior_sigma if b else _NAN,
                        "Weight mu std": w.mu.std,
                        "Weight sigma mean": w.sigma.mean,
                        "Weight KL per element": w.kl_to_prior / w.n if w.n else _NAN,
                    }
            outs = [r["fan_out"] for r in run_rows.values()]
            default = max(outs[:-1]) if len(outs) > 1 else outs[0]
            width = float(widths[label]) if widths and label in widths else float(default)
            run_widths[label] = width
            for layer, row in run_rows.items():
                rows[(label, layer)] = {"width": width, **row}
    _check_widths(run_widths, min_widths)
    return frame_from_rows(rows, ["run", "layer"])


def _check_widths(run_widths: Mapping[str, float], least: int) -> None:
    """INVALID_ARGUMENT unless the runs have at least ``least`` different widths."""
    distinct = {w for w in run_widths.values() if np.isfinite(w)}
    if len(distinct) >= least:
        return
    listing = ", ".join(f"{label}: {w:g}" for label, w in run_widths.items())
    raise BnnError.invalid(
        f"a width study needs runs of at least {least} different widths, got {len(run_widths)} "
        f"run(s) of {len(distinct)} width ({listing}); to compare the priors of runs of one "
        "width, use kl_between_runs or plot_prior_trajectories (GET /compare/kl, "
        "/compare/plots/priors.png)",
        widths={label: float(w) for label, w in run_widths.items()},
    )
