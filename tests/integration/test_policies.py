"""Lifecycle policies through the router: ttl, pinned, preload (configured, restored, predicted), queue
limits with 429, and usage history surviving a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.harness import engine, launch_router, wait_until
from vllm_model_router.runtime.history import UsageRecorder

from .conftest import StartRouter


async def test_ttl_unloads_an_idle_model(start_router: StartRouter) -> None:
    r = await start_router({"short": engine(ttl="0.5s"), "default": engine(), "never": engine(ttl=0)},
                           capacity={"max_resident": 3}, default_ttl="1s")
    for name in ("short", "default", "never"):
        assert (await r.chat(name)).status == 200
    view = await r.wait_state("short", "unloaded", timeout=5)
    assert view["pid"] is None
    events = [(e.kind, e.model, e.reason) for e in r.runtime.events.recent()]
    assert ("unloading", "short", "idle for 0.5s (ttl)") in events
    await r.wait_state("default", "unloaded", timeout=5)
    await asyncio.sleep(0.5)  # what is tested: nothing happens to a model with ttl 0, however long it idles
    assert (await r.model("never"))["state"] == "loaded"


async def test_pinned_model_is_never_evicted(start_router: StartRouter) -> None:
    r = await start_router({"pinned": engine(pinned=True), "b": engine(), "c": engine()},
                           capacity={"max_resident": 2})
    assert (await r.chat("pinned")).status == 200  # least recently used from here on
    assert (await r.chat("b")).status == 200
    assert (await r.chat("c")).status == 200
    views = await r.models()
    assert views["pinned"]["state"] == "loaded" and views["pinned"]["pinned"]
    assert views["b"]["state"] == "unloaded"


async def test_preload_in_config_order_while_capacity_allows(start_router: StartRouter) -> None:
    r = await start_router({"first": engine(preload=True), "second": engine(preload=True),
                            "third": engine(preload=True)}, capacity={"max_resident": 2})
    await r.wait_state("first", "loaded")
    await r.wait_state("second", "loaded")
    assert (await r.model("third"))["state"] == "unloaded"  # a preload never evicts


async def test_too_many_waiting_gets_429_with_retry_after(start_router: StartRouter) -> None:
    r = await start_router({"slow": engine("--startup-delay", "1", max_waiting=2)}, max_waiting=50)
    replies = await asyncio.gather(*(r.chat("slow") for _ in range(4)))
    statuses = sorted(x.status for x in replies)
    assert statuses == [200, 200, 429, 429]
    rejected = next(x for x in replies if x.status == 429)
    assert rejected.headers["Retry-After"].isdigit()
    assert rejected.error["type"] == "rate_limit_error" and "slow" in rejected.error["message"]
    assert (await r.chat("slow")).status == 200  # loaded now: served at once


async def test_usage_history_survives_a_restart(start_router: StartRouter, marker: str, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    models = {"a": engine(), "b": engine(), "c": engine()}
    async with launch_router(models, marker, capacity={"max_resident": 2}, state_dir=state) as r1:
        assert (await r1.chat("b")).status == 200
        assert (await r1.chat("a")).status == 200  # a is the most recently used
    # a second router on the same state: restores the LRU order and, with restore, what was resident
    r2 = await start_router(models, capacity={"max_resident": 2}, state_dir=state, restore=True)
    await r2.wait_state("a", "loaded")
    await r2.wait_state("b", "loaded")
    views = await r2.models()
    assert views["a"]["last_used"] > views["b"]["last_used"]  # from the history, before any request
    assert (await r2.chat("c")).status == 200
    views = await r2.models()
    assert views["b"]["state"] == "unloaded" and views["a"]["state"] == "loaded"  # b was least recently used


async def test_predicted_preload_loads_the_likely_model_when_idle(
    start_router: StartRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(UsageRecorder, "PREDICT_INTERVAL", 0.2)
    r = await start_router({"popular": engine(), "rare": engine()}, capacity={"max_resident": 1},
                           preload="predicted")
    for _ in range(5):
        assert (await r.chat("popular")).status == 200
    assert (await r.chat("rare")).status == 200  # evicts popular
    assert (await r.post("/admin/models/rare/unload")).status == 200  # capacity free, router idle
    await r.wait_state("popular", "loaded", timeout=5)
    assert r.runtime.history.predicted_candidates()[0] == "popular"
    events = [(e.kind, e.model) for e in r.runtime.events.recent()]
    assert ("preload", "popular") in events
    await wait_until(lambda: r.runtime.state_of("rare").value == "unloaded")
