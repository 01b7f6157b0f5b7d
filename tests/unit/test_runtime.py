"""The runtime (the event pump around the scheduler) against the in-memory fake driver: loads, failures,
evictions and exits as the runtime carries them out, without a process or a socket in sight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vllm_model_router.config import ConfigError, build_config
from vllm_model_router.errors import RouterError
from vllm_model_router.runtime.pump import Runtime
from vllm_model_router.scheduler import ModelView
from vllm_model_router.testing.fake_driver import FakeDriver, Script


@contextlib.asynccontextmanager
async def runtime(driver: FakeDriver, models: list[str] | dict[str, dict[str, Any]], **top: Any
                  ) -> AsyncIterator[Runtime]:
    """A started runtime over ``models`` (names, or names with their settings; no GPU, no usage history on
    disk), closed at the end."""
    settings = models if isinstance(models, dict) else {name: {} for name in models}
    entries = {name: {"cmd": ["never-started", "--port", "${PORT}"], **m} for name, m in settings.items()}
    config = build_config({"state_dir": False, "models": entries, **top}, env={}, source="<test>")
    rt = Runtime(config, driver=driver, probe=None)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


def view(rt: Runtime, name: str) -> ModelView:
    return next(v for v in rt.views() if v.name == name)


def state(rt: Runtime, name: str) -> str:
    return str(rt.state_of(name).value)


def kinds(rt: Runtime, name: str) -> list[str]:
    return [e.kind for e in rt.events.recent() if e.model == name]


async def refused(rt: Runtime, name: str) -> RouterError:
    """A request that is expected to be turned away: the error it gets."""
    with pytest.raises(RouterError) as raised:
        await rt.acquire(name)
    return raised.value


async def test_a_request_loads_the_model_and_is_granted_once_it_is_loaded() -> None:
    driver = FakeDriver(default=Script(load_s=0.05))
    async with runtime(driver, ["a"]) as rt:
        req = await rt.acquire("a")
        assert driver.calls == [("start", "a")] and driver.running("a")
        assert state(rt, "a") == "loaded" and view(rt, "a").in_flight == 1
        rt.release(req)
        assert view(rt, "a").in_flight == 0
        rt.release(await rt.acquire("a"))  # resident now: no second load
        assert driver.calls == [("start", "a")]
        assert kinds(rt, "a") == ["load_started", "loaded"]


async def test_a_failed_load_answers_every_waiter_with_503_and_the_next_request_tries_again() -> None:
    loading = asyncio.Event()
    driver = FakeDriver({"a": Script(hold=loading, fail_loads=1, error="CUDA out of memory")})
    async with runtime(driver, ["a"]) as rt:
        waiters = [asyncio.create_task(refused(rt, "a")) for _ in range(2)]
        await rt.wait_for(lambda: view(rt, "a").waiting == 2)  # both wait for the one load
        loading.set()
        errors = await asyncio.gather(*waiters)
        assert [e.status for e in errors] == [503, 503]
        assert all("CUDA out of memory" in str(e) for e in errors)
        assert driver.calls == [("start", "a")]
        assert state(rt, "a") == "failed"
        assert kinds(rt, "a") == ["load_started", "load_failed", "rejected", "rejected"]

        rt.release(await rt.acquire("a"))
        assert state(rt, "a") == "loaded" and driver.calls == [("start", "a")] * 2


async def test_room_for_a_model_is_made_by_stopping_the_least_recently_used_idle_one() -> None:
    driver = FakeDriver()
    async with runtime(driver, ["a", "b", "c"], capacity={"max_resident": 2}) as rt:
        for name in ("a", "b"):
            rt.release(await rt.acquire(name))
        held = await rt.acquire("a")  # a is the most recently used, and busy
        rt.release(await rt.acquire("c"))
        assert state(rt, "b") == "unloaded" and not driver.running("b")
        assert state(rt, "a") == "loaded" and state(rt, "c") == "loaded"
        assert ("stop", "b") in driver.calls and ("stop", "a") not in driver.calls
        assert kinds(rt, "b")[-2:] == ["unloading", "unloaded"]
        rt.release(held)


async def test_a_model_that_exits_on_its_own_is_noticed_and_loaded_again_on_demand() -> None:
    driver = FakeDriver({"a": Script(exit_after_s=0.05, exit_reason="process exited with code -9")})
    async with runtime(driver, ["a"]) as rt:
        rt.release(await rt.acquire("a"))
        await rt.wait_for(lambda: state(rt, "a") == "failed")
        exited = [(e.model, e.reason) for e in rt.events.recent() if e.kind == "exited"]
        assert exited == [("a", "process exited with code -9")]
        assert view(rt, "a").in_flight == 0 and "exited with code -9" in (view(rt, "a").last_error or "")

        driver.script("a", exit_after_s=None)
        rt.release(await rt.acquire("a"))
        assert state(rt, "a") == "loaded" and driver.calls == [("start", "a")] * 2


async def test_replicas_kept_are_brought_in_at_start_and_requests_are_spread_over_them() -> None:
    driver = FakeDriver(default=Script(load_s=0.02))
    entries = {"m": {"cmd": ["never-started", "--port", "${PORT}"], "replicas": {"min": 2, "max": 3}}}
    config = build_config({"state_dir": False, "models": entries, "capacity": {"max_resident": 3}}, env={},
                          source="<test>")
    rt = Runtime(config, driver=driver, probe=None)
    await rt.start()
    try:
        assert rt.units("m") == ["m", "m@1", "m@2"]
        await asyncio.wait_for(rt.wait_for(lambda: state(rt, "m") == state(rt, "m@1") == "loaded"), 5)
        assert sorted(driver.calls) == [("start", "m"), ("start", "m@1")]
        first, second = await rt.acquire("m"), await rt.acquire("m")
        assert {rt.unit_of(first), rt.unit_of(second)} == {"m", "m@1"}  # the fewest outstanding each time
        rt.release(first)
        rt.release(second)
        rt.set_replicas("m", 3)  # an operator wants three: the third comes in
        await asyncio.wait_for(rt.wait_for(lambda: state(rt, "m@2") == "loaded"), 5)
        await rt.unload("m")  # the model's name: every replica
        assert {state(rt, u) for u in rt.units("m")} == {"unloaded"}
        assert "scaled" in kinds(rt, "m")
    finally:
        await rt.close()


async def test_the_ray_backend_is_refused_by_serve_not_quietly_run_locally() -> None:
    entries = {"m": {"cmd": ["never-started", "--port", "${PORT}"], "memory_gb": 10}}
    config = build_config({"state_dir": False, "models": entries, "capacity": {"memory_gb": 40},
                           "cluster": {"backend": "ray", "gpu_memory_gb": 80}}, env={}, source="<test>")
    with pytest.raises(ConfigError, match=r"cluster\.backend"):
        Runtime(config, probe=None)
