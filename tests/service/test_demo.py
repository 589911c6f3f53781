"""``bnn demo regression|mnist`` end to end on tiny settings: every report section is there,
in HTML (PNGs embedded) and Markdown (PNGs beside it); and the pieces they are built from."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.cli import main
from service.demo.mnist import auroc, find_fashion_mnist, read_idx_images, run_mnist_demo
from service.demo.regression import run_regression_demo
from service.demo.report import Report, markdown_table

DIAGNOSTICS = ["training", "priors", "stats", "kl", "evolution", "gradients"]
REGRESSION_SECTIONS = ["setup", "fit", "metrics", *DIAGNOSTICS]
MNIST_SECTIONS = ["setup", "metrics", "calibration", "ood", *DIAGNOSTICS]
DIAGNOSTIC_IMAGES = {"training_curves", "prior_trajectories"} | {
    f"{kind}_{prior}"
    for kind in ("kl", "evolution", "overlay", "bands", "gradients")
    for prior in ("fixed", "learnable")
}
# words each section must hold (tables and plots by their captions)
REQUIRED_TEXT = [
    "pairwise symmetric KL",
    "KL(posterior || layer prior)",
    "between runs",
    "gradient diagnostics",
    "flagged elements per layer and run",
    "top-5 exploding candidates",
    "Weight prior sigma",
    "Weight mu mean",
]


def _check_report(out: Path, sections: list[str], images: set[str]) -> tuple[str, str]:
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert re.findall(r'<h2 id="([a-z_]+)">', html) == sections
    assert re.findall(r'^## .* <a id="([a-z_]+)"></a>$', md, flags=re.M) == sections
    figure = r'<figure id="img-([A-Za-z0-9_.-]+)"><img [^>]*src="data:image/png;base64,'
    embedded = set(re.findall(figure, html))
    assert embedded == images
    assert set(re.findall(r"\]\(img/([A-Za-z0-9_.-]+)\.png\)", md)) == images
    for name in images:
        assert (out / "img" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for words in REQUIRED_TEXT:
        assert words in md and words in html, words
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sections"] == sections and set(summary["runs"]) == {"fixed", "learnable"}
    return html, md


def test_regression_demo_tiny(tmp_path: Path) -> None:
    out = tmp_path / "reg"
    result = run_regression_demo(
        out,
        epochs=3,
        widths=[6, 6],
        n_train=96,
        n_test=48,
        capture_every=2,
        eval_samples=8,
        progress=False,
    )
    assert result.sections == REGRESSION_SECTIONS
    _, md = _check_report(out, REGRESSION_SECTIONS, DIAGNOSTIC_IMAGES | {"regression_fit"})
    m = result.metrics
    assert list(m.index.names) == ["prior", "test inputs"] and len(m) == 4
    assert list(m.columns) == [
        "RMSE",
        "NLL",
        "coverage +-2 sigma",
        "mean sigma",
        "mean epistemic sigma",
    ]
    assert ((m["coverage +-2 sigma"] >= 0) & (m["coverage +-2 sigma"] <= 1)).all()
    assert (m["mean sigma"] >= m["mean epistemic sigma"]).all()
    for words in (
        "inside [-2, 2]",
        "outside [-4, -2) U (2, 4]",
        "nominal 95.4%",
        "Learned noise sigma",
    ):
        assert words in md, words
    # both runs are stored with the captured epochs (0, 2 and the last)
    from trainer.store import RunStore

    with RunStore(out / "bnn-data") as store:
        for run_id in result.runs.values():
            assert [e.epoch for e in store.list_epochs(run_id)] == [0, 2]
            assert store.get_run(run_id).status.value == "completed"


def test_mnist_demo_tiny_with_fashion_files(tmp_path: Path) -> None:
    fashion = tmp_path / "fashion" / "FashionMNIST" / "raw"
    fashion.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    header = np.array([2051, 40, 28, 28], dtype=">i4").tobytes()
    (fashion / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    out = tmp_path / "mnist"
    result = run_mnist_demo(
        out,
        epochs=1,
        widths=[8],
        n_train=256,
        n_test=100,
        n_ood=40,
        eval_samples=3,
        fashion_dir=tmp_path / "fashion",
        progress=False,
    )
    assert result.sections == MNIST_SECTIONS
    _, md = _check_report(out, MNIST_SECTIONS, DIAGNOSTIC_IMAGES | {"reliability", "entropy"})
    assert list(result.metrics.index) == ["fixed", "learnable"]
    assert {"test accuracy", "test NLL", "ECE %", "Brier"} <= set(result.metrics.columns)
    ood = result.tables["ood"]
    sets = set(ood.index.get_level_values("OOD inputs"))
    assert sets == {"rotated 90 deg", "uniform noise", "FashionMNIST"}
    assert ((ood["AUROC (entropy)"] >= 0) & (ood["AUROC (entropy)"] <= 1)).all()
    assert "AUROC" in md and "FashionMNIST was not found" not in md


def test_bnn_demo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = [
        "demo",
        "regression",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--widths",
        "4",
        "--n-train",
        "64",
        "--n-test",
        "32",
        "--eval-samples",
        "4",
        "--no-progress",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert (out / "report.md").exists() and (out / "img" / "regression_fit.png").exists()
    assert main(["demo", "regression", "--out", str(out), "--full"]) == 2
    assert "--full is for" in capsys.readouterr().err


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
