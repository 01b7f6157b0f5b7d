"""Client-side limits through real sockets: request heads and bodies that never finish are cut off by
their timeouts, connections beyond ``limits.max_connections`` get a quick 503, and the router stays
healthy and serving throughout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable

import pytest

from tests.harness import (
    CHAT,
    RawReply,
    Router,
    araw_request,
    assert_envelope,
    chat_body,
    echo_model,
    engine,
    wait_until,
)
from vllm_model_router.http import server

from .conftest import ServeRouter, StartRouterProcess

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"


async def test_a_request_head_or_body_that_never_finishes_is_cut_off(serve_router: ServeRouter) -> None:
    r = await serve_router({"echo": echo_model()},
                           limits={"client_header_timeout": 0.5, "client_body_timeout": 0.5})
    port = r.port
    assert (await r.chat("echo")).status == 200

    # half a head, then silence: the connection is closed, without an answer (there is no request yet)
    idle, half_head, half_body = await asyncio.gather(
        araw_request(port, b"", timeout=5),
        araw_request(port, HEAD + b"Content-Le", timeout=5),
        araw_request(port, HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model": "echo", ', timeout=5, then_wait=1),
    )
    for reply in (idle, half_head):
        assert reply.closed and reply.status is None
        assert 0.4 <= reply.elapsed < 3
    # half a body: 408 in the OpenAI envelope, then the connection is closed
    assert half_body.status == 408 and half_body.closed and 0.4 <= half_body.elapsed < 3
    assert half_body.header("Connection") == "close"
    err = assert_envelope(half_body.body)
    assert err["type"] == "timeout_error" and "client_body_timeout" in err["message"]

    # a client that trickles its body a byte at a time is bounded the same way (the bound is on the total)
    async def trickle() -> tuple[float, bytes]:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD + b"Content-Length: 50\r\n\r\n")
        answer = b""
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                writer.write(b" ")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    answer += await asyncio.wait_for(reader.read(4096), 0.1)
                if answer:
                    break
        writer.close()
        return time.monotonic() - started, answer

    elapsed, answer = await trickle()
    assert answer.startswith(b"HTTP/1.1 408") and elapsed < 3

    # the router was never stuck: requests are served, nothing is held
    assert (await r.chat("echo")).status == 200
    assert (await r.get("/health")).status == 200
    assert (await r.model("echo"))["in_flight"] == 0


async def test_connections_over_max_connections_get_a_quick_503(serve_router: ServeRouter) -> None:
    r = await serve_router({"echo": echo_model()},
                           limits={"max_connections": 3, "client_header_timeout": 30})
    port = r.port
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # idle: they count all the same
    try:
        await wait_until(lambda: open_connections(r) == 3, what="the router has the 3 connections")
        over = await araw_request(port, b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n", timeout=5)
        assert over.status == 503 and over.elapsed < 1
        assert over.header("Retry-After") == "1" and over.header("Connection") == "close"
        err = assert_envelope(over.body)
        assert err["type"] == "service_unavailable_error" and "max_connections" in err["message"]
        assert r.site.refused >= 1
        # the held connections are served normally (blocking socket calls: in a thread, the router is in this loop)
        held[0].settimeout(5)
        await asyncio.to_thread(held[0].sendall, b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n")
        assert (await asyncio.to_thread(held[0].recv, 4096)).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
    await wait_until(lambda: open_connections(r) == 0, what="the router saw them go")
    # once they are gone, new connections are served
    replies = await asyncio.gather(*(r.post(CHAT, chat_body("echo")) for _ in range(3)))
    assert [x.status for x in replies] == [200, 200, 200]


async def test_serve_answers_connections_over_the_limit_with_503_and_a_quiet_log(
        start_router_process: StartRouterProcess) -> None:
    """``serve`` itself (on uvloop, whose transports are not asyncio.Transport subclasses): a connection
    over the limit reads the 503, and each refusal costs the log at most one line, never a traceback."""
    r = await start_router_process({"a": engine()}, limits={"max_connections": 3})
    port = r.port
    health = b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n"
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        # a process's connection count cannot be read from here: wait for the first refusal instead
        await wait_until(lambda: answered_with(503, araw_request(port, health, timeout=5)), what="a connection refused")
        for _ in range(3):
            over = await araw_request(port, health, timeout=5)
            assert over.status == 503 and over.header("Retry-After") == "1", over
            assert_envelope(over.body)
    finally:
        for s in held:
            s.close()
    await wait_until(lambda: answered_with(200, araw_request(port, health, timeout=5)),
                     what="served again")
    assert (await r.get("/health")).status == 200
    log = r.log()
    assert "Traceback" not in log and "AssertionError" not in log, log
    assert log.count("refusing new connections") == 1, log


@pytest.mark.parametrize("auth", [None, {"api_keys": ["client-key-0123456789"]}], ids=["open", "with-keys"])
async def test_undecodable_bodies_cost_the_log_one_short_line_at_most_every_few_seconds(
        serve_router: ServeRouter, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        auth: dict[str, list[str]] | None) -> None:
    """aiohttp reads what is left of a body after the answer; one that does not decode (any client can
    send one, with a key or without) is a line in the log, not a traceback per request."""
    monkeypatch.setattr(server, "BAD_BODY_LOG_INTERVAL_S", 0.5)
    r = await serve_router({"echo": echo_model()}, **({"auth": auth} if auth else {}))
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    body = b"this is not gzip at all" * 10
    bad = HEAD + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def send_bad(times: int) -> None:
        for _ in range(times):
            reply = await araw_request(r.port, bad, timeout=5)
            assert reply.status == (401 if auth else 400), reply
            assert_envelope(reply.body)

    def logged() -> list[str]:
        return [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO]

    await send_bad(5)
    await asyncio.sleep(0.6)  # what is tested: past the interval (0.5 s) the next one is logged again
    await send_bad(1)
    await wait_until(lambda: len(logged()) >= 2, what="the second line")  # written after the answer
    assert "Traceback" not in caplog.text and not any(rec.exc_info or rec.exc_text for rec in caplog.records)
    lines = logged()
    assert len(lines) == 2 and all(len(line) < 120 and "\n" not in line for line in lines), lines
    assert "unreadable request body from 127.0.0.1: ContentEncodingError" in lines[0]
    assert "(4 more since the last such line)" in lines[1]
    assert (await r.get("/health")).status == 200


def open_connections(r: Router) -> int:
    """Connections a router in this process holds open."""
    assert r.runner.server is not None
    return len(r.runner.server.connections)


async def answered_with(status: int, reply: Awaitable[RawReply]) -> bool:
    return (await reply).status == status
