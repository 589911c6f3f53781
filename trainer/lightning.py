"""A PyTorch Lightning callback that tracks a fit like ``bnn train`` (``trainer.track`` inside).

    pip install "bnn-infosharing[lightning]"

    from trainer.lightning import BnnTracking
    tracking = BnnTracking(name="resnet-learnable", data_dir="runs/")  # or tracking_url=...
    trainer = lightning.Trainer(max_epochs=10, callbacks=[tracking])
    trainer.fit(module, train_loader, val_loader)  # module: a LightningModule, Bayesian layers

The LightningModule is the tracked model (it needs a Bayesian layer: build it from
``BayesLinear``/``BayesConv2d`` or ``bayesianize`` its network). On the global-rank-zero
process only:

* ``on_fit_start`` starts the run (:func:`trainer.tracking.track`): the planned epochs are
  the Trainer's ``max_epochs``; the configuration is the module's ``hparams`` (the values JSON
  can hold) updated by ``config=``;
* ``on_before_optimizer_step`` records the step's gradients (accumulated, and before
  Lightning's gradient clipping: the raw gradients, as ``bnn train`` records them);
* an epoch is logged when the next one starts (or training ends), so that its metrics are
  every scalar of ``trainer.callback_metrics`` by then, including what the module logs in its
  own ``on_train_epoch_end`` and the validation metrics;
* ``on_fit_end`` finishes the run ``completed`` (``diverged`` after non-finite gradients);
  ``on_exception`` ends it ``failed`` with the exception's text, or ``interrupted`` for
  ``KeyboardInterrupt`` and Lightning's ``SIGTERMException`` (Lightning handles SIGTERM, so
  the tracker installs no handler of its own).

``callback.run`` is the :class:`~trainer.tracked_run.TrackedRun` (None before the fit and on
other ranks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as exc:  # pragma: no cover - the optional extra is not installed
    raise ImportError(
        "trainer.lightning needs PyTorch Lightning 2: pip install 'bnn-infosharing[lightning]'"
        f" (or pip install lightning): {exc}"
    ) from exc

from trainer.errors import BnnError
from trainer.tracked_run import TrackedRun, _detail
from trainer.tracking import _metric, check_tracked_config, track

__all__ = ["BnnTracking"]


class BnnTracking(Callback):
    """Track a Lightning fit into a run store or a bnn service (see the module docstring).

    Takes :func:`trainer.tracking.track`'s arguments (not ``model``, ``epochs`` and
    ``optimizer``, which come from the Trainer) and ``hparams``: put the module's
    ``hparams`` into the run's configuration (default True).
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        tracking_url: str | None = None,
        data_dir: str | Path | None = None,
        db_url: str | None = None,
        token: str | None = None,
        capture_every: int = 1,
        grad_level: str = "element",
        sink: Any = None,
        heartbeat_interval: float | None = None,
        hparams: bool = True,
        element_every: int = 1,
        stat_bits: int | None = None,
        compress_posteriors: bool | None = None,
    ) -> None:
        super().__init__()
        self.options: dict[str, Any] = {
            "name": name,
            "tags": list(tags) if not isinstance(tags, str) else tags,
            "tracking_url": tracking_url,
            "data_dir": data_dir,
            "db_url": db_url,
            "token": token,
            "capture_every": capture_every,
            "grad_level": grad_level,
            "sink": sink,
            "heartbeat_interval": heartbeat_interval,
            "element_every": element_every,
            "stat_bits": stat_bits,
            "compress_posteriors": compress_posteriors,
        }
        self.config = dict(check_tracked_config(config))
        self.hparams = hparams
        self.run: TrackedRun | None = None
        self._pending: int | None = None  # a finished epoch not logged yet

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run, self._pending = None, None
        if not trainer.is_global_zero:
            return
        max_epochs = trainer.max_epochs
        planned = max_epochs if isinstance(max_epochs, int) and max_epochs >= 1 else None
        config = {**self._hparams(pl_module, planned), **self.config}
        self.run = track(
            pl_module, config=config, epochs=planned, handle_sigterm=False, **self.options
        )

    def _hparams(self, pl_module: LightningModule, planned: int | None) -> dict[str, Any]:
        """The module's hparams that a run configuration can hold (others left out)."""
        out: dict[str, Any] = {}
        if not self.hparams:
            return out
        for key, value in dict(getattr(pl_module, "hparams", {}) or {}).items():
            try:
                out.update(check_tracked_config({str(key): value}))
            except BnnError:
                continue
        if planned is not None and out.get("epochs") not in (None, planned):
            del out["epochs"]  # the Trainer's max_epochs is what the fit runs
        return out

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        if self.run is not None:
            self.run.step()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.run is not None:
            self._pending = trainer.current_epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: Trainer) -> None:
        """Log the finished epoch with the scalar callback metrics there are now."""
        if self.run is None or self._pending is None:
            return
        epoch, self._pending = self._pending, None
        metrics: dict[str, float] = {}
        for key, value in trainer.callback_metrics.items():
            try:
                metrics[str(key)] = _metric(str(key), value)
            except BnnError:
                continue  # not a scalar
        self.run.log_epoch(epoch, metrics)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.run is not None:
            self.run.finish()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        run = self.run
        if run is None or run.status is not None:
            return
        if isinstance(exception, KeyboardInterrupt | SystemExit):
            if self._pending is not None and run.pending_steps == 0:
                self._flush(trainer)  # the epoch had ended (Lightning stops at epoch ends)
            why = (
                "interrupted by the user (KeyboardInterrupt)"
                if isinstance(exception, KeyboardInterrupt)
                else f"terminated ({_detail(exception)})"
            )
            run.finish("interrupted", why)
        else:
            run.finish("failed", _detail(exception))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.run is not None and self.run.status is None:  # fit ended without on_fit_end
            self.run.finish("interrupted", "the fit ended without finishing (teardown)")
