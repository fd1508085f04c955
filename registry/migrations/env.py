"""Alembic environment: runs on the connection Registry.init() hands over, or on sqlalchemy.url (alembic CLI)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from xmerge.registry.schema import Base

config = context.config


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    with create_engine(config.get_main_option("sqlalchemy.url")).connect() as conn:
        run(conn)
        conn.commit()
