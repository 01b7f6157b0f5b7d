"""Every ``/admin`` route: the models and capacity (``GET /admin/models``), load, unload, pin, unpin, scale
(the replicas a replicated model keeps), a model's output (``/logs``, followed live with ``?follow=true``)
and the lifecycle event stream (``/admin/events``). A model named in the path is resolved by the catalog's
rules, restricted to the models the router manages (never the engine's own model in endpoint mode). A
replicated model is one entry, its replicas (units ``chat``, ``chat@1``...) listed inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Protocol, TypeVar, runtime_checkable

from aiohttp import web

from vllm_model_router.config import ENGINE
from vllm_model_router.errors import BadRequest
from vllm_model_router.http import recent
from vllm_model_router.http.app_keys import RUNTIME, SCRUB
from vllm_model_router.http.security import KeyScrubber
from vllm_model_router.runtime.pump import Runtime
from vllm_model_router.scheduler import ModelView, State
from vllm_model_router.state.lifecycle import LifecycleEvent

T = TypeVar("T")
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)
KEEPALIVE_S = 15.0
EVENT_HISTORY_DEFAULT = 50
TRUE = ("1", "true", "yes")


# ------------------------------------------------------------------- models and capacity
# A replicated model shows the state of its most useful replica: one that serves beats one on its way to
# serving, which beats one on its way out; a failed or stopped copy matters only when no other is up.
STATE_ORDER = (State.LOADED, State.WAKING, State.LOADING, State.FALLING_ASLEEP, State.SLEEPING, State.UNLOADING,
               State.FAILED, State.UNLOADED)
_RANK = {s: i for i, s in enumerate(STATE_ORDER)}
# a unit's own fields, as each replica shows them (the driver adds its pid, port...)
REPLICA_FIELDS = ("name", "replica", "state", "since", "last_used", "in_flight", "pinned", "extra", "gpus",
                  "resident", "sleep_level", "last_error")


def best(views: list[ModelView]) -> ModelView:
    """The unit whose state stands for its model (``STATE_ORDER``; the lowest replica among equals)."""
    return min(views, key=lambda v: _RANK.get(v.state, len(_RANK)))


def by_model(views: list[ModelView]) -> dict[str, list[ModelView]]:
    """The units of each model, in configuration order (a model without replicas: its one view)."""
    groups: dict[str, list[ModelView]] = {}
    for v in views:
        groups.setdefault(v.group or v.name, []).append(v)
    return groups


def _unit_fields(runtime: Runtime, v: ModelView) -> dict[str, Any]:
    cfg = runtime.config.models.get(v.name)
    needs, weights = runtime.gpus.needs, runtime.gpus.weights
    return {
        "name": v.name,
        "aliases": list(cfg.aliases) if cfg else [],
        "kind": "engine" if v.external else "adapter" if v.base else "process",
        "base": None if v.base == ENGINE else v.base,
        "out_of_band": v.out_of_band,
        "state": v.state.value,
        "since": runtime.wall_time(v.since),
        "last_used": runtime.wall_time(v.last_used),
        "in_flight": v.in_flight,
        "waiting": v.waiting,
        "draining": v.draining,
        "pinned": v.pinned,
        "memory_gb": v.memory_gb,
        "memory_source": needs[v.name].source if v.name in needs else None,
        "resident": v.resident,
        "sleep_level": v.asleep_level,
        "sleeps": v.sleeps,
        "wakes": v.wakes,
        "weights_gb": weights[v.name].gb if v.name in weights else None,
        "weights_source": weights[v.name].source if v.name in weights else None,
        "gpus": list(v.gpus),
        "loads": v.loads,
        "failures": v.failures,
        "last_error": v.last_error,
    }


def model_admin_view(runtime: Runtime, v: ModelView) -> dict[str, Any]:
    """One unit as the admin API shows it (scrub it with :data:`SCRUB` before sending it)."""
    return {**_unit_fields(runtime, v), **runtime.driver.info(v.name)}


def replica_view(runtime: Runtime, v: ModelView) -> dict[str, Any]:
    """One replica of a replicated model: its own state, load and process."""
    fields = {**_unit_fields(runtime, v), "replica": v.replica, "extra": v.extra}
    return {**{k: fields[k] for k in REPLICA_FIELDS}, **runtime.driver.info(v.name)}


def group_admin_view(runtime: Runtime, units: list[ModelView]) -> dict[str, Any]:
    """A model as the admin API shows it: a model without replicas as its one unit; a replicated one with
    its figures over its units (its best state, the sum of their requests...) and each unit under
    ``replicas``. Its own pid and port are left out: each replica has its own."""
    if len(units) == 1:
        return model_admin_view(runtime, units[0])
    first, chosen = units[0], best(units)
    entry = _unit_fields(runtime, first)  # the model's own settings and the replica-0 view's waiters
    used = [t for t in (runtime.wall_time(v.last_used) for v in units) if t is not None]
    cfg = runtime.config.models.get(first.group or first.name)
    entry.update({
        "name": first.group or first.name,
        "aliases": list(cfg.aliases) if cfg else [],
        "state": chosen.state.value,
        "since": runtime.wall_time(chosen.since),
        "last_used": max(used) if used else None,
        "sleep_level": chosen.asleep_level,
        "in_flight": sum(v.in_flight for v in units),
        "draining": any(v.draining for v in units),
        "resident": any(v.resident for v in units),
        "out_of_band": sum(v.out_of_band for v in units),
        "sleeps": sum(v.sleeps for v in units),
        "wakes": sum(v.wakes for v in units),
        "gpus": sorted({g for v in units for g in v.gpus}),
        "loads": sum(v.loads for v in units),
        "failures": sum(v.failures for v in units),
        "last_error": next((v.last_error for v in units if v.last_error), None),
        "replicas": [replica_view(runtime, v) for v in units],
    })
    if cfg is not None:
        r = cfg.replicas
        entry["replicas_config"] = {"min": r.min, "max": r.max, "target_in_flight": r.target_in_flight,
                                    "idle": r.idle}
    return entry


async def admin_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    cfg = runtime.config
    views = runtime.views()
    return web.json_response(request.app[SCRUB].value({
        "models": [group_admin_view(runtime, units) for units in by_model(views).values()],
        "capacity": {
            "max_resident": cfg.max_resident,
            "memory_gb": cfg.memory_gb,
            "resident": [v.name for v in views if v.resident],  # units: chat, chat@1...
            "resident_memory_gb": sum(v.memory_gb for v in views if v.resident),
            "memory_accounting": "measured per GPU (NVML)" if runtime.gpus.measured else "declarations only",
        },
        "gpus": runtime.gpus.view(),
        # cluster.backend ray: the nodes with GPUs, alive or lost (none yet is news too: no GPU to place on)
        **({"nodes": nodes} if (nodes := runtime.nodes()) or cfg.cluster.backend != "local" else {}),
    }))


async def _managed_model(request: web.Request) -> str:
    """The model the path names (404 ``model_not_found`` when it names none the router manages)."""
    target = await request.app[RUNTIME].adapters.resolve(request.match_info["name"], managed=True)
    return target.model


def _view(request: web.Request, name: str) -> dict[str, Any]:
    runtime = request.app[RUNTIME]
    units = by_model(runtime.views())[name]
    return request.app[SCRUB].value(group_admin_view(runtime, units))


# ------------------------------------------------------------------- operators' commands
async def admin_load(request: web.Request) -> web.Response:
    name = await _managed_model(request)
    await request.app[RUNTIME].load(name)
    return web.json_response(_view(request, name))


async def admin_unload(request: web.Request) -> web.Response:
    name = await _managed_model(request)
    force = request.query.get("force", "").lower() in TRUE
    await request.app[RUNTIME].unload(name, force=force)
    return web.json_response(_view(request, name))


async def admin_pin(request: web.Request) -> web.Response:
    name = await _managed_model(request)
    request.app[RUNTIME].set_pinned(name, True)
    return web.json_response(_view(request, name))


async def admin_unpin(request: web.Request) -> web.Response:
    name = await _managed_model(request)
    request.app[RUNTIME].set_pinned(name, False)
    return web.json_response(_view(request, name))


async def admin_scale(request: web.Request) -> web.Response:
    """``?replicas=N``: keep N replicas of the model (pinned, brought in when they fit); N within its
    ``replicas.min`` and ``max``."""
    name = await _managed_model(request)
    runtime = request.app[RUNTIME]
    cfg = runtime.config.models.get(name)
    if cfg is None or cfg.copies < 2:
        raise BadRequest(f"{name} has no replicas to scale (its replicas.max is 1)", param="name")
    limits = cfg.replicas
    raw = request.query.get("replicas")
    try:
        replicas = int(raw) if raw is not None else None
    except ValueError:
        replicas = None
    if raw is None:
        raise BadRequest(f"?replicas=N is required: the replicas of {name} to keep, from {limits.min} to "
                         f"{limits.max}", param="replicas")
    if replicas is None:
        raise BadRequest(f"'replicas' must be an integer from {limits.min} to {limits.max}, got {raw!r}",
                         param="replicas")
    if not limits.min <= replicas <= limits.max:
        raise BadRequest(f"{name} keeps {limits.min} to {limits.max} replicas (replicas.min and max); "
                         f"got {replicas}", param="replicas")
    runtime.set_replicas(name, replicas)
    return web.json_response(_view(request, name))


# ------------------------------------------------------------------- a model's output
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


async def admin_logs(request: web.Request) -> web.StreamResponse:
    """The last ``?lines=N`` lines of a model's output; with ``?follow=true``, then every new line."""
    name = await _managed_model(request)
    lines = _int_param(request, "lines", 200, 10000)
    if request.query.get("follow", "").lower() in TRUE:
        return await follow_logs(request, name, lines)
    logs = request.app[RUNTIME].driver.logs(name, lines)
    return web.json_response({"model": name, "lines": request.app[SCRUB].value(logs)})


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


# ------------------------------------------------------------------- lifecycle events
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


# ------------------------------------------------------------------- wiring
def add_routes(app: web.Application) -> None:
    """Add every /admin route to ``app``; open event and log streams end when the server shuts down
    (so that shutdown does not wait for their clients)."""
    closing = asyncio.Event()
    app[CLOSING] = closing

    async def on_shutdown(app: web.Application) -> None:
        closing.set()

    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/admin/models", admin_models)
    app.router.add_post("/admin/models/{name}/load", admin_load)
    app.router.add_post("/admin/models/{name}/unload", admin_unload)
    app.router.add_post("/admin/models/{name}/pin", admin_pin)
    app.router.add_post("/admin/models/{name}/unpin", admin_unpin)
    app.router.add_post("/admin/models/{name}/scale", admin_scale)
    app.router.add_get("/admin/models/{name}/logs", admin_logs)
    app.router.add_get("/admin/events", admin_events)
    recent.add_routes(app)  # /admin/history
