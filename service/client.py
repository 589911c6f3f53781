"""A Python client for the bnn service: one typed method per main endpoint.

    from service.client import Client

    with Client("http://127.0.0.1:8000", token=os.environ.get("BNN_API_TOKEN")) as bnn:
        run_id = bnn.start_run({"dataset": "regression", "prior": "learnable", "epochs": 5})
        run = bnn.wait(run_id, progress=True)      # polls: queued -> running -> completed
        kl = bnn.kl_table(run_id)                  # the seed's pairwise KL table, a DataFrame
        png = bnn.plot(run_id, "bands", layer="layer1")          # PNG bytes
        bnn.push("3f2a9c1b7d4e", "bnn-data")       # upload a local run (what `bnn push` does)

Tables come back as pandas DataFrames with the service's columns in its order (``layer``
first where a table has one row per layer); what the service says about the table (its
``run_id``, ``epoch``, ``dist``, ...) is in ``frame.attrs``. A value that does not exist
(the bias KL of a layer without bias) is NaN; the service's "inf"/"-inf"/"nan" spellings
become floats. Single resources (a run, a sweep, a study) are the service's JSON as dicts;
plots are PNG bytes (``IPython.display.Image(png)`` shows one in a notebook).

Failures are :class:`~trainer.errors.BnnError`: the service's error body turned into the
error's code, message (naming the bad value, e.g. an epoch that was not captured, with the
captured ones in ``details["epochs"]``) and ``details["http_status"]``; a bad argument is
refused here before any request, naming it. Requests that are safe to repeat are retried
on network errors and 5xx answers (the transport is :class:`trainer.remote.HttpRunSink`'s);
:meth:`Client.start_run` sends a client-chosen run id so that a retried ``POST /runs``
cannot start two runs; new sweeps and studies are never retried.

:class:`LocalService` starts a ``bnn serve`` of its own in a child process (a free port, a
temporary data directory), for notebooks, examples and tests without a service at hand.

``import service.client`` loads neither torch nor pandas (pandas on the first table).
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from service.columns import RUN_COLUMNS
from trainer.errors import BnnError, ErrorCode
from trainer.remote import HttpRunSink, push_run

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ACTIVE_STATUSES", "RUN_COLUMNS", "Client", "LocalService", "describe_progress"]

#: Statuses of a run that is still going: :meth:`Client.wait` polls while the run has one.
ACTIVE_STATUSES = frozenset({"queued", "running"})
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_MAX_PAGE = 1000  # GET /runs answers at most this many runs per page
Progress = bool | Callable[[dict[str, Any]], None]


class Client:
    """The bnn service at ``url``.

    Args:
        url: the service, e.g. ``http://127.0.0.1:8000``.
        token: sent as ``Authorization: Bearer <token>`` (the service's ``BNN_API_TOKEN``);
            without one, writes to a service that has a token are refused (401).
        timeout: seconds for one request (a plot of a large layer can take a few).
        retries: extra attempts of a request that is safe to repeat, after a network error
            or a 5xx answer; ``backoff`` is the first wait in seconds, doubled each time.
        http: an ``httpx.Client`` to send the requests with (tests pass one); it is not
            closed by :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        http: httpx.Client | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BnnError.invalid(f"url must start with http:// or https://, got {url!r}")
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise BnnError.invalid(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.url = url.rstrip("/")
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=timeout)
        # one transport that retries (reads, idempotent writes) and one that never does
        self._retrying = HttpRunSink(
            self.url, token=token, retries=retries, backoff=backoff, client=self._http
        )
        self._once = HttpRunSink(self.url, token=token, retries=0, client=self._http)

    # -- plumbing
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        *,
        json: Any = None,
        retry: bool = True,
        ok_on_retry: Iterable[int] = (),
    ) -> httpx.Response:
        """One request to ``path`` (with the query ``params``, None values left out)."""
        query: list[tuple[str, str | int | float | bool | None]] = [
            (key, item)
            for key, value in (params or {}).items()
            if value is not None
            for item in (value if isinstance(value, _Repeated) else [_query_value(value)])
        ]
        if query:
            path = f"{path}?{httpx.QueryParams(query)}"
        sink = self._retrying if retry else self._once
        return sink.request(method, path, json=json, ok_on_retry=ok_on_retry)

    def _json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._request("GET", path, params).json()

    def _table(self, path: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        payload = dict(self._json(path, params))
        table = payload.pop("table")
        return _frame(table, payload)

    # -- the service
    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``status``, ``version``, the catalog's kind and the job back end."""
        out: dict[str, Any] = self._json("/healthz")
        return out

    # -- runs
    def runs(
        self,
        *,
        name: str | None = None,
        status: str | None = None,
        tags: str | Sequence[str] = (),
        dataset: str | None = None,
        prior: str | None = None,
        metrics: str | Sequence[str] = (),
        limit: int | None = 50,
        offset: int = 0,
    ) -> pd.DataFrame:
        """The runs, newest first, one row each (columns :data:`RUN_COLUMNS`).

        ``name`` matches a part of the name (any case); ``tags``: runs with all of them;
        ``metrics``: bounds on the latest metrics such as ``"test_rmse < 0.5"`` (all must
        hold). ``limit=None`` fetches every match, page by page. ``frame.attrs["total"]``
        counts all matches.
        """
        import pandas as pd

        if limit is not None:
            _check_int(limit, "limit", 1)
        _check_int(offset, "offset", 0)
        params: dict[str, Any] = {"name": name, "status": status, "dataset": dataset}
        params |= {"prior": prior, "tag": _Repeated(_strings(tags))}
        params["metric"] = _Repeated(_strings(metrics))
        rows: list[dict[str, Any]] = []
        while True:
            size = _MAX_PAGE if limit is None else min(limit - len(rows), _MAX_PAGE)
            page = self._json("/runs", {**params, "limit": size, "offset": offset + len(rows)})
            total = int(page["total"])
            rows += [{**run.get("config", {}), **run} for run in page["runs"]]
            wanted = total - offset if limit is None else min(limit, total - offset)
            if not page["runs"] or len(rows) >= wanted:
                break
        frame = pd.DataFrame([{c: row.get(c) for c in RUN_COLUMNS} for row in rows])
        frame = frame.reindex(columns=list(RUN_COLUMNS))
        for column in ("created_at", "finished_at"):
            frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
        frame.attrs["total"] = total
        return frame

    def run(self, run_id: str) -> dict[str, Any]:
        """One run: ``status``, ``config``, captured ``epochs``, last ``metrics``, ..."""
        out: dict[str, Any] = self._json(f"/runs/{_segment(run_id, 'run_id')}")
        return out

    def start_run(self, config: Mapping[str, Any] | None = None, **fields: Any) -> str:
        """Start training ``config`` (TrainConfig fields; ``fields`` override them) on the
        service's Dask cluster; the new run's id. Fields not given take their defaults, a
        bad one is a 422 naming it (the service's limits, ``BNN_MAX_*``, included)."""
        if config is not None and not isinstance(config, Mapping):
            raise BnnError.invalid(f"config must be a dict of TrainConfig fields, got {config!r}")
        body = {**(config or {}), **fields}
        if body.get("execute") is False:
            raise BnnError.invalid(
                "start_run trains on the service (execute: true); a run trained elsewhere is "
                "reported with trainer.remote.HttpRunSink or uploaded with Client.push"
            )
        run_id = body.setdefault("run_id", uuid.uuid4().hex[:12])
        response = self._request("POST", "/runs", json=body, ok_on_retry=(409,))
        if response.status_code == 409:  # a retry: the first attempt got through
            return str(run_id)
        return str(response.json()["id"])

    def wait(
        self,
        run_id: str,
        timeout: float | None = 600.0,
        poll: float = 1.0,
        *,
        progress: Progress = False,
    ) -> dict[str, Any]:
        """Poll the run every ``poll`` seconds until it is no longer queued or running; the
        run as :meth:`run` gives it (check ``run["status"]``: completed, failed, cancelled,
        diverged or interrupted, and ``run["error"]``).

        ``progress=True`` prints a line whenever the status or the captured epochs change
        (``run 3f2a9c1b7d4e: running, epoch 3/10``); a callable gets the run dict instead.
        UNAVAILABLE naming the run and how far it got when ``timeout`` seconds pass first
        (None: no limit).
        """
        _check_seconds(poll, "poll")
        deadline = _deadline(timeout)
        seen: tuple[Any, ...] | None = None
        while True:
            run = self.run(run_id)
            state = (run.get("status"), tuple(run.get("epochs") or ()))
            if progress and state != seen:
                if callable(progress):
                    progress(run)
                else:
                    print(describe_progress(run), flush=True)
            seen = state
            if run.get("status") not in ACTIVE_STATUSES:
                return run
            left = deadline - time.monotonic()
            if left <= 0:
                raise BnnError(
                    ErrorCode.UNAVAILABLE,
                    f"run {run_id!r} is still {run.get('status')} after {timeout} s "
                    f"({describe_progress(run)})",
                    run_id=run_id,
                    status=run.get("status"),
                    epochs=list(run.get("epochs") or []),
                )
            time.sleep(min(poll, left))

    def update(
        self, run_id: str, *, name: str | None = None, tags: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Rename the run and/or replace its tags (in any status); the updated run."""
        if name is None and tags is None:
            raise BnnError.invalid("update needs name= or tags=")
        body: dict[str, Any] = {"name": name}
        if tags is not None:
            body["tags"] = _strings(tags)
        return self._retrying.patch(_segment(run_id, "run_id"), **body)

    def cancel(self, run_id: str) -> dict[str, Any]:
        """Cancel a queued or running run (409 CONFLICT for one that has ended)."""
        path = f"/runs/{_segment(run_id, 'run_id')}"
        response = self._request("POST", f"{path}/cancel", ok_on_retry=(409,))
        if response.status_code == 409:  # a retry: the first attempt cancelled it
            return self.run(run_id)
        out: dict[str, Any] = response.json()
        return out

    def delete(self, run_id: str) -> None:
        """Delete a run that has ended: its catalog rows and files (409 while active)."""
        path = f"/runs/{_segment(run_id, 'run_id')}"
        self._request("DELETE", path, ok_on_retry=(404,))

    def push(
        self, run_id: str, data_dir: str | Path = "bnn-data", *, db_url: str | None = None
    ) -> dict[str, Any]:
        """Upload the run ``run_id`` of the local store ``data_dir`` (what ``bnn push``
        does, :func:`trainer.remote.push_run`); safe to repeat. Counts and the run's URL."""
        return push_run(
            _check_text(run_id, "run_id"), data_dir, self.url, db_url=db_url, sink=self._retrying
        )

    # -- epochs and metrics
    def epochs(self, run_id: str) -> pd.DataFrame:
        """One row per captured epoch: ``epoch``, ``size``, ``checksum``, ``created_at`` and
        the epoch's metrics as columns."""
        import pandas as pd

        infos = self._json(f"/runs/{_segment(run_id, 'run_id')}/epochs")
        rows = [
            {k: v for k, v in e.items() if k not in ("metrics", "run_id")}
            | {k: _number(v) for k, v in e["metrics"].items()}
            for e in infos
        ]
        frame = pd.DataFrame(rows, columns=_columns(["epoch", "size", "checksum"], rows))
        frame.attrs["run_id"] = run_id
        return frame

    def metrics(self, run_id: str, names: str | Sequence[str] | None = None) -> pd.DataFrame:
        """The per-epoch metric series (index ``epoch``, one column per metric; NaN where an
        epoch lacks it). ``names``: only these (404 naming a metric the run has not)."""
        import pandas as pd

        path = f"/runs/{_segment(run_id, 'run_id')}/metrics"
        payload = self._json(path, {"names": _names(names, "names")})
        series = {k: [_number(v) for v in values] for k, values in payload["series"].items()}
        index = pd.Index(payload["epochs"], name="epoch")
        frame = pd.DataFrame(series, index=index, dtype=float)
        frame.attrs["run_id"] = payload["run_id"]
        return frame

    def epoch_file(self, run_id: str, epoch: int) -> bytes:
        """The HDF5 file of one captured epoch (404 listing the captured ones)."""
        e = _epoch(epoch, "epoch", required=True)
        return self._request("GET", f"/runs/{_segment(run_id, 'run_id')}/epochs/{e}/file").content

    # -- one run's analysis tables
    def stats(self, run_id: str, epoch: int | None = None, dist: str = "posterior") -> pd.DataFrame:
        """The seed's ``get_overall_weight_stats``: mean/std of the mu's and sigma's, first
        row ``Overall`` then one per layer. ``epoch`` None: the latest captured;
        ``dist="prior"``: the shared layer priors."""
        params = {"epoch": _epoch(epoch, "epoch"), "dist": dist}
        return self._table(f"/runs/{_segment(run_id, 'run_id')}/stats", params)

    def kl_table(
        self,
        run_id: str,
        epoch: int | None = None,
        layer: str | None = None,
        dist: str = "posterior",
    ) -> pd.DataFrame:
        """The seed's ``compute_layer_kl_divergences``: the pairwise symmetric KL within each
        layer (``Weight KL Sum``, ``Weight KL Average``, ``Bias ...``), exact over all pairs.
        ``layer``: that layer's row only (NOT_FOUND naming it and the layers otherwise)."""
        frame = self._table(
            f"/runs/{_segment(run_id, 'run_id')}/kl",
            {"epoch": _epoch(epoch, "epoch"), "dist": dist},
        )
        return _one_layer(frame, layer)

    def kl_prior(
        self, run_id: str, epoch: int | None = None, layer: str | None = None
    ) -> pd.DataFrame:
        """KL(posterior || layer prior) per layer (the ELBO's KL term split by layer):
        ``Weight KL``, ``Bias KL``, ``KL`` and per element. ``layer``: that row only."""
        path = f"/runs/{_segment(run_id, 'run_id')}/kl/prior"
        return _one_layer(self._table(path, {"epoch": _epoch(epoch, "epoch")}), layer)

    def kl_trajectory(
        self,
        run_id: str,
        of: str = "pairwise",
        epochs: Iterable[int] | None = None,
        layers: str | Sequence[str] | None = None,
        dist: str = "posterior",
    ) -> pd.DataFrame:
        """One row per (epoch, layer): the columns of :meth:`kl_table` (``of="pairwise"``)
        or of :meth:`kl_prior` (``of="prior"``); default every captured epoch."""
        params = {"of": of, "epochs": _epochs(epochs), "layers": _names(layers, "layers")}
        params["dist"] = dist
        return self._table(f"/runs/{_segment(run_id, 'run_id')}/kl/trajectory", params)

    def priors(
        self,
        run_id: str,
        epochs: Iterable[int] | None = None,
        layers: str | Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """The shared layer priors over epochs: ``Weight prior mu``/``sigma`` and ``Bias
        prior mu``/``sigma`` per (epoch, layer)."""
        params = {"epochs": _epochs(epochs), "layers": _names(layers, "layers")}
        return self._table(f"/runs/{_segment(run_id, 'run_id')}/priors", params)

    def percentiles(
        self,
        run_id: str,
        layer: str,
        *,
        param: str = "weight",
        stat: str = "mu",
        epochs: Iterable[int] | None = None,
        dist: str = "posterior",
    ) -> pd.DataFrame:
        """Exact percentiles of one layer's mu or sigma per epoch (TensorBoard's bands)."""
        params: dict[str, Any] = {"layer": _check_text(layer, "layer"), "param": param}
        params |= {"stat": stat, "epochs": _epochs(epochs), "dist": dist}
        return self._table(f"/runs/{_segment(run_id, 'run_id')}/percentiles", params)

    def gradients(
        self, run_id: str, epoch: int | None = None, layer: str | None = None, **options: Any
    ) -> pd.DataFrame:
        """Exploding/vanishing element counts, non-finite counts and step norms per layer.
        ``options``: ``param``, ``grad_param``, ``stat``, ``z_threshold``, ``explode_abs``,
        ``vanish_abs`` (see ``GET /runs/{id}/gradients`` in ``/docs``)."""
        params = {"epoch": _epoch(epoch, "epoch"), "layer": layer, **options}
        return self._table(f"/runs/{_segment(run_id, 'run_id')}/gradients", params)

    def gradient_outliers(
        self,
        run_id: str,
        epoch: int | None = None,
        k: int = 10,
        kind: str = "exploding",
        layer: str | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """The top-``k`` suspected exploding (or vanishing) elements by robust z-score, with
        their gradient statistics, posterior and layer prior. ``options``: ``param``,
        ``grad_param``, ``stat``, ``z_threshold``. Needs element-level gradient capture."""
        _check_int(k, "k", 1)
        params = {"epoch": _epoch(epoch, "epoch"), "k": k, "kind": kind, "layer": layer}
        return self._table(
            f"/runs/{_segment(run_id, 'run_id')}/gradients/outliers", {**params, **options}
        )

    # -- across runs
    def compare_kl(
        self,
        run_a: str,
        run_b: str,
        epoch: int | None = None,
        epoch_b: int | None = None,
        layers: str | Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """KL between two runs' posteriors, element by element, per layer (same
        architecture). ``epoch`` None: each run's latest; ``epoch_b`` default ``epoch``."""
        params = {"runs": _run_list([run_a, run_b]), "epoch": _epoch(epoch, "epoch")}
        params |= {"epoch_b": _epoch(epoch_b, "epoch_b"), "layers": _names(layers, "layers")}
        return self._table("/compare/kl", params)

    def compare_gradients(
        self,
        runs: Sequence[str],
        epoch: int | None = None,
        k: int = 10,
        kind: str = "exploding",
        table: str = "outliers",
        layer: str | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Each run's top-``k`` gradient outliers with the same elements in the other runs
        (``table="outliers"``), or the flagged counts per layer and run (``"counts"``).
        ``epoch`` None: the latest epoch every run captured."""
        if table not in ("outliers", "counts"):
            raise BnnError.invalid(f"table must be 'outliers' or 'counts', got {table!r}")
        _check_int(k, "k", 1)
        params = {"runs": _run_list(runs), "epoch": _epoch(epoch, "epoch"), "k": k}
        params |= {"kind": kind, "layer": layer, **options}
        payload = dict(self._json("/compare/gradients", params))
        chosen = payload.pop(table)
        payload.pop("outliers" if table == "counts" else "counts", None)
        return _frame(chosen, payload)

    def compare_priors(self, runs: Sequence[str], epoch: int | None = None) -> pd.DataFrame:
        """The width study: one row per (run, layer) with width, fan in/out, the learned
        priors, the posterior spread and the KL to the prior per element."""
        params = {"runs": _run_list(runs), "epoch": _epoch(epoch, "epoch")}
        return self._table("/compare/priors", params)

    # -- plots
    def plot(self, run_id: str, kind: str, **options: Any) -> bytes:
        """``GET /runs/{id}/plots/<kind>.png``: PNG bytes. Kinds: ``evolution``, ``epoch``,
        ``bands``, ``kl``, ``priors``, ``scales``, ``gradients`` (an unknown one is a 404
        listing them); ``options`` are the kind's query options (``layer="layer1"``,
        ``epochs=[0, 5]``, ``dpi=150``; an unknown one is a 422 listing them)."""
        path = f"/runs/{_segment(run_id, 'run_id')}/plots/{_segment(kind, 'kind')}.png"
        return self._request("GET", path, options).content

    def compare_plot(self, runs: Sequence[str], kind: str, **options: Any) -> bytes:
        """``GET /compare/plots/<kind>.png`` over 2 to 16 runs: PNG bytes (``width``,
        ``priors``, ``scales``)."""
        path = f"/compare/plots/{_segment(kind, 'kind')}.png"
        return self._request("GET", path, {**options, "runs": _run_list(runs)}).content

    # -- sweeps and studies
    def start_sweep(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /sweeps``: a width or optimiser sweep (a ``SweepSpec``: ``kind``,
        ``base``, ``grid``); the sweep with its runs. Never retried (it would start a
        second sweep)."""
        out: dict[str, Any] = self._request("POST", "/sweeps", json=_spec(spec), retry=False).json()
        return out

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        """A sweep: its runs and their statuses, ``done``, and the ``study`` table when done."""
        out: dict[str, Any] = self._json(f"/sweeps/{_segment(sweep_id, 'sweep_id')}")
        return out

    def sweeps(self, kind: str | None = None, limit: int = 50) -> pd.DataFrame:
        """The sweeps, newest first: one row each with its run ``counts`` and ``done``."""
        import pandas as pd

        _check_int(limit, "limit", 1)
        page = self._json("/sweeps", {"kind": kind, "limit": limit})
        return pd.DataFrame(page["sweeps"])

    def wait_sweep(
        self,
        sweep_id: str,
        timeout: float | None = 3600.0,
        poll: float = 2.0,
        *,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Poll until no run of the sweep is queued or running; the sweep (with its study
        table when a run completed). UNAVAILABLE with the run counts after ``timeout``."""
        return self._wait_group("sweep", self.sweep, sweep_id, timeout, poll, progress)

    def sweep_table(self, sweep_id: str) -> pd.DataFrame:
        """The sweep's study table (CONFLICT while runs are queued or running, or when none
        completed)."""
        sweep = self.sweep(sweep_id)
        if sweep.get("study") is None:
            raise BnnError(
                ErrorCode.CONFLICT,
                f"sweep {sweep_id!r} has no study table yet (runs: {sweep.get('counts')})",
                counts=sweep.get("counts"),
            )
        return _frame(sweep["study"], {"sweep_id": sweep_id})

    def sweep_plot(self, sweep_id: str, name: str) -> bytes:
        """A plot of a finished sweep (``optim``, ``width_posteriors``,
        ``width_priors_<prior>``: the names in ``sweep(id)["plots"]``), PNG bytes."""
        path = f"/sweeps/{_segment(sweep_id, 'sweep_id')}/plots/{_segment(name, 'name')}.png"
        return self._request("GET", path).content

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        """Cancel the sweep's queued and running runs; the sweep."""
        path = f"/sweeps/{_segment(sweep_id, 'sweep_id')}/cancel"
        out: dict[str, Any] = self._request("POST", path).json()
        return out

    def start_study(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /studies``: arms x paired seeds, tuned on validation (a ``StudySpec``);
        the study. Never retried."""
        out: dict[str, Any] = self._request(
            "POST", "/studies", json=_spec(spec), retry=False
        ).json()
        return out

    def study(self, study_id: str) -> dict[str, Any]:
        """A study: ``phase``, runs, counts, ``done`` and its ``tables`` once available."""
        out: dict[str, Any] = self._json(f"/studies/{_segment(study_id, 'study_id')}")
        return out

    def studies(self, phase: str | None = None, limit: int = 50) -> pd.DataFrame:
        """The studies, newest first: one row each with its phase, run counts and ``done``."""
        import pandas as pd

        _check_int(limit, "limit", 1)
        page = self._json("/studies", {"phase": phase, "limit": limit})
        return pd.DataFrame(page["studies"])

    def wait_study(
        self,
        study_id: str,
        timeout: float | None = 3600.0,
        poll: float = 2.0,
        *,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Poll until the study is done (tuning finished and no run queued or running)."""
        return self._wait_group("study", self.study, study_id, timeout, poll, progress)

    def study_table(self, study_id: str, table: str = "summary") -> pd.DataFrame:
        """One of the study's tables: ``summary``, ``differences``, ``settings`` or
        ``display`` (CONFLICT before every arm completed a seed)."""
        study = self.study(study_id)
        tables = study.get("tables")
        if tables is None:
            why = study.get("tables_error") or f"runs: {study.get('counts')}"
            raise BnnError(
                ErrorCode.CONFLICT,
                f"study {study_id!r} has no tables yet: no seed completed by every arm ({why})",
                counts=study.get("counts"),
            )
        if table not in tables:
            raise BnnError.invalid(f"unknown study table {table!r}; tables are {list(tables)}")
        return _frame(tables[table], {"study_id": study_id, "table": table})

    def study_plot(self, study_id: str, name: str) -> bytes:
        """``metrics`` or ``differences`` of a study, PNG bytes."""
        path = f"/studies/{_segment(study_id, 'study_id')}/plots/{_segment(name, 'name')}.png"
        return self._request("GET", path).content

    def cancel_study(self, study_id: str) -> dict[str, Any]:
        """Cancel the study's queued and running runs; the study."""
        path = f"/studies/{_segment(study_id, 'study_id')}/cancel"
        out: dict[str, Any] = self._request("POST", path).json()
        return out

    def _wait_group(
        self,
        what: str,
        get: Callable[[str], dict[str, Any]],
        group_id: str,
        timeout: float | None,
        poll: float,
        progress: bool,
    ) -> dict[str, Any]:
        _check_seconds(poll, "poll")
        deadline = _deadline(timeout)
        seen = None
        while True:
            group = get(group_id)
            counts = group.get("counts")
            if progress and counts != seen:
                phase = f" ({group['phase']})" if group.get("phase") else ""
                print(f"{what} {group_id}{phase}: {counts}", flush=True)
            seen = counts
            if group.get("done"):
                return group
            left = deadline - time.monotonic()
            if left <= 0:
                raise BnnError(
                    ErrorCode.UNAVAILABLE,
                    f"{what} {group_id!r} is not done after {timeout} s (runs: {counts})",
                    counts=counts,
                )
            time.sleep(min(poll, left))


class LocalService:
    """``bnn serve`` in a child process on a free loopback port (for notebooks, examples and
    tests that need a service of their own); :meth:`stop` ends it.

        with LocalService() as service, Client(service.url) as bnn:
            run_id = bnn.start_run({"dataset": "regression", "epochs": 3})

    Args:
        data_dir: the service's data directory; default a temporary one, removed by
            :meth:`stop` with everything in it.
        token: the service's ``BNN_API_TOKEN`` (writes then need it); default none.
        workers: processes of its Dask LocalCluster (``BNN_DASK_WORKERS``).
        timeout: seconds to wait for ``/healthz``; UNAVAILABLE with the server's output if
            it does not answer by then or exits first.

    The server gets this process's environment without its ``BNN_*`` settings (a database
    URL or data directory meant for another service), and stays in this process's group:
    interrupting or killing a notebook kernel or a script stops it too, and it is stopped
    when the interpreter exits.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        token: str | None = None,
        workers: int = 1,
        timeout: float = 120.0,
    ) -> None:
        _check_int(workers, "workers", 1)
        _check_seconds(timeout, "timeout")
        self._tmp = Path(tempfile.mkdtemp(prefix="bnn-service-"))
        self.data_dir = Path(data_dir) if data_dir is not None else self._tmp / "data"
        self.log_path = self._tmp / "server.log"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
        env["BNN_DASK_WORKERS"] = str(workers)
        if token:
            env["BNN_API_TOKEN"] = token
        args = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        args += ["--log-level", "warning"]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as http:
            while True:
                if self.process.poll() is not None:
                    raise BnnError(
                        ErrorCode.UNAVAILABLE,
                        f"bnn serve exited with status {self.process.returncode} before "
                        f"answering: {self.output()[-3000:]}",
                    )
                try:
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise BnnError(
                        ErrorCode.UNAVAILABLE,
                        f"bnn serve did not answer at {self.url} within {timeout:g} s: "
                        f"{self.output()[-3000:]}",
                    )
                time.sleep(0.2)

    def output(self) -> str:
        """What the server has written to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (the server stops its Dask workers), SIGKILL after ``grace`` seconds;
        then the temporary folder is removed. Safe to call again."""
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.process.poll() is None else "stopped"
        return f"LocalService({self.url!r}, {state}, data_dir={str(self.data_dir)!r})"


def describe_progress(run: Mapping[str, Any]) -> str:
    """``run 3f2a9c1b7d4e: running, epoch 3/10`` (the last captured epoch of the planned)."""
    epochs = list(run.get("epochs") or [])
    planned = (run.get("config") or {}).get("epochs")
    text = f"run {run.get('id')}: {run.get('status')}"
    if epochs:
        text += f", epoch {epochs[-1] + 1}" + (f"/{planned}" if planned else "")
    elif planned:
        text += f", 0/{planned} epochs"
    if run.get("error"):
        text += f" ({str(run['error']).strip().splitlines()[-1][:200]})"
    return text


# ----------------------------------------------------------------------------- helpers
def _frame(table: Mapping[str, Any], meta: Mapping[str, Any]) -> pd.DataFrame:
    """A table of the service (``{"columns", "rows"}``) as a DataFrame; ``meta`` in attrs.

    In a column of numbers, the service's "inf"/"-inf"/"nan" become floats and null NaN.
    """
    import pandas as pd

    columns = [str(c) for c in table["columns"]]
    rows = list(table["rows"])
    data: dict[str, list[Any]] = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        if _numeric(values):
            data[column] = [_number(v) for v in values]
        else:
            data[column] = values
    frame = pd.DataFrame(data, columns=columns)
    frame.attrs.update(meta)
    return frame


def _numeric(values: list[Any]) -> bool:
    """Numbers, nulls and "inf"/"-inf"/"nan" only (other columns stay as sent)."""
    return all(
        v is None
        or (isinstance(v, str) and v in _NONFINITE)
        or (isinstance(v, int | float) and not isinstance(v, bool))
        for v in values
    )


def _number(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    return value


def _columns(first: list[str], rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys([*first, *(k for row in rows for k in row)]))


def _one_layer(frame: pd.DataFrame, layer: str | None) -> pd.DataFrame:
    """The row of ``layer`` (NOT_FOUND naming it and the layers when the table has none)."""
    if layer is None:
        return frame
    _check_text(layer, "layer")
    layers = list(frame["layer"])
    if layer not in layers:
        raise BnnError.not_found(
            f"run {frame.attrs.get('run_id')!r} has no layer {layer!r}; layers are {layers}",
            layer=layer,
            layers=layers,
        )
    out = frame[frame["layer"] == layer].reset_index(drop=True)
    out.attrs.update(frame.attrs)
    return out


class _Repeated(list[str]):
    """A query parameter given once per value (``tag=a&tag=b``), not joined by commas."""


def _query_value(value: Any) -> str:
    """A query parameter's text: sequences joined by commas, enums by value, booleans as
    true/false."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list | range | set | frozenset):
        return ",".join(_element(v) for v in value)
    return str(value)


def _element(value: Any) -> str:
    """An item of a comma-separated option; ``("layer1", (2, 3))`` -> ``"layer1:2.3"``."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        layer, index = value
        flat = ".".join(str(int(i)) for i in index) if isinstance(index, Sequence) else index
        return f"{layer}:{flat}"
    return str(value.value if isinstance(value, Enum) else value)


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BnnError.invalid(f"{name} must be a non-empty string, got {value!r}", **{name: value})
    return value


def _segment(value: Any, name: str) -> str:
    """``value`` as one path segment (escaped, so that it can never name another path)."""
    return quote(_check_text(value, name), safe="")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BnnError.invalid(
            f"{name} must be an integer >= {minimum}, got {value!r}", **{name: value}
        )
    return value


def _check_seconds(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise BnnError.invalid(f"{name} must be a number of seconds > 0, got {value!r}")
    if not math.isfinite(value):
        raise BnnError.invalid(f"{name} must be finite, got {value!r}")


def _deadline(timeout: float | None) -> float:
    """The monotonic time ``timeout`` seconds from now (None: never)."""
    if timeout is None:
        return math.inf
    _check_seconds(timeout, "timeout")
    return time.monotonic() + timeout


def _epoch(value: Any, name: str, *, required: bool = False) -> int | None:
    """A captured epoch's number (an int >= 0), or None for the latest."""
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BnnError.invalid(
            f"{name} must be an epoch number (an integer >= 0)"
            + ("" if required else " or None for the latest")
            + f", got {value!r}",
            **{name: value},
        )
    return value


def _epochs(value: Iterable[int] | None) -> str | None:
    """Epochs as the service's comma-separated list (None: every captured epoch)."""
    if value is None:
        return None
    if isinstance(value, str):  # "0,5,10" as the service takes it (it checks the text)
        return value
    epochs = [
        _epoch(e, "epochs", required=True) for e in ([value] if isinstance(value, int) else value)
    ]
    if not epochs:
        raise BnnError.invalid("epochs must name at least one epoch (None: all captured)")
    return ",".join(str(e) for e in epochs)


def _names(value: str | Sequence[str] | None, name: str) -> str | None:
    """Names as a comma-separated list (None: all)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        _check_text(item, name)
    return ",".join(items)


def _strings(value: str | Sequence[str]) -> list[str]:
    """A repeated query parameter's values (``tags="a"`` or ``tags=["a", "b"]``)."""
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str):
            raise BnnError.invalid(f"expected strings, got {item!r} in {value!r}")
    return items


def _run_list(runs: Sequence[str]) -> str:
    if isinstance(runs, str):
        runs = [r for r in runs.split(",") if r]
    ids = [_check_text(r, "runs").strip() for r in runs]
    if len(ids) < 2:
        raise BnnError.invalid(f"runs must name at least 2 runs to compare, got {ids}")
    return ",".join(ids)


def _spec(spec: Any) -> dict[str, Any]:
    if hasattr(spec, "model_dump"):  # a SweepSpec / StudySpec model
        spec = spec.model_dump(mode="json")
    if not isinstance(spec, Mapping):
        raise BnnError.invalid(f"spec must be a dict (or a spec model), got {spec!r}")
    return dict(spec)
