"""A model server for tests that answers every POST with what it received: method, path and query,
headers, and the exact body bytes (base64), so the router's forwarding can be checked byte for byte.

Run: ``python echo_server.py PORT``. ``GET /health`` answers 200.
"""

from __future__ import annotations

import base64
import sys

from aiohttp import web


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path_qs": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_b64": base64.b64encode(body).decode(),
        },
        status=int(request.headers.get("x-echo-status", "200")),
        headers={"x-echo": "yes", "Connection": "keep-alive", "Keep-Alive": "timeout=5"},
    )


def main() -> None:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
