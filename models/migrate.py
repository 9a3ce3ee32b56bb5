"""Run the Alembic migrations shipped inside the package."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from models.db import database_url


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations; no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", "models:migrations")
    config.set_main_option("sqlalchemy.url", database_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` up to `revision`."""
    command.upgrade(alembic_config(url), revision)
