"""`refundsync run` with nothing installed: SQLite files instead of Postgres and Redis.

The same migrations, rules and tasks run on a SQLite database and kombu's SQLAlchemy
transport on a second SQLite file (worker.queue.sqlite_transport). SQLite has no row locks,
so it is made correct by construction instead: every transaction takes the database's
write lock when it begins (models.db), and one worker process applies events. That is for
evaluation and tests, not production (docs/standalone.md).
"""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import platformdirs

from models.errors import ConfigError
from models.settings import Settings
from worker.queue.sqlite_transport import broker_url, prepare

__all__ = ["RunPlan", "banner", "plan_run", "prepare"]

DEV_SECRET_FILE = "dev-webhook-secret"  # noqa: S105 - a file name
EXAMPLE_FILE = "example-event.json"


@dataclass(frozen=True)
class RunPlan:
    """What `refundsync run` starts with: the mode, its files and the children's settings."""

    standalone: bool
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    dev_secret: str | None = None

    @property
    def database_url(self) -> str:
        return self.env.get("DATABASE_URL", "")


def default_data_dir() -> Path:
    """The user's data directory for refundsync (e.g. ~/.local/share/refundsync)."""
    return platformdirs.user_data_path("refundsync")


def plan_run(settings: Settings, data_dir: Path | None, *, dev_secret: bool) -> RunPlan:
    """Decide the mode from the environment; raises ConfigError with what to fix."""
    if bool(settings.database_url) != bool(settings.redis_url):
        given, missing = (
            ("DATABASE_URL", "REDIS_URL")
            if settings.database_url
            else ("REDIS_URL", "DATABASE_URL")
        )
        raise ConfigError(
            f"{given} is set but {missing} is not: set both to run on Postgres and Redis, "
            "or neither to run standalone on SQLite files in --data-dir"
        )
    standalone = not settings.database_url
    directory = (data_dir or default_data_dir()).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    if standalone:
        env["DATABASE_URL"] = f"sqlite:///{directory / 'refundsync.db'}"
        env["REDIS_URL"] = broker_url(str(directory / "broker.db"))
    secret = None
    if not settings.dr_webhook_secrets:
        if not dev_secret:
            raise ConfigError(
                "DR_WEBHOOK_SECRETS must be set (or pass --dev-secret to sign with a "
                "development secret)"
            )
        secret = _dev_secret(directory)
        env["DR_WEBHOOK_SECRETS"] = secret
    return RunPlan(standalone, directory, env, secret)


def _dev_secret(directory: Path) -> str:
    # Kept with the data, so signed requests keep working across restarts.
    path = directory / DEV_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    secret = f"whsec_dev_{secrets.token_hex(16)}"
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret


def example_event(order_id: str | None = None) -> dict[str, object]:
    """A DR `refund.pending` event with a fresh id, to try the service with."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    order = order_id or f"ord_example_{uuid.uuid4().hex[:8]}"
    return {
        "id": str(uuid.uuid4()),
        "type": "refund.pending",
        "createdTime": now,
        "liveMode": False,
        "digitalRiverVersion": "2021-12-13",
        "data": {
            "object": {
                "id": f"re_{uuid.uuid4()}",
                "orderId": order,
                "currency": "USD",
                "amount": 10.0,
                "refundedAmount": 0.0,
                "state": "pending",
                "reason": "requested_by_customer",
                "items": [{"itemId": "example-item", "quantity": 1, "amount": 10.0}],
                "createdTime": now,
                "liveMode": False,
            }
        },
    }


def wait_until_serving(
    host: str, port: int, ingest: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    """Wait until the ingest answers /healthz (or has exited, or the time is up)."""
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ingest.poll() is None:
        try:
            if httpx.get(f"http://{local}:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def _cli() -> str:
    """How to call this refundsync from another shell: the installed script's full path,
    since `make run`'s virtualenv need not be on that shell's PATH."""
    script = Path(sys.executable).with_name("refundsync")
    return shlex.quote(str(script)) if script.exists() else "refundsync"


def banner(plan: RunPlan, host: str, port: int) -> list[str]:
    """What `refundsync run` prints once its processes are started."""
    url = f"http://{host}:{port}/webhooks/digital-river"
    example = plan.data_dir / EXAMPLE_FILE
    order = f"ord_example_{uuid.uuid4().hex[:8]}"
    event = example_event(order)
    example.write_text(json.dumps(event, indent=2) + "\n")
    lines = []
    if plan.standalone:
        lines.append(
            "standalone mode: SQLite, one worker; for evaluation and tests, not production"
        )
    lines += [f"data directory {plan.data_dir}", f"webhook URL {url}"]
    if plan.dev_secret:
        lines.append(f"development webhook secret {plan.dev_secret} (not for production)")
        lines.append("send the example event (paste into another shell):")
        cli, file = _cli(), shlex.quote(str(example))
        lines.append(
            f"  {cli} sign --secret {shlex.quote(plan.dev_secret)} {file}"
            f" | curl -sS -X POST {url} -H 'Content-Type: application/json'"
            f' -H "DigitalRiver-Signature: $(cat)" --data-binary @{file}'
        )
        database = f"DATABASE_URL={shlex.quote(plan.database_url)} " if plan.standalone else ""
        lines.append(f"then: {database}{cli} order show {order}")
    return lines
