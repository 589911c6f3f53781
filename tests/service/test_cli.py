import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from service.cli import main
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStore, load_distribution_log

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--dataset",
    "regression",
    "--n-train",
    "96",
    "--n-test",
    "32",
    "--eval-samples",
    "2",
    "--no-progress",
]


def _train(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["train", *TINY, "--data-dir", str(tmp_path), *extra]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_train_prints_the_run_id_last_and_runs_lists_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = _train(
        tmp_path, capsys, "--epochs", "3", "--prior", "fixed", "--name", "cli", "--tag", "t1"
    )
    assert main(["runs", "--data-dir", str(tmp_path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in runs] == [run_id]
    assert (
        runs[0]["status"] == "completed" and runs[0]["name"] == "cli" and runs[0]["tags"] == ["t1"]
    )
    assert main(["runs", "show", run_id, "--data-dir", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["epochs"] == [0, 1, 2] and info["config"]["prior"] == "fixed"
    assert "test_rmse" in info["metrics"]
    assert main(["runs", "show", run_id, "--data-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert run_id in text and "completed" in text and "test_rmse" in text
    assert main(["runs", "--data-dir", str(tmp_path)]) == 0
    assert run_id in capsys.readouterr().out


def test_the_console_script_runs_as_a_process(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "train",
            *TINY,
            "--epochs",
            "2",
            "--data-dir",
            str(tmp_path),
            "--widths",
            "8,8",
            "--prior-mode",
            "hierarchical",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=True,
    )
    run_id = out.stdout.strip().splitlines()[-1]
    log = load_distribution_log(run_id, data_dir=tmp_path)
    assert sorted(log) == [0, 1] and list(log[1]) == ["layer1", "layer2", "layer3"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dataset", "imagenet"], "imagenet"),
        (["--widths", "10,-3"], "-3"),
        (["--epochs", "-2"], "epochs"),
        (["--widths", "a,b"], "a,b"),
    ],
)
def test_bad_input_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    try:
        code = main(["train", "--data-dir", str(tmp_path), "--no-progress", *args])
    except SystemExit as exc:  # argparse rejects malformed values itself
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unwritable_data_dir_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", *TINY, "--epochs", "1", "--data-dir", str(blocker / "data")]) == 2
    assert str(blocker) in capsys.readouterr().err


def test_unknown_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "show", "nope123", "--data-dir", str(tmp_path)]) == 2
    assert "nope123" in capsys.readouterr().err


def test_a_corrupt_epoch_file_is_reported_and_the_others_survive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = _train(tmp_path, capsys, "--epochs", "3")
    store = RunStore(tmp_path)
    bad = store.epoch_path(run_id, 1)
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(BnnError) as info:
        load_distribution_log(run_id, data_dir=tmp_path)
    assert info.value.code is ErrorCode.CORRUPT and bad.name in str(info.value)
    good = load_distribution_log(run_id, data_dir=tmp_path, epochs=[0, 2])
    assert sorted(good) == [0, 2]
    with h5py.File(store.epoch_path(run_id, 2), "r") as f:
        assert "params" in f
    assert main(["runs", "show", run_id, "--data-dir", str(tmp_path)]) == 0
    assert os.path.exists(bad)


# --- help, error messages in flags, a closed stdout ---------------------------------------


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from service.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", ["train", "runs", "serve", "push", "demo", "sweep", "study"])
def test_every_option_has_real_help(command: str) -> None:
    parser = _subcommands()[command]
    text = parser.format_help()
    assert "PydanticUndefined" not in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.dest
        words = {name, name.replace("_", " "), name.replace("_", "-")}
        helptext = (action.help or "").strip()
        assert helptext and helptext.lower() not in words, (command, action.option_strings)
        assert len(helptext.split()) >= 3, (command, action.option_strings, helptext)


def test_train_help_lists_activations_and_defaults() -> None:
    text = " ".join(_subcommands()["train"].format_help().split())
    assert "--activation {relu,tanh," in text
    assert (
        "--capture-every N capture the parameters every N epochs (and the last) (default: 1)"
        in (text)
    )
    assert "--tag TAG labels to filter runs by (repeat the option for several)" in text
    assert "(default: --lr)" in text  # field names inside help read as flags


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--capture-every", "0"], "--capture-every: Input should be greater than or equal to 1"),
        (["--mixture-pi", "2"], "--mixture-pi: Input should be less than 1"),
        (["--capture-level", "element", "--prior-sigma0", "inf"], "--prior-sigma0: "),
    ],
)
def test_bad_values_are_named_by_their_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    assert main(["train", "--data-dir", str(tmp_path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "_" not in err.split(":")[1], err
    assert not (tmp_path / "catalog.db").exists()


def test_bad_config_file_keys_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"capture_every": 0, "widths": [4, "x"], "colour": 1}))
    assert main(["train", "--config", str(config), "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--capture-every: " in err and "--widths (item 1): " in err
    assert "'colour' in --config: Extra inputs are not permitted" in err


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """`bnn runs --json | head -1`: the pipe closes while bnn still writes."""
    store = RunStore(tmp_path)
    with store:
        for i in range(400):  # ~200 kB of JSON: more than a pipe holds
            store.create_run(
                f"run-{i:04d}-" + "x" * 200, {"dataset": "regression"}, status="queued"
            )
    args = ["runs", "--json", "--limit", "1000", "--data-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().strip() == b"["
    proc.stdout.close()  # like `head -1` exiting
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception" not in err, err


HEAVY = ("torch", "pandas", "matplotlib")
_NOT_LOADED = """
import sys
{body}
loaded = [m for m in {heavy!r} if m in sys.modules]
assert not loaded, loaded
"""
_HELP = "try:\n    main({argv!r})\nexcept SystemExit as exc:\n    assert exc.code == 0"
_CLI = "from service.cli import main\n"


def _assert_not_loaded(tmp_path: Path, body: str, heavy: tuple[str, ...]) -> None:
    """Running ``body`` in a fresh interpreter imports none of the ``heavy`` modules."""
    code = _NOT_LOADED.format(body=body, heavy=heavy)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "BNN_DATA_DIR": str(tmp_path)},
        check=False,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "body",
    [
        "import service.cli",
        "import trainer, trainer.config\nfrom trainer import PriorSpec, RunStatus",
        _CLI + "assert main(['runs', '--data-dir', sys.argv[1]]) == 0",
        _CLI + _HELP.format(argv=["--help"]),
        _CLI + _HELP.format(argv=["train", "--help"]),
    ],
    ids=["import", "trainer-config", "runs", "help", "train-help"],
)
def test_light_commands_import_no_torch_pandas_or_matplotlib(tmp_path: Path, body: str) -> None:
    _assert_not_loaded(tmp_path, body, HEAVY)


@pytest.mark.parametrize(
    ("body", "heavy"),
    [
        (
            _CLI + _HELP.format(argv=["--help"]),
            ("pydantic", "sqlalchemy", "numpy", "h5py", "trainer.config"),
        ),
        (_CLI + "assert main(['runs', '--data-dir', sys.argv[1]]) == 0", ("alembic", "pydantic")),
    ],
    ids=["help", "runs"],
)
def test_help_and_runs_import_only_what_they_use(
    tmp_path: Path, body: str, heavy: tuple[str, ...]
) -> None:
    """``bnn --help`` builds no command's options; ``bnn runs`` on a catalog at head imports
    neither Alembic nor the training configuration."""
    main(["runs", "--data-dir", str(tmp_path)])  # creates the catalog: at head from now on
    _assert_not_loaded(tmp_path, body, heavy)


@pytest.mark.parametrize("command", ["train", "runs", "serve", "push"])
def test_each_command_help_lists_its_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Options are added only for the command that runs: its ``--help`` still has them all."""
    from service.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for action in sub.choices[command]._actions:
        for flag in action.option_strings:
            assert flag in text, (command, flag)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    top = capsys.readouterr().out
    assert all(c in top for c in ("train", "runs", "serve", "push")), top


def test_bad_option_of_a_command_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["runs", "--epochz=3"])
    assert exc.value.code == 2
    assert "--epochz" in capsys.readouterr().err


def test_torch_free_enums_are_the_objects_the_torch_modules_export() -> None:
    import trainer
    import trainer.activations
    import trainer.models
    import trainer.prior_spec
    import trainer.priors

    assert trainer.models.Activation is trainer.activations.Activation
    for name in ("EBSchedule", "LearnMode", "PriorFamily", "PriorKind", "PriorScale", "PriorSpec"):
        assert getattr(trainer.priors, name) is getattr(trainer.prior_spec, name)
    assert trainer.LayerPrior is trainer.priors.LayerPrior
    assert trainer.train is importlib.import_module("trainer.train").train
