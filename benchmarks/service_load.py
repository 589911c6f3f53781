"""Service load: latency and throughput of the analysis endpoints, cold and warm.

A finished 784-1200-1200-10 MNIST run of ``--epochs`` (20) captured epochs with element
gradient statistics is trained for real (``trainer.train.train`` on ``--n-train`` 2048
images, about a minute) into a temporary data directory, or taken from ``--data-dir`` and
``--run-id``. The real server (``python -m service.cli serve``, log level warning) runs on
a free loopback port over that directory; an asynchronous httpx client sends requests at
``--concurrency`` (8) and records each request's latency.

* warm: every URL requested once, then ``--requests`` (500) requests cycling over the
  epochs, all answered from the result cache;
* cold: a fresh server per endpoint (empty caches; the files are in the OS page cache), one
  request per epoch: even epochs one at a time (the latency of a cold request), odd epochs
  ``--concurrency`` at a time (cold throughput);
* ``plots/kl.png`` (KL over all epochs) is cold only once per server: ``--restarts`` (3)
  fresh servers give its cold latency;
* the dashboard's pages, warm: the runs page ``/`` (its first 50 runs) and the trained
  run's page ``/ui/runs/{id}``, with ``--catalog-runs`` (200) runs in the catalog: a
  temporary data directory gets small synthetic runs (4-6-2 MLP, 2 epochs each) beside the
  trained one; a ``--data-dir`` is measured as it is, never written to. Warm pages come
  from the dashboard's page cache (until the catalog changes); ``--page-misses`` also
  measures each page made anew every time (``?nocache=<n>``-like distinct URLs: the cost
  right after a change of the catalog). ``--pages-only`` skips the analysis endpoints.

* ``--client raw``: the load generator writes each request as bytes and reads the answer
  by its Content-Length over asyncio streams (~0.1 ms of CPU per request) instead of httpx
  (~1.2-1.5 ms, more than a warm answer costs the server: with both on 2 cores httpx caps
  the rate near 700 req/s whatever the server does);
* ``--compare PRESET[@TREE],...``: the warm JSON tables only, on each server in turn
  (``h11``, ``httptools``, ``httptools+uvloop``: uvicorn's parser and event loop; ``@TREE``
  serves another source tree, e.g. ``git archive HEAD | tar -x -C /tmp/base``), ``--rounds``
  rounds alternating their order, medians per server: ratios that hold on a shared machine.

    python benchmarks/service_load.py [--data-dir DIR --run-id ID] [--requests 500]
    python benchmarks/service_load.py --epochs 2 --n-train 256 --requests 100 --no-cold  # short
    python benchmarks/service_load.py --data-dir DIR --run-id ID --client raw \
        --compare h11@/tmp/base,httptools+uvloop@/tmp/base,httptools+uvloop --rounds 5

Targets: warm JSON tables p50 <= 20 ms and >= 800 requests/s at concurrency 8 (2 cores,
issue 11; 300 before); warm pages p50 <= 50 ms at concurrency 8; a cold KL table <= 200
ms; a cold PNG <= 1.5 s. The machine may be shared: the load average is printed with the
figures; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TARGETS = {  # the targets
    "warm p50 ms": 20.0,
    "warm req/s": 800.0,
    "warm page p50 ms": 50.0,
    "cold KL ms": 200.0,
    "cold PNG ms": 1500.0,
}


def train_run(data_dir: Path, epochs: int, n_train: int) -> str:
    from trainer.store import RunStore
    from trainer.train import train

    config = {
        "dataset": "mnist", "widths": [1200, 1200], "epochs": epochs, "n_train": n_train,
        "n_test": 1000, "batch_size": 128, "eval_samples": 2, "grad_capture": "element",
        "prior": "learnable", "seed": 0, "device": "cpu", "name": "service-load",
    }  # fmt: skip
    t0 = time.perf_counter()
    with RunStore(data_dir) as store:
        result = train(config, sink=store, progress=False)
    size = sum(p.stat().st_size for p in (data_dir / "runs" / result.run_id).iterdir())
    print(
        f"trained run {result.run_id}: 784-1200-1200-10, {len(result.captured_epochs)} captured "
        f"epochs, n_train {n_train}, in {time.perf_counter() - t0:.0f} s, {size / 1e6:.0f} MB"
    )
    return str(result.run_id)


def add_catalog_runs(data_dir: Path, total: int) -> int:
    """Small synthetic runs until the catalog holds ``total`` runs; how many it holds."""
    from service.analysis.synthetic import synthetic_snapshot
    from trainer.store import RunStatus, RunStore

    t0 = time.perf_counter()
    with RunStore(data_dir) as store:
        have = len(store.list_runs())
        for i in range(have, total):
            config = {
                "dataset": "regression", "prior": ("learnable", "fixed")[i % 2],
                "prior_mode": "gradient", "widths": [6], "epochs": 2, "seed": i,
            }  # fmt: skip
            run = store.create_run(f"catalog-{i:03d}", config, [f"group{i % 5}"]).id
            for e in range(2):
                snap = synthetic_snapshot(e, (4, 6, 2), seed=i)
                snap.metrics["test_rmse"] = 0.5 / (1 + e) + i / 1000
                store.write_epoch(run, snap)
            store.set_status(run, RunStatus.COMPLETED if i % 7 else RunStatus.FAILED)
        have = max(have, total)
    print(f"catalog: {have} runs ({time.perf_counter() - t0:.0f} s to add the synthetic ones)")
    return have


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --compare presets: uvicorn's HTTP parser and event loop
PRESETS = {
    "h11": ("h11", "asyncio"),  # uvicorn without extras (pure-Python parser)
    "httptools": ("httptools", "asyncio"),
    "httptools+uvloop": ("httptools", "uvloop"),  # uvicorn[standard]'s "auto"
}


@dataclass(frozen=True)
class Variant:
    """A server configuration of ``--compare``: ``PRESET[@TREE]`` (TREE: another source
    tree, e.g. ``git archive HEAD | tar -x -C /tmp/base``, to compare code versions)."""

    label: str
    http: str
    loop: str
    tree: Path = REPO

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, _, tree = spec.partition("@")
        if name not in PRESETS:
            raise ValueError(f"unknown server preset {name!r}; one of {list(PRESETS)}")
        return cls(spec, *PRESETS[name], Path(tree).resolve() if tree else REPO)


class Server:
    """``python -m service.cli serve`` on a free loopback port, in its own process group.

    With a :class:`Variant`: ``python -m uvicorn --factory service.app:create_app`` (what
    ``bnn serve`` runs, spelled so that any source tree serves it) with that variant's
    parser and loop, from its tree.
    """

    def __init__(self, data_dir: Path, log: Path, variant: Variant | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tree = REPO if variant is None else variant.tree
        env = {k: v for k, v in os.environ.items() if not k.startswith("BNN_")}
        env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
        if variant is None:
            args = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
            args += ["--port", str(self.port), "--data-dir", str(data_dir)]
        else:
            env["BNN_DATA_DIR"] = str(data_dir)
            args = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app"]
            args += ["--host", "127.0.0.1", "--port", str(self.port)]
            args += ["--http", variant.http, "--loop", variant.loop]
        args += ["--log-level", "warning"]
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, cwd=tree, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"server not ready in 60 s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@dataclass
class Result:
    name: str
    phase: str
    concurrency: int
    latencies_ms: list[float]
    wall_s: float
    load: float

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s


async def _fetch(base: str, urls: list[str], concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(reversed(urls))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:

        async def worker() -> None:
            while queue:
                url = queue.pop()
                t0 = time.perf_counter()
                response = await client.get(url)
                latencies.append((time.perf_counter() - t0) * 1e3)
                if response.status_code != 200:
                    raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:300]}")
                await response.aread()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(urls)))))
        return latencies, time.perf_counter() - t0


async def _fetch_raw(base: str, urls: list[str], concurrency: int) -> tuple[list[float], float]:
    """What :func:`_fetch` does, with the least client work: one keep-alive connection per
    worker, each request written as bytes, the response read by its Content-Length (every
    response measured here has one), the status checked. httpx costs ~1.2-1.5 ms of CPU
    per request, more than the server's warm answer: on 2 shared cores it caps the rate."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    queue = list(reversed(urls))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while queue:
                url = queue.pop()
                t0 = time.perf_counter()
                writer.write(f"GET {url} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(
                    line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line
                )
                length = {k.strip().lower(): v for k, v in fields.items()}.get(b"content-length")
                if length is None:
                    raise RuntimeError(f"GET {url}: no Content-Length (use --client httpx)")
                body = await reader.readexactly(int(length))
                latencies.append((time.perf_counter() - t0) * 1e3)
                if head[9:12] != b"200":
                    raise RuntimeError(f"GET {url}: {head[9:12].decode()} {body[:300]!r}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(urls)))))
    return latencies, time.perf_counter() - t0


CLIENTS = {"httpx": _fetch, "raw": _fetch_raw}
CLIENT = ["httpx"]  # --client


def measure(name: str, phase: str, base: str, urls: list[str], concurrency: int) -> Result:
    latencies, wall = asyncio.run(CLIENTS[CLIENT[0]](base, urls, concurrency))
    return Result(name, phase, concurrency, latencies, wall, os.getloadavg()[0])


def endpoints(run: str, epochs: list[int]) -> dict[str, list[str]]:
    return {
        "kl": [f"/runs/{run}/kl?epoch={e}" for e in epochs],
        "stats": [f"/runs/{run}/stats?epoch={e}" for e in epochs],
        "gradients/outliers": [f"/runs/{run}/gradients/outliers?epoch={e}&k=10" for e in epochs],
        "plots/epoch.png": [f"/runs/{run}/plots/epoch.png?epoch={e}" for e in epochs],
    }


def pages(run: str, misses: int = 0) -> dict[str, list[str]]:
    """The dashboard's pages (HTML): the runs page and the trained run's page; with
    ``misses``, as many distinct URLs of each (a page the cache does not hold yet: the
    runs page sorted by name, then by each status; the run page at each table)."""
    out = {"page /": ["/"], "page /ui/runs/{id}": [f"/ui/runs/{run}"]}
    if misses:  # the same work as the plain page, under URLs never asked before
        out["page / (made anew)"] = [f"/?q=&order=desc&page=1&tag={'+' * i}" for i in range(misses)]
        out["page /ui/runs/{id} (made anew)"] = [
            f"/ui/runs/{run}?{'&' * (i + 1)}" for i in range(misses)
        ]
    return out


def target_of(r: Result) -> list[tuple[str, float, float]]:
    """(label, measured, target) pairs that apply to a result."""
    out = []
    if r.name.startswith("page "):
        if r.phase == "warm" and r.concurrency > 1 and "anew" not in r.name:
            out += [("p50 ms", r.pct(50), TARGETS["warm page p50 ms"])]
        return out
    if r.phase == "warm" and r.concurrency > 1 and not r.name.endswith(".png"):
        out += [("p50 ms", r.pct(50), TARGETS["warm p50 ms"])]
        out += [("req/s", r.rps, TARGETS["warm req/s"])]
    if r.phase == "cold" and r.concurrency == 1 and r.name == "kl":
        out += [("p50 ms", r.pct(50), TARGETS["cold KL ms"])]
    if r.phase == "cold" and r.concurrency == 1 and r.name.endswith(".png"):
        out += [("p50 ms", r.pct(50), TARGETS["cold PNG ms"])]
    return out


def report(results: list[Result]) -> None:
    print("\n| endpoint | phase | concurrency | requests | p50 ms | p99 ms | req/s | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.name} | {r.phase} | {r.concurrency} | {len(r.latencies_ms)} | "
            f"{r.pct(50):.1f} | {r.pct(99):.1f} | {r.rps:.0f} | {r.load:.2f} |"
        )
    print("\n| target | measured | limit | ratio (measured / limit) | met |")
    print("|---|---|---|---|---|")
    for r in results:
        for label, value, limit in target_of(r):
            higher = label == "req/s"
            met = value >= limit if higher else value <= limit
            print(
                f"| {r.phase} {r.name} {label} (c={r.concurrency}) | {value:.1f} | "
                f"{'>=' if higher else '<='} {limit:g} | {value / limit:.2f} | "
                f"{'yes' if met else 'NO'} |"
            )


def compare(
    data_dir: Path, run: str, epochs: list[int], variants: list[Variant], args: argparse.Namespace,
    log: Path,
) -> None:  # fmt: skip
    """Warm JSON tables at ``--concurrency`` on each variant's server in turn, ``--rounds``
    rounds (the order reversed every other round); medians per variant and endpoint, and
    the server's and the client's CPU time per request (steadier than rates on a shared
    machine: the two share its cores)."""
    tables = {k: v for k, v in endpoints(run, epochs).items() if not k.endswith(".png")}
    got: dict[tuple[str, str], list[Result]] = {}
    cpu: dict[str, list[tuple[float, float]]] = {}  # (server, client) CPU ms per request
    c = args.concurrency
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            server = Server(data_dir, log, variant)
            try:
                for name, group in tables.items():
                    measure(name, "prime", server.url, group, c)
                    cycle = [group[i % len(group)] for i in range(args.requests)]
                    s0, c0 = process_cpu_s(server.proc.pid), time.process_time()
                    result = measure(name, "warm", server.url, cycle, c)
                    s1, c1 = process_cpu_s(server.proc.pid), time.process_time()
                    n = len(cycle) / 1e3
                    cpu.setdefault(variant.label, []).append(((s1 - s0) / n, (c1 - c0) / n))
                    got.setdefault((variant.label, name), []).append(result)
                    got.setdefault((variant.label, "all tables"), []).append(result)
            finally:
                server.stop()
            print(f"round {r + 1}/{args.rounds}: {variant.label} done", flush=True)

    def rps(label: str, name: str) -> list[float]:
        results = got[(label, name)]
        if name != "all tables":
            return [x.rps for x in results]
        k = len(tables)  # one sum per round: requests / wall over the round's tables
        return [
            sum(len(x.latencies_ms) for x in results[i : i + k])
            / sum(x.wall_s for x in results[i : i + k])
            for i in range(0, len(results), k)
        ]

    first = variants[0].label
    print(f"\nwarm JSON tables, concurrency {c}, {args.requests} requests per endpoint and round, ")
    print(f"{args.rounds} rounds (medians; req/s min-max over the rounds)\n")
    print("| server | endpoint | req/s | req/s min-max | p50 ms | p99 ms | req/s / first |")
    print("|---|---|---|---|---|---|---|")
    for name in [*tables, "all tables"]:
        base = statistics.median(rps(first, name))
        for v in variants:
            xs = rps(v.label, name)
            lat = [q for x in got[(v.label, name)] for q in x.latencies_ms]
            one = Result(name, "warm", c, lat, 1.0, 0.0)
            print(
                f"| {v.label} | {name} | {statistics.median(xs):.0f} | {min(xs):.0f}-{max(xs):.0f} "
                f"| {one.pct(50):.1f} | {one.pct(99):.1f} | {statistics.median(xs) / base:.2f} |"
            )
    print(f"\nCPU time per warm request (median over endpoints and rounds; client: {CLIENT[0]})\n")
    print("| server | server CPU ms / request | client CPU ms / request |")
    print("|---|---|---|")
    for v in variants:
        server_ms = statistics.median(x for x, _ in cpu[v.label])
        client_ms = statistics.median(y for _, y in cpu[v.label])
        print(f"| {v.label} | {server_ms:.3f} | {client_ms:.3f} |")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="an existing data directory (with --run-id)")
    parser.add_argument("--run-id", help="a finished run in --data-dir")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=500, help="warm requests per endpoint")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--restarts", type=int, default=3, help="cold samples of plots/kl.png")
    parser.add_argument("--catalog-runs", type=int, default=200, help="runs in the catalog")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold phases (shorter)")
    parser.add_argument("--pages-only", action="store_true", help="measure the pages only")
    parser.add_argument(
        "--page-misses", action="store_true", help="also pages made anew at each request"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.add_argument(
        "--compare",
        metavar="PRESET[@TREE],...",
        help=f"warm JSON tables only, on each of these servers in turn (presets {list(PRESETS)})",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--compare: rounds")
    parser.add_argument(
        "--client",
        choices=list(CLIENTS),
        default="httpx",
        help="load generator: httpx (default) or raw (bytes over asyncio streams: less CPU)",
    )
    args = parser.parse_args()
    CLIENT[0] = args.client
    if (args.data_dir is None) != (args.run_id is None):
        parser.error("--data-dir and --run-id go together")
    print(f"CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()}")
    tmp = Path(tempfile.mkdtemp(prefix="bnn-load-"))
    try:
        data_dir = args.data_dir or tmp / "data"
        run = args.run_id or train_run(data_dir, args.epochs, args.n_train)
        from trainer.store import RunStore

        with RunStore(data_dir, create=False) as store:
            epochs = [e.epoch for e in store.list_epochs(run)]
            runs_in_catalog = len(store.list_runs())
        if args.data_dir is None:
            runs_in_catalog = add_catalog_runs(data_dir, args.catalog_runs)
        log = tmp / "server.log"
        if args.compare:
            variants = [Variant.parse(v.strip()) for v in args.compare.split(",") if v.strip()]
            compare(data_dir, run, epochs, variants, args, log)
            return
        urls = {} if args.pages_only else endpoints(run, epochs)
        results: list[Result] = []
        c = args.concurrency
        for name, group in urls.items() if not args.no_cold else ():  # cold: a fresh server each
            server = Server(data_dir, log)
            try:
                results.append(measure(name, "cold", server.url, group[0::2], 1))
                results.append(measure(name, "cold", server.url, group[1::2], c))
            finally:
                server.stop()
        kl_png: list[float] = []
        for _ in range(args.restarts if not (args.no_cold or args.pages_only) else 0):
            server = Server(data_dir, log)
            try:
                kl_png += measure("", "", server.url, [f"/runs/{run}/plots/kl.png"], 1).latencies_ms
            finally:
                server.stop()
        load = os.getloadavg()[0]
        if kl_png:
            results.append(Result("plots/kl.png", "cold", 1, kl_png, sum(kl_png) / 1e3, load))
        print(f"pages measured with {runs_in_catalog} runs in the catalog")
        server = Server(data_dir, log)
        try:  # warm
            misses = args.requests if args.page_misses else 0
            for name, group in {**urls, **pages(run, misses)}.items():
                anew = "anew" in name
                if not anew:
                    measure(name, "prime", server.url, group, c)
                n = args.requests if not name.endswith(".png") else args.requests // 2
                if anew:  # each URL once per phase: the two phases get their own
                    half = len(group) // 2
                    results.append(measure(name, "warm", server.url, group[:half], 1))
                    results.append(measure(name, "warm", server.url, group[half:], c))
                    continue
                cycle = [group[i % len(group)] for i in range(n)]
                results.append(measure(name, "warm", server.url, cycle, 1))
                results.append(measure(name, "warm", server.url, cycle, c))
        finally:
            server.stop()
        report(results)
        print(f"\nload average at end: {os.getloadavg()}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
