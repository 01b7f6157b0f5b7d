"""Replicas through real ``serve`` processes in front of fake engines whose batch fills up
(``--max-num-seqs``): a burst brings up another copy and throughput nearly doubles, the extra copy goes
once idle, no request fails because of scaling, a prompt prefix stays on the engine that has it cached,
requests queued inside the engines start a copy by themselves, and a restarted router adopts every copy.

Everything is read over HTTP, as an operator would: the units' ports and pids from ``GET /admin/models``,
and what each engine served from its own ``/fake/state``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Router,
    alive,
    assert_no_processes_left,
    chat_body,
    engine,
    free_port,
    launch_router,
    wait_until,
)

from .conftest import StartRouterProcess

CAPACITY = {"max_resident": 2}
# the longest the router waits before it reads the engines' queues, and how long they must stay queued
# (runtime/pressure.py's INTERVAL_S and SUSTAIN_S, which a router process cannot be told otherwise)
PRESSURE_POLL_S, PRESSURE_SUSTAIN_S = 2.0, 4.0
SYSTEM = "You are a careful assistant. " * 40  # well past the 512 characters the affinity key covers


def bounded_chat(max_num_seqs: int, service_time: float, replicas: Any) -> dict[str, Any]:
    """A fake engine whose batch takes ``max_num_seqs`` requests of ``service_time`` seconds each."""
    return engine("--max-num-seqs", str(max_num_seqs), "--service-time", str(service_time), replicas=replicas)


async def unit_views(r: Router, model: str) -> dict[str, dict[str, Any]]:
    """``model``'s units as the admin API shows them, inside the model's one entry (name -> the unit's
    state, pid, port...)."""
    views = await r.models()
    assert not [n for n in views if n.startswith(model + "@")], "a replica listed as a model of its own"
    replicas = views[model].get("replicas")
    if replicas is None:  # a single copy
        return {model: views[model]}
    return {u["name"]: u for u in replicas}


async def served(r: Router, port: int) -> int:
    """Requests the engine on ``port`` has answered (its own counter, not the router's)."""
    async with r.session.get(f"http://127.0.0.1:{port}/fake/state") as resp:
        count: int = (await resp.json())["requests_served"]
        return count


async def served_by_unit(r: Router, model: str) -> dict[str, int]:
    """What each loaded unit of ``model`` has served."""
    units = await unit_views(r, model)
    return {n: await served(r, u["port"]) for n, u in units.items() if u["state"] == "loaded"}


async def busy(r: Router, unit: str) -> bool:
    """Whether the engine of ``unit`` has a request in hand."""
    port = (await unit_views(r, "chat"))[unit]["port"]
    async with r.session.get(f"http://127.0.0.1:{port}/fake/state") as resp:
        return bool((await resp.json())["in_flight"])


async def burst(r: Router, n: int, concurrency: int, **extra: Any) -> tuple[float, list[int]]:
    """``n`` chat requests for ``chat``, ``concurrency`` at a time: (seconds it took, their statuses)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with gate:
            return (await r.chat("chat", f"question {i}", **extra)).status

    started = time.monotonic()
    statuses = await asyncio.gather(*(one(i) for i in range(n)))
    return time.monotonic() - started, statuses


async def test_a_burst_brings_up_a_second_replica_that_nearly_doubles_throughput_and_then_goes(
    start_router_process: StartRouterProcess,
) -> None:
    n, concurrency = 96, 16  # one engine serves 4 / 0.3 s = 13 requests/s; 16 at a time keep 2 engines busy
    single = await start_router_process({"chat": bounded_chat(4, 0.3, 1)}, capacity=CAPACITY)
    assert (await single.chat("chat")).status == 200  # loaded: the burst measures serving, not a cold start
    one_s, statuses = await burst(single, n, concurrency)
    assert statuses == [200] * n
    assert set(await unit_views(single, "chat")) == {"chat"}
    single.proc.terminate()
    await single.proc.wait()

    r = await start_router_process({"chat": bounded_chat(4, 0.3, {"max": 2, "target_in_flight": 4, "idle": "3s"})},
                                   capacity=CAPACITY)
    assert (await r.chat("chat")).status == 200
    assert [u["state"] for u in (await unit_views(r, "chat")).values()] == ["loaded", "unloaded"]
    two_s, statuses = await burst(r, n, concurrency)  # includes starting the second engine
    assert statuses == [200] * n  # scaling up fails no request
    speedup = one_s / two_s
    assert speedup >= 1.5, f"{n} requests: {one_s:.2f}s with one replica, {two_s:.2f}s with up to two"

    units = await unit_views(r, "chat")
    assert units["chat@1"]["state"] == "loaded"
    counts = {name: await served(r, u["port"]) for name, u in units.items()}
    assert counts["chat"] > 0 and counts["chat@1"] > 0, counts
    assert sum(counts.values()) == n + 1
    extra_pid = units["chat@1"]["pid"]

    async def extra_gone() -> bool:
        view = (await unit_views(r, "chat"))["chat@1"]
        return view["state"] == "unloaded" and view["pid"] is None and not alive(extra_pid)

    await wait_until(extra_gone, timeout=15, what="chat@1 stopped after 3 s idle", interval=0.2)
    assert (await unit_views(r, "chat"))["chat"]["state"] == "loaded"  # the first copy stays
    assert (await r.chat("chat")).status == 200  # and serves
    kinds = [(e["kind"], e["model"]) for e in await r.events()]
    assert ("load_started", "chat@1") in kinds


async def test_the_same_prompt_prefix_stays_on_the_replica_that_served_it(
    start_router_process: StartRouterProcess,
) -> None:
    r = await start_router_process({"chat": engine(replicas={"min": 2, "max": 2})}, capacity=CAPACITY)

    async def both_loaded() -> bool:
        return [u["state"] for u in (await unit_views(r, "chat")).values()] == ["loaded", "loaded"]

    await wait_until(both_loaded, timeout=15, what="both replicas loaded", interval=0.1)
    # Make the prefix's first request land on the second copy: the first is busy (equally busy copies go
    # to the lowest), so the remaining requests reach chat@1 only if the prefix is remembered.
    hold = asyncio.create_task(r.chat("chat", "hold the first copy", fake={"delay": 1.0}))
    await wait_until(lambda: busy(r, "chat"), timeout=5, what="the first copy busy", interval=0.05)

    def prefixed(i: int) -> dict[str, Any]:
        return chat_body("chat", f"question {i}") | {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"question {i}"}]}

    assert (await r.post("/v1/chat/completions", prefixed(0))).status == 200
    assert (await hold).status == 200  # both copies idle from here on
    before = await served_by_unit(r, "chat")
    assert before == {"chat": 1, "chat@1": 1}, before
    for i in range(1, 7):
        assert (await r.post("/v1/chat/completions", prefixed(i))).status == 200
    after = await served_by_unit(r, "chat")
    assert after == {"chat": 1, "chat@1": 7}, after


async def test_requests_queued_inside_the_engine_start_a_replica(start_router_process: StartRouterProcess) -> None:
    # target_in_flight far above the load: only the engine's own queue (vllm:num_requests_waiting) can
    # start the second copy. One request at a time, 1 s each: 4 clients keep 3 queued inside the engine.
    r = await start_router_process(
        {"chat": bounded_chat(1, 1.0, {"max": 2, "target_in_flight": 1000, "idle": "60s"})}, capacity=CAPACITY)
    assert (await r.chat("chat")).status == 200
    deadline = time.monotonic() + PRESSURE_POLL_S * 2 + PRESSURE_SUSTAIN_S + 8  # ~20 s at most
    statuses: list[int] = []

    async def client() -> None:
        while time.monotonic() < deadline:
            statuses.append((await r.chat("chat")).status)
            if (await unit_views(r, "chat"))["chat@1"]["state"] == "loaded":
                return

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(4)))
    took = time.monotonic() - started
    units = await unit_views(r, "chat")
    assert units["chat@1"]["state"] == "loaded", f"no second replica after {took:.1f}s of a queue: {units}"
    assert took >= PRESSURE_SUSTAIN_S  # a queue that lasts, not a blip, started it
    assert statuses and set(statuses) == {200}
    events = [(e["kind"], e["model"]) for e in await r.events()]
    assert ("saturated", "chat") in events
    assert ("load_started", "chat@1") in events


@pytest.mark.parametrize("replicas", [
    # kept copies: the new router must not start chat@1 again before recovery has adopted it
    pytest.param({"min": 2, "max": 2}, id="kept"),
    pytest.param({"max": 2, "target_in_flight": 1, "idle": "60s"}, id="scaled"),
])
async def test_a_restarted_router_adopts_every_replica(tmp_path: Path, marker: str, replicas: Any) -> None:
    """Whether kept (``min``) or started for load, each copy is adopted under its own name, pid and port."""
    models = {"chat": engine(replicas=replicas)}
    port, state_dir = free_port(), str(tmp_path / "state")

    def serve(name: str) -> Any:
        return launch_router(models, marker, "process", workdir=tmp_path, name=name, port=port,
                             leave_processes=True, state_dir=state_dir, capacity=CAPACITY)

    try:
        async with serve("first") as r:
            if "min" not in replicas:  # two requests in flight, one allowed per copy: a second copy starts
                held = [asyncio.create_task(r.chat("chat", fake={"delay": 1.5})) for _ in range(2)]

            async def both_loaded() -> dict[str, Any] | None:
                units = await unit_views(r, "chat")
                return units if all(u["state"] == "loaded" for u in units.values()) else None

            before = {n: (u["pid"], u["port"]) for n, u in (await wait_until(both_loaded, 15, interval=0.1)).items()}
            assert set(before) == {"chat", "chat@1"}
            if "min" not in replicas:
                assert [x.status for x in await asyncio.gather(*held)] == [200, 200]
            r.proc.kill()  # kill -9: the engines are left running
            await r.proc.wait()
        assert all(alive(pid) for pid, _ in before.values())

        async with serve("second") as r:
            units = await unit_views(r, "chat")
            assert {n: (u["state"], u["pid"], u["port"]) for n, u in units.items()} == {
                n: ("loaded", pid, p) for n, (pid, p) in before.items()}
            kinds = [(e["kind"], e["model"]) for e in await r.events()]
            assert ("adopted", "chat") in kinds and ("adopted", "chat@1") in kinds
            assert not [k for k in kinds if k[0] == "load_started"]
            replies = await asyncio.gather(*(r.chat("chat", fake={"delay": 0.3}) for _ in range(4)))
            pids = {int(x.headers["x-fake-engine-pid"]) for x in replies if x.status == 200}
            assert pids == {pid for pid, _ in before.values()}  # both adopted copies serve
    finally:
        await assert_no_processes_left(marker)

