"""The summaries' C kernels (trainer.store._native, summaries.c) against numpy: order
statistics, counts and bfloat16 codes identical, the Gaussian sums equal up to their last
bits; files written with them are accepted by a store without them and the other way round;
without a compiler everything still works (numpy)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.trainer.conftest import SnapshotFactory
from trainer.snapshot import GradLevel
from trainer.store import EpochFile, _native, numeric, summaries, write_epoch_file
from trainer.store._codec import decode_bf16, encode_bf16
from trainer.store.summaries import Encoded, EpochSummaries, add_layer, difference
from trainer.store.validate import UploadLimits

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not _native.available(), reason=f"summary kernels unavailable: {_native.status()}"
)


def _arrays() -> dict[str, np.ndarray]:
    """float32 arrays that stress the order statistics: one value, a few values (with both
    zeros), denormals, a narrow cluster (every value in one or two bins), heavy tails over
    many decades, negative and positive values, sizes around the kernels' threshold."""
    rng = np.random.default_rng(7)
    f = np.float32
    return {
        "normal": rng.normal(0, 0.05, 300_000).astype(f),
        "one value": np.full(50_000, 0.1, f),
        "few values": rng.choice(np.array([0.1, 0.2, -0.0, 0.0, 3.0, -7.5], f), 80_000),
        "denormal": (rng.normal(0, 1, 60_000) * 1e-40).astype(f),
        "narrow": (0.1 + rng.normal(0, 1e-6, 200_000)).astype(f),
        "heavy tails": np.concatenate(
            [rng.normal(0, 1, 40_000), rng.standard_cauchy(40_000) * 1e30]
        ).astype(f),
        "extremes": np.concatenate(
            [rng.normal(0, 1, 9_000), [3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, -0.0] * 100]
        ).astype(f),
        "threshold": rng.normal(0, 1, _native.MIN_SIZE).astype(f),
        "sorted": np.sort(rng.normal(0, 1, 100_000)).astype(f),
    }


@pytest.mark.parametrize("name", list(_arrays()))
def test_percentiles_are_numpys_exactly(name: str) -> None:
    x = _arrays()[name]
    for qs in (numeric.TB_PERCENTILES, tuple(np.linspace(0, 100, 201)), (50.0,)):
        want = np.percentile(x, qs)
        got = numeric.percentiles(x, qs)
        with _native.disabled():
            fallback = numeric.percentiles(x, qs)
        # equal values (-0.0 == 0.0: which zero np.partition returns is its own affair)
        assert np.array_equal(got, want), (name, qs)
        assert np.array_equal(fallback, want), (name, qs)
    ranks = np.unique(np.random.default_rng(1).integers(0, x.size, 300))
    found = _native.select(x, ranks)
    assert found is not None
    assert np.array_equal(found, np.sort(x)[ranks])


def test_what_the_kernels_do_not_take_goes_to_numpy() -> None:
    x = np.random.default_rng(2).normal(0, 1, 20_000)
    assert _native.select(x, np.array([0, 5])) is None  # float64
    assert _native.select(x.astype(np.float32)[::2], np.array([0, 5])) is None  # strided
    assert _native.select(x.astype(np.float32)[:100], np.array([0, 5])) is None  # small
    assert _native.select(x.astype(np.float32), np.arange(_native.SELECT_MAX + 1)) is None
    for arr in (x, x.astype(np.float32)[::2], x.astype(np.float32)[:100]):
        assert (
            numeric.percentiles(arr).tobytes()
            == np.percentile(arr, numeric.TB_PERCENTILES).tobytes()
        )


def _sums_close(a: numeric.GaussianSums, b: numeric.GaussianSums, rtol: float) -> None:
    assert a.n == b.n
    for got, want in (
        (a.mu.mean, b.mu.mean),
        (a.mu.m2, b.mu.m2),
        (a.sigma.mean, b.sigma.mean),
        (a.sigma.m2, b.sigma.m2),
        (a.pairwise_kl, b.pairwise_kl),
        (a.sum_log_sigma, b.sum_log_sigma),
        (a.sum_variance, b.sum_variance),
    ):
        assert got == pytest.approx(want, rel=rtol, abs=1e-300), (got, want)


@pytest.mark.parametrize("spread", [0.0, 1e-6, 0.01, 0.5])
def test_gaussian_sums_match_numpys_to_the_last_bits(spread: float) -> None:
    rng = np.random.default_rng(3)
    n = 700_001  # not a multiple of a block
    mu = rng.normal(0.02, 0.05, n).astype(np.float32)
    sigma = (0.1 * np.exp(spread * rng.normal(0, 1, n))).astype(np.float32)
    sums, mu_pct, sigma_pct = numeric.gaussian_summary(mu, sigma, numeric.TB_PERCENTILES)
    with _native.disabled():
        want = numeric.gaussian_sums(mu, sigma)
    _sums_close(sums, want, 1e-12)
    assert sums == numeric.gaussian_sums(mu, sigma)  # the same with or without percentiles
    assert mu_pct is not None and sigma_pct is not None
    assert np.array_equal(mu_pct, np.percentile(mu, numeric.TB_PERCENTILES))
    assert np.array_equal(sigma_pct, np.percentile(sigma, numeric.TB_PERCENTILES))
    # the sums still mean what they say: the KL to a prior, against float64 directly
    m64, v64 = mu.astype(np.float64), sigma.astype(np.float64) ** 2
    kl = np.sum(np.log(0.3) - 0.5 * np.log(v64) + (v64 + (m64 - 0.1) ** 2) / 0.18 - 0.5)
    assert sums.kl_to(0.1, 0.3) == pytest.approx(kl, rel=1e-9)


def test_identical_elements_have_no_spread() -> None:
    mu = np.full(100_000, -0.25, np.float32)
    sigma = np.full(100_000, 0.125, np.float32)
    sums = numeric.gaussian_sums(mu, sigma)
    assert sums.pairwise_kl == 0.0 and sums.mu.m2 == 0.0 and sums.sigma.m2 == 0.0
    assert sums.mu.mean == -0.25 and sums.sigma.mean == 0.125


def _special_floats() -> np.ndarray:
    f = np.float32
    specials = [np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 3.3895e38, 1e-45, -1e-45]
    specials += [0.0, -0.0, 1e-40, 1.17549435e-38, 1.0, 1.00390625, 1.005859375, -2.5]
    bits = np.arange(0, 1 << 32, 1009, dtype=np.uint64).astype(np.uint32).view(f)
    rng = np.random.default_rng(4)
    return np.concatenate([np.array(specials * 300, f), bits, rng.normal(0, 1, 50_000).astype(f)])


def test_bfloat16_codes_and_histogram_are_the_numpy_encoders() -> None:
    x = _special_floats()  # a stride through every bit pattern, NaNs, Infs, edges
    got = _native.bf16_encode(x)
    assert got is not None
    codes, hist = got
    assert codes.tobytes() == encode_bf16(x).tobytes()
    assert hist.tolist() == np.bincount(codes, minlength=1 << 16).tolist()
    two_d = x[: 3000 * 7].reshape(3000, 7)
    got2 = _native.bf16_encode(two_d)
    assert got2 is not None and got2[0].shape == (3000, 7)


@pytest.mark.parametrize(
    "kind",
    ["healthy", "with zeros", "non-finite values", "negative", "all non-finite", "nonfinite steps"],
)
def test_gradient_stats_from_codes_equal_those_of_the_values(kind: str) -> None:
    rng = np.random.default_rng(5)
    g = np.abs(rng.normal(0, 1e-3, (300, 200))).astype(np.float32)
    nonfinite = np.zeros(g.shape, np.int32)
    if kind == "with zeros":
        g[::3] = 0.0
        g[1, :5] = -0.0
    elif kind == "non-finite values":
        g[0, :3] = [np.inf, np.nan, 3.4e38]  # the last one stays finite (largest bfloat16)
    elif kind == "negative":
        g -= np.float32(5e-4)
    elif kind == "all non-finite":
        g[:] = np.nan
    elif kind == "nonfinite steps":
        nonfinite[2, 2] = 4
    found = _native.bf16_encode(g)
    assert found is not None
    encoded = Encoded(*found)
    got = summaries.grad_stats(encoded, nonfinite)
    with _native.disabled():
        want = summaries.grad_stats(decode_bf16(encoded.codes), nonfinite)
        without_hist = summaries.grad_stats(Encoded(encoded.codes, None), nonfinite)
    fields = lambda s: [repr(getattr(s, n)) for n in s.__dataclass_fields__]  # noqa: E731
    assert fields(got) == fields(want) == fields(without_hist)


def _grad_snapshot(make_snapshot: SnapshotFactory, size: tuple[int, int]) -> Any:
    snap = make_snapshot(0, layers={"big": size, "out": (3, size[0])}, grad_level=GradLevel.ELEMENT)
    stats = snap.gradients["big"]["weight"]["mu"]
    stats["mean_abs"][0, :3] = [0.0, np.inf, 1e-41]
    stats["nonfinite"][...] = 0  # a healthy epoch: its statistics come from the codes
    post = snap.params["big"]["posterior"]["weight"]
    post["sigma"][...] = np.float32(0.05) * np.exp(
        np.random.default_rng(6).normal(0, 0.3, post["sigma"].shape)
    ).astype(np.float32)
    return snap


@pytest.mark.parametrize("writer_has_kernels", [True, False])
def test_files_written_with_and_without_kernels_are_accepted_by_either(
    tmp_path: Path, make_snapshot: SnapshotFactory, writer_has_kernels: bool
) -> None:
    snap = _grad_snapshot(make_snapshot, (400, 300))
    path = tmp_path / "e.h5"
    if writer_has_kernels:
        write_epoch_file(path, snap, run_id="r")
    else:
        with _native.disabled():
            write_epoch_file(path, snap, run_id="r")
    for receiver_has_kernels in (True, False):
        with EpochFile(path) as ef:
            if receiver_has_kernels:
                ef.validate(UploadLimits())
            else:
                with _native.disabled():
                    ef.validate(UploadLimits())
            stored = ef.summaries()
            got = ef.snapshot()
        assert stored is not None
        computed = EpochSummaries()
        with _native.disabled():
            for layer, log in got.params.items():
                add_layer(computed, layer, log, (got.gradients or {}).get(layer))
        assert difference(stored, computed) is None
    g = stored.gradients[("big", "weight", "mu", "mean_abs")]
    assert (g.zeros, g.nonfinite_elements) == (1, 1)


def test_an_error_in_the_background_summaries_fails_the_write(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.store import _write

    snap = _grad_snapshot(make_snapshot, (200, 100))

    def broken(*args: Any) -> None:
        raise MemoryError("no room for the summaries")

    monkeypatch.setattr(_write, "add_params", broken)
    before = threading.active_count()
    with pytest.raises(MemoryError, match="no room"):
        write_epoch_file(tmp_path / "e.h5", snap, run_id="r")
    assert threading.active_count() == before  # the summaries' thread was joined
    write_epoch_file(tmp_path / "bare.h5", snap, run_id="r", summaries=False)  # unaffected


def test_an_error_in_the_background_encoding_fails_the_write(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.store import _write

    snap = _grad_snapshot(make_snapshot, (200, 100))

    def broken(arr: Any, bits: int = 7) -> None:
        raise MemoryError("no room for the codes")

    monkeypatch.setattr(_write, "_encode", broken)
    before = threading.active_count()
    with pytest.raises(MemoryError, match="no room for the codes"):
        write_epoch_file(tmp_path / "e.h5", snap, run_id="r")
    assert threading.active_count() == before  # both threads were joined
    write_epoch_file(tmp_path / "v1.h5", snap, run_id="r", schema_version=1)  # encodes nothing


def test_statistics_encoded_beside_the_posteriors_are_those_encoded_in_place(
    tmp_path: Path, make_snapshot: SnapshotFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The codes the encoding thread makes are the ones :meth:`_Writer.put` would make
    itself: a file written with the thread's codes holds the same datasets, attributes and
    summaries as one written with none handed over."""
    from trainer.store import _write

    snap = _grad_snapshot(make_snapshot, (300, 200))
    encode, threads = _write._encode, []

    def watched(arr: Any, bits: int = 7) -> Any:
        threads.append(threading.current_thread().name)
        return encode(arr, bits)

    monkeypatch.setattr(_write, "_encode", watched)
    write_epoch_file(tmp_path / "beside.h5", snap, run_id="r")
    assert threads and set(threads) == {"bnn-epoch-encode"}  # none left to the writer
    monkeypatch.setattr(_write, "_encode", encode)
    real = _write._encode_stats
    calls: list[int] = []

    def nothing(grads: Any, bits: int = 7) -> dict[Any, Any]:
        calls.append(len(real(grads, bits)))
        return {}  # the writer encodes every statistic itself

    monkeypatch.setattr(_write, "_encode_stats", nothing)
    write_epoch_file(tmp_path / "in_place.h5", snap, run_id="r")
    expected = sum(
        np.ndim(stats[stat]) >= 1
        for g in snap.gradients.values()
        for param in ("weight", "bias")
        for stats in g.get(param, {}).values()
        for stat in ("mean_abs", "max_abs")
    )
    assert calls == [expected] and expected >= 8

    def datasets(path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda name, obj: (
                    out.__setitem__(name, (obj[()], dict(obj.attrs)))
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
        return out

    a, b = datasets(tmp_path / "beside.h5"), datasets(tmp_path / "in_place.h5")
    assert a.keys() == b.keys() and any(name.endswith("mean_abs") for name in a)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
        assert a[name][1] == b[name][1], name


_WRITE = """
import sys
import numpy as np
from trainer.snapshot import EpochSnapshot
from trainer.store import EpochFile, _native, write_epoch_file
rng = np.random.default_rng(0)
mu = rng.normal(0, 0.1, (200, 100)).astype(np.float32)
sigma = np.full((200, 100), 0.05, np.float32)
prior = {"mu": np.zeros(1, np.float32), "sigma": np.ones(1, np.float32)}
log = {"posterior": {"weight": {"mu": mu, "sigma": sigma}}, "prior": {"weight": prior}}
snap = EpochSnapshot(epoch=0, params={"l": log}, metrics={"loss": 1.0})
write_epoch_file(sys.argv[1], snap, run_id="r")
with EpochFile(sys.argv[1]) as ef:
    s = ef.summaries().params[("l", "posterior", "weight")]
print(_native.available(), _native.status())
print(s.mu_percentiles.tolist() == np.percentile(mu, s.mu_percentiles.size and
      [0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0]).tolist())
print("torch" in sys.modules)
"""


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"BNN_FUSED_KERNELS": "0"}, "False off (BNN_FUSED_KERNELS=0)"),
        ({"CC": "/bin/false"}, "False build failed"),
        ({"CC": "", "PATH": "{tmp}"}, "False no C compiler"),
    ],
)
def test_without_the_kernels_files_are_written_with_numpy(
    tmp_path: Path, env: dict[str, str], said: str
) -> None:
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", _WRITE, str(tmp_path / "e.h5")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "BNN_KERNEL_CACHE": str(cache), **env},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(said), lines
    assert lines[1:] == ["True", "False"]  # exact percentiles, and no torch imported
    assert not any(cache.glob("*.tmp"))
    warned = "summary kernels unavailable" in proc.stderr
    assert warned == ("BNN_FUSED_KERNELS" not in env), proc.stderr  # said unless chosen


def test_the_writer_keeps_the_codes_histogram_for_the_summaries(tmp_path: Path) -> None:
    import h5py

    from trainer.store._write import _Writer

    values = np.abs(np.random.default_rng(8).normal(0, 1, (100, 60))).astype(np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        out = _Writer(2).put(f, "mean_abs", values, encode=True)
        assert isinstance(out, Encoded) and out.hist is not None
        assert out.codes.tobytes() == f["mean_abs"][()].tobytes() == encode_bf16(values).tobytes()
        plain = _Writer(1).put(f, "v1", values, encode=True)  # version 1: float32 as given
        assert plain is values


def test_the_background_threads_cpu_time_is_counted(
    tmp_path: Path, make_snapshot: SnapshotFactory
) -> None:
    from trainer.store._write import background_cpu

    snap = _grad_snapshot(make_snapshot, (600, 400))
    before = background_cpu()
    write_epoch_file(tmp_path / "e.h5", snap, run_id="r")
    assert background_cpu() > before
    after = background_cpu()
    write_epoch_file(tmp_path / "v1.h5", snap, run_id="r", schema_version=1)  # no thread
    assert background_cpu() == after
    write_epoch_file(tmp_path / "bare.h5", snap, run_id="r", summaries=False)  # encoding's
    assert background_cpu() > after


def _child_answers(call: Any, lock: Any) -> bool:
    """Whether a child forked while ``lock`` is held (as by a thread building a kernel)
    gets through ``call()`` within 30 s."""
    import time

    with lock:
        pid = os.fork()
        if pid == 0:  # the child: a deadlock here never exits
            try:
                call()
            finally:
                os._exit(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return False


def test_a_fork_while_a_kernel_is_being_built_does_not_deadlock_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trainer import kernels

    monkeypatch.setattr(_native, "_loaded", False)  # the child takes the lock again
    assert _child_answers(_native.available, _native._lock)
    assert _child_answers(kernels.available, kernels._lock)


@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(_native.MIN_SIZE, 30_000),
    scale=st.sampled_from([1e-40, 1e-6, 1.0, 1e30]),
    distinct=st.sampled_from([1, 3, 50, 0]),  # 0: continuous values
    zeros=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_order_statistics_of_any_array_are_numpys(
    seed: int, size: int, scale: float, distinct: int, zeros: bool
) -> None:
    rng = np.random.default_rng(seed)
    if distinct:
        pool = (rng.standard_cauchy(distinct) * scale).astype(np.float32)
        x = rng.choice(pool, size)
    else:
        x = (rng.standard_cauchy(size) * scale).astype(np.float32)
    x[~np.isfinite(x)] = 0.0
    if zeros:
        x[rng.integers(0, size, size // 10)] = rng.choice(np.array([0.0, -0.0], np.float32))
    qs = tuple(rng.uniform(0, 100, 7)) + numeric.TB_PERCENTILES
    assert np.array_equal(numeric.percentiles(x, qs), np.percentile(x, qs))
    found = _native.bf16_encode(np.abs(x))
    assert found is not None
    codes, hist = found
    nonfinite = np.zeros(x.shape, np.int32)
    got = summaries.grad_stats(Encoded(codes, hist), nonfinite)
    with _native.disabled():
        want = summaries.grad_stats(decode_bf16(codes), nonfinite)
    assert repr(got) == repr(want)
