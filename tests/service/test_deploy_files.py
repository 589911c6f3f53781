"""The Dockerfile and compose file agree with the code (no Docker engine runs in CI)."""

from pathlib import Path

import yaml

from service.cli import build_parser
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_the_api_database_scheduler_workers_and_a_data_volume() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"api", "postgres", "scheduler", "worker"}
    assert "bnn-data:/data" in services["api"]["volumes"]
    assert "bnn-data" in compose["volumes"]
    assert services["worker"]["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]


def test_every_bnn_variable_in_compose_is_a_setting() -> None:
    fields = {f"BNN_{name.upper()}" for name in Settings.model_fields}
    fields.add("BNN_DATA_DIR")
    for name, service in _compose()["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("BNN_"):
                assert key in fields, f"{name}: {key} is not a setting"
    env = _compose()["services"]["api"]["environment"]
    settings = Settings(
        data_dir=env["BNN_DATA_DIR"],
        database_url=env["BNN_DATABASE_URL"],
        dask_scheduler=env["BNN_DASK_SCHEDULER"],
        public_url=env["BNN_PUBLIC_URL"],
        api_token=env["BNN_API_TOKEN"] or None,
    )
    assert settings.database_url is not None and settings.database_url.startswith(
        "postgresql+psycopg"
    )


def test_the_commands_in_the_images_exist() -> None:
    api = _compose()["services"]["api"]["command"]
    assert api[0] == "bnn"
    args = build_parser().parse_args(api[1:])
    assert args.command == "serve" and args.host == "0.0.0.0"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'CMD ["bnn", "serve"]' in dockerfile
    assert "torch==2.14.1" in dockerfile and "/whl/cpu" in dockerfile
