"""Sleep mode through the router against fake engines that emulate vLLM's /sleep and /wake_up: a sleeping
engine refuses inference (and counts what it refused), so the tests can prove none reached it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from tests.harness import Router, engine

from .conftest import StartRouter


def sleeper(*args: str, **settings: Any) -> dict[str, Any]:
    return {**engine("--enable-sleep-mode", "--wake-delay", "0.05", *args), "sleep": True, "memory_gb": 30,
            **settings}


async def fake_state(r: Router, port: int) -> dict[str, Any]:
    async with r.session.get(f"http://127.0.0.1:{port}/fake/state") as resp:
        state: dict[str, Any] = await resp.json()
        return state


async def test_alternating_requests_sleep_and_wake_instead_of_stop_and_start(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_model_router")
    r = await start_router({"a": sleeper(), "b": sleeper()}, capacity={"max_resident": 1, "memory_gb": 40})
    first = {}
    for name in ("a", "b"):
        assert (await r.chat(name)).status == 200
        first[name] = (await r.model(name))["pid"]
    assert (await r.model("a"))["state"] == "sleeping"
    statuses = await r.statuses()
    assert statuses["a"] == "sleeping" and statuses["b"] == "loaded"
    for name in ("a", "b", "a", "b", "a"):
        reply = await r.chat(name)
        assert reply.status == 200, reply.body
        assert reply.headers["x-fake-engine"] == name
    views = await r.models()
    # the same two processes all along: every switch was a sleep and a wake, not a stop and a start
    assert {n: views[n]["pid"] for n in ("a", "b")} == first
    assert views["a"]["loads"] == 1 and views["b"]["loads"] == 1
    assert views["a"]["wakes"] == 3 and views["b"]["wakes"] == 2
    assert views["b"]["state"] == "sleeping" and views["b"]["sleep_level"] == 1
    for name in ("a", "b"):
        state = await fake_state(r, views[name]["port"])
        assert state["requests_while_sleeping"] == 0  # nothing was ever sent to a sleeping engine
    assert "Putting model a to sleep (level 1): evicted to make room for b" in caplog.text
    metrics = (await r.get("/metrics")).body.decode()
    assert 'router_model_wakes_total{model="a",result="success"} 3.0' in metrics
    assert 'router_model_sleeps_total{level="1",model="b",result="success"} 3.0' in metrics
    assert 'router_model_loads_total{model="a",result="success"} 1.0' in metrics


async def test_concurrent_requests_during_a_wake_all_wait_for_it(start_router: StartRouter) -> None:
    r = await start_router({"a": sleeper("--wake-delay", "0.5"), "b": sleeper()},
                           capacity={"max_resident": 1, "memory_gb": 40})
    assert (await r.chat("a")).status == 200
    assert (await r.chat("b")).status == 200
    replies = await asyncio.gather(*(r.chat("a") for _ in range(8)))
    assert [x.status for x in replies] == [200] * 8
    views = await r.models()
    assert views["a"]["wakes"] == 1
    assert (await fake_state(r, views["a"]["port"]))["requests_while_sleeping"] == 0


async def test_host_budget_pushes_out_the_oldest_sleeper(start_router: StartRouter) -> None:
    models = {n: sleeper(weights_gb=8) for n in ("a", "b", "c")}
    r = await start_router(models, capacity={"max_resident": 1, "memory_gb": 40, "host_memory_gb": 10})
    for name in ("a", "b", "c"):
        assert (await r.chat(name)).status == 200
    views = await r.models()
    assert views["a"]["state"] == "unloaded" and views["a"]["pid"] is None  # oldest sleeper: stopped
    assert views["b"]["state"] == "sleeping" and views["c"]["state"] == "loaded"
    assert views["b"]["weights_gb"] == 8 and views["b"]["weights_source"] == "weights_gb (declared)"
    events = [(e.kind, e.model, e.reason) for e in r.runtime.events.recent()]
    assert ("unloading", "a", "host memory budget for sleeping models exceeded") in events


async def test_failed_wake_recovers_with_a_cold_start(start_router: StartRouter) -> None:
    r = await start_router({"a": sleeper("--fail-wake"), "b": sleeper()}, capacity={"max_resident": 1,
                                                                                    "memory_gb": 40})
    assert (await r.chat("a")).status == 200
    pid = (await r.model("a"))["pid"]
    assert (await r.chat("b")).status == 200
    reply = await r.chat("a")  # its wake fails: stopped, then started cold
    assert reply.status == 200, reply.body
    view = await r.model("a")
    assert view["pid"] != pid and view["loads"] == 2 and view["wakes"] == 0
    assert view["failures"] == 1  # the failed wake
    kinds = [e.kind for e in r.runtime.events.recent() if e.model == "a"]
    assert "wake_failed" in kinds and kinds[-1] == "loaded"


async def test_sleep_needs_sleep_mode_in_the_command(start_router: StartRouter) -> None:
    from vllm_model_router.config import ConfigError

    with pytest.raises(ConfigError, match="must include --enable-sleep-mode"):
        await start_router({"a": {**engine(), "sleep": True}})


async def test_explicit_unload_of_a_sleeping_model_stops_it(start_router: StartRouter) -> None:
    r = await start_router({"a": sleeper(), "b": sleeper()}, capacity={"max_resident": 1, "memory_gb": 40})
    assert (await r.chat("a")).status == 200
    assert (await r.chat("b")).status == 200
    assert (await r.post("/admin/models/a/unload")).status == 200
    view = await r.model("a")
    assert view["state"] == "unloaded" and view["pid"] is None
    async with aiohttp.ClientSession() as s, s.get(r.url + "/v1/models") as resp:
        cards = {c["id"]: c["status"] for c in (await resp.json())["data"]}
    assert cards["a"] == "unloaded" and cards["b"] == "loaded"
