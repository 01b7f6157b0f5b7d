"""The proxy relays an engine's answer and keeps nothing of it: a cookie an engine sets goes back to the
client that got it, and is never replayed by the router's pooled client on other clients' requests; a
redirect goes back to the client too, instead of being followed by the router."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.harness import CHAT, chat_body, free_port

from .conftest import StartRouter


@pytest.fixture
async def cookie_engine() -> AsyncIterator[tuple[str, list[str | None], list[str]]]:
    """An engine (named by host name, as endpoint mode allows) that sets a cookie on every answer and
    records the Cookie header of every request it gets."""
    seen: list[str | None] = []
    elsewhere: list[str] = []

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "base-llm", "object": "model"}]})

    async def chat(request: web.Request) -> web.Response:
        if "redirect" in await request.text():
            raise web.HTTPTemporaryRedirect("/v1/elsewhere")
        seen.append(request.headers.get("Cookie"))
        resp = web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        resp.set_cookie("engine_session", f"secret-{len(seen)}", path="/")
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.method)
        return web.json_response({"followed": True})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_route("*", "/v1/elsewhere", other)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://localhost:{port}", seen, elsewhere
    finally:
        await runner.cleanup()


async def test_an_engine_cookie_is_not_replayed_to_other_clients(
    start_router: StartRouter, cookie_engine: tuple[str, list[str | None], list[str]]
) -> None:
    url, seen, _ = cookie_engine
    r = await start_router({}, endpoint={"url": url, "sync_interval": 60})
    first = await r.chat("base-llm")
    assert first.status == 200, first.body
    assert "engine_session=secret-1" in first.headers.get("Set-Cookie", "")  # the client gets its cookie
    second = await r.chat("base-llm")  # another client, without cookies
    assert second.status == 200, second.body
    assert seen == [None, None]  # the router's client stored nothing to send on


async def test_an_engine_redirect_goes_back_to_the_client(
    start_router: StartRouter, cookie_engine: tuple[str, list[str | None], list[str]]
) -> None:
    url, _, elsewhere = cookie_engine
    r = await start_router({}, endpoint={"url": url, "sync_interval": 60})
    body = chat_body("base-llm", "please redirect")
    async with r.session.post(r.url + CHAT, json=body, allow_redirects=False) as reply:
        assert reply.status == 307, await reply.text()
        assert reply.headers["Location"] == "/v1/elsewhere"
    assert elsewhere == []  # the router did not go there itself
