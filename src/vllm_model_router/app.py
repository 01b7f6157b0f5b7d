"""HTTP routes: /health, /v1/*, /admin/*. Every error leaves in the OpenAI error envelope."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from vllm_model_router.config import RouterConfig
from vllm_model_router.drivers.base import Driver
from vllm_model_router.drivers.process import ProcessDriver
from vllm_model_router.errors import (
    BadRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    RouterError,
)
from vllm_model_router.proxy import Proxy, error_response
from vllm_model_router.runtime import Runtime
from vllm_model_router.scheduler import ModelView

log = logging.getLogger("vllm_model_router.app")

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as e:
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
    cfg = runtime.config.models[v.name]
    return {
        "name": v.name,
        "aliases": list(cfg.aliases),
        "state": v.state.value,
        "since": _wall(runtime, v.since),
        "last_used": _wall(runtime, v.last_used),
        "in_flight": v.in_flight,
        "waiting": v.waiting,
        "draining": v.draining,
        "pinned": v.pinned,
        "memory_gb": v.memory_gb,
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
    data = []
    for v in runtime.views():
        data.append({"id": v.name, "object": "model", "created": created, "owned_by": "vllm-model-router",
                     "status": v.state.value})
        for alias in runtime.config.models[v.name].aliases:
            data.append({"id": alias, "object": "model", "created": created, "owned_by": "vllm-model-router",
                         "status": v.state.value, "parent": None, "root": v.name})
    return web.json_response({"object": "list", "data": data})


async def proxy_post(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


async def admin_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    cfg = runtime.config
    return web.json_response({
        "models": [model_admin_view(runtime, v) for v in runtime.views()],
        "capacity": {
            "max_resident": cfg.max_resident,
            "memory_gb": cfg.memory_gb,
            "resident": runtime.scheduler.resident(),
            "resident_memory_gb": sum(v.memory_gb for v in runtime.views() if v.state.value in
                                      ("loading", "loaded", "unloading")),
        },
    })


def _model_name(request: web.Request) -> str:
    runtime = request.app[RUNTIME]
    name = request.match_info["name"]
    model = runtime.config.resolve(name)
    if model is None:
        raise ModelNotFound(name, sorted(runtime.config.models))
    return model.name


def _view(runtime: Runtime, name: str) -> dict[str, Any]:
    return next(model_admin_view(runtime, v) for v in runtime.views() if v.name == name)


async def admin_load(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = _model_name(request)
    await runtime.load(name)
    return web.json_response(_view(runtime, name))


async def admin_unload(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = _model_name(request)
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    await runtime.unload(name, force=force)
    return web.json_response(_view(runtime, name))


async def admin_logs(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = _model_name(request)
    try:
        lines = int(request.query.get("lines", "200"))
    except ValueError as e:
        raise BadRequest("'lines' must be an integer", param="lines") from e
    lines = max(0, min(lines, 10000))
    return web.json_response({"model": name, "lines": runtime.driver.logs(name, lines)})


def build_app(config: RouterConfig, driver: Driver | None = None) -> web.Application:
    """The router as an aiohttp application; startup/cleanup create and stop the runtime."""
    app = web.Application(middlewares=[openai_errors], client_max_size=config.max_body_bytes)

    async def lifecycle(app: web.Application) -> Any:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        runtime = Runtime(config, driver or ProcessDriver(config.models))
        app[RUNTIME] = runtime
        app[PROXY] = Proxy(runtime, session)
        yield
        await runtime.close()
        await session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/{tail:.*}", proxy_post)
    app.router.add_get("/admin/models", admin_models)
    app.router.add_post("/admin/models/{name}/load", admin_load)
    app.router.add_post("/admin/models/{name}/unload", admin_unload)
    app.router.add_get("/admin/models/{name}/logs", admin_logs)
    return app
