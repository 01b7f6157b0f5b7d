"""GPUs on several machines (nodes), and models on more than one GPU (tensor parallelism): a model with
``gpu_count`` k is placed on k GPUs of one node, those with the most memory free, and evicts only what
frees memory there."""

from __future__ import annotations

from collections.abc import Container

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.scheduler_run import Run
from tests.unit.test_scheduler_properties import PlansEveryPass
from vllm_model_router.scheduler import (
    AdminUnload,
    Capacity,
    Effect,
    Event,
    GpuUsage,
    Grant,
    LoadDone,
    ModelExited,
    ModelFound,
    ModelSpec,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
    SleepDone,
    SleepModel,
    StartLoad,
    StopDone,
    StopModel,
    StopReason,
    Tick,
    TimerAt,
    WakeDone,
    WakeModel,
)
from vllm_model_router.scheduler.eviction import (
    Budget,
    Candidate,
    FreeOrder,
    Occupant,
    Usage,
    _choose_general,
    choose_placement,
    plan_eviction,
)
from vllm_model_router.scheduler.passes import Pass
from vllm_model_router.scheduler.records import ModelRecord, Waiter

# two nodes of two 80 GB GPUs: GPUs 0 and 1 on "a", 2 and 3 on "b"
NODES = {0: "a", 1: "a", 2: "b", 3: "b"}
BUDGETS = {g: 80.0 for g in NODES}


def cluster(**models: ModelSpec) -> Run:
    return Run(models, max_resident=10, gpu_memory_gb=BUDGETS, gpu_nodes=NODES)


def loaded_then_idle(r: Run, names: str) -> None:
    """Each of ``names`` (one letter each) requested at second i, loaded, and idle again at i + 0.5."""
    for i, name in enumerate(names):
        r.step(RequestArrived(i, name), at=i)
        r.step(LoadDone(name, True))
        r.step(RequestFinished(i), at=i + 0.5)


def test_a_tensor_parallel_model_goes_on_gpus_of_one_node() -> None:
    r = cluster(small=ModelSpec(60), tp=ModelSpec(60, gpu_count=2))
    assert r.step(RequestArrived(1, "small")) == [StartLoad("small", (0,))]
    r.step(LoadDone("small", True))
    # node a has one GPU with 20 GB free: both GPUs of node b
    assert r.step(RequestArrived(2, "tp")) == [StartLoad("tp", (2, 3))]
    assert r.step(LoadDone("tp", True)) == [Grant(2, "tp")]
    assert {v.name: v.gpus for v in r.s.view() if v.gpus} == {"small": (0,), "tp": (2, 3)}


def test_it_evicts_on_one_node_only_what_frees_its_gpus() -> None:
    r = cluster(x=ModelSpec(60), y=ModelSpec(60), z=ModelSpec(60), w=ModelSpec(60),
                tp=ModelSpec(60, gpu_count=2))
    loaded_then_idle(r, "xyzw")
    # every GPU holds one model; x (GPU 0) and y (GPU 1) are the least recently used, on node a
    assert {v.name: v.gpus for v in r.s.view() if v.gpus} == {"x": (0,), "y": (1,), "z": (2,), "w": (3,)}
    assert r.step(RequestArrived(9, "tp"), at=10) == [
        StopModel("x", StopReason.LRU, "evicted to make room for tp"),
        StopModel("y", StopReason.LRU, "evicted to make room for tp")]
    r.step(StopDone("x"))
    assert r.step(StopDone("y")) == [StartLoad("tp", (0, 1))]


def test_a_model_no_node_can_hold_is_refused_at_once() -> None:
    r = cluster(huge=ModelSpec(60, gpu_count=4))
    assert r.step(RequestArrived(1, "huge")) == [
        Reject(1, "huge", 503, "Failed to load model huge: needs 4 GPUs on one machine; no machine has that many")]


def test_a_model_that_needs_node_resources_goes_only_where_they_are() -> None:
    # node b offers "accelerator_type:H100"; node a does not, and has the most room
    r = cluster(h100=ModelSpec(60, needs=frozenset({"accelerator_type:H100"})), any=ModelSpec(60))
    r.s.handle(Capacity(tuple(BUDGETS.items()), tuple(NODES.items()),
                        (("a", frozenset()), ("b", frozenset({"accelerator_type:H100", "CPU"})))), 0.0)
    assert r.step(RequestArrived(1, "any")) == [StartLoad("any", (0,))]
    r.step(LoadDone("any", True))
    assert r.step(RequestArrived(2, "h100")) == [StartLoad("h100", (2,))]


def test_a_model_whose_resources_no_node_offers_is_refused_at_once_and_placed_when_one_joins() -> None:
    r = cluster(h100=ModelSpec(60, needs=frozenset({"accelerator_type:H100"})))
    assert r.step(RequestArrived(1, "h100")) == [Reject(
        1, "h100", 503, "Failed to load model h100: needs a node with the resources accelerator_type:H100; "
        "no node has them")]
    out = r.step(Capacity(tuple(BUDGETS.items()), tuple(NODES.items()),
                          (("b", frozenset({"accelerator_type:H100"})),)))
    assert out == []
    assert r.step(RequestArrived(2, "h100")) == [StartLoad("h100", (2,))]


def test_a_cluster_with_no_gpu_node_refuses_loads_at_once_and_places_them_when_a_node_joins() -> None:
    # the router came up before any GPU node joined (a KubeRay head whose workers are still starting), or
    # every node was lost: no GPU exists, so nothing can be placed. Not "place it nowhere in particular",
    # as on a machine without GPUs: that start had no node to go to.
    r = Run({"x": ModelSpec(40), "tp": ModelSpec(40, gpu_count=2)}, max_resident=10, gpu_memory_gb={},
            gpu_nodes={})
    assert r.step(RequestArrived(1, "x")) == [Reject(
        1, "x", 503, "Failed to load model x: no node of the cluster has a GPU now (none has joined yet, or "
        "every one was lost)")]
    assert [type(e) for e in r.step(RequestArrived(2, "tp"))] == [Reject]
    assert r.step(Capacity(((0, 80.0), (1, 80.0)), ((0, "a"), (1, "a")))) == []
    assert r.step(RequestArrived(3, "tp")) == [StartLoad("tp", (0, 1))]
    assert r.step(RequestArrived(4, "x")) == [StartLoad("x", (0,))]


def test_every_node_lost_fails_the_waiting_loads_at_once() -> None:
    r = cluster(x=ModelSpec(60), y=ModelSpec(60), z=ModelSpec(60), w=ModelSpec(60), v=ModelSpec(60))
    for i, name in enumerate("xyzw"):
        r.step(RequestArrived(i, name))
        r.step(LoadDone(name, True))  # every GPU busy
    assert r.step(RequestArrived(9, "v")) == []  # waits for room
    out = r.step(Capacity((), ()))
    assert Reject(9, "v", 503, "Failed to load model v: no node of the cluster has a GPU now (none has joined "
                               "yet, or every one was lost)") in out
    assert not [e for e in out if isinstance(e, StartLoad)]


def test_a_tensor_parallel_model_that_needs_resources_evicts_only_on_nodes_that_offer_them() -> None:
    r = Run({"x": ModelSpec(60), "y": ModelSpec(60), "z": ModelSpec(60), "w": ModelSpec(60),
             "tp": ModelSpec(60, gpu_count=2, needs=frozenset({"fast"}))}, max_resident=10,
            gpu_memory_gb=BUDGETS, gpu_nodes=NODES, node_resources={"a": (), "b": ("fast",)})
    loaded_then_idle(r, "xyzw")
    # x and y (node a) are the least recently used, but tp may only go on node b: z and w make room
    assert r.step(RequestArrived(9, "tp"), at=10) == [
        StopModel("z", StopReason.LRU, "evicted to make room for tp"),
        StopModel("w", StopReason.LRU, "evicted to make room for tp")]


def test_a_node_that_leaves_takes_its_gpus_and_one_that_joins_gives_room() -> None:
    r = cluster(x=ModelSpec(60), y=ModelSpec(60), z=ModelSpec(60))
    for i, name in enumerate("xy"):
        r.step(RequestArrived(i, name))
        r.step(LoadDone(name, True))  # x on GPU 0 (node a), y on GPU 1 (node a): both busy
    # node b leaves: its GPUs are gone, and z waits for room on node a instead of going there
    assert r.step(Capacity(((0, 80.0), (1, 80.0)), ((0, "a"), (1, "a")))) == []
    assert r.step(RequestArrived(2, "z")) == []
    # a node c joins with two fresh GPUs: z goes there at once
    out = r.step(Capacity(((0, 80.0), (1, 80.0), (4, 80.0), (5, 80.0)),
                          ((0, "a"), (1, "a"), (4, "c"), (5, "c"))))
    assert out == [StartLoad("z", (4,))]
    assert r.step(LoadDone("z", True)) == [Grant(2, "z")]


# ---------------------------------------------------------------- one walk for placements that share no GPU
occupants = st.lists(st.tuples(st.sampled_from([10.0, 20.0, 30.0, 40.0, 70.0]),
                               st.lists(st.integers(0, 5), min_size=1, max_size=2, unique=True),
                               st.sampled_from([None, 1.0, 5.0])), max_size=12)


Placed = list[tuple[float, list[int], float | None]]  # memory, GPUs, and what it keeps asleep (None: no sleep)


def _world(held: Placed, idle: Placed, caps: list[float]) -> tuple[Usage, list[Candidate], Budget]:
    """What holds capacity (``held`` and the ``idle`` candidates), the candidates, and the GPUs' budgets."""
    occupied = Usage.of(Occupant(f"h{i}", gb, tuple(gpus)) for i, (gb, gpus, _) in enumerate(held))
    cands = [Candidate(Occupant(f"c{i}", gb, tuple(gpus)),
                       None if asleep is None else Occupant(f"c{i}", asleep, tuple(gpus), counts=False))
             for i, (gb, gpus, asleep) in enumerate(idle)]
    for c in cands:
        occupied.add(c.occupant)
    return occupied, cands, Budget(100, None, dict(enumerate(caps)))


@given(need=st.sampled_from([10.0, 30.0, 60.0, 80.0]), held=occupants, idle=occupants,
       caps=st.lists(st.sampled_from([40.0, 80.0]), min_size=6, max_size=6),
       options=st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True))
def test_one_gpu_placement_decides_as_the_general_one(
        need: float, held: list[tuple[float, list[int], float | None]],
        idle: list[tuple[float, list[int], float | None]], caps: list[float], options: list[int]) -> None:
    """The cluster's fast way (one walk of the candidates for every GPU) against the general one (a walk
    per GPU): the same placement and the same victims, always."""
    occupied, cands, budget = _world(held, idle, caps)
    opts = [(g,) for g in options]
    assert choose_placement(need, occupied, iter(cands), budget, opts) == \
        _choose_general(need, occupied, iter(cands), budget, opts)


@given(need=st.sampled_from([10.0, 30.0, 60.0, 80.0]),
       held=st.lists(st.tuples(st.sampled_from([10.0, 20.0, 40.0, 70.0]),
                               st.lists(st.integers(0, 7), min_size=1, max_size=3, unique=True),
                               st.sampled_from([None, 1.0, 5.0])), max_size=14),
       idle=st.lists(st.tuples(st.sampled_from([10.0, 20.0, 40.0, 70.0]),
                               st.lists(st.integers(0, 7), min_size=1, max_size=3, unique=True),
                               st.sampled_from([None, 1.0, 5.0])), max_size=14),
       caps=st.lists(st.sampled_from([40.0, 80.0]), min_size=8, max_size=8),
       groups=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True), min_size=1, max_size=5),
       disjoint=st.booleans())
def test_multi_gpu_placement_decides_as_the_general_one(
        need: float, held: list[tuple[float, list[int], float | None]],
        idle: list[tuple[float, list[int], float | None]], caps: list[float], groups: list[list[int]],
        disjoint: bool) -> None:
    """Options of several GPUs each (a tensor-parallel model: the freest GPUs of each node), which may
    share GPUs (then the general way is taken): the same placement and victims as the general way."""
    occupied, cands, budget = _world(held, idle, caps)
    if disjoint:  # one option per node, as the scheduler makes them: no GPU in two
        seen: set[int] = set()
        for group in groups:
            group[:] = [g for g in group if g not in seen]
            seen.update(group)
    opts = list(dict.fromkeys(tuple(sorted(g)) for g in groups if g))
    assert choose_placement(need, occupied, iter(cands), budget, opts) == \
        _choose_general(need, occupied, iter(cands), budget, opts)


@given(need=st.sampled_from([10.0, 20.0, 30.0, 60.0, 79.9, 80.0]),
       held=st.lists(st.tuples(st.sampled_from([10.0, 20.0, 30.0, 40.0, 70.0, 0.1]), st.integers(0, 11)), max_size=16),
       changes=st.lists(st.tuples(st.sampled_from([-30.0, -10.0, 10.0, 20.0, 0.3]), st.integers(0, 11)), max_size=4),
       caps=st.lists(st.sampled_from([40.0, 80.0, 79.9]), min_size=12, max_size=12))
def test_the_free_order_finds_the_best_fit_a_full_read_finds(
        need: float, held: list[tuple[float, int]], changes: list[tuple[float, int]], caps: list[float]) -> None:
    """The order made once (``FreeOrder``) and asked about a usage that differs on a few GPUs (what earlier
    loads reserved) answers as reading every GPU does."""
    budget = Budget(100, None, dict(enumerate(caps)))
    base = Usage.of(Occupant(f"h{i}", gb, (g,)) for i, (gb, g) in enumerate(held))
    order = FreeOrder(base, budget, budget.gpu_memory_gb)
    usage = base.copy()
    for gb, g in changes:
        usage.add(Occupant("r", gb, (g,)))
    placement, victims = choose_placement(need, usage, [], budget, [(g,) for g in sorted(budget.gpu_memory_gb)])
    assert order.best_fit(need, usage, budget, {g for _, g in changes}) == (placement if victims == [] else None)


@given(held=st.lists(st.tuples(st.sampled_from([10.0, 20.0, 30.0, 40.0, 70.0, 0.1]), st.integers(0, 11)), max_size=16),
       moves=st.lists(st.tuples(st.sampled_from([-30.0, -10.0, 10.0, 20.0, 0.3]), st.integers(0, 11)), max_size=6),
       caps=st.lists(st.sampled_from([40.0, 80.0, 79.9]), min_size=12, max_size=12))
def test_a_free_order_kept_across_moves_is_the_one_made_afresh(
        held: list[tuple[float, int]], moves: list[tuple[float, int]], caps: list[float]) -> None:
    """``FreeOrder.update`` with the GPUs models moved on leaves the order a new one would have: every need
    gets the same best fit."""
    budget = Budget(100, None, dict(enumerate(caps)))
    usage = Usage.of(Occupant(f"h{i}", gb, (g,)) for i, (gb, g) in enumerate(held))
    kept = FreeOrder(usage, budget, budget.gpu_memory_gb)
    for gb, g in moves:
        usage.add(Occupant("m", gb, (g,)))
    kept.update(usage, budget, [g for _, g in moves])
    fresh = FreeOrder(usage, budget, budget.gpu_memory_gb)
    for need in (0.1, 10.0, 20.0, 40.0, 60.0, 80.0):
        assert kept.best_fit(need, usage, budget, ()) == fresh.best_fit(need, usage, budget, ())


def test_loads_that_evict_on_different_gpus_swap_at_the_same_time() -> None:
    r = cluster(x=ModelSpec(60), y=ModelSpec(60), z=ModelSpec(60), w=ModelSpec(60),
                n1=ModelSpec(60), n2=ModelSpec(60))
    loaded_then_idle(r, "xyzw")
    # every GPU is full; n1 evicts x (the least recently used), and n2, behind it, evicts y at once
    # instead of waiting for n1's swap to end
    assert r.step(RequestArrived(10, "n1"), at=10) == [StopModel("x", StopReason.LRU, "evicted to make room for n1")]
    assert r.step(RequestArrived(11, "n2"), at=11) == [StopModel("y", StopReason.LRU, "evicted to make room for n2")]
    # each starts in the room it evicted for, as soon as that room is free
    assert r.step(StopDone("y")) == [StartLoad("n2", (1,))]
    assert r.step(StopDone("x")) == [StartLoad("n1", (0,))]


def test_a_later_load_never_takes_the_room_an_earlier_one_evicted_for() -> None:
    # one node of two GPUs: big evicts x on GPU 0; small, behind it, would fit in that room and must not
    # take it: it makes its own room on GPU 1 instead
    r = Run({"x": ModelSpec(60), "y": ModelSpec(60), "big": ModelSpec(70), "small": ModelSpec(50)},
            max_resident=10, gpu_memory_gb={0: 80.0, 1: 80.0}, gpu_nodes={0: "a", 1: "a"})
    loaded_then_idle(r, "xy")
    assert r.step(RequestArrived(10, "big"), at=10) == [StopModel("x", StopReason.LRU, "evicted to make room for big")]
    # while x stops, small arrives: GPU 0's room is big's, so small evicts y on GPU 1
    assert r.step(RequestArrived(11, "small"), at=10.5) == [
        StopModel("y", StopReason.LRU, "evicted to make room for small")]
    assert r.step(StopDone("x"), at=11) == [StartLoad("big", (0,))]
    assert r.step(StopDone("y"), at=11.5) == [StartLoad("small", (1,))]


class CountsPlans(Scheduler):
    """The scheduler, noting every load step 4 plans (``_plan_one``)."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.planned: list[str] = []

    def _plan_one(self, p: Pass, target: ModelRecord, first: Waiter) -> bool:
        self.planned.append(target.name)
        return super()._plan_one(p, target, first)


def _counting(r: Run) -> CountsPlans:
    s = CountsPlans(r.s.config)
    r.s = s
    return s


def test_a_load_waiting_in_its_room_is_not_planned_again_while_nothing_moves_there() -> None:
    r = cluster(x=ModelSpec(60), y=ModelSpec(60), z=ModelSpec(60), w=ModelSpec(60),
                n1=ModelSpec(60), n2=ModelSpec(60))
    s = _counting(r)
    loaded_then_idle(r, "xyzw")
    assert r.step(RequestArrived(10, "n1"), at=10) == [StopModel("x", StopReason.LRU, "evicted to make room for n1")]
    assert r.step(RequestArrived(11, "n2"), at=11) == [StopModel("y", StopReason.LRU, "evicted to make room for n2")]
    # requests served on GPU 2 move nothing in their rooms: step 4 runs (a request came and went); n2,
    # which evicted in the last pass, is planned once more to find it waiting in its room, and from then
    # on neither load is planned again
    s.planned.clear()
    assert r.step(RequestArrived(12, "z"), at=12) == [Grant(12, "z")]
    assert s.planned == ["n2"]
    s.planned.clear()
    assert r.step(RequestFinished(12), at=12.5) == []
    assert r.step(RequestArrived(13, "z"), at=12.6) == [Grant(13, "z")]
    assert s.planned == []
    # x gone from GPU 0: n1 is planned again and starts; n2, on GPU 1 and with the same room reserved
    # before it, is not
    assert r.step(StopDone("x"), at=13) == [StartLoad("n1", (0,))]
    assert s.planned == ["n1"]
    assert r.step(StopDone("y"), at=14) == [StartLoad("n2", (1,))]


def test_a_load_whose_room_was_reserved_before_it_is_planned_again_when_that_load_leaves() -> None:
    # one GPU: a evicts x, b behind it evicts y; both wait for the same GPU, b next to a's reservation
    r = Run({"x": ModelSpec(40), "y": ModelSpec(40), "a": ModelSpec(40), "b": ModelSpec(40)},
            max_resident=10, gpu_memory_gb={0: 80.0}, gpu_nodes={0: "a"})
    s = _counting(r)
    loaded_then_idle(r, "xy")
    assert r.step(RequestArrived(10, "a"), at=10) == [StopModel("x", StopReason.LRU, "evicted to make room for a")]
    assert r.step(RequestArrived(11, "b"), at=11) == [StopModel("y", StopReason.LRU, "evicted to make room for b")]
    s.planned.clear()
    assert r.step(RequestArrived(12, "b"), at=12) == []
    assert s.planned == ["a", "b"]  # (y stopping is a move on a's GPU since a was planned; b evicted last pass)
    s.planned.clear()
    assert r.step(RequestArrived(13, "b"), at=12.5) == []
    assert s.planned == []  # (nothing moved, nothing left)
    # a's only waiter leaves: nothing moves on the GPU, but what is reserved before b there changed
    assert r.step(RequestCancelled(10), at=13) == []
    assert s.planned == ["b"]  # (and planning it again finds it waits for its room still)
    assert r.step(StopDone("x"), at=14) == [StartLoad("b", (0,))]


def test_a_change_in_how_steadily_another_model_is_used_does_not_plan_a_load_waiting_in_its_room_again() -> None:
    # n1 waits for x to leave GPU 0; z, on GPU 1, turns from steady use to occasional (how long it is
    # protected from eviction changes): nothing n1's room depends on
    r = Run({"x": ModelSpec(60), "z": ModelSpec(60), "n1": ModelSpec(60)}, max_resident=10,
            gpu_memory_gb={0: 80.0, 1: 80.0}, gpu_nodes={0: "a", 1: "a"}, keep_idle=60)
    s = _counting(r)
    loaded_then_idle(r, "x")
    assert r.step(RequestArrived(1, "z"), at=1) == [StartLoad("z", (1,))]
    r.step(LoadDone("z", True), at=3)  # (a load of 2 s: in steady use while its gap is under 6.5 of them)
    r.step(RequestFinished(1), at=3.5)
    r.step(RequestArrived(2, "z"), at=4)
    r.step(RequestFinished(2), at=4.5)
    assert r.step(RequestArrived(10, "n1"), at=10) == [StopModel("x", StopReason.LRU, "evicted to make room for n1")]
    r.step(RequestArrived(3, "z"), at=10.2)  # (n1, which evicted in the last pass, is found waiting in its room)
    r.step(RequestFinished(3), at=10.3)
    assert r.s._steady(r.s._models["z"])
    s.planned.clear()
    assert r.step(RequestArrived(4, "z"), at=60) == [Grant(4, "z")]
    assert not r.s._steady(r.s._models["z"])
    assert r.step(RequestFinished(4), at=60.5) == []  # (a pass that moves nothing on GPU 0)
    assert s.planned == []
    assert r.step(StopDone("x"), at=61) == [StartLoad("n1", (0,))]


def test_a_load_found_blocked_is_planned_again_when_its_own_waiters_stop_coming_steadily() -> None:
    # b waits behind a (kept 1.5 s after each use, keep_idle), protected against b while b's requests come
    # steadily (6.5 of a's 10 s loads after b's first request: to 65.7); when they stop doing so (a gap of
    # 21.5 s, over 6.5 of b's own reloads of 1.5 / 4 s), a lone newcomer waits one of a's loads (to 10.7),
    # long past: a is evicted at once, though nothing moved on its GPU, and no protection there ran out,
    # since b was last found blocked
    r = Run({"a": ModelSpec(60), "b": ModelSpec(60)}, max_resident=10, gpu_memory_gb={0: 80.0},
            gpu_nodes={0: "n"}, keep_idle=1.5, max_wait=1000, load_timeout=2000)
    assert r.step(RequestArrived(1, "a"), at=-20) == [StartLoad("a", (0,))]
    r.step(LoadDone("a", True), at=-10)
    r.step(RequestFinished(1), at=-9.5)
    t, req = -9.0, 100
    while t <= 22:  # a in steady use, idle from each x.5 to x + 1
        r.step(RequestArrived(req, "a"), at=t)
        r.step(RequestFinished(req), at=t + 0.5)
        if t == 0.0:
            assert r.step(RequestArrived(2, "b"), at=0.7) == []
            assert r.step(RequestArrived(3, "b"), at=1.2) == []
        t, req = t + 1, req + 1
    assert r.s._steady(r.s._models["b"])
    assert r.step(RequestArrived(4, "b"), at=22.7) == [StopModel("a", StopReason.LRU, "evicted to make room for b")]
    assert not r.s._steady(r.s._models["b"])


class CountsReserved(CountsPlans):
    """The scheduler, noting every load step 4 plans and every room it reserves (``_reserve``)."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.reserved: list[str] = []

    def _reserve(self, p: Pass, target: ModelRecord, placement: tuple[int, ...], need: float) -> None:
        self.reserved.append(target.name)
        super()._reserve(p, target, placement, need)


def test_a_model_falling_idle_plans_again_only_from_the_load_found_blocked() -> None:
    # GPU 0: n1 waits for x to leave; GPU 1: y and z serve, and b, behind n1, is blocked behind them
    r = Run({"x": ModelSpec(60), "n1": ModelSpec(60), "y": ModelSpec(40), "z": ModelSpec(40), "b": ModelSpec(60)},
            max_resident=10, gpu_memory_gb={0: 80.0, 1: 80.0}, gpu_nodes={0: "a", 1: "a"})
    s = CountsReserved(r.s.config)
    r.s = s
    loaded_then_idle(r, "x")
    assert r.step(RequestArrived(1, "y"), at=1) == [StartLoad("y", (1,))]
    r.step(LoadDone("y", True), at=1)
    assert r.step(RequestArrived(2, "z"), at=1) == [StartLoad("z", (1,))]
    r.step(LoadDone("z", True), at=1)
    assert r.step(RequestArrived(10, "n1"), at=10) == [StopModel("x", StopReason.LRU, "evicted to make room for n1")]
    assert r.step(RequestArrived(11, "b"), at=11) == []
    s.planned.clear()
    s.reserved.clear()
    # z falls idle: b is looked at again (evicting z would not be enough), n1's room is not
    assert r.step(RequestFinished(2), at=12) == []
    assert (s.planned, s.reserved) == (["b"], [])
    # y falls idle too: b evicts both
    assert r.step(RequestFinished(1), at=13) == [StopModel("z", StopReason.LRU, "evicted to make room for b"),
                                                 StopModel("y", StopReason.LRU, "evicted to make room for b")]
    assert s.reserved == ["b"]
    assert r.step(StopDone("x"), at=14) == [StartLoad("n1", (0,))]


def test_a_load_queued_behind_a_load_found_blocked_plans_nothing_again() -> None:
    # b is blocked behind y and z (busy on GPU 1; GPU 0 is n1's room); c's first request joins the queue
    # behind b: no load overtakes a blocked one, so the walk, which stopped at b, would decide the same
    r = Run({"x": ModelSpec(60), "n1": ModelSpec(60), "y": ModelSpec(40), "z": ModelSpec(40), "b": ModelSpec(60),
             "c": ModelSpec(20)}, max_resident=10, gpu_memory_gb={0: 80.0, 1: 80.0}, gpu_nodes={0: "a", 1: "a"})
    s = CountsReserved(r.s.config)
    r.s = s
    loaded_then_idle(r, "x")
    for req, name in ((1, "y"), (2, "z")):
        assert r.step(RequestArrived(req, name), at=1) == [StartLoad(name, (1,))]
        r.step(LoadDone(name, True), at=1)
    assert r.step(RequestArrived(10, "n1"), at=10) == [StopModel("x", StopReason.LRU, "evicted to make room for n1")]
    assert r.step(RequestArrived(11, "b"), at=11) == []
    s.planned.clear()
    s.reserved.clear()
    assert r.step(RequestArrived(12, "c"), at=12) == []
    assert (s.planned, s.reserved) == ([], [])
    # y and z fall idle: b evicts them, and c, behind it, fits next to n1 once x has gone
    r.step(RequestFinished(2), at=13)
    assert r.step(RequestFinished(1), at=13.5) == [StopModel("z", StopReason.LRU, "evicted to make room for b"),
                                                   StopModel("y", StopReason.LRU, "evicted to make room for b")]
    assert r.step(StopDone("x"), at=14) == [StartLoad("n1", (0,)), StartLoad("c", (0,))]


def test_a_load_found_blocked_looks_again_at_a_node_whose_freest_gpus_changed() -> None:
    # tp (2 x 60 GB) goes on its node's two freest GPUs: 1 and 2, where y serves; w, found running on GPU 1,
    # makes them 0 and 2, untouched since, where x and z are idle: tp evicts them
    r = Run({"x": ModelSpec(70), "y": ModelSpec(40), "z": ModelSpec(40), "w": ModelSpec(40),
             "tp": ModelSpec(60, gpu_count=2)}, max_resident=10, gpu_memory_gb={0: 80.0, 1: 80.0, 2: 80.0},
            gpu_nodes={0: "a", 1: "a", 2: "a"})
    for name, gpu in (("x", 0), ("y", 1), ("z", 2)):
        r.step(ModelFound(name, (gpu,)), at=0)
    assert r.step(RequestArrived(1, "y"), at=1) == [Grant(1, "y")]
    assert r.step(RequestArrived(2, "tp"), at=2) == []
    assert r.step(ModelFound("w", (1,)), at=3) == [StopModel("x", StopReason.LRU, "evicted to make room for tp"),
                                                   StopModel("z", StopReason.LRU, "evicted to make room for tp")]


def _decides_as_planning_in_full(models: dict[str, ModelSpec], steps: list[tuple[float, Event]],
                                 **config: object) -> list[list[Effect]]:
    """What the scheduler emits for ``steps``, timers included, checked against planning every pass in full."""
    out: list[list[list[Effect]]] = []
    load_timeout, max_wait = config.pop("load_timeout", 600.0), config.pop("max_wait", 30.0)
    for kind in (Scheduler, PlansEveryPass):
        s = kind(SchedulerConfig(models, 10, None, load_timeout, max_wait,  # type: ignore[arg-type]
                                 **{"keep_idle": 0.0, **config}))  # type: ignore[arg-type]
        out.append([s.handle(event, at) for at, event in steps])
    for (at, event), mine, full in zip(steps, *out, strict=True):
        assert mine == full, f"{event} at {at}: {mine}, planning in full {full}"
    return out[0]


THREE_GPUS = {"gpu_memory_gb": {0: 80.0, 1: 80.0, 2: 80.0}, "gpu_nodes": {0: "n", 1: "n", 2: "n"}}
ONE_ADAPTER_EACH = {"B1": ModelSpec(60, max_adapters=1), "B2": ModelSpec(60, max_adapters=1), "z": ModelSpec(60),
                    "b": ModelSpec(60), "x1": ModelSpec(1, base="B1"), "y2": ModelSpec(1, base="B2"),
                    "ad": ModelSpec(1, base="B1", group="ad", replica=0, replicas_max=2),
                    "ad@1": ModelSpec(1, base="B2", group="ad", replica=1, replicas_max=2)}
# B1, B2 and z loaded; x1 idle on B1, y2 serving on B2 (each base has one adapter slot); ad's copy on B1 evicts x1
BEFORE_AD = [(0.0, RequestArrived(1, "B1")), (0.0, LoadDone("B1", True)), (0.0, RequestArrived(2, "B2")),
             (0.0, LoadDone("B2", True)), (0.0, RequestArrived(3, "z")), (0.0, LoadDone("z", True)),
             (0.0, RequestFinished(1)), (0.0, RequestFinished(2)), (1.0, RequestArrived(4, "x1")),
             (1.0, LoadDone("x1", True)), (1.5, RequestFinished(4)), (2.0, RequestArrived(5, "y2")),
             (2.0, LoadDone("y2", True)), (10.0, RequestArrived(10, "ad"))]


def test_a_model_falling_idle_may_change_which_copy_of_an_adapter_a_walk_started_again_brings_in() -> None:
    # ad waits for x1 to leave B1; b, behind it, is blocked. y2 falling idle on B2 makes ad's copy there
    # the one brought in (an engine where room can be made at once): the loads before b decide otherwise
    out = _decides_as_planning_in_full(ONE_ADAPTER_EACH, [*BEFORE_AD, (11, RequestArrived(11, "b")),
                                                          (12, RequestArrived(12, "b")), (13, RequestFinished(5))],
                                       **THREE_GPUS)
    assert StopModel("y2", StopReason.LRU, "evicted to make room for ad@1") in out[-1]


def test_a_model_falling_idle_may_change_which_copy_of_an_adapter_a_kept_decision_brings_in() -> None:
    out = _decides_as_planning_in_full(ONE_ADAPTER_EACH, [*BEFORE_AD, (11, RequestArrived(11, "ad")),
                                                          (12, RequestArrived(12, "ad")), (13, RequestFinished(5))],
                                       **THREE_GPUS)
    assert StopModel("y2", StopReason.LRU, "evicted to make room for ad@1") in out[-1]


@pytest.mark.parametrize("last", [RequestArrived(12, "A1"), RequestArrived(13, "d")])
def test_a_drain_that_step_7_starts_is_read_by_the_next_pass_of_step_4(last: Event) -> None:
    # A1 is blocked behind busy a0 (its base B has one adapter slot), c queued behind it; an operator's
    # unload drains B, which admits no new adapter request: A1 waits for the drain, c goes in
    models = {"B": ModelSpec(60, max_adapters=1), "a0": ModelSpec(1, base="B"), "A1": ModelSpec(1, base="B"),
              "c": ModelSpec(60), "d": ModelSpec(10)}
    out = _decides_as_planning_in_full(models, [
        (0, RequestArrived(1, "B")), (0, LoadDone("B", True)), (0, RequestFinished(1)), (1, RequestArrived(2, "a0")),
        (1, LoadDone("a0", True)), (10, RequestArrived(10, "A1")), (11, RequestArrived(11, "c")),
        (12, AdminUnload("B")), (13, last)], gpu_memory_gb={0: 80.0, 1: 80.0}, gpu_nodes={0: "n", 1: "n"})
    assert StartLoad("c", (1,)) in out[-1]


PROTECTED = {"x": ModelSpec(60), "B": ModelSpec(60), "a1": ModelSpec(1, base="B"),
             "a2": ModelSpec(1, base="B", priority=1)}
ONE_GPU_KEPT = {"gpu_memory_gb": {0: 80.0}, "gpu_nodes": {0: "n"}, "keep_idle": 60.0, "max_wait": 1000.0,
                "load_timeout": 2000.0}


def test_a_load_found_blocked_for_one_adapter_is_planned_again_for_another_that_comes_first() -> None:
    # x in steady use, protected; B waits for a1's waiters (steady: x protected to 18.5), then for a2's
    # (higher priority, a lone request: x protected one of its loads after it, to 14)
    out = _decides_as_planning_in_full(PROTECTED, [
        (-2, RequestArrived(1, "x")), (0, LoadDone("x", True)), (0.5, RequestFinished(1)),
        (5, RequestArrived(2, "x")), (5.5, RequestFinished(2)), (10, RequestArrived(3, "x")),
        (10.5, RequestFinished(3)), (11, RequestArrived(10, "a1")), (11.5, RequestArrived(11, "a1")),
        (12, RequestArrived(12, "a2")), (14, Tick())], **ONE_GPU_KEPT)
    assert out[-1][0] == StopModel("x", StopReason.LRU, "evicted to make room for B")


def test_a_load_found_blocked_reads_the_steadiness_of_its_waiter_now_first() -> None:
    # B, found blocked for a2's waiters, waits for a1's once a2's are cancelled; a1 turning occasional
    # (x protected against it only to 17.1) lets B evict x at once
    steps: list[tuple[float, Event]] = [
        (0, RequestArrived(1, "a1")), (1, LoadDone("B", True)), (1.1, LoadDone("a1", True)),  # (a 0.1 s load)
        (1.2, RequestFinished(1)), (1.3, AdminUnload("B")), (1.4, StopDone("B")),
        (2, RequestArrived(2, "x")), (4, LoadDone("x", True)), (4.5, RequestFinished(2)),
        (9, RequestArrived(3, "x")), (9.5, RequestFinished(3)), (14, RequestArrived(4, "x")),
        (14.5, RequestFinished(4)), (15.0, RequestArrived(20, "a2")), (15.05, RequestArrived(21, "a2"))]
    steps += [(round(15.1 + 0.1 * i, 2), RequestArrived(30 + i, "a1")) for i in range(11)]  # a1 steady
    steps += [(16.2, RequestCancelled(20)), (16.2, RequestCancelled(21)), (19, RequestArrived(50, "a1"))]
    out = _decides_as_planning_in_full(PROTECTED, steps, **ONE_GPU_KEPT)
    assert StopModel("x", StopReason.LRU, "evicted to make room for B") in out[-1]


def test_a_load_waiting_next_to_a_reservation_starts_at_once_when_that_load_leaves() -> None:
    # one GPU: a evicts x and waits for its room; b fits next to it once x is gone, and waits too
    r = Run({"x": ModelSpec(40), "a": ModelSpec(50), "b": ModelSpec(30)}, max_resident=10,
            gpu_memory_gb={0: 80.0}, gpu_nodes={0: "a"})
    loaded_then_idle(r, "x")
    assert r.step(RequestArrived(10, "a"), at=10) == [StopModel("x", StopReason.LRU, "evicted to make room for a")]
    assert r.step(RequestArrived(11, "b"), at=11) == []
    assert r.step(RequestArrived(12, "b"), at=12) == []
    # a's only waiter leaves: x still stops, but b fits next to it now that a reserves nothing
    assert r.step(RequestCancelled(10), at=13) == [StartLoad("b", (0,))]


def _as_planning_in_full(specs: dict[str, ModelSpec], gpus: int, max_resident: int,
                         steps: list[tuple[float, Event]], before: str = "",
                         busy: str = "") -> list[list[object]]:
    """What the scheduler emits for ``steps`` (after ``busy`` loaded and serving, then ``before`` loaded then
    idle, in that order, one per GPU), checked against the two planners that plan every load in full on
    every pass."""
    out = []
    for kind in (Scheduler, PlansEveryPass, ReadsEveryOption):
        r = Run(specs, max_resident=max_resident, gpu_memory_gb={g: 80.0 for g in range(gpus)},
                gpu_nodes={g: "a" for g in range(gpus)})
        r.s = kind(r.s.config)
        for i, name in enumerate(busy):
            r.step(RequestArrived(100 + i, name), at=0)
            r.step(LoadDone(name, True), at=0)
        if before:
            loaded_then_idle(r, before)
        out.append([r.step(event, at=at) for at, event in steps])
    assert out[0] == out[1] == out[2], f"{out[0]} / {out[1]} / {out[2]}"
    return out[0]


def test_a_load_waiting_next_to_a_base_brought_in_for_an_adapter_starts_when_that_load_leaves() -> None:
    # the base's room is reserved before b's though the base is no load kept for its own waiters
    got = _as_planning_in_full({"x": ModelSpec(40), "B": ModelSpec(50), "ad": ModelSpec(1.0, base="B"),
                                "b": ModelSpec(30)}, 1, 10,
                               [(10, RequestArrived(10, "ad")), (11, RequestArrived(11, "b")),
                                (12, RequestArrived(12, "b")), (13, RequestCancelled(10))], before="x")
    assert got[-1] == [StartLoad("b", (0,))]


def test_a_load_waiting_next_to_a_replica_starts_when_that_replica_leaves() -> None:
    got = _as_planning_in_full({"x": ModelSpec(40), "R": ModelSpec(50, group="R", replica=0, replicas_max=2),
                                "R@1": ModelSpec(50, group="R", replica=1, replicas_max=2), "b": ModelSpec(30)},
                               1, 10, [(10, RequestArrived(10, "R")), (11, RequestArrived(11, "b")),
                                       (12, RequestArrived(12, "b")), (13, RequestCancelled(10))], before="x")
    assert got[-1] == [StartLoad("b", (0,))]


def test_a_base_an_adapter_brought_in_first_is_not_reserved_twice_for_its_own_waiter() -> None:
    # B waits in its room on GPU 0; ad (priority 1) plans B first in the pass; c fits next to one B
    got = _as_planning_in_full({"x": ModelSpec(60), "v": ModelSpec(60), "B": ModelSpec(40),
                                "ad": ModelSpec(1.0, base="B", priority=1), "c": ModelSpec(30)}, 2, 10,
                               [(10, RequestArrived(10, "B")), (11, RequestArrived(11, "ad")),
                                (12, RequestArrived(12, "c"))], before="xv")
    assert got[-1] == []


def test_a_load_planned_as_if_other_processes_were_not_there_is_planned_again_each_pass() -> None:
    # others hold 20 GB of each GPU: big (70) fits on none, so it is planned on the nominal budget and
    # evicts x; y gone empties GPU 1, where it fits at once
    got = _as_planning_in_full({"x": ModelSpec(50), "y": ModelSpec(50), "big": ModelSpec(70)}, 2, 10,
                               [(5, GpuUsage(((0, 20.0), (1, 20.0)))), (10, RequestArrived(10, "big")),
                                (11, ModelExited("y", "gone"))], before="xy")
    assert got[-1] == [StartLoad("big", (1,))]


def test_a_load_found_waiting_while_the_count_bound_is_planned_again_when_the_count_frees() -> None:
    # z busy, p q v idle; A1 and A2 evict p and q; w's place is over the count then (4 held, 2 reserved);
    # A1's and A2's waiters time out together, which moves nothing on w's GPU
    got = _as_planning_in_full({"z": ModelSpec(60), "p": ModelSpec(60), "q": ModelSpec(60), "v": ModelSpec(60),
                                "A1": ModelSpec(60), "A2": ModelSpec(60), "w": ModelSpec(20)}, 4, 6,
                               [(10, RequestArrived(10, "A1")), (10.1, RequestArrived(11, "A2")),
                                (11, RequestArrived(12, "w")), (610.2, Tick())], before="pqv", busy="z")
    assert got[-1][-1] == StartLoad("w", (0,))


# ---------------------------------------------------------------- a cluster's shortcuts against planning in full
CLUSTER_MODELS = {**{f"m{i}": ModelSpec(gb) for i, gb in enumerate((40.0, 70.0, 40.0, 70.0, 20.0, 70.0, 40.0))},
                  "t0": ModelSpec(70.0, gpu_count=2), "t1": ModelSpec(40.0, gpu_count=2),
                  "t2": ModelSpec(70.0, gpu_count=2)}


class ReadsEveryOption(PlansEveryPass):
    """Planning in full the plain way: every GPU read for a best fit (no ``FreeOrder``, kept or made
    again), and room made by ``_choose_general`` over every option with every candidate (no options left
    out, no floors, no candidates read per GPU, no walk that stops early), and each node's freest GPUs for a
    model of several GPUs found afresh for every load."""

    def _options(self, m: ModelRecord) -> list[tuple[int, ...]]:
        self._option_cache.clear()
        return super()._options(m)

    def _free_fit(self, staying: bool, need: float, usage: Usage, budget: Budget, options: list[tuple[int, ...]],
                  target: ModelRecord, reserved: Usage | None) -> tuple[bool, tuple[int, ...] | None]:
        return False, None

    def _make_room(self, need: float, staying: Usage, target: ModelRecord, hot: Container[str], budget: Budget,
                   options: list[tuple[int, ...]], on: tuple[int, ...] | None = None,
                   fits_nowhere: bool = False) -> tuple[tuple[int, ...], list[str] | None, bool]:
        def choose(sleep: bool) -> tuple[tuple[int, ...], list[str] | None]:
            candidates = self._candidates(target.base, target, sleep=sleep, hot=hot, on=on)
            if not options:
                return (), plan_eviction(need, staying, candidates, budget)
            return _choose_general(need, staying, candidates, budget, options)

        placement, victims = choose(True)
        if victims is None:
            return (*choose(False), False)
        return placement, victims, True


SLEEPY = {**{f"s{i}": ModelSpec(gb, sleep_level=1, sleeping_gb=2.0) for i, gb in enumerate((40.0, 70.0, 20.0))},
          "f0": ModelSpec(30.0, gpus=(0,)), "f1": ModelSpec(30.0, gpus=(2, 9)),
          # (sizes that leave a GPU where the largest model alone would make room, but is not the first)
          "u0": ModelSpec(20.0), "u1": ModelSpec(60.0), "u2": ModelSpec(10.0),
          # (a base brought in for an adapter's waiters, and a replicated model: loads that reserve room
          # without being kept from pass to pass)
          "ad": ModelSpec(1.0, base="m1"), "R": ModelSpec(40.0, group="R", replica=0, replicas_max=2),
          "R@1": ModelSpec(40.0, group="R", replica=1, replicas_max=2)}


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 20), st.sampled_from([0.0, 0.5, 3.0])),
                    min_size=40, max_size=150),
       keep_idle=st.sampled_from([0.0, 10.0]), tight=st.booleans())
def test_on_a_cluster_the_shortcuts_decide_as_planning_in_full(ops: list[tuple[int, int, float]],
                                                               keep_idle: float, tight: bool) -> None:
    """One-GPU and two-GPU models, requests that come and go, memory that other processes take and give back,
    on three nodes of two GPUs, or (``tight``) on nodes of four, four and two GPUs with a count that binds,
    models that sleep, models on fixed GPUs, an adapter and a replicated model: the
    scheduler with its shortcuts (a kept step 4, a load found blocked looked at again only where GPUs were
    touched, rooms, a kept order of the GPUs by free memory, options where no eviction could make room
    left out, floors on the victims, candidates read per GPU) and one planning in full the plain way emit
    the same effects and show the same models after every event."""
    n = 10 if tight else 6
    gpus = {g: 80.0 for g in range(n)}
    nodes = {g: ("aaaabbbbcc" if tight else "aabbcc")[g] for g in range(n)}  # (a node's freest two change)
    models = {**CLUSTER_MODELS, **SLEEPY} if tight else CLUSTER_MODELS
    cfg = SchedulerConfig(models, 5 if tight else 20, None, 600.0, 30.0, gpu_memory_gb=gpus, gpu_nodes=nodes,
                          keep_idle=keep_idle)
    fast, full = Scheduler(cfg), ReadsEveryOption(cfg)
    names = sorted({spec.group or name for name, spec in models.items()})
    now, next_id = 0.0, 1
    granted: list[int] = []
    asked: list[int] = []
    gone: set[int] = set()  # (cancelled, or granted and finished)
    pending: list[Event] = []  # what the engines will answer: a load, a stop, a sleep or a wake done

    def both(event: Event) -> None:
        a, b = fast.handle(event, now), full.handle(event, now)
        assert [e for e in a if not isinstance(e, TimerAt)] == [e for e in b if not isinstance(e, TimerAt)], \
            f"{event} at {now}: {a} vs {b}"
        assert fast.view() == full.view()
        for e in a:
            if isinstance(e, Grant):
                granted.append(e.req_id)
            elif isinstance(e, StartLoad):
                pending.append(LoadDone(e.model, True))
            elif isinstance(e, StopModel):
                pending.append(StopDone(e.model))
            elif isinstance(e, SleepModel):
                pending.append(SleepDone(e.model, True))
            elif isinstance(e, WakeModel):
                pending.append(WakeDone(e.model, True))

    for kind, i, dt in ops:
        now += dt
        if kind <= 2:  # (arrivals outnumber the rest: the GPUs fill with busy models, and loads block)
            both(RequestArrived(next_id, names[i % len(names)]))
            asked.append(next_id)
            next_id += 1
        elif kind == 3 and i % 3 == 0 and (waiting := [q for q in asked if q not in granted and q not in gone]):
            gone.add(waiting[i % len(waiting)])  # (a client gives up on a request that waits for its load)
            both(RequestCancelled(waiting[i % len(waiting)]))
        elif kind == 3 and granted:
            gone.add(done := granted.pop(i % len(granted)))
            both(RequestFinished(done))
        elif kind in (4, 5, 6) and pending:
            both(pending.pop(i % len(pending)))
        elif i % 6 == 0:  # (none of a GPU's memory, or 20 GB of it, held by others: a 70 GB model fits nowhere)
            both(GpuUsage(((i % n, 20.0 * (i % 12 == 0)), ((i + 1) % n, 20.0))))
        else:
            both(Tick())


def test_a_load_a_hair_over_a_gpu_with_nothing_to_evict_waits() -> None:
    # over an empty GPU by less than the bound's margin: the bound let it through and then looked for the
    # sizes of models there, never filed (a KeyError out of the scheduler, on every pass after)
    r = Run({"big": ModelSpec(80.0000005)}, max_resident=10, gpu_memory_gb={0: 80.0}, gpu_nodes={0: "a"})
    assert r.step(RequestArrived(1, "big")) == []
    assert r.step(Tick(), at=1.0) == []


def test_the_log_of_moves_stays_bounded_without_best_fit_questions() -> None:
    # only two-GPU models: no load asks for a one-GPU best fit, so no kept order ever reads the log
    r = cluster(a=ModelSpec(60, gpu_count=2), b=ModelSpec(60, gpu_count=2), c=ModelSpec(60, gpu_count=2))
    pending: list[Event] = [RequestArrived(0, "a")]
    for i in range(6000):
        while pending:
            for e in r.step(pending.pop(0), at=i):
                if isinstance(e, StartLoad):
                    pending.append(LoadDone(e.model, True))
                elif isinstance(e, StopModel):
                    pending.append(StopDone(e.model))
        r.step(RequestFinished(i), at=i + 0.5)
        pending.append(RequestArrived(i + 1, "abc"[(i + 1) % 3]))
    assert r.s.view() and 0 < len(r.s._moved_on) <= 8192


def test_one_victim_is_a_plan_only_where_it_is_the_first_that_frees_memory() -> None:
    # GPU 0 holds a (20 GB, least recently used) and b (60); GPU 1 holds c (60) and d (20). x (60) could fit
    # on either by evicting its 60 GB model alone, but eviction takes the least recently used first: a helps
    # on GPU 0, so a plan there is a and b, and c alone on GPU 1 is the plan of fewest victims
    specs = {"a": ModelSpec(20), "b": ModelSpec(60), "c": ModelSpec(60), "d": ModelSpec(20), "x": ModelSpec(60)}
    gpus = {0: 80.0, 1: 80.0}
    r = Run(specs, max_resident=10, gpu_memory_gb=gpus, gpu_nodes={0: "a", 1: "a"})
    full = Run(specs, max_resident=10, gpu_memory_gb=gpus, gpu_nodes={0: "a", 1: "a"})
    full.s = ReadsEveryOption(full.s.config)
    for run in (r, full):
        loaded_then_idle(run, "abcd")
    assert {v.name: v.gpus for v in r.s.view() if v.gpus} == {"a": (0,), "b": (0,), "c": (1,), "d": (1,)}
    evict = [StopModel("c", StopReason.LRU, "evicted to make room for x")]
    assert r.step(RequestArrived(9, "x"), at=10) == evict == full.step(RequestArrived(9, "x"), at=10)
    assert r.step(StopDone("c")) == [StartLoad("x", (1,))] == full.step(StopDone("c"))


def test_one_victim_reads_every_gpu_once_it_has_read_as_many_models_as_gpus() -> None:
    # x (70 GB) fits on none of four GPUs. The one-victim walk checks a GPU only when it reaches a model
    # there, until it has read four models; then every GPU. d (70, alone on GPU 2) is the first model that
    # makes room alone, read fifth. GPU 1 is watched from the second read on (h is busy, c would do), so a
    # walk that checked only the GPUs of the models it read would pass d over and take c
    specs = {"a": ModelSpec(40), "h": ModelSpec(10), "b": ModelSpec(40), "e": ModelSpec(40), "d": ModelSpec(70),
             "c": ModelSpec(70), "f": ModelSpec(40), "x": ModelSpec(70)}
    gpus, nodes = {g: 80.0 for g in range(4)}, {g: "n" for g in range(4)}
    fast = Run(specs, max_resident=20, gpu_memory_gb=gpus, gpu_nodes=nodes)
    full = Run(specs, max_resident=20, gpu_memory_gb=gpus, gpu_nodes=nodes)
    full.s = ReadsEveryOption(full.s.config)
    order = (("a", 0), ("h", 1), ("b", 0), ("e", 3), ("d", 2), ("c", 1), ("f", 3))  # least recently used first
    for r in (fast, full):
        for name, g in order:
            r.step(ModelFound(name, (g,)), at=0)
        for i, (name, _) in enumerate(order):
            r.step(RequestArrived(i, name), at=1 + i)
            if name != "h":  # (h stays busy: it cannot go, and does not keep c from being a plan alone)
                r.step(RequestFinished(i), at=1.5 + i)
    evict = [StopModel("d", StopReason.LRU, "evicted to make room for x")]
    assert fast.step(RequestArrived(9, "x"), at=10) == evict == full.step(RequestArrived(9, "x"), at=10)
    assert fast.step(StopDone("d")) == [StartLoad("x", (2,))] == full.step(StopDone("d"))


def _both(models: dict[str, ModelSpec], max_resident: int) -> tuple[Run, Run]:
    """The scheduler and the plain reference on two 80 GB GPUs of one node, no idle protection."""
    gpus, nodes = {0: 80.0, 1: 80.0}, {0: "n", 1: "n"}
    fast = Run(models, max_resident=max_resident, max_wait=300.0, gpu_memory_gb=gpus, gpu_nodes=nodes)
    full = Run(models, max_resident=max_resident, max_wait=300.0, gpu_memory_gb=gpus, gpu_nodes=nodes)
    full.s = ReadsEveryOption(full.s.config)
    return fast, full


def _two_busy(r: Run, first: str, second: str) -> None:
    """``first`` and ``second`` loaded, each serving a request (1 and 2) still in flight."""
    r.step(RequestArrived(1, first), at=0)
    r.step(LoadDone(first, True), at=1)
    r.step(RequestArrived(2, second), at=1)
    r.step(LoadDone(second, True), at=2)


def test_a_load_blocked_by_the_count_is_planned_in_full_when_a_model_leaves_elsewhere() -> None:
    # t was blocked because the count bound (a and c busy on GPU 0, room on GPU 1): a model leaving GPU 0
    # frees the place it lacked, and GPU 1 must be read again, not only the GPU touched
    fast, full = _both({"a": ModelSpec(40.0), "c": ModelSpec(40.0), "t": ModelSpec(50.0)}, max_resident=2)
    for r in (fast, full):
        _two_busy(r, "a", "c")
        assert r.step(RequestArrived(3, "t"), at=3) == []
    assert fast.step(ModelExited("a", "gone", False), at=4) == [StartLoad("t", (1,))] \
        == full.step(ModelExited("a", "gone", False), at=4)


def test_a_load_planned_on_the_nominal_budget_is_not_checked_again_on_the_reduced_one() -> None:
    # other processes take 20 GB of each GPU: t (70) fits nowhere even empty, so it is planned as if they were
    # not there (a 503 at start names them); a model falling idle must then be evicted for it
    fast, full = _both({"r": ModelSpec(70.0), "s": ModelSpec(70.0), "t": ModelSpec(70.0)}, max_resident=10)
    for r in (fast, full):
        _two_busy(r, "r", "s")
        assert r.step(RequestArrived(3, "t"), at=3) == []
        assert r.step(GpuUsage(((0, 20.0), (1, 20.0))), at=4) == []
    evict = [StopModel("r", StopReason.LRU, "evicted to make room for t")]
    assert fast.step(RequestFinished(1), at=5) == evict == full.step(RequestFinished(1), at=5)


def test_a_blocked_load_of_several_gpus_is_planned_in_full_when_its_node_s_freest_gpus_change() -> None:
    # t (70 GB on each of two GPUs) is blocked on its node's freest pair, GPUs 0 and 1, by a busy A. X found
    # running on GPU 0 makes GPUs 1 and 2 the freest pair: neither was touched, and both hold only idle
    # models that can go. The finding was about another pair: planning in full must follow
    specs = {"A": ModelSpec(30.0), "B": ModelSpec(30.0), "C": ModelSpec(40.0), "D": ModelSpec(30.0),
             "E": ModelSpec(40.0), "F": ModelSpec(30.0), "X": ModelSpec(45.0), "t": ModelSpec(70.0, gpu_count=2)}
    gpus, nodes = {g: 80.0 for g in range(4)}, {g: "n" for g in range(4)}
    fast = Run(specs, max_resident=20, max_wait=300.0, gpu_memory_gb=gpus, gpu_nodes=nodes)
    full = Run(specs, max_resident=20, max_wait=300.0, gpu_memory_gb=gpus, gpu_nodes=nodes)
    full.s = ReadsEveryOption(full.s.config)
    for r in (fast, full):
        for name, g in (("A", 0), ("B", 1), ("C", 2), ("D", 2), ("E", 3), ("F", 3)):
            r.step(ModelFound(name, (g,)), at=0)
        for i, name in enumerate("AEF"):  # busy: A on GPU 0, E and F on GPU 3
            assert r.step(RequestArrived(i, name), at=0) == [Grant(i, name)]
        assert r.step(RequestArrived(9, "t"), at=1) == []
    out = fast.step(ModelFound("X", (0,)), at=2)
    assert out == full.step(ModelFound("X", (0,)), at=2)
    assert {e.model for e in out if isinstance(e, StopModel)} == {"B", "C", "D"}


def test_one_victim_for_several_gpus_counts_only_models_on_the_gpus_it_lacks() -> None:
    # t needs 70 GB on both GPUs of a node. On node a, GPU 0 has room already and GPU 1 lacks it; P on GPU 0
    # is the least recently used but frees nothing t lacks, so Q alone is the plan there, before R (one
    # model on both GPUs of node b) would be
    specs = {"P": ModelSpec(10.0), "Q": ModelSpec(40.0), "R": ModelSpec(40.0, gpu_count=2),
             "t": ModelSpec(70.0, gpu_count=2)}
    gpus, nodes = {g: 80.0 for g in range(4)}, {0: "a", 1: "a", 2: "b", 3: "b"}
    fast = Run(specs, max_resident=20, gpu_memory_gb=gpus, gpu_nodes=nodes)
    full = Run(specs, max_resident=20, gpu_memory_gb=gpus, gpu_nodes=nodes)
    full.s = ReadsEveryOption(full.s.config)
    for r in (fast, full):
        for name, placed in (("P", (0,)), ("Q", (1,)), ("R", (2, 3))):
            r.step(ModelFound(name, placed), at=0)
        for i, name in enumerate("PQR"):  # used in that order: P the least recently
            r.step(RequestArrived(i, name), at=1 + i)
            r.step(RequestFinished(i), at=1.5 + i)
    evict = [StopModel("Q", StopReason.LRU, "evicted to make room for t")]
    assert fast.step(RequestArrived(9, "t"), at=10) == evict == full.step(RequestArrived(9, "t"), at=10)
    assert fast.step(StopDone("Q")) == [StartLoad("t", (0, 1))] == full.step(StopDone("Q"))


def test_a_base_two_adapters_wait_for_is_planned_once_per_pass() -> None:
    # x and y are adapters of B, which is out: both waiters want B. Planned twice in one pass, B's second
    # plan saw the room its first had reserved as taken, evicted Q too, and its room moved on every pass
    specs = {"P": ModelSpec(60.0), "Q": ModelSpec(60.0), "R": ModelSpec(60.0), "B": ModelSpec(50.0),
             "x": ModelSpec(1.0, base="B"), "y": ModelSpec(1.0, base="B")}
    r = Run(specs, max_resident=10, gpu_memory_gb={0: 80.0, 1: 80.0, 2: 80.0}, gpu_nodes={0: "n", 1: "n", 2: "n"})
    for name, g in (("P", 0), ("Q", 1), ("R", 2)):
        r.step(ModelFound(name, (g,)), at=0)
    assert r.step(RequestArrived(1, "x"), at=1) == [StopModel("P", StopReason.LRU, "evicted to make room for B")]
    assert r.step(RequestArrived(2, "y"), at=1) == []
    assert r.step(Tick(), at=2) == [] and r.step(Tick(), at=3) == []
    assert r.step(StopDone("P"), at=4) == [StartLoad("B", (0,))]
