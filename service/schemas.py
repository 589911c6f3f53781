"""Request and response bodies of the HTTP API (pydantic models).

Responses are built as plain JSON (non-finite floats as "nan"/"inf"/"-inf"); the response
models here describe them in the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from trainer.config import TrainConfig
from trainer.store import RunStatus

__all__ = [
    "MAX_TAGS",
    "EpochOut",
    "ErrorOut",
    "MetricsOut",
    "RunCreate",
    "RunOut",
    "RunPage",
    "RunPatch",
    "check_text",
]

MAX_TAGS = 32
RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


MAX_DEPTH = 16


def _check_string(value: str, where: str, max_len: int) -> None:
    if "\x00" in value:
        raise ValueError(f"{where} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not valid Unicode (lone surrogate)") from None
    if len(value) > max_len:
        raise ValueError(f"{where} is longer than {max_len} characters ({len(value)})")


def check_text(value: Any, where: str, max_len: int) -> None:
    """ValueError for what a catalog cannot hold in ``value``: strings with NUL or lone
    surrogates, strings over ``max_len``, nesting deeper than :data:`MAX_DEPTH`."""
    stack = [(value, where, 0)]
    while stack:
        item, at, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{where} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            _check_string(item, at, max_len)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(str(key), f"{at} key", 256)
                stack.append((child, f"{at}[{key!r}]", depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]", depth + 1) for i, child in enumerate(item))


class RunCreate(TrainConfig):
    """A training configuration, plus what to do with it.

    ``execute: true`` (default) queues the run on Dask (202); ``false`` registers a run that a
    trainer elsewhere fills through ``PUT /runs/{id}/epochs/{epoch}`` and ``PATCH`` (201).
    """

    execute: bool = Field(default=True, description="train on the service's Dask cluster")
    run_id: str | None = Field(
        default=None, pattern=RUN_ID, description="client-chosen id (makes a retried POST safe)"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None:
            check_text(value, "name", 256)
            if not value.strip():
                raise ValueError("name must not be blank")
        return value

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags, got {len(value)}")
        for tag in value:
            check_text(tag, "tag", 64)
            if not tag.strip():
                raise ValueError("tags must not be blank")
        return value

    def train_config(self) -> dict[str, Any]:
        """The configuration alone (JSON values), without ``execute`` and ``run_id``."""
        return self.model_dump(mode="json", exclude={"execute", "run_id"})


class RunPatch(BaseModel):
    """What a trainer reports about its run; every field is optional."""

    model_config = ConfigDict(extra="forbid")

    status: RunStatus | None = Field(default=None, description="transitions are checked (409)")
    error: str | None = Field(default=None, max_length=20_000)
    summary: dict[str, Any] | None = Field(default=None, description="merged into the summary")
    heartbeat: StrictBool = Field(
        default=False,
        description="true: the trainer is alive, recorded at the service's clock; false: no "
        'heartbeat. Only a JSON boolean (not 0, 1, "true" or a timestamp)',
    )
    train_host: str | None = Field(default=None, max_length=256, description="where it trains")
    diverged_step: int | None = Field(
        default=None, ge=0, lt=2**63, description="global step where it first became non-finite"
    )
    diverged_epoch: int | None = Field(
        default=None, ge=0, lt=2**31, description="that step's epoch (with diverged_step)"
    )
    diverged_layer: str | None = Field(
        default=None, min_length=1, max_length=256, description="first non-finite parameter"
    )

    @field_validator("error", "summary", "train_host", "diverged_layer")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        check_text(value, "value", 20_000)
        return value


class RunOut(BaseModel):
    id: str
    name: str
    status: RunStatus
    config: dict[str, Any]
    tags: list[str]
    created_at: str
    updated_at: str
    heartbeat_at: str | None
    finished_at: str | None
    host: str = Field(description="where the run was registered")
    train_host: str | None = Field(description="where it trains, as its trainer reported")
    error: str | None
    summary: dict[str, Any]
    diverged_step: int | None = Field(
        default=None, description="global training step where it first became non-finite"
    )
    diverged_epoch: int | None = Field(default=None, description="the epoch of that step")
    diverged_layer: str | None = Field(
        default=None, description="first parameter with a non-finite gradient at that step"
    )
    url: str
    epochs: list[int] | None = Field(default=None, description="captured epochs (one run only)")
    metrics: dict[str, float | str] | None = Field(
        default=None, description="metrics of the last captured epoch (one run only)"
    )


class RunPage(BaseModel):
    total: int
    limit: int
    offset: int
    runs: list[RunOut]


class EpochOut(BaseModel):
    run_id: str
    epoch: int
    metrics: dict[str, float | str]
    size: int = Field(description="bytes of the HDF5 file")
    checksum: str = Field(description="sha256 of the file")
    created_at: str


class MetricsOut(BaseModel):
    run_id: str
    epochs: list[int]
    series: dict[str, list[float | str | None]]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorOut(BaseModel):
    error: ErrorBody
