"""Fixtures for the run-store tests: numpy-built snapshots and catalog back ends.

PostgreSQL: ``$BNN_TEST_PG_URL`` or ``postgresql+psycopg://postgres@127.0.0.1:5432/test``.
A test session creates its own database ``bnn_test_<random>`` (dropped at the end) and
each test its own schema in it. Unreachable server: the tests skip, or fail when CI=true.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from trainer.snapshot import EpochSnapshot, GradLevel

PG_ADMIN_URL = os.environ.get(
    "BNN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SnapshotFactory = Callable[..., EpochSnapshot]
# name -> posterior weight shape; a conv-shaped layer and a layer without bias included
DEFAULT_LAYERS: dict[str, tuple[int, ...]] = {"layer1": (5, 3), "conv": (4, 2, 3, 3), "out": (2, 5)}


def _snapshot(
    epoch: int = 0,
    *,
    layers: dict[str, tuple[int, ...]] | None = None,
    no_bias: tuple[str, ...] = ("out",),
    grad_level: GradLevel | None = GradLevel.ELEMENT,
    steps: int = 4,
    seed: int = 0,
    metrics: dict[str, float] | None = None,
) -> EpochSnapshot:
    """A random snapshot in the trainer's format (float32 params, prior shape (1,))."""
    rng = np.random.default_rng(seed + 1000 * epoch)
    layers = DEFAULT_LAYERS if layers is None else layers
    params: dict[str, Any] = {}
    grads: dict[str, Any] = {}
    for name, shape in layers.items():
        shapes = {"weight": shape} if name in no_bias else {"weight": shape, "bias": shape[:1]}
        post, prior, g, gp = {}, {}, {}, {}
        for param, pshape in shapes.items():
            post[param] = {
                "mu": rng.normal(size=pshape).astype(np.float32),
                "sigma": rng.uniform(0.01, 0.1, size=pshape).astype(np.float32),
            }
            prior[param] = {
                "mu": rng.normal(size=1).astype(np.float32),
                "sigma": rng.uniform(0.5, 1.5, size=1).astype(np.float32),
            }
            stat_shape = pshape if grad_level is GradLevel.ELEMENT else ()
            g[param] = {
                gpn: {
                    "mean_abs": rng.random(stat_shape).astype(np.float32),
                    "max_abs": rng.random(stat_shape).astype(np.float32),
                    "nonfinite": rng.integers(0, 3, size=stat_shape).astype(np.int64),
                }
                for gpn in ("mu", "rho")
            }
            gp[param] = {"mu": rng.normal(size=steps), "rho": rng.normal(size=steps)}
        params[name] = {"posterior": post, "prior": prior}
        grads[name] = {**g, "step_norm": rng.random(steps) * 10, "prior": gp}
    if metrics is None:
        metrics = {"loss": 1.5 / (epoch + 1), "nll": 1.0, "kl": 0.5, "kl/layer1": 0.25}
    return EpochSnapshot(
        epoch=epoch,
        params=params,
        metrics=metrics,
        gradients=None if grad_level is None else grads,
        grad_level=GradLevel.NONE if grad_level is None else grad_level,
        layer_types={
            name: "BayesConv2d" if len(s) == 4 else "BayesLinear" for name, s in layers.items()
        },
    )


@pytest.fixture
def make_snapshot() -> SnapshotFactory:
    """``make_snapshot(epoch, layers=..., grad_level=..., seed=..., metrics=...)``."""
    return _snapshot


def assert_tree_equal(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts of arrays equal in keys (and their order), values, dtypes and shapes."""
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_tree_equal(a[key], b[key], f"{where}/{key}")
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
    np.testing.assert_array_equal(a, b, err_msg=where)


def as_stored(grads: Any, bits: int = 7) -> Any:
    """Gradient statistics as schema version 2 stores them: the per-element ``mean_abs``
    and ``max_abs`` arrays rounded to bfloat16 (read back as float32; to ``bits`` mantissa
    bits, as ``stat_bits`` stores them), the rest as given."""
    from trainer.store._codec import decode_bf16, encode_bf16, round_bf16

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        arr = np.asarray(node)
        if key in ("mean_abs", "max_abs") and arr.ndim >= 1:
            return decode_bf16(round_bf16(encode_bf16(arr), bits))
        return arr

    return None if grads is None else walk(grads)


def assert_grads_equal(want: Any, got: Any, where: str = "") -> None:
    """:func:`assert_tree_equal` of gradient statistics against ``as_stored(want)``."""
    assert_tree_equal(as_stored(want), got, where)


# ----------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """URL of a fresh database for this test session (dropped afterwards)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"bnn_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except SQLAlchemyError as exc:
        admin.dispose()
        reason = f"PostgreSQL at {PG_ADMIN_URL} unavailable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A URL whose connections use a fresh schema of the session database (dropped after)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    schema = f"s_{uuid.uuid4().hex[:12]}"
    engine = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(pg_database).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """Catalog URL per back end: None (the data dir's SQLite file) or a PostgreSQL schema."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_url"))
