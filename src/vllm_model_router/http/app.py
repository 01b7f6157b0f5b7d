"""HTTP routes: /health, /v1/*, /admin/*. Every error leaves in the OpenAI error envelope."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from vllm_model_router.config import ENGINE, RouterConfig
from vllm_model_router.drivers.base import Driver
from vllm_model_router.errors import (
    BadRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    RouterError,
)
from vllm_model_router.gpu.probe import GpuProbe
from vllm_model_router.http.proxy import Proxy, error_response
from vllm_model_router.http.security import KeyScrubber, scrubber
from vllm_model_router.runtime.pump import AUTO, Runtime
from vllm_model_router.scheduler import ModelView

log = logging.getLogger("vllm_model_router.app")

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
# every configured key, to be scrubbed from whatever the router sends (errors, views, logs, events)
SCRUB: web.AppKey[KeyScrubber] = web.AppKey("scrub", KeyScrubber)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as e:
        e.message = request.app[SCRUB].text(e.message)  # a failed load quotes the model's output
        return error_response(e)
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(PayloadTooLarge(f"request body too large: {e.text}"))
    except web.HTTPException as e:
        if e.status == 404:
            return error_response(NotFound(f"no route for {request.method} {request.path}"))
        if e.status == 405:
            return error_response(MethodNotAllowed(f"method {request.method} not allowed on {request.path}"))
        if e.status >= 400:
            return error_response(BadRequest(e.text or e.reason))
        raise


def _wall(runtime: Runtime, loop_time: float | None) -> float | None:
    """Loop-clock time → Unix time, for humans."""
    if loop_time is None:
        return None
    return time.time() - (runtime._loop.time() - loop_time)


def model_admin_view(runtime: Runtime, v: ModelView) -> dict[str, Any]:
    """One model as the admin API shows it (scrub it with :data:`SCRUB` before sending it)."""
    cfg = runtime.config.models.get(v.name)
    return {
        "name": v.name,
        "aliases": list(cfg.aliases) if cfg else [],
        "kind": "engine" if v.external else "adapter" if v.base else "process",
        "base": None if v.base == ENGINE else v.base,
        "out_of_band": v.out_of_band,
        "state": v.state.value,
        "since": _wall(runtime, v.since),
        "last_used": _wall(runtime, v.last_used),
        "in_flight": v.in_flight,
        "waiting": v.waiting,
        "draining": v.draining,
        "pinned": v.pinned,
        "memory_gb": v.memory_gb,
        "memory_source": runtime.needs[v.name].source if v.name in runtime.needs else None,
        "sleep_level": v.sleep_level,
        "sleeps": v.sleeps,
        "wakes": v.wakes,
        "weights_gb": runtime.weights[v.name].gb if v.name in runtime.weights else None,
        "weights_source": runtime.weights[v.name].source if v.name in runtime.weights else None,
        "gpus": list(v.gpus),
        "loads": v.loads,
        "failures": v.failures,
        "last_error": v.last_error,
        **runtime.driver.info(v.name),
    }


async def health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    created = int(runtime.started_wall)
    data: list[dict[str, Any]] = []

    def card(name: str, status: str, parent: str | None = None, root: str | None = None) -> None:
        data.append({"id": name, "object": "model", "created": created, "owned_by": "vllm-model-router",
                     "status": status, "parent": parent, "root": root or name})

    views = runtime.views()
    engine = runtime.endpoint_driver
    if engine is not None:  # endpoint mode: the engine's own models, as it reported them last
        status = "loaded" if engine.reachable else "unavailable"
        for name in runtime.catalog.engine_models:
            card(name, status)
    for v in views:
        if v.external:
            continue
        parent = None if v.base is None else runtime.catalog.engine_models[0] if (
            v.base == ENGINE and runtime.catalog.engine_models) else v.base
        card(v.name, v.state.value, parent)
        cfg = runtime.config.models.get(v.name)
        for alias in cfg.aliases if cfg else ():
            card(alias, v.state.value, parent, root=v.name)
    known = {v.name for v in views}
    for name in runtime.catalog.adapter_dir_names():  # adapters on disk, not loaded yet
        if name not in known:
            card(name, "unloaded", runtime.catalog.engine_models[0] if runtime.catalog.engine_models else None)
    return web.json_response({"object": "list", "data": data})


async def proxy_post(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


async def admin_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    cfg = runtime.config
    return web.json_response(request.app[SCRUB].value({
        "models": [model_admin_view(runtime, v) for v in runtime.views()],
        "capacity": {
            "max_resident": cfg.max_resident,
            "memory_gb": cfg.memory_gb,
            "resident": runtime.scheduler.resident(),
            "resident_memory_gb": sum(v.memory_gb for v in runtime.views() if v.state.value in
                                      ("loading", "loaded", "unloading")),
            "memory_accounting": "measured per GPU (NVML)" if runtime.probe is not None else "declarations only",
        },
        "gpus": runtime.gpu_view(),
    }))


def _model_name(request: web.Request) -> str:
    runtime = request.app[RUNTIME]
    name = request.match_info["name"]
    target = runtime.catalog.lookup(name)
    if target is None or target.model == ENGINE:
        raise ModelNotFound(name, runtime.catalog.available())
    if not runtime.scheduler.knows(target.model):
        runtime.add_adapter(target.model, runtime.catalog.adapter_path(target.model), ENGINE)
    return target.model


def _view(request: web.Request, name: str) -> dict[str, Any]:
    runtime = request.app[RUNTIME]
    view = next(model_admin_view(runtime, v) for v in runtime.views() if v.name == name)
    return request.app[SCRUB].value(view)


async def admin_load(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = _model_name(request)
    await runtime.load(name)
    return web.json_response(_view(request, name))


async def admin_unload(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = _model_name(request)
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    await runtime.unload(name, force=force)
    return web.json_response(_view(request, name))


async def admin_logs(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    name = _model_name(request)
    try:
        lines = int(request.query.get("lines", "200"))
    except ValueError as e:
        raise BadRequest("'lines' must be an integer", param="lines") from e
    lines = max(0, min(lines, 10000))
    if request.query.get("follow", "").lower() in ("1", "true", "yes"):
        from vllm_model_router.http.admin import follow_logs

        return await follow_logs(request, name, lines)
    return web.json_response({"model": name, "lines": request.app[SCRUB].value(runtime.driver.logs(name, lines))})


def build_app(
    config: RouterConfig, driver: Driver | None = None, probe: GpuProbe | str | None = AUTO
) -> web.Application:
    """The router as an aiohttp application; startup/cleanup create and stop the runtime."""
    app = web.Application(middlewares=[openai_errors], client_max_size=config.max_body_bytes)
    app[SCRUB] = scrubber(config.auth)

    async def lifecycle(app: web.Application) -> Any:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.limits.upstream_connect_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        runtime = Runtime(config, driver, probe)
        app[RUNTIME] = runtime
        app[PROXY] = Proxy(runtime, session)
        from vllm_model_router.runtime.recovery import Recovery  # process groups left by a router that died

        recovery = await Recovery.open(runtime)
        try:
            await runtime.start()
            yield
            await runtime.close()
            await session.close()
        finally:
            recovery.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/{tail:.*}", proxy_post)
    app.router.add_get("/admin/models", admin_models)
    app.router.add_post("/admin/models/{name}/load", admin_load)
    app.router.add_post("/admin/models/{name}/unload", admin_unload)
    app.router.add_get("/admin/models/{name}/logs", admin_logs)
    from vllm_model_router.http.admin import install_operations  # metrics, events, pin, OpenAPI, dashboard

    install_operations(app)
    from vllm_model_router.http.security import install_auth

    install_auth(app, config.auth)
    return app
