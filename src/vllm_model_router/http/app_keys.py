"""What the router application holds for its handlers, each under a typed key: the runtime, the proxy
and the key scrubber. A module of its own so that every route module can read them without importing
the module that builds the application."""

from __future__ import annotations

from aiohttp import web

from vllm_model_router.http.proxy import Proxy
from vllm_model_router.http.security import KeyScrubber
from vllm_model_router.runtime.pump import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)
# every configured key, to be scrubbed from whatever the router sends (errors, views, logs, events)
SCRUB: web.AppKey[KeyScrubber] = web.AppKey("scrub", KeyScrubber)
