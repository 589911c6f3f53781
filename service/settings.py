"""Service settings: environment variables with the prefix ``BNN_``, built on demand.

    BNN_DATA_DIR=./bnn-data  BNN_DATABASE_URL=postgresql+psycopg://...  BNN_HOST=127.0.0.1
    BNN_PORT=8000  BNN_DASK_SCHEDULER=tcp://host:8786  BNN_DASK_WORKERS=2
    BNN_DASK_DASHBOARD=127.0.0.1:8787 (default: no dashboard)
    BNN_PUBLIC_URL=http://api:8000  BNN_API_TOKEN=...  BNN_AUTH_READS=false
    BNN_MAX_EPOCHS=1000  BNN_MAX_WIDTH=4096  BNN_MAX_LAYERS=8  BNN_MAX_MC_SAMPLES=100 ...
    BNN_MAX_UPLOAD_BYTES=536870912  BNN_MAX_UPLOAD_LAYERS=64  BNN_MAX_UPLOAD_ELEMENTS=50000000

Nothing is read at import: :func:`get_settings` (or ``Settings()``) reads the environment
each time, so tests pass their own :class:`Settings` to ``create_app``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.store.validate import UploadLimits

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Everything the service is configured by (one ``BNN_<NAME>`` variable per field)."""

    model_config = SettingsConfigDict(env_prefix="BNN_", extra="ignore")

    data_dir: Path = Field(default=Path("bnn-data"), description="epoch files and SQLite catalog")
    database_url: str | None = Field(
        default=None, description="catalog URL; default SQLite in the data directory"
    )
    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=1, le=65535)
    public_url: str | None = Field(
        default=None, description="URL Dask workers report to; default http://<host>:<port>"
    )
    dask_scheduler: str | None = Field(
        default=None, description="scheduler address; default a LocalCluster of processes"
    )
    dask_workers: int = Field(default=2, ge=1, le=64, description="LocalCluster worker processes")
    dask_dashboard: str | None = Field(
        default=None,
        description="address of the LocalCluster's Dask dashboard, e.g. 127.0.0.1:8787 (its "
        "pages need bokeh); default none: Dask's HTTP endpoints on a free loopback port",
    )
    dask_timeout_s: float = Field(default=20.0, gt=0, description="wait for the scheduler")
    api_token: SecretStr | None = Field(default=None, description="Bearer token for writes")
    auth_reads: bool = Field(default=False, description="reads need the token too")
    heartbeat_s: float = Field(default=5.0, gt=0, description="job heartbeat interval")
    stale_after_s: float | None = Field(
        default=None, ge=0, description="running runs silent this long become interrupted"
    )
    # limits on what a training request may ask for (422 naming the limit)
    max_epochs: int = Field(default=1000, ge=1)
    max_width: int = Field(default=4096, ge=1)
    max_layers: int = Field(default=8, ge=1)
    max_mc_samples: int = Field(default=100, ge=1, description="mc_samples and eval_samples")
    max_batch_size: int = Field(default=65536, ge=1)
    max_n_train: int = Field(default=1_000_000, ge=1, description="n_train and n_test")
    # request sizes (413 beyond them)
    max_upload_bytes: int = Field(default=512 * 2**20, ge=1, description="one epoch file")
    max_json_bytes: int = Field(default=2**20, ge=1, description="any other request body")
    # what one uploaded epoch file may hold (422 naming the limit beyond them); a 784-1200-
    # 1200-10 MLP capture with per-element gradients and a 10k-example evaluation holds
    # 3 layers and 19.2 million elements (77 MB of arrays)
    max_upload_layers: int = Field(default=64, ge=1, description="layers in one epoch file")
    max_upload_elements: int = Field(
        default=50_000_000, ge=1, description="array elements of one epoch file, all together"
    )

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    @field_validator("database_url", "dask_scheduler", "public_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def token(self) -> str | None:
        """The API token in clear (None when auth is off)."""
        return None if self.api_token is None else self.api_token.get_secret_value()

    @property
    def report_url(self) -> str:
        """Where trainers on Dask workers send their epochs: ``public_url`` or this server."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def upload_limits(self) -> UploadLimits:
        """What an uploaded epoch file may hold (``BNN_MAX_UPLOAD_LAYERS`` / ``_ELEMENTS``)."""
        return UploadLimits(
            max_layers=self.max_upload_layers, max_elements=self.max_upload_elements
        )

    def describe_jobs(self) -> str:
        if self.dask_scheduler:
            return f"Dask scheduler {self.dask_scheduler}"
        return f"Dask LocalCluster of {self.dask_workers} processes"


def get_settings() -> Settings:
    """Settings from the environment, read now."""
    return Settings()
