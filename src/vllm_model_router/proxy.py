"""Forward one OpenAI request to the model's server: lease → upstream → stream back → release.

Non-streaming answers are read whole and sent with one write; anything else (SSE) is forwarded chunk
by chunk the moment it arrives. The in-flight lease is released in ``finally`` whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from vllm_model_router.config import ENGINE
from vllm_model_router.errors import BadGateway, BadRequest, NotFound, RouterError
from vllm_model_router.runtime import Runtime

log = logging.getLogger("vllm_model_router.proxy")

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Trailers",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)
# Client credentials are for the router; they are not sent to model servers.
NOT_FORWARDED = HOP_BY_HOP | {"authorization", "x-api-key"}


def parse_body(raw: bytes) -> tuple[dict[str, Any], str]:
    """The JSON object and its ``model``, or a 400 that says what is wrong."""
    try:
        payload = json.loads(raw)
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8: {e.reason}") from e
    except RecursionError as e:
        raise BadRequest("request body is nested too deeply") from e
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(payload).__name__}")
    model = payload.get("model")
    if model is None:
        raise BadRequest("you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {type(model).__name__}", param="model")
    return payload, model


def upstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in NOT_FORWARDED:
            out.add(k, v)
    return out


def downstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in HOP_BY_HOP:
            out.add(k, v)
    return out


class RequestObserver(Protocol):
    """Told about every proxied request (metrics.py implements it)."""

    def waited(self, model: str, seconds: float) -> None: ...

    def request_done(self, model: str, path: str, status: int, first_byte_seconds: float) -> None:
        """``model`` is "" when the request named no configured model; status 499: the client left."""


@dataclass(slots=True)
class _Track:
    model: str = ""
    status: int | None = None
    wait_started: float | None = None
    waited: float | None = None
    first_byte: float | None = None


_TRACK: ContextVar[_Track | None] = ContextVar("vllm_model_router_track", default=None)


class Proxy:
    def __init__(self, runtime: Runtime, session: aiohttp.ClientSession) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.session = session
        self.observer: RequestObserver | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        observer = self.observer
        if observer is None:
            return await self._handle(request)
        track = _Track()
        token = _TRACK.set(track)
        started = time.monotonic()
        status = 500
        try:
            resp = await self._handle(request)
            status = resp.status
            return resp
        except (RouterError, web.HTTPException) as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception:
            status = track.status or 500
            raise
        finally:
            _TRACK.reset(token)
            now = time.monotonic()
            if track.wait_started is not None:
                observer.waited(track.model, track.waited if track.waited is not None else now - track.wait_started)
            first = track.first_byte if track.first_byte is not None else now
            observer.request_done(track.model, request.path, status, first - started)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        payload, name = parse_body(raw)
        target = await self.runtime.resolve(name)
        model = target.model
        if target.rewrite is not None:  # an alias: the server knows the model by its configured name
            payload["model"] = target.rewrite
            raw = json.dumps(payload).encode()
        track = _TRACK.get()
        if track is not None:
            track.model = model
            track.wait_started = time.monotonic()
        retried = False
        while True:
            lease = await self.runtime.acquire(model)
            if track is not None and track.wait_started is not None and track.waited is None:
                track.waited = time.monotonic() - track.wait_started
            try:
                base = self.runtime.driver.endpoint(model)
                if base is None:
                    raise BadGateway(f"model {model} has no running server")
                return await self._forward(request, base, model, raw, may_vanish=not retried)
            except _Vanished as e:
                # the engine no longer has an adapter the router thought loaded: reload it once and retry
                self.runtime.mark_gone(model, e.message)
                retried = True
            finally:
                self.runtime.release(lease)

    def _server(self, model: str, base: str | None) -> str:
        if model == ENGINE or self.runtime.is_adapter(model):
            return f"the vLLM engine at {base or self.runtime.driver.endpoint(model)} (model {model})"
        return f"model {model}'s server"

    async def _forward(
        self, request: web.Request, base: str, model: str, body: bytes, may_vanish: bool = False
    ) -> web.StreamResponse:
        try:
            upstream = await self.session.request(
                request.method, base + request.rel_url.path_qs, data=body, headers=upstream_headers(request.headers)
            )
        except (aiohttp.ClientError, OSError) as e:
            raise BadGateway(f"cannot reach {self._server(model, base)}: {e}") from e
        try:
            ctype = upstream.headers.get("Content-Type", "")
            if upstream.status == 404 and ctype.startswith("application/json"):
                body404 = await upstream.read()
                if _is_fastapi_not_found(body404):
                    raise NotFound(f"model {model} does not serve {request.path}", code="endpoint_not_supported")
                if may_vanish and self.runtime.is_adapter(model) and b"does not exist" in body404:
                    raise _Vanished(body404.decode("utf-8", "replace"))
                return web.Response(status=404, body=body404, headers=downstream_headers(upstream.headers))
            if "text/event-stream" not in ctype and upstream.headers.get("Content-Length") is not None:
                try:
                    data = await upstream.read()
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    raise BadGateway(f"lost the connection to {self._server(model, base)}: {e}") from e
                return web.Response(status=upstream.status, body=data, headers=downstream_headers(upstream.headers))
            return await self._stream(request, upstream, model, ctype)
        finally:
            upstream.release()

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, model: str, ctype: str
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, headers=downstream_headers(upstream.headers))
        await resp.prepare(request)
        track = _TRACK.get()
        if track is not None:
            track.status = upstream.status
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
                if track is not None and track.first_byte is None:
                    track.first_byte = time.monotonic()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            if request.transport is None or request.transport.is_closing():
                raise  # our own client went away: nothing to tell anyone
            log.warning("upstream of %s failed mid-stream: %r", model, e)
            if "text/event-stream" in ctype:
                err = BadGateway(f"{self._server(model, None)} closed the stream: {e}")
                await resp.write(b"data: " + err.json_bytes() + b"\n\n")
        await resp.write_eof()
        return resp


class _Vanished(Exception):
    """The engine answered 404 "does not exist" for an adapter the router thought loaded."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _is_fastapi_not_found(body: bytes) -> bool:
    try:
        parsed: object = json.loads(body)
        return parsed == {"detail": "Not Found"}
    except ValueError:
        return False


def error_response(err: RouterError) -> web.Response:
    return web.Response(
        status=err.status, body=err.json_bytes(), content_type="application/json", headers=err.headers
    )
