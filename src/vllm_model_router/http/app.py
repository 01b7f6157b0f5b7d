"""The router as an aiohttp application: the OpenAI-error middleware, the lifecycle of the runtime and
the proxy (with metrics and the lifecycle log attached when they are created), and the routes: the
forwarded ``/v1/*`` (proxy.py), ``/admin/*`` (admin.py), ``/metrics`` (metrics.py) and the routes that
describe the router (info.py). Every error leaves in the OpenAI error envelope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from vllm_model_router.config import RouterConfig
from vllm_model_router.drivers.base import Driver
from vllm_model_router.errors import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, RouterError
from vllm_model_router.gpu.probe import GpuProbe
from vllm_model_router.http import admin, info
from vllm_model_router.http.app_keys import PROXY, RUNTIME, SCRUB
from vllm_model_router.http.metrics import METRICS, RouterMetrics, metrics_handler
from vllm_model_router.http.proxy import Proxy, error_response
from vllm_model_router.http.recent import RECENT, Observers
from vllm_model_router.http.security import install_auth, scrubber
from vllm_model_router.log_format import log_lifecycle_event
from vllm_model_router.runtime.pump import AUTO, Runtime
from vllm_model_router.runtime.recent import RecentHistory
from vllm_model_router.runtime.recovery import Recovery

__all__ = ["PROXY", "RUNTIME", "SCRUB", "build_app"]

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


async def proxy_post(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].handle(request)


def build_app(
    config: RouterConfig, driver: Driver | None = None, probe: GpuProbe | str | None = AUTO
) -> web.Application:
    """The router as an aiohttp application; startup/cleanup create and stop the runtime."""
    app = web.Application(middlewares=[openai_errors], client_max_size=config.max_body_bytes)
    app[SCRUB] = scrubber(config.auth)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        cluster = None
        if config.cluster.backend == "ray" and driver is None:
            from vllm_model_router.runtime.cluster import RayCluster  # imports Ray: only with this backend

            cluster = RayCluster(config)
        if cluster is not None:  # the engines run on the cluster's nodes, placed on its GPUs
            runtime = Runtime(config, cluster.driver, None, topology=cluster.topology())
        else:
            runtime = Runtime(config, driver, probe)  # first: it refuses a config this machine cannot serve
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, enable_cleanup_closed=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.limits.upstream_connect_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),  # shared by every client: an engine's cookie is its client's only
        )
        metrics = RouterMetrics(runtime)  # counts lifecycle events from the first one on
        # the last hour, for /admin/history; also from the first event (a mark quotes its reason scrubbed)
        recent = RecentHistory(runtime, runtime.events, scrub=app[SCRUB].text)
        app[RUNTIME] = runtime
        app[METRICS] = metrics
        app[RECENT] = recent
        app[PROXY] = Proxy(runtime, session, observer=Observers(metrics, recent))
        recovery = await Recovery.open(runtime)  # process groups left by a router that died
        try:
            if cluster is not None:
                runtime.nodes = cluster.nodes_view
                await cluster.start(runtime, runtime.events)  # engines left on the cluster; its nodes watched
            await runtime.start()
            recent.start()
            # one log line per lifecycle event from here on: what recovery and startup did is told by
            # their own log lines, so that a router that cannot even listen says so in a few lines
            runtime.events.add_listener(log_lifecycle_event)
            yield
            recent.stop()
            if cluster is not None:
                cluster.stop()
            await runtime.close()
            await session.close()
        finally:
            recovery.close()

    app.cleanup_ctx.append(lifecycle)
    info.add_routes(app)
    app.router.add_post("/v1/{tail:.*}", proxy_post)
    app.router.add_get("/metrics", metrics_handler)
    admin.add_routes(app)
    install_auth(app, config.auth)
    return app
