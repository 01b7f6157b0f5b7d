"""``serve`` with ``cluster.backend: ray`` on a simulated cluster (a CPU-only head and two nodes of two
GPUs, on loopback): the engines run in Ray actors on the nodes the scheduler chose, a tensor-parallel
model gets two GPUs of one node, a model that asks for a node's resources goes where they are, requests
are answered through the router, the admin view and the metrics show each node, and a node that is lost
takes its engines with it while the next request is re-planned onto the node that is left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import MARKER_VAR, engine, free_port, launch_router, processes
from tests.harness.models import FAKE_ENGINE, chat_body
from tests.harness.ray_cluster import RayCluster, ray_cluster
from tests.harness.waiting import wait_until
from vllm_model_router.gpu.probe import GIB
from vllm_model_router.http.metrics import families

from .conftest import StartRouter


@pytest.fixture
def cluster(marker: str) -> Iterator[RayCluster]:
    # a marker of its own: the router's check at its stop must not count the cluster's processes, and the
    # cluster's check at its stop (after the router's) covers the engines its actors started
    with ray_cluster(marker + "-ray") as c:
        yield c


def placed(models: list[dict[str, Any]]) -> dict[str, list[int]]:
    return {m["name"]: m["gpus"] for m in models if m["state"] == "loaded"}


async def per_node(r: Any, metric: str) -> dict[str, float]:
    """A per-node metric's value by node id."""
    text = (await r.get("/metrics")).body.decode()
    return {labels["node"]: value for name, labels, value in families(text) if name == metric}


async def test_models_run_on_the_cluster_and_a_lost_node_is_planned_around(
    cluster: RayCluster, start_router: StartRouter, marker: str
) -> None:
    first, second = cluster.add_node(num_gpus=2), cluster.add_node(num_gpus=2)
    r = await start_router(
        {"a": engine(memory_gb=60), "b": engine(memory_gb=60), "tp": engine(memory_gb=60, gpu_count=2)},
        capacity={"max_resident": 10},
        cluster={"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                 "gpu_memory_gb": 80})
    for name in ("a", "b", "tp"):
        reply = await r.chat(name)
        assert reply.status == 200 and reply.json()["model"] == name, reply.body
    models = list((await r.models()).values())
    where = placed(models)
    nodes = (await r.get("/admin/models")).json()["nodes"]
    assert sorted(len(n["gpus"]) for n in nodes) == [2, 2] and all(n["address"] == "127.0.0.1" for n in nodes)
    assert "router_nodes 2.0" in (await r.get("/metrics")).body.decode()
    # 60 of 80 GB each: a and b one GPU each; tp two GPUs of the same node, the one left with both free
    assert len(where["a"]) == len(where["b"]) == 1 and where["a"] != where["b"]
    assert len(where["tp"]) == 2
    by_model = {m["name"]: m for m in models}
    assert by_model["tp"]["node"] not in (None, "") and by_model["a"]["pid"] is None  # a remote process
    # each node: what is placed there and what it reserves, as the actors' nodes say
    tp_node, ab_node = by_model["tp"]["node"], by_model["a"]["node"]
    assert by_model["b"]["node"] == ab_node != tp_node
    by_node = {n["node"]: n for n in nodes}
    assert (by_node[tp_node]["units"], by_node[ab_node]["units"]) == (["tp"], ["a", "b"])
    # tp holds its two GPUs whole, as Ray reserves them: nothing else goes beside it
    assert (by_node[tp_node]["reserved_gb"], by_node[ab_node]["reserved_gb"]) == (160, 120)
    assert all(n["alive"] and n["gpu_memory_gb"] == 160 for n in nodes)
    assert await per_node(r, "router_node_gpu_memory_reserved_bytes") == {tp_node: 160 * GIB, ab_node: 120 * GIB}
    assert await per_node(r, "router_node_units") == {tp_node: 1, ab_node: 2}
    # the node running tp is lost: tp is gone with it, and its next request lands on the other node,
    # evicting the idle a and b there
    lost = first if by_model["tp"]["node"] == cluster.node_id(first) else second
    cluster.remove_node(lost)
    await r.wait_model("tp", lambda v: v["state"] != "loaded", 30, "gone with its node")
    reply = await r.chat("tp")
    assert reply.status == 200, reply.body
    assert "node_lost" in [e["kind"] for e in await r.events()]
    # the lost node stays listed, as lost, with nothing placed there; tp is on the other one now
    by_node = {n["node"]: n for n in (await r.get("/admin/models")).json()["nodes"]}
    assert set(by_node) == {tp_node, ab_node} and (await r.model("tp"))["node"] == ab_node
    assert not by_node[tp_node]["alive"] and by_node[tp_node]["units"] == [] and len(by_node[tp_node]["gpus"]) == 2
    assert by_node[ab_node]["alive"] and by_node[ab_node]["units"] == ["tp"]
    assert "router_nodes 1.0" in (await r.get("/metrics")).body.decode()
    assert await per_node(r, "router_node_up") == {tp_node: 0, ab_node: 1}


async def test_a_model_that_needs_a_resource_goes_to_the_node_that_has_it(
    cluster: RayCluster, start_router: StartRouter, marker: str
) -> None:
    plain = cluster.add_node(num_gpus=2)
    special = cluster.add_node(num_gpus=1, resources={"special": 1})
    r = await start_router(
        {"tp": engine(memory_gb=30, gpu_count=2), "s": engine(memory_gb=20, resources={"special": 0.01}),
         "nowhere": engine(memory_gb=20, resources={"absent": 1})},
        capacity={"max_resident": 10},
        cluster={"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                 "gpu_memory_gb": 80})
    assert (await r.chat("tp")).status == 200  # the one node with two GPUs: 50 GB left on each
    assert (await r.model("tp"))["node"] == cluster.node_id(plain)
    # best fit alone would put s on the plain node (30 GB left over there, 60 on the special node's GPU)
    assert (await r.chat("s")).status == 200
    s = await r.model("s")
    assert s["node"] == cluster.node_id(special) and s["ray_resources"]["special"] == 0.01
    nodes = {n["node"]: n for n in (await r.get("/admin/models")).json()["nodes"]}
    assert "special" in nodes[cluster.node_id(special)]["resources"]
    assert "special" not in nodes[cluster.node_id(plain)]["resources"]
    refused = await r.chat("nowhere")  # no node has the resource: at once, not after the placement timeout
    assert refused.status == 503 and "absent" in refused.error["message"] and refused.elapsed < 5


async def test_a_router_killed_with_9_leaves_its_engines_to_the_next_one(
    cluster: RayCluster, marker: str, tmp_path: Path
) -> None:
    cluster.add_node(num_gpus=2)
    settings: dict[str, Any] = {
        "capacity": {"max_resident": 10}, "state_dir": False,
        "cluster": {"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                    "gpu_memory_gb": 80}}
    models = {"a": engine(memory_gb=60)}
    async with launch_router(models, marker, "process", workdir=tmp_path, name="first", port=free_port(),
                             leave_processes=True, **settings) as first:
        assert (await first.chat("a")).status == 200
        before = await first.model("a")
        first.proc.kill()  # kill -9: the engine's actor is detached, it stays
        await first.proc.wait()
    async with launch_router(models, marker, "process", workdir=tmp_path, name="second", port=free_port(),
                             **settings) as second:
        after = await second.wait_state("a", "loaded", timeout=30)
        assert after["remote_pid"] == before["remote_pid"] and after["port"] == before["port"]  # adopted
        assert (await second.chat("a")).status == 200
        assert "adopted" in [e["kind"] for e in await second.events() if e["model"] == "a"]


async def test_a_request_in_hand_when_its_node_is_lost_is_answered_from_another_node(
    cluster: RayCluster, start_router: StartRouter, marker: str
) -> None:
    nodes = [cluster.add_node(num_gpus=1), cluster.add_node(num_gpus=1)]
    r = await start_router(
        {"a": engine(memory_gb=60)}, capacity={"max_resident": 10},
        cluster={"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                 "gpu_memory_gb": 80})
    assert (await r.chat("a")).status == 200
    where = (await r.model("a"))["node"]
    slow = asyncio.create_task(r.chat("a", fake={"delay": 3.0}))
    await asyncio.sleep(1.0)  # in the engine's hands
    cluster.remove_node(next(n for n in nodes if cluster.node_id(n) == where))
    reply = await slow  # nothing of it had come back: it is planned again, on the node that is left
    assert reply.status == 200, reply.body
    assert (await r.model("a"))["node"] not in (None, where)


async def test_a_router_up_before_any_gpu_node_refuses_at_once_and_serves_once_one_joins(
    cluster: RayCluster, start_router: StartRouter, marker: str
) -> None:
    # the head has no GPU (as on KubeRay, where the router may come up before the GPU workers): no place for
    # a model yet. A clear 503 at once, not an internal error from placing it "anywhere" on no node.
    r = await start_router(
        {"a": engine(memory_gb=60)}, capacity={"max_resident": 10},
        cluster={"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                 "gpu_memory_gb": 80})
    refused = await r.chat("a")
    assert refused.status == 503 and "no node of the cluster has a GPU" in refused.error["message"], refused.body
    assert refused.elapsed < 5
    assert "load_failed" not in [e["kind"] for e in await r.events()]  # nothing was started, nothing failed
    assert (await r.get("/admin/models")).json()["nodes"] == []  # a cluster, with no GPU node: said so
    assert "router_nodes 0.0" in (await r.get("/metrics")).body.decode()
    node = cluster.add_node(num_gpus=1)
    await wait_until(lambda: _nodes_seen(r), 30, "the new node seen by the router")
    reply = await r.chat("a")
    assert reply.status == 200, reply.body
    assert (await r.model("a"))["node"] == cluster.node_id(node)


async def _nodes_seen(r: Any) -> bool:
    return bool((await r.get("/admin/models")).json()["nodes"])


async def test_capacity_memory_gb_is_each_gpus_budget_on_the_cluster_as_on_one_machine(
    cluster: RayCluster, start_router: StartRouter, marker: str
) -> None:
    # 80 GB GPUs, of which the operator lets the models reserve 50 (headroom for something else): two models
    # of 30 GB do not share one GPU, though 60 GB would fit the GPU itself
    node = cluster.add_node(num_gpus=1)
    r = await start_router(
        {"a": engine(memory_gb=30), "b": engine(memory_gb=30)}, capacity={"max_resident": 10, "memory_gb": 50},
        cluster={"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                 "gpu_memory_gb": 80})
    assert (await r.chat("a")).status == 200
    assert (await r.chat("b")).status == 200
    assert (await r.model("a"))["state"] != "loaded"  # evicted to make room for b
    b = await r.model("b")
    assert b["ray_resources"]["GPU"] == 0.375  # what Ray reserves is a share of the GPU itself: 30 of 80
    (view,) = (await r.get("/admin/models")).json()["nodes"]
    assert view["node"] == cluster.node_id(node) and view["gpu_memory_gb"] == 50


async def test_requests_in_the_hands_of_a_vanished_node_are_cut_loose_when_it_is_lost(
    cluster: RayCluster, start_router: StartRouter, marker: str
) -> None:
    # a machine that vanishes sends no FIN or RST and answers nothing: the router's connections to its engine
    # never break. Here the engine outlives its actor (a shell between them takes the actor's death signal)
    # and is stopped (SIGSTOP), so its sockets stay open and silent as a dead host's would. Once the router
    # hears the node is lost, a request that had nothing back yet is planned again on the other node, and a
    # stream ends with an error event, both at once (without that, both waited for ever: a stream has no
    # read timeout, a plain request first_byte_timeout, 600 s)
    nodes = [cluster.add_node(num_gpus=1), cluster.add_node(num_gpus=1)]
    cmd = ["sh", "-c", shlex.join(FAKE_ENGINE) + " & wait"]
    frozen: list[int] = []
    try:
        r = await start_router(
            {"a": {"cmd": cmd, "stop_timeout": 1, "memory_gb": 60}}, capacity={"max_resident": 10},
            cluster={"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                     "gpu_memory_gb": 80})
        assert (await r.chat("a")).status == 200
        where = (await r.model("a"))["node"]
        stream = asyncio.create_task(r.stream(chat_body("a", stream=True, fake={"chunks": 3, "chunk_delay": 3})))
        plain = asyncio.create_task(r.chat("a", fake={"delay": 3.0}))
        await wait_until(lambda: _in_flight(r, 2), 10, "both requests in the engine's hands")
        frozen = [p.pid for p in processes(**{MARKER_VAR: marker})]  # the engine (and its shell)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        lost_at = time.monotonic()
        cluster.remove_node(next(n for n in nodes if cluster.node_id(n) == where))
        reply = await asyncio.wait_for(plain, 30)
        assert reply.status == 200, reply.body
        assert time.monotonic() - lost_at < 15
        assert (await r.model("a"))["node"] not in (None, where)  # answered from the other node
        s = await asyncio.wait_for(stream, 30)
        last = s.events[-1].json()
        assert s.status == 200 and last["error"]["type"] == "upstream_error" and "is gone" in last["error"]["message"]
    finally:
        for pid in frozen:  # the engine left on the lost node: ours, by its marker
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _in_flight(r: Any, count: int) -> bool:
    return bool((await r.model("a"))["in_flight"] >= count)


async def test_a_unit_of_several_gpus_holds_them_whole_as_ray_reserves_them(
    cluster: RayCluster, start_router: StartRouter, marker: str
) -> None:
    # Ray reserves an actor's GPUs whole above one: 40 of 80 GB on each of two GPUs leaves room in memory,
    # none in Ray's books. A 30 GB model placed there waited out the placement timeout (60 s) and failed;
    # now the idle tp is evicted for it
    cluster.add_node(num_gpus=2)
    r = await start_router(
        {"tp": engine(memory_gb=40, gpu_count=2), "small": engine(memory_gb=30)}, capacity={"max_resident": 10},
        cluster={"backend": "ray", "address": cluster.cluster.address, "namespace": f"t-{marker[:8]}",
                 "gpu_memory_gb": 80})
    assert (await r.chat("tp")).status == 200
    tp = await r.model("tp")
    assert tp["ray_resources"]["GPU"] == 2.0 and tp["memory_gb"] == 80 and "whole" in tp["memory_source"]
    reply = await r.chat("small")
    assert reply.status == 200 and reply.elapsed < 20, reply.body
    assert (await r.model("tp"))["state"] != "loaded"
