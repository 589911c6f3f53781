"""Sweeps: grid expansion (the half-fraction optimiser design), and width and optimiser
studies end to end on a Dask LocalCluster, from Python and from ``bnn sweep``."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from service.cli import main
from service.demo.studies import main_effects, study_table, sweep_status, write_study_report
from service.demo.sweeps import SweepSpec, expand, run_sweep_local
from trainer.errors import BnnError, ErrorCode
from trainer.store import RunStore

TINY = {"dataset": "regression", "epochs": 2, "n_train": 64, "n_test": 32, "eval_samples": 2}


def test_optim_half_design_keeps_the_baseline_and_pairs_every_cell() -> None:
    spec = SweepSpec(kind="optim", base={**TINY, "epochs": 8})
    runs = expand(spec)
    assert len(runs) == 24  # 3 optimizers x 4 of the 8 on/off rows x 2 priors
    labels = [label for label, _ in runs]
    assert labels[:2] == ["sgd/fixed", "sgd/learnable"]  # the plain baseline is kept
    cells = {label.rsplit("/", 1)[0] for label in labels}
    assert {c.split("+", 1)[-1] for c in cells if "+" in c} == {
        "clip1+anneal2",
        "clip1+cosine",
        "anneal2+cosine",
    }
    assert all(f"{c}/fixed" in labels and f"{c}/learnable" in labels for c in cells)
    cfg = dict(runs)
    assert cfg["sgd/fixed"]["lr"] == pytest.approx(0.1)  # 10x the dataset's Adam lr
    assert cfg["adam/fixed"]["lr"] == pytest.approx(0.01)
    assert cfg["adamw/fixed"]["weight_decay"] == 0.01
    assert cfg["adam+clip1+anneal2/learnable"]["grad_clip"] == 1.0
    assert cfg["adam+clip1+anneal2/learnable"]["kl_anneal_epochs"] == 2
    full = expand(SweepSpec(kind="optim", base=TINY, design="full", grid={"lr": {"sgd": 0.5}}))
    assert len(full) == 48 and dict(full)["sgd/fixed"]["lr"] == 0.5


def test_width_expansion_and_bad_specs() -> None:
    spec = SweepSpec(
        kind="width",
        base={**TINY, "widths": [8, 8]},
        grid={"widths": [4, 16], "prior": ["fixed", "learnable"]},
    )
    runs = expand(spec)
    assert [label for label, _ in runs] == [
        "w4/fixed",
        "w4/learnable",
        "w16/fixed",
        "w16/learnable",
    ]
    assert runs[2][1]["widths"] == [16, 16]  # every hidden layer of the base gets the width
    assert [lab for lab, _ in expand(SweepSpec(kind="width", base=TINY))][:2] == ["w25", "w50"]
    with pytest.raises(ValueError, match="unknown grid factors"):
        SweepSpec(kind="width", grid={"depth": [1]})
    with pytest.raises(ValueError, match="unknown training configuration fields"):
        SweepSpec(kind="width", base={"epoch": 3})
    with pytest.raises(ValueError, match=r"base.epochs: .*greater than or equal to 1 \(got 0\)"):
        SweepSpec(kind="width", base={**TINY, "epochs": 0})  # each base value checked up front
    for grid, words in [  # each level checked when the spec is read
        ({"widths": [0]}, "grid.widths"),
        ({"optimizer": ["adam", "adam"]}, "must not repeat a level"),
        ({"optimizer": ["rmsprop"]}, "grid.optimizer"),
        ({"widths": [4, 4.0]}, "must not repeat a level"),  # equal as JSON numbers
    ]:
        with pytest.raises(ValueError, match=words):
            SweepSpec(kind="width" if "widths" in grid else "optim", base=TINY, grid=grid)
    with pytest.raises(ValueError, match="do not apply to a width sweep"):
        SweepSpec(kind="width", base=TINY, grid={"optimizer": ["adam"]})
    bad = [  # rules between fields: when the grid is expanded
        SweepSpec(kind="optim", base=TINY, grid={"lr_schedule": ["none", "cosine", "step"]}),
        SweepSpec(kind="width", base={**TINY, "widths": []}, grid={"widths": [4]}),
    ]
    for spec in bad:
        with pytest.raises(BnnError) as err:
            expand(spec)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_width_and_optim_sweeps_on_a_local_dask_cluster(tmp_path: Path) -> None:
    data = tmp_path / "data"
    width = SweepSpec(
        kind="width", base=TINY, grid={"widths": [4, 8], "prior": ["fixed", "learnable"]}
    )
    sweep = run_sweep_local(width, data, workers=2)
    optim = SweepSpec(
        kind="optim", base={**TINY, "widths": [4]}, grid={"optimizer": ["adam"]}, target=10.0
    )
    sweep2 = run_sweep_local(optim, data, workers=1)
    with RunStore(data) as store:
        status = sweep_status(store, store.get_sweep(sweep.id))
        assert status["done"] and status["counts"] == {"completed": 4}
        table = study_table(store, store.get_sweep(sweep.id))
        assert list(table.index.names) == ["run", "layer"] and len(table) == 8
        assert set(table["prior"]) == {"fixed", "learnable"}
        for col in (
            "width",
            "Weight prior sigma",
            "Weight KL per element",
            "test_rmse",
            "Weight KL Average (pairwise)",
            "Weight mu std",
        ):
            assert table[col].notna().all(), col
        fixed = table[table["prior"] == "fixed"]
        assert (fixed["Weight prior sigma"] == 1.0).all()  # a fixed prior stays N(0, 1)
        report = write_study_report(store, store.get_sweep(sweep.id), tmp_path / "w")
        assert report.section_ids == ["runs", "study", "plots"]
        assert set(report.images()) == {
            "width_posteriors",
            "width_priors_fixed",
            "width_priors_learnable",
        }
        opt = study_table(store, store.get_sweep(sweep2.id))
        assert len(opt) == 8 and set(opt["optimizer"]) == {"adam"}
        assert (opt["epochs to val_rmse <= 10"] == 1).all()  # a target every run reaches
        assert {"exploding layer1", "exploding layer2", "vanishing (all layers)"} <= set(
            opt.columns
        )
        effects = main_effects(opt, "test_rmse")
        assert set(effects.index.get_level_values("factor")) == {
            "optimizer",
            "grad_clip",
            "kl_anneal_epochs",
            "lr_schedule",
            "prior",
        }
        report = write_study_report(store, store.get_sweep(sweep2.id), tmp_path / "o")
        assert report.images() == ["optim"]
    text = (tmp_path / "o" / "report.md").read_text()
    assert "main effects" in text and "learnable minus fixed" in text
    csv = pd.read_csv(tmp_path / "o" / "study.csv")
    assert len(csv) == 8 and not math.isnan(csv["test_rmse"].iloc[0])


def test_bnn_sweep_width_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    args = [
        "sweep",
        "width",
        "--widths",
        "4,8",
        "--dataset",
        "regression",
        "--prior",
        "learnable",
        "--epochs",
        "2",
        "--n-train",
        "64",
        "--n-test",
        "32",
        "--eval-samples",
        "2",
        "--workers",
        "1",
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    sweep_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert (out / "report.html").stat().st_size > 10_000 and (out / "study.csv").exists()
    with RunStore(tmp_path / "data") as store:
        assert [label for label, _ in store.get_sweep(sweep_id).runs] == ["w4", "w8"]
    assert main(["sweep", "width", "--data-dir", str(tmp_path / "data")]) == 2  # no --widths
    assert "needs --widths" in capsys.readouterr().err
