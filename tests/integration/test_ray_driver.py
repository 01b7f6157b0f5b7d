"""The cluster driver against a real Ray cluster of three nodes in this machine's process tree (a head without
GPUs and two nodes with two accounting-only GPUs each, all on loopback), with the fake engine as the model
server: each unit's engine runs in a named actor on the node it was placed on, reserves its GPUs from Ray,
and leaves nothing behind when it is stopped, when it exits, or when its node is lost.

The node-loss test removes node 1 of the shared cluster; every other test uses node 2.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

# before Ray is imported: every node, the control store and each worker on 127.0.0.1, not the interface address
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from tests.harness import (  # noqa: E402
    CHAT,
    MARKER_VAR,
    alive,
    assert_no_processes_left,
    chat_body,
    engine,
    environ,
    processes,
    router_data,
    wait_until,
)
from vllm_model_router.config import ModelConfig, build_config  # noqa: E402
from vllm_model_router.drivers.base import LoadError  # noqa: E402
from vllm_model_router.drivers.ray_actor import EngineActor  # noqa: E402
from vllm_model_router.drivers.ray_engine import Placement, RayEngineDriver  # noqa: E402

GPUS_PER_NODE = 2


class Nodes:
    def __init__(self, cluster: Cluster, workers: list[Any]) -> None:
        self.cluster = cluster
        self.workers = workers  # node 1, node 2
        self.ids = [w.node_id for w in workers]


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=f"test-{uuid.uuid4().hex[:8]}", log_to_driver=False)
        yield Nodes(cluster, workers)
    finally:
        ray.shutdown()
        cluster.shutdown()


def units(models: dict[str, dict[str, Any]], marker: str) -> dict[str, ModelConfig]:
    return build_config(router_data(models, marker), env={}, source="<test>").units()


def driver_for(models: dict[str, dict[str, Any]], marker: str, placements: dict[str, Placement],
               **options: Any) -> RayEngineDriver:
    return RayEngineDriver(units(models, marker), lambda unit, gpus: placements[unit], namespace=marker, **options)


def engines(marker: str) -> list[int]:
    """The pids of the test's engine processes, wherever their actors run (all nodes are this machine)."""
    return [p.pid for p in processes(**{MARKER_VAR: marker})]


def free_gpus(node_id: str) -> float:
    """The GPUs Ray counts as free on the node (its accounting, as every raylet reports it)."""
    per_node: dict[str, dict[str, float]] = ray._private.state.available_resources_per_node()
    return float(per_node.get(node_id, {}).get("GPU", 0.0))


def actors(namespace: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]


async def chat(endpoint: str, model: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{endpoint}/health") as resp:
            assert resp.status == 200
        async with http.post(f"{endpoint}{CHAT}", json=chat_body(model)) as resp:
            assert resp.status == 200, await resp.text()
            reply: dict[str, Any] = await resp.json()
    return reply


async def test_a_unit_runs_on_its_node_with_its_gpus_reserved_and_a_stop_releases_everything(nodes: Nodes) -> None:
    marker = uuid.uuid4().hex
    node = nodes.ids[1]
    driver = driver_for({"chat": engine(replicas=2)}, marker, {"chat@1": Placement(node, (1,))})
    try:
        await driver.start("chat@1")
        endpoint = driver.endpoint("chat@1")
        assert endpoint is not None and endpoint.startswith("http://127.0.0.1:")
        reply = await chat(endpoint, "chat")
        assert reply["choices"][0]["message"]["content"]
        info = driver.info("chat@1")
        assert info["node"] == node and info["pid"] is None and info["ray_resources"] == {"GPU": 1.0}
        assert driver.pids("chat@1") == []  # another machine's process: not in the router's table
        [pid] = engines(marker)
        assert info["remote_pid"] == pid
        log_file = Path(os.readlink(f"/proc/{pid}/fd/1"))  # its output, in a directory of the actor's
        assert (environ(pid) or {}).get("CUDA_VISIBLE_DEVICES") == "1"  # the node's GPU it was placed on
        assert actors(marker) == ["chat@1"]
        await wait_until(lambda: free_gpus(node) == GPUS_PER_NODE - 1, 10, "Ray to count the GPU as taken")
        await wait_until(lambda: any("Application startup complete." in ln for ln in driver.logs("chat@1", 50)),
                         5, "the engine's output")
        with pytest.raises(LoadError, match="already running"):
            await driver.start("chat@1")

        await driver.stop("chat@1")
        assert driver.endpoint("chat@1") is None
        assert actors(marker) == []  # the name is released when stop returns
        assert not alive(pid)
        assert driver.logs("chat@1", 1) == ["--- stopped"]
        assert not log_file.parent.exists()  # a unit's log directory on the node goes with it (one per start)
        await wait_until(lambda: free_gpus(node) == GPUS_PER_NODE, 10, "Ray to count the GPU as free")
    finally:
        await driver.close()
        await assert_no_processes_left(marker)
    assert actors(marker) == []


async def test_a_load_that_fails_or_does_not_fit_leaves_nothing_behind(nodes: Nodes) -> None:
    marker = uuid.uuid4().hex
    node = nodes.ids[1]
    models = {"broken": engine("--exit-during-startup"), "big": engine(), "small": engine()}
    placements = {"broken": Placement(node, (0,)), "big": Placement(node, (0, 1, 2)), "small": Placement(node, (1,))}
    driver = driver_for(models, marker, placements)
    impatient = driver_for(models, marker, placements, placement_timeout=1.5)
    try:
        with pytest.raises(LoadError, match="exited with code 1 while loading") as failed:
            await driver.start("broken")
        assert failed.value.status == 503
        assert any("--- starting on node" in ln for ln in driver.logs("broken", 100))
        with pytest.raises(LoadError, match=f"could not be started on node {node}: .*not schedulable"):
            await driver.start("big")  # three GPUs on a node of two
        every_gpu = ray.util.placement_group([{"GPU": GPUS_PER_NODE}] * 2, strategy="STRICT_SPREAD")
        try:
            await every_gpu.ready()
            with pytest.raises(LoadError, match=f"did not start its actor on node {node} within 1.5s"):
                await impatient.start("small")  # it fits once a GPU is free: Ray keeps it pending till then
        finally:
            ray.util.remove_placement_group(every_gpu)
        assert actors(marker) == [] and engines(marker) == []
        assert driver.endpoint("broken") is None and impatient.endpoint("small") is None
        await wait_until(lambda: free_gpus(node) == GPUS_PER_NODE, 10, "Ray to count the GPUs as free")
    finally:
        await driver.close()
        await impatient.close()
        await assert_no_processes_left(marker)


async def test_an_engine_that_exits_on_its_own_is_reported_and_its_actor_released(nodes: Nodes) -> None:
    marker = uuid.uuid4().hex
    driver = driver_for({"chat": engine("--fail-after-requests", "1")}, marker,
                        {"chat": Placement(nodes.ids[1], (0,), 0.5)})
    exits: list[tuple[str, str]] = []
    driver.set_exit_callback(lambda unit, reason: exits.append((unit, reason)))
    try:
        await driver.start("chat")
        assert driver.info("chat")["ray_resources"] == {"GPU": 0.5}
        await chat(driver.endpoint("chat") or "", "chat")
        await wait_until(lambda: exits, 15, "the exit callback")
        [(unit, reason)] = exits
        assert unit == "chat" and "process exited with code 1" in reason, reason
        assert driver.endpoint("chat") is None and actors(marker) == [] and engines(marker) == []
    finally:
        await driver.close()
        await assert_no_processes_left(marker)


async def test_a_restarted_router_adopts_the_running_engine(nodes: Nodes) -> None:
    marker = uuid.uuid4().hex
    models = {"chat": engine(replicas=2)}
    placements = {"chat": Placement(nodes.ids[1], (0,), 0.5)}
    first, second = driver_for(models, marker, placements), driver_for(models, marker, placements)
    exits: list[tuple[str, str]] = []
    first.set_exit_callback(lambda unit, reason: exits.append((unit, reason)))
    try:
        await first.start("chat")
        endpoint = first.endpoint("chat")
        [pid] = engines(marker)
        # a unit whose actor the first router created but never started an engine in (it crashed first)
        ray.remote(EngineActor).options(name="chat@1", namespace=marker, lifetime="detached", num_cpus=0).remote(
            "chat@1", units(models, marker)["chat@1"])
        assert sorted(actors(marker)) == ["chat", "chat@1"]
        assert await second.adopt() == {"chat": endpoint}
        assert actors(marker) == ["chat"]  # the engineless one is killed: nothing else would release it
        assert second.endpoint("chat") == endpoint and second.info("chat")["remote_pid"] == pid
        assert second.info("chat")["ray_resources"] == {"GPU": 0.5}
        await chat(endpoint or "", "chat")
        # what the engine printed before the new router came is in its logs
        await wait_until(lambda: any("Application startup complete." in ln for ln in second.logs("chat", 100)),
                         5, "the adopted engine's earlier output")
        assert await second.adopt() == {}  # taken over already

        await second.stop("chat")  # the old router sees its actor die
        assert not alive(pid) and actors(marker) == []
        await wait_until(lambda: exits, 10, "the first router's exit callback")
        assert exits[0][0] == "chat" and "died" in exits[0][1]
    finally:
        await first.close()
        await second.close()
        await assert_no_processes_left(marker)


class NotAnEngine:
    """Another program's actor in the router's namespace."""

    def ping(self) -> str:
        return "pong"


async def test_a_restarted_router_stops_the_engines_it_has_no_config_for(nodes: Nodes) -> None:
    # the config lost chat's second replica and the model old: their engines, left running, held GPUs that
    # Ray counted taken and the new router counted free (its loads there waited out the placement timeout)
    marker = uuid.uuid4().hex
    node = nodes.ids[1]
    before = {"chat": engine(replicas=2), "old": engine()}
    first = driver_for(before, marker, {"chat@1": Placement(node, (0,), 0.25), "old": Placement(node, (0,), 0.25)})
    second = driver_for({"chat": engine()}, marker, {})
    try:
        await first.start("chat@1")
        await first.start("old")
        assert len(engines(marker)) == 2
        foreign = ray.remote(NotAnEngine).options(name="theirs", namespace=marker, lifetime="detached",
                                                   num_cpus=0).remote()
        assert await asyncio.wrap_future(foreign.ping.remote().future()) == "pong"
        assert await second.adopt() == {}
        assert actors(marker) == ["theirs"]  # another program's actor is left alone
        await wait_until(lambda: not engines(marker), 10, "the engines it has no config for to stop")
        ray.kill(foreign)
    finally:
        await first.close()
        await second.close()
        await assert_no_processes_left(marker)


async def test_a_unit_sleeps_and_wakes_in_its_actor_and_a_sleeping_one_is_not_adopted(nodes: Nodes) -> None:
    """Sleep mode is spoken to the engine on its node: the actor and its engine stay. An engine found asleep
    after a router restart is stopped (nothing would wake it; requests sent to it would be refused)."""
    marker = uuid.uuid4().hex
    models = {"chat": {**engine("--enable-sleep-mode"), "sleep": True}}
    placements = {"chat": Placement(nodes.ids[1], (0,), 0.0125)}
    first, second = driver_for(models, marker, placements), driver_for(models, marker, placements)
    try:
        await first.start("chat")
        endpoint = first.endpoint("chat") or ""
        [pid] = engines(marker)
        await first.sleep("chat", 1)
        async with aiohttp.ClientSession() as http, http.get(f"{endpoint}/is_sleeping") as resp:
            assert await resp.json() == {"is_sleeping": True}
        await first.wake("chat", 1)
        await chat(endpoint, "chat")
        assert engines(marker) == [pid] and first.endpoint("chat") == endpoint and actors(marker) == ["chat"]
        assert {"--- sleep level 1", "--- wake up (from level 1)"} <= set(first.logs("chat", 100))

        await first.sleep("chat", 2)
        assert await second.adopt() == {}
        assert actors(marker) == [] and second.endpoint("chat") is None
        await wait_until(lambda: not alive(pid), 10, f"engine {pid} to be stopped")
        with pytest.raises(LoadError, match="not running on the cluster"):
            await second.wake("chat", 2)
    finally:
        await first.close()
        await second.close()
        await assert_no_processes_left(marker)


async def test_a_lost_node_fires_the_exit_callback_and_takes_the_engine_with_it(nodes: Nodes) -> None:
    marker = uuid.uuid4().hex
    node = nodes.ids[0]
    driver = driver_for({"chat": engine()}, marker, {"chat": Placement(node, (0, 1))})
    exits: list[tuple[str, str]] = []
    driver.set_exit_callback(lambda unit, reason: exits.append((unit, reason)))
    try:
        await driver.start("chat")
        [pid] = engines(marker)
        assert driver.info("chat")["ray_resources"] == {"GPU": 2.0}
        await asyncio.to_thread(nodes.cluster.remove_node, nodes.workers[0])
        await wait_until(lambda: exits, 15, "the exit callback")
        [(unit, reason)] = exits
        assert unit == "chat" and "its node has died" in reason, reason
        assert driver.endpoint("chat") is None
        # the engine ran in its own session: only its tie to the actor's thread ended it
        await wait_until(lambda: not alive(pid), 10, f"engine {pid} to die with its node")
        assert actors(marker) == []
    finally:
        await driver.close()
        await assert_no_processes_left(marker)


if sys.platform != "linux":  # the engine's tie to its actor (PR_SET_PDEATHSIG) exists on Linux only
    del test_a_lost_node_fires_the_exit_callback_and_takes_the_engine_with_it
