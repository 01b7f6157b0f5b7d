"""The cluster's nodes in ``/admin/models`` and ``/metrics``, without Ray: a router on this machine whose
runtime is given the nodes view of a synthetic cluster (``RayNodes`` fed ``ray.nodes()`` answers) whose
global GPU ids are the fake GPUs' ids. What the units reserve per node comes from where the scheduler
really placed them; a lost node stays listed, as lost, and offers nothing."""

from __future__ import annotations

from typing import Any

from tests.harness import Router, engine
from vllm_model_router.gpu.probe import GIB, FakeProbe
from vllm_model_router.gpu.ray_nodes import RayNodes, node_views
from vllm_model_router.http.metrics import families

from .conftest import StartRouter

GB = 80.0


def ray_node(node_id: str, address: str, alive: bool = True) -> dict[str, Any]:
    """One entry of ``ray.nodes()``: one GPU."""
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": address,
            "Resources": {"CPU": 4.0, "GPU": 1.0} if alive else {}}


async def metrics(r: Router) -> dict[tuple[str, str], float]:
    """The samples by (name, node label); "" for those without one."""
    text = (await r.get("/metrics")).body.decode()
    return {(name, labels.get("node", "")): value for name, labels, value in families(text)}


async def test_each_node_shows_its_state_gpus_memory_and_units(start_router: StartRouter) -> None:
    # GPUs 0 and 1 of this (fake) machine stand for nodes a and b; c (GPU 2) was lost
    r = await start_router({"big": engine(memory_gb=50), "small": engine(memory_gb=20)},
                           probe=FakeProbe([GB, GB]), capacity={"max_resident": 4})
    nodes = RayNodes(GB)
    nodes.read([ray_node("a", "10.0.0.1"), ray_node("b", "10.0.0.2"), ray_node("c", "10.0.0.3")])
    nodes.read([ray_node("a", "10.0.0.1"), ray_node("b", "10.0.0.2"), ray_node("c", "10.0.0.3", alive=False)])
    runtime = r.runtime
    runtime.nodes = lambda: node_views(nodes.known(), GB, runtime.views())
    for name in ("big", "small"):
        assert (await r.chat(name)).status == 200
    where = {m["name"]: m["gpus"] for m in (await r.models()).values()}
    assert where == {"big": [0], "small": [0]}  # best fit: small goes where big left the least over

    view = {n["node"]: n for n in (await r.get("/admin/models")).json()["nodes"]}
    assert view["a"] == {"node": "a", "address": "10.0.0.1", "alive": True, "gpus": [0], "gpu_memory_gb": GB,
                         "reserved_gb": 70.0, "units": ["big", "small"], "resources": ["CPU", "GPU"]}
    assert view["b"]["alive"] and view["b"]["reserved_gb"] == 0 and view["b"]["units"] == []
    assert not view["c"]["alive"] and view["c"]["gpus"] == [2] and view["c"]["gpu_memory_gb"] == 0

    m = await metrics(r)
    assert m[("router_nodes", "")] == 2 and m[("router_cluster_gpus", "")] == 2  # alive ones only
    assert (m[("router_node_up", "a")], m[("router_node_up", "b")], m[("router_node_up", "c")]) == (1, 1, 0)
    assert m[("router_node_gpus", "a")] == 1 and m[("router_node_gpus", "c")] == 0
    assert m[("router_node_gpu_memory_bytes", "a")] == GB * GIB and m[("router_node_gpu_memory_bytes", "c")] == 0
    assert m[("router_node_gpu_memory_reserved_bytes", "a")] == 70 * GIB
    assert m[("router_node_gpu_memory_reserved_bytes", "b")] == 0
    assert (m[("router_node_units", "a")], m[("router_node_units", "b")]) == (2, 0)

    await r.post("/admin/models/small/unload")
    await r.wait_state("small", "unloaded")
    m = await metrics(r)
    assert m[("router_node_gpu_memory_reserved_bytes", "a")] == 50 * GIB and m[("router_node_units", "a")] == 1


async def test_one_machine_has_no_nodes(start_router: StartRouter) -> None:
    r = await start_router({"a": engine(memory_gb=10)}, probe=FakeProbe([GB]))
    assert "nodes" not in (await r.get("/admin/models")).json()
    assert not [k for k in await metrics(r) if k[0].startswith(("router_node", "router_cluster"))]
