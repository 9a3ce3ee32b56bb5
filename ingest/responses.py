"""JSON answers, errors included: `{"error": "<code>", "message": "<text>"}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse


def error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error answer in the contract's shape."""
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def ok(payload: Any, status: int = 200) -> JSONResponse:
    """A JSON answer."""
    return JSONResponse(payload, status_code=status)
