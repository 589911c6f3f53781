"""The ``bnn`` command line: ``bnn train``, ``bnn runs``, ``bnn runs show|compact ID``,
``bnn serve``, ``bnn push RUN_ID --to URL``, and (from :mod:`service.demo.cli`)
``bnn demo regression|mnist`` and ``bnn sweep width|optim``.

``bnn train`` takes one option per field of :class:`trainer.config.TrainConfig` (so the
command line and the Python API never drift apart) and prints the run id as its last
line. Errors print ``error: <message>`` and exit with status 2; nothing already written
is removed. A run that diverges (non-finite loss or gradients, ``--on-divergence stop``)
prints ``error: run ID diverged: ...``, still prints its id last, and exits with status 3.
Options are named by their flags in errors (``--capture-every``, not ``capture_every``).
Output cut short by its reader (``bnn runs | head``) ends quietly with status 141.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.demo.cli import add_demo_commands
from trainer.errors import BnnError

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from trainer.config import TrainConfig

__all__ = ["build_parser", "main"]

DEFAULT_DATA_DIR = "bnn-data"
EXIT_DIVERGED = 3  # `bnn train`: the run stopped because it diverged
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`bnn runs | head`)
# Options spelled differently from the config field they set.
_ALIASES = {"grad_capture": ["--capture-level", "--grad-capture"], "tags": ["--tag"]}


def _choices(name: str) -> list[str] | None:
    """The choices of a field typed ``str`` that a validator restricts, else None."""
    if name == "activation":
        from trainer.activations import Activation

        return [a.value for a in Activation]
    return None


def _train_config() -> type[TrainConfig]:
    """:class:`TrainConfig`, imported when a command needs it (pydantic costs ~0.1 s)."""
    from trainer.config import TrainConfig

    return TrainConfig


def _data_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("BNN_DATA_DIR") or DEFAULT_DATA_DIR)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _unwrap_optional(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


# Fields the trainer fills in itself.
_NOT_OPTIONS = {"resolved_priors"}


def flag_of(name: str) -> str:
    """The command-line flag of the :class:`TrainConfig` field ``name`` (``--capture-every``
    for ``capture_every``, ``--capture-level`` for ``grad_capture``)."""
    return _ALIASES.get(name, [f"--{name.replace('_', '-')}"])[0]


@cache
def _field_words() -> re.Pattern[str]:
    """Field names as they appear in descriptions and validation messages: the ones with an
    underscore (unambiguous identifiers) and ``lr``; one-word names such as ``epochs`` or
    ``model`` are also plain words, so only the location of an error translates those."""
    names = (n for n in _train_config().model_fields if "_" in n or n == "lr")
    return re.compile(r"(?<![\w-])(" + "|".join(sorted(names, key=len)[::-1]) + r")(?![\w-])")


def with_flags(text: str) -> str:
    """``text`` with the configuration field names in it written as ``bnn train`` flags."""
    return _field_words().sub(lambda m: flag_of(m.group(1)), text)


def _default_text(info: FieldInfo) -> str:
    """`` (default: X)`` for a plain default; "" for flags (off), lists and ``None`` (whose
    meaning the field's description states)."""
    value = info.default
    if info.default_factory is not None or value is None or isinstance(value, bool):
        return ""
    if isinstance(value, Enum):
        value = value.value
    return f" (default: {value:.6g})" if isinstance(value, float) else f" (default: {value})"


def _option_help(name: str, info: FieldInfo) -> str:
    """The help of one ``bnn train`` option: the field's description, in flags."""
    if not info.description:  # pragma: no cover - every TrainConfig field has one
        raise TypeError(f"TrainConfig field {name!r} needs a description= for its --help")
    return with_flags(info.description + _default_text(info)).replace("%", "%%")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for name, info in _train_config().model_fields.items():
        if name in _NOT_OPTIONS:
            continue
        flags = _ALIASES.get(name, [f"--{name.replace('_', '-')}"])
        ann = _unwrap_optional(info.annotation)
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": _option_help(name, info)}
        if ann is bool:
            parser.add_argument(*flags, action="store_true", **kwargs)
        elif isinstance(ann, type) and issubclass(ann, Enum):
            parser.add_argument(*flags, choices=[m.value for m in ann], **kwargs)
        elif (choices := _choices(name)) is not None:
            parser.add_argument(*flags, choices=choices, **kwargs)
        elif typing.get_origin(ann) is list and typing.get_args(ann) == (int,):
            parser.add_argument(*flags, type=_int_list, metavar="N,N,...", **kwargs)
        elif typing.get_origin(ann) is list:
            kwargs["help"] += " (repeat the option for several)"
            parser.add_argument(*flags, action="append", metavar="TAG", **kwargs)
        elif ann in (int, float):
            parser.add_argument(*flags, type=ann, metavar="N" if ann is int else "X", **kwargs)
        elif ann is str:
            parser.add_argument(*flags, type=ann, **kwargs)
        else:  # pragma: no cover - a new field type needs a rule here
            raise TypeError(f"no command-line rule for field {name!r} of type {ann!r}")


def _config_error(exc: BnnError) -> BnnError:
    """``exc`` from :func:`parse_config` with every field named by its ``bnn train`` flag."""
    fields = exc.details.get("fields")
    if not isinstance(fields, dict) or not fields:
        return BnnError(exc.code, with_flags(exc.message), **exc.details)
    named = {}
    for loc, problem in fields.items():
        head, _, rest = str(loc).partition(".")
        if head in _train_config().model_fields:
            where = flag_of(head)
        else:  # "config": the whole configuration; anything else: a key of --config's file
            where = head if head == "config" else f"{head!r} in --config"
        named[where + (f" (item {rest})" if rest else "")] = with_flags(str(problem))
    text = "; ".join(f"{k}: {v}" for k, v in named.items())
    return BnnError(exc.code, f"invalid training configuration: {text}", fields=named)


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", help=f"run data directory (default: $BNN_DATA_DIR or ./{DEFAULT_DATA_DIR})"
    )
    parser.add_argument(
        "--db-url",
        help="catalog database URL (default: $BNN_DATABASE_URL or SQLite in the data dir)",
    )


def _train_options(p_train: argparse.ArgumentParser) -> None:
    _add_config_options(p_train)
    p_train.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="JSON file with a training configuration (the options above override it)",
    )
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument(
        "--compile",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile the training step (for GPUs; 'reduce-overhead' adds CUDA graphs); "
        "the first steps then wait for the compiler",
    )
    p_train.add_argument(
        "--tracking-url",
        help="report to the bnn service at this URL instead of a local data directory "
        "(default: $BNN_TRACKING_URL); the token comes from $BNN_API_TOKEN",
    )
    _store_options(p_train)


def _runs_options(p_runs: argparse.ArgumentParser) -> None:
    from trainer.store._records import RunStatus

    p_runs.add_argument(
        "action",
        nargs="?",
        choices=["list", "show", "fsck", "compact"],
        default="list",
        help="list: the runs, newest first (default); show: one run's status, captured "
        "epochs and last metrics (needs RUN_ID); fsck: check the store after a crash; "
        "compact: rewrite a stopped run's older epoch files in the current, compact "
        "format, one epoch at a time, crash-safely (needs RUN_ID)",
    )
    p_runs.add_argument(
        "run_id",
        nargs="?",
        metavar="RUN_ID",
        help="the run to show or compact (or, for fsck, the only run to check)",
    )
    p_runs.add_argument(
        "--status",
        choices=[s.value for s in RunStatus],
        help="list: only runs with this status",
    )
    p_runs.add_argument(
        "--limit", type=int, default=50, metavar="N", help="list: at most N runs (default: 50)"
    )
    p_runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_runs.add_argument(
        "--repair",
        action="store_true",
        help="fsck: fix what crashes left (adopt or set aside orphaned epoch files, remove "
        "dead writers' temp files, mark damaged epochs); without it fsck only reports",
    )
    p_runs.add_argument("--no-progress", action="store_true", help="compact: no progress bar")
    p_runs.add_argument(
        "--compress-posteriors",
        action="store_true",
        help="compact: also compress the posterior arrays, of current files too (about 14%% "
        "smaller files for runs kept for the record; every read decompresses them)",
    )
    p_runs.add_argument(
        "--stat-bits",
        type=int,
        choices=range(8),
        default=7,
        metavar="N",
        help="compact: keep only N (0-7) of the 7 mantissa bits of the per-element gradient "
        "statistics, of current files too (lossy: each within 2^-(N+1) of its stored value, "
        "6.25%% at 3; with --compress-posteriors, N=3 takes a per-element epoch to 40%% "
        "of its version 1 size; default: 7, lossless)",
    )
    _store_options(p_runs)


def _serve_options(p_serve: argparse.ArgumentParser) -> None:
    p_serve.add_argument("--host", help="address to bind (default: $BNN_HOST or 127.0.0.1)")
    p_serve.add_argument("--port", type=int, help="port (default: $BNN_PORT or 8000)")
    p_serve.add_argument("--workers", type=int, help="Dask LocalCluster worker processes")
    p_serve.add_argument("--dask-scheduler", help="use this Dask scheduler (tcp://host:8786)")
    p_serve.add_argument("--public-url", help="URL Dask workers report runs to")
    p_serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default: info)",
    )
    p_serve.add_argument(
        "--http",
        default="auto",
        choices=["auto", "httptools", "h11"],
        help="HTTP parser (default auto: httptools when installed, as uvicorn[standard] does)",
    )
    p_serve.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop (default auto: uvloop when installed, as uvicorn[standard] does)",
    )
    _store_options(p_serve)


def _push_options(p_push: argparse.ArgumentParser) -> None:
    p_push.add_argument("run_id", metavar="RUN_ID", help="the local run to upload")
    p_push.add_argument(
        "--to", required=True, metavar="URL", help="the service, e.g. http://host:8000"
    )
    _store_options(p_push)


# The commands of this module: (help, how to add its options). The options of a command are
# only added when that command runs (or for ``build_parser()``): ``bnn --help`` and ``bnn
# runs`` then never import pydantic and the training configuration.
_PARSERS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "train": ("train a BNN and store every captured epoch", _train_options),
    "runs": ("list runs, or `runs show ID` for one", _runs_options),
    "serve": ("run the HTTP service (settings: BNN_* variables)", _serve_options),
    "push": ("upload a local run to a bnn service", _push_options),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``bnn`` parser. ``command``: add only that command's options (the others are
    listed, with their help, but take none); default: every command's."""
    parser = argparse.ArgumentParser(
        prog="bnn", description="Bayesian neural networks with learnable layer-shared priors"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options) in _PARSERS.items():
        p = sub.add_parser(name, help=help_text)
        if command is None or command == name:
            add_options(p)
    _COMMANDS.update(add_demo_commands(sub))
    return parser


def _command_of(argv: Sequence[str]) -> str:
    """The command ``argv`` names: its first word that does not start with ``-`` (``bnn``
    itself takes no option but ``--help``); "" when there is none."""
    return next((word for word in argv if not word.startswith("-")), "")


def _open_store(args: argparse.Namespace) -> Any:
    from trainer.store import RunStore

    return RunStore(
        _data_dir(args.data_dir), db_url=args.db_url or os.environ.get("BNN_DATABASE_URL")
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.train import Trainer

    base: dict[str, Any] = {}
    if args.config is not None:
        try:
            base = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BnnError.invalid(f"cannot read config file {args.config}: {exc}") from None
    from trainer.config import TrainConfig, parse_config

    overrides = {name: getattr(args, name, None) for name in TrainConfig.model_fields}
    try:
        config = parse_config(base, **overrides)
    except BnnError as exc:
        raise _config_error(exc) from None
    tracking_url = args.tracking_url or os.environ.get("BNN_TRACKING_URL")
    sink: Any
    if tracking_url:
        from trainer.remote import HttpRunSink

        sink = HttpRunSink(tracking_url, token=os.environ.get("BNN_API_TOKEN") or None)
        where, data_root = tracking_url, _data_dir(args.data_dir) / "datasets"
    else:
        sink = _open_store(args)
        where, data_root = str(sink.data_dir), sink.data_dir / "datasets"
    with sink:
        trainer = Trainer(
            config,
            sink=sink,
            progress=not args.no_progress,
            data_root=data_root,
            heartbeat_interval=float(os.environ.get("BNN_HEARTBEAT_S", "5")),
            compile=args.compile,
        )
        result = trainer.fit()
    last = result.history[-1] if result.history else {}
    key = "test_acc" if config.is_classification else "test_rmse"
    print(
        f"run {result.run_id}: {len(result.captured_epochs)} epochs captured in {where}; "
        f"final {key}={last.get(key, float('nan')):.4f} "
        f"test_nll={last.get('test_nll', float('nan')):.4f}",
        file=sys.stderr,
    )
    if result.divergence is not None:
        what = result.divergence.describe()
        if result.diverged:
            print(
                f"error: run {result.run_id} diverged: {what}; stopped, status 'diverged' "
                f"(the epochs captured up to it are kept)",
                file=sys.stderr,
            )
            print(result.run_id)
            return EXIT_DIVERGED
        print(
            f"warning: run {result.run_id} diverged: {what}; trained on (on_divergence=continue)",
            file=sys.stderr,
        )
    print(result.run_id)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _run_dict(run: Any) -> dict[str, Any]:
    keys = (
        "id",
        "name",
        "status",
        "created_at",
        "updated_at",
        "heartbeat_at",
        "finished_at",
        "host",
        "error",
        "tags",
        "diverged_step",
        "diverged_epoch",
        "diverged_layer",
    )
    return {k: _jsonable(getattr(run, k, None)) for k in keys}


def _divergence_text(run: Any) -> str:
    """``step S (epoch E), LAYER`` for a run that diverged, else ""."""
    step = getattr(run, "diverged_step", None)
    if step is None:
        return ""
    layer = getattr(run, "diverged_layer", None)
    return f"step {step} (epoch {run.diverged_epoch})" + (f", {layer}" if layer else "")


def _cmd_runs_fsck(args: argparse.Namespace) -> int:
    """``bnn runs fsck [--repair] [--json] [RUN_ID]``: exit 1 while problems remain, else 0."""
    from trainer.store import RunStore

    store = RunStore(
        _data_dir(args.data_dir),
        db_url=args.db_url or os.environ.get("BNN_DATABASE_URL"),
        create=False,
    )
    with store:
        report = store.fsck(
            repair=args.repair, run_ids=[args.run_id] if args.run_id else None, verify=True
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.clean else 1


def _cmd_runs_compact(args: argparse.Namespace) -> int:
    """``bnn runs compact RUN_ID [--compress-posteriors] [--stat-bits N] [--json]
    [--no-progress]``: exit 1 if an epoch failed."""
    from tqdm import tqdm

    from trainer.store import RunStore
    from trainer.store.compact import compact_run

    if not args.run_id:
        raise BnnError.invalid("`bnn runs compact` needs a run id")
    store = RunStore(
        _data_dir(args.data_dir),
        db_url=args.db_url or os.environ.get("BNN_DATABASE_URL"),
        create=False,
    )
    with store:
        total = len(store.list_epochs(store.get_run(args.run_id).id))
        with tqdm(
            total=total,
            unit="epoch",
            desc=f"compact {args.run_id}",
            disable=args.no_progress or args.json,
            file=sys.stderr,
        ) as bar:
            saved = [0]

            def progress(step: Any) -> None:
                saved[0] += step.old_size - step.new_size
                bar.set_postfix_str(f"{_bytes(saved[0])} saved", refresh=False)
                bar.update(1)

            report = compact_run(
                store,
                args.run_id,
                compress_posteriors=args.compress_posteriors,
                stat_bits=args.stat_bits,
                progress=progress,
            )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1
    for failed in report.of("failed"):
        print(f"epoch {failed.epoch}: not compacted: {failed.detail}")
    info = report.to_dict()
    print(
        f"run {report.run_id}: {info['compacted']} epochs compacted, {info['skipped']} "
        f"already current, {info['failed']} failed; {_bytes(info['bytes_before'])} -> "
        f"{_bytes(info['bytes_after'])}, {_bytes(report.saved)} saved "
        f"({report.elapsed_s:.1f} s)"
    )
    return 0 if report.ok else 1


def _bytes(n: int) -> str:
    """``n`` bytes in KB, MB or GB (powers of 1000), or B below 1 KB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _form_text(config: dict[str, Any]) -> str:
    """How the run asked for its epoch files to be written (``stat_bits``,
    ``compress_posteriors`` in its configuration), or "" where it left that to the
    environment (``bnn runs compact`` may have rewritten them since)."""
    parts = []
    bits = config.get("stat_bits")
    if bits is not None:
        parts.append(
            "statistics lossless (7 mantissa bits)"
            if bits >= 7
            else f"statistics at {bits} of 7 mantissa bits (lossy)"
        )
    packed = config.get("compress_posteriors")
    if packed is not None:
        parts.append("posteriors compressed" if packed else "posteriors plain")
    return f" ({', '.join(parts)}, as configured)" if parts else ""


def _cmd_runs(args: argparse.Namespace) -> int:
    if args.action == "fsck":
        return _cmd_runs_fsck(args)
    if args.action == "compact":
        return _cmd_runs_compact(args)
    store = _open_store(args)
    if args.action == "show" or args.run_id:
        if not args.run_id:
            raise BnnError.invalid("`bnn runs show` needs a run id")
        run = store.get_run(args.run_id)
        epochs = store.list_epochs(run.id)
        info = _run_dict(run) | {
            "config": run.config,
            "epochs": [e.epoch for e in epochs],
            "metrics": _jsonable(epochs[-1].metrics) if epochs else {},
        }
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        for key in ("id", "name", "status", "host", "created_at", "finished_at", "error"):
            if info.get(key) is not None:
                print(f"{key:>12}: {info[key]}")
        if diverged := _divergence_text(run):
            print(f"{'diverged':>12}: {diverged}")
        print(f"{'epochs':>12}: {_epoch_ranges(info['epochs'])}")
        if epochs:
            size = _bytes(sum(e.size for e in epochs))
            print(f"{'files':>12}: {size}{_form_text(run.config or {})}")
        every = (run.config or {}).get("element_every")
        if isinstance(every, int) and every > 1:
            print(
                f"{'gradients':>12}: per element; each weight's mean |g| sampled every "
                f"{every} steps, its max |g| and non-finite count every step (element_every)"
            )
        if info["metrics"]:
            print(f"{'metrics':>12}: (epoch {info['epochs'][-1]})")
            for key, value in info["metrics"].items():
                print(
                    f"{'':>14}{key} = {value:.6g}"
                    if isinstance(value, float)
                    else f"{'':>14}{key} = {value}"
                )
        return 0
    runs = store.list_runs(status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps([_run_dict(r) for r in runs], indent=2))
        return 0
    if not runs:
        print(f"no runs in {store.data_dir}")
        return 0
    print(f"{'id':<14} {'status':<12} {'dataset':<14} {'prior':<10} {'epochs':>6}  name")
    for r in runs:
        cfg = r.config or {}
        n = len(store.list_epochs(r.id))
        diverged = _divergence_text(r)
        print(
            f"{r.id:<14} {r.status.value:<12} {cfg.get('dataset', '?'):<14} "
            f"{cfg.get('prior', '?'):<10} {n:>6}  {r.name or ''}"
            + (f"  [diverged at {diverged}]" if diverged else "")
        )
    return 0


def _epoch_ranges(epochs: Sequence[int]) -> str:
    if not epochs:
        return "none"
    return (
        f"{len(epochs)} ({epochs[0]}..{epochs[-1]})"
        if len(epochs) > 3
        else ", ".join(map(str, epochs))
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    given = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "database_url": args.db_url,
        "dask_workers": args.workers,
        "dask_scheduler": args.dask_scheduler,
        "public_url": args.public_url,
    }
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BnnError.invalid(f"bad service settings: {problems}") from None
    base = f"http://{settings.host}:{settings.port}"
    catalog = settings.database_url or f"SQLite in {settings.data_dir}"
    print(
        f"bnn service listening on {base} (API docs {base}/docs); data {settings.data_dir}, "
        f"catalog {catalog.split('@')[-1]}, jobs on {settings.describe_jobs()}, "
        f"auth {'on' if settings.token else 'off'}",
        flush=True,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        http=args.http,
        loop=args.loop,
        timeout_graceful_shutdown=10,
    )
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from service.client import Client

    token = os.environ.get("BNN_API_TOKEN") or None
    with Client(args.to, token=token, retries=5) as client:  # uploads: retry as trainers do
        result = client.push(
            args.run_id,
            _data_dir(args.data_dir),
            db_url=args.db_url or os.environ.get("BNN_DATABASE_URL"),
        )
    print(
        f"pushed run {result['run_id']} ({result['epochs']} epochs, {result['status']}) "
        f"to {result['url']}",
        file=sys.stderr,
    )
    print(result["url"])
    return 0


_COMMANDS: dict[str, Any] = {
    "train": _cmd_train,
    "runs": _cmd_runs,
    "serve": _cmd_serve,
    "push": _cmd_push,
}


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still
    buffered cannot raise BrokenPipeError again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests' capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnn`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    0 on success, 2 for bad input (``error: ...`` on stderr), 3 for a diverged run, 130 on
    Ctrl-C, and 141 (as a shell reports a SIGPIPE) when the reader of stdout goes away
    early, as in ``bnn runs | head -3``: quietly, without a traceback.
    """
    try:
        words = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser(_command_of(words))
        args = parser.parse_args(words)
        try:
            code = _COMMANDS[args.command](args)
        except BnnError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            code = 130
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return int(code)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
