"""Alembic environment for the run catalog.

Run programmatically by :func:`trainer.store.migrations.upgrade_to_head`, which passes an
open connection (already inside a transaction) in ``config.attributes["connection"]``.
From the ``alembic`` command line, set ``sqlalchemy.url`` instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from trainer.store.migrations import make_engine

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    _run(conn)
else:
    with make_engine(config.get_main_option("sqlalchemy.url") or "").begin() as new_conn:
        _run(new_conn)
