"""trainer.kernels: the fused CPU draw (values, gradients, random numbers, fallbacks) and the
allocator tuning."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from trainer import kernels
from trainer.layers import BayesLinear, model_kl
from trainer.priors import SIGMA_FLOOR, PriorKind, PriorSpec, positive

REPO = Path(__file__).resolve().parents[2]

needs_kernels = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and (shutil.which("cc") or shutil.which("gcc"))),
    reason="the fused kernels are built with a C compiler on Linux",
)
pytestmark = needs_kernels


def test_kernels_build_here() -> None:
    """On Linux with a compiler the kernels must load (else every CPU run silently takes the
    slow path): the status says why not. They run on torch's OpenMP threads: the process
    maps one libgomp, torch's."""
    assert kernels.available(), kernels.status()
    assert kernels.status().startswith("loaded from")
    gomp = {ln.split()[-1] for ln in Path("/proc/self/maps").read_text().splitlines()}
    gomp = {p for p in gomp if "libgomp" in p}
    if gomp:  # torch on libgomp (the Linux wheels)
        assert len(gomp) == 1, gomp
        assert kernels.status().endswith("(OpenMP, torch's threads)")


def _params(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g).requires_grad_()
    rho = (torch.rand(shape, generator=g) * 60 - 40).requires_grad_()  # softplus over 1e-17..20+
    return mu, rho


def test_sigma_is_positive_of_rho_and_w_is_mu_plus_sigma_eps() -> None:
    mu, rho = _params((700, 300))
    w, sigma = kernels.sample(mu, rho)
    torch.testing.assert_close(sigma, positive(rho), rtol=2e-6, atol=0)
    eps = (w - mu) / sigma
    big = sigma > 1e-3  # (w - mu) / sigma loses digits where sigma is tiny next to mu
    assert big.sum() > 10_000
    torch.testing.assert_close(w[big], (mu + sigma * eps)[big], rtol=1e-6, atol=1e-6)


def test_extremes_of_rho_and_non_finite_values() -> None:
    mu = torch.zeros(2048)
    rho = torch.zeros(2048)
    rho[0], rho[1], rho[2], rho[3] = 100.0, -100.0, float("nan"), float("inf")
    mu[4], mu[5] = float("nan"), float("inf")
    w, sigma = kernels.sample(mu, rho)
    assert sigma[0] == 100.0 and sigma[1] == pytest.approx(SIGMA_FLOOR, rel=1e-6)
    assert math.isnan(sigma[2]) and math.isnan(w[2])  # NaN is never hidden
    assert math.isinf(sigma[3])
    assert math.isnan(w[4]) and not math.isfinite(w[5])
    assert torch.isfinite(w[6:]).all() and (sigma[6:] == positive(rho[6:])).all()


def test_gradients_are_the_chain_rule_through_softplus() -> None:
    mu, rho = _params((500, 400), seed=1)
    w, sigma = kernels.sample(mu, rho)
    gw, gs = torch.randn_like(w), torch.randn_like(w)
    torch.autograd.backward([w, sigma], [gw, gs])
    assert mu.grad is not None and rho.grad is not None
    assert torch.equal(mu.grad, gw)
    with torch.no_grad():
        eps = (w - mu) / sigma
        expected = (gw * eps + gs) * torch.sigmoid(rho)
    ok = sigma > 1e-3
    torch.testing.assert_close(rho.grad[ok], expected[ok], rtol=1e-4, atol=1e-6)
    # only w used: no gradient of sigma reaches the kernel
    mu.grad = rho.grad = None
    w, sigma = kernels.sample(mu, rho)
    w.backward(gw)
    with torch.no_grad():
        expected = gw * ((w - mu) / sigma) * torch.sigmoid(rho)
    torch.testing.assert_close(rho.grad[ok], expected[ok], rtol=1e-4, atol=1e-6)


def test_layer_gradients_are_the_torch_paths_for_the_same_noise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One step of a layer (draw, KL sharing the draw's sigma, backward) through the kernels
    gives the torch path's gradients when the torch path is fed the kernel's noise."""
    torch.manual_seed(3)
    layer = BayesLinear(64, 2048, prior=PriorSpec(kind=PriorKind.LEARNABLE, sigma0=0.3))
    x = torch.randn(16, 64)
    noise: list[torch.Tensor] = []
    real = kernels.sample

    def recording(mu: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, sigma = real(mu, rho)
        noise.append(((w - mu) / sigma).detach())
        return w, sigma

    def grads() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        (layer(x).square().mean() + model_kl(layer) / 1000).backward()
        return [p.grad.clone() for p in layer.parameters() if p.grad is not None]

    monkeypatch.setattr(kernels, "sample", recording)
    fused = grads()
    assert [tuple(n.shape) for n in noise] == [(2048, 64), (2048,)]
    replay = iter(noise)
    monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: next(replay))
    plain = grads()
    assert len(fused) == len(plain) >= 4
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_draws_are_standard_normal() -> None:
    torch.manual_seed(0)
    z = kernels.normal(torch.empty(4_000_000)).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)  # skew
    # tails: P(|z| > 4) = 6.3e-5
    tail = (z.abs() > 4).double().mean().item()
    assert abs(tail - 6.334e-5) < 5 * math.sqrt(6.334e-5 / n)
    ks = stats.kstest(z[:200_000].numpy(), "norm")
    assert ks.pvalue > 1e-4, ks


def test_draws_are_uncorrelated_within_and_between_blocks() -> None:
    torch.manual_seed(1)
    z = kernels.normal(torch.empty(1 << 20)).double()
    n = z.numel()
    for lag in (1, 2, 128, 256, 511, 512, 513):  # within a Philox counter, a pair, a block
        r = (z[:-lag] * z[lag:]).mean().item()
        assert abs(r) < 5 / math.sqrt(n), (lag, r)
    a, b = kernels.normal(torch.empty(1 << 20)).double(), z
    assert abs((a * b).mean().item()) < 5 / math.sqrt(n)  # two draws: independent


def test_seeded_by_torch_and_independent_of_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        draws = []
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            torch.manual_seed(42)
            mu, rho = torch.zeros(300_001), torch.full((300_001,), -3.0)
            draws.append(kernels.sample(mu, rho)[0])
        assert all(torch.equal(draws[0], d) for d in draws[1:])
        torch.manual_seed(42)
        assert torch.equal(kernels.sample(mu, rho)[0], draws[0])
        assert not torch.equal(kernels.sample(mu, rho)[0], draws[0])  # the stream moved on
    finally:
        torch.set_num_threads(threads)


def test_layers_use_the_kernels_on_cpu_float32_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = kernels.sample

    def counting(mu: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(mu.shape))
        return real(mu, rho)

    monkeypatch.setattr(kernels, "sample", counting)
    layer = BayesLinear(20, 30)
    layer(torch.randn(4, 20)).sum().backward()
    assert calls == [(30, 20), (30,)]
    calls.clear()
    layer.double()(torch.randn(4, 20, dtype=torch.float64))  # float64: torch operations
    assert calls == []
    layer.float().eval()
    layer.use_mean = True
    layer(torch.randn(4, 20))
    assert calls == []


def test_a_second_draw_in_one_step_shares_sigma() -> None:
    """Two forward passes before one backward (two Monte Carlo samples): one sigma node."""
    layer = BayesLinear(50, 40)
    x = torch.randn(8, 50)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    (a.sum() + b.sum() + model_kl(layer)).backward()
    assert layer.weight_rho.grad is not None and torch.isfinite(layer.weight_rho.grad).all()


def test_training_with_the_kernels_learns() -> None:
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 256).unsqueeze(1)
    y = torch.sin(2 * x)
    net = torch.nn.Sequential(BayesLinear(1, 64), torch.nn.Tanh(), BayesLinear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(400):
        opt.zero_grad()
        loss = F.mse_loss(net(x), y) + model_kl(net) / 25_600
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.2 * first


def _child_draw(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    # as torch's DataLoader workers do: libgomp's team does not survive fork(), and torch's
    # own parallel operations hang in such a child just as these kernels would
    torch.set_num_threads(1)
    queue.put(float(kernels.sample(torch.zeros(1 << 18), torch.zeros(1 << 18))[0].std()))


def test_a_forked_child_can_draw() -> None:
    """A child forked after the kernels ran on a team of threads draws (on one thread, the
    rule for torch in forked children)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernels.sample(torch.zeros(1 << 18), torch.zeros(1 << 18))  # the parent's team exists
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_draw, args=(queue,))
        child.start()
        child.join(60)
    finally:
        torch.set_num_threads(threads)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(math.log(2) + SIGMA_FLOOR, rel=0.05)


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
        check=False,
    )


_STATUS = """
import torch
from trainer import kernels
from trainer.layers import BayesLinear
print(kernels.available(), kernels.status())
BayesLinear(3, 4)(torch.randn(2, 3)).sum().backward()
print("trained")
"""


def test_switched_off_or_without_a_compiler_layers_use_torch(tmp_path: Path) -> None:
    off = _run(_STATUS, BNN_FUSED_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert "False off (BNN_FUSED_KERNELS=0)" in off.stdout and "trained" in off.stdout
    assert "unavailable" not in off.stderr  # the user's choice: no warning
    nocc = _run(_STATUS, CC="", PATH=str(tmp_path))  # no compiler anywhere
    assert nocc.returncode == 0, nocc.stderr
    assert "False no C compiler" in nocc.stdout and "trained" in nocc.stdout
    assert "fused CPU kernels unavailable (no C compiler" in nocc.stderr  # said, not silent
    assert "install a C compiler" in nocc.stderr
    broken = _run(_STATUS, CC="/bin/false", BNN_KERNEL_CACHE=str(tmp_path / "cache"))
    assert broken.returncode == 0, broken.stderr
    assert "False build failed" in broken.stdout and "trained" in broken.stdout
    assert "fused CPU kernels unavailable" in broken.stderr  # one warning, logged
    assert not any((tmp_path / "cache").glob("*.tmp"))  # no half-written library left


def test_built_once_into_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _run(_STATUS, BNN_KERNEL_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    (lib,) = cache.glob("fused-*.so")
    stamp = lib.stat().st_mtime_ns
    again = _run(_STATUS, BNN_KERNEL_CACHE=str(cache))
    assert f"True loaded from {lib}" in again.stdout
    assert lib.stat().st_mtime_ns == stamp


_MALLOC = """
import ctypes, ctypes.util
from trainer import kernels
print(kernels.tune_allocator(), kernels.tune_allocator())
"""


def test_tune_allocator_once_and_switchable() -> None:
    on = _run(_MALLOC)
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["True", "True"]
    off = _run(_MALLOC, BNN_MALLOC_TUNING="0")
    assert off.stdout.split() == ["False", "False"]


def test_fused_kl_matches_the_torch_path_and_float64() -> None:
    """The KL of a shared scalar prior: one-pass sums and one-pass gradients (kernels) give
    the torch path's value and gradients, and the float64 value."""
    from trainer.priors import kl_normal, kl_normal_sum_fused

    g = torch.Generator().manual_seed(5)
    n_out, n_in = 700, 600
    results = []
    for off in (False, True):
        mu = (torch.randn(n_out, n_in, generator=g) * 0.2 + 0.05).requires_grad_()
        sigma = (torch.rand(n_out, n_in, generator=g) * 0.3 + 1e-3).requires_grad_()
        mu_p = torch.tensor([0.03], requires_grad=True)
        sigma_p = torch.tensor([0.4], requires_grad=True)
        with kernels.disabled() if off else contextlib.nullcontext():
            kl = kl_normal_sum_fused(mu, sigma, mu_p, sigma_p)
            (kl * 0.7).backward()
        ref = kl_normal(mu.double(), sigma.double(), mu_p.double(), sigma_p.double()).sum()
        assert kl.item() == pytest.approx(ref.item(), rel=1.2e-7)  # float32 rounding of the sum
        results.append([kl.detach(), mu.grad, sigma.grad, mu_p.grad, sigma_p.grad])
        g = torch.Generator().manual_seed(5)  # the same tensors again
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)


def test_fused_kl_sums_do_not_depend_on_the_thread_count() -> None:
    mu, sigma = torch.randn(1_000_003), torch.rand(1_000_003) + 0.01
    threads = torch.get_num_threads()
    try:
        sums = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            sums.append(kernels.kl_sums(mu, sigma, 0.1))
    finally:
        torch.set_num_threads(threads)
    assert sums[0] == sums[1] == sums[2]
    ref = (sigma.double().log().sum(), (sigma.double() ** 2 + (mu - 0.1).double() ** 2).sum())
    # float32 logs (as torch's path takes them) summed in float64: within 1e-8 of float64
    assert sums[0][0] == pytest.approx(ref[0].item(), rel=1e-8)
    assert sums[0][1] == pytest.approx(ref[1].item(), rel=1e-12)


def test_count_nonfinite() -> None:
    x = torch.randn(300_000)
    assert kernels.count_nonfinite(x) == 0
    x[[0, 511, 512, 299_999]] = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    x[7] = torch.finfo(torch.float32).max  # finite, however large
    x[8] = torch.finfo(torch.float32).tiny / 4  # a denormal
    assert kernels.count_nonfinite(x) == 4
    assert kernels.count_nonfinite(torch.tensor(math.nan)) == 1


def test_torch_func_transforms_take_the_torch_path() -> None:
    """Inside torch.func (per-sample gradients, say) the layers use torch operations, which
    the transforms can batch and differentiate."""
    from torch.func import functional_call, grad, vmap

    layer = BayesLinear(4, 3)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(5, 4)

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, p, (xi.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness="different")(params, x)
    assert per_sample["weight_rho"].shape == (5, 3, 4)
    assert torch.isfinite(per_sample["weight_rho"]).all()
