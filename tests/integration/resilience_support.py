"""Helpers for the resilience and security tests: the router served the way ``serve`` serves it (server.py:
its connection limit, client timeouts and error envelopes), in this event loop or in a background thread,
plus raw-socket HTTP for requests no well-behaved client would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from vllm_model_router.config import RouterConfig, build_config
from vllm_model_router.http.app import RUNTIME, build_app
from vllm_model_router.http.server import RouterSite, make_runner, start_site, stop_serving
from vllm_model_router.runtime.pump import Runtime

from .support import Router, assert_no_processes_left, marked_processes, router_data

HERE = Path(__file__).parent
ECHO = [sys.executable, str(HERE / "echo_server.py"), "${PORT}"]
STALL = [sys.executable, str(HERE / "stall_server.py"), "${PORT}"]


def echo_model(**settings: Any) -> dict[str, Any]:
    """A model whose server answers every POST with what it received (headers included)."""
    return {"cmd": ECHO, "stop_timeout": 1, **settings}


def router_config(models: Mapping[str, Mapping[str, Any]], marker: str, **settings: Any) -> RouterConfig:
    return build_config(router_data(models, marker, **settings), env={}, source="<test>")


@dataclass
class Served:
    router: Router
    site: RouterSite
    config: RouterConfig


@contextlib.asynccontextmanager
async def served_router(models: Mapping[str, Mapping[str, Any]], marker: str, *, shutdown_grace: float = 1.0,
                        **settings: Any) -> AsyncIterator[Served]:
    """build_app + server.py's runner and site on a free port, in this event loop; on exit it is shut down
    and no process of ``marker`` may be left."""
    config = router_config(models, marker, **settings)
    runner = make_runner(build_app(config, probe=None), config, shutdown_grace=shutdown_grace)
    await runner.setup()
    try:
        site = await start_site(runner, config, "127.0.0.1", 0)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            yield Served(Router(f"http://127.0.0.1:{site.port}", session, marker, runner.app), site, config)
    finally:
        await stop_serving(runner, shutdown_grace)  # as `serve` shuts down
        await runner.cleanup()
        await assert_no_processes_left(marker)


# ------------------------------------------------------------------ a router in a background thread
@dataclass
class ThreadedRouter:
    url: str
    port: int
    app: web.Application
    loop: asyncio.AbstractEventLoop
    marker: str

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the router's loop thread (its state is only safe to read there)."""
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


@contextlib.contextmanager
def threaded_router(models: Mapping[str, Mapping[str, Any]], marker: str, **settings: Any) -> Iterator[ThreadedRouter]:
    """The router served by server.py on its own event loop (uvloop, as ``serve`` runs it) in a daemon
    thread (for synchronous tests)."""
    config = router_config(models, marker, **settings)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="router", daemon=True)
    thread.start()

    async def start() -> tuple[web.AppRunner, RouterSite]:
        runner = make_runner(build_app(config, probe=None), config, shutdown_grace=1.0)
        await runner.setup()
        return runner, await start_site(runner, config, "127.0.0.1", 0)

    runner, site = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield ThreadedRouter(f"http://127.0.0.1:{site.port}", site.port, runner.app, loop, marker)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        deadline = time.monotonic() + 3
        while marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not marked_processes(marker), "model processes outlived the router"


# ------------------------------------------------------------------ raw HTTP
@dataclass
class RawReply:
    status: int | None  # None: the connection closed without an answer
    head: str
    body: bytes
    closed: bool  # the server closed the connection after the answer
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None


def parse_reply(data: bytes, closed: bool, elapsed: float) -> RawReply:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        return RawReply(None, head.decode("latin-1"), b"", closed, elapsed)
    text = head.decode("latin-1")
    status = int(text.split(" ", 2)[1])
    reply = RawReply(status, text, body, closed, elapsed)
    length = reply.header("Content-Length")
    if length is not None:
        reply.body = body[: int(length)]
    return reply


def raw_request(port: int, data: bytes, timeout: float = 5.0, then_wait: float | None = None) -> RawReply:
    """Send ``data`` as is on a new connection; read until the server closes it, or the answer (by its
    Content-Length) is complete and ``then_wait`` more seconds passed (None: do not wait for the close)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        buf = b""
        closed = False
        deadline = started + timeout
        while time.monotonic() < deadline:
            reply = parse_reply(buf, False, 0)
            if reply.status is not None and reply.header("Content-Length") is not None:
                head_len = buf.index(b"\r\n\r\n") + 4
                if len(buf) - head_len >= int(reply.header("Content-Length") or 0):
                    if then_wait is None:
                        break
                    s.settimeout(then_wait)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
    return parse_reply(buf, closed, time.monotonic() - started)


async def araw_request(port: int, data: bytes, timeout: float = 5.0, then_wait: float | None = None) -> RawReply:
    """:func:`raw_request` from async code (in a thread, so that an in-process router keeps running)."""
    return await asyncio.to_thread(raw_request, port, data, timeout, then_wait)


def assert_envelope(body: bytes) -> dict[str, Any]:
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    err: dict[str, Any] = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and isinstance(err["type"], str)
    return err
