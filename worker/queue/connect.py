"""Clients for the Redis that `REDIS_URL` names (models.brokers): directly, over TLS, or
through Sentinel, for the ingest's publisher (asyncio), the worker's own Redis work and the
CLI (synchronous), and the Celery app's broker settings. Every process reaches the same
Redis the same way."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from celery import Celery
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.exceptions import RedisError
from redis.sentinel import Sentinel

from models.brokers import RedisTarget
from models.errors import ConfigError
from models.settings import Settings
from worker.queue import sqlite_transport


def _timeouts(timeout: float) -> dict[str, Any]:
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


def _client(
    target: RedisTarget, timeout: float, sentinel_class: Any, client_class: Any, **extra: Any
) -> Any:
    if target.sentinel:
        sentinel = sentinel_class(
            list(target.sentinels),
            sentinel_kwargs=_timeouts(timeout),
            **_timeouts(timeout),
            **target.connection_kwargs(),
        )
        return sentinel.master_for(target.master)
    return client_class(
        host=target.host,
        port=target.port,
        **extra,
        **_timeouts(timeout),
        **target.connection_kwargs(),
    )


def async_client(target: RedisTarget, timeout: float) -> aioredis.Redis:
    """An asyncio client of the master; through Sentinel, one that asks the Sentinels
    again for the master whenever its connection fails (after a failover)."""
    client: aioredis.Redis = _client(
        target, timeout, AsyncSentinel, aioredis.Redis, health_check_interval=30
    )
    return client


def sync_client(target: RedisTarget, timeout: float) -> redis.Redis:
    """A synchronous client of the master (see async_client)."""
    client: redis.Redis = _client(target, timeout, Sentinel, redis.Redis)
    return client


def celery_broker(target: RedisTarget, transport_options: dict[str, Any]) -> dict[str, Any]:
    """Celery settings for this broker: its URL, transport options (the Sentinel master's
    name) and TLS options (verified: kombu alone would accept any certificate for a
    rediss:// URL without them)."""
    options = dict(transport_options)
    if target.sentinel:
        options["master_name"] = target.master
        options["sentinel_kwargs"] = _timeouts(float(options.get("socket_timeout", 15)))
    conf: dict[str, Any] = {"broker_url": target.url, "broker_transport_options": options}
    if target.tls is not None:
        conf["broker_use_ssl"] = dict(target.tls)
    return conf


def check_tls(target: RedisTarget, timeout: float = 5.0) -> None:
    """Raise ConfigError if Redis answers over TLS with a certificate that does not verify:
    a setting to fix, not an outage to wait out. Any other failure is left to the caller's
    retries (Redis may be starting)."""
    if target.tls is None:
        return
    client = sync_client(target, timeout)
    try:
        client.ping()
    except RedisError as exc:
        if "certificate verify failed" in str(exc) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise ConfigError(
                "REDIS_URL: Redis's TLS certificate does not verify"
                " (check ssl_ca_certs and the server's host name)"
            ) from None
    finally:
        client.close()


def refuse_untrusted_redis(settings: Settings) -> None:
    """A process edge: stop with one line if Redis's TLS certificate does not verify (a CA
    that is wrong is a setting to fix, not an outage to wait out)."""
    if sqlite_transport.is_standalone(settings.redis_url or ""):
        return
    try:
        check_tls(settings.broker())
    except ConfigError as exc:
        raise SystemExit(f"refundsync: {exc}") from None


def workers_answering(target: RedisTarget, timeout: float = 1.0) -> list[str]:
    """The names of the Celery workers that answer a ping through this broker within
    `timeout` (remote control, as `celery inspect ping` and Flower use it)."""
    app = Celery("refundsync-ping", set_as_current=False)
    app.conf.update(**celery_broker(target, {}))
    try:
        replies = app.control.ping(timeout=timeout)
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)
