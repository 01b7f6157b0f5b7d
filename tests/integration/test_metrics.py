"""GET /metrics after real requests through a router (in this event loop) in front of fake-engine processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from vllm_model_router.http.metrics import eviction_reason, families

from .ops_support import CHAT, chat, fake_model, local_router

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
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(session, url)
        if check(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


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
        assert val(before, "router_memory_budget_gb") == 40
        assert val(before, "router_memory_reserved_gb") == 0
        assert state_of(before, "alpha") == "unloaded"
        assert val(before, "router_model_state", model="alpha", state="loaded") == 0

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
        assert val(m, "router_memory_reserved_gb") == 10
        assert val(m, "router_in_flight", model="alpha") == 0

        # beta evicts alpha (capacity 1); then a request held in flight on beta while alpha waits for it
        assert (await post(s, r.url + CHAT, chat("beta")))[0] == 200
        held = asyncio.create_task(post(s, r.url + CHAT, chat("beta", fake={"delay": 1.5})))
        await asyncio.sleep(0.3)
        waiter = asyncio.create_task(post(s, r.url + CHAT, chat("alpha")))
        m = await eventually(s, r.url, lambda m: val(m, "router_waiting", model="alpha") == 1)
        assert val(m, "router_in_flight", model="beta") == 1
        assert val(m, "router_waiting", model="alpha") == 1
        assert val(m, "router_model_evictions_total", model="alpha", reason="lru") == 1
        assert state_of(m, "beta") == "loaded"
        assert val(m, "router_memory_reserved_gb") == 20
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
        assert val(m, "router_in_flight", model="beta") == 0
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
        assert val(m1, "router_memory_budget_gb") is None  # no budget configured
        async with s.get(one.url + "/metrics",
                         headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).rstrip().endswith("# EOF")
        assert {m.name for m in REGISTRY.collect()} == global_names


@pytest.mark.parametrize(("reason", "label"), [
    ("evicted to make room for big", "lru"),
    ("unloaded by operator", "operator"),
    ("unloaded by operator (forced)", "operator_forced"),
    ("Timed out waiting for model to load", "load_timeout"),
    ("over capacity (loaded outside the router)", "over_capacity"),
    ("something new", "other"),
])
def test_eviction_reasons_are_bounded_labels(reason: str, label: str) -> None:
    assert eviction_reason(reason) == label
