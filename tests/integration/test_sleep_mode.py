"""The sleep-mode protocol (drivers/sleep_mode.py), which the local and the cluster drivers share, against the
fake engine's emulation of vLLM's routes: the calls of each level in their order, the check that the engine is
awake, the warm-up under the name the server serves, and each failure as a LoadError."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.harness import assert_no_processes_left, engine, free_port, router_data
from vllm_model_router.config import build_config
from vllm_model_router.drivers import sleep_mode
from vllm_model_router.drivers.base import LoadError
from vllm_model_router.drivers.process import ProcessDriver


@pytest.fixture
async def driver(marker: str) -> AsyncIterator[ProcessDriver]:
    """Engines of a replicated sleep-enabled model, "chat" (a deliberately failing wake: "stuck")."""
    models = {"chat": {**engine("--enable-sleep-mode"), "sleep": True, "replicas": 2},
              "stuck": {**engine("--enable-sleep-mode", "--fail-wake"), "sleep": True}}
    d = ProcessDriver(build_config(router_data(models, marker), env={}, source="<test>").units())
    try:
        yield d
    finally:
        await d.close()
        await assert_no_processes_left(marker)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def fake_state(d: ProcessDriver, unit: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{d.endpoint(unit)}/fake/state") as resp:
        state: dict[str, Any] = await resp.json()
        return state


def recorded(call: sleep_mode.Call, seen: list[str], skip: str = "") -> sleep_mode.Call:
    """``call``, noting each route; the route ``skip`` is answered 200 without reaching the engine."""

    async def record(method: str, path: str, body: Any, timeout: float) -> str:
        seen.append(f"{method} {path}")
        return "" if path == skip else await call(method, path, body, timeout)

    return record


async def test_each_level_sleeps_and_wakes_in_vllms_order_and_a_replica_is_warmed_up_under_its_models_name(
    driver: ProcessDriver, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_model_router")
    await driver.start("chat@1")  # its server serves "chat": a warm-up for "chat@1" would be refused (404)
    engine_call = sleep_mode.http_call(lambda: http, str(driver.endpoint("chat@1")))
    seen: list[str] = []
    call = recorded(engine_call, seen)

    await sleep_mode.sleep(call, 2)
    state = await fake_state(driver, "chat@1")
    assert state["sleeping"] and state["sleep_level"] == 2 and not state["weights_valid"]
    assert not await sleep_mode.awake(call)
    await sleep_mode.wake(call, "chat", 2)
    assert seen == ["POST /sleep?level=2", "GET /is_sleeping", "POST /wake_up?tags=weights", "POST /collective_rpc",
                    "POST /wake_up?tags=kv_cache", "GET /is_sleeping", "POST /v1/completions"]
    state = await fake_state(driver, "chat@1")
    assert not state["sleeping"] and state["weights_valid"]  # reloaded before the KV cache came back

    # the driver's own sleep and wake (level 1), with the warm-up the only request served so far
    assert state["requests_served"] == 1
    await driver.sleep("chat@1", 1)
    assert (await fake_state(driver, "chat@1"))["sleep_level"] == 1
    await driver.wake("chat@1", 1)
    state = await fake_state(driver, "chat@1")
    assert not state["sleeping"] and state["requests_served"] == 2 and state["requests_while_sleeping"] == 0
    assert "Warm-up" not in caplog.text
    assert "--- wake up (from level 1)" in driver.logs("chat@1", 2000)

    seen.clear()  # without warm-up: nothing but the wake and the check
    await sleep_mode.sleep(call, 1)
    await sleep_mode.wake(call, "chat", 1, warmup=False)
    assert seen == ["POST /sleep?level=1", "POST /wake_up", "GET /is_sleeping"]
    assert (await fake_state(driver, "chat@1"))["requests_served"] == 2


async def test_every_failure_is_a_load_error_naming_what_failed(driver: ProcessDriver,
                                                                 http: aiohttp.ClientSession) -> None:
    await driver.start("stuck")
    await driver.sleep("stuck", 1)
    with pytest.raises(LoadError, match=r"POST /wake_up answered 500: .*simulated by --fail-wake"):
        await driver.wake("stuck", 1)
    await driver.stop("stuck")

    await driver.start("chat")
    engine_call = sleep_mode.http_call(lambda: http, str(driver.endpoint("chat")))
    await sleep_mode.sleep(engine_call, 1)
    # an engine that answers its wake-up but still sleeps would refuse every request sent to it
    with pytest.raises(LoadError, match=re.escape('does not report being awake after wake_up: {"is_sleeping":true}')):
        await sleep_mode.wake(recorded(engine_call, [], skip="/wake_up"), "chat", 1)
    seen: list[str] = []
    with pytest.raises(LoadError, match="sleep level must be 1 or 2, got 3"):
        await sleep_mode.wake(recorded(engine_call, seen), "chat", 3)
    with pytest.raises(LoadError, match="sleep level must be 1 or 2, got 0"):
        await sleep_mode.sleep(recorded(engine_call, seen), 0)
    assert seen == []  # refused before anything reached the engine
    with pytest.raises(LoadError, match=r"GET /is_sleeping failed: .*"):
        await sleep_mode.awake(sleep_mode.http_call(lambda: http, f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(LoadError, match="not running"):
        await driver.sleep("chat@1", 1)
