"""``Trainer(compile=...)``: the training step through torch.compile, on the CPU here (the
CUDA-graph mode and the GPU figures are in tests/trainer/test_cuda.py and BENCHMARKS.md)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from trainer.errors import BnnError
from trainer.store import RunStore, load_distribution_log
from trainer.train import train

# a graph break (Dynamo tracing into untraceable code, e.g. the CPU kernels' checks) fails
pytestmark = pytest.mark.filterwarnings("error:Dynamo:UserWarning")

TINY = {"dataset": "regression", "n_train": 96, "n_test": 32, "eval_samples": 2, "seed": 0}


def test_a_compiled_step_trains_and_captures_like_an_eager_one(tmp_path: Path) -> None:
    cfg = {**TINY, "epochs": 2, "prior": "learnable", "grad_capture": "element"}
    with RunStore(tmp_path) as store:
        compiled = train(cfg, sink=store, progress=False, compile="default")
        eager = train(cfg, progress=False)
        assert compiled.captured_epochs == [0, 1]
        (run,) = store.list_runs()
        assert run.status == "completed"
    losses = [h["loss"] for h in compiled.history]
    assert all(math.isfinite(v) for v in losses)
    # a different random stream (inductor's), the same objective: losses of the same size
    for a, b in zip(losses, [h["loss"] for h in eager.history], strict=True):
        assert a == pytest.approx(b, rel=0.5)
    log = load_distribution_log(compiled.run_id, data_dir=tmp_path)
    assert sorted(log) == [0, 1]
    assert np.isfinite(log[1]["layer1"]["posterior"]["weight"]["mu"]).all()


@pytest.mark.parametrize(
    ("mode", "message"),
    [("fastest", "compile must be one of"), ("reduce-overhead", "needs a CUDA device")],
)
def test_bad_compile_modes_are_refused_by_name(mode: str, message: str) -> None:
    with pytest.raises(BnnError, match=message) as info:
        train({**TINY, "epochs": 1, "device": "cpu"}, progress=False, compile=mode)
    assert repr(mode) in info.value.message
