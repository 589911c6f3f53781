"""Request and response bodies of the HTTP API (pydantic models).

Responses are built as plain JSON (non-finite floats as "nan"/"inf"/"-inf"); the response
models here describe them in the OpenAPI document.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
)

from trainer.config import CONFIG_RULES, TrainConfig, check_json_types, json_int
from trainer.errors import BnnError
from trainer.store import RunStatus
from trainer.tracking import LISTED_KEYS, MAX_EPOCHS, check_tracked_config

__all__ = [
    "JSON_VALUE",
    "MAX_TAGS",
    "NOT_BLANK",
    "NO_NUL",
    "EpochOut",
    "ErrorOut",
    "MetricsOut",
    "RunCreate",
    "RunOut",
    "RunPage",
    "RunPatch",
    "TrackedRunCreate",
    "check_text",
    "complete_components",
    "is_blank",
]

MAX_TAGS = 32
RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


MAX_DEPTH = 16
# What check_text refuses, as schema patterns (the same text in Python's re and in the
# ECMA-262 regexes of JSON Schema): no NUL; not blank. "Blank" is spelled out instead of
# \\s, whose set differs between the two (Python counts \\x1c-\\x1f and \\x85).
_SPACE = r"\t\n\x0b\x0c\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NO_NUL = r"^[^\x00]*$"
NOT_BLANK = rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$"
_NO_NUL_KEY = {"maxLength": 256, "pattern": NO_NUL}
# Any JSON value check_text takes: strings without NUL (<= 20,000 characters), object keys
# without NUL (<= 256). Nesting deeper than MAX_DEPTH is refused too (said in words: a
# schema cannot count it). ``#/components/schemas/JsonValue`` (complete_openapi adds it).
JSON_VALUE: dict[str, Any] = {
    "description": f"any JSON value: no NUL in strings or keys, nested at most {MAX_DEPTH} deep",
    "anyOf": [
        {"type": "string", "maxLength": 20_000, "pattern": NO_NUL},
        {"type": ["number", "boolean", "null"]},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        {
            "type": "object",
            "propertyNames": _NO_NUL_KEY,
            "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
        },
    ],
}


def is_blank(value: str) -> bool:
    """No character outside :data:`NOT_BLANK`'s spaces (what the schema's pattern says)."""
    return re.fullmatch(NOT_BLANK.strip("^$"), value) is None


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


def check_config_text(config: dict[str, Any], where: str = "") -> None:
    """ValueError unless the text of a training configuration given as a plain object (a
    sweep's or study's ``base``, an arm's ``config``) keeps :class:`RunCreate`'s rules:
    ``name`` 256 characters and not blank, at most 32 ``tags`` of 64 not blank,
    ``resolved_priors`` keys and values 256, nothing with NUL or lone surrogates."""
    check_text(config, f"{where}config", 10_000)
    name = config.get("name")
    if isinstance(name, str):
        check_text(name, f"{where}name", 256)
        if is_blank(name):
            raise ValueError(f"{where}name must not be blank")
    tags = config.get("tags")
    if isinstance(tags, list):
        if len(tags) > MAX_TAGS:
            raise ValueError(f"{where}tags: at most {MAX_TAGS} tags, got {len(tags)}")
        for tag in tags:
            if isinstance(tag, str):
                check_text(tag, f"{where}tag", 64)
                if is_blank(tag):
                    raise ValueError(f"{where}tags must not be blank")
    priors = config.get("resolved_priors")
    if priors is not None:
        check_text(priors, f"{where}resolved_priors", 256)


def _nullable(schema: dict[str, Any], inner: dict[str, Any]) -> None:
    """``schema`` (a generated ``X | None`` property) made ``inner | null``, in place."""
    schema.pop("type", None)
    schema["anyOf"] = [inner, {"type": "null"}]


def _run_create_schema(schema: dict[str, Any]) -> None:
    """What RunCreate's validators check, in its schema (see :func:`check_text`)."""
    props = schema.get("properties", {})
    if "name" in props:
        _nullable(props["name"], {"type": "string", "maxLength": 256, "pattern": NOT_BLANK})
    if "tags" in props:
        props["tags"]["maxItems"] = MAX_TAGS
        props["tags"]["items"] = {"type": "string", "maxLength": 64, "pattern": NOT_BLANK}
    for branch in props.get("widths", {}).get("anyOf", ()):
        if branch.get("type") == "array":
            branch["items"] = {"type": "integer", "minimum": 1}
    schema.setdefault("allOf", []).extend(copy.deepcopy(CONFIG_RULES))
    if "resolved_priors" in props:
        text = {"type": "string", "maxLength": 256, "pattern": NO_NUL}
        _nullable(
            props["resolved_priors"],
            {"type": "object", "propertyNames": _NO_NUL_KEY, "additionalProperties": text},
        )


class RunCreate(TrainConfig):
    """A training configuration, plus what to do with it.

    ``execute: true`` (default) queues the run on Dask (202); ``false`` registers a run that a
    trainer elsewhere fills through ``PUT /runs/{id}/epochs/{epoch}`` and ``PATCH`` (201).
    """

    model_config = ConfigDict(json_schema_extra=_run_create_schema)

    execute: StrictBool = Field(default=True, description="train on the service's Dask cluster")
    run_id: str | None = Field(
        default=None, pattern=RUN_ID, description="client-chosen id (makes a retried POST safe)"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is not None:
            check_text(value, "name", 256)
            if is_blank(value):
                raise ValueError("name must not be blank")
        return value

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags, got {len(value)}")
        for tag in value:
            check_text(tag, "tag", 64)
            if is_blank(tag):
                raise ValueError("tags must not be blank")
        return value

    @field_validator("resolved_priors")
    @classmethod
    def _check_priors(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            check_text(value, "resolved_priors", 256)
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _json_types(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.field_name:
            check_json_types({info.field_name: value})  # in JSON 0 is not a boolean, 2.0 not an int
        return value

    def train_config(self) -> dict[str, Any]:
        """The configuration alone (JSON values), without ``execute`` and ``run_id``."""
        return self.model_dump(mode="json", exclude={"execute", "run_id"})


def _run_patch_schema(schema: dict[str, Any]) -> None:
    """What RunPatch's validators and ``PATCH /runs/{id}`` check, in its schema."""
    props = schema.get("properties", {})
    if "name" in props:
        _nullable(props["name"], {"type": "string", "maxLength": 256, "pattern": NOT_BLANK})
    if "tags" in props:
        items = {"type": "string", "maxLength": 64, "pattern": NOT_BLANK}
        _nullable(props["tags"], {"type": "array", "maxItems": MAX_TAGS, "items": items})
    for name in ("error", "train_host", "diverged_layer"):
        for branch in props.get(name, {}).get("anyOf", ()):
            if branch.get("type") == "string":
                branch["pattern"] = NO_NUL
    # ``summary``: see :func:`complete_components` (it refers to JsonValue)
    # diverged_step and diverged_epoch come together (both integers or both null/absent),
    # and diverged_layer only with them
    both = {"type": "integer"}
    schema["anyOf"] = [
        {
            "required": ["diverged_step", "diverged_epoch"],
            "properties": {"diverged_step": both, "diverged_epoch": both},
        },
        {
            "properties": {
                "diverged_step": {"type": "null"},
                "diverged_epoch": {"type": "null"},
                "diverged_layer": {"type": "null"},
            }
        },
    ]


class RunPatch(BaseModel):
    """What a trainer reports about its run; every field is optional.

    ``diverged_step`` and ``diverged_epoch`` are reported together (``diverged_layer`` only
    with them); ``summary`` is merged into the run's summary.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_run_patch_schema)

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
        default=None,
        ge=0,
        le=2**53,  # exact in a double: JSON tools compare numbers as doubles
        description="global step where it first became non-finite",
    )
    diverged_epoch: int | None = Field(
        default=None, ge=0, lt=2**31, description="that step's epoch (with diverged_step)"
    )
    diverged_layer: str | None = Field(
        default=None, min_length=1, max_length=256, description="first non-finite parameter"
    )
    name: str | None = Field(default=None, max_length=256, description="rename the run")
    tags: list[str] | None = Field(
        default=None, max_length=MAX_TAGS, description="replace the run's tags"
    )

    @field_validator("diverged_step", "diverged_epoch", mode="before")
    @classmethod
    def _json_int(cls, value: Any) -> Any:
        return json_int(value)  # 3 or 3.0, not true or "3"

    @field_validator("error", "summary", "train_host", "diverged_layer")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        check_text(value, "value", 20_000)
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return RunCreate._check_name(value)

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else RunCreate._check_tags(value)


def _tracked_create_schema(schema: dict[str, Any]) -> None:
    """What TrackedRunCreate's validators check, in its schema (``config``: see
    :func:`complete_components`)."""
    props = schema.get("properties", {})
    if "name" in props:
        _nullable(props["name"], {"type": "string", "maxLength": 256, "pattern": NOT_BLANK})
    if "tags" in props:
        props["tags"]["maxItems"] = MAX_TAGS
        props["tags"]["items"] = {"type": "string", "maxLength": 64, "pattern": NOT_BLANK}


class TrackedRunCreate(BaseModel):
    """A run of any training loop (``trainer.track``), registered under the id of its URL
    (``PUT /runs/{id}``): RUNNING, filled by its trainer through ``PUT
    /runs/{id}/epochs/{epoch}`` and ``PATCH``, like a run created with ``execute: false``.

    ``config`` is the trainer's own description of the run (any JSON object, not a training
    configuration of this service); the keys the run listing reads must have its types:
    ``epochs`` an integer in [0, 2^31), ``dataset``, ``prior`` and ``prior_mode`` strings.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=_tracked_create_schema)

    name: str | None = Field(default=None, description="default: the run id")
    tags: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict, description="the run's settings")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return RunCreate._check_name(value)

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: list[str]) -> list[str]:
        return RunCreate._check_tags(value)

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_text(value, "config", 20_000)
        try:
            return check_tracked_config(value)
        except BnnError as exc:
            raise ValueError(exc.message) from None


def complete_components(components: dict[str, Any]) -> None:
    """The parts of the OpenAPI components that refer to others: ``JsonValue`` (see
    :data:`JSON_VALUE`), RunPatch's ``summary`` and TrackedRunCreate's ``config`` (objects
    of JsonValue), in place."""
    components["JsonValue"] = JSON_VALUE
    tracked = components.get("TrackedRunCreate", {}).get("properties", {})
    if "config" in tracked:
        text = {"type": "string", "maxLength": 20_000, "pattern": NO_NUL}
        listed = {key: {"anyOf": [text, {"type": "null"}]} for key in LISTED_KEYS}
        epochs = {"type": "integer", "minimum": 0, "maximum": MAX_EPOCHS}
        listed["epochs"] = {"anyOf": [epochs, {"type": "null"}]}
        tracked["config"] = {
            "type": "object",
            "description": tracked["config"].get("description", ""),
            "propertyNames": _NO_NUL_KEY,
            "properties": listed,
            "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
        }
    patch = components.get("RunPatch", {}).get("properties", {})
    if "summary" in patch:
        summary = {
            "type": "object",
            "propertyNames": _NO_NUL_KEY,
            "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
        }
        _nullable(patch["summary"], summary)


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


class EpochStorage(BaseModel):
    schema_version: int = Field(description="the epoch file's format version")
    stat_bits: int = Field(
        description="mantissa bits kept of the per-element gradient statistics' 7 (bfloat16; "
        "fewer: rounded, lossy)"
    )
    posteriors_compressed: bool = Field(
        description="whether the posterior arrays are compressed in the file"
    )


class EpochOut(BaseModel):
    run_id: str
    epoch: int
    metrics: dict[str, float | str]
    size: int = Field(description="bytes of the HDF5 file")
    checksum: str = Field(description="sha256 of the file")
    created_at: str
    storage: EpochStorage | None = Field(
        default=None,
        description="how the file stores the epoch (read from it: GET of one epoch only)",
    )


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
