"""The ELBO training loop.

Each step minimises ``loss = NLL + kl_weight_t * (KL + prior_penalty) / N_train`` (the one
formula, see :mod:`trainer.layers`), with NLL averaged over the batch and over
``mc_samples`` posterior samples. ``kl_weight_t`` ramps linearly from 0 to ``kl_weight``
(the posterior temperature; 1 is the exact ELBO) over ``kl_anneal_epochs``. The priors'
parameters have an optimiser of their own (``prior_optimizer``, ``prior_lr``).

After each epoch the model is scored on the validation split (``val_*``, ``val_samples``
posterior samples); the epoch with the lowest validation NLL is kept (``model_selection``),
training may stop early (``early_stopping_patience``), and the test split is evaluated once,
at the end, on the selected weights with ``eval_samples`` samples (:mod:`trainer.evaluation`).
Its ``test_*`` metrics and ``selected_epoch`` are stored with the last epoch, whose file also
holds the per-test-example arrays; its parameters are the last epoch's.

Every ``capture_every`` epochs (and at the last epoch) the trainer captures the seed's
distribution parameters, the gradient statistics and the metrics, and hands them to a run sink
(a local :class:`~trainer.store.RunStore`).

Divergence: each step checks, without waiting for the device, whether the loss and every
parameter's gradient are finite (:class:`_DivergenceWatch`); the rows are read once per
epoch. The first bad step (:class:`Divergence`: global step, epoch, first parameter with a
non-finite gradient) is reported to the sink's ``set_divergence`` if it has one. With
``on_divergence="stop"`` (default) the diverging epoch is captured with its metrics (and
gradient statistics when it was due), no test evaluation runs, and the run ends
``diverged``; with ``"continue"`` training goes on as if nothing had happened.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainer import kernels
from trainer.capture import GradientRecorder, epoch_snapshot, is_capture_epoch
from trainer.config import (
    LRSchedule,
    ModelKind,
    ModelSelection,
    OnDivergence,
    Optimizer,
    PriorOptimizer,
    TrainConfig,
    check_device,
    parse_config,
)
from trainer.data import DataSplits, batches, load_dataset, num_batches
from trainer.errors import BnnError, ErrorCode
from trainer.evaluation import Evaluation, final_evaluation, quick_metrics
from trainer.layers import (
    bayesian_layers,
    empirical_bayes_step,
    kl_by_layer,
    model_kl,
    positive,
    prior_penalty,
    resolved_priors,
)
from trainer.metrics import gaussian_nll
from trainer.models import mlp, small_cnn
from trainer.optim import RecordingAdam, record_with
from trainer.priors import EBSchedule, GaussianPrior, LayerPrior, LearnMode, PriorKind
from trainer.snapshot import EpochSnapshot, GradLevel

__all__ = ["Divergence", "RunSink", "TrainResult", "Trainer", "build_model", "train"]


class RunSink(Protocol):
    """Where a trainer reports: a local store, or the service over HTTP.

    A sink may also have ``should_stop(run_id) -> bool``: polled after each epoch, True
    ends the run as cancelled (see :class:`trainer.remote.HttpRunSink`); and
    ``set_divergence(run_id, step=, epoch=, layer=)``: called once, when the run first
    becomes non-finite (see :class:`Divergence`).
    """

    def create_run(self, name: str | None, config: dict[str, Any], tags: Any = ...) -> Any: ...
    def write_epoch(self, run_id: str, snap: EpochSnapshot) -> Any: ...
    def heartbeat(self, run_id: str) -> None: ...
    def set_status(self, run_id: str, status: Any, error: str | None = None) -> Any: ...


@dataclass(frozen=True)
class Divergence:
    """Where a run's training first became non-finite.

    ``step`` is the global 0-based training step (one per batch) whose loss or gradients were
    non-finite, ``epoch`` its epoch, ``layer`` the first parameter (in the model's order, the
    likelihood's ``noise_rho`` last) whose gradient was non-finite at that step, None when
    only the loss was. A non-finite gradient makes the parameters non-finite at that step's
    update. When the loss itself is non-finite, backpropagation usually makes every gradient
    non-finite, so ``layer`` then names the model's first parameter rather than a culprit.
    """

    step: int
    epoch: int
    layer: str | None
    loss_finite: bool = False

    def describe(self) -> str:
        """E.g. "non-finite loss at step 12 (epoch 0); first non-finite gradient: layer1..."."""
        what = "gradient" if self.loss_finite else "loss"
        where = f"; first non-finite gradient: {self.layer}" if self.layer else ""
        return f"non-finite {what} at step {self.step} (epoch {self.epoch}){where}"


@dataclass
class TrainResult:
    """What :func:`train` returns: the run id (when stored), the model and the metric history."""

    run_id: str | None
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    captured_epochs: list[int] = field(default_factory=list)
    noise_sigma: float | None = None
    cancelled: bool = False  # the sink asked to stop before the last epoch
    selected_epoch: int | None = None  # whose weights the test metrics are of
    evaluation: Evaluation | None = None  # the final test evaluation
    divergence: Divergence | None = None  # where training first became non-finite
    diverged: bool = False  # stopped because of it (on_divergence="stop")
    refused_epochs: dict[int, str] = field(default_factory=dict)  # non-finite, sink said no

    @property
    def status(self) -> str:
        """The run's final status: "diverged", "cancelled" or "completed"."""
        if self.diverged:
            return "diverged"
        return "cancelled" if self.cancelled else "completed"


def build_model(config: TrainConfig, data: DataSplits) -> nn.Module:
    """The Bayesian network a configuration describes, sized for the data."""
    prior = config.prior_spec()
    if config.model is ModelKind.CNN:
        return small_cnn(
            in_channels=1,
            num_classes=data.num_outputs,
            prior=prior,
            posterior_sigma_init=config.posterior_sigma_init,
        )
    in_features = int(math.prod(data.input_shape))
    return mlp(
        in_features,
        config.hidden,
        data.num_outputs,
        prior,
        activation=config.activation,
        local_reparam=config.local_reparam,
        posterior_sigma_init=config.posterior_sigma_init,
    )


def _resolve_device(name: str) -> torch.device:
    """The torch device of ``config.device``; INVALID_ARGUMENT when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


class _Heartbeat:
    """Calls ``sink.heartbeat(run_id)`` every ``interval`` seconds on a daemon thread."""

    def __init__(self, sink: RunSink, run_id: str, interval: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(sink, run_id, interval), daemon=True
        )

    def _beat(self, sink: RunSink, run_id: str, interval: float) -> None:
        while not self._stop.wait(interval):
            with suppress(Exception):  # a missed beat is harmless; the next one retries
                sink.heartbeat(run_id)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def write_epoch_to(
    sink: RunSink, run_id: str, snap: EpochSnapshot, *, diverged: bool, refused: dict[int, str]
) -> tuple[bool, Any]:
    """``sink.write_epoch`` -> (stored, the sink's answer). A sink that refuses an epoch taken
    after the run diverged (CORRUPT or INVALID_ARGUMENT: e.g. a service that takes only finite
    parameters) leaves it out: (False, None), the reason in ``refused``, and the run goes on
    to end as it would have. Any other error is raised."""
    try:
        return True, sink.write_epoch(run_id, snap)
    except BnnError as exc:
        if not diverged or exc.code not in (ErrorCode.CORRUPT, ErrorCode.INVALID_ARGUMENT):
            raise
        refused[snap.epoch] = exc.message
        return False, None


class _EpochWriter:
    """Writes captured epochs on a background thread, one at a time and in order, while the
    next epoch trains.

    ``submit`` first waits for the previous write (so at most one epoch is in flight and two
    snapshots are in memory) and raises its error, if it had one; ``wait`` does the same at
    the end of the run. ``ready`` (optional) runs on the writer thread before the write: the
    trainer passes the CUDA event of the epoch's asynchronous device-to-host copies. An epoch
    counts as captured (``on_done``) only once the sink has written, fsynced and catalogued
    it, exactly as when the write ran inline; a process killed meanwhile leaves what any
    killed writer leaves (a temp file or an uncatalogued file that ``fsck`` repairs).
    """

    def __init__(
        self,
        write: Callable[[EpochSnapshot], bool],
        on_done: Callable[[int], None],
        *,
        background: bool = True,
    ) -> None:
        self._write, self._on_done, self.background = write, on_done, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, snap: EpochSnapshot, ready: Callable[[], None] | None) -> None:
        try:
            if ready is not None:
                ready()
            if self._write(snap):
                self._on_done(snap.epoch)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def submit(self, snap: EpochSnapshot, ready: Callable[[], None] | None = None) -> None:
        self.wait()
        if not self.background:
            self._run(snap, ready)
            self.wait()
            return
        self._thread = threading.Thread(
            target=self._run, args=(snap, ready), name=f"bnn-epoch-{snap.epoch}", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Wait for the write in flight; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def settle(self) -> None:
        """Wait for the write in flight while another error is on its way (its own error,
        if any, is dropped: the run fails or is interrupted anyway)."""
        with suppress(BaseException):
            self.wait()


class _DivergenceWatch:
    """Finds the first training step whose loss or gradients are non-finite, without making
    any step wait for the device.

    :meth:`observe` (after ``backward``) writes one row per step into a device tensor: whether
    the loss and each watched parameter's largest absolute gradient are finite (one fused
    ``_foreach_norm`` on CUDA; the maximum cannot overflow, so only NaN/Inf count; on the CPU
    a one-pass count of NaN/Inf, :func:`trainer.kernels.count_nonfinite`).
    :meth:`first` reads the rows once, when asked (at the end of an epoch).
    """

    def __init__(self, named: Sequence[tuple[str, Tensor]], device: torch.device) -> None:
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.device = device
        self._zero = torch.zeros((), device=device)
        self._rows = torch.ones((0, 1 + len(self.params)), dtype=torch.bool, device=device)
        self._n = 0

    def start(self, steps: int) -> None:
        """Begin a window of (about) ``steps`` steps."""
        shape = (max(1, steps), 1 + len(self.params))
        if self._rows.shape != shape:
            self._rows = torch.ones(shape, dtype=torch.bool, device=self.device)
        self._n = 0

    @torch.no_grad()
    def observe(self, loss: Tensor) -> None:
        """Record one step (its gradients must be in place)."""
        grads = [p.grad if p.grad is not None else self._zero for p in self.params]
        if self.device.type == "cpu" and all(kernels.usable(g) for g in grads):
            # the CPU kernels' one-pass count; _foreach_norm(inf) took 15 ms per step here
            row = torch.tensor(
                [math.isfinite(float(loss)), *(kernels.count_nonfinite(g) == 0 for g in grads)]
            )
        else:
            largest = torch._foreach_norm(grads, math.inf) if grads else []
            row = torch.isfinite(torch.stack([loss.detach().reshape(()).float(), *largest]))
        if self._n == self._rows.shape[0]:  # more steps than planned: grow the window
            self._rows = torch.cat([self._rows, torch.ones_like(self._rows)])
        self._rows[self._n] = row
        self._n += 1

    def first(self, epoch: int, step0: int) -> Divergence | None:
        """The window's first bad step (``step0`` is the global step of its first row)."""
        if self._n == 0:
            return None
        rows = self._rows[: self._n]
        bad = ~rows.all(dim=1)
        if not bool(bad.any()):  # the one wait for the device per window
            return None
        index = int(bad.to(torch.int8).argmax())
        ok = rows[index].tolist()
        layer = next((n for n, fine in zip(self.names, ok[1:], strict=True) if not fine), None)
        return Divergence(step=step0 + index, epoch=epoch, layer=layer, loss_finite=ok[0])


_FUSED_DEVICES = frozenset({"cpu", "cuda"})
#: A training split up to this size is kept in GPU memory for the whole run.
_DEVICE_DATA_MAX_BYTES = 2 << 30


def _adam(
    kind: type[torch.optim.Adam] | type[torch.optim.AdamW],
    params: Sequence[Tensor],
    lr: float,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """``kind`` with ``fused=True`` when every parameter is a floating tensor on a CPU or CUDA
    device (where PyTorch has the fused kernel), else with ``foreach=True``. On the CPU it is
    :class:`~trainer.optim.RecordingAdam` (the same update, in one pass of the fused kernels,
    which also takes a captured step's gradient statistics; AdamW as its decoupled form)."""
    fused = bool(params) and all(
        p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params
    )
    foreach = None if fused else True
    if params and all(p.device.type == "cpu" for p in params):
        decoupled = issubclass(kind, torch.optim.AdamW)
        return RecordingAdam(
            params,
            lr=lr,
            weight_decay=weight_decay,
            fused=fused,
            foreach=foreach,
            decoupled_weight_decay=decoupled,
        )
    return kind(params, lr=lr, weight_decay=weight_decay, fused=fused, foreach=foreach)


#: ``Trainer(compile=...)``: torch.compile modes (see :func:`_compiled`)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compiled(
    fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, ...]], mode: str, device: torch.device
) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
    """``fn`` (a step's forward passes, KL and loss) through :func:`torch.compile`.

    Inductor fuses the Bayesian layers' elementwise work (softplus, the weight draw, the
    KL's terms) forward and backward into a few kernels; on a GPU, ``"reduce-overhead"``
    also records the step into a CUDA graph (one launch per step). The backward pass,
    the fused optimiser and the ``_foreach`` gradient statistics follow without a host
    synchronisation. Random numbers come from inductor's own generator, so a compiled run
    is not bit-identical to an eager one with the same seed. On this project's 2-core CPU
    the compiled step was slower than the eager one (see BENCHMARKS.md): compile for GPUs.
    """
    if mode not in COMPILE_MODES:
        raise BnnError.invalid(
            f"compile must be one of {', '.join(COMPILE_MODES)} (got {mode!r})", compile=mode
        )
    if mode == "reduce-overhead" and device.type != "cuda":
        raise BnnError.invalid(
            f"compile='reduce-overhead' records CUDA graphs and needs a CUDA device "
            f"(the run is on {device.type!r})",
            compile=mode,
        )
    compiled: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, ...]] = torch.compile(
        fn, mode=mode, dynamic=False
    )
    return compiled


class Trainer:
    """Trains one configuration; :meth:`fit` runs every epoch and reports to the sink.

    ``background_writes`` (default True): captured epochs are written by a background
    thread while the next epoch trains (:class:`_EpochWriter`). ``compile``: one of
    :data:`COMPILE_MODES` to :func:`torch.compile` the training step (GPU runs).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        sink: RunSink | None = None,
        data: DataSplits | None = None,
        data_root: str | Path | None = None,
        progress: bool = True,
        heartbeat_interval: float = 5.0,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        background_writes: bool = True,
        compile: str | None = None,
    ) -> None:
        self.config = config
        self.background_writes = background_writes
        self.sink = sink
        self.progress = progress
        self.heartbeat_interval = heartbeat_interval
        self.on_epoch = on_epoch
        self.device = _resolve_device(config.device)
        if self.device.type == "cpu":
            kernels.tune_allocator()
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.data = data or load_dataset(
            config.dataset.value,
            flatten=config.model is ModelKind.MLP,
            n_train=config.n_train,
            n_test=config.n_test,
            n_val=config.n_val,
            seed=config.seed,
            root=data_root,
        )
        self.model = build_model(config, self.data).to(self.device)
        self.noise_rho: nn.Parameter | None = None
        params = list(self.model.parameters())
        if not self.data.classification:
            # homoscedastic Gaussian likelihood with a learned noise sigma (initially 0.5)
            init = torch.log(torch.expm1(torch.tensor([0.5])))
            self.noise_rho = nn.Parameter(init.to(self.device))
            params.append(self.noise_rho)
        prior_ids = {
            id(p) for m in self.model.modules() if isinstance(m, LayerPrior) for p in m.parameters()
        }
        self.optimizer = self._make_optimizer([p for p in params if id(p) not in prior_ids])
        self.prior_optimizer = self._make_prior_optimizer(
            [p for p in params if id(p) in prior_ids and p.requires_grad]
        )
        self.scheduler = self._make_scheduler()
        self.recorder = GradientRecorder(
            self.model, config.grad_capture, element_every=config.element_every
        )
        learnable = config.prior is PriorKind.LEARNABLE
        self.eb_mode = learnable and config.prior_mode is LearnMode.EMPIRICAL_BAYES
        self.laplace_mode = learnable and config.prior_mode is LearnMode.LAPLACE
        self.config = config.model_copy(update={"resolved_priors": resolved_priors(self.model)})
        watched = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.noise_rho is not None:
            watched.append(("noise_rho", self.noise_rho))
        self._watch = _DivergenceWatch(watched, self.device)
        self._objective: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, ...]] = (
            self._step_objective
        )
        if compile is not None:
            self._objective = _compiled(self._step_objective, compile, self.device)
        self._copies_ready: Callable[[], None] | None = None
        self._device_data: tuple[Tensor, Tensor] | None = None
        self.global_step = 0  # training steps taken so far
        self.divergence: Divergence | None = None  # the first one (set by train_epoch)

    # -- set-up ---------------------------------------------------------------------------
    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        # multi-tensor updates: fused Adam/AdamW (one kernel for all parameters) where the
        # parameters allow it, else foreach (one kernel per formula, not one per parameter).
        # PyTorch picks foreach on CUDA but neither on CPU, where the per-parameter loop cost
        # a small regression run 18% (foreach) and 28% (fused) of its time
        c = self.config
        trainable = [p for p in params if p.requires_grad]
        if c.optimizer is Optimizer.SGD:
            return torch.optim.SGD(
                trainable,
                lr=c.learning_rate,
                momentum=c.momentum,
                weight_decay=c.weight_decay,
                foreach=True,
            )
        kind = torch.optim.AdamW if c.optimizer is Optimizer.ADAMW else torch.optim.Adam
        return _adam(kind, trainable, c.learning_rate, c.weight_decay)

    def _make_prior_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        """The prior parameters' own optimiser (None when no prior is learned by gradient)."""
        if not params:
            return None
        c = self.config
        lr = c.prior_lr if c.prior_lr is not None else c.learning_rate
        if c.prior_optimizer is PriorOptimizer.SGD:
            return torch.optim.SGD(params, lr=lr, foreach=True)
        return _adam(torch.optim.Adam, params, lr)

    def _prior_updates_on(self, epoch: int) -> bool:
        """Empirical-Bayes and Laplace updates start after ``prior_burnin_epochs``."""
        return epoch >= self.config.prior_burnin_epochs

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        c = self.config
        if c.lr_schedule is LRSchedule.COSINE:
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=c.epochs)
        if c.lr_schedule is LRSchedule.STEP:
            milestones = sorted({max(1, c.epochs // 2), max(1, (3 * c.epochs) // 4)})
            return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, gamma=0.1)
        return None

    @property
    def noise_sigma(self) -> float | None:
        return None if self.noise_rho is None else float(positive(self.noise_rho.detach()))

    def _train_tensors(self) -> tuple[Tensor, Tensor]:
        """The training split where the steps read it from: on a GPU, the whole split in
        device memory when it takes at most ``_DEVICE_DATA_MAX_BYTES`` (no host-to-device
        copy per step at all), else in pinned host memory (asynchronous copies)."""
        if self._device_data is None:
            x, y = self.data.x_train, self.data.y_train
            if self.device.type == "cuda":
                size = x.element_size() * x.numel() + y.element_size() * y.numel()
                if size <= _DEVICE_DATA_MAX_BYTES:
                    x, y = x.to(self.device), y.to(self.device)
                else:
                    x, y = x.pin_memory(), y.pin_memory()
            self._device_data = (x, y)
        return self._device_data

    def kl_weight_at(self, epoch: int) -> float:
        """The KL weight used during ``epoch`` (linear annealing over ``kl_anneal_epochs``)."""
        c = self.config
        if c.kl_anneal_epochs <= 0:
            return c.kl_weight
        return c.kl_weight * min(1.0, (epoch + 1) / c.kl_anneal_epochs)

    # -- one step / epoch -----------------------------------------------------------------
    def _nll(self, out: Tensor, y: Tensor) -> Tensor:
        if self.data.classification:
            return F.cross_entropy(out, y)
        assert self.noise_rho is not None
        variance = positive(self.noise_rho).square()
        return gaussian_nll(out, variance, y).mean()

    def _step_objective(self, xb: Tensor, yb: Tensor, kl_w: Tensor) -> tuple[Tensor, ...]:
        """(loss, NLL, fit) of one mini-batch: ``mc_samples`` forward passes, the KL and the
        hyperprior term; ``fit`` is the number correct (classification) or the sum of
        squared errors over the samples. What ``compile`` hands to :func:`torch.compile`."""
        c, model = self.config, self.model
        nll = torch.zeros((), device=self.device)
        fit = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(c.mc_samples):
            out = model(xb)
            nll = nll + self._nll(out, yb)
            with torch.no_grad():
                if self.data.classification:
                    fit += (out.argmax(1) == yb).sum()
                else:
                    fit += ((out - yb) ** 2).sum()
        nll = nll / c.mc_samples
        reg = model_kl(model) + prior_penalty(model)
        return nll + kl_w * reg / self.data.n_train, nll, fit

    def train_epoch(self, epoch: int, capture: bool) -> dict[str, float]:
        c = self.config
        model, n_train = self.model, self.data.n_train
        model.train()
        kl_w = self.kl_weight_at(epoch)
        eb_on = self.eb_mode and self._prior_updates_on(epoch)
        record = capture and self.recorder.level is not GradLevel.NONE
        if record:
            self.recorder.reset()
        # running sums stay on the device: no step waits for a GPU to report a number
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, nll, fit
        seen = 0
        watch = self._watch if self.divergence is None else None  # only the first counts
        if watch is not None:
            watch.start(num_batches(n_train, c.batch))
        step0 = self.global_step
        kl_w_t = torch.tensor(kl_w, device=self.device)  # a tensor: one compiled graph per run
        x_train, y_train = self._train_tensors()
        for xb, yb in batches(x_train, y_train, c.batch, shuffle=True, generator=self.generator):
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            if self.prior_optimizer is not None:
                self.prior_optimizer.zero_grad(set_to_none=True)
            loss, nll, fit = self._objective(xb, yb, kl_w_t)
            loss.backward()
            if watch is not None:
                watch.observe(loss)
            self.global_step += 1
            if record:  # raw gradients: before clipping, in the optimiser's pass where it can
                if c.grad_clip is None:
                    record_with(self.optimizer, self.recorder)
                else:
                    self.recorder.record_step()
            if c.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            self.optimizer.step()
            if self.prior_optimizer is not None:
                self.prior_optimizer.step()
            if eb_on and c.eb_every is EBSchedule.STEP:
                empirical_bayes_step(model)
            b = xb.shape[0]
            seen += b
            sums += torch.stack([loss.detach() * b, nll.detach() * b, fit / c.mc_samples])
        if watch is not None:
            self.divergence = watch.first(epoch, step0)
        # a run about to stop as diverged skips the epoch's prior updates (on NaN weights)
        stopping = self.divergence is not None and c.on_divergence is OnDivergence.STOP
        if eb_on and c.eb_every is EBSchedule.EPOCH and not stopping:
            empirical_bayes_step(model)
        burnt_in = epoch - c.prior_burnin_epochs
        if self.laplace_mode and burnt_in >= 0 and burnt_in % c.laplace_every == 0 and not stopping:
            self.laplace_update(epoch)
        if self.scheduler is not None:
            self.scheduler.step()
        loss_sum, nll_sum, fit_sum = sums.tolist()
        metrics = {"loss": loss_sum / seen, "nll": nll_sum / seen, "kl_weight": kl_w}
        if self.data.classification:
            metrics["train_acc"] = fit_sum / seen
        else:
            metrics["train_rmse"] = math.sqrt(fit_sum / seen)
        with torch.no_grad():
            per_layer = kl_by_layer(model)
            metrics["kl"] = float(sum(float(v) for v in per_layer.values()))
            for name, value in per_layer.items():
                metrics[f"kl/{name}"] = float(value)
            metrics["prior_penalty"] = float(prior_penalty(model))
        # the untempered ELBO per training example (epoch-average likelihood term)
        metrics["elbo"] = -(metrics["nll"] + (metrics["kl"] + metrics["prior_penalty"]) / n_train)
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self.noise_sigma is not None:
            metrics["noise_sigma"] = self.noise_sigma
        return metrics

    def laplace_update(self, epoch: int) -> None:
        """Set every Laplace-mode prior's sigma from the GGN marginal likelihood (see
        :func:`trainer.laplace.laplace_prior_sigmas`)."""
        from trainer.laplace import laplace_prior_sigmas

        sigmas = laplace_prior_sigmas(
            self.model,
            self.data.x_train,
            self.data.y_train,
            likelihood="classification" if self.data.classification else "regression",
            noise_sigma=self.noise_sigma,
            max_examples=self.config.laplace_examples,
            seed=self.config.seed + epoch,
        )
        for name, layer in bayesian_layers(self.model):
            for which, prior in layer.priors().items():
                if isinstance(prior, GaussianPrior) and prior.mode is LearnMode.LAPLACE:
                    prior.set_sigma_(sigmas[name][which])

    def validate(self) -> dict[str, float]:
        """``val_*`` metrics from ``val_samples`` passes ({} without a validation split)."""
        d = self.data
        if not d.has_validation:
            return {}
        assert d.x_val is not None and d.y_val is not None
        return quick_metrics(
            self.model,
            d.x_val,
            d.y_val,
            classification=d.classification,
            samples=self.config.val_samples,
            device=self.device,
            noise_sigma=self.noise_sigma,
        )

    def evaluate(self, samples: int | None = None) -> Evaluation:
        """The test metrics of the current weights (``eval_samples`` samples by default)."""
        return final_evaluation(
            self.model,
            self.data,
            samples=samples or self.config.eval_samples,
            device=self.device,
            noise_sigma=self.noise_sigma,
        )

    def snapshot(self, epoch: int, metrics: dict[str, float], recorded: bool) -> EpochSnapshot:
        """The epoch's capture. On a GPU its arrays are copied to the host asynchronously:
        valid once :meth:`_host_copy_ready`'s function has run (the epoch writer runs it)."""
        recorder = self.recorder if recorded else None
        snap, self._copies_ready = epoch_snapshot(self.model, epoch, metrics, recorder, self.device)
        snap.stat_bits = self.config.stat_bits  # None: the environment's (BNN_STAT_BITS)
        snap.compress_posteriors = self.config.compress_posteriors
        return snap

    def _host_copy_ready(self) -> Callable[[], None] | None:
        """What waits for the last snapshot's device-to-host copies (None: nothing to wait for)."""
        ready, self._copies_ready = self._copies_ready, None
        return ready

    # -- the run --------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        c = self.config
        run_id: str | None = None
        if self.sink is not None:
            from trainer.store._write import env_format

            env_format()  # the epoch files' format from the environment, before the run exists
            run = self.sink.create_run(c.name, c.to_json_dict(), tags=c.tags)
            run_id = run.id
            if (recover := getattr(self.sink, "recover_run", None)) is not None:
                recover(run_id)  # dead temp files of an earlier writer of this run
        result = TrainResult(run_id=run_id, model=self.model)
        if self.eb_mode and self._prior_updates_on(0):
            empirical_bayes_step(self.model)
        steps = num_batches(self.data.n_train, c.batch)
        should_stop = getattr(self.sink, "should_stop", None)
        writer = _EpochWriter(
            functools.partial(self._write_epoch, run_id, result=result),
            result.captured_epochs.append,
            background=self.background_writes,
        )
        desc = f"{c.dataset.value} {c.prior.value}" + (f" [{run_id}]" if run_id else "")
        try:
            with (
                _Heartbeat(self.sink, run_id, self.heartbeat_interval)
                if self.sink and run_id
                else nullcontext()
            ):
                bar = tqdm(
                    range(c.epochs), desc=desc, unit="epoch", disable=not self.progress, leave=False
                )
                best = _Best()
                for epoch in bar:
                    t0 = time.perf_counter()
                    planned = is_capture_epoch(epoch, c.capture_every, last_epoch=c.epochs - 1)
                    known = self.divergence
                    metrics = self.train_epoch(epoch, planned)
                    diverged = self.divergence is not None and known is None
                    if diverged:
                        self._report_divergence(run_id, result)
                    result.diverged = diverged and c.on_divergence is OnDivergence.STOP
                    if self.divergence is None or self._weights_finite():
                        metrics.update(self.validate())  # (none on non-finite weights)
                    best.update(epoch, metrics.get("val_nll"), self)
                    stop_early = best.stale(epoch, c.early_stopping_patience)
                    last = epoch == c.epochs - 1 or stop_early or result.diverged
                    metrics["epoch_time_s"] = time.perf_counter() - t0
                    metrics["steps"] = float(steps)
                    snap = None
                    if planned or last:  # an early stop is captured, without gradients
                        recorded = planned and self.recorder.level is not GradLevel.NONE
                        snap = self.snapshot(epoch, metrics, recorded=recorded)
                    if last and not result.diverged:  # a diverged run has no test metrics
                        self._final_test(epoch, best, metrics, result, snap)
                    result.history.append({"epoch": float(epoch), **metrics})
                    if snap is not None:
                        writer.submit(snap, self._host_copy_ready())
                    key = "acc" if self.data.classification else "rmse"
                    shown = metrics.get(f"val_{key}", metrics.get(f"train_{key}", math.nan))
                    bar.set_postfix({"loss": f"{metrics['loss']:.4g}", key: f"{shown:.4g}"})
                    if self.on_epoch is not None:
                        self.on_epoch(epoch, metrics)
                    if last:
                        break
                    if should_stop is not None and run_id is not None and should_stop(run_id):
                        result.cancelled = True
                        break
                writer.wait()  # the last epoch is written before the run's status
        except KeyboardInterrupt:
            writer.settle()
            self._finish(run_id, "interrupted", "interrupted by the user (KeyboardInterrupt)")
            raise
        except BaseException as exc:
            writer.settle()
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._finish(run_id, "failed", detail)
            raise
        if result.diverged:
            assert result.divergence is not None
            why = result.divergence.describe()
            for epoch, reason in result.refused_epochs.items():
                why += f"; epoch {epoch} was not stored: {reason}"
            self._finish(run_id, "diverged", why, strict=True)
        else:
            self._finish(run_id, result.status, None)
        result.noise_sigma = self.noise_sigma
        return result

    def _write_epoch(self, run_id: str | None, snap: EpochSnapshot, *, result: TrainResult) -> bool:
        """Hand a captured epoch to the sink (:func:`write_epoch_to`); False when refused."""
        if self.sink is None or run_id is None:
            return True
        stored, _ = write_epoch_to(
            self.sink,
            run_id,
            snap,
            diverged=self.divergence is not None,
            refused=result.refused_epochs,
        )
        return stored

    def _weights_finite(self) -> bool:
        """Whether every parameter (and the noise scale) is finite (waits for the device)."""
        params = [
            *self.model.parameters(),
            *([self.noise_rho] if self.noise_rho is not None else []),
        ]
        with torch.no_grad():
            return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())

    def _report_divergence(self, run_id: str | None, result: TrainResult) -> None:
        """Keep the first divergence in ``result`` and tell a sink that records it."""
        assert self.divergence is not None
        result.divergence = d = self.divergence
        record = getattr(self.sink, "set_divergence", None)
        if record is not None and run_id is not None:
            record(run_id, step=d.step, epoch=d.epoch, layer=d.layer)

    def _final_test(
        self,
        epoch: int,
        best: _Best,
        metrics: dict[str, float],
        result: TrainResult,
        snap: EpochSnapshot | None,
    ) -> None:
        """Evaluate the test split once, on the weights ``model_selection`` picks (not at all
        with ``skip_test``, as for a study's tuning runs)."""
        selected = epoch
        if self.config.model_selection is ModelSelection.BEST_VAL and best.state is not None:
            best.restore(self)
            selected = best.epoch
        metrics["selected_epoch"] = float(selected)
        result.selected_epoch = selected
        # non-finite weights (on_divergence="continue") have no test metrics
        skip = self.config.skip_test or (self.divergence is not None and not self._weights_finite())
        evaluation = None if skip else self.evaluate()
        if evaluation is not None:
            metrics.update(evaluation.metrics)
            result.evaluation = evaluation
        if snap is not None:
            snap.metrics = dict(metrics)
            snap.evaluation = None if evaluation is None else dict(evaluation.per_example)

    def _finish(
        self, run_id: str | None, status: str, error: str | None, *, strict: bool = False
    ) -> None:
        """Report the final status; a failed update is raised for a run that ended on its own
        (``error`` None, or ``strict``), swallowed while another error is on its way."""
        if self.sink is None or run_id is None:
            return
        try:
            self.sink.set_status(run_id, status, error=error)
        except Exception:
            if error is None or strict:  # the run ended by itself: a lost status must be seen
                raise


class _Best:
    """The epoch with the lowest validation NLL so far and a copy of its weights."""

    def __init__(self) -> None:
        self.epoch = -1
        self.value = math.inf
        self.state: dict[str, Any] | None = None

    def update(self, epoch: int, val_nll: float | None, trainer: Trainer) -> None:
        if val_nll is None or not math.isfinite(val_nll) or val_nll >= self.value:
            return
        self.epoch, self.value = epoch, val_nll
        if trainer.config.model_selection is ModelSelection.BEST_VAL:
            self.state = {
                "model": copy.deepcopy(trainer.model.state_dict()),
                "noise_rho": None
                if trainer.noise_rho is None
                else trainer.noise_rho.detach().clone(),
            }

    def stale(self, epoch: int, patience: int | None) -> bool:
        """True when ``patience`` epochs have passed without a better validation NLL."""
        return patience is not None and self.epoch >= 0 and epoch - self.epoch >= patience

    def restore(self, trainer: Trainer) -> None:
        assert self.state is not None
        trainer.model.load_state_dict(self.state["model"])
        if trainer.noise_rho is not None and self.state["noise_rho"] is not None:
            with torch.no_grad():
                trainer.noise_rho.copy_(self.state["noise_rho"])


def train(
    config: TrainConfig | dict[str, Any] | None = None,
    *,
    sink: RunSink | None = None,
    progress: bool = True,
    compile: str | None = None,
    **overrides: Any,
) -> TrainResult:
    """Validate ``config`` (plus keyword overrides), train, report to ``sink``
    (``compile``: see :class:`Trainer`)."""
    cfg = parse_config(config, **overrides)
    return Trainer(cfg, sink=sink, progress=progress, compile=compile).fit()
