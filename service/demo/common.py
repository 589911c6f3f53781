"""What both demos share: the seven-arm study protocol run into the demo's own store, one
report around it, the diagnostic sections of stored runs, and a trained model rebuilt from a
stored epoch (for the plots that need predictions).

    result = run_protocol_demo(out, spec, title=..., intro=..., curve_keys=[...])
    model = model_from_run(store, run_id, data_for_run(store, run_id))
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from service.demo._diagnostics import add_diagnostics, slug
from service.demo.report import Report
from service.demo.study import StudySpec
from trainer.config import ModelKind, TrainConfig, parse_config
from trainer.data import DataSplits, load_dataset
from trainer.errors import BnnError
from trainer.layers import bayesian_layers
from trainer.priors import SIGMA_FLOOR, GaussianPrior, inverse_positive
from trainer.store import RunReader, RunStore
from trainer.train import build_model

__all__ = [
    "DIAGNOSTIC_ARMS",
    "DemoResult",
    "add_diagnostics",
    "burnin_note",
    "data_for_run",
    "demo_spec",
    "model_from_run",
    "pick_arms",
    "plot_epoch",
    "run_protocol_demo",
    "say",
    "slug",
]

#: The arms whose seed-0 runs get the diagnostic sections (those present, in this order).
DIAGNOSTIC_ARMS = (
    "fixed N(0,1)",
    "learnable gradient",
    "EB burn-in",
    "hierarchical scaled",
    "fan-in learnable",
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pick_arms(arms: Sequence[str], preferred: Sequence[str], n: int) -> list[str]:
    """Up to ``n`` of ``arms``: the ``preferred`` ones present first, then the others."""
    chosen = [a for a in preferred if a in arms]
    chosen += [a for a in arms if a not in chosen]
    return chosen[:n]


def burnin_note(spec: StudySpec) -> str:
    """A sentence when some EB burn-in level is not shorter than the tuning runs (those grid
    points then never update the prior after its initial empirical-Bayes fit)."""
    arm = spec.arms.get("EB burn-in")
    length = spec.tune_epochs or int(spec.base.get("epochs", 0))
    levels = [] if arm is None else arm.tune.get("prior_burnin_epochs", [])
    late = [int(v) for v in levels if length and int(v) >= length]
    if not late:
        return ""
    return (
        f" EB burn-in levels {late} are not shorter than the {length}-epoch tuning runs: at "
        "those grid points the prior keeps its initial empirical-Bayes fit during tuning."
    )


def demo_spec(dataset: str, **options: Any) -> StudySpec:
    """:func:`~service.demo.protocol.protocol_spec`, a bad option (an unknown arm, repeated
    seeds, a bad size) as INVALID_ARGUMENT before anything is trained."""
    from service.demo.protocol import protocol_spec

    try:
        spec = protocol_spec(dataset, **options)
        spec.validate_configs()
    except ValueError as exc:
        raise BnnError.invalid(f"bad demo: {exc}") from None
    return spec


def _json_ready(value: Any) -> Any:
    """NaN/inf as None, numpy scalars as Python numbers (summary.json is strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rows(frame: pd.DataFrame) -> dict[str, Any]:
    out = frame.to_dict(orient="index")
    return {" / ".join(map(str, k)) if isinstance(k, tuple) else str(k): v for k, v in out.items()}


@dataclass
class DemoResult:
    """What a demo trained, wrote and measured."""

    out_dir: Path
    html: Path
    markdown: Path
    study_id: str
    runs: dict[str, str]  # arm -> run id of the diagnostic seed's evaluation run
    summary: pd.DataFrame  # arm x metric, "mean [lo, hi]" strings
    significance: list[str]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # summary (numbers), ...
    seconds: dict[str, float] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def write_summary(self) -> Path:
        """``summary.json`` beside the report: the study id, the per-arm summary with CIs
        (``summary``: numbers with ``lo``/``hi`` columns; ``summary_text``: as printed), the
        paired differences, the significance sentences, runs, timings, sections."""
        summary = {
            "study_id": self.study_id,
            **self.info,
            "runs": self.runs,
            "seconds": self.seconds,
            "summary_text": _rows(self.summary),
            **{name: _rows(frame) for name, frame in self.tables.items()},
            "significance": [s.replace("**", "") for s in self.significance],
            "sections": self.sections,
            "images": self.images,
        }
        path = self.out_dir / "summary.json"
        path.write_text(json.dumps(_json_ready(summary), indent=2, default=str, allow_nan=False))
        return path


# -- rebuilding a stored model ----------------------------------------------------------------
def data_for_run(store: RunStore, run_id: str) -> DataSplits:
    """The data splits the run was trained on (the trainer's own ``load_dataset`` call)."""
    cfg = parse_config(store.get_run(run_id).config)
    return load_dataset(
        cfg.dataset.value,
        flatten=cfg.model is ModelKind.MLP,
        n_train=cfg.n_train,
        n_test=cfg.n_test,
        n_val=cfg.n_val,
        seed=cfg.seed,
        root=store.data_dir / "datasets",
    )


def plot_epoch(reader: RunReader) -> int:
    """The epoch whose weights the run's test metrics are of (``selected_epoch``) when it was
    captured, else the last captured epoch."""
    epochs = reader.epochs
    if not epochs:
        raise BnnError.not_found(f"run {reader.run_id!r} has no captured epoch")
    selected = reader.metrics(epochs[-1]).get("selected_epoch")
    if selected is not None and math.isfinite(selected) and int(selected) in epochs:
        return int(selected)
    return epochs[-1]


def _sigma_to_rho(sigma: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(np.asarray(sigma), dtype=torch.float64)
    # a sigma stored at the floor (softplus(rho) + 1e-8 rounded to float32) has no finite
    # inverse; one float32 step above the floor is the same standard deviation
    s = torch.where(s > SIGMA_FLOOR, s, torch.full_like(s, SIGMA_FLOOR * (1 + 2**-20)))
    return inverse_positive(s).to(like.dtype).reshape(like.shape)


@torch.no_grad()
def model_from_run(
    store: RunStore,
    run_id: str,
    data: DataSplits,
    *,
    epoch: int | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The run's Bayesian network with the stored posteriors of ``epoch`` (default: the last
    captured one): ``build_model(config, data)``, then every layer's posterior mu copied into
    ``*_mu`` and sigma into ``*_rho`` (``inverse_positive``); a learnable Gaussian prior gets
    its stored sigma (and mu when learned). Returned in eval mode on ``device``."""
    config: TrainConfig = parse_config(store.get_run(run_id).config)
    with store.reader(run_id) as reader:
        epochs = reader.epochs
        if not epochs:
            raise BnnError.not_found(f"run {run_id!r} has no captured epoch", run_id=run_id)
        params = reader.epoch_params(epochs[-1] if epoch is None else epoch)
    model = build_model(config, data)
    layers = dict(bayesian_layers(model))
    if list(layers) != list(params):
        raise BnnError.invalid(
            f"run {run_id!r}: stored layers {list(params)} differ from the model's {list(layers)}"
        )
    for name, layer in layers.items():
        log = params[name]
        priors = layer.priors()
        for which, post in log["posterior"].items():
            mu, rho = getattr(layer, f"{which}_mu"), getattr(layer, f"{which}_rho")
            mu.copy_(torch.as_tensor(np.asarray(post["mu"])).reshape(mu.shape))
            rho.copy_(_sigma_to_rho(post["sigma"], rho))
            prior, stored = priors.get(which), log.get("prior", {}).get(which)
            if isinstance(prior, GaussianPrior) and prior.rho is not None and stored is not None:
                prior.set_sigma_(float(np.asarray(stored["sigma"]).reshape(-1)[0]))
                if isinstance(prior.mu, nn.Parameter):
                    prior.mu.fill_(float(np.asarray(stored["mu"]).reshape(-1)[0]))
    return model.to(device).eval()


# -- the demo itself --------------------------------------------------------------------------
#: ``extra(report, store, runs) -> tables``: the task's own sections (fit, calibration) from
#: the diagnostic seed's evaluation runs ``{arm: run_id}``.
ExtraSections = Callable[[Report, RunStore, dict[str, str]], dict[str, pd.DataFrame]]


def run_protocol_demo(
    out_dir: str | Path,
    spec: StudySpec,
    *,
    title: str,
    intro: str,
    curve_keys: Sequence[str],
    extra: ExtraSections | None = None,
    workers: int = 2,
    progress: bool = True,
    command: str | None = None,
    info: dict[str, Any] | None = None,
) -> DemoResult:
    """Run ``spec`` with :func:`~service.demo.study.run_study_local` into ``<out>/bnn-data``,
    then write one report: the study's sections (protocol, tuning, results with CIs,
    significance, runs), the task's ``extra`` sections and the diagnostics of the first seed's
    evaluation runs; ``summary.json`` and the study's CSV tables beside it."""
    from service.demo.study import run_study_local

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = say if progress else (lambda _m: None)
    sweep = run_study_local(spec, out / "bnn-data", workers=workers, log=log)
    t_study = time.perf_counter()
    log("writing the report")
    threads = torch.get_num_threads()
    # one thread: the rebuilt models' forward passes are small, and two OpenMP threads
    # competing with other processes for 2 cores ran them 5x slower (measured)
    torch.set_num_threads(1)
    try:
        with RunStore(out / "bnn-data") as store:
            result = _report(out, store, sweep.id, title, intro, curve_keys, extra, command)
    finally:
        torch.set_num_threads(threads)
    t_end = time.perf_counter()
    result.seconds = {"study": t_study - t0, "report": t_end - t_study, "total": t_end - t0}
    result.info = {"study_name": result.info.pop("study_name"), **(info or {}), **result.info}
    result.write_summary()
    return result


def _report(
    out: Path,
    store: RunStore,
    study_id: str,
    title: str,
    intro: str,
    curve_keys: Sequence[str],
    extra: ExtraSections | None,
    command: str | None,
) -> DemoResult:
    from service.demo.study_report import (
        add_study_sections,
        collect_study,
        display_summary,
        significance_sentences,
        study_tables,
    )

    sweep = store.get_sweep(study_id)
    data = collect_study(store, sweep)
    tables = study_tables(data)
    report = Report(title, out, intro=intro)
    add_study_sections(report, data, tables, command=command)
    seed = data.seeds[0]
    runs = {arm: sweep.labels[f"{arm}/s{seed}"] for arm in data.spec.arms}
    extra_tables = extra(report, store, runs) if extra is not None else {}
    shown = pick_arms(list(runs), DIAGNOSTIC_ARMS, len(DIAGNOSTIC_ARMS))
    add_diagnostics(
        report,
        store,
        {arm: runs[arm] for arm in shown},
        curve_keys,
        note=f"Seed {seed}; same data, data order and initial means for every arm.",
    )
    html, md = report.write()
    for name, frame in tables.items():
        frame.to_csv(out / f"study_{name}.csv")
    data.runs.to_csv(out / "study_runs.csv", index=False)
    return DemoResult(
        out,
        html,
        md,
        sweep.id,
        runs,
        display_summary(data, tables),
        significance_sentences(data, tables),
        tables={**tables, **extra_tables},
        sections=report.section_ids,
        images=report.images(),
        info={
            "study_name": sweep.name,
            "arms": list(data.spec.arms),
            "seeds": data.seeds,
            "baseline": data.spec.baseline,
            "diagnostic_seed": seed,
            "tuning_runs": sum(1 for label, _ in sweep.runs if label.startswith("tune/")),
            "evaluation_runs": data.runs[["arm", "seed", "run_id"]].to_dict(orient="records"),
            "base": data.spec.base,
            "tune_epochs": data.spec.tune_epochs,
            "chosen": data.chosen,
            "command": command,
        },
    )
