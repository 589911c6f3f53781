"""A tracked run: what :func:`trainer.tracking.track` returns (the module docstring there
says what it records, where, and how a run ends).

:meth:`TrackedRun.step` records one step's gradient statistics into a
:class:`~trainer.capture.GradientRecorder` and its finiteness into the trainer's divergence
watch (no wait for the device); :meth:`TrackedRun.log_epoch` ends an epoch and, on a capture
epoch, hands an :class:`~trainer.snapshot.EpochSnapshot` to the sink exactly as
:class:`~trainer.train.Trainer` does; :meth:`TrackedRun.finish` (or leaving the ``with``
block) reports the final status. Torch is imported when a run starts, not with this module's
callers (``trainer.tracking`` stays torch-free for the service).
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from trainer import kernels
from trainer.errors import BnnError, ErrorCode
from trainer.tracking import (
    MAX_EPOCHS,
    TRACKING_KEY,
    _create_remote_run,
    _default_sink,
    _metric,
    check_tracked_config,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainer.snapshot import EpochSnapshot
    from trainer.train import Divergence, RunSink

__all__ = ["TrackedRun"]

_HEARTBEAT_ENV = "BNN_HEARTBEAT_S"


def _detail(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class TrackedRun:
    """A run recorded from your own loop (see the module docstring); made by :func:`track`.

    Attributes: ``id``, ``sink``, ``model``, ``config`` (as stored), ``epochs`` (planned or
    None), ``history`` (one dict of metrics per logged epoch), ``captured_epochs``,
    ``global_step``, ``divergence`` (the first non-finite step, or None), ``status`` (None
    while the run is open, then its final status) and ``refused_epochs`` (epochs a sink
    refused after the run diverged, with the reason).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str | None,
        config: Mapping[str, Any] | None,
        tags: Iterable[str],
        tracking_url: str | None,
        data_dir: str | Path | None,
        db_url: str | None,
        token: str | None,
        epochs: int | None,
        capture_every: int,
        grad_level: str,
        optimizer: torch.optim.Optimizer | None,
        sink: RunSink | None,
        heartbeat_interval: float | None,
        handle_sigterm: bool,
        background_writes: bool,
        stat_bits: int | None = None,
        compress_posteriors: bool | None = None,
        element_every: int = 1,
    ) -> None:
        import torch
        from torch import nn

        from trainer.capture import GradientRecorder, validate_element_every
        from trainer.layers import bayesian_layers
        from trainer.snapshot import GradLevel
        from trainer.train import _EpochWriter, _Heartbeat

        if not isinstance(model, nn.Module):
            raise BnnError.invalid(f"track needs an nn.Module, got {type(model).__name__}")
        layers = bayesian_layers(model)
        if not layers:
            raise BnnError.invalid(
                f"{type(model).__name__} has no Bayesian layer (BayesLinear, BayesConv2d): "
                "trainer.bayesianize(model) converts its nn.Linear and nn.Conv2d layers"
            )
        if (
            isinstance(capture_every, bool)
            or not isinstance(capture_every, int)
            or capture_every < 1
        ):
            raise BnnError.invalid(f"capture_every must be an integer >= 1, got {capture_every!r}")
        try:
            level = GradLevel(grad_level)
        except ValueError:
            choices = [g.value for g in GradLevel]
            raise BnnError.invalid(
                f"grad_level must be one of {choices}, got {grad_level!r}"
            ) from None
        if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 256):
            raise BnnError.invalid(
                f"name must be a non-blank string of <= 256 characters, got {name!r}"
            )
        if isinstance(tags, str):
            raise BnnError.invalid(f"tags must be a list of strings, got the string {tags!r}")
        tags = list(tags)
        if not all(isinstance(t, str) and t.strip() and len(t) <= 64 for t in tags):
            raise BnnError.invalid(
                f"tags must be non-blank strings of <= 64 characters, got {tags!r}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise BnnError.invalid(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if sink is not None and (tracking_url is not None or data_dir is not None):
            raise BnnError.invalid("give sink= or tracking_url/data_dir, not both")
        from trainer.store._codec import validate_compress_posteriors, validate_stat_bits
        from trainer.store._write import env_format

        env_format()  # BNN_STAT_BITS / BNN_COMPRESS_POSTERIORS checked before any run exists
        self._stat_bits = None if stat_bits is None else validate_stat_bits(stat_bits)
        self._compress_posteriors = validate_compress_posteriors(compress_posteriors)
        self._element_every = validate_element_every(element_every)
        user = check_tracked_config(config)
        if TRACKING_KEY in user:
            raise BnnError.invalid(
                f"config key {TRACKING_KEY!r} is the tracker's own; rename yours",
                field=TRACKING_KEY,
            )
        self.epochs = self._planned_epochs(epochs, user.get("epochs"))
        interval = self._heartbeat_interval(heartbeat_interval)
        self.model = model
        self.capture_every = capture_every
        self.config = self._describe(model, layers, user, level)
        self.history: list[dict[str, float]] = []
        self.captured_epochs: list[int] = []
        self.refused_epochs: dict[int, str] = {}
        self.divergence: Divergence | None = None
        self.status: str | None = None
        self.global_step = 0
        first = next(iter(model.parameters()), None)
        self._device = first.device if first is not None else torch.device("cpu")
        if self._device.type == "cpu":
            kernels.tune_allocator()
        self._submitted: list[int] = []  # epochs handed to the writer
        self._writer = _EpochWriter(
            self._write, self.captured_epochs.append, background=background_writes
        )
        self._recorder = GradientRecorder(model, level, element_every=self._element_every)
        self._watch: Any = None  # a trainer.train._DivergenceWatch, made at the first step
        self._zero: Any = None  # a 0-d tensor on the watch's device
        self._tensor = torch.Tensor
        self._next_epoch = 0  # the epoch the coming steps belong to
        self._epoch_steps = 0
        self._last_epoch_steps = 1
        self._step0 = 0
        self._recording = False
        self._last_logged: tuple[int, dict[str, float]] | None = None
        self._t_epoch = time.perf_counter()
        self._stop_checked = -math.inf
        self._cancelled = False
        self._in_hook = False
        self._terminated = False
        self._uncaught: BaseException | None = None

        self._owns_sink = sink is None
        if sink is None:
            sink = _default_sink(tracking_url, data_dir, db_url, token)
        self.sink: Any = sink
        try:
            from trainer.remote import HttpRunSink

            if isinstance(sink, HttpRunSink):
                self.id = _create_remote_run(sink, name, self.config, tags)
            else:
                self.id = str(sink.create_run(name, self.config, tags=tags).id)
                if (recover := getattr(sink, "recover_run", None)) is not None:
                    recover(self.id)
        except BaseException:
            self._close_sink()
            raise
        self._heartbeat = _Heartbeat(sink, self.id, interval).__enter__()
        self._hook = None
        self._optimizer = optimizer
        if optimizer is not None:
            self._hook = optimizer.register_step_pre_hook(self._optimizer_hook)
        self._sigterm = False
        main = threading.current_thread() is threading.main_thread()
        if handle_sigterm and main and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._sigterm = True
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._at_exit)

    # -- set-up helpers -------------------------------------------------------------------
    @staticmethod
    def _planned_epochs(epochs: Any, configured: Any) -> int | None:
        if epochs is None:
            return configured if isinstance(configured, int) and configured >= 1 else None
        if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= MAX_EPOCHS:
            raise BnnError.invalid(f"epochs must be an integer >= 1, got {epochs!r}")
        if configured is not None and configured != epochs:
            raise BnnError.invalid(
                f"epochs={epochs} but config['epochs'] is {configured!r}; give one of them"
            )
        return epochs

    def _describe(
        self, model: nn.Module, layers: list[tuple[str, Any]], user: dict[str, Any], level: Any
    ) -> dict[str, Any]:
        """The stored configuration: the user's, with what the tracker knows where it lacks."""
        from trainer.layers import resolved_priors

        out = dict(user)
        if self.epochs is not None:
            out.setdefault("epochs", self.epochs)
        learnable = [layer.prior_spec for _, layer in layers if layer.prior_spec.learnable]
        out.setdefault("prior", "learnable" if learnable else "fixed")
        modes = {spec.mode.value for spec in learnable}
        if len(modes) == 1:
            out.setdefault("prior_mode", modes.pop())
        out.setdefault("resolved_priors", resolved_priors(model))
        out[TRACKING_KEY] = {
            "source": "trainer.track",
            "capture_every": self.capture_every,
            "grad_level": level.value,
            "model": type(model).__name__,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "bayesian_layers": len(layers),
        }
        if self._element_every > 1:
            out[TRACKING_KEY]["element_every"] = self._element_every
        if self._stat_bits is not None:
            out[TRACKING_KEY]["stat_bits"] = self._stat_bits
        if self._compress_posteriors is not None:
            out[TRACKING_KEY]["compress_posteriors"] = self._compress_posteriors
        return out

    @staticmethod
    def _heartbeat_interval(value: float | None) -> float:
        raw: Any = value if value is not None else os.environ.get(_HEARTBEAT_ENV, "5")
        try:
            seconds = float(raw)
        except (TypeError, ValueError):
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            where = "heartbeat_interval" if value is not None else f"${_HEARTBEAT_ENV}"
            raise BnnError.invalid(f"{where} must be a number of seconds > 0, got {raw!r}")
        return seconds

    # -- the loop -------------------------------------------------------------------------
    @property
    def url(self) -> str | None:
        """The run on the service (tracking URL), None for a local store."""
        run_url = getattr(self.sink, "run_url", None)
        return str(run_url(self.id)) if run_url is not None else None

    @property
    def data_dir(self) -> Path | None:
        """The local store's folder, None for the service."""
        folder = getattr(self.sink, "data_dir", None)
        return Path(folder) if folder is not None else None

    @property
    def pending_steps(self) -> int:
        """Steps taken since the last logged epoch (they belong to the next one)."""
        return self._epoch_steps

    def step(self, loss: Any = None) -> None:
        """Record one optimisation step's gradients (call after ``backward()``, before
        ``optimizer.step()``); ``loss`` (optional) is checked to be finite too."""
        if self._hook is not None and not self._in_hook:
            raise BnnError.invalid(
                "this run records gradients in the optimizer's step hook (track(optimizer=...)):"
                " do not call run.step() as well"
            )
        self._check_open()
        if self._epoch_steps == 0:
            self._begin_epoch()
        if self._recording:
            if self._in_hook and self._optimizer is not None:
                # in the step itself: a RecordingAdam takes the statistics in its own pass
                from trainer.optim import record_with

                record_with(self._optimizer, self._recorder)
            else:
                self._recorder.record_step()
        if self.divergence is None:  # only the first divergence counts (as in the trainer)
            if loss is None:
                loss = self._zero
            elif isinstance(loss, self._tensor):
                loss = loss.detach().to(self._watch.device)
            else:
                loss = self._zero.new_tensor(float(loss))
            self._watch.observe(loss)
        self._epoch_steps += 1
        self.global_step += 1

    def _begin_epoch(self) -> None:
        """At an epoch's first step: whether its gradients are recorded, a new watch window."""
        import torch

        from trainer.capture import is_capture_epoch
        from trainer.snapshot import GradLevel
        from trainer.train import _DivergenceWatch

        if self._watch is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            device = named[0][1].device if named else torch.device("cpu")
            self._watch = _DivergenceWatch(named, device)
            self._zero = torch.zeros((), device=device)
        last = None if self.epochs is None else self.epochs - 1
        due = is_capture_epoch(self._next_epoch, self.capture_every, last_epoch=last)
        self._recording = due and self._recorder.level is not GradLevel.NONE
        if self._recording:
            self._recorder.reset()
        self._watch.start(self._last_epoch_steps)
        self._step0 = self.global_step

    def _optimizer_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.status is not None:
            return  # the run has ended; the optimiser goes on without it
        self._in_hook = True
        try:
            self.step()
        finally:
            self._in_hook = False

    def log_epoch(self, epoch: int | None = None, metrics: Mapping[str, Any] | None = None) -> bool:
        """End epoch ``epoch`` (default: the one after the last logged, 0 first) with its
        ``metrics``; True when it is a capture epoch. Epochs must increase.

        A captured epoch is written by a background thread while the next epoch trains, as
        ``bnn train`` writes (one write in flight; ``background_writes=False`` writes here):
        ``captured_epochs`` lists it once stored, and a failed write is raised by the next
        ``log_epoch``, :meth:`flush` or the end of the run."""
        self._check_open()
        if epoch is None:
            epoch = self._next_epoch
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCHS:
            raise BnnError.invalid(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch < self._next_epoch:
            raise BnnError.invalid(
                f"epoch {epoch} comes after epoch {self._next_epoch - 1}, which was logged "
                f"already; epochs must increase (next: {self._next_epoch})",
                epoch=epoch,
            )
        if metrics is not None and not isinstance(metrics, Mapping):
            raise BnnError.invalid(f"metrics must be a dict, got {type(metrics).__name__}")
        values = {key: _metric(key, value) for key, value in (metrics or {}).items()}
        return self._end_epoch(epoch, values)

    def _end_epoch(self, epoch: int, values: dict[str, float]) -> bool:
        from trainer.capture import is_capture_epoch

        now = time.perf_counter()
        steps = self._epoch_steps
        last = None if self.epochs is None else self.epochs - 1
        due = is_capture_epoch(epoch, self.capture_every, last_epoch=last)
        recorded = due and self._recording and steps > 0
        if steps and self._watch is not None and self.divergence is None:
            found = self._watch.first(epoch, self._step0)
            if found is not None:
                self._report_divergence(found)
        metrics = dict(values)
        metrics.setdefault("steps", float(steps))
        metrics.setdefault("epoch_time_s", now - self._t_epoch)
        if due:
            self._add_kl(metrics)
        self.history.append({"epoch": float(epoch), **metrics})
        self._last_logged = (epoch, metrics)
        self._next_epoch = epoch + 1
        self._last_epoch_steps = max(1, steps)
        self._epoch_steps = 0
        self._recording = False
        self._t_epoch = now
        return self._capture(epoch, metrics, recorded) if due else False

    def _add_kl(self, metrics: dict[str, float]) -> None:
        """``kl`` and ``kl/<layer>`` as ``bnn train`` reports them, where not given; the
        random stream is left as it was (a scale-mixture KL samples)."""
        import torch

        from trainer.layers import kl_by_layer

        devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            per_layer = {name: float(value) for name, value in kl_by_layer(self.model).items()}
        metrics.setdefault("kl", float(sum(per_layer.values())))
        for name, value in per_layer.items():
            metrics.setdefault(f"kl/{name}", value)

    def _capture(self, epoch: int, metrics: dict[str, float], recorded: bool) -> bool:
        """Snapshot the epoch (as :meth:`Trainer.snapshot`: on a GPU the host copies are
        asynchronous) and hand it to the epoch writer."""
        from trainer.capture import epoch_snapshot

        recorder = self._recorder if recorded else None
        snap, ready = epoch_snapshot(self.model, epoch, dict(metrics), recorder, self._device)
        snap.stat_bits, snap.compress_posteriors = self._stat_bits, self._compress_posteriors
        self._submitted.append(epoch)
        self._writer.submit(snap, ready)
        return True

    def _write(self, snap: EpochSnapshot) -> bool:
        """Store one epoch (on the writer thread); False when it was not stored: a sink
        refusing an epoch taken after the run diverged (as the trainer allows), or a service
        that dropped it because the run was cancelled there."""
        from trainer.train import write_epoch_to

        stored, written = write_epoch_to(
            self.sink,
            self.id,
            snap,
            diverged=self.divergence is not None,
            refused=self.refused_epochs,
        )
        if not stored:
            return False
        return not (written is None and self.should_stop)

    def flush(self) -> None:
        """Wait until the epoch being written (if any) is stored; raises its write's error."""
        self._writer.wait()

    def _report_divergence(self, found: Divergence) -> None:
        self.divergence = found
        record = getattr(self.sink, "set_divergence", None)
        if record is not None:
            record(self.id, step=found.step, epoch=found.epoch, layer=found.layer)

    @property
    def should_stop(self) -> bool:
        """True once the run was cancelled (on the service or the dashboard): stop your loop.
        Asks the service or catalog at most once a second; never raises."""
        if self._cancelled:
            return True
        check = getattr(self.sink, "should_stop", None)
        if check is not None:
            self._cancelled = bool(check(self.id))
            return self._cancelled
        now = time.monotonic()
        get_run = getattr(self.sink, "get_run", None)
        if get_run is not None and now - self._stop_checked >= 1.0:
            self._stop_checked = now
            try:
                self._cancelled = str(get_run(self.id).status) == "cancelled"
            except Exception:
                return False
        return self._cancelled

    def _check_open(self) -> None:
        if self.status is not None:
            raise BnnError(
                ErrorCode.CONFLICT, f"run {self.id!r} has ended ({self.status})", run_id=self.id
            )

    # -- the end --------------------------------------------------------------------------
    def finish(self, status: str | None = None, error: str | None = None) -> str:
        """End the run; its final status. ``status`` None (or ``completed``): the normal
        end (pending epoch logged, last epoch captured, ``completed``/``diverged``/
        ``cancelled``); ``failed`` or ``interrupted`` with ``error`` as the reason. A second
        call returns the status the first set."""
        if self.status is not None:
            return self.status
        if status not in (None, "completed", "failed", "interrupted"):
            raise BnnError.invalid(
                f"finish status must be completed, failed or interrupted, got {status!r}"
            )
        if status in (None, "completed"):
            try:
                final, why = self._wrap_up()
            except BaseException as exc:
                self._writer.settle()
                self._close("failed", _detail(exc), strict=False)
                raise
            self._close(final, why, strict=True)
        else:
            self._writer.settle()  # the write in flight lands (its own error is dropped)
            self._close(status, error, strict=False)
        assert self.status is not None
        return self.status

    def _wrap_up(self) -> tuple[str, str | None]:
        """The normal end: the pending epoch, the last epoch's capture, the final status."""
        if self._epoch_steps > 0:
            self._end_epoch(self._next_epoch, {})
        if self._last_logged is not None and not self.should_stop:
            epoch, metrics = self._last_logged
            if epoch not in self._submitted:
                self._capture(epoch, metrics, recorded=False)
        self._writer.wait()  # the last epoch is stored before the run's status
        if self.should_stop:
            return "cancelled", None
        if self.divergence is not None:
            why = self.divergence.describe()
            for epoch, reason in self.refused_epochs.items():
                why += f"; epoch {epoch} was not stored: {reason}"
            return "diverged", why
        return "completed", None

    def _close(self, status: str, error: str | None, *, strict: bool) -> None:
        """Stop the heartbeat and hooks, report ``status`` (a failure raised when ``strict``,
        swallowed while another error is on its way), close a sink the run opened."""
        self.status = status
        try:
            self._heartbeat.__exit__(None, None, None)
            self._remove_hooks()
            if status != "cancelled":
                try:
                    self.sink.set_status(self.id, status, error=error)
                except Exception:
                    if strict:
                        raise
        finally:
            self._close_sink()

    def _remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        atexit.unregister(self._at_exit)
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_excepthook
        main = threading.current_thread() is threading.main_thread()
        if self._sigterm and main and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _close_sink(self) -> None:
        if self._owns_sink and (close := getattr(self.sink, "close", None)) is not None:
            close()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._terminated = True
        raise SystemExit(128 + signum)

    def _excepthook(
        self, kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        self._uncaught = value
        self._previous_excepthook(kind, value, tb)

    def _at_exit(self) -> None:
        """The interpreter exits with the run still open (no ``with``, no ``finish``)."""
        if self.status is not None:
            return
        if self._uncaught is not None:
            self.finish("failed", f"uncaught at exit: {_detail(self._uncaught)}")
        else:
            self.finish()

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.finish()
        elif isinstance(exc, KeyboardInterrupt):
            self.finish("interrupted", "interrupted by the user (KeyboardInterrupt)")
        elif isinstance(exc, SystemExit):
            why = (
                "terminated by SIGTERM"
                if self._terminated
                else f"the process exited inside the tracked block ({_detail(exc)})"
            )
            self.finish("interrupted", why)
        else:
            self.finish("failed", _detail(exc))

    def __repr__(self) -> str:
        where = self.url or str(self.data_dir)
        return (
            f"TrackedRun({self.id!r}, {where!r}, status={self.status or 'running'!r}, "
            f"captured={self.captured_epochs})"
        )
