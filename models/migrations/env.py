"""Alembic environment: online migrations under an advisory lock, so that several
processes running `refundsync migrate` at once (one per host) apply each step once.

SQLite (the standalone mode) has one migrator, `refundsync run`, and no advisory locks.
"""

from alembic import context
from sqlalchemy import text

from models.db import make_engine
from models.tables import metadata

# Any constant shared by every refundsync migrator.
MIGRATION_LOCK = 0x7265_6675_6E64

config = context.config
engine = make_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1)
postgres = engine.dialect.name == "postgresql"

with engine.connect() as connection:
    if postgres:
        # Waiting for another migrator may take longer than the service's lock timeout,
        # and DDL may take longer than its statement timeout.
        connection.execute(text("SET lock_timeout = 0"))
        connection.execute(text("SET statement_timeout = 0"))
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()
    try:
        context.configure(
            connection=connection, target_metadata=metadata, render_as_batch=not postgres
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        if postgres:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            connection.commit()
engine.dispose()
