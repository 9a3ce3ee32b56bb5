"""`REDIS_URL` read once into what every process connects with: one Redis (`redis://`),
one Redis over TLS (`rediss://`), or the master a set of Redis Sentinels names
(`sentinel://HOST:PORT[;sentinel://HOST:PORT...]/DB`, as Celery writes it, with
`REDIS_SENTINEL_MASTER`). Pure: nothing connects here (worker.queue.connect does).

TLS options travel in the URL's query, as redis-py reads them: `ssl_ca_certs` (a CA file;
without it the system's CAs), `ssl_certfile` and `ssl_keyfile` (a client certificate),
`ssl_cert_reqs` (`required`, the default, or `optional`/`none`, which switch verification
off and are refused unless spelled out) and `ssl_check_hostname`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from models.errors import ConfigError

_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


@dataclass(frozen=True)
class RedisTarget:
    """Where a process finds Redis."""

    # The URL with no TLS options (what Celery's broker_url gets).
    url: str
    db: int
    host: str = ""
    port: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # (host, port) of each Sentinel, or empty for a Redis named directly.
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = "mymaster"
    # redis-py's ssl_* keyword arguments, or None without TLS.
    tls: dict[str, Any] | None = None

    @property
    def sentinel(self) -> bool:
        return bool(self.sentinels)

    def connection_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments for a connection to the Redis itself (not a Sentinel)."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.tls is not None:
            kwargs.update(ssl=True, **self.tls)
        return kwargs


def _tls(query: dict[str, list[str]]) -> dict[str, Any]:
    options = {name: unquote(values[-1]) for name, values in query.items() if name in _TLS_OPTIONS}
    unknown = sorted(set(query) - set(_TLS_OPTIONS))
    if unknown:
        raise ConfigError(f"REDIS_URL has an unknown option {unknown[0]!r}")
    reqs = options.pop("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise ConfigError("REDIS_URL: ssl_cert_reqs must be required, optional or none")
    tls: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs]}
    check = options.pop("ssl_check_hostname", None)
    if check is not None:
        tls["ssl_check_hostname"] = check.lower() in ("1", "true", "yes")
    tls.update(options)
    return tls


def _db(path: str) -> int:
    name = path.strip("/") or "0"
    if not name.isdigit():
        raise ConfigError(f"REDIS_URL: the database must be a number, not {name!r}")
    return int(name)


def redis_target(url: str, master: str = "mymaster") -> RedisTarget:
    """Read `url` (REDIS_URL) and `master` (REDIS_SENTINEL_MASTER); ConfigError names what
    is wrong in one line."""
    if url.startswith("sentinel://"):
        return _sentinel_target(url, master)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError("REDIS_URL must be redis://, rediss:// or sentinel:// with a host")
    query = parse_qs(parts.query, keep_blank_values=True)
    if parts.scheme == "redis" and query:
        raise ConfigError("REDIS_URL: TLS options need a rediss:// URL")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError("REDIS_URL has an invalid port") from None
    return RedisTarget(
        url=parts._replace(query="").geturl(),
        db=_db(parts.path),
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=_tls(query) if parts.scheme == "rediss" else None,
    )


def _sentinel_target(url: str, master: str) -> RedisTarget:
    if not master:
        raise ConfigError("REDIS_SENTINEL_MASTER must name the master")
    sentinels: list[tuple[str, int]] = []
    db = 0
    password: str | None = None
    for piece in url.split(";"):
        parts = urlsplit(piece.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ConfigError("REDIS_URL: each Sentinel must be sentinel://HOST:PORT")
        try:
            sentinels.append((parts.hostname, parts.port or 26379))
        except ValueError:
            raise ConfigError("REDIS_URL has an invalid Sentinel port") from None
        if parts.path.strip("/"):
            db = _db(parts.path)
        if parts.password is not None:
            password = unquote(parts.password)
        if parts.query:
            raise ConfigError("REDIS_URL: a sentinel:// URL takes no options")
    return RedisTarget(url=url, db=db, password=password, sentinels=tuple(sentinels), master=master)
