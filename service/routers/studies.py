"""``/studies``: N arms x K paired seeds, each tuned arm first tuned on a validation grid.

``POST /studies`` checks a :class:`~service.demo.study.StudySpec` (every tuning and
evaluation configuration against the service's limits), records the study (a sweep of kind
``study``) with its tuning runs and hands them to the job runner: 202. The
:class:`StudyAdvancer` (a daemon thread started with the app, every ``BNN_STUDY_POLL_S``
seconds, and once at start) registers and submits the evaluation runs of every study whose
tuning runs have all ended; ``GET /studies/{id}`` advances its study too. Once every arm has
completed an evaluation seed, ``GET /studies/{id}`` shows the tables (means with 95% CIs,
paired differences to the baseline, chosen settings; ``?format=csv&table=...``) and
``GET /studies/{id}/plots/{name}.png`` the plots.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

import pandas as pd
from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from pydantic import ValidationError

from service.demo.studies import sweep_status
from service.demo.study import STUDY_KIND, TUNE_PREFIX, StudySpec, register_study
from service.demo.study import study_phase as recorded_phase
from service.demo.study_report import (
    collect_study,
    display_summary,
    significance_sentences,
    study_plots,
    study_tables,
)
from service.deps import JobsDep, SettingsDep, StoreDep, require_token
from service.errors import json_safe
from service.routers import (
    AUTH_RESPONSES,
    CSV_RESPONSES,
    Format,
    FormatQuery,
    csv_response,
    error_responses,
    json_response,
)
from service.routers.runs import check_limits
from service.schemas import MAX_TAGS, check_text, is_blank
from service.settings import Settings
from service.study_advancer import StudyAdvancer, jobs_of, poll_seconds
from trainer.config import parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore, SweepInfo

__all__ = ["MAX_STUDY_RUNS", "StudyAdvancer", "jobs_of", "poll_seconds", "router"]

log = logging.getLogger("bnn.studies")

MAX_STUDY_RUNS = 512
PLOTS = ("metrics", "differences")
TableName = Literal["summary", "differences", "settings", "display"]
_UNKNOWN = (404, "unknown study (or a sweep's id: see /sweeps)")
_AUTH = AUTH_RESPONSES
_STARTED: dict[int | str, dict[str, Any]] = {
    202: {"description": "the study, phase tuning (or evaluation when untuned)"}
}
_PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}}
router = APIRouter(
    prefix="/studies",
    tags=["studies"],
    dependencies=[Depends(require_token)],
    responses=AUTH_RESPONSES,
)
Phase = Literal["tuning", "evaluation", "failed", "cancelled"]
StudyPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
EXAMPLE = {
    "name": "prior-study",
    "base": {"dataset": "regression", "epochs": 20, "n_train": 512, "eval_samples": 20},
    "arms": {
        "fixed": {"config": {"prior": "fixed"}, "tune": {"kl_weight": [0.1, 1.0]}},
        "learnable": {"config": {"prior": "learnable"}, "tune": {"kl_weight": [0.1, 1.0]}},
        "eb": {"config": {"prior": "learnable", "prior_mode": "empirical_bayes"}},
    },
    "seeds": [0, 1, 2],
    "baseline": "fixed",
    "tune_seed": 1000,
}
SpecBody = Annotated[
    StudySpec,
    Body(
        openapi_examples={
            "three arms": {
                "summary": "fixed vs learnable prior, both tuned on kl_weight, one untuned arm",
                "value": EXAMPLE,
            }
        }
    ),
]


def _advancer(request: Request) -> StudyAdvancer:
    state = request.app.state
    advancer: StudyAdvancer | None = getattr(state, "study_advancer", None)
    if advancer is None:  # an app whose lifespan did not start one: no loop, GET advances
        advancer = StudyAdvancer(state.store, lambda: jobs_of(request.app), 0.0)
        state.study_advancer = advancer
    return advancer


AdvancerDep = Annotated[StudyAdvancer, Depends(_advancer)]


# ----------------------------------------------------------------------------- helpers
def _load(store: RunStore, study_id: str) -> SweepInfo:
    try:
        sweep = store.get_sweep(study_id)
    except BnnError as exc:
        if exc.code is ErrorCode.NOT_FOUND:
            raise BnnError.not_found(f"unknown study {study_id!r}", study_id=study_id) from None
        raise
    if sweep.kind != STUDY_KIND:
        raise BnnError.not_found(
            f"unknown study {study_id!r} (it is a sweep of kind {sweep.kind!r})", study_id=study_id
        )
    return sweep


def _check_spec(spec: StudySpec, settings: Settings) -> None:
    """INVALID_ARGUMENT naming the study run (arm) whose configuration is bad or too large."""
    try:
        check_text(spec.to_json(), "study", 10_000)
    except ValueError as exc:
        raise BnnError.invalid(str(exc)) from None
    tags = spec.base.get("tags", [])
    if not isinstance(tags, list) or len(tags) >= MAX_TAGS:
        raise BnnError.invalid(f"base.tags must be a list of fewer than {MAX_TAGS} tags")
    for tag in tags:
        if not isinstance(tag, str) or is_blank(tag) or len(tag) > 64:
            raise BnnError.invalid(f"base.tags must be non-blank strings of <= 64, got {tag!r}")
    total = sum(arm.budget for arm in spec.arms.values()) + len(spec.arms) * len(spec.seeds)
    if total > MAX_STUDY_RUNS:
        raise BnnError.invalid(
            f"the study has {total} runs, more than the limit {MAX_STUDY_RUNS}",
            runs=total,
            limit=MAX_STUDY_RUNS,
        )
    spec.validate_configs()
    # the values as given, even one that every run overrides (an arm's config value that
    # a tuned field replaces): the schema bounds them all
    for where, values in [("base", spec.base)] + [
        (f"arms.{name}.config", arm.config) for name, arm in spec.arms.items()
    ]:
        _check_value_limits(values, settings, where)
    configs = spec.tuning_configs()
    for i in range(max(len(arm.grid()) for arm in spec.arms.values())):
        chosen = {n: a.grid()[min(i, len(a.grid()) - 1)] for n, a in spec.arms.items()}
        evaluation = spec.evaluation_configs(chosen)
        configs += [(label, cfg) for label, cfg in evaluation if cfg["seed"] == spec.seeds[0]]
    for label, cfg in configs:
        try:
            check_limits(parse_config(cfg), settings)
        except BnnError as exc:
            raise BnnError(exc.code, f"study run {label!r}: {exc.message}", **exc.details) from None


def _active(runs: list[dict[str, Any]]) -> bool:
    return any(RunStatus(r["status"]).active for r in runs)


def _frame(frame: pd.DataFrame) -> dict[str, Any]:
    named = any(n is not None for n in frame.index.names)
    table = frame.reset_index() if named else frame.reset_index(drop=True)
    return {
        "columns": [str(c) for c in table.columns],
        "rows": json_safe(table.to_dict(orient="records")),
    }


def _spec(sweep: SweepInfo) -> StudySpec:
    try:
        return StudySpec.model_validate(sweep.spec)
    except ValidationError as exc:  # stored by an older version whose fields have changed
        raise BnnError(
            ErrorCode.CONFLICT, f"study {sweep.id!r}: its stored spec no longer validates: {exc}"
        ) from None


def _complete_seeds(sweep: SweepInfo, status: dict[str, Any]) -> list[int]:
    spec = _spec(sweep)
    done = {r["label"] for r in status["runs"] if r["status"] == RunStatus.COMPLETED.value}
    return [s for s in spec.seeds if all(f"{a}/s{s}" in done for a in spec.arms)]


def _tables(store: RunStore, advancer: StudyAdvancer, sweep: SweepInfo, status: dict) -> dict:
    """``{"tables", "statements", "seeds"}`` over the seeds every arm completed (cached in
    the summary, keyed by those seeds); ``{"tables": None}`` before there is one."""
    key = _complete_seeds(sweep, status)
    if not key:
        return {"tables": None, "statements": None, "seeds": []}
    cached = sweep.summary.get("tables")
    if isinstance(cached, dict) and cached.get("key") == key:
        return {k: cached[k] for k in ("tables", "statements", "seeds")}
    try:
        data = collect_study(store, sweep)
        frames = study_tables(data)
        out = {
            "tables": {name: _frame(frame) for name, frame in frames.items()}
            | {"display": _frame(display_summary(data, frames))},
            "statements": significance_sentences(data, frames),
            "seeds": data.seeds,
        }
    except Exception as exc:  # a state the tables cannot be built from: say why, no 500
        if not isinstance(exc, BnnError):
            log.exception("cannot build the tables of study %s", sweep.id)
        return {"tables": None, "statements": None, "seeds": [], "error": str(exc)}
    with advancer.lock:
        store.set_sweep_summary(sweep.id, {"tables": json_safe({"key": key, **out})})
    return out


def _run_out(request: Request, run: dict[str, Any], spec: StudySpec) -> dict[str, Any]:
    label = run["label"]
    if label.startswith(TUNE_PREFIX):
        _, arm, index = label.split("/")
        extra = {"phase": "tuning", "arm": arm, "settings": spec.arms[arm].grid()[int(index)]}
    else:
        arm, _, seed = label.rpartition("/s")
        extra = {"phase": "evaluation", "arm": arm, "seed": int(seed)}
    url = str(request.url_for("get_run", run_id=run["run_id"]))
    return {**run, **extra, "url": url}


def study_out(
    request: Request,
    store: RunStore,
    advancer: StudyAdvancer,
    sweep: SweepInfo,
    tables: bool = True,
) -> dict[str, Any]:
    """The study as the API shows it: spec, phase, chosen settings, runs, counts, ``done``
    and, once every arm completed a seed, the tables, statements and plot URLs."""
    spec = _spec(sweep)
    status = sweep_status(store, sweep)
    out = _head(request, sweep, spec, status["counts"], _active(status["runs"]))
    out |= {"spec": sweep.spec, "runs": [_run_out(request, r, spec) for r in status["runs"]]}
    if tables:
        got = _tables(store, advancer, sweep, status)
        out["tables"], out["statements"] = got["tables"], got["statements"]
        out["compared_seeds"] = got["seeds"]
        if "error" in got:
            out["tables_error"] = got["error"]
        out["plots"] = []
        if got["tables"] is not None:
            names = PLOTS if len(spec.arms) > 1 else PLOTS[:1]
            out["plots"] = [
                str(request.url_for("get_study_plot", study_id=sweep.id, name=n)) for n in names
            ]
    return out


# ----------------------------------------------------------------------------- endpoints
def _check_value_limits(values: dict[str, Any], settings: Settings, where: str) -> None:
    """INVALID_ARGUMENT naming a value over this service's training limits (BNN_MAX_*)."""
    limits = {
        "epochs": (settings.max_epochs, "BNN_MAX_EPOCHS"),
        "mc_samples": (settings.max_mc_samples, "BNN_MAX_MC_SAMPLES"),
        "eval_samples": (settings.max_mc_samples, "BNN_MAX_MC_SAMPLES"),
        "val_samples": (settings.max_mc_samples, "BNN_MAX_MC_SAMPLES"),
        "laplace_examples": (settings.max_n_train, "BNN_MAX_N_TRAIN"),
        "batch_size": (settings.max_batch_size, "BNN_MAX_BATCH_SIZE"),
        "n_train": (settings.max_n_train, "BNN_MAX_N_TRAIN"),
        "n_test": (settings.max_n_train, "BNN_MAX_N_TRAIN"),
        "n_val": (settings.max_n_train, "BNN_MAX_N_TRAIN"),
    }
    for field, (limit, setting) in limits.items():
        value = values.get(field)
        if isinstance(value, (int, float)) and value > limit:
            raise BnnError.invalid(
                f"{where}.{field} {value} exceeds this service's limit {limit} ({setting})"
            )
    widths = values.get("widths")
    if isinstance(widths, list):
        if len(widths) > settings.max_layers:
            raise BnnError.invalid(
                f"{where}.widths has {len(widths)} layers, more than this service's limit "
                f"{settings.max_layers} (BNN_MAX_LAYERS)"
            )
        if any(isinstance(w, (int, float)) and w > settings.max_width for w in widths):
            raise BnnError.invalid(
                f"{where}.widths {widths} exceeds this service's limit {settings.max_width} "
                "(BNN_MAX_WIDTH)"
            )


@router.post(
    "",
    status_code=202,
    summary="Start a study: arms x paired seeds, tuned on validation",
    responses=_STARTED | error_responses(413, 422, 503),
)
def create_study(
    body: SpecBody,
    request: Request,
    store: StoreDep,
    jobs: JobsDep,
    settings: SettingsDep,
    advancer: AdvancerDep,
) -> Response:
    """Checks every tuning and evaluation configuration (422 naming the arm and the field or
    limit), records the study and its tuning runs (QUEUED, tagged ``study:<id>``) and hands
    them to Dask: 202 with the study and a ``Location`` header. When the tuning runs have
    all ended the service registers and starts the evaluation runs by itself."""
    _check_spec(body, settings)
    with advancer.lock:  # the advancer must not see a study whose runs are half registered
        sweep, runs = register_study(store, body)
    advancer.submit(runs, jobs)
    out = study_out(request, store, advancer, sweep, tables=False)
    return json_response(out, 202, headers={"Location": out["url"]})


@router.get("", summary="List studies, newest first", responses=error_responses(422, 503))
def list_studies(
    store: StoreDep,
    request: Request,
    advancer: AdvancerDep,
    phase: Annotated[Phase | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Response:
    """Each study with its phase, run counts and ``done`` (no runs, no tables)."""
    sweeps = [
        sweep
        for sweep in store.list_sweeps(kind=STUDY_KIND, limit=None if phase else limit)
        if phase is None or recorded_phase(sweep) == phase
    ][:limit]
    # the statuses of every listed study's runs in one query, not two per run
    statuses = store.run_statuses([run_id for sweep in sweeps for _, run_id in sweep.runs])
    page = []
    for sweep in sweeps:
        try:
            out = _study_summary(request, sweep, statuses)
        except BnnError as exc:  # one unreadable study does not hide the others
            out = dict(id=sweep.id, name=sweep.name, phase=recorded_phase(sweep))
            out |= {"error": exc.message}
        page.append(out)
    return json_response({"total": len(page), "studies": page})


def _study_summary(
    request: Request, sweep: SweepInfo, statuses: dict[str, RunStatus]
) -> dict[str, Any]:
    """What :func:`study_out` says of a study without its runs and tables, from the runs'
    ``statuses`` (a run deleted since is left out, as there)."""
    known = [statuses[run_id] for _, run_id in sweep.runs if run_id in statuses]
    counts: dict[str, int] = {}
    for status in known:
        counts[status.value] = counts.get(status.value, 0) + 1
    active = any(status.active for status in known)
    return _head(request, sweep, _spec(sweep), counts, active)


def _head(
    request: Request, sweep: SweepInfo, spec: StudySpec, counts: dict[str, int], active: bool
) -> dict[str, Any]:
    """A study's identity, phase, arms, seeds, chosen settings and run counts."""
    phase = recorded_phase(sweep)
    return {
        "id": sweep.id,
        "name": sweep.name,
        "url": str(request.url_for("get_study", study_id=sweep.id)),
        "created_at": sweep.created_at.isoformat(),
        "host": sweep.host,
        "phase": phase,
        "error": sweep.summary.get("error"),
        "arms": list(spec.arms),
        "baseline": spec.baseline,
        "seeds": spec.seeds,
        "chosen": sweep.summary.get("chosen"),
        "counts": counts,
        "done": phase != "tuning" and not active,
    }


@router.get(
    "/{study_id}",
    name="get_study",
    summary="A study: phase, runs, tables",
    responses=CSV_RESPONSES | error_responses(_UNKNOWN, 409, 422, 503),
)
def get_study(
    study_id: StudyPath,
    store: StoreDep,
    request: Request,
    jobs: JobsDep,
    advancer: AdvancerDep,
    fmt: FormatQuery = Format.JSON,
    table: Annotated[TableName, Query(description="the table ?format=csv returns")] = "summary",
) -> Response:
    """``tables`` is null until every arm has completed an evaluation seed (then over the
    seeds all arms completed); ``?format=csv&table=summary|differences|settings|display``
    gives one table as CSV (409 before it exists)."""
    sweep = _load(store, study_id)
    _spec(sweep)
    if recorded_phase(sweep) == "tuning":
        sweep = advancer.advance(study_id, jobs)
    out = study_out(request, store, advancer, sweep)
    if fmt is Format.CSV:
        if out["tables"] is None:
            why = out.get("tables_error") or f"runs: {out['counts']}"
            raise BnnError(
                ErrorCode.CONFLICT,
                f"study {study_id!r} has no tables yet: no seed completed by every arm ({why})",
                counts=out["counts"],
            )
        got = out["tables"][table]
        return csv_response(got["rows"], got["columns"], f"study_{study_id}_{table}.csv")
    return json_response(out)


@router.get(
    "/{study_id}/plots/{name}.png",
    name="get_study_plot",
    summary="A plot of the study",
    responses=_PNG | error_responses(_UNKNOWN, 409, 422, 503),
)
def get_study_plot(study_id: StudyPath, name: str, store: StoreDep) -> Response:
    """``metrics`` (headline metrics per arm, 95% CI) or ``differences`` (paired
    differences to the baseline); 409 before every arm completed a seed."""
    sweep = _load(store, study_id)
    if name not in PLOTS:
        raise BnnError.not_found(f"study {study_id!r} has no plot {name!r}; plots: {list(PLOTS)}")
    _spec(sweep)
    data = collect_study(store, sweep)  # CONFLICT (409) before a seed is complete
    cached = sweep.summary.get("tables")
    frames = None
    if isinstance(cached, dict) and cached.get("seeds") == data.seeds:
        frames = _frames(cached["tables"])
    plots = study_plots(data, frames or study_tables(data))
    if name not in plots:
        raise BnnError.not_found(f"study {study_id!r} has no plot {name!r} (one arm only)")
    return Response(plots[name], media_type="image/png")


def _frames(tables: dict[str, Any]) -> dict[str, pd.DataFrame] | None:
    """The cached tables as the DataFrames :func:`study_plots` takes (None if unusable)."""
    unsafe = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
    try:
        out = {}
        for name in ("summary", "differences"):
            rows = [
                {k: unsafe.get(v, v) if isinstance(v, str) else v for k, v in r.items()}
                for r in tables[name]["rows"]
            ]
            out[name] = pd.DataFrame(rows, columns=tables[name]["columns"]).set_index("arm")
        return out
    except (KeyError, TypeError, ValueError):
        return None


@router.post(
    "/{study_id}/cancel",
    summary="Cancel the study's queued and running runs",
    responses=error_responses(_UNKNOWN, 409, 422, 503),
)
def cancel_study(
    study_id: StudyPath, store: StoreDep, jobs: JobsDep, request: Request, advancer: AdvancerDep
) -> Response:
    """Marks the study cancelled (it is never advanced again) when it was still tuning or
    had runs to stop, and cancels those runs."""
    with advancer.lock:
        sweep = _load(store, study_id)
        runs = sweep_status(store, sweep)["runs"]  # (runs deleted meanwhile are left out)
        active = [r["run_id"] for r in runs if RunStatus(r["status"]).active]
        queued = {r["run_id"] for r in runs if RunStatus(r["status"]) is RunStatus.QUEUED}
        if active or recorded_phase(sweep) == "tuning":
            store.set_sweep_summary(study_id, {"phase": "cancelled"})
        for run_id in active:
            try:
                store.set_status(run_id, RunStatus.CANCELLED)
            except BnnError as exc:  # it ended meanwhile
                if exc.code is not ErrorCode.CONFLICT:
                    raise
                continue
            jobs.cancel(run_id, started=run_id not in queued)
    sweep = _load(store, study_id)
    return json_response(study_out(request, store, advancer, sweep, tables=False))
