"""Serving the router application: the aiohttp runner and a TCP site that bounds what clients may hold.

- **Request heads:** a connection must deliver a complete request head within
  ``limits.client_header_timeout`` of opening (or of its previous response); the same bound closes idle
  keep-alive connections (aiohttp's keep-alive timer, which also runs before the first request).
- **Request bodies:** reading a body is bounded by ``limits.client_body_timeout`` (proxy.py: 408, then
  the connection is closed).
- **Connections:** beyond ``limits.max_connections`` open client connections, a new connection gets an
  immediate ``503`` (OpenAI envelope, ``Retry-After: 1``) and is closed; nothing else is read from it.
- **Malformed HTTP** (a bad request line, an oversized or invalid header) gets a ``400`` in the OpenAI
  envelope, the connection is closed, and the log says only what kind of error it was: the raw bytes
  aiohttp would otherwise log may hold a client's key. An unexpected exception in a handler gets a
  ``500`` in the envelope (its traceback is logged).
- **Undecodable request bodies** (a ``Content-Encoding`` the body is not in, a broken chunked encoding):
  the client gets its ``400`` (or ``401``, when it had no key: the body is then never read), and the log
  one short line, at most every ``BAD_BODY_LOG_INTERVAL_S`` with a count of the others: aiohttp reads the
  rest of the body after the answer and would log a traceback for each such request, which any client,
  with or without a key, could use to flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from vllm_model_router.config import RouterConfig
from vllm_model_router.errors import BadRequest, ExpectationFailed, RouterError, ServiceUnavailable
from vllm_model_router.http.app_keys import PROXY, RUNTIME

log = logging.getLogger("vllm_model_router.server")
_RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
REFUSED_LINGER_S = 2.0  # how long a refused connection may take to read its 503 before it is closed
BAD_BODY_LOG_INTERVAL_S = 10.0  # at most one log line per this many seconds about undecodable bodies


def handler_settings(config: RouterConfig) -> dict[str, Any]:
    """Per-connection settings of aiohttp's request handler (no access log: URLs may carry ?key=)."""
    return {"keepalive_timeout": config.limits.client_header_timeout, "access_log": None}


def make_runner(app: web.Application, config: RouterConfig, shutdown_grace: float | None = None) -> web.AppRunner:
    """The runner: on cleanup, in-flight requests get ``shutdown_grace`` (default ``config.shutdown_grace``)
    to finish before the application (and with it every model) is stopped."""
    grace = config.shutdown_grace if shutdown_grace is None else shutdown_grace
    return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=grace, **handler_settings(config))


class Throttle:
    """Lets one event through per ``interval`` seconds and counts the ones it held back in between."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last = -interval
        self._held = 0

    def admit(self) -> int | None:
        """``None``: stay quiet; else go ahead, and this many were held back since the last one."""
        now = time.monotonic()
        if now - self._last < self._interval:
            self._held += 1
            return None
        held, self._last, self._held = self._held, now, 0
        return held


class _Handler(web.RequestHandler):
    """aiohttp's request handler, with errors outside the application in the OpenAI envelope."""

    __slots__ = ("_bad_bodies",)

    def __init__(self, manager: web.Server, *, bad_bodies: Throttle, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._bad_bodies = bad_bodies

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if not isinstance(exc, web.RequestPayloadError):
            super().log_exception(*args, **kw)
            return
        # the client's body, not the router, is at fault, and it has had its answer: one line, throttled
        held = self._bad_bodies.admit()
        if held is not None:
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            log.info("unreadable request body from %s: %s%s", peer[0] if peer else "a client",
                     type(cause).__name__, f" ({held} more since the last such line)" if held else "")

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling %s %s", request.method, request.path, exc_info=exc)
            err: RouterError = RouterError("internal error in the router (see its log)")
        else:  # not valid HTTP; its text may quote raw header bytes, so only its kind is logged
            kind = type(exc).__name__ if exc is not None else "bad request"
            log.info("bad HTTP request from %s: %s", request.remote, kind)
            err = BadRequest(f"malformed HTTP request ({kind})")
            err.status = status
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun: cannot send an error response")
        resp = web.Response(status=status, body=err.json_bytes(), content_type="application/json")
        resp.force_close()
        return resp


def _in_envelope(handler: _RequestHandler) -> _RequestHandler:
    """``handler`` (the application's), with the HTTP errors aiohttp raises before the application's
    middleware runs put in the OpenAI envelope too: an ``Expect`` header other than ``100-continue``
    gets aiohttp's plain-text 417 otherwise."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err: RouterError = (ExpectationFailed(f"{e.text or e.reason} (only 'Expect: 100-continue' is supported)")
                                if e.status == 417 else BadRequest(e.text or e.reason))
            err.status = e.status
            resp = web.Response(status=e.status, body=err.json_bytes(), content_type="application/json")
            resp.force_close()  # the client may be holding its body back: nothing more is read
            return resp

    handle.in_envelope = True  # type: ignore[attr-defined]
    return handle


def _overloaded_response(limit: int) -> bytes:
    body = ServiceUnavailable(f"the router has too many open connections (limits.max_connections = {limit}); "
                              "retry shortly").json_bytes()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Refuse(asyncio.Protocol):
    """A connection over the limit: answer 503 at once, read (and drop) what it sends, close it soon."""

    def __init__(self, loop: asyncio.AbstractEventLoop, response: bytes) -> None:
        self._loop = loop
        self._response = response
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # a stream transport, though not always a subclass of asyncio.Transport (uvloop's is not)
        transport = cast(asyncio.Transport, base)
        transport.write(self._response)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self._loop.call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class RouterSite(web.BaseSite):
    """A TCP site whose connections use :class:`_Handler` and count against ``max_connections``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, config: RouterConfig, *,
                 backlog: int = 1024) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._config = config
        self.refused = 0  # connections answered 503 for being over the limit
        self._warned_at = -1e9
        self._bad_bodies = Throttle(BAD_BODY_LOG_INTERVAL_S)

    @property
    def port(self) -> int:
        return self._port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        if not getattr(server.request_handler, "in_envelope", False):
            server.request_handler = _in_envelope(server.request_handler)
        limit = self._config.limits.max_connections
        settings = handler_settings(self._config)
        refusal = _overloaded_response(limit)

        def connection() -> asyncio.Protocol:
            if len(server.connections) >= limit:
                self.refused += 1
                now = time.monotonic()
                if now - self._warned_at > 10:
                    self._warned_at = now
                    log.warning("refusing new connections with 503: %d are open (limits.max_connections)", limit)
                return _Refuse(loop, refusal)
            return _Handler(server, loop=loop, bad_bodies=self._bad_bodies, **settings)

        self._server = await loop.create_server(connection, self._host, self._port, backlog=self._backlog)
        if self._server.sockets:
            self._port = int(self._server.sockets[0].getsockname()[1])


async def start_site(runner: web.AppRunner, config: RouterConfig, host: str | None = None,
                     port: int | None = None) -> RouterSite:
    site = RouterSite(runner, config.host if host is None else host, config.port if port is None else port, config)
    await site.start()
    return site


def raise_fd_limit(config: RouterConfig) -> None:
    """Room for every allowed client connection plus one upstream connection each (and some spare)."""
    needed = 2 * config.limits.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit to %d: %s", target, e)
            return
    if target < needed:
        log.warning("open-file limit %d is low for limits.max_connections = %d (needs about %d)",
                    target, config.limits.max_connections, needed)


async def stop_serving(runner: web.AppRunner, grace: float) -> None:
    """The first half of a graceful shutdown (``runner.cleanup()``, which stops the models, is the other):
    stop listening; answer requests waiting for a model, and any new ones on open connections, with 503;
    give requests in flight ``grace`` seconds, then cut off what is left (a stream ends with an SSE error
    event). aiohttp's own shutdown timeout then has nothing left to wait for, so the router is done within
    ``grace`` plus the models' ``stop_timeout``, not twice the grace."""
    for site in list(runner.sites):
        await site.stop()
    app = runner.app
    app[RUNTIME].stop_accepting()
    cut = await app[PROXY].drain(grace)
    if cut:
        log.warning("shutdown: %d request(s) still in flight after shutdown_grace (%gs) were cut off", cut, grace)
