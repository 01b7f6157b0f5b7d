"""A model server for tests that hangs: ``GET /health`` answers 200; a POST gets the head of a
server-sent event stream at once, then nothing (``/v1/chat/completions``), or nothing at all
(``/v1/completions``), until the client goes away.

Run: ``python stall_server.py PORT``.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def head_only(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(3600)
    return resp


async def silent(request: web.Request) -> web.StreamResponse:
    await request.read()
    await asyncio.sleep(3600)
    return web.Response()


def main() -> None:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", head_only)
    app.router.add_post("/{tail:.*}", silent)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
