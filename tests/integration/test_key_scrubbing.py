"""No configured key reaches a client: a model that prints one in its output (and then fails to start)
has it replaced by *** in the 503 that the waiting client gets, in the admin views, the log endpoint
(plain and followed) and the lifecycle events."""

from __future__ import annotations

import asyncio
import sys

from tests.harness import CHAT, chat_body

from .conftest import ServeRouter

CLIENT = "sk-client-0123456789"
ADMIN = "sk-admin-secret-XYZ123"
LEAKY = [sys.executable, "-c",
         f"print('starting with api_key={ADMIN} and client={CLIENT}', flush=True); raise SystemExit(3)", "${PORT}"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_printed_by_a_failing_model_never_reach_clients(serve_router: ServeRouter) -> None:
    r = await serve_router({"leaky": {"cmd": LEAKY, "stop_timeout": 1}},
                           auth={"api_keys": [CLIENT], "admin_keys": [ADMIN]})
    reply = await r.post(CHAT, chat_body("leaky"), headers=bearer(CLIENT))
    assert reply.status == 503, reply.body
    message = reply.error["message"]
    assert "starting with api_key=*** and client=***" in message  # the model's output is still quoted
    assert ADMIN not in reply.body.decode() and CLIENT not in reply.body.decode()

    admin = bearer(ADMIN)
    views = await r.get("/admin/models", headers=admin)
    text = views.body.decode()
    assert "api_key=***" in text and ADMIN not in text and CLIENT not in text
    logs = await r.get("/admin/models/leaky/logs", headers=admin)
    assert any("api_key=***" in line for line in logs.json()["lines"])
    assert ADMIN not in logs.body.decode() and CLIENT not in logs.body.decode()
    pinned = await r.post("/admin/models/leaky/pin", headers=admin)
    assert "api_key=***" in pinned.body.decode() and ADMIN not in pinned.body.decode()

    async with r.session.get(r.url + "/admin/models/leaky/logs?follow=true", headers=admin) as resp:
        followed = await asyncio.wait_for(resp.content.readany(), 5)
    assert b"api_key=***" in followed and ADMIN.encode() not in followed and CLIENT.encode() not in followed

    async with r.session.get(r.url + "/admin/events?history=50", headers=admin) as resp:
        events = b""
        while b"load_failed" not in events:
            events += await asyncio.wait_for(resp.content.readany(), 5)
    assert b"api_key=***" in events and ADMIN.encode() not in events and CLIENT.encode() not in events
