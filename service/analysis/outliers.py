"""Gradient outlier queries: the top-k suspected exploding or vanishing elements of a run,
and the same elements compared across runs of one architecture.

Scores and flags are those of :mod:`service.analysis.gradients`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from trainer.errors import BnnError

from ._multi import check_same_architecture, common_epoch, open_sources
from ._numeric import top_k
from .gradients import (
    GradKind,
    GradThresholds,
    LayerScores,
    layer_scores,
    stat_arrays,
)
from .source import EpochView, RunLike, open_source, parse_enum
from .summary import select_layers

__all__ = ["OutlierComparison", "compare_gradient_outliers", "gradient_outliers"]


def _require_element(view: EpochView, layer: str, tree: dict[str, Any], th: GradThresholds) -> None:
    g, _ = stat_arrays(tree, th, f"epoch {view.epoch} layer {layer!r}")
    if g.ndim == 0:
        # 404: what the request names (a well-formed one) does not exist in this run,
        # like an epoch never captured; the run's capture decided it, not the caller
        raise BnnError.not_found(
            f"gradient outliers need element-level gradient statistics; epoch {view.epoch} "
            f"layer {layer!r} was captured with grad_level 'layer'",
            layer=layer,
            epoch=view.epoch,
        )


def rank_score(z: np.ndarray, kind: GradKind) -> np.ndarray:
    """Across layers larger is more suspicious: z for exploding, -z for vanishing."""
    return np.asarray(z if kind is GradKind.EXPLODING else -z)


def posterior_at(
    view: EpochView, layer: str, param: str, flat: np.ndarray, shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Posterior mu/sigma at flat indices, and the layer prior (reads only those values)."""
    out: dict[str, np.ndarray] = {}
    for stat in ("mu", "sigma"):
        if flat.size <= 32:
            vals = [
                view.array(layer, "posterior", param, stat, index=np.unravel_index(int(i), shape))
                for i in flat
            ]
            out[f"posterior {stat}"] = np.asarray(vals, np.float64).reshape(-1)
        else:
            out[f"posterior {stat}"] = np.asarray(
                view.array(layer, "posterior", param, stat), np.float64
            ).ravel()[flat]
        prior = np.asarray(view.array(layer, "prior", param, stat), np.float64).ravel()
        out[f"prior {stat}"] = np.full(flat.size, prior[0] if prior.size else np.nan)
    return out


def _grad_columns(tree: dict[str, Any], param: str, flat: np.ndarray) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for gp in ("mu", "rho"):
        stats = tree[param].get(gp, {})
        for key, label in (
            ("mean_abs", "mean |g|"),
            ("max_abs", "max |g|"),
            ("nonfinite", "non-finite steps"),
        ):
            if key in stats:
                out[f"{gp} {label}"] = np.asarray(stats[key]).ravel()[flat]
    return out


def element_columns(
    name: str,
    sc: LayerScores,
    tree: dict[str, Any],
    shape: tuple[int, ...],
    flat: np.ndarray,
    th: GradThresholds,
    kind: GradKind,
) -> dict[str, Any]:
    """The gradient columns of an outlier table for the elements ``flat`` of one layer."""
    flagged = (sc.exploding(th) if kind is GradKind.EXPLODING else sc.vanishing(th))[flat]
    return {
        "layer": [name] * flat.size,
        "param": [th.param] * flat.size,
        "flat index": flat,
        "index": [tuple(int(v) for v in np.unravel_index(int(i), shape)) for i in flat],
        "robust z": sc.z(flat),
        "|g|": sc.g[flat].astype(np.float64),
        **_grad_columns(tree, th.param, flat),
        "flagged": flagged,
    }


def layer_candidates(
    view: EpochView, layer: str, th: GradThresholds, kind: GradKind, k: int
) -> tuple[LayerScores, np.ndarray, tuple[int, ...], dict[str, Any]] | None:
    """Scores of one layer and the flat indices of its top-k (None without statistics)."""
    tree = view.gradients(layer)
    if tree is None or th.param not in tree:
        return None
    _require_element(view, layer, tree, th)
    shape = tuple(np.shape(tree[th.param][th.grad_param][th.stat]))
    sc = layer_scores(tree, th, f"epoch {view.epoch} layer {layer!r}")
    return sc, top_k(sc.score(kind), k), shape, tree


def add_posterior(
    view: EpochView, table: pd.DataFrame, shapes: dict[str, tuple[int, ...]], param: str
) -> pd.DataFrame:
    """Add posterior mu/sigma and the layer prior of each row's element (reads only those)."""
    cols = {
        f"{d} {s}": np.full(len(table), np.nan)
        for d in ("posterior", "prior")
        for s in ("mu", "sigma")
    }
    layers = table["layer"].to_numpy()
    flats = table["flat index"].to_numpy()
    for name in dict.fromkeys(layers.tolist()):
        rows = np.flatnonzero(layers == name)
        vals = posterior_at(view, name, param, flats[rows].astype(np.intp), shapes[name])
        for col, v in vals.items():
            cols[col][rows] = v
    return table.assign(**cols)


def gradient_outliers(
    run: RunLike,
    epoch: int | None = None,
    k: int = 10,
    kind: str = "exploding",
    layer: str | None = None,
    *,
    param: str = "weight",
    grad_param: str = "mu",
    stat: str = "mean_abs",
    z_threshold: float | None = None,
    explode_abs: float | None = 1e2,
    vanish_abs: float | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> pd.DataFrame:
    """The top-k most suspicious elements at one epoch, across layers or in ``layer``.

    Ranked by the robust z-score of log10 |g| within each element's layer (elements with
    non-finite steps first for ``kind="exploding"``; zeros first for ``"vanishing"``).
    Returns a DataFrame indexed by rank (1..k) with ``layer``, ``param``, ``flat index``,
    ``index`` (tuple), ``robust z``, ``|g|``, the ``mu``/``rho`` gradient statistics,
    ``flagged`` (whether it passes the thresholds), the element's ``posterior mu``/``sigma``
    and its layer's ``prior mu``/``sigma`` at that epoch. Needs element-level statistics;
    reads one layer at a time and keeps only k candidates per layer.
    """
    gk = parse_enum(GradKind, kind, "kind")
    th = GradThresholds(param, grad_param, stat, z_threshold, explode_abs, vanish_abs)
    k = check_k(k)
    with open_source(run, data_dir=data_dir, db_url=db_url) as src:
        e = src.resolve_epoch(epoch)
        with src.open(e) as view:
            names = select_layers(view, layer)
            parts: list[pd.DataFrame] = []
            shapes: dict[str, tuple[int, ...]] = {}
            for order, name in enumerate(names):
                got = layer_candidates(view, name, th, gk, k)
                if got is None:
                    continue
                sc, flat, shapes[name], tree = got
                cols = element_columns(name, sc, tree, shapes[name], flat, th, gk)
                parts.append(
                    pd.DataFrame(cols).assign(_score=rank_score(sc.z(flat), gk), _order=order)
                )
            if not parts:
                raise BnnError.not_found(
                    f"run {src.name!r} epoch {e} has no gradient statistics for "
                    f"{param}/{grad_param} in layers {names}",
                    epoch=e,
                )
            table = pd.concat(parts, ignore_index=True)
            table = table.sort_values(
                ["_score", "_order", "flat index"], ascending=[False, True, True]
            )
            table = table.head(k).drop(columns=["_score", "_order"]).reset_index(drop=True)
            table = add_posterior(view, table, shapes, param)
    table.index = pd.RangeIndex(1, len(table) + 1, name="rank")
    return table


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise BnnError.invalid(f"k must be an integer >= 1, got {k!r}", k=str(k))
    return int(k)


class OutlierComparison(NamedTuple):
    """``table``: each run's top-k beside the same elements in the other runs;
    ``counts``: exploding / vanishing / non-finite element counts per layer and run."""

    table: pd.DataFrame
    counts: pd.DataFrame


def compare_gradient_outliers(
    runs: Mapping[str, RunLike] | Sequence[RunLike],
    epoch: int | None = None,
    k: int = 10,
    *,
    kind: str = "exploding",
    layer: str | None = None,
    param: str = "weight",
    grad_param: str = "mu",
    stat: str = "mean_abs",
    z_threshold: float | None = None,
    explode_abs: float | None = 1e2,
    vanish_abs: float | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
) -> OutlierComparison:
    """Each run's top-k suspected exploding (or vanishing) elements, side by side across runs.

    ``runs`` is ``{label: run}`` or a list (labelled by run id); all must have the same
    architecture (INVALID_ARGUMENT naming the first difference). ``epoch=None`` is the
    latest epoch all runs captured. ``table`` has one row per (run, rank) with ``run``,
    ``rank``, ``layer``, ``flat index``, ``index`` and, for every run label L, the columns
    ``robust z (L)``, ``|g| (L)``, ``flagged (L)``, ``posterior mu (L)``,
    ``posterior sigma (L)``, ``prior mu (L)``, ``prior sigma (L)``: the seed's "top
    exploding distributions compared across models". ``counts`` is indexed by layer with
    ``exploding (L)``, ``vanishing (L)``, ``non-finite (L)`` per run.
    """
    gk = parse_enum(GradKind, kind, "kind")
    th = GradThresholds(param, grad_param, stat, z_threshold, explode_abs, vanish_abs)
    k = check_k(k)
    with (
        open_sources(runs, data_dir=data_dir, db_url=db_url, minimum=2) as named,
        contextlib.ExitStack() as stack,
    ):
        e = common_epoch(named, epoch)
        views = [stack.enter_context(src.open(e)) for _, src in named]
        labels = [label for label, _ in named]
        check_same_architecture(
            {lab: {n: None for n in v.layers} for lab, v in zip(labels, views, strict=True)}
        )
        names = select_layers(views[0], layer)
        cands: list[list[tuple[float, int, int, str]]] = [[] for _ in named]
        values: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        counts: dict[str, dict[str, Any]] = {}
        for order, name in enumerate(names):
            got = [layer_candidates(v, name, th, gk, k) for v in views]
            if all(g is None for g in got):
                continue
            missing = [lab for lab, g in zip(labels, got, strict=True) if g is None]
            if missing:
                raise BnnError.not_found(
                    f"runs {missing} have no gradient statistics for layer {name!r} at epoch {e}"
                )
            present = [g for g in got if g is not None]
            check_same_architecture(
                {lab: {name: g[2]} for lab, g in zip(labels, present, strict=True)}
            )
            shapes[name] = present[0][2]
            union = np.unique(np.concatenate([g[1] for g in present]))
            counts[name] = {}
            for r, (sc, flat, shape, tree) in enumerate(present):
                score = rank_score(sc.z(flat), gk)
                cands[r] += [
                    (float(v), order, int(i), name) for v, i in zip(score, flat, strict=True)
                ]
                cols = element_columns(name, sc, tree, shape, union, th, gk)
                values[(labels[r], name)] = {
                    int(i): {c: cols[c][j] for c in ("robust z", "|g|", "flagged")}
                    for j, i in enumerate(union)
                }
                lab = labels[r]
                counts[name] |= {
                    f"exploding ({lab})": int(np.count_nonzero(sc.exploding(th))),
                    f"vanishing ({lab})": int(np.count_nonzero(sc.vanishing(th))),
                    f"non-finite ({lab})": int(np.count_nonzero(sc.nonfinite)),
                }
        if not counts:
            raise BnnError.not_found(f"no gradient statistics at epoch {e} in layers {names}")
        rows: list[dict[str, Any]] = []
        for r, lab in enumerate(labels):
            for rank, (_, _, i, name) in enumerate(
                sorted(cands[r], key=lambda c: (-c[0], c[1], c[2]))[:k]
            ):
                rows.append(
                    {
                        "run": lab,
                        "rank": rank + 1,
                        "layer": name,
                        "flat index": i,
                        "index": tuple(int(v) for v in np.unravel_index(i, shapes[name])),
                    }
                )
        table = pd.DataFrame(rows)
        for lab, view in zip(labels, views, strict=True):
            for c in ("robust z", "|g|", "flagged"):
                table[f"{c} ({lab})"] = [
                    values[(lab, row["layer"])][row["flat index"]][c] for row in rows
                ]
            post = add_posterior(view, table[["layer", "flat index"]], shapes, param)
            for c in ("posterior mu", "posterior sigma", "prior mu", "prior sigma"):
                table[f"{c} ({lab})"] = post[c].to_numpy()
    counts_frame = pd.DataFrame.from_dict(counts, orient="index")
    counts_frame.index.name = "layer"
    return OutlierComparison(table, counts_frame)
