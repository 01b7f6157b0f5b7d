"""Forward one OpenAI request to the model's server: route → lease → upstream → stream back → release.

Only the inference routes of routes.py are forwarded, each to its canonical path (never the client's
raw path), so no spelling of a path reaches an engine's management routes.

Non-streaming answers are read whole and sent with one write; anything else (SSE) is forwarded chunk
by chunk the moment it arrives. The in-flight lease is released in ``finally`` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from yarl import URL

from vllm_model_router.config import ENGINE
from vllm_model_router.errors import BadGateway, BadRequest, GatewayTimeout, NotFound, RequestTimeout, RouterError
from vllm_model_router.http.affinity import body_prefix_key
from vllm_model_router.http.cut import Cut, Unreachable
from vllm_model_router.http.headers import downstream_headers, upstream_headers
from vllm_model_router.http.request_body import is_multipart, json_model, json_payload, parse_form_model
from vllm_model_router.routes import MULTIPART_ROUTES, OTHER, RouteTable
from vllm_model_router.runtime.pump import Runtime, shutting_down
from vllm_model_router.scheduler.events import split_unit

log = logging.getLogger("vllm_model_router.proxy")

CUT_OFF_S = 2.0  # how long requests cut off at shutdown get to write their last words


class RequestObserver(Protocol):
    """Told about every proxied request (metrics.py implements it)."""

    def waited(self, model: str, seconds: float) -> None: ...

    def request_done(self, model: str, route: str, status: int, first_byte_seconds: float) -> None:
        """``model`` is "" when the request named no configured model; ``route`` is the forwarded route
        (routes.py), or "other" for a path that is not one; status 499: the client left."""


@dataclass(slots=True)
class _Track:
    model: str = ""
    status: int | None = None
    wait_started: float | None = None
    waited: float | None = None
    first_byte: float | None = None


_TRACK: ContextVar[_Track | None] = ContextVar("vllm_model_router_track", default=None)


class Proxy:
    def __init__(self, runtime: Runtime, session: aiohttp.ClientSession,
                 observer: RequestObserver | None = None) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.session = session
        self.observer = observer  # told about every request (metrics), when there is one
        self.routes = RouteTable(runtime.config.limits.extra_forward_paths)
        # requests being handled (by the task of their connection), for a shutdown to wait for or cut off
        self._active: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._cutting = False

    def route(self, request: web.Request) -> str:
        """The forwarded route the request names, or a 404 (the path as the client sent it is not echoed
        in full: it is the client's own text)."""
        route = self.routes.match(request.raw_path)
        if route is None:
            raise NotFound(f"no route for {request.method} {request.path[:200]}; the router forwards "
                           "only OpenAI inference routes (see GET /openapi.json)", code="unknown_route")
        return route

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        self._idle.clear()
        try:
            return await self._observed(request)
        except asyncio.CancelledError:
            if self._was_cut(task):  # the answer has not begun: a clean 503
                raise shutting_down() from None
            raise
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for the requests in flight to finish, then cut off the rest: a
        stream ends with an SSE error event, a request whose answer has not begun gets a 503. Returns how
        many were cut off."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        cut = len(self._active)
        if cut:
            self._cutting = True
            for task in list(self._active):
                task.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CUT_OFF_S):
                    await self._idle.wait()
        return cut

    def _was_cut(self, task: asyncio.Task[Any] | None) -> bool:
        """The cancellation just caught came from :meth:`drain` (not from the client leaving): take it
        back, so that the request can still be answered."""
        if not self._cutting or task is None or task.cancelling() == 0:
            return False
        task.uncancel()
        return True

    async def _observed(self, request: web.Request) -> web.StreamResponse:
        observer = self.observer
        if observer is None:
            return await self._handle(request, self.route(request))
        track = _Track()
        token = _TRACK.set(track)
        started = time.monotonic()
        status = 500
        label = OTHER
        try:
            route = self.route(request)
            label = route
            resp = await self._handle(request, route)
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
            observer.request_done(track.model, label, status, first - started)

    async def _handle(self, request: web.Request, route: str) -> web.StreamResponse:
        limit = self.config.limits.client_body_timeout
        try:
            if request.content.is_eof():  # all there already (the usual case): no timer needed
                raw = await request.read()
            else:
                async with asyncio.timeout(limit):
                    raw = await request.read()
        except RequestPayloadError as e:  # e.g. a Content-Encoding the body does not decode with
            raise BadRequest(f"cannot read the request body: {str(e).strip()}") from e
        except TimeoutError as e:
            # no point waiting for the rest (aiohttp would, up to its lingering time): answer, then close
            request.content.feed_eof()
            raise RequestTimeout(f"the request body was not received within {limit:g}s "
                                 "(limits.client_body_timeout)") from e
        affinity: int | None = None
        if route in MULTIPART_ROUTES and is_multipart(request.content_type):
            form = parse_form_model(raw, request.headers.get("Content-Type", ""))
            name = form.model
            target = await self.runtime.adapters.resolve(name)
            if target.rewrite is not None:  # an alias: the server knows the model by its configured name
                raw = form.rewrite(raw, target.rewrite)
        else:
            name = json_model(raw)  # the object is built only where it is needed, below
            target = await self.runtime.adapters.resolve(name)
            if len(self.runtime.units(target.model)) > 1:
                affinity = body_prefix_key(raw)
            if target.rewrite is not None:
                payload = json_payload(raw)
                payload["model"] = target.rewrite
                raw = json.dumps(payload).encode()
        model = target.model
        # several engines (endpoint mode): a model the engines serve themselves goes to one that lists it
        eligible = self.runtime.adapters.eligible(name) if model == ENGINE else None
        track = _TRACK.get()
        if track is not None:
            track.model = model
            track.wait_started = time.monotonic()
        retried = moved = False
        while True:
            lease = await self.runtime.acquire(model, affinity, eligible)
            if track is not None and track.wait_started is not None and track.waited is None:
                track.waited = time.monotonic() - track.wait_started
            try:
                unit = self.runtime.unit_of(lease)  # the replica (or engine) it was granted on
                base = self.runtime.driver.endpoint(unit)
                if base is None:  # (stopped while granted: on a cluster, gone with its node before it is said)
                    raise Unreachable(f"model {unit} has no running server", connect=False)
                return await self._forward(request, base, route, unit, raw, may_vanish=not retried)
            except _Vanished as e:
                # the engine no longer has an adapter the router thought loaded: reload it once and retry
                self.runtime.adapters.mark_gone(unit, e.message)
                retried = True
            except Unreachable as e:
                # one of several engines failed before answering: the request (nothing of it sent back yet)
                # is tried once more, on another engine; an engine that refused the connection is down
                adapters = self.runtime.adapters
                engine = adapters.engine_of(unit)
                if engine is None or not adapters.multi_engine:
                    # a server of its own: planned again only when it is gone (a cluster node lost)
                    if moved or not await self.runtime.gone(unit):
                        raise
                    moved = True
                    continue
                if moved:
                    raise
                if e.connect:
                    adapters.unreachable(engine, "a request could not connect to it")
                else:  # a broken connection: down only if it does not answer its health check either
                    await adapters.confirm_down(engine, e.message)
                if model == ENGINE:  # not the same engine again
                    eligible = (eligible or frozenset(adapters.engines)) - {engine}
                moved = True
            finally:
                self.runtime.release(lease)

    def _server(self, model: str, base: str | None) -> str:
        if split_unit(model)[0] == ENGINE or self.runtime.adapters.is_adapter(model):
            return f"the vLLM engine at {base or self.runtime.driver.endpoint(model)} (model {model})"
        return f"model {model}'s server"

    def _forward_auth(self, unit: str) -> bool:
        cfg = self.config.models.get(split_unit(unit)[0])
        if cfg is None:
            return False
        base = self.config.models.get(cfg.base) if cfg.base else None
        return cfg.forward_auth or (base is not None and base.forward_auth)

    async def _forward(
        self, request: web.Request, base: str, route: str, model: str, body: bytes, may_vanish: bool = False
    ) -> web.StreamResponse:
        limits = self.config.limits
        loop = asyncio.get_running_loop()
        # the answer's first byte (its head, and for a stream its first chunk) must come by this time
        deadline = loop.time() + limits.first_byte_timeout if limits.first_byte_timeout else None
        headers = upstream_headers(request.headers, self._forward_auth(model))
        query = request.rel_url.raw_query_string
        url = base + self.routes.upstream(route)  # never the client's spelling of the path
        target = URL(f"{url}?{query}" if query else url, encoded=True)
        # the unit's server may exit (its node lost) while this is in its hands, and a vanished machine's
        # connection never breaks: the request is then cut loose at once (``Cut``)
        cut = Cut(asyncio.current_task())
        unwatch = self.runtime.watch_exit(model, cut.fire)
        try:
            return await self._exchange(request, target, headers, body, model, base, route, deadline, may_vanish, cut)
        finally:
            unwatch()

    async def _exchange(self, request: web.Request, target: URL, headers: Any, body: bytes, model: str, base: str,
                        route: str, deadline: float | None, may_vanish: bool, cut: Cut) -> web.StreamResponse:
        limits = self.config.limits
        try:
            async with asyncio.timeout_at(deadline):
                # a redirect is the engine's answer to relay, not a path for the router to follow
                upstream = await self.session.request(request.method, target, data=body, headers=headers,
                                                      allow_redirects=False)
        except asyncio.CancelledError:
            if not cut.caught():
                raise
            raise cut.unreachable(self._server(model, base)) from None
        except aiohttp.ServerTimeoutError as e:
            raise GatewayTimeout(f"connecting to {self._server(model, base)} timed out after "
                                 f"{limits.upstream_connect_timeout:g}s (limits.upstream_connect_timeout)") from e
        except TimeoutError as e:
            raise self._no_first_byte(model, base) from e
        except (aiohttp.ClientError, OSError) as e:  # before the answer's head: nothing sent to the client
            raise Unreachable(f"cannot reach {self._server(model, base)}: {e}",
                               connect=isinstance(e, aiohttp.ClientConnectorError)) from e
        cut.upstream = upstream
        try:
            ctype = upstream.headers.get("Content-Type", "")
            if upstream.status == 404 and ctype.startswith("application/json"):
                body404 = await self._body(upstream, cut, model, base)
                if _is_fastapi_not_found(body404):
                    raise NotFound(f"model {model} does not serve {route}", code="endpoint_not_supported")
                if may_vanish and self.runtime.adapters.is_adapter(model) and b"does not exist" in body404:
                    raise _Vanished(body404.decode("utf-8", "replace"))
                return web.Response(status=404, body=body404, headers=downstream_headers(upstream.headers))
            if "text/event-stream" not in ctype and upstream.headers.get("Content-Length") is not None:
                data = await self._body(upstream, cut, model, base)
                return web.Response(status=upstream.status, body=data, headers=downstream_headers(upstream.headers))
            return await self._stream(request, upstream, model, ctype, deadline, cut)
        finally:
            upstream.release()

    async def _body(self, upstream: aiohttp.ClientResponse, cut: Cut, model: str, base: str) -> bytes:
        try:
            return await upstream.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise cut.lost(self._server(model, base), e) from e

    def _no_first_byte(self, model: str, base: str | None) -> GatewayTimeout:
        limit = self.config.limits.first_byte_timeout or 0
        return GatewayTimeout(f"{self._server(model, base)} did not answer within {limit:g}s "
                              "(limits.first_byte_timeout)", code="upstream_timeout")

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, model: str, ctype: str,
        deadline: float | None, cut: Cut,
    ) -> web.StreamResponse:
        # the first chunk is awaited before the client's response begins: a model that sends its head but
        # nothing else still gets a clean 504 (or 502), not a stream that never says anything
        try:
            async with asyncio.timeout_at(deadline):
                first = await upstream.content.readany()
        except TimeoutError as e:
            raise self._no_first_byte(model, None) from e
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            raise cut.lost(self._server(model, None), e) from e
        resp = web.StreamResponse(status=upstream.status, headers=downstream_headers(upstream.headers))
        await resp.prepare(request)
        track = _TRACK.get()
        if track is not None:
            track.status = upstream.status
        try:
            if first:
                await resp.write(first)
                if track is not None:
                    track.first_byte = time.monotonic()
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
                if track is not None and track.first_byte is None:
                    track.first_byte = time.monotonic()
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            if request.transport is None or request.transport.is_closing():
                raise  # our own client went away: nothing to tell anyone
            log.warning("upstream of %s failed mid-stream: %r", model, e)
            if "text/event-stream" in ctype:
                gone = f"is gone ({cut.why})" if cut.reason is not None else "closed the stream"
                err: RouterError = BadGateway(f"{self._server(model, None)} {gone}: {e}")
                await resp.write(b"data: " + err.json_bytes() + b"\n\n")
        except asyncio.CancelledError:
            if not self._was_cut(asyncio.current_task()):
                raise
            # the router is shutting down and this stream outlasted shutdown_grace: say so, then end it
            if "text/event-stream" in ctype:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await resp.write(b"data: " + shutting_down("the stream was cut off").json_bytes() + b"\n\n")
        with contextlib.suppress(ConnectionError, RuntimeError):
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
    resp = web.Response(
        status=err.status, body=err.json_bytes(), content_type="application/json", headers=err.headers
    )
    if err.close_connection:
        resp.force_close()
    return resp
