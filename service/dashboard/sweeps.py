"""``/ui/sweeps`` (the width and optimiser sweeps) and ``/ui/sweeps/{id}`` (one sweep: its
runs, linked, with their statuses and last metrics; its study table and plots once no run
is queued or running).

Everything comes from the sweeps API's own :func:`~service.routers.sweeps.sweep_out`: the
study table is computed (and kept in the sweep's summary) there, and the plots are the
API's PNGs.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict

from service.dashboard._common import guarded, parse_query, render_page
from service.deps import StoreDep
from service.routers.compare import MAX_RUNS
from service.routers.sweeps import KINDS, sweep_out
from trainer.errors import BnnError
from trainer.store import RunStore, SweepInfo

__all__ = ["plot_title", "router"]

router = APIRouter(include_in_schema=False)
METRIC_COLUMNS = 4


class SweepsQuery(BaseModel):
    """The sweeps page's query: which kind."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["width", "optim"] | None = None


class NoQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _sweep(store: RunStore, sweep_id: str) -> SweepInfo:
    """The sweep; NOT_FOUND for an unknown id and for a study's (see /studies)."""
    sweep = store.get_sweep(sweep_id)
    if sweep.kind not in KINDS:
        raise BnnError.not_found(f"unknown sweep {sweep_id!r} (a {sweep.kind}, not a sweep)")
    return sweep


@router.get("/ui/sweeps", response_class=HTMLResponse)
def sweeps_page(request: Request, store: StoreDep) -> Response:
    """Every width and optimiser sweep, newest first, with its runs' statuses."""

    def make() -> Response:
        query = parse_query(request, SweepsQuery)
        wanted = KINDS if query.kind is None else (query.kind,)
        found = [s for s in store.list_sweeps() if s.kind in wanted]
        items = [sweep_out(request, store, s, study=False) for s in found]
        return render_page(request, "sweeps.html", sweeps=items, query=query, kinds=KINDS)

    return guarded(request, make)


def _metric_names(runs: list[dict[str, Any]]) -> list[str]:
    names = dict.fromkeys(m for r in runs for m in r["metrics"] if m.startswith("test_"))
    return list(names)[:METRIC_COLUMNS]


_PLOT_TITLES = {
    "width_posteriors": "Posteriors, KL and test metric against width",
    "optim": "Optimisers compared: final metric, epochs to the target, exploding gradients",
}


def plot_title(url: str) -> str:
    """The caption of a sweep plot (its file name in words): ``width_priors_learnable.png``
    is "Learned priors against width (learnable prior runs)"."""
    name = url.rsplit("/", 1)[-1].removesuffix(".png")
    if name in _PLOT_TITLES:
        return _PLOT_TITLES[name]
    if name.startswith("width_priors_"):
        return f"Learned priors against width ({name.removeprefix('width_priors_')} prior runs)"
    text = name.replace("_", " ")
    return text[:1].upper() + text[1:]


@router.get("/ui/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(sweep_id: str, request: Request, store: StoreDep) -> Response:
    """One sweep: its grid, its runs (linked), and its study table and plots when done."""

    def make() -> Response:
        parse_query(request, NoQuery)
        sweep = _sweep(store, sweep_id)
        study_error = None
        try:
            out = sweep_out(request, store, sweep)
        except BnnError as exc:  # the study cannot be made of these runs: say why
            out, study_error = sweep_out(request, store, sweep, study=False), exc.message
        ids = [r["run_id"] for r in out["runs"]]
        compare = f"/ui/compare?runs={','.join(ids)}" if 2 <= len(ids) <= MAX_RUNS else None
        return render_page(
            request,
            "sweep.html",
            sweep=out,
            grid=sorted((out["spec"].get("grid") or {}).items()),
            metrics=_metric_names(out["runs"]),
            plots=[(urlsplit(u).path, plot_title(u)) for u in out.get("plots", [])],
            compare=compare,
            study_error=study_error,
        )

    return guarded(request, make)
