"""Residency and process lifecycle through real HTTP: loads, evictions, failures, stops and shutdown,
with fake-engine subprocesses as the models. Each test has its own router and its own models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from tests.harness import Router, alive, chat_body, engine, marked_processes, wait_until
from vllm_model_router.drivers import procs

from .conftest import StartRouter, StartRouterProcess

LOG = "vllm_model_router"


def events(router: Router, kind: str, model: str) -> list[Any]:
    return [e for e in router.runtime.events.recent() if e.kind == kind and e.model == model]


def pid_of(reply: Any) -> int:
    return int(reply.headers["x-fake-engine-pid"])


# ------------------------------------------------------------------------------------ residency
@pytest.mark.parametrize(
    "capacity",
    [{"max_resident": 2}, {"max_resident": 5, "memory_gb": 10}],  # each model declares 4 GB
    ids=["max_resident", "memory_gb"],
)
async def test_resident_model_is_served_at_once_and_the_lru_idle_model_is_evicted(
    start_router: StartRouter, capacity: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    r = await start_router({n: engine(memory_gb=4) for n in ("m1", "m2", "m3")}, capacity=capacity)
    first = await asyncio.gather(r.chat("m1"), r.chat("m2"))  # two fit side by side: loaded together
    assert [x.status for x in first] == [200, 200]
    pids = {name: pid_of(x) for name, x in zip(("m1", "m2"), first, strict=True)}

    # m1 again: forwarded at once to the same process, and now the most recently used
    again = await r.chat("m1")
    assert again.status == 200 and pid_of(again) == pids["m1"]
    assert again.elapsed < 1.0
    assert len(events(r, "load_started", "m1")) == 1

    # m3 needs room: m2, idle and least recently used, is evicted; m1 stays
    third = await r.chat("m3")
    assert third.status == 200
    views = await r.models()
    assert views["m1"]["state"] == "loaded" and views["m1"]["pid"] == pids["m1"]
    assert views["m2"]["state"] == "unloaded" and views["m2"]["pid"] is None
    assert views["m3"]["state"] == "loaded"
    assert not alive(pids["m2"])
    assert (await r.chat("m1")).status == 200 and len(events(r, "load_started", "m1")) == 1

    messages = caplog.messages
    assert "Loading model m3 as served name m3" in messages
    assert any(m.startswith("Unloading model m2") for m in messages)
    assert not any(m.startswith("Unloading model m1") for m in messages)


async def test_concurrent_requests_share_one_load_and_a_departed_waiter_does_not_cancel_it(
    start_router: StartRouter,
) -> None:
    r = await start_router({"slow": engine("--startup-delay", "0.5")})
    tasks = [asyncio.create_task(r.chat("slow", f"client {i}")) for i in range(5)]
    leaver = asyncio.create_task(r.chat("slow", "leaver"))
    view = await r.wait_model("slow", lambda v: v["waiting"] == 6, what="6 waiters")
    assert view["state"] == "loading"

    leaver.cancel()  # the client goes away while the model is loading
    with contextlib.suppress(asyncio.CancelledError):
        await leaver
    view = await r.wait_model("slow", lambda v: v["waiting"] == 5, what="the leaver dropped")
    assert view["state"] == "loading"  # the load goes on for the others

    replies = await asyncio.gather(*tasks)
    assert [x.status for x in replies] == [200] * 5
    for i, x in enumerate(replies):
        assert x.json()["choices"][0]["message"]["content"] == f"fake reply from slow to: client {i}"
    view = await r.model("slow")
    assert {pid_of(x) for x in replies} == {view["pid"]}
    assert view["loads"] == 1 and view["waiting"] == 0 and view["in_flight"] == 0
    assert len(events(r, "load_started", "slow")) == 1


async def test_model_with_requests_in_flight_is_never_stopped_and_stays_served_while_a_load_waits(
    start_router: StartRouter,
) -> None:
    r = await start_router({"a": engine(), "b": engine()}, capacity={"max_resident": 1}, max_wait=30)
    in_flight_at_stop: list[int] = []

    def on_event(event: Any) -> None:
        if event.kind == "unloading" and event.model == "a":
            in_flight_at_stop.append(next(v.in_flight for v in r.runtime.views() if v.name == "a"))

    r.runtime.events.add_listener(on_event)
    pid_a = pid_of(await r.chat("a"))
    long = asyncio.create_task(r.chat("a", "long one", fake={"delay": 2}))
    await r.wait_model("a", lambda v: v["in_flight"] == 1, what="the long request in flight")
    b = asyncio.create_task(r.chat("b"))
    await r.wait_model("b", lambda v: v["waiting"] == 1, what="b waiting")

    # b waits for a to drain; meanwhile a keeps being served, by the same process
    for i in range(3):
        short = await r.chat("a", f"short {i}")
        assert short.status == 200 and pid_of(short) == pid_a
    views = await r.models()
    assert views["a"]["state"] == "loaded" and views["b"]["state"] == "unloaded"
    assert views["b"]["waiting"] == 1 and not b.done()

    answer = await long
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == "fake reply from a to: long one"
    assert (await b).status == 200
    assert in_flight_at_stop == [0]  # a was stopped once, and only when nothing was in flight on it
    assert not alive(pid_a)


async def test_waiting_load_is_not_starved_by_a_stream_of_requests_for_the_resident_model(
    start_router: StartRouter,
) -> None:
    r = await start_router({"a": engine(), "b": engine()}, capacity={"max_resident": 1}, max_wait=0.5)
    assert (await r.chat("a")).status == 200
    a_requests: list[asyncio.Task[Any]] = []
    stop = asyncio.Event()

    async def keep_a_busy() -> None:  # overlapping requests: a is never idle on its own
        while not stop.is_set():
            a_requests.append(asyncio.create_task(r.chat("a", fake={"delay": 0.3})))
            await asyncio.sleep(0.1)

    feeder = asyncio.create_task(keep_a_busy())
    try:
        await r.wait_model("a", lambda v: v["in_flight"] >= 2, what="a busy")
        b = await r.chat("b")
        assert b.status == 200
        # max_wait (0.5 s) + the drain of a's admitted requests (0.3 s) + b's start, not load_timeout
        assert b.elapsed < 6
        assert not feeder.done()  # the stream for a was still going when b was served
    finally:
        stop.set()
        await feeder
    replies = await asyncio.gather(*a_requests)
    assert {x.status for x in replies} == {200}  # admitted ones finished, later ones waited for a reload
    assert len(events(r, "load_started", "a")) == 2


async def test_load_never_starts_while_the_evicted_model_is_still_stopping(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    r = await start_router(
        {"stubborn": engine("--ignore-sigterm", stop_timeout=1), "next": engine()}, capacity={"max_resident": 1}
    )
    pid_s = pid_of(await r.chat("stubborn"))
    task = asyncio.create_task(r.chat("next"))
    more: list[asyncio.Task[Any]] = []  # clients that keep arriving while stubborn is stopping
    seen: set[tuple[str, str]] = set()
    overlaps: list[tuple[list[int], int]] = []
    while not task.done():
        statuses = await r.statuses()
        seen.add((statuses["stubborn"], statuses["next"]))
        left = procs.group_members(pid_s)
        next_pid = (await r.model("next"))["pid"]
        if left and next_pid is not None:
            overlaps.append((left, next_pid))
        if statuses["stubborn"] == "unloading" and len(more) < 5:
            more.append(asyncio.create_task(r.chat("next")))
        await asyncio.sleep(0.05)  # a sample of both states every 50 ms, until next is served
    reply = await task
    assert reply.status == 200
    assert more and {x.status for x in await asyncio.gather(*more)} == {200}
    assert not overlaps, "next started while stubborn's process group was still alive"
    # stubborn ignored SIGTERM: it was SIGKILLed after its stop_timeout, and only then did next load
    assert reply.elapsed >= 1.0
    assert ("unloading", "unloaded") in seen
    assert ("unloaded", "loading") in seen
    assert not procs.group_members(pid_s)
    unloading, unloaded = events(r, "unloading", "stubborn")[0], events(r, "unloaded", "stubborn")[0]
    assert 0.9 <= unloaded.time - unloading.time < 3.0  # SIGKILL came right after stop_timeout (1 s)
    assert unloaded.seq < events(r, "load_started", "next")[0].seq
    assert any("ignored SIGTERM" in m and "were killed" in m for m in caplog.messages)


# ------------------------------------------------------------------------------------- failures
def flaky_engine(flag: Path) -> dict[str, Any]:
    """Fails while loading (exits during startup) the first time, starts fine afterwards."""
    fake = shlex.join([sys.executable, "-m", "vllm_model_router.testing.fake_engine"])
    script = (
        f"if [ -e {shlex.quote(str(flag))} ]; then exec {fake} --port ${{PORT}} --served-model-name ${{MODEL}}; fi; "
        f"touch {shlex.quote(str(flag))}; "
        f"exec {fake} --port ${{PORT}} --served-model-name ${{MODEL}} --startup-delay 0.4 --exit-during-startup"
    )
    return {"cmd": ["sh", "-c", script], "stop_timeout": 1}


async def test_process_exiting_while_loading_fails_at_once_and_the_next_request_tries_again(
    start_router: StartRouter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    r = await start_router({"flaky": flaky_engine(tmp_path / "started-once")}, load_timeout=30)
    replies = await asyncio.gather(r.chat("flaky"), r.chat("flaky"))
    for reply in replies:
        assert reply.status == 503
        assert reply.elapsed < 10  # at once, not after load_timeout (30 s)
        err = reply.error
        assert err["type"] == "model_load_error"
        assert "Failed to load model flaky" in err["message"]
        assert "process exited with code 1" in err["message"]
        assert "simulated failure (--exit-during-startup)" in err["message"]  # its last log lines
    view = await r.model("flaky")
    assert view["state"] == "failed" and view["pid"] is None
    assert view["loads"] == 0 and view["failures"] == 1
    assert "simulated failure (--exit-during-startup)" in view["last_error"]
    assert (await r.statuses())["flaky"] == "failed"
    assert len(events(r, "load_started", "flaky")) == 1  # one load for both requests
    assert any(m.startswith("Failed to load model flaky") for m in caplog.messages)
    logs = (await r.get("/admin/models/flaky/logs")).json()["lines"]
    assert any("EngineCore failed to start." in ln for ln in logs)

    retry = await r.chat("flaky")
    assert retry.status == 200
    view = await r.model("flaky")
    assert view["state"] == "loaded" and view["loads"] == 1 and view["failures"] == 1
    assert view["last_error"] is None
    assert view["pid"] == pid_of(retry)
    assert len(events(r, "load_started", "flaky")) == 2


async def test_model_never_healthy_gets_504_after_load_timeout(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    r = await start_router({"stuck": engine("--health-status", "503")}, load_timeout=1)
    reply = await r.chat("stuck")
    assert reply.status == 504
    assert 0.9 <= reply.elapsed < 5
    err = reply.error
    assert err["type"] == "timeout_error"
    assert "Timed out waiting for model to load" in err["message"]
    assert any(m.startswith("Timed out waiting for model to load") for m in caplog.messages)
    view = await r.wait_state("stuck", "failed")  # the load was stopped, its process is gone
    assert view["pid"] is None and "Timed out" in view["last_error"]
    assert marked_processes(r.marker) == {}


async def test_upstream_connection_lost_is_502_and_the_model_is_reloaded(start_router: StartRouter) -> None:
    r = await start_router({"a": engine("--spawn-child")})
    pid = pid_of(await r.chat("a"))
    worker = (await r.engine_state("a"))["child_pid"]
    pending = asyncio.create_task(r.chat("a", fake={"delay": 10}))
    await wait_engine_in_flight(r, (await r.model("a"))["port"], 1)
    os.kill(pid, signal.SIGKILL)  # the server dies; its worker survives a SIGKILL of its parent

    reply = await pending
    assert reply.status == 502
    err = reply.error
    assert err["type"] == "upstream_error" and "a" in err["message"]
    view = await r.wait_state("a", "failed")
    assert view["in_flight"] == 0 and "exited with code -9" in view["last_error"]
    assert not alive(worker)  # reaped with the rest of the group before anyone could reuse its memory

    retry = await r.chat("a")
    assert retry.status == 200 and pid_of(retry) != pid
    assert (await r.model("a"))["state"] == "loaded"


async def wait_engine_in_flight(r: Router, port: int, n: int, timeout: float = 5.0) -> None:
    """Until the fake engine on ``port`` itself counts ``n`` requests in flight."""

    async def counted() -> bool:
        async with r.session.get(f"http://127.0.0.1:{port}/fake/state") as resp:
            return bool((await resp.json())["in_flight"] == n)

    await wait_until(counted, timeout, f"{n} requests in flight on the engine on port {port}")


async def test_engine_exiting_mid_stream_ends_the_stream_with_an_error_event(start_router: StartRouter) -> None:
    r = await start_router({"crashy": engine("--chunks", "5", "--exit-mid-stream", "2")})
    pid = pid_of(await r.chat("crashy"))  # non-streaming requests are fine
    sse = await r.stream(chat_body("crashy", stream=True))
    assert sse.status == 200
    assert "[DONE]" not in [e.data for e in sse.events]
    payloads = sse.payloads()
    assert len(payloads) == 3
    assert all(p["object"] == "chat.completion.chunk" for p in payloads[:2])
    err = payloads[2]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "upstream_error"
    view = await r.wait_state("crashy", "failed")
    assert view["in_flight"] == 0
    assert "exited with code 1" in view["last_error"]

    retry = await r.chat("crashy")
    assert retry.status == 200 and pid_of(retry) != pid
    assert (await r.model("crashy"))["loads"] == 2

    # the official client turns the error event into an exception instead of a silently short answer
    async with AsyncOpenAI(base_url=r.url + "/v1", api_key="sk-test", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="crashy", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        received = []
        with pytest.raises(openai.APIError) as raised:
            async for chunk in stream:
                received.append(chunk)
        assert len(received) == 2
        assert "closed the stream" in raised.value.message
    assert (await r.wait_state("crashy", "failed"))["in_flight"] == 0


async def test_client_leaving_mid_stream_releases_the_model_so_it_can_be_evicted(start_router: StartRouter) -> None:
    r = await start_router({"a": engine(), "b": engine()}, capacity={"max_resident": 1})
    pid_a = pid_of(await r.chat("a"))
    body = chat_body("a", "a long story " * 20, stream=True, fake={"chunks": 50, "chunk_delay": 0.2})
    sse = await r.stream(body, stop_after=2)
    assert sse.status == 200 and len(sse.events) == 2
    await r.wait_model("a", lambda v: v["in_flight"] == 0, timeout=3, what="a released")
    await wait_engine_in_flight(r, (await r.model("a"))["port"], 0, timeout=3)  # the engine saw the client go
    # the same for a client that leaves while waiting for a (non-streaming) answer
    leaving = asyncio.create_task(r.chat("a", fake={"delay": 10}))
    await r.wait_model("a", lambda v: v["in_flight"] == 1, what="in flight")
    leaving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    await r.wait_model("a", lambda v: v["in_flight"] == 0, timeout=3, what="a released again")

    b = await r.chat("b")  # a is idle, so it is evicted at once (its stream would have lasted 10 s)
    assert b.status == 200 and b.elapsed < 6
    assert (await r.model("a"))["state"] == "unloaded"
    assert not alive(pid_a)


# ------------------------------------------------------------------------------------ processes
async def test_eviction_stops_the_whole_process_group(start_router: StartRouter) -> None:
    # the server ignores SIGTERM, so it does not stop its worker itself: only a signal to the group does
    r = await start_router(
        {"parent": engine("--spawn-child", "--ignore-sigterm"), "other": engine()}, capacity={"max_resident": 1}
    )
    pid = pid_of(await r.chat("parent"))
    worker = (await r.engine_state("parent"))["child_pid"]
    assert alive(worker) and os.getpgid(worker) == pid
    assert [p for p, cmd in marked_processes(r.marker).items() if "fake-engine-worker" in cmd] == [worker]

    assert (await r.chat("other")).status == 200  # evicts parent
    assert not alive(pid) and not alive(worker)
    assert not [cmd for cmd in marked_processes(r.marker).values() if "fake-engine-worker" in cmd]


async def test_admin_unload_waits_for_in_flight_requests_and_force_does_not(start_router: StartRouter) -> None:
    r = await start_router({"a": engine()})
    loaded = await r.post("/admin/models/a/load")
    assert loaded.status == 200 and loaded.json()["state"] == "loaded"
    pid1 = loaded.json()["pid"]
    finished: list[str] = []

    async def request(**fake: Any) -> Any:
        reply = await r.chat("a", fake=fake)
        finished.append("request")
        return reply

    slow = asyncio.create_task(request(delay=1.0))
    await r.wait_model("a", lambda v: v["in_flight"] == 1, what="in flight")
    unload = await r.post("/admin/models/a/unload")
    finished.append("unload")
    assert unload.status == 200
    assert finished == ["request", "unload"]  # the unload waited for the request
    assert (await slow).status == 200
    assert unload.elapsed >= 0.5
    assert unload.json()["state"] == "unloaded" and unload.json()["pid"] is None
    assert not alive(pid1)

    loaded = await r.post("/admin/models/a/load")
    assert loaded.status == 200 and loaded.json()["loads"] == 2
    assert loaded.json()["pid"] not in (None, pid1)
    finished.clear()
    cut = asyncio.create_task(request(delay=10))
    await r.wait_model("a", lambda v: v["in_flight"] == 1, what="in flight")
    forced = await r.post("/admin/models/a/unload?force=true")
    assert forced.status == 200 and forced.json()["state"] == "unloaded"
    assert forced.elapsed < 3  # did not wait for the 10 s request
    assert (await cut).status == 502
    assert (await r.model("a"))["in_flight"] == 0


async def test_router_process_sigterm_stops_every_model(start_router_process: StartRouterProcess) -> None:
    r = await start_router_process(
        {
            "spawner": engine("--spawn-child", aliases=["sp"]),
            "stubborn": engine("--ignore-sigterm", "--spawn-child"),  # stop_timeout 1 s
            "slow": engine("--startup-delay", "5", "--spawn-child"),  # still loading at shutdown
        },
        capacity={"max_resident": 3},
    )
    reply = await r.chat("sp")
    assert reply.status == 200
    assert reply.headers["x-fake-engine"] == "spawner"  # ${MODEL} became the served name
    assert reply.json()["model"] == "spawner"
    view = await r.model("spawner")
    assert (await r.engine_state("spawner"))["port"] == view["port"]  # ${PORT} is where it listens
    assert (await r.post("/admin/models/stubborn/load")).status == 200

    leaving = asyncio.create_task(r.chat("slow"))  # starts the load; its client then goes away
    await r.wait_model("slow", lambda v: v["state"] == "loading" and v["pid"] is not None, what="slow loading")
    await wait_until(lambda: len(marked_processes(r.marker)) == 6, what="six processes")  # 3 servers, 3 workers
    leaving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    await r.wait_model("slow", lambda v: v["waiting"] == 0, what="the client gone")
    assert (await r.model("slow"))["state"] == "loading"

    started = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(r.proc.wait(), 15) == 0
    assert 1.0 <= time.monotonic() - started < 5  # stubborn needed its SIGKILL after stop_timeout
    assert marked_processes(r.marker) == {}
    log = r.log()
    assert "Loading model spawner as served name spawner" in log
    assert "Loading model stubborn as served name stubborn" in log
    assert "Loading model slow as served name slow" in log
    assert "shutdown complete" in log
