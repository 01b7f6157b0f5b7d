"""Operating the router: metrics, the lifecycle event stream, pinning, following logs, the OpenAPI
description and the dashboard. ``install_operations`` adds all of it to the application built by app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Protocol, TypeVar, runtime_checkable

from aiohttp import web

from vllm_model_router import __version__
from vllm_model_router.errors import BadRequest
from vllm_model_router.http.app import PROXY, RUNTIME, SCRUB, _model_name, _view
from vllm_model_router.http.metrics import METRICS, RouterMetrics, metrics_handler
from vllm_model_router.http.openapi import openapi_spec
from vllm_model_router.http.security import KeyScrubber
from vllm_model_router.log_format import log_lifecycle_event
from vllm_model_router.state.lifecycle import LifecycleEvent

T = TypeVar("T")
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)
KEEPALIVE_S = 15.0
EVENT_HISTORY_DEFAULT = 50
UI_ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}


@runtime_checkable
class LogFollowing(Protocol):
    """A driver whose models' output can be followed line by line (the process driver)."""

    def subscribe_logs(self, model: str) -> asyncio.Queue[str]: ...

    def unsubscribe_logs(self, model: str, q: asyncio.Queue[str]) -> None: ...


def log_source(driver: object, model: str) -> LogFollowing | None:
    """The driver that can follow ``model``'s output: the driver itself, or the one a MultiDriver
    dispatches the model to; None when there is none (an adapter has no process of its own)."""
    if isinstance(driver, LogFollowing):
        return driver
    driver_of = getattr(driver, "driver_of", None)
    if callable(driver_of):
        with contextlib.suppress(KeyError):
            inner = driver_of(model)
            if isinstance(inner, LogFollowing):
                return inner
    return None


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    try:
        value = int(request.query.get(name, str(default)))
    except ValueError as e:
        raise BadRequest(f"'{name}' must be an integer", param=name) from e
    return max(0, min(value, maximum))


async def _batch(q: asyncio.Queue[T], closing: asyncio.Event, timeout: float) -> list[T] | None:
    """What is queued now, else wait up to ``timeout`` for something: [] on timeout, None when closing."""
    items: list[T] = []
    while not q.empty():
        items.append(q.get_nowait())
    if items or closing.is_set():
        return None if closing.is_set() else items
    get = asyncio.ensure_future(q.get())
    stop = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait({get, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not get.done():
            get.cancel()
    if get.done() and not get.cancelled():
        items.append(get.result())
    if closing.is_set():
        return None
    return items


# ------------------------------------------------------------------- admin routes
async def admin_pin(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = _model_name(request)
    runtime.set_pinned(name, True)
    return web.json_response(_view(request, name))


async def admin_unpin(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = _model_name(request)
    runtime.set_pinned(name, False)
    return web.json_response(_view(request, name))


def _sse(event: LifecycleEvent, scrub: KeyScrubber, named: bool = True) -> bytes:
    kind = f"event: {event.kind}\n" if named else ""
    return f"id: {event.seq}\n{kind}data: {json.dumps(scrub.value(event.to_dict()))}\n\n".encode()


async def admin_events(request: web.Request) -> web.StreamResponse:
    """Server-sent lifecycle events: the recent history first (``?history=N``, or after ``Last-Event-ID``),
    then each event as it happens. ``?named=false`` leaves out the ``event:`` line, so that a browser's
    EventSource gets every kind, present and future, through ``onmessage``."""
    runtime = request.app[RUNTIME]
    scrub = request.app[SCRUB]
    history = _int_param(request, "history", EVENT_HISTORY_DEFAULT, 10000)
    named = request.query.get("named", "true").lower() not in ("0", "false", "no")
    last_id: int | None = None
    with contextlib.suppress(ValueError):
        last_id = int(request.headers.get("Last-Event-ID", ""))
    q = runtime.events.subscribe()
    # taken with no await since subscribing: every later event is in the queue, none is in both
    backlog = runtime.events.recent()
    backlog = [e for e in backlog if e.seq > last_id] if last_id is not None else backlog[-history:] if history else []
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n" + b"".join(_sse(e, scrub, named) for e in backlog))
        sent = backlog[-1].seq if backlog else 0
        closing = request.app[CLOSING]
        while True:
            batch = await _batch(q, closing, KEEPALIVE_S)
            if batch is None:
                break
            fresh = [e for e in batch if e.seq > sent]
            if fresh:
                sent = fresh[-1].seq
            await resp.write(b"".join(_sse(e, scrub, named) for e in fresh) if fresh else b": keepalive\n\n")
        return resp
    finally:
        runtime.events.unsubscribe(q)


async def follow_logs(request: web.Request, name: str, lines: int) -> web.StreamResponse:
    """``/admin/models/{name}/logs?follow=true``: the last ``lines`` lines, then every new line as it is
    printed, as chunked ``text/plain`` (``curl -N``), until the client goes away."""
    runtime = request.app[RUNTIME]
    driver = log_source(runtime.driver, name)
    if driver is None:
        raise BadRequest(f"the output of {name} cannot be followed; use ?lines=N", param="follow")
    q = driver.subscribe_logs(name)
    try:
        tail = runtime.driver.logs(name, lines)  # no await since subscribing: no line lost or doubled
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        scrub = request.app[SCRUB]
        if tail:
            await resp.write(scrub.text("".join(f"{ln}\n" for ln in tail)).encode())
        closing = request.app[CLOSING]
        while True:
            batch = await _batch(q, closing, KEEPALIVE_S)
            if batch is None:
                break
            if batch:
                await resp.write(scrub.text("".join(f"{ln}\n" for ln in batch)).encode())
        return resp
    finally:
        driver.unsubscribe_logs(name, q)


# ------------------------------------------------------------------- description and dashboard
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec(__version__))


def _asset(name: str) -> bytes:
    return (resources.files("vllm_model_router.http") / "ui" / name).read_bytes()


async def ui_index(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def ui_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    ctype = UI_ASSETS.get(name)
    if ctype is None:
        raise web.HTTPNotFound()
    return web.Response(body=_asset(name), content_type=ctype, charset="utf-8", headers={"Cache-Control": "no-cache"})


async def ui_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui")


# ------------------------------------------------------------------- wiring
def install_operations(app: web.Application) -> None:
    """Add metrics, the event stream, pin/unpin, the OpenAPI description and the dashboard to ``app``.

    Must run after app.py's cleanup context (which creates the runtime and the proxy) was added."""
    closing = asyncio.Event()
    app[CLOSING] = closing

    async def context(app: web.Application) -> AsyncIterator[None]:
        runtime = app[RUNTIME]
        metrics = RouterMetrics(runtime)
        app[METRICS] = metrics
        app[PROXY].observer = metrics
        runtime.events.add_listener(log_lifecycle_event)
        yield

    async def on_shutdown(app: web.Application) -> None:
        closing.set()  # ends open event and log streams, so shutdown does not wait for their clients

    app.cleanup_ctx.append(context)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/ui", ui_index)
    app.router.add_get("/ui/", ui_redirect)
    app.router.add_get("/ui/{asset}", ui_asset)
    app.router.add_get("/admin/events", admin_events)
    app.router.add_post("/admin/models/{name}/pin", admin_pin)
    app.router.add_post("/admin/models/{name}/unpin", admin_unpin)
