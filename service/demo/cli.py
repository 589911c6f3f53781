"""``bnn demo regression|mnist`` and ``bnn sweep width|optim``: the parsers and handlers
that :mod:`service.cli` adds. Heavy imports (torch, Dask, analysis) happen in handlers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.errors import BnnError

__all__ = ["add_demo_commands"]

Handler = Callable[[argparse.Namespace], int]


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _names(text: str) -> list[str]:
    return [p for p in text.replace(" ", "").split(",") if p]


def _arm_names(text: str) -> list[str]:
    """Comma-separated arm names; commas inside parentheses belong to the name, as in
    ``fixed N(0,1)``."""
    names, depth, part = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth <= 0:
            names.append(part.strip())
            part = ""
        else:
            part += ch
    return [n for n in [*names, part.strip()] if n]


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the seven priors compared (paired seeds, 95%% CIs) with every diagnostic, a report",
        description=(
            "Run the standard comparison of priors (service.demo.protocol) on Dask into "
            "OUT/bnn-data and write OUT/report.html, report.md and summary.json: results with "
            "95% CIs, which differences are significant, then the predictive fit (regression) "
            "or calibration and OOD entropy (mnist) and the diagnostics of the first seed's runs."
        ),
    )
    p.add_argument(
        "task",
        choices=["regression", "mnist"],
        help="regression: the seed's 1-D task, 1-32-32-1; mnist: 784-400-400-10",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="folder for report.html/.md, img/, bnn-data/"
    )
    p.add_argument(
        "--full", action="store_true", help="mnist: 784-1200-1200-10, 50 epochs (GPU-sized)"
    )
    p.add_argument(
        "--seeds", type=_ints, metavar="S,S", help="paired seeds (regression 0-4, mnist 0-2)"
    )
    p.add_argument(
        "--arms",
        type=_arm_names,
        metavar="A,B",
        help="a subset of the arms, comma-separated (e.g. 'fixed N(0,1),EB burn-in')",
    )
    p.add_argument("--workers", type=int, default=2, help="local Dask worker processes (2)")
    p.add_argument(
        "--tune-epochs", type=int, help="epochs per tuning run (regression 50, mnist 3, full 20)"
    )
    p.add_argument("--temper", action="store_true", help="add kl_weight 0.1/1 to every tuning grid")
    p.add_argument("--epochs", type=int, help="epochs per run (regression 100, mnist 5, full 50)")
    p.add_argument("--widths", type=_ints, metavar="N,N", help="hidden layer widths, e.g. 32,32")
    p.add_argument(
        "--n-train", type=int, help="training examples (regression 1024, mnist 10000, --full all)"
    )
    p.add_argument("--n-test", type=int, help="test examples (default: all)")
    p.add_argument("--eval-samples", type=int, help="posterior samples for the test metrics")
    p.add_argument("--capture-every", type=int, help="capture every N epochs (25 / 1 / 5)")
    p.add_argument("--device", help="auto, cpu or cuda (default auto)")
    p.add_argument("--n-ood", type=int, default=2000, help="mnist: images per OOD set")
    p.add_argument("--fashion-dir", help="mnist: folder with t10k-images-idx3-ubyte[.gz]")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")


def _sweep_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="a width or optimiser study on Dask, with a report")
    p.add_argument(
        "kind",
        choices=["width", "optim"],
        help="width: one run per width and prior; optim: optimiser x clipping x annealing x "
        "schedule",
    )
    p.add_argument(
        "--dataset",
        default="regression",
        choices=["regression", "mnist", "fashion_mnist", "kmnist"],
        help="the dataset of every run (default: regression)",
    )
    p.add_argument(
        "--widths",
        type=_ints,
        metavar="N,N",
        help="width: the widths to sweep (25,...,800); optim: hidden widths",
    )
    p.add_argument("--depth", type=int, help="width: hidden layers of each width (dataset default)")
    p.add_argument(
        "--prior",
        "--priors",
        dest="priors",
        type=_names,
        help="fixed,learnable (width default: learnable)",
    )
    p.add_argument(
        "--optimizers", type=_names, help="optim: the optimisers to compare, e.g. sgd,adam,adamw"
    )
    p.add_argument(
        "--clip", type=float, default=1.0, help="optim: the max gradient norm when clipping is on"
    )
    p.add_argument("--anneal-epochs", type=int, help="optim: KL warm-up epochs when on (epochs/4)")
    p.add_argument(
        "--lr-schedule",
        default="cosine",
        choices=["cosine", "step"],
        help="optim: the schedule when on",
    )
    p.add_argument(
        "--design",
        default="half",
        choices=["half", "full"],
        help="optim: half (24 runs) or full (48) factorial",
    )
    p.add_argument("--target", type=float, help="optim: accuracy (or RMSE) for epochs-to-target")
    for flag, typ, text in (
        ("--epochs", int, "training epochs of every run"),
        ("--n-train", int, "training examples"),
        ("--n-test", int, "test examples"),
        ("--batch-size", int, "examples per step"),
        ("--lr", float, "learning rate"),
        ("--capture-every", int, "capture the parameters every N epochs (and the last)"),
        ("--eval-samples", int, "posterior samples for the test metrics"),
        ("--seed", int, "random seed of every run"),
    ):
        p.add_argument(flag, type=typ, help=f"{text} (default: --config's, else as in bnn train)")
    p.add_argument("--config", type=Path, help="JSON file with base configuration fields")
    p.add_argument("--name", help="a name for the sweep")
    p.add_argument("--out", type=Path, help="report folder (default: sweep-<id>)")
    p.add_argument("--data-dir", help="run store (default: $BNN_DATA_DIR or ./bnn-data)")
    p.add_argument("--db-url", help="catalog URL (default: $BNN_DATABASE_URL or SQLite)")
    p.add_argument(
        "--workers", type=int, default=2, help="local Dask worker processes (default: 2)"
    )
    p.add_argument("--dask-scheduler", help="a Dask scheduler address instead of a local cluster")
    p.add_argument(
        "--service", metavar="URL", help="submit to a bnn service (POST /sweeps) instead"
    )


def _study_parser(sub: Any) -> None:
    p = sub.add_parser(
        "study",
        help="arms x paired seeds, tuned on validation, with 95%% CIs and paired differences",
        description=(
            "Train a study on Dask and write its report. --preset regression|mnist is the "
            "project's seven-arm comparison of priors (service.demo.protocol); --spec FILE "
            "reads a StudySpec JSON instead."
        ),
    )
    p.add_argument("--preset", choices=["regression", "mnist"], help="the standard comparison")
    p.add_argument("--spec", type=Path, help="a StudySpec JSON file (instead of --preset)")
    p.add_argument(
        "--arms",
        type=_arm_names,
        help="preset: a subset of the arms, e.g. 'fixed N(0,1),EB burn-in'",
    )
    p.add_argument("--seeds", type=_ints, help="evaluation seeds (regression 0-4, mnist 0-2)")
    p.add_argument("--temper", action="store_true", help="preset: add kl_weight 0.1/1 to grids")
    p.add_argument("--tune-epochs", type=int, help="epochs of each tuning run (default: epochs)")
    for flag, typ, text in (
        ("--epochs", int, "training epochs of every run"),
        ("--n-train", int, "training examples"),
        ("--n-test", int, "test examples"),
        ("--eval-samples", int, "posterior samples for the test metrics"),
        ("--capture-every", int, "capture the parameters every N epochs (and the last)"),
    ):
        p.add_argument(flag, type=typ, help=f"{text} (default: the preset's or the spec's)")
    p.add_argument("--widths", type=_ints, metavar="N,N", help="hidden layer widths, e.g. 32,32")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--name", help="a name for the study")
    p.add_argument("--out", type=Path, help="report folder (default: study-<id>)")
    p.add_argument("--data-dir", help="run store (default: $BNN_DATA_DIR or ./bnn-data)")
    p.add_argument("--db-url", help="catalog URL (default: $BNN_DATABASE_URL or SQLite)")
    p.add_argument(
        "--workers", type=int, default=2, help="local Dask worker processes (default: 2)"
    )
    p.add_argument("--dask-scheduler", help="a Dask scheduler address instead of a local cluster")


def add_demo_commands(sub: Any) -> dict[str, Handler]:
    """Add ``demo``, ``sweep`` and ``study`` to ``bnn``'s subparsers; returns the handlers."""
    _demo_parser(sub)
    _sweep_parser(sub)
    _study_parser(sub)
    return {"demo": _cmd_demo, "sweep": _cmd_sweep, "study": _cmd_study}


def study_spec_from_args(args: argparse.Namespace) -> Any:
    """The StudySpec that ``bnn study`` options describe."""
    from service.demo.protocol import protocol_spec
    from service.demo.study import StudySpec

    overrides = {
        key: value
        for key, value in {
            "epochs": args.epochs,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "eval_samples": args.eval_samples,
            "capture_every": args.capture_every,
            "widths": args.widths,
            "device": args.device,
        }.items()
        if value is not None
    }
    try:
        if args.spec is not None:
            if args.preset:
                raise BnnError.invalid("give either --preset or --spec, not both")
            data = json.loads(args.spec.read_text())
            data["base"] = {**data.get("base", {}), **overrides}
            if args.seeds:
                data["seeds"] = args.seeds
            return StudySpec.model_validate(data)
        if not args.preset:
            raise BnnError.invalid("`bnn study` needs --preset regression|mnist or --spec FILE")
        return protocol_spec(
            args.preset,
            seeds=args.seeds,
            base=overrides,
            arms=args.arms,
            temper=args.temper,
            tune_epochs=args.tune_epochs,
            name=args.name,
        )
    except (ValueError, OSError) as exc:
        raise BnnError.invalid(f"bad study: {exc}") from None


def _cmd_study(args: argparse.Namespace) -> int:
    from service.demo.study import run_study_local
    from service.demo.study_report import (
        collect_study,
        display_summary,
        significance_sentences,
        write_study_report,
    )
    from trainer.store import RunStore

    spec = study_spec_from_args(args)
    data_dir = Path(args.data_dir or os.environ.get("BNN_DATA_DIR") or "bnn-data")
    db_url = args.db_url or os.environ.get("BNN_DATABASE_URL")
    t0 = time.perf_counter()
    sweep = run_study_local(
        spec, data_dir, db_url=db_url, workers=args.workers, scheduler=args.dask_scheduler
    )
    out = args.out or Path(f"study-{sweep.id}")
    command = "bnn " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
    with RunStore(data_dir, db_url) as store:
        sweep = store.get_sweep(sweep.id)
        html, _md, tables = write_study_report(store, sweep, out, command=command)
        data = collect_study(store, sweep)
    print(display_summary(data, tables).to_string(), file=sys.stderr)
    for line in significance_sentences(data, tables):
        print(line.replace("**", ""), file=sys.stderr)
    print(f"study {sweep.id} in {time.perf_counter() - t0:.0f} s: report {html}", file=sys.stderr)
    print(sweep.id)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import shlex

    kwargs: dict[str, Any] = {
        "seeds": args.seeds,
        "arms": args.arms,
        "epochs": args.epochs,
        "widths": args.widths,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "capture_every": args.capture_every,
        "eval_samples": args.eval_samples,
        "tune_epochs": args.tune_epochs,
        "temper": args.temper,
        "device": args.device,
        "workers": args.workers,
        "progress": not args.no_progress,
        "command": ("bnn " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name == "bnn" else None),
    }
    t0 = time.perf_counter()
    if args.task == "regression":
        from service.demo.regression import run_regression_demo

        if args.full:
            raise BnnError.invalid("--full is for `bnn demo mnist`")
        result = run_regression_demo(args.out, **kwargs)
    else:
        from service.demo.mnist import run_mnist_demo

        result = run_mnist_demo(
            args.out, full=args.full, n_ood=args.n_ood, fashion_dir=args.fashion_dir, **kwargs
        )
    print(result.summary.to_string(), file=sys.stderr)
    for line in result.significance:
        print(line.replace("**", ""), file=sys.stderr)
    print(
        f"study {result.study_id} and report in {time.perf_counter() - t0:.0f} s: {result.html}",
        file=sys.stderr,
    )
    print(result.html)
    return 0


def _base(args: argparse.Namespace) -> dict[str, Any]:
    base: dict[str, Any] = {}
    if args.config is not None:
        try:
            base = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BnnError.invalid(f"cannot read config file {args.config}: {exc}") from None
    base["dataset"] = args.dataset
    for key in (
        "epochs",
        "n_train",
        "n_test",
        "batch_size",
        "lr",
        "capture_every",
        "eval_samples",
        "seed",
    ):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    return base


def _spec(args: argparse.Namespace) -> Any:
    from service.demo.sweeps import SweepSpec
    from trainer.config import DATASET_DEFAULTS, Dataset

    base, grid = _base(args), {}
    if args.kind == "width":
        if not args.widths:
            raise BnnError.invalid("`bnn sweep width` needs --widths, e.g. 25,50,100,200,400,800")
        if len(set(args.widths)) < 2:  # a width study relates priors to width: 2+ widths
            raise BnnError.invalid(
                f"`bnn sweep width` needs at least 2 different --widths, got {args.widths}"
            )
        depth = args.depth or len(
            base.get("widths") or DATASET_DEFAULTS[Dataset(args.dataset)]["widths"]
        )
        base["widths"] = [args.widths[0]] * depth
        grid = {"widths": args.widths, "prior": args.priors or ["learnable"]}
    else:
        if args.widths:
            base["widths"] = args.widths
        grid = {
            "grad_clip": [None, args.clip],
            "kl_anneal_epochs": [0, args.anneal_epochs],
            "lr_schedule": ["none", args.lr_schedule],
        }
        if args.optimizers:
            grid["optimizer"] = args.optimizers
        if args.priors:
            grid["prior"] = args.priors
    try:
        return SweepSpec(
            kind=args.kind,
            name=args.name,
            base=base,
            grid=grid,
            design=args.design,
            target=args.target,
        )
    except ValueError as exc:
        raise BnnError.invalid(f"bad sweep: {exc}") from None


def _cmd_sweep(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.service:
        return _sweep_on_service(args, spec)
    from service.demo.studies import study_table, write_study_report
    from service.demo.sweeps import run_sweep_local
    from trainer.store import RunStore

    data_dir = Path(args.data_dir or os.environ.get("BNN_DATA_DIR") or "bnn-data")
    db_url = args.db_url or os.environ.get("BNN_DATABASE_URL")
    sweep = run_sweep_local(
        spec, data_dir, db_url=db_url, workers=args.workers, scheduler=args.dask_scheduler
    )
    out = args.out or Path(f"sweep-{sweep.id}")
    with RunStore(data_dir, db_url) as store:
        sweep = store.get_sweep(sweep.id)
        write_study_report(store, sweep, out)
        table = study_table(store, sweep)
    print(table.to_string(float_format=lambda v: f"{v:.4g}"), file=sys.stderr)
    print(
        f"sweep {sweep.id}: report {out / 'report.html'}, table {out / 'study.csv'}",
        file=sys.stderr,
    )
    print(sweep.id)
    return 0


def _sweep_on_service(args: argparse.Namespace, spec: Any) -> int:
    from service.client import Client

    token = os.environ.get("BNN_API_TOKEN") or None
    with Client(args.service, token=token) as client:
        sweep = client.start_sweep(spec)
        print(
            f"sweep {sweep['id']}: {len(sweep['runs'])} runs submitted to {args.service}",
            file=sys.stderr,
        )
        sweep = client.wait_sweep(sweep["id"], timeout=None)
        out = args.out or Path(f"sweep-{sweep['id']}")
        out.mkdir(parents=True, exist_ok=True)
        if sweep.get("study") is not None:
            client.sweep_table(sweep["id"]).to_csv(out / "study.csv", index=False)
            for url in sweep.get("plots", []):
                name = url.rsplit("/", 1)[-1].removesuffix(".png")
                (out / f"{name}.png").write_bytes(client.sweep_plot(sweep["id"], name))
        (out / "sweep.json").write_text(json.dumps(sweep, indent=2))
    print(f"sweep {sweep['id']}: {sweep['counts']}; results in {out}", file=sys.stderr)
    print(sweep["id"])
    return 0
