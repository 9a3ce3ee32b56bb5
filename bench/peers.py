"""The baselines the ingest is measured against, served by the same uvicorn settings.

- `ceiling`: the least an ASGI endpoint can do: read the body, answer 202.
- `naive`: what a team would otherwise write: FastAPI, check the signature, `send_task`.
"""

from __future__ import annotations

import os

from celery import Celery
from fastapi import FastAPI, Request, Response

from models.signature import HEADER, SignatureError, verify
from worker.queue.contract import APPLY_TASK


async def ceiling(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 202,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"status":"queued"}'})


celery = Celery("naive", broker=os.environ.get("REDIS_URL", ""), set_as_current=False)
naive = FastAPI()
SECRETS = [s for s in os.environ.get("DR_WEBHOOK_SECRETS", "").split(",") if s]


@naive.post("/webhooks/digital-river")
async def webhook(request: Request) -> Response:
    body = await request.body()
    try:
        verify(request.headers.get(HEADER), body, SECRETS, tolerance_s=300)
    except SignatureError:
        return Response(status_code=401)
    event = await request.json()
    celery.send_task(
        APPLY_TASK,
        args=[body.decode(), "", "webhook"],
        queue="refundsync",
        argsrepr=repr((event.get("id"), event.get("type"))),
    )
    return Response('{"status":"queued"}', status_code=202, media_type="application/json")
