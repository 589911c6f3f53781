"""``bnn demo regression|mnist`` end to end on tiny studies: the study's sections (protocol,
results with CIs, significance) and the diagnostics are in the report, in HTML (PNGs embedded)
and Markdown (PNGs beside it); every study run is an ordinary stored run; a model rebuilt from a
stored run has the stored posteriors. And the pieces the demos are built from."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from service.cli import main
from service.demo.common import (
    burnin_note,
    data_for_run,
    model_from_run,
    pick_arms,
    plot_epoch,
    slug,
)
from service.demo.mnist import auroc, find_fashion_mnist, read_idx_images, run_mnist_demo
from service.demo.protocol import protocol_spec
from service.demo.regression import REGRESSION_TUNE_EPOCHS
from service.demo.report import PAGE_PX, Report, format_column, markdown_table
from trainer.config import parse_config
from trainer.layers import bayesian_layers, use_mean
from trainer.priors import GaussianPrior
from trainer.store import RunStatus, RunStore
from trainer.train import Trainer

STUDY = ["protocol", "results", "significance", "runs"]
DIAGNOSTICS = ["training", "scales", "priors", "stats", "kl", "evolution", "gradients"]
REG_ARMS = ["fixed N(0,1)", "learnable gradient", "fan-in learnable"]
MNIST_ARMS = ["fixed N(0,1)", "learnable gradient"]
PNG = b"\x89PNG\r\n\x1a\n"
# words the report must hold (tables and plots by their captions)
REQUIRED_TEXT = [
    "Test metrics per arm, mean [95% CI] over seeds",
    "Paired differences (arm minus baseline)",
    "weight scales per layer over epochs",
    "pairwise symmetric KL",
    "KL(posterior || layer prior)",
    "between runs",
    "gradient diagnostics",
    "Weight prior sigma",
    "Weight mu mean",
]


def _diagnostic_images(arms: list[str]) -> set[str]:
    # KL, gradients and bands: one figure with the arms side by side; evolution and the
    # epoch overlay show other weights in each arm: one figure per arm
    side_by_side = {"kl_prior", "kl_pairwise", "bands_mu", "bands_sigma"}
    side_by_side |= {"gradient_norms", "gradient_magnitudes"}
    return (
        {"training_curves", "scale_diagnostics", "prior_trajectories"}
        | side_by_side
        | {f"{kind}_{slug(arm)}" for kind in ("evolution", "overlay") for arm in arms}
    )


def _png_size(path: Path) -> tuple[int, int, float]:
    """Width and height in pixels and the dots per inch (pHYs chunk) of a PNG file."""
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    at = data.index(b"pHYs")
    per_metre = struct.unpack(">I", data[at + 4 : at + 8])[0]
    return width, height, per_metre * 0.0254


def _check_readable(out: Path, images: set[str]) -> None:
    """Every figure shows >= 80 pixels per inch of its drawing on the report page (at most
    PAGE_PX wide; was 57-76 with 80 dpi figures up to 21 inches wide): a 7-point legend is
    >= 7.8 px on screen, a 10-point label >= 11 px."""
    for name in images:
        width, height, dpi = _png_size(out / "img" / f"{name}.png")
        shown = dpi * min(1.0, PAGE_PX / width)
        assert shown >= 80, (name, width, height, dpi)
        assert height >= 250, (name, width, height)


NUMBER = r"(?:-?\d+(?:\.\d+)?(?:e[+-]\d+)?|nan|-?inf)"
CI_CELL = rf"{NUMBER} \[{NUMBER}, {NUMBER}\]"  # "mean [lo, hi]"


def _check_one_format_per_column(html: str) -> int:
    """In every table, each column's numbers share one format: all integers, all with the
    same number of decimals, or all scientific."""
    checked = 0
    for table in re.findall(r"<table>(.*?)</table>", html, flags=re.S):
        rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]
        rows = [r for r in rows if r]
        for col in zip(*rows, strict=True):
            kinds = set()
            # "mean [lo, hi]" cells: the three numbers count as cells of the column
            parts = [p for cell in col for p in re.split(r" \[|, |\]$", cell) if p]
            for cell in parts if all(re.fullmatch(CI_CELL, c) for c in col) else col:
                if cell in ("nan", "inf", "-inf"):
                    continue
                if re.fullmatch(r"[0-9a-f]{12}", cell):
                    # a run id: 12 hex digits, which are sometimes all decimal digits
                    kinds.add("text")
                elif re.fullmatch(r"-?\d+\.\d{3}e[+-]\d\d", cell):
                    kinds.add("scientific")
                elif m := re.fullmatch(r"-?\d+(?:\.(\d+))?", cell):
                    kinds.add(len(m.group(1) or ""))
                else:
                    kinds.add("text")
            if kinds - {"text"}:
                assert len(kinds) == 1, (col, kinds)
                checked += 1
    return checked


def _check_report(out: Path, sections: list[str], images: set[str]) -> tuple[str, str, dict]:
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert re.findall(r'<h2 id="([a-z_]+)">', html) == sections
    assert re.findall(r'^## .* <a id="([a-z_]+)"></a>$', md, flags=re.M) == sections
    figure = r'<figure id="img-([A-Za-z0-9_.-]+)"><img [^>]*src="data:image/png;base64,'
    assert set(re.findall(figure, html)) == images
    assert set(re.findall(r"\]\(img/([A-Za-z0-9_.-]+)\.png\)", md)) == images
    assert {p.stem for p in (out / "img").glob("*.png")} == images
    for name in images:
        assert (out / "img" / f"{name}.png").read_bytes()[:8] == PNG
    for words in REQUIRED_TEXT:
        assert words in md and words in html, words
    # the significance section says plainly, per arm and headline metric, what differs
    sig = md.split('<a id="significance"></a>')[1].split("\n## ")[0]
    verdicts = re.findall(r"p=[0-9.e+-]+: (significantly better|significantly worse|no sig)", sig)
    assert verdicts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sections"] == sections and sorted(summary["images"]) == sorted(images)
    assert summary["significance"] and all("**" not in s for s in summary["significance"])
    _check_readable(out, images)
    assert _check_one_format_per_column(html) > 50
    return html, md, summary


def _check_cis(summary: dict[str, Any], differences: dict[str, Any]) -> int:
    """lo <= mean <= hi for every metric of every arm, and for every paired difference."""
    checked = 0
    for row in summary.values():
        for key, lo in row.items():
            if not key.endswith(" lo") or lo is None:
                continue
            metric = key[: -len(" lo")]
            mean, hi = row[metric], row[f"{metric} hi"]
            assert lo <= mean + 1e-12 and mean <= hi + 1e-12, (metric, lo, mean, hi)
            checked += 1
    for row in differences.values():
        for key, diff in row.items():
            if key.endswith(" diff") and diff is not None:
                metric = key[: -len(" diff")]
                lo, hi = row[f"{metric} lo"], row[f"{metric} hi"]
                assert lo <= diff + 1e-12 and diff <= hi + 1e-12, (metric, lo, diff, hi)
                checked += 1
    return checked


@pytest.fixture(scope="module")
def regression_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """``bnn demo regression`` on a tiny study: 3 arms x 2 seeds, 3 epochs, one worker."""
    out = tmp_path_factory.mktemp("demo") / "reg"
    args = ["demo", "regression", "--out", str(out), "--epochs", "3", "--n-train", "128"]
    args += ["--n-test", "64", "--seeds", "0,1", "--arms", ",".join(REG_ARMS)]
    args += ["--workers", "1", "--eval-samples", "8", "--capture-every", "1", "--no-progress"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(args) == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def test_regression_demo_report(regression_demo: tuple[Path, str, str]) -> None:
    out, stdout, stderr = regression_demo
    assert stdout.strip() == str(out / "report.html")
    sections = [*STUDY, "fit", *DIAGNOSTICS]
    images = _diagnostic_images(REG_ARMS) | {"study_metrics", "study_differences"}
    _, md, summary = _check_report(out, sections, images | {"regression_fit"})
    for words in ("inside [-2, 2]", "outside [-4, -2) U (2, 4]", "nominal 95.4%"):
        assert words in md, words
    assert "top-3 exploding candidates" in md  # per-element gradients in the regression demo
    # the command prints the summary table and the significance sentences
    assert "fan-in learnable" in stderr and "vs fixed N(0,1), test NLL" in stderr
    assert f"study {summary['study_id']}" in stderr and "**" not in stderr
    # summary.json: the study, the per-arm table with CIs, the differences, timings
    assert summary["task"] == "regression" and summary["arms"] == REG_ARMS
    assert summary["seeds"] == [0, 1] and summary["tuning_runs"] == 6
    assert summary["tune_epochs"] == 3  # min(REGRESSION_TUNE_EPOCHS, epochs)
    assert set(summary["summary"]) == set(REG_ARMS) == set(summary["summary_text"])
    assert set(summary["differences"]) == set(REG_ARMS[1:])
    assert set(summary["runs"]) == set(REG_ARMS) and len(summary["evaluation_runs"]) == 6
    assert summary["seconds"]["total"] >= summary["seconds"]["study"] > 0
    assert summary["sizes"]["epochs"] == 3 and summary["sizes"]["widths"] == [32, 32]
    assert _check_cis(summary["summary"], summary["differences"]) >= 3 * 7
    assert {(r, w) for r in REG_ARMS for w in ("inside [-2, 2]", "outside [-4, -2) U (2, 4]")} == {
        tuple(k.split(" / ")) for k in summary["fit"]
    }
    for name in ("summary", "differences", "settings", "runs"):
        assert (out / f"study_{name}.csv").is_file()


def test_regression_demo_runs_are_stored_runs(regression_demo: tuple[Path, str, str]) -> None:
    out, _, _ = regression_demo
    study_id = json.loads((out / "summary.json").read_text())["study_id"]
    with RunStore(out / "bnn-data") as store:
        sweep = store.get_sweep(study_id)
        assert len(sweep.runs) == 6 + 6 and len(store.list_runs()) == 12
        for label, run_id in sweep.runs:
            run = store.get_run(run_id)
            assert run.status is RunStatus.COMPLETED, (label, run.error)
            assert f"study:{study_id}" in run.tags and "demo:regression" in run.tags
            epochs = [e.epoch for e in store.list_epochs(run_id)]
            assert epochs == [0, 1, 2], label
            with store.reader(run_id) as reader:
                reader.verify()  # checksums and schema of every epoch file
                assert reader.layers() == ["layer1", "layer2", "layer3"]
                # the test split is evaluated by the evaluation runs only, never while tuning
                assert (reader.evaluation() is None) == label.startswith("tune/"), label


def test_regression_model_rebuilt_from_a_study_run(regression_demo: tuple[Path, str, str]) -> None:
    out, _, _ = regression_demo
    runs = json.loads((out / "summary.json").read_text())["runs"]
    with RunStore(out / "bnn-data") as store:
        for arm in ("learnable gradient", "fan-in learnable"):
            run_id = runs[arm]
            data = data_for_run(store, run_id)
            assert data.n_train == 128 and data.x_test.shape[0] == 64
            model = model_from_run(store, run_id, data)
            learned = 0
            with store.reader(run_id) as reader:
                last = reader.epochs[-1]
                assert plot_epoch(reader) in reader.epochs
                for name, layer in bayesian_layers(model):
                    for which in ("weight", "bias"):
                        stored_mu = reader.array(last, name, "posterior", which, "mu")
                        stored_sigma = reader.array(last, name, "posterior", which, "sigma")
                        mu, sigma = layer.posterior(which)
                        assert np.array_equal(mu.detach().numpy(), stored_mu)
                        np.testing.assert_allclose(sigma.detach().numpy(), stored_sigma, rtol=1e-5)
                        prior = layer.priors()[which]
                        stored = reader.array(last, name, "prior", which, "sigma")
                        assert isinstance(prior, GaussianPrior)
                        learned += prior.learnable  # small groups fall back to a fixed prior
                        np.testing.assert_allclose(prior.sigma.detach().numpy(), stored, rtol=1e-5)
            assert learned >= 3 and not model.training


def test_model_from_run_predicts_like_the_trained_model(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "dataset": "regression",
            "widths": [5, 4],
            "prior": "learnable",
            "prior_scale": "fan_in",
            "epochs": 2,
            "n_train": 48,
            "n_test": 16,
            "eval_samples": 2,
            "model_selection": "last",
            "grad_capture": "none",
        }
    )
    with RunStore(tmp_path) as store:
        trainer = Trainer(cfg, sink=store, progress=False)
        run_id = trainer.fit().run_id
        assert run_id is not None
        model = model_from_run(store, run_id, trainer.data)
        x = torch.linspace(-3, 3, 50).unsqueeze(1)
        with use_mean(trainer.model), use_mean(model), torch.no_grad():
            assert torch.equal(model(x), trainer.model(x))
        for (_, a), (_, b) in zip(
            bayesian_layers(model), bayesian_layers(trainer.model), strict=True
        ):
            torch.testing.assert_close(a.weight_sigma, b.weight_sigma, rtol=1e-5, atol=0)
            torch.testing.assert_close(a.weight_prior.sigma, b.weight_prior.sigma)
        with pytest.raises(Exception, match="epoch"):
            model_from_run(store, run_id, trainer.data, epoch=7)


def test_mnist_demo_tiny_with_fashion_files(tmp_path: Path) -> None:
    fashion = tmp_path / "fashion" / "FashionMNIST" / "raw"
    fashion.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    header = np.array([2051, 40, 28, 28], dtype=">i4").tobytes()
    (fashion / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes()))
    out = tmp_path / "mnist"
    result = run_mnist_demo(
        out,
        seeds=[0, 1],
        arms=MNIST_ARMS,
        epochs=1,
        widths=[8],
        n_train=256,
        n_test=128,
        eval_samples=3,
        plot_samples=3,
        n_ood=40,
        fashion_dir=tmp_path / "fashion",
        workers=1,
        progress=False,
    )
    sections = [*STUDY, "calibration", "ood", *DIAGNOSTICS]
    images = _diagnostic_images(MNIST_ARMS) | {"study_metrics", "study_differences"}
    assert result.sections == sections
    _, md, summary = _check_report(out, sections, images | {"reliability", "entropy"})
    assert summary["tune_epochs"] == 1 and summary["sizes"]["epochs"] == 1  # min(3, epochs)
    assert "left out (it needs grad_capture 'element')" in md  # per-layer gradients
    # the numeric tables behind the report: lo <= mean <= hi
    tables = {k: v for k, v in result.tables.items() if k in ("summary", "differences")}
    rows = {k: json.loads(v.to_json(orient="index")) for k, v in tables.items()}
    assert _check_cis(rows["summary"], rows["differences"]) >= 2 * 7
    for metric in ("nll", "error", "test_ece", "test_ood_auroc"):
        assert metric in result.tables["summary"].columns
    assert list(result.summary.index) == MNIST_ARMS and "test NLL" in result.summary.columns
    ood = result.tables["ood"]
    assert set(ood.index.get_level_values("OOD inputs")) == {
        "rotated 90 deg",
        "uniform noise",
        "FashionMNIST",
    }
    assert ((ood["AUROC (entropy)"] >= 0) & (ood["AUROC (entropy)"] <= 1)).all()
    assert list(result.tables["calibration"].index) == MNIST_ARMS
    assert "FashionMNIST was not found" not in md and summary["fashion_mnist"]
    with RunStore(out / "bnn-data") as store:
        sweep = store.get_sweep(result.study_id)
        assert len(sweep.runs) == 3 + 4  # one tuned arm x 3 grid points, 2 arms x 2 seeds
        assert all(store.get_run(r).status is RunStatus.COMPLETED for _, r in sweep.runs)


def test_bnn_demo_command_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = str(tmp_path / "x")
    assert main(["demo", "regression", "--out", out, "--full"]) == 2
    assert "--full is for" in capsys.readouterr().err
    assert main(["demo", "regression", "--out", out, "--arms", "fixed N(0,1),nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown arms ['nope']" in err and "'fixed N(0,1)'" in err
    assert main(["demo", "mnist", "--out", out, "--epochs", "0", "--seeds", "1,1"]) == 2
    assert "seeds must be distinct" in capsys.readouterr().err
    assert main(["demo", "regression", "--out", out, "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing trained or written


def test_demo_helpers() -> None:
    assert slug("fixed N(0,1)") == "fixed_N_0_1" and slug("EB burn-in") == "EB_burn_in"
    assert slug("()") == "run"
    arms = ["fixed tuned", "EB burn-in", "fixed N(0,1)"]
    assert pick_arms(arms, ["fixed N(0,1)", "absent"], 2) == ["fixed N(0,1)", "fixed tuned"]
    spec = protocol_spec("mnist", base={"epochs": 5}, tune_epochs=3)
    assert "[3]" in burnin_note(spec)  # the 3-epoch burn-in never ends in a 3-epoch tuning run
    assert burnin_note(protocol_spec("regression", base={"epochs": 100})) == ""
    # the regression demo's shorter tuning runs still see every burn-in level end
    short = protocol_spec("regression", base={"epochs": 100}, tune_epochs=REGRESSION_TUNE_EPOCHS)
    assert burnin_note(short) == ""
    assert protocol_spec("regression").seeds == [0, 1, 2, 3, 4]


def test_auroc_idx_reader_and_fashion_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.ones(5), np.ones(7)) == 0.5  # ties count half
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(0.5, 1, size=200)
    brute = np.mean([(y > x) + 0.5 * (y == x) for x in a for y in b])
    assert auroc(a, b) == pytest.approx(brute)
    monkeypatch.setenv("BNN_DATASETS_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    found = find_fashion_mnist()
    assert found is None or found.parent.name == "fashion-mnist"  # only the system package
    raw = np.array([2051, 2, 3, 4], dtype=">i4").tobytes() + bytes(range(24))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw)
    assert find_fashion_mnist() == tmp_path / "t10k-images-idx3-ubyte"
    assert read_idx_images(tmp_path / "t10k-images-idx3-ubyte")[1, 2, 3] == 23
    (tmp_path / "bad").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="not an IDX image file"):
        read_idx_images(tmp_path / "bad")


def test_report_renders_tables_text_and_images(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0, float("nan")], "b|c": ["<x>", "y"]}, index=["r1", "r2"])
    frame.index.name = "row"
    assert markdown_table(frame).splitlines() == [
        "| row | a | b\\|c |",
        "|---|---|---|",
        "| r1 | 1 | <x> |",
        "| r2 | nan | y |",
    ]
    report = Report("T <1>", tmp_path, intro="Intro with `code` and **bold**.")
    report.section("one", "One").text("- item `a`\n- item b").table(frame, "cap").image(
        "p", b"\x89PNG"
    )
    with pytest.raises(ValueError, match="duplicate section"):
        report.section("one", "again")
    with pytest.raises(ValueError, match="image name"):
        report.section("two", "Two").image("a b", b"")
    html, md = report.write()
    text = html.read_text()
    assert "<title>T &lt;1&gt;</title>" in text and "&lt;x&gt;" in text and "<x>" not in text
    assert (
        "<code>code</code>" in text
        and "<b>bold</b>" in text
        and "<li>item <code>a</code></li>" in text
    )
    assert (tmp_path / "img" / "p.png").read_bytes() == b"\x89PNG"
    assert "![cap](img/p.png)" not in md.read_text() and "](img/p.png)" in md.read_text()


def test_one_number_format_per_column() -> None:
    # before: 0.0123 | 1.500e-05 | 2.5 in one column, each value on its own
    assert format_column([0.0123, 1.5e-5, 2.5]) == ["1.230e-02", "1.500e-05", "2.500e+00"]
    assert format_column([0.5, 0.0123, 2.25]) == ["0.500", "0.012", "2.250"]
    assert format_column([1234.5, 5.2, float("nan")]) == ["1234.5", "5.2", "nan"]
    assert format_column([120.3, 0.05]) == ["120.300", "0.050"]
    assert format_column([3.5e5, 2.5]) == ["3.500e+05", "2.500e+00"]
    assert format_column([6.0, float("inf"), 12.0]) == ["6", "inf", "12"]  # integral floats
    assert format_column([1, 20, 300]) == ["1", "20", "300"]
    assert format_column([True, False]) == ["True", "False"]
    assert format_column(["a", 1.5, (1, 2)]) == ["a", "1.5", "(1, 2)"]  # not all numbers
    assert format_column([float("nan")] * 2) == ["nan", "nan"]
    frame = pd.DataFrame({"x": [1e-4, 0.5], "n": [3, 4]}, index=pd.Index(["a", "b"], name="k"))
    assert markdown_table(frame).splitlines()[2:] == [
        "| a | 1.000e-04 | 3 |",
        "| b | 5.000e-01 | 4 |",
    ]
