"""Demos and studies: fixed vs learnable shared priors with every diagnostic, as reports.

    from service.demo import run_regression_demo, run_mnist_demo
    run_regression_demo("out/regression")     # the seven priors, 5 paired seeds, CIs + diagnostics
    run_mnist_demo("out/mnist")               # 784-400-400-10, 3 seeds; full=True: 2x1200, GPU

Studies (arms x paired seeds, tuned on validation, 95% CIs): :mod:`service.demo.study`
(``StudySpec``, ``run_study_local``), :mod:`service.demo.protocol` (``protocol_spec``: the
seven-arm comparison of priors) and :mod:`service.demo.study_report` (tables, plots, report).
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
    "StudySpec",
    "SweepSpec",
    "collect_study",
    "protocol_spec",
    "run_mnist_demo",
    "run_regression_demo",
    "run_study_local",
    "run_sweep_local",
    "study_tables",
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
    "StudySpec": "service.demo.study",
    "run_study_local": "service.demo.study",
    "protocol_spec": "service.demo.protocol",
    "collect_study": "service.demo.study_report",
    "study_tables": "service.demo.study_report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'service.demo' has no attribute {name!r}")
