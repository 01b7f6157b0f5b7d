"""The cluster's GPUs as the scheduler sees them, from what Ray reports: stable global GPU ids, budgets
and nodes of the alive machines only, and the way back from a placement to one machine's GPUs.

First from synthetic ``ray.nodes()`` answers (no Ray needed), then against a real simulated Ray cluster
on loopback: a CPU-only head and two nodes of two GPUs, one of which leaves and another joins.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tests.harness.ray_cluster import RayCluster, ray_cluster
from tests.harness.waiting import wait_until, wait_until_sync
from vllm_model_router.gpu.ray_nodes import LOST_LISTED, Change, RayNodes, RayUnavailable, node_views
from vllm_model_router.scheduler import Capacity, ModelView, State

GB = 80.0


def node(node_id: str, gpus: float | None = 2, alive: bool = True, address: str = "10.0.0.1",
         **custom: float) -> dict[str, Any]:
    """One entry of ``ray.nodes()``, as Ray writes it (a dead node's resources are empty)."""
    resources: dict[str, float] = {"CPU": 8.0, "memory": 1e10, **custom}
    if gpus is not None:
        resources["GPU"] = float(gpus)
    return {"NodeID": node_id, "Alive": alive, "Resources": resources if alive else {},
            "NodeManagerAddress": address}


def gpus_of(change: Change, node_id: str) -> set[int]:
    return {g for g, n in change.nodes.items() if n == node_id}


# --- from synthetic answers ---------------------------------------------------------------------------


def test_each_gpu_gets_a_global_id_and_the_configured_budget() -> None:
    r = RayNodes(GB)
    c = r.read([node("a", 2), node("b", 2), node("head", None, address="10.0.0.9")])
    assert c.joined == ("a", "b", "head") and c.lost == () and c.changed
    assert c.nodes == {0: "a", 1: "a", 2: "b", 3: "b"}  # the head has no GPUs: tracked, but no ids
    assert c.budgets == {0: GB, 1: GB, 2: GB, 3: GB}
    assert r.alive("head") and r.address_of("head") == "10.0.0.9"


def test_ids_stay_the_same_from_one_look_to_the_next() -> None:
    r = RayNodes(GB)
    first = r.read([node("a"), node("b")])
    again = r.read([node("b"), node("a")])  # another order: the same ids
    assert again.nodes == first.nodes and again.budgets == first.budgets
    assert again.joined == () and again.lost == () and not again.changed


def test_a_lost_node_takes_its_gpus_out_of_the_budgets() -> None:
    r = RayNodes(GB)
    r.read([node("a"), node("b")])
    dead = r.read([node("a", alive=False), node("b")])
    assert dead.lost == ("a",) and dead.joined == ()
    assert dead.nodes == {2: "b", 3: "b"} and dead.budgets == {2: GB, 3: GB}
    assert not r.alive("a")
    # a node Ray no longer lists at all is as gone as one it reports dead
    gone = r.read([])
    assert gone.lost == ("b",) and gone.nodes == {} and gone.budgets == {}


def test_a_node_back_under_its_id_gets_its_old_gpu_ids() -> None:
    r = RayNodes(GB)
    r.read([node("a"), node("b")])
    r.read([node("b")])
    back = r.read([node("b"), node("a")])
    assert back.joined == ("a",) and back.lost == ()
    assert back.nodes == {0: "a", 1: "a", 2: "b", 3: "b"}


def test_a_new_node_gets_fresh_ids_never_those_of_a_node_that_left() -> None:
    r = RayNodes(GB)
    r.read([node("a"), node("b")])
    r.read([node("b")])
    c = r.read([node("b"), node("c", 4)])
    assert c.joined == ("c",) and c.lost == ()
    assert gpus_of(c, "c") == {4, 5, 6, 7} and 0 not in c.nodes and 1 not in c.nodes
    # a placement made on GPU 0 before "a" left still points at "a", not at the newcomer
    assert r.node_of(0) == "a" and r.local_gpus((0, 1)) == ("a", (0, 1))


def test_a_node_with_more_gpus_keeps_its_ids_and_gets_fresh_ones_for_the_rest() -> None:
    r = RayNodes(GB)
    r.read([node("a", 2), node("b", 2)])
    c = r.read([node("a", 3), node("b", 2)])
    assert gpus_of(c, "a") == {0, 1, 4} and gpus_of(c, "b") == {2, 3}
    assert r.local_gpus((4,)) == ("a", (2,))
    fewer = r.read([node("a", 1), node("b", 2)])
    assert gpus_of(fewer, "a") == {0}


def test_a_placement_translates_back_to_one_nodes_local_gpus() -> None:
    r = RayNodes(GB)
    r.read([node("a", 2, address="10.0.0.1"), node("b", 2, address="10.0.0.2")])
    assert r.local_gpus((3,)) == ("b", (1,))
    assert r.local_gpus([2, 3]) == ("b", (0, 1))
    assert r.address_of("b") == "10.0.0.2"
    with pytest.raises(ValueError, match="several nodes"):
        r.local_gpus((1, 2))
    with pytest.raises(ValueError, match="no known Ray node"):
        r.local_gpus((9,))
    with pytest.raises(ValueError, match="at least one GPU"):
        r.local_gpus(())
    with pytest.raises(KeyError, match="unknown Ray node"):
        r.address_of("z")


def test_several_joining_at_once_get_ids_in_node_id_order() -> None:
    r = RayNodes(GB)
    c = r.read([node("z", 1), node("m", 1), node("a", 1)])
    assert c.nodes == {0: "a", 1: "m", 2: "z"}


def test_each_nodes_resource_names_go_to_the_scheduler_with_its_gpus() -> None:
    r = RayNodes(GB)
    c = r.read([node("a", 1, special=1.0), node("b", 1, **{"accelerator_type:H100": 1.0, "spent": 0.0}),
                node("head", None)])
    # the names with a positive amount: what the node offers at all
    assert c.resources == {"a": frozenset({"CPU", "memory", "GPU", "special"}),
                           "b": frozenset({"CPU", "memory", "GPU", "accelerator_type:H100"}),
                           "head": frozenset({"CPU", "memory"})}
    assert c.capacity() == Capacity(((0, GB), (1, GB)), ((0, "a"), (1, "b")),
                                    (("a", c.resources["a"]), ("b", c.resources["b"]), ("head", c.resources["head"])))
    # a lost node's resources leave with it; the next look says so even when no node joins or leaves
    lost = r.read([node("b", 1, **{"accelerator_type:H100": 1.0})])
    assert set(lost.resources) == {"b"} and lost.capacity().node_resources == (("b", lost.resources["b"]),)


def test_a_node_whose_resources_or_gpus_change_is_a_change_for_the_scheduler() -> None:
    r = RayNodes(GB)
    r.read([node("a", 1)])
    assert not r.read([node("a", 1)]).changed
    relabelled = r.read([node("a", 1, special=2.0)])
    assert relabelled.changed and relabelled.joined == relabelled.lost == ()
    assert "special" in relabelled.resources["a"]
    assert not r.read([node("a", 1, special=1.0)]).changed  # amounts are Ray's business: the same names
    grown = r.read([node("a", 2, special=1.0)])
    assert grown.changed and grown.nodes == {0: "a", 1: "a"}


def test_lost_nodes_stay_known_as_lost_with_their_gpus_and_the_latest_ones_only() -> None:
    r = RayNodes(GB)
    r.read([node("a", 2, special=1.0), node("b", 2, address="10.0.0.2"), node("head", None)])
    r.read([node("b", 2, address="10.0.0.2"), node("head", None)])
    known = {k.node: k for k in r.known()}
    assert set(known) == {"a", "b"}  # the head has no GPUs: not a place for a model, not listed
    assert not known["a"].alive and known["a"].gpus == (0, 1) and "special" in known["a"].resources
    assert known["b"].alive and known["b"].gpus == (2, 3) and known["b"].address == "10.0.0.2"
    r.read([node("b", 2), node("head", None), node("a", 2)])
    assert all(k.alive for k in r.known())  # back: alive again, not listed twice
    many = [node(f"n{i:02}", 1) for i in range(LOST_LISTED + 3)]
    r.read(many)
    for i in range(len(many)):  # they leave one at a time: the earliest losses drop off the list
        r.read(many[i + 1:])
    lost = [k.node for k in r.known() if not k.alive]
    assert lost == [f"n{i:02}" for i in range(3, LOST_LISTED + 3)]


def unit(name: str, gpus: tuple[int, ...], memory_gb: float, state: State = State.LOADED) -> ModelView:
    return ModelView(name=name, state=state, since=0.0, last_used=None, in_flight=0, waiting=0, memory_gb=memory_gb,
                     loads=1, failures=0, last_error=None, draining=False, pinned=False, gpus=gpus)


def test_the_per_node_view_adds_up_what_the_units_placed_there_reserve() -> None:
    r = RayNodes(GB)
    r.read([node("a", 2, address="10.0.0.1"), node("b", 2, address="10.0.0.2", special=1.0),
            node("c", 1, address="10.0.0.3")])
    r.read([node("a", 2, address="10.0.0.1"), node("b", 2, address="10.0.0.2", special=1.0)])
    views = node_views(r.known(), GB, [
        unit("tp", (0, 1), 60),  # tensor-parallel: 60 GB on each of a's GPUs
        unit("chat", (2,), 30), unit("chat@1", (2,), 20),  # two sharing one of b's GPUs
        unit("gone", (4,), 50),  # the scheduler has not heard yet that c is lost
        unit("idle", (), 10, State.UNLOADED), unit("stopped", (3,), 10, State.UNLOADED)])
    assert views == [
        {"node": "a", "address": "10.0.0.1", "alive": True, "gpus": [0, 1], "gpu_memory_gb": 2 * GB,
         "reserved_gb": 120.0, "units": ["tp"], "resources": ["CPU", "GPU", "memory"]},
        {"node": "b", "address": "10.0.0.2", "alive": True, "gpus": [2, 3], "gpu_memory_gb": 2 * GB,
         "reserved_gb": 50.0, "units": ["chat", "chat@1"], "resources": ["CPU", "GPU", "memory", "special"]},
        {"node": "c", "address": "10.0.0.3", "alive": False, "gpus": [4], "gpu_memory_gb": 0.0,
         "reserved_gb": 50.0, "units": ["gone"], "resources": ["CPU", "GPU", "memory"]},
    ]


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RayNodes(0)


def test_the_module_imports_without_ray_and_asks_for_the_extra_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # importing the module (and the package's GPU layer) must not import Ray: the local backend never needs it
    code = ("import sys, vllm_model_router.gpu, vllm_model_router.gpu.ray_nodes; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(RayUnavailable, match=r"vllm-model-router\[ray\]"):
        RayNodes(GB).snapshot()


# --- against a simulated Ray cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """One cluster for the whole file (starting one takes seconds on a small machine): a CPU-only head
    and two nodes of two GPUs."""
    with ray_cluster(f"ray-nodes-{uuid.uuid4().hex}") as c:
        c.add_node(num_gpus=2)
        c.add_node(num_gpus=2)
        yield c


def look_until(r: RayNodes, done: Any, what: str) -> Change:
    """Look at the cluster until a look satisfies ``done``; Ray may take a moment to notice a change."""
    seen: list[Change] = []

    def look() -> Change | None:
        seen.append(r.snapshot())
        return seen[-1] if done(seen[-1]) else None

    return wait_until_sync(look, 20.0, what, interval=0.1)


async def test_a_poll_reads_the_clusters_gpus_off_the_event_loop(cluster: RayCluster) -> None:
    r = RayNodes(GB)
    threads: list[str] = []
    real = r.snapshot

    def snapshot() -> Change:
        threads.append(threading.current_thread().name)
        return real()

    r.snapshot = snapshot  # type: ignore[method-assign]
    c = await r.poll()
    assert threads and threads[0] != threading.main_thread().name  # ray.nodes() blocks: not on the loop
    workers = [cluster.node_id(n) for n in cluster.cluster.worker_nodes]
    head = cluster.node_id(cluster.cluster.head_node)
    assert set(c.joined) == {head, *workers}
    assert sorted(c.budgets) == list(range(2 * len(workers))) and set(c.budgets.values()) == {GB}
    assert set(c.nodes.values()) == set(workers)  # the CPU-only head has no GPU
    assert all(r.address_of(n) == "127.0.0.1" for n in c.joined)  # everything on loopback


def test_nodes_leaving_and_joining_a_real_cluster(cluster: RayCluster) -> None:
    r = RayNodes(GB)
    first = r.snapshot()
    a, b = sorted(cluster.cluster.worker_nodes, key=cluster.node_id)
    a_id, b_id = cluster.node_id(a), cluster.node_id(b)
    head = cluster.node_id(cluster.cluster.head_node)
    assert set(first.joined) == {head, a_id, b_id} and first.lost == ()
    assert sorted(first.nodes) == [0, 1, 2, 3]
    a_gpus, b_gpus = gpus_of(first, a_id), gpus_of(first, b_id)
    assert len(a_gpus) == len(b_gpus) == 2
    assert r.local_gpus(sorted(a_gpus)) == (a_id, (0, 1))

    cluster.remove_node(a)
    lost = look_until(r, lambda c: a_id in c.lost, "the removed node reported lost")
    assert lost.joined == () and lost.lost == (a_id,)
    assert set(lost.nodes) == set(lost.budgets) == b_gpus and not r.alive(a_id)

    c_node = cluster.add_node(num_gpus=2)
    c_id = cluster.node_id(c_node)
    joined = look_until(r, lambda c: c_id in c.joined, "the added node reported joined")
    assert joined.joined == (c_id,) and joined.lost == ()
    assert gpus_of(joined, c_id) == {4, 5}  # fresh ids: a's GPUs 0-3 are never handed out again
    assert set(joined.budgets) == b_gpus | {4, 5}
    assert r.local_gpus((5,)) == (c_id, (1,))
    assert r.local_gpus(sorted(a_gpus)) == (a_id, (0, 1))  # the old placement still names the old machine


def _backend(look_s: float, alive: tuple[str, ...] = ()) -> tuple[Any, list[tuple[str, str, int]], list[str]]:
    """The Ray backend's side of a unit's exit, with no cluster to join: each look at the nodes takes
    ``look_s`` and finds none alive (``alive``: those seen before it), and its pump records what it is told.
    Returns it, what it reported ((unit, reason, looks made by then), or ("capacity", the event, ...)), and
    the threads its looks ran in."""
    from vllm_model_router.runtime.cluster import RayCluster as Backend
    from vllm_model_router.state.lifecycle import EventLog

    pytest.importorskip("ray")
    looks: list[str] = []
    reported: list[tuple[str, str, int]] = []
    nodes = RayNodes(GB)
    nodes.read([{"NodeID": n, "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"GPU": 1.0}}
                for n in alive])

    def slow_look() -> Change:
        looks.append(threading.current_thread().name)
        time.sleep(look_s)
        return nodes.read([])

    nodes.snapshot = slow_look  # type: ignore[method-assign]
    backend = Backend.__new__(Backend)
    backend.nodes, backend._reporting, backend._looking, backend._events = nodes, set(), asyncio.Lock(), EventLog()
    backend._next_look = None
    backend._pump = SimpleNamespace(
        model_exited=lambda unit, reason: reported.append((unit, reason, len(looks))),
        submit=lambda event: reported.append(("capacity", repr(event), len(looks))))
    return backend, reported, looks


async def test_a_unit_whose_actor_died_is_reported_after_a_look_at_the_nodes_off_the_event_loop() -> None:
    # the look can take long (Ray's control store busy, or gone): requests must go on meanwhile
    backend, reported, looks = _backend(0.3)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(tick())
    backend._exited("a", "its Ray actor on node n died")
    backend._exited("b", "engine on node n: exited with status 1")  # its actor lives: no look needed
    assert reported == [("b", "engine on node n: exited with status 1", 0)] and ticks == 0
    await wait_until(lambda: len(reported) == 2, 5, "the unit whose actor died to be reported")
    ticking.cancel()
    assert reported[1] == ("a", "its Ray actor on node n died", 1)  # after the look
    assert looks == [looks[0]] and looks[0] != threading.main_thread().name
    assert ticks >= 10  # the event loop went on while the look took 0.3 s


async def test_a_look_that_outlasts_the_wait_for_it_is_still_noted_when_it_comes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the unit's exit is reported without it, but what the look found (node n lost) must reach the
    # scheduler: dropped, the next look would find nothing new, and n's GPUs would stay on the books
    backend, reported, _ = _backend(0.6, alive=("n",))
    from vllm_model_router.runtime import cluster

    monkeypatch.setattr(cluster, "EXIT_LOOK_S", 0.1)
    backend._exited("a", "its Ray actor on node n died")
    await wait_until(lambda: reported, 5, "the exit to be reported")
    assert reported == [("a", "its Ray actor on node n died", 1)]  # before the look answered
    await wait_until(lambda: len(reported) == 2, 5, "what the look found to be noted")
    assert reported[1][0] == "capacity" and "gpu_memory_gb=()" in reported[1][1]
    assert [e.kind.value for e in backend._events.recent()] == ["node_lost"]


async def test_the_units_of_a_lost_node_share_one_look() -> None:
    # eight units die with their node: each must not wait for its own look behind the others' (0.3 s each)
    backend, reported, looks = _backend(0.3)
    started = time.monotonic()
    for i in range(8):
        backend._exited(f"u{i}", "its Ray actor on node n died")
    await wait_until(lambda: len(reported) == 8, 5, "every unit to be reported")
    assert len(looks) == 1 and time.monotonic() - started < 1.5
