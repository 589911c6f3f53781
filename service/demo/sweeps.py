"""Sweeps: a width study or an optimiser study as a group of runs trained on Dask.

A :class:`SweepSpec` (kind, shared ``base`` configuration, ``grid``) expands into labelled
training configurations (:func:`expand`). :func:`register_sweep` records the sweep and
its runs (QUEUED, tagged ``sweep:<id>``) in a run store; the service hands the runs to its
job runner (``POST /sweeps``), and :func:`run_sweep_local` trains them on a Dask cluster
(a ``LocalCluster`` of processes by default) writing into a local store. The study
tables and plots come from :mod:`service.demo.studies` once the runs have finished.

Optimiser grid: optimizer x grad clipping (off/on) x KL annealing (off/on) x learning-rate
schedule (none/cosine) x prior (fixed/learnable) is 48 runs. ``design="half"`` (the
default) keeps the half fraction with defining relation I = -ABC over the three on/off
factors (clip, anneal, schedule): the 4 rows with 0 or 2 of them on (the plain baseline,
clip+anneal, clip+schedule, anneal+schedule), crossed fully with optimizer and prior, so
24 runs. Each main effect stays estimable (aliased with the other two factors'
interaction), and every cell has its fixed and learnable pair.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, field_validator, model_validator

from service.schemas import check_config_text, check_text, is_blank
from trainer.config import Optimizer, TrainConfig, check_field_values, parse_config
from trainer.errors import BnnError
from trainer.store import RunStatus, RunStore, SweepInfo

__all__ = [
    "OPTIM_GRID",
    "SweepKind",
    "SweepSpec",
    "dask_client",
    "expand",
    "register_sweep",
    "run_sweep_local",
    "train_on_dask",
    "train_stored_run",
]

SWEEP_TAG = "sweep:"
OPTIM_GRID: dict[str, list[Any]] = {
    "optimizer": ["sgd", "adam", "adamw"],
    "grad_clip": [None, 1.0],
    "kl_anneal_epochs": [0, None],  # None: a quarter of the epochs (at least 1)
    "lr_schedule": ["none", "cosine"],
    "prior": ["fixed", "learnable"],
}
WIDTH_GRID: dict[str, list[Any]] = {"widths": [25, 50, 100, 200, 400, 800], "prior": ["learnable"]}
# Learning rate of an optimiser: grid.lr's for it, else base.lr when given, else the
# dataset's default, which is Adam's: SGD (momentum 0.9) gets 10x that ...
SGD_LR_FACTOR = 10.0
ADAMW_WEIGHT_DECAY = 1e-2  # ... and AdamW torch's default decoupled weight decay
_ONOFF = ("grad_clip", "kl_anneal_epochs", "lr_schedule")


class SweepKind(StrEnum):
    WIDTH = "width"
    OPTIM = "optim"


_GRID_SCHEMA: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"enum": sorted(set(OPTIM_GRID) | set(WIDTH_GRID) | {"lr"})},
    "properties": {
        "lr": {"type": "object", "description": "optimizer -> learning rate"},
        **{f: {"type": "array"} for f in sorted(set(OPTIM_GRID) | set(WIDTH_GRID))},
    },
    "additionalProperties": {"type": "array", "minItems": 1},
}


def _json_key(value: Any) -> str:
    """Equal keys for values JSON Schema's ``uniqueItems`` counts as equal (1 and 1.0; not
    true and 1, which Python's == would confuse)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        try:
            return f"n:{float(value)!r}" if float(value) == value else f"n:{value!r}"
        except OverflowError:  # an integer beyond a double: itself
            return f"n:{value!r}"
    return json.dumps(value, sort_keys=True, default=str)


def _sweep_rules(schema: dict[str, Any]) -> None:
    """The rule :func:`_optim_rows` keeps, in the schema: an optim sweep of design 'half'
    (the default) has exactly two levels (off, on) of each on/off factor it sets."""
    two = {"minItems": 2, "maxItems": 2}
    half_ok = {"properties": {"grid": {"properties": {k: dict(two) for k in _ONOFF}}}}
    schema.setdefault("allOf", []).append(
        {
            "anyOf": [
                {"properties": {"kind": {"const": SweepKind.WIDTH.value}}},
                {"required": ["design"], "properties": {"design": {"const": "full"}}},
                half_ok,
            ]
        }
    )
    # the factors each kind takes
    by_kind = [
        (SweepKind.WIDTH, sorted(WIDTH_GRID)),
        (SweepKind.OPTIM, sorted(set(OPTIM_GRID) | {"lr"})),
    ]
    schema["allOf"].append(
        {
            "anyOf": [
                {
                    "properties": {
                        "kind": {"const": kind.value},
                        "grid": {"propertyNames": {"enum": factors}},
                    }
                }
                for kind, factors in by_kind
            ]
        }
    )
    # a width sweep sets the width of the hidden layers: its base has at least one
    hidden = {"anyOf": [{"type": "null"}, {"type": "array", "minItems": 1}]}
    schema["allOf"].append(
        {
            "anyOf": [
                {"properties": {"kind": {"const": SweepKind.OPTIM.value}}},
                {"properties": {"base": {"properties": {"widths": hidden}}}},
            ]
        }
    )


class SweepSpec(BaseModel):
    """What a sweep trains. ``grid`` keys (defaults in :data:`WIDTH_GRID` / :data:`OPTIM_GRID`):

    - width: ``widths`` (hidden width w; every hidden layer of ``base`` gets w), ``prior``;
    - optim: ``optimizer``, ``grad_clip``, ``kl_anneal_epochs``, ``lr_schedule``, ``prior``,
      optionally ``lr`` as ``{optimizer: lr}``.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda s: _sweep_rules(s))

    kind: SweepKind
    name: str | None = Field(default=None, max_length=200)
    base: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields shared")
    grid: dict[str, Any] = Field(
        default_factory=dict,
        description="the factors and levels",
        json_schema_extra=lambda schema: schema.update(_GRID_SCHEMA),
    )
    design: Literal["full", "half"] = Field(default="half", description="optim: fraction")
    target: StrictFloat | None = Field(
        default=None, description="accuracy (classification) or RMSE to reach; dataset default"
    )

    @field_validator("base")
    @classmethod
    def _base_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown training configuration fields {unknown}")
        check_text(value, "base", 10_000)  # what the catalog cannot hold (NUL, ...)
        check_field_values(value, "base.")
        check_config_text(value, "base.")
        tags = value.get("tags") or []
        if isinstance(tags, list) and any(isinstance(t, str) and is_blank(t) for t in tags):
            raise ValueError("base.tags must not be blank")
        return value

    @field_validator("name")
    @classmethod
    def _name_text(cls, value: str | None) -> str | None:
        if value is not None:
            check_text(value, "name", 200)
        return value

    @field_validator("grid")
    @classmethod
    def _grid_levels(cls, value: dict[str, Any]) -> dict[str, Any]:
        allowed = set(OPTIM_GRID) | set(WIDTH_GRID) | {"lr"}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"unknown grid factors {unknown}; known: {sorted(allowed)}")
        for key, levels in value.items():
            if key == "lr":
                if not isinstance(levels, dict):
                    raise ValueError(f"grid.lr must map optimizer to lr, got {levels!r}")
                optimizers = [o.value for o in Optimizer]
                unknown = sorted(str(k) for k in levels if k not in optimizers)
                if unknown:
                    raise ValueError(f"grid.lr: unknown optimizers {unknown}; known: {optimizers}")
                for optimizer, lr in levels.items():
                    if lr is None:
                        raise ValueError(f"grid.lr.{optimizer} must be a number, got null")
                    check_field_values({"lr": lr}, f"grid.lr.{optimizer}: ")
            elif not isinstance(levels, list) or not levels:
                raise ValueError(f"grid.{key} must be a non-empty list, got {levels!r}")
            else:
                keys = [_json_key(level) for level in levels]
                if len(set(keys)) != len(keys):
                    raise ValueError(f"grid.{key} must not repeat a level, got {levels!r}")
                for level in levels:  # each a value of its field (widths: one width)
                    if key == "widths":
                        level = [level]
                    if key == "kl_anneal_epochs" and level is None:
                        continue  # null: a quarter of the epochs
                    check_field_values({key: level}, "grid.")
        return value

    @model_validator(mode="after")
    def _factors_of_kind(self) -> SweepSpec:
        known = set(WIDTH_GRID) if self.kind is SweepKind.WIDTH else set(OPTIM_GRID) | {"lr"}
        other = sorted(set(self.grid) - known)
        if other:
            raise ValueError(
                f"grid factors {other} do not apply to a {self.kind.value} sweep; "
                f"it takes {sorted(known)}"
            )
        return self

    def factor(self, key: str) -> list[Any]:
        default = (WIDTH_GRID if self.kind is SweepKind.WIDTH else OPTIM_GRID).get(key, [])
        return list(self.grid.get(key, default))

    def base_config(self) -> TrainConfig:
        return parse_config(self.base)

    def target_value(self) -> float:
        if self.target is not None:
            return self.target
        return 0.9 if self.base_config().is_classification else 0.2

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _optim_rows(spec: SweepSpec, epochs: int) -> list[dict[str, Any]]:
    onoff = {k: spec.factor(k) for k in _ONOFF}
    if spec.design == "half":
        bad = {k: v for k, v in onoff.items() if len(v) != 2}
        if bad:
            raise BnnError.invalid(
                f"design 'half' needs exactly two levels (off, on) of {list(_ONOFF)}, got {bad}; "
                "use design 'full'"
            )
    rows = []
    for optimizer, clip, anneal, schedule, prior in itertools.product(
        spec.factor("optimizer"), *onoff.values(), spec.factor("prior")
    ):
        on = [onoff["grad_clip"].index(clip), onoff["kl_anneal_epochs"].index(anneal)]
        on.append(onoff["lr_schedule"].index(schedule))
        if spec.design == "half" and sum(on) % 2:
            continue
        anneal_epochs = max(1, epochs // 4) if anneal is None else int(anneal)
        rows.append(
            {
                "optimizer": optimizer,
                "grad_clip": clip,
                "kl_anneal_epochs": anneal_epochs,
                "lr_schedule": schedule,
                "prior": prior,
                "_on": on,
            }
        )
    return rows


def _number(value: float) -> str:
    """The shortest text that reads back as ``value`` ('1', '0.5', '1e-05'): distinct
    levels get distinct labels (``:g`` made 0.5 and 0.50000001 both '0.5')."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _optim_label(row: dict[str, Any]) -> str:
    parts = [row["optimizer"]]
    if row["grad_clip"] is not None:
        parts.append(f"clip{_number(row['grad_clip'])}")
    if row["kl_anneal_epochs"]:
        parts.append(f"anneal{row['kl_anneal_epochs']}")
    if row["lr_schedule"] != "none":
        parts.append(str(row["lr_schedule"]))
    return "+".join(parts) + f"/{row['prior']}"


def expand(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """``[(label, training configuration)]`` in a stable order; each configuration valid."""
    base = spec.base_config()
    fields = {k: v for k, v in spec.base.items() if k not in ("name", "tags")}
    depth = len(base.hidden)
    out: list[tuple[str, dict[str, Any]]] = []
    if spec.kind is SweepKind.WIDTH:
        if depth == 0:
            raise BnnError.invalid(
                "a width sweep needs hidden layers to set the width of: base.widths is []"
            )
        priors = spec.factor("prior")
        for width in spec.factor("widths"):
            if isinstance(width, float) and width.is_integer():
                width = int(width)  # JSON Schema's integer: 132.0 is one
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise BnnError.invalid(f"grid.widths must hold positive integers, got {width!r}")
            for prior in priors:
                label = f"w{width}" + (f"/{prior}" if len(priors) > 1 else "")
                out.append((label, fields | {"widths": [width] * depth, "prior": prior}))
    else:
        lr_map = dict(spec.grid.get("lr", {}))
        for row in _optim_rows(spec, base.epochs):
            optimizer = row["optimizer"]
            if optimizer in lr_map:  # the grid's, for this optimizer
                lr = lr_map[optimizer]
            elif spec.base.get("lr") is not None:  # the one the base gives, for every optimizer
                lr = base.learning_rate
            else:  # the dataset's (Adam's), x10 for SGD
                lr = base.learning_rate * (SGD_LR_FACTOR if optimizer == "sgd" else 1.0)
            cfg = fields | {k: v for k, v in row.items() if not k.startswith("_")} | {"lr": lr}
            if optimizer == "adamw" and "weight_decay" not in spec.base:
                cfg["weight_decay"] = ADAMW_WEIGHT_DECAY
            out.append((_optim_label(row), cfg))
    # Levels that resolve to the same run (``kl_anneal_epochs`` null is a quarter of the
    # epochs, which may equal a level given as a number) are trained as replicates: the
    # later ones are labelled '#2', '#3', ... rather than the grid being refused.
    seen: dict[str, int] = {}
    for i, (label, cfg) in enumerate(out):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            out[i] = (f"{label}#{seen[label]}", cfg)
    for _, cfg in out:
        parse_config(cfg)  # INVALID_ARGUMENT naming the bad field before anything is stored
    return out


def register_sweep(
    store: RunStore, spec: SweepSpec
) -> tuple[SweepInfo, list[tuple[str, str, dict[str, Any]]]]:
    """Record the sweep and its runs (QUEUED, tagged ``sweep:<id>``) in ``store``.

    Returns the sweep and ``[(label, run_id, config)]`` for a job runner to start.
    """
    configs = expand(spec)
    sweep = store.create_sweep(spec.kind.value, spec.to_json(), spec.name)
    tags = [*spec.base.get("tags", []), f"{SWEEP_TAG}{sweep.id}", f"{SWEEP_TAG}{spec.kind.value}"]
    todo = []
    for label, cfg in configs:
        config = parse_config(cfg, name=f"{sweep.name}/{label}", tags=tags).to_json_dict()
        todo.append((label, config["name"], config, tags))
    ids = store.add_sweep_runs(sweep.id, todo)  # one transaction for them all
    runs = [(item[0], run_id, item[2]) for item, run_id in zip(todo, ids, strict=True)]
    return store.get_sweep(sweep.id), runs


class _QueuedRunSink:
    """A local store seen by the trainer as a sink whose run already exists (QUEUED)."""

    def __init__(self, store: RunStore, run_id: str) -> None:
        self.store, self.run_id = store, run_id

    def create_run(self, name: str | None, config: dict[str, Any], tags: Any = ()) -> Any:
        return self.store.set_status(self.run_id, RunStatus.RUNNING)

    def write_epoch(self, run_id: str, snap: Any) -> Any:
        return self.store.write_epoch(run_id, snap)

    def heartbeat(self, run_id: str) -> None:
        self.store.heartbeat(run_id)

    def set_status(self, run_id: str, status: Any, error: str | None = None) -> Any:
        return self.store.set_status(run_id, status, error=error)

    def set_divergence(
        self, run_id: str, *, step: int, epoch: int, layer: str | None = None
    ) -> Any:
        return self.store.set_divergence(run_id, step, epoch, layer)

    def should_stop(self, run_id: str) -> bool:
        return self.store.get_run(run_id).status is RunStatus.CANCELLED


def train_stored_run(
    run_id: str, config: dict[str, Any], data_dir: str, db_url: str | None = None, threads: int = 1
) -> str:
    """Train the QUEUED run ``run_id`` of the store at ``data_dir`` (a Dask task)."""
    import torch

    from trainer.train import Trainer

    torch.set_num_threads(threads)
    with RunStore(data_dir, db_url) as store:
        if store.get_run(run_id).status is not RunStatus.QUEUED:
            return store.get_run(run_id).status.value
        try:
            trainer = Trainer(
                parse_config(config),
                sink=_QueuedRunSink(store, run_id),
                progress=False,
                data_root=Path(data_dir) / "datasets",
            )
        except Exception as exc:
            store.set_status(run_id, RunStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
            raise
        result = trainer.fit()  # a failure marks the run FAILED with the reason
    return result.status


@contextmanager
def dask_client(workers: int = 2, scheduler: str | None = None) -> Iterator[Any]:
    """A Dask client: of a LocalCluster of ``workers`` single-threaded processes, or of the
    ``scheduler`` at an address; both closed on exit."""
    import dask
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler is None:
        # no statistical profiler in the workers: it samples every thread's stack every
        # 10 ms under the GIL, a cost paid by the training loop, whose time is per-op overhead
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                # Dask's scheduler serves HTTP even without a dashboard address (then on
                # :8787, which a running `bnn serve` may hold): a free loopback port, no pages
                dashboard_address="127.0.0.1:0",
                scheduler_kwargs={"dashboard": False},
                silence_logs=logging.ERROR,
            )
    client = Client(cluster or scheduler, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def train_on_dask(
    client: Any,
    store: RunStore,
    runs: list[tuple[str, str, dict[str, Any]]],
    data_dir: str,
    db_url: str | None,
    say: Callable[[str], None],
    t0: float,
) -> None:
    """Train the QUEUED ``runs`` ``[(label, run_id, config)]`` on ``client``'s workers, one
    line of progress each; a run whose task was lost with its worker is marked FAILED."""
    from distributed import as_completed

    futures = {
        client.submit(
            train_stored_run, run_id, cfg, data_dir, db_url, key=f"bnn-run-{run_id}", pure=False
        ): label
        for label, run_id, cfg in runs
    }
    for done, future in enumerate(as_completed(futures, loop=client.loop), 1):
        label = futures[future]
        if future.status == "error":
            exc = future.exception()
            say(f"  [{done}/{len(runs)}] {label}: failed ({type(exc).__name__}: {exc})")
        else:
            took = time.perf_counter() - t0
            say(f"  [{done}/{len(runs)}] {label}: {future.result()} ({took:.0f} s)")
    for _, run_id, _ in runs:
        if store.get_run(run_id).status.active:
            store.set_status(run_id, RunStatus.FAILED, error="the Dask task did not finish")


def run_sweep_local(
    spec: SweepSpec,
    data_dir: str | Path,
    *,
    db_url: str | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    log: Any = None,
) -> SweepInfo:
    """Register the sweep in the store at ``data_dir`` and train its runs on Dask: a
    LocalCluster of ``workers`` processes, or the ``scheduler`` at an address (its workers
    must reach the same ``data_dir`` and catalog, e.g. a shared folder and PostgreSQL)."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    data = Path(data_dir).resolve()
    with RunStore(data, db_url) as store:
        sweep, runs = register_sweep(store, spec)
        say(
            f"sweep {sweep.id} ({spec.kind.value}): {len(runs)} runs on "
            + (f"the Dask scheduler {scheduler}" if scheduler else f"{workers} local Dask workers")
        )
        with dask_client(workers, scheduler) as client:
            train_on_dask(client, store, runs, str(data), db_url, say, time.perf_counter())
        return store.get_sweep(sweep.id)
