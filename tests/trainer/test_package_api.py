"""The names the README imports from ``trainer`` are the functions and classes it shows."""

from pathlib import Path

import trainer


def test_readme_names_resolve_to_the_api(tmp_path: Path) -> None:
    from trainer import RunReader, RunStore, load_distribution_log, train

    assert callable(train) and not isinstance(train, type(trainer))
    assert train is trainer.train
    store = RunStore(tmp_path)
    result = train(
        {"dataset": "regression", "epochs": 2, "n_train": 64, "n_test": 16},
        sink=store,
        progress=False,
    )
    log = load_distribution_log(result.run_id, data_dir=tmp_path)
    assert log[1]["layer1"]["posterior"]["weight"]["mu"].shape == (10, 1)
    reader = RunReader(result.run_id, data_dir=tmp_path)
    assert reader.array(1, "layer1", "posterior", "weight", "sigma", index=slice(0, 5)).shape == (
        5,
        1,
    )
    for name in trainer.__all__:
        assert getattr(trainer, name) is not None, name
