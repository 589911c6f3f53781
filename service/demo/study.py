"""Studies: N arms x K paired seeds, each arm tuned on validation with the same budget.

A :class:`StudySpec` names a shared ``base`` configuration, the ``arms`` (each a set of
configuration overrides and an optional validation ``tune`` grid), the evaluation ``seeds``
and the ``baseline`` arm. A study runs in two phases, both as ordinary runs in the store,
grouped like a sweep (kind ``study``, runs tagged ``study:<id>``):

1. **tuning**: every grid point of every tuned arm is trained once with ``tune_seed`` (a seed
   not used for evaluation, and ``skip_test``: the test split is not looked at); the point
   with the lowest validation NLL wins
   (:func:`choose_settings`). Every tuned arm must have the same number of grid points (the
   same tuning budget) unless ``equal_budget`` is off; an arm without a grid is an untuned
   reference.
2. **evaluation**: every arm, with its chosen settings, is trained with each seed. Seeds are
   paired: for one seed every arm sees the same data, the same data order and the same
   initial posterior means (the trainer seeds both from ``seed``).

:func:`advance_study` moves a registered study forward (tuning finished -> register the
evaluation runs) and is idempotent, so the service can call it from a loop and after a
restart; :func:`run_study_local` drives a whole study on a Dask cluster. Tables, plots and the
report come from :mod:`service.demo.study_report`.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from service.schemas import check_config_text
from trainer.config import TrainConfig, check_field_values, json_int, parse_config
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStatus, RunStore, SweepInfo

__all__ = [
    "STUDY_KIND",
    "ArmSpec",
    "StudySpec",
    "advance_study",
    "choose_settings",
    "register_study",
    "run_study_local",
    "study_phase",
]

STUDY_KIND = "study"
STUDY_TAG = "study:"
TUNE_PREFIX = "tune/"
MAX_RUNS = 2000


class ArmSpec(BaseModel):
    """One arm: configuration overrides and an optional validation grid (field -> levels)."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(default_factory=dict, description="TrainConfig overrides")
    tune: dict[str, list[Any]] = Field(
        default_factory=dict, description="validation grid: field -> levels (full product)"
    )

    @field_validator("config", "tune")
    @classmethod
    def _known_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown training configuration fields {unknown}")
        reserved = sorted(set(value) & {"seed", "name", "tags"})
        if reserved:
            raise ValueError(f"{reserved} are set by the study, not by an arm")
        return value

    @field_validator("config")
    @classmethod
    def _config_types(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_field_values(value, "config.")
        check_config_text(value, "config.")
        return value

    @field_validator("tune")
    @classmethod
    def _levels(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, levels in value.items():
            if not isinstance(levels, list) or not levels:
                raise ValueError(f"tune.{key} must be a non-empty list, got {levels!r}")
            for level in levels:
                check_field_values({key: level}, "tune.")
                check_config_text({key: level}, "tune.")  # what the catalog cannot hold
        return value

    def grid(self) -> list[dict[str, Any]]:
        """The grid points in a stable order ([{}] when the arm is not tuned)."""
        keys = list(self.tune)
        return [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*self.tune.values())
        ]

    @property
    def budget(self) -> int:
        """Runs spent on tuning (0 for an untuned arm)."""
        return math.prod(len(v) for v in self.tune.values()) if self.tune else 0


class StudySpec(BaseModel):
    """What a study trains: N arms x K paired seeds, tuned arms on validation first.

    Rules between fields that JSON Schema cannot state (each broken one is a 422 naming
    it): `baseline` is one of the keys of `arms` (default: the first arm); `tune_seed` is
    not one of `seeds`; with `equal_budget` (default true) every tuned arm has the same
    grid size (the product of its level counts); every run's configuration (`base`, then
    the arm's `config`, then one point of its `tune` grid) is a valid TrainConfig, so e.g.
    model 'cnn' only with an image dataset; at most 2,000 runs in all.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    base: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields shared")
    arms: dict[str, ArmSpec] = Field(description="arm name -> overrides and tuning grid")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        min_length=1,
        json_schema_extra={"uniqueItems": True},
    )
    baseline: str | None = Field(default=None, description="arm the others are compared to")
    tune_seed: int = Field(default=1000, description="seed of the tuning runs")
    tune_epochs: int | None = Field(
        default=None, ge=1, description="epochs of a tuning run (None: the base's epochs)"
    )
    equal_budget: StrictBool = Field(default=True, description="tuned arms must have equal grids")

    @field_validator("tune_seed", "tune_epochs", mode="before")
    @classmethod
    def _json_int(cls, value: Any) -> Any:
        return json_int(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _json_ints(cls, value: Any) -> Any:
        return [json_int(v) for v in value] if isinstance(value, list) else value

    @field_validator("base")
    @classmethod
    def _base_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown training configuration fields {unknown}")
        if "seed" in value:
            raise ValueError("base.seed is set by the study: use 'seeds'")
        check_field_values(value, "base.")
        check_config_text(value, "base.")
        return value

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, value: dict[str, ArmSpec]) -> dict[str, ArmSpec]:
        if len(value) < 1:
            raise ValueError("a study needs at least one arm")
        bad = [n for n in value if not n or "/" in n or len(n) > 100]
        if bad:
            raise ValueError(f"arm names must be 1-100 characters without '/', got {bad}")
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        # sizes first (from the level counts, without building any grid)
        total = sum(a.budget for a in self.arms.values()) + len(self.arms) * len(self.seeds)
        if total > MAX_RUNS:
            raise ValueError(f"the study would train {total} runs (at most {MAX_RUNS})")
        if self.baseline is None:
            self.baseline = next(iter(self.arms))
        if self.baseline not in self.arms:
            raise ValueError(f"baseline {self.baseline!r} is not an arm; arms: {list(self.arms)}")
        if self.tune_seed in self.seeds:
            raise ValueError(f"tune_seed {self.tune_seed} must not be one of the seeds")
        budgets = {name: arm.budget for name, arm in self.arms.items() if arm.budget}
        if self.equal_budget and len(set(budgets.values())) > 1:
            raise ValueError(
                f"tuned arms must have the same tuning budget (grid size), got {budgets}; "
                "set equal_budget false to allow it"
            )
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def _fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.base.items() if k not in ("name", "tags")}

    def tuning_configs(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(label, config)]`` of the tuning runs: ``tune/<arm>/<i>``."""
        out = []
        for name, arm in self.arms.items():
            if not arm.tune:
                continue
            for i, point in enumerate(arm.grid()):
                cfg = self._fields() | arm.config | point | {"seed": self.tune_seed}
                cfg["skip_test"] = True  # tuning looks at validation only
                if self.tune_epochs is not None:
                    cfg["epochs"] = self.tune_epochs
                out.append((f"{TUNE_PREFIX}{name}/{i}", cfg))
        return out

    def evaluation_configs(self, chosen: dict[str, dict[str, Any]]) -> list[tuple[str, dict]]:
        """``[(label, config)]`` of the evaluation runs, ``<arm>/s<seed>``, seed-major order
        (so an interrupted study still has whole seeds for every arm)."""
        return [
            (f"{name}/s{seed}", self._fields() | arm.config | chosen.get(name, {}) | {"seed": seed})
            for seed in self.seeds
            for name, arm in self.arms.items()
        ]

    def validate_configs(self) -> None:
        """INVALID_ARGUMENT naming the arm whose configuration is bad, before anything is stored."""
        for label, cfg in self.tuning_configs():
            _parse(label, cfg)
        first = {name: arm.grid()[0] for name, arm in self.arms.items()}
        for label, cfg in self.evaluation_configs(first):
            _parse(label, cfg)


def _parse(label: str, cfg: dict[str, Any]) -> TrainConfig:
    try:
        return parse_config(cfg)
    except BnnError as exc:
        raise BnnError.invalid(f"study run {label!r}: {exc.message}") from None


def _register(
    store: RunStore, sweep: SweepInfo, spec: StudySpec, configs: list[tuple[str, dict]]
) -> list[tuple[str, str, dict[str, Any]]]:
    tags = [*spec.base.get("tags", []), f"{STUDY_TAG}{sweep.id}"]
    have = sweep.labels
    todo = []
    for label, cfg in configs:
        if label in have:  # already registered (advance after a restart)
            continue
        config = parse_config(cfg, name=f"{sweep.name}/{label}", tags=tags).to_json_dict()
        todo.append((label, config["name"], config, tags))
    ids = store.add_sweep_runs(sweep.id, todo)  # one transaction for them all
    return [(item[0], run_id, item[2]) for item, run_id in zip(todo, ids, strict=True)]


def register_study(
    store: RunStore, spec: StudySpec
) -> tuple[SweepInfo, list[tuple[str, str, dict[str, Any]]]]:
    """Record the study and its first runs (the tuning runs, or the evaluation runs when no
    arm is tuned), QUEUED. Returns the study and ``[(label, run_id, config)]`` to start."""
    spec.validate_configs()
    sweep = store.create_sweep(STUDY_KIND, spec.to_json(), spec.name)
    tuning = spec.tuning_configs()
    if tuning:
        runs = _register(store, sweep, spec, tuning)
        store.set_sweep_summary(sweep.id, {"phase": "tuning"})
    else:
        runs = _register(store, sweep, spec, spec.evaluation_configs({}))
        store.set_sweep_summary(sweep.id, {"phase": "evaluation", "chosen": {}})
    return store.get_sweep(sweep.id), runs


def study_phase(sweep: SweepInfo) -> str:
    """``tuning``, ``evaluation`` or ``failed`` (as recorded in the study's summary)."""
    return str(sweep.summary.get("phase", "tuning"))


def _best_val_nll(store: RunStore, run_id: str) -> float:
    values = [e.metrics.get("val_nll", math.nan) for e in store.list_epochs(run_id)]
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else math.inf


def choose_settings(store: RunStore, sweep: SweepInfo) -> dict[str, dict[str, Any]]:
    """Each tuned arm's grid point with the lowest validation NLL over its completed tuning
    runs (ties: the first point). CONFLICT when an arm has no completed tuning run."""
    spec = StudySpec.model_validate(sweep.spec)
    labels = sweep.labels
    chosen: dict[str, dict[str, Any]] = {}
    for name, arm in spec.arms.items():
        if not arm.tune:
            continue
        scored = []
        for i, point in enumerate(arm.grid()):
            run_id = labels.get(f"{TUNE_PREFIX}{name}/{i}")
            if run_id is None or store.get_run(run_id).status is not RunStatus.COMPLETED:
                continue
            scored.append((_best_val_nll(store, run_id), i, point))
        if not scored:
            raise BnnError(
                ErrorCode.CONFLICT, f"study {sweep.id!r}: arm {name!r} has no completed tuning run"
            )
        chosen[name] = min(scored, key=lambda t: (t[0], t[1]))[2]
    return chosen


def advance_study(
    store: RunStore, sweep_id: str
) -> tuple[SweepInfo, list[tuple[str, str, dict[str, Any]]]]:
    """When every tuning run has ended, choose each arm's settings and register the evaluation
    runs (QUEUED); returns them to start (none when there is nothing to do yet)."""
    sweep = store.get_sweep(sweep_id)
    if study_phase(sweep) != "tuning":
        return sweep, []
    tuning = [rid for label, rid in sweep.runs if label.startswith(TUNE_PREFIX)]
    if any(store.get_run(rid).status.active for rid in tuning):
        return sweep, []
    spec = StudySpec.model_validate(sweep.spec)
    try:
        chosen = choose_settings(store, sweep)
    except BnnError as exc:
        store.set_sweep_summary(sweep.id, {"phase": "failed", "error": exc.message})
        return store.get_sweep(sweep.id), []
    runs = _register(store, sweep, spec, spec.evaluation_configs(chosen))
    store.set_sweep_summary(sweep.id, {"phase": "evaluation", "chosen": chosen})
    return store.get_sweep(sweep.id), runs


def run_study_local(
    spec: StudySpec,
    data_dir: str | Path,
    *,
    db_url: str | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    log: Any = None,
) -> SweepInfo:
    """Register the study in the store at ``data_dir`` and train both phases on Dask (a
    LocalCluster of ``workers`` single-threaded processes, or the ``scheduler``)."""
    from service.demo.sweeps import dask_client, train_on_dask

    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    data = Path(data_dir).resolve()
    with RunStore(data, db_url) as store, dask_client(workers, scheduler) as client:
        sweep, runs = register_study(store, spec)
        t0 = time.perf_counter()
        phase = study_phase(sweep)
        budget = {n: a.budget for n, a in spec.arms.items()}
        say(
            f"study {sweep.id}: {len(spec.arms)} arms x {len(spec.seeds)} seeds "
            f"{spec.seeds}; tuning budget per arm {budget}"
        )
        while runs:
            say(f" {phase}: {len(runs)} runs")
            train_on_dask(client, store, runs, str(data), db_url, say, t0)
            sweep, runs = advance_study(store, sweep.id)
            phase = study_phase(sweep)
        if phase == "failed":
            raise BnnError(ErrorCode.CONFLICT, str(sweep.summary.get("error")))
        say(f" chosen settings: {sweep.summary.get('chosen')}")
        return sweep
