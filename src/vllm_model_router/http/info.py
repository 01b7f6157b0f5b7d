"""The routes that describe the router rather than forward to a model: ``/health``, ``GET /v1/models``
(every name a client may use, with its state: a replicated model is one name, so one card), the OpenAPI
description and the dashboard's files."""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from vllm_model_router import __version__
from vllm_model_router.config import ENGINE
from vllm_model_router.http.admin import best, by_model
from vllm_model_router.http.app_keys import RUNTIME
from vllm_model_router.http.openapi import openapi_spec

UI_ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "charts.js": "text/javascript",
    "history.js": "text/javascript",
    "logs.js": "text/javascript",
    "style.css": "text/css",
    # uPlot (MIT), the dashboard's charts: served by the router itself, as air-gapped boxes have no CDN
    "vendor/uPlot.iife.min.js": "text/javascript",
    "vendor/uPlot.min.css": "text/css",
    "vendor/uPlot.LICENSE": "text/plain",
}
"""Every file under /ui: only these are served (a name not listed is a 404, never a path on disk)."""

UI_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
          "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""The dashboard runs only its own files: no inline script or style, no other origin."""


async def health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    catalog = runtime.catalog
    created = int(runtime.started_wall)
    data: list[dict[str, Any]] = []

    def card(name: str, status: str, parent: str | None = None, root: str | None = None) -> None:
        data.append({"id": name, "object": "model", "created": created, "owned_by": "vllm-model-router",
                     "status": status, "parent": parent, "root": root or name})

    views = runtime.views()
    engine = runtime.adapters.engine
    if engine is not None:  # endpoint mode: the engine's own models, as it reported them last
        adapters = runtime.adapters
        for name in catalog.engine_models:  # loaded while an engine that serves it answers
            status = "loaded" if any(adapters.engines[e].reachable for e, served in adapters.serves.items()
                                     if name in served) else "unavailable"
            card(name, status)
    for name, units in by_model(views).items():  # a replicated model is one card, in its best replica's state
        v = units[0]
        if v.external:
            continue
        parent = v.base
        if parent == ENGINE:  # an adapter of the engine: its parent is the engine's own model
            parent = catalog.engine_model() or parent
        status = best(units).state.value
        card(name, status, parent)
        cfg = runtime.config.models.get(name)
        for alias in cfg.aliases if cfg else ():
            card(alias, status, parent, root=name)
    known = {v.name for v in views}
    for name in catalog.adapter_dir_names():  # adapters on disk, not loaded yet
        if name not in known:
            card(name, "unloaded", catalog.engine_model())
    return web.json_response({"object": "list", "data": data})


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec(__version__))


def _asset(name: str) -> bytes:
    return (resources.files("vllm_model_router.http") / "ui").joinpath(*name.split("/")).read_bytes()


async def ui_index(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": UI_CSP})


async def ui_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    ctype = UI_ASSETS.get(name)
    if ctype is None:
        raise web.HTTPNotFound()
    return web.Response(body=_asset(name), content_type=ctype, charset="utf-8", headers={"Cache-Control": "no-cache"})


async def ui_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/ui", ui_index)
    app.router.add_get("/ui/", ui_redirect)
    app.router.add_get(r"/ui/{asset:(vendor/)?[^/]+}", ui_asset)
