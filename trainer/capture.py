"""Capture of posterior/prior parameters and gradient statistics during training.

``get_all_distribution_params`` is the seed's function: one epoch of its
``distribution_log``. :class:`GradientRecorder` accumulates, over one epoch's steps,
per element of every posterior parameter (``mu`` and ``rho``) the mean and max of |g|
and the count of non-finite values, the per-step gradient norm of each layer, and the
per-step gradients of learnable prior parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainer.layers import BayesianLayer, bayesian_layers
from trainer.snapshot import GradLevel, LayerLog

__all__ = ["GradientRecorder", "get_all_distribution_params", "is_capture_epoch"]

_KINDS = ("weight", "bias")


def is_capture_epoch(epoch: int, step_size: int, *, last_epoch: int | None = None) -> bool:
    """Epochs 0, N, 2N, ... are captured, and the last epoch always."""
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    return epoch % step_size == 0 or (last_epoch is not None and epoch == last_epoch)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _layer_log(layer: BayesianLayer) -> LayerLog:
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
    model: nn.Module, epoch: int, step_size: int = 1, *, force: bool = False
) -> dict[str, LayerLog] | None:
    """One epoch of the seed's ``distribution_log`` for every Bayesian layer, or ``None``.

    Returns ``{layer: {"posterior"|"prior": {"weight"|"bias": {"mu", "sigma"}}}}`` with numpy
    arrays (posterior: the parameter's shape; shared prior: shape (1,)) when
    ``epoch % step_size == 0`` or ``force``; ``None`` on other epochs.
    """
    if not force and not is_capture_epoch(epoch, step_size):
        return None
    return {name: _layer_log(layer) for name, layer in bayesian_layers(model)}


class _ParamStats:
    """Running |g| statistics of one posterior parameter tensor.

    Per element (or per tensor at level ``layer``): the sum and max of |g| over the steps whose
    gradient there was finite, and the count of non-finite values. On the CPU a non-finite
    gradient is detected from the tensor's norm (computed anyway), so the common case costs
    three passes; on a GPU the masked path always runs, so no step waits for the device.
    """

    def __init__(self, param: nn.Parameter, level: GradLevel) -> None:
        self.param = param
        self.level = level
        shape = param.shape if level is GradLevel.ELEMENT else ()
        self.sum_abs = torch.zeros(shape, device=param.device, dtype=torch.float32)
        self.max_abs = torch.zeros(shape, device=param.device, dtype=torch.float32)
        self.nonfinite = torch.zeros(shape, device=param.device, dtype=torch.int32)
        self.steps = 0
        self.elements = param.numel()
        self._buf: Tensor | None = None

    def record(self, grad: Tensor, finite: bool | None) -> None:
        """Add one step's gradient; ``finite`` None: unknown (check per element, no sync)."""
        self.steps += 1
        if self.level is GradLevel.ELEMENT:
            if self._buf is None:
                self._buf = torch.empty_like(grad, dtype=torch.float32)
            a = torch.abs(grad, out=self._buf)
            if finite is not True:
                ok = torch.isfinite(grad)
                self.nonfinite += ~ok
                a = a.masked_fill_(~ok, 0.0)
            self.sum_abs += a
            torch.maximum(self.max_abs, a, out=self.max_abs)
            return
        if finite is True:  # |g| into a reused buffer, then two plain reductions
            if self._buf is None:  # (vector_norm with ord=1 / inf is 4-12x slower on the CPU)
                self._buf = torch.empty_like(grad, dtype=torch.float32)
            a = torch.abs(grad, out=self._buf)
            self.sum_abs += a.sum()
            torch.maximum(self.max_abs, a.max(), out=self.max_abs)
            return
        ok = torch.isfinite(grad)
        self.nonfinite += (~ok).sum(dtype=torch.int32)
        a = grad.abs().masked_fill_(~ok, 0.0)
        self.sum_abs += a.sum(dtype=torch.float32)
        if a.numel():
            torch.maximum(self.max_abs, a.max(), out=self.max_abs)

    def result(self) -> dict[str, np.ndarray]:
        per = 1 if self.level is GradLevel.ELEMENT else self.elements
        finite_count = (self.steps * per - self.nonfinite).clamp_min(1).to(torch.float32)
        return {
            "mean_abs": _np(self.sum_abs / finite_count),
            "max_abs": _np(self.max_abs),
            "nonfinite": self.nonfinite.to("cpu").numpy().copy(),
        }


class _Series:
    """A per-step float64 series kept in one preallocated device tensor.

    Thousands of small per-step tensors would fragment the heap between the large gradient
    allocations (measured: +4 MB of resident memory per step); one buffer that doubles when
    full does not, and writing into it never waits for a GPU.
    """

    def __init__(self, device: torch.device, capacity: int = 512) -> None:
        self.buf = torch.zeros(capacity, dtype=torch.float64, device=device)
        self.n = 0

    def append(self, value: Tensor | None) -> None:
        if self.n == self.buf.numel():
            self.buf = torch.cat([self.buf, torch.zeros_like(self.buf)])
        if value is None:
            self.buf[self.n] = 0.0
        else:
            self.buf[self.n].copy_(value.reshape(()))
        self.n += 1

    def array(self) -> np.ndarray:
        return self.buf[: self.n].cpu().numpy().copy()


class GradientRecorder:
    """Accumulates gradient statistics over one epoch; call :meth:`record_step` after backward.

    Statistics are taken of the raw gradients, before clipping, so exploding gradients stay
    visible. ``level`` ``none`` records nothing, ``layer`` keeps one number per statistic per
    parameter tensor, ``element`` one per element (as large as the parameters themselves).
    """

    def __init__(self, model: nn.Module, level: GradLevel | str = GradLevel.ELEMENT) -> None:
        self.level = GradLevel(level)
        self.layers = bayesian_layers(model)
        self._stats: dict[str, dict[str, dict[str, _ParamStats]]] = {}
        self._norms: dict[str, _Series] = {}
        self._prior: dict[str, dict[str, dict[str, _Series]]] = {}
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self._stats, self._norms, self._prior = {}, {}, {}
        if self.level is GradLevel.NONE:
            return
        for name, layer in self.layers:
            per_kind: dict[str, dict[str, _ParamStats]] = {}
            for kind in _KINDS:
                mu, rho = getattr(layer, f"{kind}_mu"), getattr(layer, f"{kind}_rho")
                if mu is not None and rho is not None:
                    per_kind[kind] = {
                        "mu": _ParamStats(mu, self.level),
                        "rho": _ParamStats(rho, self.level),
                    }
            self._stats[name] = per_kind
            device = layer.weight_mu.device
            self._norms[name] = _Series(device)
            prior_grads: dict[str, dict[str, _Series]] = {}
            for kind in _KINDS:
                prior = getattr(layer, f"{kind}_prior", None)
                if prior is not None and any(p.requires_grad for p in prior.parameters()):
                    prior_grads[kind] = {
                        n: _Series(device) for n, p in prior.named_parameters() if p.requires_grad
                    }
            self._prior[name] = prior_grads

    @torch.no_grad()
    def record_step(self) -> None:
        """Record the gradients currently in ``.grad`` (one optimisation step)."""
        if self.level is GradLevel.NONE:
            return
        for name, layer in self.layers:
            total: Tensor | None = None
            for per_param in self._stats[name].values():
                for stats in per_param.values():
                    grad = stats.param.grad
                    if grad is None:
                        continue
                    norm_sq = torch.linalg.vector_norm(grad).to(torch.float64).square()
                    total = norm_sq if total is None else total + norm_sq
                    on_cpu = grad.device.type == "cpu"
                    stats.record(grad, bool(torch.isfinite(norm_sq)) if on_cpu else None)
            self._norms[name].append(None if total is None else total.sqrt())
            for kind, grads in self._prior[name].items():
                prior = getattr(layer, f"{kind}_prior")
                for pname, series in grads.items():
                    g = getattr(prior, pname).grad  # None: no gradient flowed this step
                    series.append(None if g is None else g.detach().reshape(-1)[0])

    def result(self) -> dict[str, dict[str, Any]] | None:
        """The epoch's statistics in the :class:`~trainer.snapshot.EpochSnapshot` layout."""
        if self.level is GradLevel.NONE:
            return None
        out: dict[str, dict[str, Any]] = {}
        for name, per_kind in self._stats.items():
            entry: dict[str, Any] = {
                kind: {p: s.result() for p, s in per_param.items()}
                for kind, per_param in per_kind.items()
            }
            entry["step_norm"] = self._norms[name].array()
            if self._prior[name]:
                entry["prior"] = {
                    kind: {p: series.array() for p, series in grads.items()}
                    for kind, grads in self._prior[name].items()
                }
            out[name] = entry
        return out
