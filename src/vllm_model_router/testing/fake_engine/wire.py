"""Bodies and responses in the shapes vLLM's FastAPI server gives them.

Compact JSON, the OpenAI error envelope, plain-text answers and FastAPI's own ``{"detail": ...}``
answers for unknown routes: the router parses all of these, so their bytes are part of what the
fake engine mimics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web


def dumps(payload: Any) -> bytes:
    """JSON without spaces, as vLLM writes it."""
    return json.dumps(payload, separators=(",", ":")).encode()


class RequestError(Exception):
    """An OpenAI-style error to answer with an error envelope."""

    def __init__(self, status: int, err_type: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param

    def response(self, headers: Mapping[str, str]) -> web.Response:
        return error_response(headers, self.status, self.err_type, self.message, self.param)


def json_response(headers: Mapping[str, str], payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(payload), status=status, content_type="application/json", headers=headers)


def error_response(
    headers: Mapping[str, str], status: int, err_type: str, message: str, param: str | None = None
) -> web.Response:
    """The OpenAI error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    envelope = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return json_response(headers, envelope, status)


def text_response(headers: Mapping[str, str], text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/plain", headers=headers)


def not_found() -> web.Response:
    """FastAPI's answer to an unknown route (without the engine's headers, as FastAPI sends it)."""
    return web.Response(body=b'{"detail":"Not Found"}', status=404, content_type="application/json")


def method_not_allowed() -> web.Response:
    """FastAPI's answer to a known route called with the wrong method."""
    return web.Response(body=b'{"detail":"Method Not Allowed"}', status=405, content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 :class:`RequestError`."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise RequestError(400, "BadRequestError", f"Invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError(400, "BadRequestError", "The request body must be a JSON object.")
    return body
