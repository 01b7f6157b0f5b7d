"""GPUs on several machines (nodes), and models on more than one GPU (tensor parallelism): a model with
``gpu_count`` k is placed on k GPUs of one node, those with the most memory free, and evicts only what
frees memory there."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.scheduler_run import Run
from vllm_model_router.scheduler import (
    Capacity,
    Grant,
    LoadDone,
    ModelSpec,
    Reject,
    RequestArrived,
    RequestFinished,
    StartLoad,
    StopDone,
    StopModel,
    StopReason,
)
from vllm_model_router.scheduler.eviction import Budget, Candidate, Occupant, Usage, _choose_general, choose_placement

# two nodes of two 80 GB GPUs: GPUs 0 and 1 on "a", 2 and 3 on "b"
NODES = {0: "a", 1: "a", 2: "b", 3: "b"}
BUDGETS = {g: 80.0 for g in NODES}


def cluster(**models: ModelSpec) -> Run:
    return Run(models, max_resident=10, gpu_memory_gb=BUDGETS, gpu_nodes=NODES)


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
    for i, name in enumerate("xyzw"):
        r.step(RequestArrived(i, name), at=i)
        r.step(LoadDone(name, True))
        r.step(RequestFinished(i), at=i + 0.5)
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


# ---------------------------------------------------------------- one walk for one-GPU placements
occupants = st.lists(st.tuples(st.sampled_from([10.0, 20.0, 30.0, 40.0, 70.0]),
                               st.lists(st.integers(0, 5), min_size=1, max_size=2, unique=True),
                               st.sampled_from([None, 1.0, 5.0])), max_size=12)


@given(need=st.sampled_from([10.0, 30.0, 60.0, 80.0]), held=occupants, idle=occupants,
       caps=st.lists(st.sampled_from([40.0, 80.0]), min_size=6, max_size=6),
       options=st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True))
def test_one_gpu_placement_decides_as_the_general_one(
        need: float, held: list[tuple[float, list[int], float | None]],
        idle: list[tuple[float, list[int], float | None]], caps: list[float], options: list[int]) -> None:
    """The cluster's fast way (one walk of the candidates for every GPU) against the general one (a walk
    per GPU): the same placement and the same victims, always."""
    occupied = Usage.of(Occupant(f"h{i}", gb, tuple(gpus)) for i, (gb, gpus, _) in enumerate(held))
    cands = [Candidate(Occupant(f"c{i}", gb, tuple(gpus)),
                       None if asleep is None else Occupant(f"c{i}", asleep, tuple(gpus), counts=False))
             for i, (gb, gpus, asleep) in enumerate(idle)]
    for c in cands:
        occupied.add(c.occupant)
    budget = Budget(100, None, dict(enumerate(caps)))
    opts = [(g,) for g in options]
    assert choose_placement(need, occupied, iter(cands), budget, opts) == \
        _choose_general(need, occupied, iter(cands), budget, opts)
