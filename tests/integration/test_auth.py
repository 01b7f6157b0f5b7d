"""Access control through real HTTP: client keys on /v1, admin keys on /admin and /metrics, the open
routes, the query key on the dashboard's two streams, forwarding of keys upstream, the admin CLI, and
no key ever in the router's log."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import (
    CHAT,
    Reply,
    Router,
    araw_request,
    assert_envelope,
    chat_body,
    echo_model,
    engine,
    launch_router,
    router_data,
)

from .conftest import ServeRouter

CLIENT = "client-key-0123456789"
CLIENT2 = "client-key-second-one"
ADMIN = "admin-key-abcdefghijkl"
WRONG = "wrong-key-zyxwvutsrqpo"
AUTH = {"api_keys": [CLIENT, CLIENT2], "admin_keys": [ADMIN]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_refused(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply.body
    err = reply.error
    if status == 401:
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    else:
        assert err["type"] == "permission_error"
    return err


def received_headers(reply: Reply) -> dict[str, str]:
    """What the echo server received, header names lower-cased."""
    assert reply.status == 200, reply.body
    return {k.lower(): v for k, v in reply.json()["headers"]}


async def first_chunk(r: Router, path: str) -> tuple[int, bytes]:
    async with r.session.get(r.url + path) as resp:
        return resp.status, await resp.content.readany()


async def test_client_keys_guard_v1_and_admin_keys_guard_operations(serve_router: ServeRouter) -> None:
    r = await serve_router({"echo": echo_model(), "relay": echo_model(forward_auth=True)}, auth=AUTH)

    # /v1: no key, a wrong one, another scheme, a key in the URL: 401 with WWW-Authenticate
    assert_refused(await r.post(CHAT, chat_body("echo")), 401)
    assert_refused(await r.post(CHAT, chat_body("echo"), headers=bearer(WRONG)), 401)
    assert_refused(await r.post(CHAT, chat_body("echo"), headers={"Authorization": f"Basic {CLIENT}"}), 401)
    assert_refused(await r.post(f"{CHAT}?key={CLIENT}", chat_body("echo")), 401)
    assert_refused(await r.get("/v1/models"), 401)

    # a client key (either one, either header, any case of "bearer"), or an admin key, is accepted; keys stay
    # with the router unless the model says forward_auth
    for headers in (bearer(CLIENT), {"authorization": f"bearer {CLIENT2}"}, {"x-api-key": CLIENT}, bearer(ADMIN)):
        got = received_headers(await r.post(CHAT, chat_body("echo"), headers=headers))
        assert "authorization" not in got and "x-api-key" not in got
    assert (await r.get("/v1/models", headers=bearer(CLIENT))).status == 200
    relayed = received_headers(await r.post(CHAT, chat_body("relay"), headers=bearer(CLIENT)))
    assert relayed["authorization"] == f"Bearer {CLIENT}"
    assert received_headers(await r.post(CHAT, chat_body("relay"), headers={"x-api-key": CLIENT2}))[
        "x-api-key"] == CLIENT2

    # /admin and /metrics: 401 without (or with a wrong) key, 403 with a client key, 200 with an admin key
    for method, path in (("GET", "/admin/models"), ("POST", "/admin/models/echo/pin"), ("GET", "/metrics"),
                         ("GET", "/admin/models/echo/logs"), ("GET", "/admin/nowhere")):
        assert_refused(await r.request(method, path), 401)
        assert_refused(await r.request(method, path, headers=bearer(WRONG)), 401)
        err = assert_refused(await r.request(method, path, headers=bearer(CLIENT)), 403)
        assert "admin key" in err["message"]
    assert (await r.get("/admin/models", headers=bearer(ADMIN))).status == 200
    assert (await r.post("/admin/models/echo/pin", headers={"x-api-key": ADMIN})).json()["pinned"] is True
    assert (await r.get("/metrics", headers=bearer(ADMIN))).status == 200
    assert (await r.get("/admin/nowhere", headers=bearer(ADMIN))).status == 404

    # always open: health, the dashboard page and assets, the API description
    for path in ("/health", "/ui", "/ui/app.js", "/openapi.json"):
        assert (await r.get(path)).status == 200, path
    spec = (await r.get("/openapi.json")).json()
    assert "bearer" in spec["components"]["securitySchemes"]

    # the key in the URL: only on the two read-only streams the dashboard's EventSource opens, only GET
    status, chunk = await first_chunk(r, f"/admin/events?history=5&key={ADMIN}")
    assert status == 200 and chunk.startswith(b"retry:")
    status, _ = await first_chunk(r, f"/admin/models/echo/logs?lines=5&key={ADMIN}")
    assert status == 200
    assert_refused(await r.get(f"/admin/events?key={CLIENT}"), 403)
    assert_refused(await r.get(f"/admin/events?key={WRONG}"), 401)
    assert_refused(await r.get(f"/admin/models?key={ADMIN}"), 401)
    assert_refused(await r.post(f"/admin/models/echo/unload?key={ADMIN}"), 401)
    assert_refused(await r.get(f"/metrics?key={ADMIN}"), 401)


async def test_with_only_client_keys_any_key_operates_and_with_only_admin_keys_v1_is_open(
    serve_router: ServeRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_model_router.security")
    r = await serve_router({"echo": echo_model()}, auth={"api_keys": [CLIENT]})
    assert any("no admin_keys" in m for m in caplog.messages)
    assert_refused(await r.get("/admin/models"), 401)
    assert (await r.get("/admin/models", headers=bearer(CLIENT))).status == 200
    assert (await r.get("/metrics")).status == 200  # no admin keys: Prometheus scrapes without one
    assert_refused(await r.get("/v1/models"), 401)

    r = await serve_router({"echo": echo_model()}, auth={"admin_keys": [ADMIN]})
    assert (await r.get("/v1/models")).status == 200
    assert_refused(await r.get("/admin/models"), 401)
    assert_refused(await r.get("/metrics"), 401)
    assert (await r.get("/admin/models", headers=bearer(ADMIN))).status == 200


async def test_admin_cli_sends_its_key(serve_router: ServeRouter) -> None:
    r = await serve_router({"a": engine()}, auth=AUTH)

    async def cli(*args: str, key: str | None = None) -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("ROUTER_API_KEY", "ROUTER_URL")}
        if key is not None:
            env["ROUTER_API_KEY"] = key
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllm_model_router", *args, "--url", r.url, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    (ok, out), (no_key, out_none), (client, out_client) = await asyncio.gather(
        cli("status", key=ADMIN), cli("status"), cli("status", key=CLIENT))
    assert ok == 0 and "a" in out and "resident: 0/2" in out
    assert no_key == 1 and "Missing API key" in out_none
    assert client == 1 and "needs an admin key" in out_client


async def test_keys_never_reach_the_log(tmp_path: Path, marker: str) -> None:
    """A real ``serve`` at debug level, keys from the config, a key file and the environment; good, wrong
    and malformed credentials on every kind of route: no key, configured or not, is in its output."""
    file_key, env_key = "file-key-ABCDEFGHIJ", "env-admin-key-KLMNOPQR"
    (tmp_path / "keys.txt").write_text(f"# client keys\n\n{file_key}\n")
    models = {"echo": echo_model()}
    auth = {**AUTH, "api_keys_file": "keys.txt"}  # relative to the config file
    secrets = [CLIENT, CLIENT2, ADMIN, WRONG, file_key, env_key, "malformed-key-STUVWX"]

    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump(router_data(models, marker, auth=auth)))
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vllm_model_router", "check-config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    printed = (await check.communicate())[0].decode()
    assert check.returncode == 0 and "3 keys" in printed
    assert not [k for k in secrets if k in printed]

    async with launch_router(models, marker, "process", workdir=tmp_path, auth=auth,
                             env={"ROUTER_ADMIN_KEYS": f"{env_key}, ", "LOG_LEVEL": "debug"}) as r:
        for key in secrets:
            await r.post(CHAT, chat_body("echo"), headers=bearer(key))
            await r.post(CHAT, chat_body("echo", stream=True), headers={"x-api-key": key})
            await r.get("/admin/models", headers=bearer(key))
            await r.get(f"/admin/models/echo/logs?key={key}")
            await r.post("/admin/models/nope/load", headers=bearer(key))
        assert (await r.post(CHAT, chat_body("echo"), headers=bearer(file_key))).status == 200
        assert (await r.get("/admin/models", headers=bearer(env_key))).status == 200
        # malformed HTTP carrying a key in a header: refused, and logged without its content
        bad = (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secrets[-1]}\x01\r\n"
               f"X-Api-Key: {ADMIN}\x7f\r\n\r\n").encode()
        reply = await araw_request(r.port, bad)
        assert reply.status == 400
        assert_envelope(reply.body)
        assert (await r.get("/health")).status == 200
        r.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(r.proc.wait(), 15) == 0
    log = r.log()
    assert "Loading model echo" in log and "bad HTTP request" in log  # the log did see all of this
    leaked = [k for k in secrets if k in log]
    assert not leaked, f"keys in the log: {leaked}"
