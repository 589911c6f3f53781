"""Record any training loop into a run store or a bnn service: ``trainer.track``.

Like ``mlflow.start_run()`` or ``wandb.watch(model)``: a model with Bayesian layers (build it
from ``BayesLinear``/``BayesConv2d`` or ``bayesianize`` your own), your own data and loop::

    with trainer.track(model, name="resnet-learnable", config={"lr": 1e-3, "epochs": 10},
                       tracking_url=None, data_dir="runs/", capture_every=1,
                       grad_level="element") as run:
        for epoch in range(10):
            for x, y in loader:
                loss = ...; loss.backward()
                run.step()                      # gradient statistics (after backward)
                optimizer.step(); optimizer.zero_grad()
            run.log_epoch(epoch, metrics={"val_nll": ...})

What is captured is what ``bnn train`` captures, through the same code: every
``capture_every`` epochs (0, N, 2N, ... and the planned last epoch) the posteriors and the
layer priors (``get_all_distribution_params``), the gradient statistics of that epoch's
steps (:class:`~trainer.capture.GradientRecorder`: per element, per layer or none), and the
metrics. The epoch files go to a local :class:`~trainer.store.RunStore` (crash-safe) or, with
a tracking URL, to the service through :class:`~trainer.remote.HttpRunSink` (idempotent,
retried uploads), written by a background thread while the next epoch trains (one write in
flight, as the trainer's); a heartbeat thread keeps the run alive in the catalog.

Where the run goes: ``sink=`` (a RunStore or HttpRunSink you opened), else ``tracking_url``,
else ``data_dir``; neither given: ``$BNN_TRACKING_URL``, else ``$BNN_DATA_DIR``, else
``./bnn-data`` (``db_url`` or ``$BNN_DATABASE_URL`` for the catalog; ``token`` or
``$BNN_API_TOKEN`` for the service).

The run's configuration is your ``config`` dict (any JSON values), plus what the tracker
knows, filled in only where your dict lacks the key: ``prior`` (``learnable`` when any layer
learns its prior, else ``fixed``), ``prior_mode`` (the learnable layers' mode, when they share
one), ``resolved_priors`` (each layer's weight and bias prior) and ``epochs`` (``epochs=``);
and always ``tracking`` (``capture_every``, ``grad_level``, the model's class and parameter
count). Keys with a meaning in the run listing must have its type: ``epochs`` an integer
>= 0, ``dataset``, ``prior`` and ``prior_mode`` strings; ``tracking`` is the tracker's.

Gradients: call ``run.step()`` after ``backward()`` and before ``optimizer.step()`` (raw
gradients, before any clipping, as ``bnn train`` records them), or pass ``optimizer=`` and
the tracker records them in a step pre-hook of that optimiser (after any clipping you do).
With ``optimizer=`` a :class:`trainer.optim.RecordingAdam` (``torch.optim.Adam``, or AdamW
with ``decoupled_weight_decay=True``; what ``bnn train`` uses on the CPU) takes the
statistics in its own update pass on the CPU, so a tracked loop's capture costs what
``bnn train``'s does; any other optimiser gets a separate pass over the gradients.
Each step also checks, without waiting for the device, that the gradients (and the loss,
when passed: ``run.step(loss)``) are finite; the first non-finite step is reported as the
run's divergence (``diverged_step``, ``diverged_epoch``, ``diverged_layer``) and a run that
diverged ends ``diverged`` instead of ``completed``.

Epochs: ``run.log_epoch(epoch, metrics)`` ends an epoch. Its metrics (numbers, 0-d tensors)
are kept in ``run.history``; on a captured epoch they are stored with the epoch, with
``steps``, ``epoch_time_s``, ``kl`` and ``kl/<layer>`` added where you did not give them.
On leaving the block normally, steps taken after the last ``log_epoch`` are logged as one
more epoch, and the last logged epoch is captured if it was not (posteriors, priors and
metrics; gradients only where that epoch was due for capture, so pass ``epochs=`` to have
the last epoch's gradients too), as ``bnn train`` always captures its last epoch.

End of the run: leaving the ``with`` block normally (or ``run.finish()``) marks it
``completed`` (``diverged`` after a divergence; left ``cancelled`` when it was cancelled on
the service, which ``run.should_stop`` reports); an exception marks it ``failed`` with the
exception's text and is re-raised; ``KeyboardInterrupt``, ``SystemExit`` and SIGTERM (the
tracker installs a handler where none is set) mark it ``interrupted``. A run left open
without ``with`` is finished when the interpreter exits (``failed`` after an uncaught
exception). A SIGKILLed process cannot report: its heartbeat stops, and the catalog reports
the run ``interrupted`` after ``$BNN_STALE_AFTER_S`` (60 s).

The tracker records; it does not train: empirical-Bayes and Laplace prior updates
(:func:`trainer.layers.empirical_bayes_step`) stay your loop's business.

This module imports no torch until a run starts (the service imports
:func:`check_tracked_config`); the run itself is :class:`trainer.tracked_run.TrackedRun`.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import BnnError, ErrorCode

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer.remote import HttpRunSink
    from trainer.tracked_run import TrackedRun
    from trainer.train import RunSink

__all__ = ["LISTED_KEYS", "TRACKING_KEY", "check_tracked_config", "track"]

#: the configuration key the tracker writes (its settings and the model's description)
TRACKING_KEY = "tracking"
#: configuration keys the run listing reads, and the JSON type each must have
LISTED_KEYS = {"epochs": "an integer >= 0", "dataset": "a string", "prior": "a string"}
LISTED_KEYS |= {"prior_mode": "a string"}
MAX_EPOCHS = 2**31 - 1  # the catalog sorts by config epochs as a 32-bit integer


def check_tracked_config(config: Mapping[str, Any] | None, where: str = "config") -> dict[str, Any]:
    """``config`` as the JSON object a tracked run stores; INVALID_ARGUMENT naming the first
    bad key or value (a non-string key, a value JSON cannot hold, or a listed key of another
    type: ``epochs`` an integer in [0, 2**31), ``dataset``/``prior``/``prior_mode`` strings).

    Non-finite floats become "nan"/"inf"/"-inf" (as the catalog stores them); an integral
    float ``epochs`` (3.0, as JSON may send it) becomes an integer.
    """
    from trainer.store._records import encode_json

    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise BnnError.invalid(
            f"{where} must be a dict of settings, got {type(config).__name__}", field=where
        )
    out: dict[str, Any] = encode_json(dict(config), where)
    epochs = out.get("epochs")
    if isinstance(epochs, float) and epochs.is_integer():
        epochs = out["epochs"] = int(epochs)
    for key, kind in LISTED_KEYS.items():
        if key not in out or out[key] is None:
            continue
        value = out[key]
        if key == "epochs":
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and 0 <= value <= MAX_EPOCHS
        else:
            ok = isinstance(value, str)
        if not ok:
            raise BnnError.invalid(
                f"{where}[{key!r}] must be {kind} (the run listing reads it), got {value!r}",
                field=f"{where}.{key}",
                value=repr(value)[:200],
            )
    return out


def _default_sink(
    tracking_url: str | None,
    data_dir: str | Path | None,
    db_url: str | None,
    token: str | None,
) -> Any:
    """The sink ``track`` opens (and closes at the end): HTTP or a local run store."""
    from trainer.store import RunStore

    if tracking_url is not None and data_dir is not None:
        raise BnnError.invalid(
            f"give tracking_url ({tracking_url!r}) or data_dir ({str(data_dir)!r}), not both"
        )
    if tracking_url is None and data_dir is None:
        tracking_url = os.environ.get("BNN_TRACKING_URL") or None
    if tracking_url is not None:
        from trainer.remote import HttpRunSink

        if not isinstance(tracking_url, str) or not tracking_url.startswith(
            ("http://", "https://")
        ):
            raise BnnError.invalid(
                f"tracking_url must be an http:// or https:// URL, got {tracking_url!r}"
            )
        return HttpRunSink(tracking_url, token=token or os.environ.get("BNN_API_TOKEN") or None)
    folder = data_dir if data_dir is not None else os.environ.get("BNN_DATA_DIR") or "bnn-data"
    return RunStore(folder, db_url or os.environ.get("BNN_DATABASE_URL") or None)


def _create_remote_run(
    sink: HttpRunSink, name: str | None, config: dict[str, Any], tags: list[str]
) -> str:
    """Register a tracked run on the service under an id chosen here (``PUT /runs/{id}``:
    the same registration again is a 200, so a retried one cannot make two runs); its id."""
    run_id = uuid.uuid4().hex[:12]
    body: dict[str, Any] = {"tags": tags, "config": config}
    if name is not None:
        body["name"] = name
    try:
        sink.request("PUT", f"/runs/{run_id}", json=body)
    except BnnError as exc:
        if exc.details.get("http_status") == 405:
            raise BnnError(
                ErrorCode.UNAVAILABLE,
                f"the service at {sink.base_url} does not take tracked runs "
                f"(PUT /runs/{{id}} answered 405); update it",
                url=sink.base_url,
            ) from exc
        raise
    sink.run_id = run_id
    sink.patch(run_id, train_host=socket.gethostname())
    return run_id


def _metric(name: Any, value: Any) -> float:
    """A metric value as a float: numbers, numpy scalars, one-element tensors/arrays."""
    if not isinstance(name, str) or not name:
        raise BnnError.invalid(f"metric names must be non-empty strings, got {name!r}")
    if isinstance(value, bool) or value is None:
        raise BnnError.invalid(f"metric {name!r} must be a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    count = size() if callable(size) else size
    if hasattr(value, "item") and count == 1:
        item = value.item()
        if isinstance(item, int | float) and not isinstance(item, bool):
            return float(item)
    raise BnnError.invalid(
        f"metric {name!r} must be a number or a one-element tensor, got {type(value).__name__}"
        + (f" of {count} elements" if isinstance(count, int) else ""),
        metric=name,
    )


def track(
    model: nn.Module,
    *,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    tags: Iterable[str] = (),
    tracking_url: str | None = None,
    data_dir: str | Path | None = None,
    db_url: str | None = None,
    token: str | None = None,
    epochs: int | None = None,
    capture_every: int = 1,
    grad_level: str = "element",
    optimizer: torch.optim.Optimizer | None = None,
    sink: RunSink | None = None,
    heartbeat_interval: float | None = None,
    handle_sigterm: bool = True,
    background_writes: bool = True,
    stat_bits: int | None = None,
    compress_posteriors: bool | None = None,
    element_every: int = 1,
) -> TrackedRun:
    """Start a tracked run of ``model`` (see the module docstring); use it as a context
    manager, or call :meth:`TrackedRun.finish` yourself.

    Args:
        model: any ``nn.Module`` with at least one Bayesian layer (INVALID_ARGUMENT
            otherwise; ``trainer.bayesianize`` converts a plain model).
        name, config, tags: how the run is listed; ``config`` any JSON-able dict.
        tracking_url, data_dir, db_url, token: where it goes (module docstring).
        epochs: the planned number of epochs (the last is always captured, with
            gradients; the dashboard shows progress); default ``config["epochs"]``.
        capture_every: capture epochs 0, N, 2N, ... (and the planned last).
        grad_level: ``element`` (per weight), ``layer`` or ``none``.
        optimizer: record gradients in its step pre-hook instead of ``run.step()``.
        sink: a RunStore / HttpRunSink (or any RunSink) to use as it is (not closed).
        heartbeat_interval: seconds between heartbeats (``$BNN_HEARTBEAT_S`` or 5).
        handle_sigterm: install a SIGTERM handler (main thread, none set) that ends the
            run ``interrupted`` and exits with status 143.
        background_writes: write captured epochs on a background thread while the next
            epoch trains, as ``bnn train`` does (False: in ``log_epoch``).
        stat_bits, compress_posteriors: how the epoch files are written (lossy, opt-in:
            the per-element statistics at ``stat_bits`` of their 7 mantissa bits, the
            posteriors compressed; ``bnn train --stat-bits``); None: ``$BNN_STAT_BITS`` and
            ``$BNN_COMPRESS_POSTERIORS``, else lossless and plain.
        element_every: each weight's mean |g| from every N-th step only (sampled; its max
            |g| and non-finite count still take every step; ``bnn train --element-every``;
            the metric ``element_steps`` counts the mean's steps).
    """
    from trainer.tracked_run import TrackedRun

    return TrackedRun(
        model,
        name=name,
        config=config,
        tags=tags,
        tracking_url=tracking_url,
        data_dir=data_dir,
        db_url=db_url,
        token=token,
        epochs=epochs,
        capture_every=capture_every,
        grad_level=grad_level,
        optimizer=optimizer,
        sink=sink,
        heartbeat_interval=heartbeat_interval,
        handle_sigterm=handle_sigterm,
        background_writes=background_writes,
        stat_bits=stat_bits,
        compress_posteriors=compress_posteriors,
        element_every=element_every,
    )
