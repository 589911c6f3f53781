"""Adam and AdamW that record a capture's gradient statistics in their own pass.

With gradient capture on, :class:`~trainer.capture.GradientRecorder` reads every gradient
once per step for its statistics, and the optimiser reads it again for the update: on the
CPU, where a step of the 784-1200-1200-10 MLP is memory-bound, that second pass over
every gradient was most of what per-layer capture cost. :class:`RecordingAdam` is
``torch.optim.Adam`` (``decoupled_weight_decay=True``: AdamW) whose step, on the CPU
with the fused kernels (:mod:`trainer.kernels`), updates every parameter in one pass
(``fused.c``'s ``adam_range``) and, after :meth:`RecordingAdam.record_next_step`, takes
the recorder's statistics of the raw gradients in that same pass, block by block while
they are in the L1 cache. The statistics are those of ``GradientRecorder.record_step``
(same kernels, same order of summation); the update is the same whether or not the step
is recorded, so capture never changes a run.

Everywhere else (a model of fewer than ``one_pass_min`` elements, 2^18 by default, a GPU,
AMSGrad, ``maximize``, ``capturable``, ``differentiable``, a tensor learning rate, other
dtypes, no kernels, under ``torch.compile``) it records the step with ``record_step`` and
runs ``torch.optim.Adam``'s own update. The state (``step``,
``exp_avg``, ``exp_avg_sq``) and ``state_dict`` are ``torch.optim.Adam``'s, so
checkpoints move between the two. The update agrees with ``torch.optim.Adam``'s to float32
rounding (tests/trainer/test_optim.py), not bit for bit: its arithmetic is in float32 in a
different order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from trainer import kernels
from trainer.capture import GradientRecorder
from trainer.snapshot import GradLevel

__all__ = ["RecordingAdam", "record_with"]


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.optim.Adam.step`` without the hook wrapper torch puts around an optimiser
    class's ``step`` (RecordingAdam.step has its own: the hooks must run once)."""
    return getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step


class RecordingAdam(torch.optim.Adam):
    """``torch.optim.Adam`` with the update, and a recorded step's gradient statistics, in one
    pass over each parameter on the CPU (see the module's documentation)."""

    #: Below this many elements (all the optimiser's parameters together) the step is
    #: torch's update, as before this optimiser existed: there the kernel's Python set-up
    #: costs more than its pass on an uncaptured step (1-32-32-1 MLP: 0.38 against 0.33 ms,
    #: benchmarks/optimizer_step.py); on large models the update is as fast as torch's and
    #: a captured step saves the recorder's read of every gradient. Fixed per model: a run
    #: never switches between the two.
    ONE_PASS_MIN = 1 << 18

    def __init__(
        self, params: Any, *args: Any, one_pass_min: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(params, *args, **kwargs)
        self.one_pass_min = self.ONE_PASS_MIN if one_pass_min is None else one_pass_min
        self._pending: GradientRecorder | None = None
        self._states_checked = -1  # how many states had been checked (-1: none yet)
        self.fused_steps = 0  # steps taken by the one-pass kernel (the rest: torch's update)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._size: int | None = None  # all parameters' elements, counted at the next step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._states_checked = -1  # new state tensors: check their layout again

    def record_next_step(self, recorder: GradientRecorder) -> None:
        """The next :meth:`step` records the gradients it updates with into ``recorder``
        (exactly what ``recorder.record_step()`` before the step would record)."""
        self._pending = recorder

    def _one_pass(self) -> list[tuple[dict[str, Any], list[Tensor]]] | None:
        """Each group and its parameters with a gradient, when the kernel can take them all."""
        if torch.compiler.is_compiling() or not kernels.on():
            return None
        if self._size is None:
            self._size = sum(p.numel() for group in self.param_groups for p in group["params"])
        if self._size < self.one_pass_min:
            return None
        groups = []
        for group in self.param_groups:
            if (
                group["amsgrad"]
                or group["maximize"]
                or group["capturable"]
                or group["differentiable"]
                or any(isinstance(group[k], Tensor) for k in ("lr", "weight_decay", "eps"))
                or any(isinstance(b, Tensor) for b in group["betas"])
            ):
                return None
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                grad = p.grad
                assert grad is not None
                if not (
                    kernels.addressable(p) and kernels.addressable(grad) and grad.shape == p.shape
                ):
                    return None
            groups.append((group, params))
        return groups

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        recorder, self._pending = self._pending, None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self._one_pass()
        gathered = []
        for group, group_params in groups or []:
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
            if group_params:
                p_, g_, m_, v_, t_ = lists
                self._init_group(group, p_, g_, m_, v_, [], t_)
            gathered.append((group, lists))
        if groups is not None and self._states_checked != len(self.state):
            # states made by _init_group are zeros_like their parameter; a loaded one may not be
            if not all(
                kernels.addressable(s) for _, lists in gathered for s in lists[2] + lists[3]
            ):
                groups = None
            else:
                self._states_checked = len(self.state)
        if groups is None:
            if recorder is not None:
                recorder.record_step()
            _unhooked(torch.optim.Adam.step)(self)
            return loss
        plan = recorder.fused_plan() if recorder is not None else {}
        element = recorder is not None and recorder.level is GradLevel.ELEMENT
        mean = recorder is not None and recorder.samples_mean()
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        hypers: list[kernels.AdamHyper] = []
        record: list[int] = []
        accumulators: list[kernels.Accumulators | None] = []
        for group, (g_params, g_grads, g_avgs, g_sqs, g_steps) in gathered:
            if not g_params:
                continue
            torch._foreach_add_(g_steps, 1)
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            decoupled = group["decoupled_weight_decay"]
            for p, step in zip(g_params, g_steps, strict=True):
                t = float(step)
                hypers.append(
                    kernels.AdamHyper(
                        beta1=beta1,
                        beta2=beta2,
                        eps=eps,
                        weight_decay=0.0 if decoupled else wd,
                        decay=1.0 - lr * wd if decoupled else 1.0,
                        step_size=lr / (1.0 - beta1**t),
                        bias2_sqrt=math.sqrt(1.0 - beta2**t),
                    )
                )
                stats = plan.get(id(p))
                record.append(0 if stats is None else 2 if element else 1)
                accumulators.append(
                    stats.accumulators(mean) if stats is not None and element else None
                )
            params += g_params
            grads += g_grads
            exp_avgs += g_avgs
            exp_avg_sqs += g_sqs
        results = kernels.adam_step(
            params, grads, exp_avgs, exp_avg_sqs, hypers, record, accumulators if element else None
        )
        self.fused_steps += 1
        if recorder is not None:
            recorder.record_fused_step(
                {id(p): r for p, r in zip(params, results, strict=True) if r is not None}
            )
        return loss


def record_with(optimizer: torch.optim.Optimizer, recorder: GradientRecorder) -> None:
    """Record this step's gradients (now in ``.grad``) into ``recorder``: in the optimiser's
    own pass when it is a :class:`RecordingAdam` (call its ``step()`` next, with the
    gradients unchanged, e.g. not clipped in between), else at once."""
    if isinstance(optimizer, RecordingAdam):
        optimizer.record_next_step(recorder)
    else:
        recorder.record_step()
