"""Alembic environment: runs on the connection the store hands over (config.attributes["connection"])."""
from alembic import context
from sqlalchemy import text
from sqlmodel import SQLModel

import graph_service.schema  # noqa: F401  (registers the tables on SQLModel.metadata)

# Any fixed number: concurrent first runs against one PostgreSQL database take turns on this lock.
_MIGRATION_LOCK_ID = 0x636F706C


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=SQLModel.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
        context.run_migrations()


run_migrations_online()
