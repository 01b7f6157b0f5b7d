"""Engine faults through real HTTP: an engine that hangs on a request (first-byte timeout: 504, the slot is
given back), an engine that dies before or in the middle of streams (the streams end with an OpenAI error,
nothing stays in flight, the next request reloads it).

Also covered elsewhere: an engine never healthy gets 504 after load_timeout and is stopped
(test_router_lifecycle.py::test_model_never_healthy_gets_504_after_load_timeout), an engine that ignores
SIGTERM is killed after stop_timeout (::test_load_never_starts_while_the_evicted_model_is_still_stopping,
::test_router_process_sigterm_stops_every_model), one that exits while loading fails its waiters at once
(::test_process_exiting_while_loading_fails_at_once_and_the_next_request_tries_again).
"""

from __future__ import annotations

import asyncio

from tests.harness import Router, chat_body, engine, stall_model

from .conftest import ServeRouter

FIRST_BYTE = 0.5


def no_one_in_flight(r: Router) -> bool:
    return all(v.in_flight == 0 and v.waiting == 0 for v in r.runtime.views())


async def test_an_engine_that_hangs_gets_504_after_the_first_byte_timeout_and_gives_the_slot_back(
    serve_router: ServeRouter,
) -> None:
    r = await serve_router({"slow": engine(), "stall": stall_model()},
                           limits={"first_byte_timeout": FIRST_BYTE}, capacity={"max_resident": 2})
    assert (await r.chat("slow")).status == 200
    assert (await r.post("/admin/models/stall/load")).status == 200

    hung = await asyncio.gather(
        r.chat("slow", fake={"delay": 5}),  # nothing at all for 5 s
        r.post("/v1/completions", {"model": "stall", "prompt": "hi"}),  # nothing at all, ever
        r.post("/v1/chat/completions", chat_body("stall", stream=True)),  # a stream's head, then nothing
    )
    for reply in hung:
        assert reply.status == 504
        assert FIRST_BYTE * 0.9 <= reply.elapsed < FIRST_BYTE + 2
        err = reply.error
        assert err["type"] == "timeout_error" and err["code"] == "upstream_timeout"
        assert "first_byte_timeout" in err["message"]
    assert no_one_in_flight(r)  # the slots were given back at once
    views = await r.models()
    assert views["slow"]["state"] == "loaded" and views["stall"]["state"] == "loaded"

    # the engine itself is fine, and a stream that keeps sending is never cut, however long it lasts
    assert (await r.chat("slow")).status == 200
    long = await r.stream(chat_body("slow", stream=True, fake={"chunks": 6, "chunk_delay": 0.25}))
    assert long.status == 200 and long.events[-1].data == "[DONE]"
    assert long.events[-1].arrived - long.events[0].arrived > FIRST_BYTE * 2
    assert len(long.payloads()) == 6


async def test_an_engine_dying_before_or_during_streams_fails_them_cleanly_and_is_reloaded(
    serve_router: ServeRouter,
) -> None:
    r = await serve_router({"early": engine("--exit-mid-stream", "0"),
                            "crashy": engine("--chunks", "10", "--exit-mid-stream", "3")},
                           capacity={"max_resident": 2})

    # dead before its first chunk: a clean 502 in the envelope rather than a 200 stream that says nothing
    pid = int((await r.chat("early")).headers["x-fake-engine-pid"])
    reply = await r.post("/v1/chat/completions", chat_body("early", stream=True))
    assert reply.status == 502 and reply.error["type"] == "upstream_error"
    await r.wait_state("early", "failed")
    again = await r.chat("early")
    assert again.status == 200 and int(again.headers["x-fake-engine-pid"]) != pid

    # dead in the middle of several streams: each ends with an OpenAI error event, none stays in flight
    await r.post("/admin/models/crashy/load")
    slow = {"chunks": 10, "chunk_delay": 0.1}
    streams = await asyncio.gather(*(r.stream(chat_body("crashy", stream=True, fake=slow)) for _ in range(3)))
    for sse in streams:
        assert sse.status == 200
        payloads = sse.payloads()
        assert "[DONE]" not in [e.data for e in sse.events]
        assert payloads and set(payloads[-1]) == {"error"} and payloads[-1]["error"]["type"] == "upstream_error"
        assert all(p.get("object") == "chat.completion.chunk" for p in payloads[:-1])
    view = await r.wait_state("crashy", "failed")
    assert view["in_flight"] == 0 and "exited with code 1" in view["last_error"]
    assert no_one_in_flight(r)
    full = await r.stream(chat_body("crashy", stream=True, fake={"chunks": 2}))  # reloaded on demand
    assert full.status == 200 and full.events[-1].data == "[DONE]"
    assert (await r.model("crashy"))["loads"] == 2
