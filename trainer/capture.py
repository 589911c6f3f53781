"""Capture of posterior/prior parameters and gradient statistics during training.

``get_all_distribution_params`` is the seed's function: one epoch of its
``distribution_log``. :class:`GradientRecorder` accumulates, over one epoch's steps,
per element of every posterior parameter (``mu`` and ``rho``) the mean and max of |g|
and the count of non-finite values, the per-step gradient norm of each layer, and the
per-step gradients of learnable prior parameters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainer import kernels
from trainer.errors import BnnError
from trainer.layers import BayesianLayer, bayesian_layers
from trainer.snapshot import EpochSnapshot, GradLevel, LayerLog

__all__ = [
    "GradientRecorder",
    "HostCopies",
    "epoch_snapshot",
    "get_all_distribution_params",
    "is_capture_epoch",
]

_KINDS = ("weight", "bias")


def is_capture_epoch(epoch: int, step_size: int, *, last_epoch: int | None = None) -> bool:
    """Epochs 0, N, 2N, ... are captured, and the last epoch always."""
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    return epoch % step_size == 0 or (last_epoch is not None and epoch == last_epoch)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


class HostCopies:
    """The device-to-host copies of one capture.

    On the CPU (or with ``asynchronous=False``) each array is copied at once. On a CUDA
    device the copies are queued, non-blocking, into pinned host memory on the current
    stream, behind the kernels that computed the values and ahead of the next optimiser
    step that changes them: the arrays are valid once the function :meth:`ready` returns
    has been called (the trainer's epoch writer calls it on its own thread), and training
    never waits for them.
    """

    def __init__(self, device: torch.device | str, *, asynchronous: bool = True) -> None:
        self.device = torch.device(device)
        self.asynchronous = asynchronous and self.device.type == "cuda"

    def __call__(
        self, t: Tensor, dtype: torch.dtype = torch.float32, *, fresh: bool = False
    ) -> np.ndarray:
        """``t`` on the host as ``dtype``; ``fresh``: ``t`` is a temporary nothing else
        holds, so a CPU tensor of that dtype is handed over as it is, not copied."""
        t = t.detach()
        if not self.asynchronous or t.device.type != "cuda":
            if fresh and t.is_cpu and t.dtype == dtype and t.is_contiguous():
                return t.numpy()
            return t.to("cpu", dtype).numpy().copy()
        host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host.numpy()

    def ready(self) -> Callable[[], None] | None:
        """A function that waits until every copy queued so far has landed (None when the
        copies were synchronous)."""
        if not self.asynchronous:
            return None
        event = torch.cuda.Event()
        event.record()
        return event.synchronize


def _layer_log(layer: BayesianLayer, _np: Callable[[Tensor], np.ndarray] = _np) -> LayerLog:
    log: LayerLog = {"posterior": {}, "prior": {}}
    with torch.no_grad():
        log["posterior"]["weight"] = {"mu": _np(layer.weight_mu), "sigma": _np(layer.weight_sigma)}
        wp = layer.weight_prior
        log["prior"]["weight"] = {"mu": _np(wp.mu.reshape(1)), "sigma": _np(wp.sigma.reshape(1))}
        if layer.bias_mu is not None and layer.bias_prior is not None:
            bias_sigma = layer.bias_sigma
            assert bias_sigma is not None
            log["posterior"]["bias"] = {"mu": _np(layer.bias_mu), "sigma": _np(bias_sigma)}
            bp = layer.bias_prior
            log["prior"]["bias"] = {"mu": _np(bp.mu.reshape(1)), "sigma": _np(bp.sigma.reshape(1))}
    return log


def get_all_distribution_params(
    model: nn.Module,
    epoch: int,
    step_size: int = 1,
    *,
    force: bool = False,
    copies: HostCopies | None = None,
) -> dict[str, LayerLog] | None:
    """One epoch of the seed's ``distribution_log`` for every Bayesian layer, or ``None``.

    Returns ``{layer: {"posterior"|"prior": {"weight"|"bias": {"mu", "sigma"}}}}`` with numpy
    arrays (posterior: the parameter's shape; shared prior: shape (1,)) when
    ``epoch % step_size == 0`` or ``force``; ``None`` on other epochs. ``copies`` (the
    trainer's) makes the device-to-host copies asynchronous on a GPU (see
    :class:`HostCopies`); the arrays are then valid only after its ``ready()``.
    """
    if not force and not is_capture_epoch(epoch, step_size):
        return None
    to_host = copies or _np
    return {name: _layer_log(layer, to_host) for name, layer in bayesian_layers(model)}


def epoch_snapshot(
    model: nn.Module,
    epoch: int,
    metrics: dict[str, float],
    recorder: GradientRecorder | None,
    device: torch.device | str,
) -> tuple[EpochSnapshot, Callable[[], None] | None]:
    """One captured epoch of ``model`` (with ``recorder``'s gradient statistics, when given)
    and the function that waits for its device-to-host copies (None when they were
    synchronous; see :class:`HostCopies`): what ``bnn train`` and ``trainer.track`` store."""
    copies = HostCopies(device)
    params = get_all_distribution_params(model, epoch, force=True, copies=copies)
    assert params is not None
    recorded = recorder is not None and recorder.level is not GradLevel.NONE
    if recorder is not None and recorded and recorder.element_every > 1:
        # the steps the sampled per-element mean covers (element_every; the metric
        # ``steps`` counts every step, which the max and the counts cover)
        # into the caller's dict, which the snapshot shares (later test metrics reach it too)
        metrics["element_steps"] = float(recorder.element_steps)
    snap = EpochSnapshot(
        epoch=epoch,
        params=params,
        metrics=metrics,
        gradients=recorder.result(copies) if recorder is not None and recorded else None,
        grad_level=recorder.level if recorder is not None and recorded else GradLevel.NONE,
        layer_types={name: type(layer).__name__ for name, layer in bayesian_layers(model)},
    )
    return snap, copies.ready()


def _bf16_codes(a: Tensor) -> Tensor:
    """The bfloat16 codes (int16) of a float32 tensor of finite values >= 0, as
    :func:`trainer.store.encode_bf16` codes them (``fused.c``'s ``bf16_code``): rounded to
    nearest, ties away from zero, a tiny non-zero value to the smallest code, one that
    would round to Inf to the largest finite one. Monotonic: ``max`` commutes with it."""
    u = a.contiguous().view(torch.int32)
    codes = ((u + 0x8000) >> 16).clamp_(max=0x7F7F)
    return torch.maximum(codes, (u != 0).to(torch.int32)).to(torch.int16)


def _bf16_values(codes: Tensor) -> Tensor:
    """The float32 values of bfloat16 ``codes`` (int16, as :func:`_bf16_codes` makes them)."""
    return codes.to(torch.int32).bitwise_left_shift_(16).view(torch.float32)


class _ParamStats:
    """Running |g| statistics of one posterior parameter tensor.

    Per element (or per tensor at level ``layer``): the sum and max of |g| over the steps whose
    gradient there was finite, and the count of non-finite values. On the CPU a non-finite
    gradient is detected from the tensor's norm (computed anyway), so the common case costs
    three passes; on a GPU the masked path always runs, so no step waits for the device.

    The per-element max is kept at bfloat16 precision, the precision an epoch file stores it
    at (:mod:`trainer.store.hdf5`): on the CPU as int16 bfloat16 codes (``codes``; half the
    memory traffic of a float32 max, which every captured step reads and writes), elsewhere
    in float32, rounded when the epoch's result is taken. Rounding is monotonic, so both
    give the stored value exactly: the rounded largest |g|.

    ``sampled`` (level ``element``, the recorder's ``element_every`` > 1): the per-element
    mean takes fewer steps than the max and the counts (``mean_steps`` of ``steps``), so its
    non-finite gradients are counted apart (``nonfinite_mean``; else it is ``nonfinite``).
    """

    def __init__(self, param: nn.Parameter, level: GradLevel, *, sampled: bool = False) -> None:
        self.param = param
        self.level = level
        element = level is GradLevel.ELEMENT
        shape = param.shape if element else ()
        self.codes = element and param.device.type == "cpu"
        self.sum_abs = torch.zeros(shape, device=param.device, dtype=torch.float32)
        self.max_abs = torch.zeros(
            shape, device=param.device, dtype=torch.int16 if self.codes else torch.float32
        )
        self.nonfinite = torch.zeros(shape, device=param.device, dtype=torch.int32)
        self.nonfinite_mean = (
            torch.zeros(shape, device=param.device, dtype=torch.int32)
            if element and sampled
            else self.nonfinite
        )
        self.steps = 0  # steps recorded (the max and the non-finite counts)
        self.mean_steps = 0  # of which the per-element mean took (all but when sampled)
        # per layer, the kernels' totals of the steps since the last result(), in Python
        # (float64; no torch operation per parameter and step), folded in by result()
        self._fused_sum, self._fused_max, self._fused_bad = 0.0, 0.0, 0
        self.clean = True  # no non-finite gradient can have been counted (known on the CPU)
        self.elements = param.numel()
        self.layer = 0  # the recorder's index of the layer this parameter belongs to
        self._buf: Tensor | None = None

    @property
    def sampled(self) -> bool:
        return self.nonfinite_mean is not self.nonfinite

    def accumulators(self, mean: bool) -> kernels.Accumulators:
        """The per-element accumulators for the CPU kernels (``mean``: this step adds to the
        mean too)."""
        return kernels.Accumulators(
            self.sum_abs if mean else None,
            self.max_abs,
            self.nonfinite,
            self.nonfinite_mean if mean and self.sampled else None,
        )

    def record(self, grad: Tensor, finite: bool | None, mean: bool = True) -> None:
        """Add one step's gradient; ``finite`` None: unknown (check per element, no sync);
        ``mean`` False: a step that the per-element mean skips (``element_every``)."""
        self.steps += 1
        self.mean_steps += mean
        if self.level is GradLevel.ELEMENT:
            if self._buf is None:
                self._buf = torch.empty_like(grad, dtype=torch.float32)
            a = torch.abs(grad, out=self._buf)
            if finite is not True:
                self.clean = False
                ok = torch.isfinite(grad)
                self.nonfinite += ~ok
                if mean and self.sampled:
                    self.nonfinite_mean += ~ok
                a = a.masked_fill_(~ok, 0.0)
            if mean:
                self.sum_abs += a
            torch.maximum(self.max_abs, _bf16_codes(a) if self.codes else a, out=self.max_abs)
            return
        if finite is True:  # |g| into a reused buffer, then two plain reductions
            if self._buf is None:  # (vector_norm with ord=1 / inf is 4-12x slower on the CPU)
                self._buf = torch.empty_like(grad, dtype=torch.float32)
            a = torch.abs(grad, out=self._buf)
            self.sum_abs += a.sum()
            torch.maximum(self.max_abs, a.max(), out=self.max_abs)
            return
        self.clean = False
        ok = torch.isfinite(grad)
        self.nonfinite += (~ok).sum(dtype=torch.int32)
        a = grad.abs().masked_fill_(~ok, 0.0)
        self.sum_abs += a.sum(dtype=torch.float32)
        if a.numel():
            torch.maximum(self.max_abs, a.max(), out=self.max_abs)

    def add_fused(self, result: kernels.GradStats, mean: bool = True) -> float:
        """Count one step whose statistics the CPU kernels computed
        (:func:`trainer.kernels.grad_stats_many`: per element, already added to this
        parameter's accumulators); returns the step's sum of squares. ``mean`` False: a
        step that the per-element mean skips (``element_every``)."""
        sq, sum_abs, max_abs, bad = result
        self.steps += 1
        self.mean_steps += mean
        if bad:
            self.clean = False
        if self.level is not GradLevel.ELEMENT:
            self._fused_sum += sum_abs
            if max_abs > self._fused_max:
                self._fused_max = max_abs
            self._fused_bad += bad
        return sq

    def result(self, copies: HostCopies | None = None) -> dict[str, np.ndarray]:
        if self._fused_sum or self._fused_max or self._fused_bad:  # CPU tensors: no sync
            self.sum_abs += self._fused_sum
            self.max_abs.clamp_(min=self._fused_max)
            self.nonfinite += self._fused_bad
            self._fused_sum, self._fused_max, self._fused_bad = 0.0, 0.0, 0
        to_host = copies or HostCopies(self.sum_abs.device, asynchronous=False)
        if self.level is not GradLevel.ELEMENT:
            finite = (self.steps * self.elements - self.nonfinite).clamp_min(1).to(torch.float32)
            return {
                "mean_abs": to_host(self.sum_abs / finite),
                "max_abs": to_host(self.max_abs),
                "nonfinite": to_host(self.nonfinite, torch.int32),
            }
        max_abs = _bf16_values(self.max_abs if self.codes else _bf16_codes(self.max_abs))
        if self.clean and self.sum_abs.is_cpu:  # every count is the step count: one pass
            # (x / n equals x / a tensor of n's, bit for bit: both are IEEE divisions)
            return {
                "mean_abs": to_host(self.sum_abs / float(max(self.mean_steps, 1)), fresh=True),
                "max_abs": to_host(max_abs, fresh=True),
                "nonfinite": np.zeros(tuple(self.nonfinite.shape), np.int32),
            }
        finite = (self.mean_steps - self.nonfinite_mean).clamp_min(1).to(torch.float32)
        return {
            "mean_abs": to_host(self.sum_abs / finite, fresh=True),
            "max_abs": to_host(max_abs, fresh=True),
            "nonfinite": to_host(self.nonfinite, torch.int32),
        }


class _Rows:
    """Per-step float64 rows (one column per layer) kept in one preallocated device tensor.

    Thousands of small per-step tensors would fragment the heap between the large gradient
    allocations (measured: +4 MB of resident memory per step); one buffer that doubles when
    full does not, and writing into it never waits for a GPU.
    """

    def __init__(self, columns: int, device: torch.device, capacity: int = 512) -> None:
        self.buf = torch.zeros((capacity, columns), dtype=torch.float64, device=device)
        self.n = 0
        self._host: np.ndarray | None = None  # the CPU buffer's numpy view, for Python floats

    def _grow(self) -> None:
        if self.n == self.buf.shape[0]:
            self.buf = torch.cat([self.buf, torch.zeros_like(self.buf)])
            self._host = None

    def _view(self) -> np.ndarray:
        if self._host is None:
            self._host = self.buf.numpy()
        return self._host

    def append(self, row: Tensor) -> None:
        """Add one row (a device tensor of ``columns`` values)."""
        self._grow()
        self.buf[self.n].copy_(row)
        self.n += 1

    def append_values(self, row: list[float]) -> None:
        """Add one row of Python floats (CPU buffers)."""
        self._grow()
        self._view()[self.n] = row
        self.n += 1

    def column(self, j: int, copies: HostCopies | None = None) -> np.ndarray:
        to_host = copies or HostCopies(self.buf.device, asynchronous=False)
        return to_host(self.buf[: self.n, j], torch.float64)


class _Series(_Rows):
    """A per-step float64 series (one column): a learnable prior parameter's gradient."""

    def __init__(self, device: torch.device, capacity: int = 512) -> None:
        super().__init__(1, device, capacity)

    def add(self, value: Tensor | None) -> None:
        """Add the first element of ``value`` (0 for None: no gradient this step)."""
        self._grow()
        if self.buf.is_cpu:  # a Python float into the numpy view: no torch operation but
            # .item() (a learnable prior's parameters are 1-element tensors)
            if value is None:
                first = 0.0
            elif value.numel() == 1:
                first = value.item()
            else:
                first = value.reshape(-1)[0].item()
            self._view()[self.n, 0] = first
        elif value is None:
            self.buf[self.n, 0] = 0.0
        else:
            self.buf[self.n, 0].copy_(value.reshape(-1)[0])
        self.n += 1

    def array(self, copies: HostCopies | None = None) -> np.ndarray:
        return self.column(0, copies)


def validate_element_every(value: object) -> int:
    """``value`` as :class:`GradientRecorder`'s ``element_every`` (an integer >= 1);
    INVALID_ARGUMENT naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BnnError.invalid(f"element_every must be an integer >= 1, got {value!r}")
    return value


class GradientRecorder:
    """Accumulates gradient statistics over one epoch; call :meth:`record_step` after backward.

    Statistics are taken of the raw gradients, before clipping, so exploding gradients stay
    visible. ``level`` ``none`` records nothing, ``layer`` keeps one number per statistic per
    parameter tensor, ``element`` one per element (as large as the parameters themselves).

    On the CPU each gradient's norm tells whether it is finite (the common case then costs
    |g| into a reused buffer, a sum and a maximum); elsewhere one fused ``torch._foreach_*``
    kernel per statistic runs over every parameter of the model at once, with no host
    synchronisation. The per-layer step norms come from the same pass (the squared norms of
    a layer's tensors, summed). (Numba kernels doing it all in one loop were tried: on two
    threads they were 2x slower than these bandwidth-bound torch kernels; BENCHMARKS.md.)

    ``element_every`` N > 1 (level ``element``, sampled): each element's mean |g| takes only
    steps 0, N, 2N, ... of the epoch (``element_steps`` of them; an unbiased estimate of the
    mean over every step), which divides the cost of its float32 sum (two thirds of the
    per-element accumulators' bytes) by about N. Everything else still takes every step,
    exactly: each element's max |g| and non-finite count, the step norms, the per-layer
    statistics and the prior gradients, so a spike on any step is in that weight's max.
    """

    def __init__(
        self,
        model: nn.Module,
        level: GradLevel | str = GradLevel.ELEMENT,
        *,
        element_every: int = 1,
    ) -> None:
        self.level = GradLevel(level)
        self.element_every = validate_element_every(element_every)
        self.element_steps = 0  # steps of this epoch that the per-element mean covers
        self._step = 0  # steps recorded this epoch
        self.layers = bayesian_layers(model)
        self._stats: list[_ParamStats] = []
        self._by_layer: dict[str, dict[str, dict[str, _ParamStats]]] = {}
        self._norms: _Rows | None = None
        self._prior: dict[str, dict[str, dict[str, _Series]]] = {}
        self._index: Tensor | None = None
        self._plan: dict[int, _ParamStats] | None = None
        self._cpu: bool | None = None
        self._prior_params: list[tuple[nn.Parameter, _Series]] = []
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self._step = self.element_steps = 0
        self._stats, self._by_layer, self._prior, self._prior_params = [], {}, {}, []
        self._norms, self._index, self._plan, self._cpu = None, None, None, None
        if self.level is GradLevel.NONE or not self.layers:
            return
        for j, (name, layer) in enumerate(self.layers):
            per_kind: dict[str, dict[str, _ParamStats]] = {}
            for kind in _KINDS:
                mu, rho = getattr(layer, f"{kind}_mu"), getattr(layer, f"{kind}_rho")
                if mu is not None and rho is not None:
                    sampled = self.element_every > 1
                    per_kind[kind] = {
                        "mu": _ParamStats(mu, self.level, sampled=sampled),
                        "rho": _ParamStats(rho, self.level, sampled=sampled),
                    }
                    for stats in per_kind[kind].values():
                        stats.layer = j
                        self._stats.append(stats)
            self._by_layer[name] = per_kind
            device = layer.weight_mu.device
            prior_grads: dict[str, dict[str, _Series]] = {}
            for kind in _KINDS:
                prior = getattr(layer, f"{kind}_prior", None)
                if prior is not None and any(p.requires_grad for p in prior.parameters()):
                    prior_grads[kind] = {}
                    for n, p in prior.named_parameters():
                        if p.requires_grad:
                            prior_grads[kind][n] = _Series(device)
                            self._prior_params.append((p, prior_grads[kind][n]))
            self._prior[name] = prior_grads
        device = self.layers[0][1].weight_mu.device
        self._norms = _Rows(len(self.layers), device)

    @torch.no_grad()
    def record_step(self) -> None:
        """Record the gradients currently in ``.grad`` (one optimisation step)."""
        if self.level is GradLevel.NONE or self._norms is None:
            return
        present = [s for s in self._stats if s.param.grad is not None]
        if self._cpu_only():
            self._record_cpu(present)
        else:
            self._record_foreach(present)
        self._record_priors()
        self._next_step()

    def samples_mean(self) -> bool:
        """Whether the step about to be recorded adds to the per-element mean |g| (level
        ``element``, and a step that ``element_every`` samples; the per-element max and
        counts take every step)."""
        return self.level is GradLevel.ELEMENT and self._step % self.element_every == 0

    def _next_step(self) -> None:
        self.element_steps += self.samples_mean()
        self._step += 1

    def _cpu_only(self) -> bool:
        """Whether every recorded parameter is on the CPU (known once per epoch: the
        accumulators were made on the parameters' devices at :meth:`reset`)."""
        if self._cpu is None:
            self._cpu = all(s.param.device.type == "cpu" for s in self._stats)
        return self._cpu

    def fused_plan(self) -> dict[int, _ParamStats]:
        """The parameters (by ``id``) whose statistics an optimiser that reads every gradient
        anyway may take in its own pass (:class:`trainer.optim.RecordingAdam`), then handed
        to :meth:`record_fused_step`: every recorded CPU parameter; ``{}`` at level none.
        Their ``level`` says what to compute: the totals (``layer``) or, at ``element``, the
        totals and the per-element accumulators (``_ParamStats.accumulators``, given
        :meth:`samples_mean`) updated as :func:`trainer.kernels.grad_stats_many` updates
        them."""
        if self.level is GradLevel.NONE or self._norms is None:
            return {}
        if self._plan is None:  # once per epoch (reset), not per step
            self._plan = {id(s.param): s for s in self._stats if s.param.device.type == "cpu"}
        return self._plan

    @torch.no_grad()
    def record_fused_step(self, results: dict[int, kernels.GradStats]) -> None:
        """:meth:`record_step`, with the statistics of the parameters in ``results`` (by
        ``id``, as :meth:`fused_plan` named them) already computed from this step's raw
        gradients, and their accumulators updated; the others' are computed here."""
        if self.level is GradLevel.NONE or self._norms is None:
            return
        present = [s for s in self._stats if s.param.grad is not None]
        if self._cpu_only():
            self._finish_cpu(present, results)
        else:  # the optimiser's pass runs on the CPU only (RecordingAdam)
            assert not results, "statistics from an optimiser pass for a non-CPU model"
            self._record_foreach(present)
        self._record_priors()
        self._next_step()

    def _record_priors(self) -> None:
        for param, series in self._prior_params:
            series.add(param.grad)  # None: no gradient flowed this step

    def _record_cpu(self, present: list[_ParamStats]) -> None:
        """CPU: per gradient, through the kernels, its sum of squares and the statistics in one
        pass; else its norm (which tells whether it is finite) and the statistics through
        one reused |g| buffer (three passes; fewer than the masked path)."""
        element = self.level is GradLevel.ELEMENT
        mean = self.samples_mean()
        fused, grads = [], []
        for s in present:
            g = s.param.grad
            if g is not None and kernels.usable(*((g, s.sum_abs) if element else (g,))):
                assert not element or s.codes  # a CPU parameter's max: codes
                fused.append(s)
                grads.append(g)
        results: dict[int, kernels.GradStats] = {}
        if fused:  # one pass per gradient, one call for all (trainer.kernels)
            accumulators = [s.accumulators(mean) for s in fused] if element else None
            computed = kernels.grad_stats_many(grads, accumulators)
            results = {id(s.param): r for s, r in zip(fused, computed, strict=True)}
        self._finish_cpu(present, results)

    def _finish_cpu(
        self, present: list[_ParamStats], results: dict[int, kernels.GradStats]
    ) -> None:
        """Count the step of the statistics in ``results`` (by ``id`` of the parameter,
        computed by the kernels), compute the others', and append the layers' step norms."""
        assert self._norms is not None
        mean = self.level is not GradLevel.ELEMENT or self.samples_mean()
        totals = [0.0] * len(self.layers)
        for stats in present:
            result = results.get(id(stats.param))
            if result is not None:
                totals[stats.layer] += stats.add_fused(result, mean)
                continue
            grad = stats.param.grad
            assert grad is not None
            norm_sq = float(torch.linalg.vector_norm(grad).to(torch.float64)) ** 2
            stats.record(grad, math.isfinite(norm_sq), mean)
            totals[stats.layer] += norm_sq
        self._norms.append_values([math.sqrt(t) for t in totals])

    def _record_foreach(self, present: list[_ParamStats]) -> None:
        """Any device: fused ``_foreach`` kernels over every gradient, no host sync."""
        assert self._norms is not None
        if not present:
            self._norms.append_values([0.0] * len(self.layers))
            return
        grads = [s.param.grad for s in present]
        norms = torch._foreach_norm(grads)  # type: ignore[arg-type]
        mean = self.level is not GradLevel.ELEMENT or self.samples_mean()
        for stats in present:
            stats.steps += 1
            stats.mean_steps += mean
            stats.clean = False  # not known without a sync
        a = torch._foreach_abs(grads)  # type: ignore[arg-type]
        bad = [~torch.isfinite(x) for x in a]
        for x, b in zip(a, bad, strict=True):
            x.masked_fill_(b, 0.0)
        sums = [s.sum_abs for s in present]
        nonfinite = [s.nonfinite for s in present]
        if self.level is GradLevel.ELEMENT:
            counts = [b.to(torch.int32) for b in bad]
            torch._foreach_add_(nonfinite, counts)
            if mean:  # a step that the per-element mean takes (element_every)
                torch._foreach_add_(sums, [x.float() for x in a])
                if self.element_every > 1:  # the mean's own counts (_ParamStats.sampled)
                    torch._foreach_add_([s.nonfinite_mean for s in present], counts)
            floats = [
                (s.max_abs, x.float()) for s, x in zip(present, a, strict=True) if not s.codes
            ]
            if floats:
                torch._foreach_maximum_([m for m, _ in floats], [x for _, x in floats])
            for s, x in zip(present, a, strict=True):
                if s.codes:  # a CPU parameter of a model partly elsewhere
                    torch.maximum(s.max_abs, _bf16_codes(x.float()), out=s.max_abs)
        else:
            torch._foreach_add_(nonfinite, [b.sum(dtype=torch.int32) for b in bad])
            torch._foreach_add_(sums, [x.sum(dtype=torch.float32) for x in a])
            torch._foreach_maximum_([s.max_abs for s in present], [x.max().float() for x in a])
        self._append_norms(present, norms)

    def _append_norms(self, present: list[_ParamStats], norms: Sequence[Tensor]) -> None:
        """The layers' step norms from their tensors' norms, on the device (no sync)."""
        assert self._norms is not None
        device = self._norms.buf.device
        key = tuple(s.layer for s in present)
        index = _layer_index(key, len(self.layers), device)
        squares = torch.stack([n.to(device, torch.float64) for n in norms]).square()
        per_layer = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self._norms.append(per_layer.index_add_(0, index, squares).sqrt_())

    def result(self, copies: HostCopies | None = None) -> dict[str, dict[str, Any]] | None:
        """The epoch's statistics in the :class:`~trainer.snapshot.EpochSnapshot` layout
        (``copies``: see :func:`get_all_distribution_params`)."""
        if self.level is GradLevel.NONE:
            return None
        out: dict[str, dict[str, Any]] = {}
        for j, (name, per_kind) in enumerate(self._by_layer.items()):
            entry: dict[str, Any] = {
                kind: {p: s.result(copies) for p, s in per_param.items()}
                for kind, per_param in per_kind.items()
            }
            assert self._norms is not None
            entry["step_norm"] = self._norms.column(j, copies)
            if self._prior[name]:
                entry["prior"] = {
                    kind: {p: series.array(copies) for p, series in grads.items()}
                    for kind, grads in self._prior[name].items()
                }
            out[name] = entry
        return out


@functools.lru_cache(maxsize=32)
def _layer_index(key: tuple[int, ...], layers: int, device: torch.device) -> Tensor:
    """The layer of every recorded gradient, as an index tensor on ``device`` (cached)."""
    return torch.tensor(key, dtype=torch.long, device=device)
