"""The analysis gives the same answers on version 1 and version 2 files of the same epochs.

The epochs come from a small MLP trained for real (learnable prior, per-element gradient
capture), with the hard cases planted in its second layer's weight ``mu`` statistics: an
exact 0 (vanishing), 1e-41 and 1e-12 (tiny but not zero), 1e6 and 3e38 (above
``explode_abs``), and Inf and NaN with non-finite step counts (a few more in ``layer1``'s
``rho`` statistics and ``layer2``'s bias). Written once as schema version 1 (float32
statistics) and once as version 2 (bfloat16), every exploding and vanishing flag must be
the same element by element, except for elements within the rounding (twice 2^-8,
relative) of the bound they are compared with (an absolute threshold placed among the
values, or a z-score bound): those may fall on either side, and there are none under the
default thresholds. Zeros and non-finite values are exact, medians and maxima of |g| equal
within the rounding (relative 2^-8; absolute 2^-134 below 2^-126); the posterior tables (KL,
statistics) are exact, as the posteriors are stored unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from service import analysis as an
from service.analysis.gradients import GradKind, GradThresholds, LayerScores, layer_scores
from trainer.capture import GradientRecorder, get_all_distribution_params
from trainer.layers import model_kl, prior_penalty
from trainer.models import mlp
from trainer.priors import PriorKind, PriorSpec
from trainer.snapshot import EpochSnapshot, GradLevel
from trainer.store import EpochFile, RunStore, write_epoch_file

PLANTED = [0.0, 1e-41, 1e-12, 1e6, 3e38, np.inf, np.nan]
REL = 2.0**-8  # bfloat16 rounding, relative (normal numbers)


def _trained_epochs() -> list[EpochSnapshot]:
    torch.manual_seed(0)
    x = torch.randn(2048, 32)
    y = (x @ torch.randn(32, 10)).argmax(1)
    model = mlp(32, [128, 96], 10, PriorSpec(kind=PriorKind.LEARNABLE, sigma0=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    recorder = GradientRecorder(model, GradLevel.ELEMENT)
    snaps = []
    for epoch in range(2):
        for i in range(0, 2048, 64):
            opt.zero_grad(set_to_none=True)
            out = model(x[i : i + 64])
            loss = (
                F.cross_entropy(out, y[i : i + 64])
                + (model_kl(model) + prior_penalty(model)) / 2048
            )
            loss.backward()
            recorder.record_step()
            opt.step()
        params = get_all_distribution_params(model, epoch, force=True)
        assert params is not None
        snaps.append(
            EpochSnapshot(
                epoch, params, {"loss": float(loss.detach())}, recorder.result(), GradLevel.ELEMENT
            )
        )
        recorder.reset()
    grads = snaps[-1].gradients
    assert grads is not None
    stats = grads["layer2"]["weight"]["mu"]
    flat, counts = stats["mean_abs"].reshape(-1), stats["nonfinite"].reshape(-1)
    flat[5 : 5 + len(PLANTED)] = PLANTED
    stats["max_abs"].reshape(-1)[5 : 5 + len(PLANTED)] = PLANTED
    counts[10:12] = [3, 7]  # the Inf and NaN elements
    grads["layer1"]["weight"]["rho"]["mean_abs"].reshape(-1)[:3] = [0.0, 1e-12, 5e3]
    grads["layer2"]["bias"]["mu"]["mean_abs"][:2] = [0.0, 1e3]
    return snaps


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    data_dir = tmp_path_factory.mktemp("versions")
    with RunStore(data_dir) as store:
        ids = {}
        for version in (1, 2):
            run = store.create_run(f"v{version}", {})
            for snap in _trained_epochs():
                path = data_dir / f"v{version}_{snap.epoch}.h5"
                write_epoch_file(path, snap, run_id=run.id, schema_version=version)
                store.import_epoch_file(run.id, snap.epoch, path)
            ids[version] = run.id
    return data_dir, ids


THRESHOLDS = [
    GradThresholds(),  # the calibrated defaults
    GradThresholds(z_threshold=3.0),
    GradThresholds(vanish_abs=1e-10, explode_abs=1e-2),
    GradThresholds(stat="max_abs", z_threshold=2.5),
    GradThresholds(grad_param="rho", vanish_abs=1e-6),
    GradThresholds(param="bias", z_threshold=2.0),
]


def _trees(data_dir: Path, run_id: str, epoch: int) -> dict[str, dict]:
    path = data_dir / "runs" / run_id / f"epoch_{epoch:06d}.h5"
    with EpochFile(path) as ef:
        assert ef.header.schema_version in (1, 2)
        return {layer: ef.gradients(layer) for layer in ef.header.layers}


def _near_a_bound(a: LayerScores, b: LayerScores, th: GradThresholds, kind: GradKind) -> np.ndarray:
    """Elements whose version 1 |g| lies within twice the bfloat16 rounding of a bound
    that ``kind`` compares with: the absolute one, or the z-score bound of either file
    (its median and scale come from rounded values too). Only these may flag differently."""
    bounds = [th.explode_abs if kind is GradKind.EXPLODING else th.vanish_abs]
    bounds += [10 ** s.log_bound(kind) for s in (a, b) if np.isfinite(s.log_bound(kind))]
    near = np.zeros(a.g.shape, bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for bound in bounds:
            if bound is not None and 0 < bound < np.inf:
                near |= np.abs(a.g.astype(np.float64) / bound - 1) <= 2 * REL
    return near


def _flag_differences(
    data_dir: Path, ids: dict[int, str], th: GradThresholds
) -> dict[tuple[int, str, str], tuple[int, int, int]]:
    """(epoch, layer, kind) -> (flags in version 1, in version 2, elements near a bound);
    every element that flags differently must be near a bound."""
    out = {}
    for epoch in (0, 1):
        old, new = (_trees(data_dir, ids[v], epoch) for v in (1, 2))
        for layer in old:
            a, b = layer_scores(old[layer], th), layer_scores(new[layer], th)
            assert b.g.dtype == np.float32
            np.testing.assert_array_equal(a.nonfinite, b.nonfinite)
            np.testing.assert_array_equal(a.g == 0, b.g == 0)
            assert b.median == pytest.approx(a.median, abs=2 * REL)  # of log10 |g|
            for kind in GradKind:
                fa, fb = (
                    (s.exploding(th) if kind is GradKind.EXPLODING else s.vanishing(th))
                    for s in (a, b)
                )
                near = _near_a_bound(a, b, th, kind)
                assert not ((fa != fb) & ~near).any(), (epoch, layer, kind)
                out[(epoch, layer, kind.value)] = (int(fa.sum()), int(fb.sum()), int(near.sum()))
    return out


@pytest.mark.parametrize("th", THRESHOLDS, ids=lambda th: repr(th)[14:60])
def test_every_flag_is_the_same_element_by_element(
    runs: tuple[Path, dict[int, str]], th: GradThresholds
) -> None:
    data_dir, ids = runs
    found = _flag_differences(data_dir, ids, th)
    assert sum(v1 for v1, _, _ in found.values()) > 0  # the planted cases at least
    if th == GradThresholds():  # the defaults: far from any value of a healthy layer
        assert all(v1 == v2 and near == 0 for v1, v2, near in found.values()), found


def _same_frames(a: pd.DataFrame, b: pd.DataFrame, rounded: tuple[str, ...]) -> None:
    assert list(a.columns) == list(b.columns) and a.index.equals(b.index)
    for col in a.columns:
        if col in rounded:
            np.testing.assert_allclose(b[col], a[col], rtol=REL, err_msg=col)
        else:
            pd.testing.assert_series_equal(a[col], b[col], check_exact=True)


@pytest.mark.parametrize("th", THRESHOLDS, ids=lambda th: repr(th)[14:60])
def test_gradient_tables_agree(runs: tuple[Path, dict[int, str]], th: GradThresholds) -> None:
    data_dir, ids = runs
    kw: dict[str, Any] = {
        "param": th.param,
        "grad_param": th.grad_param,
        "stat": th.stat,
        "z_threshold": th.z_threshold,
        "explode_abs": th.explode_abs,
        "vanish_abs": th.vanish_abs,
        "data_dir": data_dir,
    }
    an.clear_cache()
    tables = [an.gradient_diagnostics(ids[v], **kw) for v in (1, 2)]
    counts = ("exploding", "vanishing", "exploding flag", "vanishing flag")
    rounded = ("median |g|", "max |g|", "peak |g|")
    _same_frames(
        tables[0].drop(columns=list(counts)), tables[1].drop(columns=list(counts)), rounded
    )
    found = _flag_differences(data_dir, ids, th)
    for key, row in tables[1].iterrows():
        epoch, layer = cast(tuple[int, str], key)
        for kind in ("exploding", "vanishing"):
            v1, v2, _ = found[(epoch, layer, kind)]
            assert (tables[0].loc[(epoch, layer), kind], row[kind]) == (v1, v2)
            assert row[f"{kind} flag"] == (v2 > 0)
    if th.param == "weight" and th.grad_param == "mu":
        assert tables[1].loc[(1, "layer2"), "non-finite steps"] == 10  # planted: 3 + 7
    for kind in ("exploding", "vanishing"):
        top = [an.gradient_outliers(ids[v], 1, 8, kind, **kw) for v in (1, 2)]
        np.testing.assert_allclose(
            np.sort(top[1]["|g|"].to_numpy()),
            np.sort(top[0]["|g|"].to_numpy()),
            rtol=REL,
            atol=2.0**-133,  # below 2^-126, bfloat16 keeps an absolute error of 2^-134
        )
        assert top[0]["flagged"].sum() == pytest.approx(top[1]["flagged"].sum(), abs=1)


def test_posterior_tables_are_exact(runs: tuple[Path, dict[int, str]]) -> None:
    data_dir, ids = runs
    an.clear_cache()
    for table in (
        lambda r: an.compute_layer_kl_divergences(r, data_dir=data_dir),
        lambda r: an.kl_to_prior(r, data_dir=data_dir),
        lambda r: an.get_overall_weight_stats(r, data_dir=data_dir),
        lambda r: an.percentile_bands(r, "layer1", data_dir=data_dir),
        lambda r: an.gradient_norm_series(r, data_dir=data_dir),
    ):
        a, b = table(ids[1]), table(ids[2])
        pd.testing.assert_frame_equal(a, b, check_exact=True)
