"""Configuration from the environment (or a `.env` file), as the public contract names it."""

from __future__ import annotations

import base64
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.brokers import RedisTarget, redis_target
from models.errors import ConfigError

LiveMode = Literal["live", "test", "any"]


class Settings(BaseSettings):
    """Every setting refundsync reads. Which ones are required depends on the process."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    dr_webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, alias="DR_WEBHOOK_SECRETS"
    )
    dr_signature_tolerance_seconds: int = Field(
        default=300, ge=1, alias="DR_SIGNATURE_TOLERANCE_SECONDS"
    )
    dr_live_mode: LiveMode = Field(default="any", alias="DR_LIVE_MODE")
    api_token: SecretStr | None = Field(default=None, alias="REFUNDSYNC_API_TOKEN")
    dr_api_base_url: str = Field(default="https://api.digitalriver.com", alias="DR_API_BASE_URL")
    dr_api_key: SecretStr | None = Field(default=None, alias="DR_API_KEY")
    max_body_bytes: int = Field(default=1_048_576, ge=1, alias="REFUNDSYNC_MAX_BODY_BYTES")
    max_attempts: int = Field(default=5, ge=1, alias="REFUNDSYNC_MAX_ATTEMPTS")
    max_retries: int = Field(default=20, ge=0, alias="REFUNDSYNC_MAX_RETRIES")
    queue: str = Field(default="refundsync", min_length=1, alias="REFUNDSYNC_QUEUE")
    metrics_addr: str = Field(default="127.0.0.1:9540", alias="REFUNDSYNC_METRICS_ADDR")
    stuck_after_seconds: int = Field(default=600, ge=10, alias="REFUNDSYNC_STUCK_AFTER_SECONDS")
    sweep_interval_seconds: int = Field(default=60, ge=1, alias="REFUNDSYNC_SWEEP_INTERVAL_SECONDS")
    reconcile_interval_seconds: int = Field(
        default=900, ge=1, alias="REFUNDSYNC_RECONCILE_INTERVAL_SECONDS"
    )
    reconcile_overlap_seconds: int = Field(
        default=3600, ge=0, alias="REFUNDSYNC_RECONCILE_OVERLAP_SECONDS"
    )
    pending_check_seconds: int = Field(
        default=86_400, ge=1, alias="REFUNDSYNC_PENDING_CHECK_SECONDS"
    )

    changes_retention_days: int = Field(
        default=30, ge=1, le=3650, alias="REFUNDSYNC_CHANGES_RETENTION_DAYS"
    )
    notify_url: str | None = Field(default=None, alias="REFUNDSYNC_NOTIFY_URL")
    notify_secret: SecretStr | None = Field(default=None, alias="REFUNDSYNC_NOTIFY_SECRET")
    notify_max_age_seconds: int = Field(
        default=259_200, ge=1, alias="REFUNDSYNC_NOTIFY_MAX_AGE_SECONDS"
    )
    notify_timeout_seconds: float = Field(
        default=10.0, gt=0, le=60, alias="REFUNDSYNC_NOTIFY_TIMEOUT_SECONDS"
    )
    notify_backoff_max_seconds: int = Field(
        default=3600, ge=1, alias="REFUNDSYNC_NOTIFY_BACKOFF_MAX_SECONDS"
    )
    console_password: SecretStr | None = Field(default=None, alias="REFUNDSYNC_CONSOLE_PASSWORD")
    redis_sentinel_master: str = Field(
        default="mymaster", min_length=1, alias="REDIS_SENTINEL_MASTER"
    )
    redis_min_replicas: int = Field(default=0, ge=0, le=16, alias="REFUNDSYNC_REDIS_MIN_REPLICAS")
    journal_grace_seconds: int = Field(default=120, ge=1, alias="REFUNDSYNC_JOURNAL_GRACE_SECONDS")
    journal_max_entries: int = Field(default=200_000, ge=0, alias="REFUNDSYNC_JOURNAL_MAX_ENTRIES")

    @field_validator("dr_webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "redis_url",
        "api_token",
        "dr_api_key",
        "notify_url",
        "notify_secret",
        "console_password",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("notify_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("notify_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except ValueError:
            key = b""
        if not secret.startswith("whsec_") or len(key) < 16:
            raise ValueError("must be whsec_ followed by at least 16 bytes in base64")
        return value

    @model_validator(mode="after")
    def _redis_form(self) -> Settings:
        if self.redis_url is not None and not _standalone(self.redis_url):
            try:
                redis_target(self.redis_url, self.redis_sentinel_master)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    def broker(self) -> RedisTarget:
        """Where this process finds Redis (REDIS_URL, REDIS_SENTINEL_MASTER)."""
        return redis_target(self.redis_url or "", self.redis_sentinel_master)

    @model_validator(mode="after")
    def _notify_pair(self) -> Settings:
        if (self.notify_url is None) != (self.notify_secret is None):
            raise ValueError(
                "REFUNDSYNC_NOTIFY_URL and REFUNDSYNC_NOTIFY_SECRET must be set together"
            )
        if self.changes_retention_days * 86_400 < self.notify_max_age_seconds:
            raise ValueError(
                "REFUNDSYNC_CHANGES_RETENTION_DAYS must keep changes at least as long as"
                " REFUNDSYNC_NOTIFY_MAX_AGE_SECONDS retries them"
            )
        return self

    def secrets(self) -> list[str]:
        """The webhook signing secrets in clear, for the signature check only."""
        return [secret.get_secret_value() for secret in self.dr_webhook_secrets]


def _standalone(url: str) -> bool:
    # The standalone mode's SQLite broker (worker.queue.sqlite_transport.SCHEME).
    return url.startswith("refundsync-sqlite")


_REQUIRED = {
    "DATABASE_URL": lambda s: s.database_url,
    "REDIS_URL": lambda s: s.redis_url,
    "DR_WEBHOOK_SECRETS": lambda s: s.dr_webhook_secrets,
}


def load_settings(*required: str) -> Settings:
    """Read the settings and check that the named variables are set.

    Raises ConfigError with one line naming what is missing or invalid.
    """
    try:
        settings = Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        if not error["loc"]:
            # A rule across settings: its message names them.
            raise ConfigError(str(error["msg"]).removeprefix("Value error, ")) from None
        raise ConfigError(f"{error['loc'][0]} is invalid: {error['msg']}") from None
    missing = [name for name in required if not _REQUIRED[name](settings)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set (see README, Configuration)")
    return settings


def load_or_exit(*required: str) -> Settings:
    """Like load_settings, but a process edge: stop with one clear line, never a traceback."""
    try:
        return load_settings(*required)
    except ConfigError as exc:
        raise SystemExit(f"refundsync: {exc}") from None
