"""Demos and studies: fixed vs learnable shared priors with every diagnostic, as reports.

    from service.demo import run_regression_demo, run_mnist_demo
    run_regression_demo("out/regression")     # report.html (PNGs embedded), report.md, img/
    run_mnist_demo("out/mnist")               # 784-400-400-10; full=True: 784-1200-1200-10

Sweeps (width and optimiser studies on Dask): :mod:`service.demo.sweeps` (spec, runs) and
:mod:`service.demo.studies` (tables, plots, report). Names load on first use, so that the
command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "MNIST_DEFAULTS",
    "MNIST_FULL",
    "REGRESSION_DEFAULTS",
    "DemoResult",
    "Report",
    "SweepSpec",
    "run_mnist_demo",
    "run_regression_demo",
    "run_sweep_local",
    "write_study_report",
]

_LAZY = {
    "MNIST_DEFAULTS": "service.demo.mnist",
    "MNIST_FULL": "service.demo.mnist",
    "run_mnist_demo": "service.demo.mnist",
    "REGRESSION_DEFAULTS": "service.demo.regression",
    "run_regression_demo": "service.demo.regression",
    "DemoResult": "service.demo.common",
    "Report": "service.demo.report",
    "SweepSpec": "service.demo.sweeps",
    "run_sweep_local": "service.demo.sweeps",
    "write_study_report": "service.demo.studies",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'service.demo' has no attribute {name!r}")
