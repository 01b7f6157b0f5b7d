"""GET /metrics after real requests through a router (in this event loop) in front of fake-engine processes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

from tests.harness import CHAT, Router, chat_body, engine, launch_router, wait_until
from vllm_model_router.config import build_config
from vllm_model_router.gpu.probe import GIB
from vllm_model_router.http.admin import model_admin_view
from vllm_model_router.http.metrics import RouterMetrics, eviction_label, families
from vllm_model_router.runtime.pump import Runtime
from vllm_model_router.scheduler import State, StopReason
from vllm_model_router.testing.fake_driver import FakeDriver, Script

fake_model = engine
chat = chat_body


@contextlib.asynccontextmanager
async def local_router(models: Mapping[str, Mapping[str, Any]], **top: Any) -> AsyncIterator[Router]:
    """A router in this event loop with a marker of its own; the GPU probe is NVML's if there is a GPU."""
    async with launch_router(models, uuid.uuid4().hex, probe="auto", **top) as router:
        yield router

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(name, frozenset(labels.items())): value for name, labels, value in families(text)}


def val(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def eventually(session: aiohttp.ClientSession, url: str, check: Callable[[Samples], bool],
                     timeout: float = 5.0) -> Samples:
    """Scrape until ``check`` holds (a streamed answer can reach the client before its handler returns)."""

    async def holds() -> Samples | None:
        samples = await scrape(session, url)
        return samples if check(samples) else None

    return await wait_until(holds, timeout, what="metrics condition")


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.read()


def state_of(samples: Samples, model: str) -> str:
    states = [dict(k[1])["state"] for k, v in samples.items()
              if k[0] == "router_model_state" and dict(k[1])["model"] == model and v == 1.0]
    assert len(states) == 1, states
    return states[0]


async def test_metrics_follow_requests_loads_evictions_and_failures() -> None:
    models = {
        "alpha": fake_model("--chunks", "3", memory_gb=10),
        "beta": fake_model(memory_gb=20),
        "broken": fake_model("--exit-during-startup", memory_gb=5),
    }
    async with (local_router(models, capacity={"max_resident": 1, "memory_gb": 40}) as r,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s):
        before = await scrape(s, r.url)
        assert val(before, "router_models_resident") == 0
        assert val(before, "router_memory_budget_bytes") == 40 * GIB
        assert val(before, "router_memory_reserved_bytes") == 0
        assert state_of(before, "alpha") == "unloaded"
        assert val(before, "router_model_state", model="alpha", replica="0", state="loaded") == 0

        # a cold model: one load, then two answers (one streamed), an unknown model, an unserved endpoint
        assert (await post(s, r.url + CHAT, chat("alpha")))[0] == 200
        status, body = await post(s, r.url + CHAT, chat("alpha", stream=True))
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
        assert (await post(s, r.url + CHAT, chat("nope")))[0] == 404
        assert (await post(s, r.url + "/v1/not/an/endpoint", {"model": "alpha"}))[0] == 404

        m = await eventually(s, r.url, lambda m: val(m, "router_requests_total", model="alpha",
                                                     endpoint=CHAT, status="200") == 2)
        assert val(m, "router_requests_total", model="alpha", endpoint=CHAT, status="200") == 2
        assert val(m, "router_requests_total", model="", endpoint=CHAT, status="404") == 1
        # a path that is no forwarded route is refused before its body is read: no model, no new label
        assert val(m, "router_requests_total", model="", endpoint="other", status="404") == 1
        assert val(m, "router_request_seconds_count", model="alpha", endpoint=CHAT) == 2
        assert val(m, "router_wait_seconds_count", model="alpha") == 2  # the refused path never waited
        assert (val(m, "router_wait_seconds_sum", model="alpha") or 0) > 0.2  # the first one waited for the load
        assert val(m, "router_model_loads_total", model="alpha", result="success") == 1
        assert val(m, "router_model_load_seconds_count", model="alpha") == 1
        assert (val(m, "router_model_load_seconds_sum", model="alpha") or 0) > 0.2
        assert state_of(m, "alpha") == "loaded"
        assert val(m, "router_models_resident") == 1
        assert val(m, "router_memory_reserved_bytes") == 10 * GIB
        assert val(m, "router_in_flight", model="alpha", replica="0") == 0
        assert (val(m, "router_replicas", model="alpha"), val(m, "router_replicas", model="beta")) == (1, 0)

        # beta evicts alpha (capacity 1); then a request held in flight on beta while alpha waits for it
        assert (await post(s, r.url + CHAT, chat("beta")))[0] == 200
        held = asyncio.create_task(post(s, r.url + CHAT, chat("beta", fake={"delay": 1.5})))
        await eventually(s, r.url, lambda m: val(m, "router_in_flight", model="beta", replica="0") == 1)
        waiter = asyncio.create_task(post(s, r.url + CHAT, chat("alpha")))
        m = await eventually(s, r.url, lambda m: val(m, "router_waiting", model="alpha") == 1)
        assert val(m, "router_in_flight", model="beta", replica="0") == 1
        assert val(m, "router_waiting", model="alpha") == 1
        assert val(m, "router_model_evictions_total", model="alpha", reason="lru") == 1
        assert state_of(m, "beta") == "loaded"
        assert val(m, "router_memory_reserved_bytes") == 20 * GIB
        assert (await held)[0] == 200
        assert (await waiter)[0] == 200

        # an operator's unload, then a model that cannot start: a failed load and a 503
        async with s.post(r.url + "/admin/models/alpha/unload") as resp:
            assert resp.status == 200
        assert (await post(s, r.url + CHAT, chat("broken")))[0] == 503

        m = await scrape(s, r.url)
        assert val(m, "router_model_loads_total", model="alpha", result="success") == 2
        assert val(m, "router_model_loads_total", model="beta", result="success") == 1
        assert val(m, "router_model_loads_total", model="broken", result="failure") == 1
        assert val(m, "router_model_load_seconds_count", model="alpha") == 2
        assert val(m, "router_model_load_seconds_count", model="broken") is None  # failures are not timed
        assert val(m, "router_requests_total", model="broken", endpoint=CHAT, status="503") == 1
        assert val(m, "router_requests_total", model="beta", endpoint=CHAT, status="200") == 2
        assert val(m, "router_model_evictions_total", model="beta", reason="lru") == 1
        assert val(m, "router_model_evictions_total", model="alpha", reason="operator") == 1
        assert state_of(m, "broken") == "failed"
        assert state_of(m, "alpha") == "unloaded"
        assert val(m, "router_models_resident") == 0
        assert val(m, "router_in_flight", model="beta", replica="0") == 0
        assert val(m, "router_waiting", model="alpha") == 0


async def test_each_router_has_its_own_registry_and_openmetrics_is_negotiated() -> None:
    """Two routers in one process: no duplicate-metric clash, and counters do not leak between them."""
    from prometheus_client import REGISTRY

    global_names = {m.name for m in REGISTRY.collect()}
    models = {"m": fake_model()}
    async with (local_router(models) as one, local_router(models, capacity={"max_resident": 3}) as two,
                aiohttp.ClientSession() as s):
        assert (await post(s, one.url + CHAT, chat("nope")))[0] == 404
        m1, m2 = await scrape(s, one.url), await scrape(s, two.url)
        assert val(m1, "router_requests_total", model="", endpoint=CHAT, status="404") == 1
        assert val(m2, "router_requests_total", model="", endpoint=CHAT, status="404") is None
        assert val(m1, "router_max_resident") == 2 and val(m2, "router_max_resident") == 3
        assert val(m1, "router_memory_budget_bytes") is None  # no budget configured
        async with s.get(one.url + "/metrics",
                         headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).rstrip().endswith("# EOF")
        assert {m.name for m in REGISTRY.collect()} == global_names


# ------------------------------------------------------------------ in memory: the runtime over a fake driver
def test_eviction_labels_are_the_stop_reasons() -> None:
    """The labels that existed when they were parsed from prose keep their values; ttl, host budget, sleep
    and wake failures, once all "other", have their own."""
    assert {r: eviction_label(r) for r in StopReason} == {
        StopReason.LRU: "lru", StopReason.OPERATOR: "operator", StopReason.OPERATOR_FORCED: "operator_forced",
        StopReason.LOAD_TIMEOUT: "load_timeout", StopReason.OVER_CAPACITY: "over_capacity",
        StopReason.TTL: "ttl", StopReason.HOST_BUDGET: "host_budget", StopReason.SLEEP_FAILED: "sleep_failed",
        StopReason.WAKE_FAILED: "wake_failed", StopReason.SCALE_DOWN: "scale_down",
    }
    assert eviction_label("") == "other"  # a stop without a cause


class GatedDriver(FakeDriver):
    """Sleeps and wakes last until the test opens their gate, so it can look while they are under way."""

    def __init__(self, scripts: dict[str, Script] | None = None) -> None:
        super().__init__(scripts)
        self.sleeps = asyncio.Event()
        self.wakes = asyncio.Event()

    async def sleep(self, model: str, level: int) -> None:
        await self.sleeps.wait()
        await super().sleep(model, level)

    async def wake(self, model: str, level: int, warmup: bool = True) -> None:
        await self.wakes.wait()
        await super().wake(model, level, warmup)


def in_memory_router(driver: FakeDriver, models: dict[str, dict[str, Any]], **top: Any) -> Runtime:
    entries = {n: {"cmd": ["never-started", "--enable-sleep-mode", "--port", "${PORT}"], **m}
               for n, m in models.items()}
    return Runtime(build_config({"state_dir": False, "models": entries, **top}, env={}, source="<test>"),
                   driver=driver, probe=None)


def sample(metrics: RouterMetrics) -> Samples:
    return {(name, frozenset(labels.items())): value
            for name, labels, value in families(metrics.render("")[0].decode())}


async def test_models_waking_or_falling_asleep_count_as_resident() -> None:
    driver = GatedDriver()
    sleeper = {"sleep": True, "memory_gb": 30}
    rt = in_memory_router(driver, {"a": sleeper, "b": sleeper}, capacity={"max_resident": 1, "memory_gb": 40})
    metrics = RouterMetrics(rt)

    def resident(m: Samples) -> tuple[float | None, float | None, list[str]]:
        admin = [model_admin_view(rt, v) for v in rt.views()]
        assert [a["name"] for a in admin if a["resident"]] == rt.resident()
        return val(m, "router_models_resident"), val(m, "router_memory_reserved_bytes"), rt.resident()

    try:
        rt.release(await rt.acquire("a"))
        for_b = asyncio.create_task(rt.acquire("b"))
        await rt.wait_for(lambda: rt.state_of("a") is State.FALLING_ASLEEP)
        m = sample(metrics)
        assert state_of(m, "a") == "falling_asleep"
        assert resident(m) == (1, 30 * GIB, ["a"])  # still holding its memory and its place until it sleeps
        driver.sleeps.set()
        rt.release(await for_b)
        assert resident(sample(metrics)) == (1, 30 * GIB, ["b"])  # a sleeps: only its residue, no place

        for_a = asyncio.create_task(rt.acquire("a"))
        await rt.wait_for(lambda: rt.state_of("a") is State.WAKING)
        m = sample(metrics)
        assert (state_of(m, "a"), state_of(m, "b")) == ("waking", "sleeping")
        assert resident(m) == (1, 30 * GIB, ["a"])  # on its way back: it takes its memory and its place again
        driver.wakes.set()
        rt.release(await for_a)
    finally:
        await rt.close()


async def test_ttl_and_sleep_failure_stops_are_counted_under_their_own_reason() -> None:
    driver = FakeDriver({"s": Script(fail_sleep=True)})
    rt = in_memory_router(driver, {"t": {"ttl": 0.05, "memory_gb": 10}, "s": {"sleep": True, "memory_gb": 30},
                                   "x": {"memory_gb": 30}},
                          capacity={"max_resident": 2, "memory_gb": 40})
    metrics = RouterMetrics(rt)
    try:
        rt.release(await rt.acquire("t"))
        await rt.wait_for(lambda: rt.state_of("t") is State.UNLOADED)  # idle past its ttl
        rt.release(await rt.acquire("s"))
        rt.release(await rt.acquire("x"))  # s cannot sleep: it is stopped instead, and x loads
        m = sample(metrics)
        assert val(m, "router_model_evictions_total", model="t", reason="ttl") == 1
        assert val(m, "router_model_evictions_total", model="s", reason="sleep_failed") == 1
        assert val(m, "router_model_sleeps_total", model="s", level="1", result="failure") == 1
        assert not [k for k in m if k[0] == "router_model_evictions_total" and ("reason", "other") in k[1]]
    finally:
        await rt.close()
