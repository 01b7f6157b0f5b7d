"""SIGTERM with work in flight: the router is done (engines stopped) within ``shutdown_grace`` plus the
engines' ``stop_timeout``; a stream still running at the deadline ends with an SSE error event, a request
whose answer has not begun gets a 503, and a client waiting for a load gets a 503 at once."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.harness import Router, chat_body, engine, launch_router

GRACE = 2.0
STOP_TIMEOUT = 1.0  # engine() default
SLACK = 2.0  # process start-up of the signal handler, the last event's write, interpreter exit


async def test_sigterm_cuts_what_outlasts_the_grace_and_answers_waiters(tmp_path: Path, marker: str) -> None:
    models = {"a": engine(), "slow": engine("--startup-delay", "30")}
    async with launch_router(models, marker, "process", workdir=tmp_path, shutdown_grace=GRACE,
                             capacity={"max_resident": 2}) as r:
        assert (await r.chat("a")).status == 200
        # a stream of 300 chunks at 0.1 s (30 s), a request that takes 30 s, and a client waiting for a load
        stream = asyncio.create_task(r.stream(chat_body("a", stream=True, fake={"chunks": 300, "chunk_delay": 0.1})))
        long = asyncio.create_task(r.chat("a", fake={"delay": 30}))
        waiting = asyncio.create_task(r.chat("slow"))
        await r.wait_model("a", lambda v: v["in_flight"] == 2, what="two in flight")
        await r.wait_model("slow", lambda v: v["state"] == "loading" and v["waiting"] == 1, what="a waiter")
        started = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)

        waited = await asyncio.wait_for(waiting, GRACE)  # answered at once, not after the grace
        assert waited.status == 503, waited.body
        assert "shutting down" in waited.error["message"] and waited.headers["Retry-After"] == "1"

        sse = await asyncio.wait_for(stream, GRACE + SLACK)
        cut_after = time.monotonic() - started
        assert sse.status == 200 and len(sse.payloads()) > 10
        last = sse.events[-1].json()
        assert "shutting down" in last["error"]["message"] and last["error"]["code"] == 503
        assert GRACE - 0.2 <= cut_after < GRACE + SLACK

        reply = await asyncio.wait_for(long, GRACE + SLACK)
        assert reply.status == 503 and "shutting down" in reply.error["message"]

        assert await asyncio.wait_for(r.proc.wait(), GRACE + STOP_TIMEOUT + SLACK + 5) == 0
        assert time.monotonic() - started < GRACE + STOP_TIMEOUT + SLACK
        assert_shutdown_logged(r)


def assert_shutdown_logged(r: Router) -> None:
    log = r.log()
    assert "were cut off" in log and "shutdown complete" in log
    assert "Traceback" not in log, log
