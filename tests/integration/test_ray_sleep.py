"""Sleep mode on ``cluster.backend: ray``, through a router, on a simulated cluster (a CPU-only head and one node
with one accounting-only GPU, on loopback) with the fake engine's emulation of vLLM's sleep routes.

Two models that do not fit on the node's GPU together take turns: the idle one is put to sleep, in its actor,
to make room, and woken in place at its next request. Each unit reserves from Ray only what it holds asleep:
were it to keep its awake share, Ray would leave the other's actor pending on the room the sleeper left. A
wake that fails falls back to a stop and a cold start, as on one machine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Router, engine
from tests.harness.ray_cluster import RayCluster, import_ray, ray_cluster

from .conftest import StartRouter


@pytest.fixture
def cluster(marker: str) -> Iterator[RayCluster]:
    with ray_cluster(marker + "-ray") as c:  # its own marker: see test_ray_serve.py
        yield c


def sleeper(*args: str) -> dict[str, Any]:
    return {**engine("--enable-sleep-mode", *args), "sleep": True, "memory_gb": 60}


async def kinds(r: Router, model: str) -> list[str]:
    return [e["kind"] for e in await r.events() if e["model"] == model]


async def test_models_sleep_and_wake_in_their_actors_and_a_failed_wake_starts_cold(
    cluster: RayCluster, start_router: StartRouter, marker: str
) -> None:
    node = cluster.add_node(num_gpus=1)
    r = await start_router(
        {"a": sleeper(), "b": sleeper("--fail-wake")}, capacity={"max_resident": 10},
        cluster={"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                 "gpu_memory_gb": 80})
    assert (await r.chat("a")).status == 200
    a = await r.model("a")
    assert a["node"] == cluster.node_id(node) and a["ray_resources"] == {"GPU": 0.0125}  # 1 GB of 80 asleep

    reply = await r.chat("b")  # 60 + 60 GB do not fit on the GPU: a sleeps, b starts in the room it left
    assert reply.status == 200 and reply.json()["model"] == "b", reply.body
    asleep = await r.model("a")
    assert asleep["state"] == "sleeping" and asleep["sleep_level"] == 1
    assert (asleep["remote_pid"], asleep["ray_actor"], asleep["port"]) == (a["remote_pid"], a["ray_actor"], a["port"])
    assert (await r.engine_state("a"))["sleeping"]
    assert (await r.model("b"))["gpus"] == a["gpus"]

    reply = await r.chat("a")  # b sleeps, a wakes where it is: no cold start
    assert reply.status == 200 and reply.json()["model"] == "a", reply.body
    woken = await r.model("a")
    assert woken["state"] == "loaded" and (await r.model("b"))["state"] == "sleeping"
    assert (woken["remote_pid"], woken["ray_actor"], woken["loads"], woken["wakes"]) == (
        a["remote_pid"], a["ray_actor"], 1, 1)
    assert await kinds(r, "a") == ["load_started", "loaded", "sleep_started", "slept", "wake_started", "woken"]
    state = await r.engine_state("a")
    assert not state["sleeping"] and state["requests_while_sleeping"] == 0

    b = await r.model("b")
    reply = await r.chat("b")  # its wake fails: stopped, then started cold, in an actor of its own again
    assert reply.status == 200 and reply.json()["model"] == "b", reply.body
    cold = await r.model("b")
    assert cold["state"] == "loaded" and cold["loads"] == 2 and cold["wakes"] == 0 and cold["failures"] == 1
    assert cold["remote_pid"] != b["remote_pid"] and cold["ray_actor"] == b["ray_actor"]
    events = await kinds(r, "b")
    assert events[events.index("wake_failed"):][-2:] == ["load_started", "loaded"], events
    assert (await r.model("a"))["state"] == "sleeping"


@pytest.mark.parametrize(("gpus", "sleeping_gb", "share"), [
    (1, 1, 0.0125), (2, 1, 0.025), (1, 0, 0.0001), (1, 100, 0.75), (1, 80 / 3, 0.3333), (8, 15, 1.0)],
    ids=["one-gpu", "two-gpus", "nothing-asleep", "capped-at-its-memory", "rounded-down", "whole-gpus-above-one"])
def test_a_sleeper_reserves_from_ray_what_it_holds_asleep(gpus: int, sleeping_gb: float, share: float) -> None:
    """Never more than the router counts for it asleep (Ray would refuse what the router placed beside it),
    at least Ray's smallest amount (so it still needs a node with GPUs), and whole GPUs above one."""
    import_ray()  # skips without the ray extra; set up for loopback, as every test of this session needs
    from vllm_model_router.config import build_config
    from vllm_model_router.runtime.cluster import asleep_share

    entry = {**sleeper(), "sleeping_memory_gb": sleeping_gb}
    model = build_config({"models": {"m": entry}}, env={}).models["m"]
    assert asleep_share(model, gpus, 80) == share


def test_the_shares_of_models_that_fit_one_gpu_never_add_up_to_more_than_it_in_rays_books() -> None:
    import_ray()
    from vllm_model_router.runtime.cluster import gpu_share

    halves = [x / 2 for x in range(1, 160)]  # 0.5 to 79.5 GB of an 80 GB GPU
    for a in halves:
        assert gpu_share(a, 80) <= a / 80
        for b in halves:
            if a + b <= 80:
                assert gpu_share(a, 80) + gpu_share(b, 80) <= 1.0 + 1e-12, (a, b)
    assert gpu_share(5.5, 80) + gpu_share(74.5, 80) <= 1.0  # 0.0688 + 0.9313 when rounded to the nearest
    assert gpu_share(36, 80) == 0.45 and gpu_share(0.001, 80) == 0.0001
