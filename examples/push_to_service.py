"""Report a run from your own training loop to a bnn service, then ask it for analysis.

Without ``--url`` a service is started in this process (uvicorn on a free loopback port,
data in a temporary folder); with ``--url http://host:8000`` the run goes to that
service (``$BNN_API_TOKEN`` is sent as the Bearer token). Each epoch's
``get_all_distribution_params`` becomes an :class:`~trainer.EpochSnapshot` that
:class:`~trainer.remote.HttpRunSink` uploads (an idempotent, retried ``PUT``); the
service then serves the pairwise KL table, the metrics and plots of the run, read here
with :class:`service.client.Client` (DataFrames and PNG bytes).

    python examples/push_to_service.py                          # in-process service
    python examples/push_to_service.py --url http://127.0.0.1:8000
    python examples/push_to_service.py --tiny                   # CI (or BNN_EXAMPLES_TINY=1)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from service.client import Client
from trainer import EpochSnapshot, PriorSpec, get_all_distribution_params, mlp, model_kl
from trainer.data import make_regression
from trainer.remote import HttpRunSink


@contextlib.contextmanager
def local_service(data_dir: Path) -> Iterator[str]:
    """A bnn service in a background thread of this process; yields its URL."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(data_dir=data_dir, host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-process service did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def train_and_push(url: str, epochs: int, n: int) -> str:
    """Train a small BNN in a hand-written loop, reporting every epoch to ``url``."""
    torch.manual_seed(0)
    data = make_regression(n, 128, seed=0)
    model = mlp(1, [16], 1, PriorSpec(kind="learnable"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    token = os.environ.get("BNN_API_TOKEN") or None
    with HttpRunSink(url, token=token) as sink:
        # the config describes the run in the catalog (any TrainConfig fields)
        run = sink.create_run(
            "own-loop-example",
            {"dataset": "regression", "widths": [16], "epochs": epochs, "n_train": n},
            tags=["example"],
        )
        for epoch in range(epochs):
            optimizer.zero_grad()
            loss = F.mse_loss(model(data.x_train), data.y_train) + model_kl(model) / n
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                rmse = F.mse_loss(model(data.x_test), data.y_test).sqrt().item()
            params = get_all_distribution_params(model, epoch, step_size=1)
            assert params is not None
            snap = EpochSnapshot(epoch, params, metrics={"loss": loss.item(), "test_rmse": rmse})
            sink.write_epoch(run.id, snap)  # PUT /runs/{id}/epochs/{epoch}
        sink.set_status(run.id, "completed")
    return str(run.id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running bnn service (default: start one in-process)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="a few epochs (CI)")
    args = parser.parse_args()
    tiny = args.tiny or os.environ.get("BNN_EXAMPLES_TINY") == "1"
    epochs, n = (3, 64) if tiny else (args.epochs, 512)
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnn-example-"))
            url = stack.enter_context(local_service(Path(tmp) / "data"))
            print(f"started a bnn service in-process at {url}")
        run_id = train_and_push(url, epochs, n)
        with Client(url, token=os.environ.get("BNN_API_TOKEN") or None) as client:
            run = client.run(run_id)
            print(f"run {run_id}: {run['status']}, epochs {run['epochs']}")
            rmse = client.metrics(run_id, "test_rmse")["test_rmse"]
            print("test RMSE per epoch:", [round(v, 4) for v in rmse])
            kl = client.kl_table(run_id, epoch=epochs - 1)  # a DataFrame, one row per layer
            print("pairwise KL table:")
            print(kl.to_string(index=False))
            png = client.plot(run_id, "kl")
            print(f"KL plot: {len(png)} bytes of PNG from /runs/{run_id}/plots/kl.png")


if __name__ == "__main__":
    main()
