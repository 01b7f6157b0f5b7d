"""Forward one OpenAI request to the model's server: lease → upstream → stream back → release.

Non-streaming answers are read whole and sent with one write; anything else (SSE) is forwarded chunk
by chunk the moment it arrives. The in-flight lease is released in ``finally`` whatever happens.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from vllm_model_router.errors import BadGateway, BadRequest, ModelNotFound, NotFound, RouterError
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


class Proxy:
    def __init__(self, runtime: Runtime, session: aiohttp.ClientSession) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.session = session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        payload, name = parse_body(raw)
        model = self.config.resolve(name)
        if model is None:
            raise ModelNotFound(name, sorted(self.config.models))
        if name != model.name:  # an alias: the server knows the model by its configured name
            payload["model"] = model.name
            raw = json.dumps(payload).encode()
        lease = await self.runtime.acquire(model.name)
        try:
            base = self.runtime.driver.endpoint(model.name)
            if base is None:
                raise BadGateway(f"model {model.name} has no running server")
            return await self._forward(request, base, model.name, raw)
        finally:
            self.runtime.release(lease)

    async def _forward(self, request: web.Request, base: str, model: str, body: bytes) -> web.StreamResponse:
        try:
            upstream = await self.session.request(
                request.method, base + request.rel_url.path_qs, data=body, headers=upstream_headers(request.headers)
            )
        except (aiohttp.ClientError, OSError) as e:
            raise BadGateway(f"lost the connection to model {model}'s server: {e}") from e
        try:
            ctype = upstream.headers.get("Content-Type", "")
            if upstream.status == 404 and ctype.startswith("application/json"):
                body404 = await upstream.read()
                if _is_fastapi_not_found(body404):
                    raise NotFound(f"model {model} does not serve {request.path}", code="endpoint_not_supported")
                return web.Response(status=404, body=body404, headers=downstream_headers(upstream.headers))
            if "text/event-stream" not in ctype and upstream.headers.get("Content-Length") is not None:
                try:
                    data = await upstream.read()
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    raise BadGateway(f"lost the connection to model {model}'s server: {e}") from e
                return web.Response(status=upstream.status, body=data, headers=downstream_headers(upstream.headers))
            return await self._stream(request, upstream, model, ctype)
        finally:
            upstream.release()

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, model: str, ctype: str
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, headers=downstream_headers(upstream.headers))
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            if request.transport is None or request.transport.is_closing():
                raise  # our own client went away: nothing to tell anyone
            log.warning("upstream of %s failed mid-stream: %r", model, e)
            if "text/event-stream" in ctype:
                err = BadGateway(f"model {model}'s server closed the stream: {e}")
                await resp.write(b"data: " + err.json_bytes() + b"\n\n")
        await resp.write_eof()
        return resp


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
