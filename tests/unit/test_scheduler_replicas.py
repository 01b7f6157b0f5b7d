"""Replicas in the scheduler, as transcripts (event in, effects out), named after the step they exercise
like test_scheduler.py: more copies when the loaded ones are saturated, balancing by outstanding requests
and prompt prefix, extra copies first to go, and an idle extra copy stopped after ``replica_idle``."""

from __future__ import annotations

from tests.unit.scheduler_run import Run
from vllm_model_router.scheduler import (
    AdminUnload,
    Grant,
    LoadDone,
    ModelExited,
    ModelSpec,
    ReplicaPressure,
    RequestArrived,
    RequestFinished,
    SetPinned,
    SetReplicas,
    StartLoad,
    State,
    StopDone,
    StopModel,
    StopReason,
    Tick,
)


def run(models: dict[str, ModelSpec], max_resident: int = 3, **more: object) -> Run:
    return Run(models, max_resident=max_resident, **more)


def replicas(n: int = 3, *, floor: int = 0, target: int = 2, idle: float = 60.0, gb: float = 10.0,
             **more: object) -> dict[str, ModelSpec]:
    names = ["r", *(f"r@{i}" for i in range(1, n))]
    return {u: ModelSpec(gb, group="r", replica=i, replicas_min=floor, replicas_max=n, target_in_flight=target,
                         replica_idle=idle, **more) for i, u in enumerate(names)}  # type: ignore[arg-type]


def test_step4r_a_saturated_replica_brings_up_another_and_new_requests_go_to_the_least_busy() -> None:
    r = run(replicas(target=2))
    assert r.step(RequestArrived(1, "r")) == [StartLoad("r")]
    r.step(RequestArrived(2, "r"))
    r.step(RequestArrived(3, "r"))
    # three outstanding on one loaded copy, two per copy wanted: a second copy starts
    assert r.step(LoadDone("r", True)) == [Grant(1, "r"), Grant(2, "r"), Grant(3, "r"), StartLoad("r@1")]
    # a request never waits for a copy on its way in while a loaded one can take it; one start at a time
    assert r.step(RequestArrived(4, "r")) == [Grant(4, "r")]
    assert r.step(LoadDone("r@1", True)) == []  # 4 outstanding on 2 copies: not above 2 each
    assert r.step(RequestArrived(5, "r")) == [Grant(5, "r@1"), StartLoad("r@2")]  # r@1 has none: it gets it
    assert r.in_flight() == {"r": 4, "r@1": 1}
    assert r.step(RequestArrived(6, "r")) == [Grant(6, "r@1")]
    v = {v.name: v for v in r.s.view()}
    assert v["r@1"].group == "r" and v["r@1"].replica == 1 and v["r@1"].extra and not v["r"].extra


def test_step4r_never_more_than_replicas_max() -> None:
    r = run(replicas(2, target=1))
    r.step(RequestArrived(1, "r"))
    r.step(RequestArrived(2, "r"))
    assert r.step(LoadDone("r", True)) == [Grant(1, "r"), Grant(2, "r"), StartLoad("r@1")]
    r.step(LoadDone("r@1", True))
    for i in range(3, 10):
        assert [e for e in r.step(RequestArrived(i, "r")) if isinstance(e, StartLoad)] == []


def test_step2_ties_go_to_the_replica_that_last_served_the_same_prompt_prefix() -> None:
    r = run(replicas(2, target=100, floor=2))
    assert r.step(Tick()) == []  # kept replicas come in once the shell starts the model (after recovery)
    assert r.step(SetReplicas("r", 2, trim=False)) == [StartLoad("r"), StartLoad("r@1")]
    r.step(LoadDone("r", True))
    r.step(LoadDone("r@1", True))
    assert r.step(RequestArrived(1, "r", affinity=7)) == [Grant(1, "r")]  # a tie, no history: the first copy
    r.step(RequestFinished(1))
    assert r.step(RequestArrived(2, "r", affinity=9)) == [Grant(2, "r")]
    assert r.step(RequestArrived(3, "r", affinity=9)) == [Grant(3, "r@1")]  # fewest outstanding wins over it
    r.step(RequestFinished(2))
    r.step(RequestFinished(3))
    assert r.step(RequestArrived(4, "r", affinity=9)) == [Grant(4, "r@1")]  # tie: r@1 served prefix 9 last
    assert r.step(RequestArrived(5, "r", affinity=7)) == [Grant(5, "r")]


def test_step5_an_idle_extra_replica_stops_after_replica_idle_and_the_kept_one_stays() -> None:
    r = run(replicas(2, target=1, idle=60.0))
    r.step(RequestArrived(1, "r"))
    r.step(RequestArrived(2, "r"))
    assert r.step(LoadDone("r", True)) == [Grant(1, "r"), Grant(2, "r"), StartLoad("r@1")]
    r.step(LoadDone("r@1", True), at=1)
    r.step(RequestFinished(1), at=2)
    r.step(RequestFinished(2), at=2)
    assert r.timers[-1] == 61.0  # r@1 was never used: its idle clock runs from its load
    assert r.step(Tick(), at=60.9) == []
    assert r.step(Tick(), at=61.0) == [StopModel("r@1", StopReason.SCALE_DOWN, "extra replica idle for 60s")]
    assert r.step(StopDone("r@1"), at=63) == []
    assert r.s.state_of("r") is State.LOADED  # no ttl: the kept copy stays
    assert r.step(Tick(), at=1000) == []


def test_step4b_a_newcomer_takes_an_idle_extra_replica_before_anything_else() -> None:
    r = run({**replicas(2, target=1), "b": ModelSpec(10), "c": ModelSpec(10)}, max_resident=3)
    r.step(RequestArrived(1, "b"), at=0)
    r.step(LoadDone("b", True))
    r.step(RequestFinished(1), at=1)  # b: least recently used
    r.step(RequestArrived(2, "r"), at=2)
    r.step(RequestArrived(3, "r"), at=2)
    assert r.step(LoadDone("r", True), at=2) == [Grant(2, "r"), Grant(3, "r"), StartLoad("r@1")]
    r.step(LoadDone("r@1", True), at=3)
    r.step(RequestArrived(4, "r"), at=4)  # r@1 takes it and so is more recently used than b
    for req in (2, 3, 4):
        r.step(RequestFinished(req), at=5)
    # three resident (b, r, r@1), and c needs a slot: the extra copy goes, not b, used longer ago
    assert r.step(RequestArrived(5, "c"), at=6) == [StopModel("r@1", StopReason.LRU, "evicted to make room for c")]


def test_step4r_an_extra_replica_evicts_only_idle_models_nobody_waits_for() -> None:
    r = run({**replicas(2, target=1), "b": ModelSpec(10)}, max_resident=2)
    r.step(RequestArrived(1, "b"))
    r.step(LoadDone("b", True))  # b is busy with request 1
    r.step(RequestArrived(2, "r"))
    r.step(RequestArrived(3, "r"))
    assert r.step(LoadDone("r", True)) == [Grant(2, "r"), Grant(3, "r")]  # no room: b is busy
    assert r.step(RequestFinished(1), at=1) == [StopModel("b", StopReason.LRU,
                                                          "evicted to make room for another replica of r")]
    assert r.step(StopDone("b"), at=2) == [StartLoad("r@1")]


def test_step4r_no_extra_replica_while_another_models_request_waits_for_room() -> None:
    r = run({**replicas(2, target=1), "b": ModelSpec(10), "c": ModelSpec(10)}, max_resident=2)
    r.step(RequestArrived(1, "b"))
    r.step(LoadDone("b", True))
    r.step(RequestArrived(2, "r"))
    r.step(RequestArrived(3, "r"))
    r.step(LoadDone("r", True))
    assert r.step(RequestArrived(4, "c"), at=1) == []  # c waits for b or r to drain
    # b becomes idle: the room goes to c, the queued request, not to another copy of r
    assert r.step(RequestFinished(1), at=2) == [StopModel("b", StopReason.LRU, "evicted to make room for c")]
    assert r.step(StopDone("b"), at=3) == [StartLoad("c")]


def test_step4r_engines_saturated_bring_up_another_replica_below_target_in_flight() -> None:
    r = run(replicas(2, target=32))
    r.step(RequestArrived(1, "r"))
    assert r.step(LoadDone("r", True)) == [Grant(1, "r")]
    assert r.step(ReplicaPressure("r", True)) == [StartLoad("r@1")]
    r.step(LoadDone("r@1", True))
    assert r.step(ReplicaPressure("r", False)) == []


def test_step0_an_operator_sets_the_replicas_kept() -> None:
    r = run(replicas(3, target=100), max_resident=3)
    r.step(RequestArrived(1, "r"))
    r.step(LoadDone("r", True))
    assert r.step(SetReplicas("r", 2)) == [StartLoad("r@1")]  # kept: pinned and brought in
    r.step(LoadDone("r@1", True))
    assert {v.name for v in r.s.view() if v.pinned} == {"r", "r@1"}
    assert r.step(RequestArrived(2, "r")) == [Grant(2, "r@1")]  # fewest outstanding
    # down to one: the busy copy beyond it drains (stops once idle)
    assert r.step(SetReplicas("r", 1)) == []
    assert r.step(RequestArrived(3, "r")) == [Grant(3, "r")]  # r@1 takes no new requests
    assert r.step(RequestFinished(2)) == [StopModel("r@1", StopReason.OPERATOR, "unloaded by operator")]
    assert r.step(StopDone("r@1")) == []
    assert r.step(SetReplicas("r", 9)) == [StartLoad("r@1"), StartLoad("r@2")]  # clamped to max 3
    assert {v.name for v in r.s.view() if v.pinned} == {"r", "r@1", "r@2"}


def test_step0_a_replica_that_fails_to_load_leaves_the_waiters_to_the_others() -> None:
    r = run(replicas(2, target=1))
    r.step(RequestArrived(1, "r"))
    r.step(RequestArrived(2, "r"))
    assert r.step(LoadDone("r", True)) == [Grant(1, "r"), Grant(2, "r"), StartLoad("r@1")]
    assert r.step(LoadDone("r@1", False, "out of memory"), at=1) == []  # no retry at once, nobody rejected
    assert r.step(RequestArrived(3, "r"), at=2) == [Grant(3, "r")]
    assert r.step(RequestArrived(4, "r"), at=31) == [Grant(4, "r"), StartLoad("r@1")]  # tried again later


def test_step4r_kept_replicas_an_operator_unloads_stay_out_until_the_next_request() -> None:
    r = run(replicas(2, floor=2, target=100))
    assert r.step(SetReplicas("r", 2, trim=False)) == [StartLoad("r"), StartLoad("r@1")]
    r.step(LoadDone("r", True))
    r.step(LoadDone("r@1", True))
    assert r.step(AdminUnload("r")) == [StopModel("r", StopReason.OPERATOR, "unloaded by operator"),
                                        StopModel("r@1", StopReason.OPERATOR, "unloaded by operator")]
    r.step(StopDone("r"))
    assert r.step(StopDone("r@1")) == []  # not brought straight back
    assert r.step(RequestArrived(1, "r")) == [StartLoad("r"), StartLoad("r@1")]  # in use again: both kept


def test_step0_scaling_down_keeps_the_copies_that_serve_and_scaling_up_again_cancels_the_drain() -> None:
    r = run(replicas(3, target=100))
    assert r.step(SetReplicas("r", 3)) == [StartLoad("r"), StartLoad("r@1"), StartLoad("r@2")]
    for u in ("r", "r@1", "r@2"):
        r.step(LoadDone(u, True))
    r.step(ModelExited("r", "crashed"))  # the first copy is gone; the others serve
    for req in (1, 2):
        r.step(RequestArrived(req, "r"))
    assert r.in_flight() == {"r@1": 1, "r@2": 1}
    # down to one: a copy that serves is kept (not the failed first one), the other drains
    assert r.step(SetReplicas("r", 1)) == []
    assert {v.name for v in r.s.view() if v.pinned} == {"r@1"}
    assert r.step(RequestArrived(3, "r")) == [Grant(3, "r@1")]  # served at once, not held back
    # back to three before the drain ends: nothing is stopped, and the crashed copy comes back (not at once:
    # a copy that just failed is not restarted for 30 s)
    assert r.step(SetReplicas("r", 3)) == []
    assert r.step(RequestFinished(2)) == []
    assert r.step(RequestArrived(4, "r")) == [Grant(4, "r@2")]
    assert r.step(Tick(), at=30) == [StartLoad("r")]


def test_step0_unpinning_a_kept_copy_leaves_it_kept() -> None:
    r = run(replicas(2, floor=2, target=100))
    r.step(SetReplicas("r", 2, trim=False))
    r.step(LoadDone("r", True))
    r.step(LoadDone("r@1", True))
    r.step(SetPinned("r", False))
    assert {v.name for v in r.s.view() if v.pinned} == {"r", "r@1"}
    assert r.step(Tick(), at=1000) == []  # neither is an idle extra copy


def test_step4r_one_copy_at_a_time_on_saturation_until_it_is_seen_again() -> None:
    r = run(replicas(3, target=100))
    r.step(RequestArrived(1, "r"))
    r.step(LoadDone("r", True))
    assert r.step(ReplicaPressure("r", True)) == [StartLoad("r@1")]
    assert r.step(LoadDone("r@1", True)) == []  # not a cascade to max: the new copy must be seen saturated
    assert r.step(ReplicaPressure("r", True)) == [StartLoad("r@2")]


def test_step9_a_kept_copy_that_failed_to_load_is_tried_again_by_the_timer() -> None:
    r = run(replicas(2, floor=2, target=100))
    assert r.step(SetReplicas("r", 2, trim=False)) == [StartLoad("r"), StartLoad("r@1")]
    r.step(LoadDone("r", True))
    assert r.step(LoadDone("r@1", False, "boom"), at=2) == []
    assert 32.0 in r.timers
    assert r.step(Tick(), at=32) == [StartLoad("r@1")]
