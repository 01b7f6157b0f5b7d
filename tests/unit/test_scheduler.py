"""Scheduler scenarios, event by event, with a fake clock. Read as transcripts: event in, effects out.

Each test is named after the step of the scheduler's decision it exercises, numbered as in
scheduler/core.py and docs/DESIGN.md: ``test_step0_`` what an event does by itself, ``test_step1_`` to
``test_step9_`` the steps of the planning pass that follows it. The first sections go in step order;
the later ones gather adapters, GPUs, sleep mode and lifecycle policies, each test still named by step.
"""

from __future__ import annotations

import pytest

from tests.unit.scheduler_run import Run
from vllm_model_router.scheduler import (
    AdminUnload,
    GpuUsage,
    Grant,
    LoadDone,
    ModelExited,
    ModelFound,
    ModelSpec,
    Preload,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
    SetPinned,
    SleepDone,
    SleepModel,
    StartLoad,
    State,
    StopDone,
    StopModel,
    StopReason,
    Tick,
    TimerAt,
    WakeDone,
    WakeModel,
)

# why a model is stopped or put to sleep (StopModel.reason, SleepModel.reason), short for the transcripts
HOST_BUDGET = StopReason.HOST_BUDGET
LOAD_TIMEOUT = StopReason.LOAD_TIMEOUT
LRU = StopReason.LRU
OPERATOR = StopReason.OPERATOR
OPERATOR_FORCED = StopReason.OPERATOR_FORCED
OVER_CAPACITY = StopReason.OVER_CAPACITY
TTL = StopReason.TTL
SLEEP_FAILED = StopReason.SLEEP_FAILED
WAKE_FAILED = StopReason.WAKE_FAILED


# ---------------------------------------------------------------- (0) the event itself
def test_step0_cancelled_waiter_does_not_cancel_the_load_for_others() -> None:
    r = Run()
    r.step(RequestArrived(1, "a"))
    r.step(RequestArrived(2, "a"))
    assert r.step(RequestCancelled(1)) == []
    assert r.s.state_of("a") is State.LOADING
    assert r.step(LoadDone("a", True)) == [Grant(2, "a")]


def test_step0_failed_load_rejects_waiters_with_503_and_next_request_retries() -> None:
    r = Run()
    r.step(RequestArrived(1, "a"))
    r.step(RequestArrived(2, "a"))
    out = r.step(LoadDone("a", False, "process exited with code 1. Last log lines:\nboom"))
    assert [type(e) for e in out] == [Reject, Reject]
    assert all(isinstance(e, Reject) and e.status == 503 and "boom" in e.message for e in out)
    assert r.s.state_of("a") is State.FAILED
    assert r.s.view()[0].last_error is not None
    assert r.step(RequestArrived(3, "a")) == [StartLoad("a")]


def test_step0_model_exit_marks_failed_and_next_request_reloads() -> None:
    r = Run(max_resident=1)
    r.loaded("a", 1)
    assert r.step(ModelExited("a", "process exited with code -9")) == []
    assert r.s.state_of("a") is State.FAILED
    r.step(RequestFinished(1))  # its in-flight request fails upstream and finishes
    assert r.step(RequestArrived(2, "a")) == [StartLoad("a")]


def test_step0_admin_unload_of_loading_model_cancels_the_load() -> None:
    r = Run()
    r.step(RequestArrived(1, "a"))
    assert r.step(AdminUnload("a")) == [StopModel("a", OPERATOR, "unloaded by operator")]
    assert r.step(LoadDone("a", True)) == []  # the cancelled load's late answer is ignored
    assert r.s.state_of("a") is State.UNLOADING


def test_step0_unknown_model_and_duplicate_ids_are_programming_errors() -> None:
    r = Run()
    with pytest.raises(KeyError):
        r.step(RequestArrived(1, "nope"))
    r.step(RequestArrived(1, "a"))
    with pytest.raises(ValueError):
        r.step(RequestArrived(1, "a"))


# ---------------------------------------------------------------- (1) expire
def test_step1_waiter_past_load_timeout_gets_504_and_slow_load_is_stopped() -> None:
    r = Run(load_timeout=60)
    r.step(RequestArrived(1, "a"), at=0)
    r.step(RequestArrived(2, "a"), at=30)
    assert r.timers[-1] == 60
    out = r.step(Tick(), at=60)
    assert StopModel("a", LOAD_TIMEOUT, "Timed out waiting for model to load", force=True) in out
    rejected = sorted(e.req_id for e in out if isinstance(e, Reject))
    assert rejected == [1, 2]
    assert all(e.status == 504 for e in out if isinstance(e, Reject))
    r.step(StopDone("a"), at=61)
    assert r.s.state_of("a") is State.FAILED


def test_step1_waiter_behind_busy_model_times_out_with_504() -> None:
    r = Run(load_timeout=60, max_wait=1000)
    r.loaded("a", 1)
    r.step(RequestArrived(2, "b"), at=10)
    out = r.step(Tick(), at=70)
    assert out == [Reject(2, "b", 504, "Timed out waiting for model to load b after 60s")]
    assert r.s.state_of("b") is State.UNLOADED


# ---------------------------------------------------------------- (2) grant
def test_step2_loaded_model_is_granted_at_once_and_becomes_most_recent() -> None:
    r = Run(max_resident=2)
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    assert r.step(RequestArrived(2, "a"), at=5) == [Grant(2, "a")]
    assert r.s.view()[0].last_used == 5


# ---------------------------------------------------------------- (4) plan loads
def test_step4_single_flight_concurrent_requests_share_one_load() -> None:
    r = Run()
    assert r.step(RequestArrived(1, "a")) == [StartLoad("a")]
    assert r.step(RequestArrived(2, "a")) == []
    assert r.step(RequestArrived(3, "a")) == []
    assert r.step(LoadDone("a", True), at=3) == [Grant(1, "a"), Grant(2, "a"), Grant(3, "a")]


def test_step4_evicts_least_recently_used_idle_model() -> None:
    r = Run(max_resident=2)
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    r.loaded("b", 2)
    r.step(RequestFinished(2), at=2)
    r.step(RequestArrived(3, "a"), at=3)  # a is now more recent than b
    r.step(RequestFinished(3), at=4)
    assert r.step(RequestArrived(4, "c"), at=5) == [StopModel("b", LRU, "evicted to make room for c")]
    assert r.s.state_of("b") is State.UNLOADING


def test_step4_memory_budget_evicts_as_many_as_needed() -> None:
    r = Run({"a": 30, "b": 30, "big": 70}, max_resident=3, memory_gb=80)
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    r.loaded("b", 2)
    r.step(RequestFinished(2), at=2)
    assert r.step(RequestArrived(3, "big"), at=3) == [
        StopModel("a", LRU, "evicted to make room for big"), StopModel("b", LRU, "evicted to make room for big")]
    assert r.step(StopDone("a")) == []  # b still holds memory: no start yet
    assert r.step(StopDone("b")) == [StartLoad("big")]


def test_step4_busy_model_is_never_stopped_and_resident_requests_keep_flowing() -> None:
    r = Run(max_resident=1, max_wait=30)
    r.loaded("a", 1)  # request 1 in flight
    assert r.step(RequestArrived(2, "b"), at=1) == []
    assert r.step(RequestArrived(3, "a"), at=2) == [Grant(3, "a")]  # a keeps serving
    assert r.step(RequestFinished(1), at=3) == []  # 3 still in flight
    assert r.step(RequestFinished(3), at=4) == [StopModel("a", LRU, "evicted to make room for b")]


def test_step4_waiting_load_does_not_starve_behind_a_stream_of_requests() -> None:
    r = Run(max_resident=1, max_wait=10)
    r.loaded("a", 1)
    r.step(RequestArrived(2, "b"), at=1)
    assert 11 in r.timers  # the scheduler asks for a Tick at the fairness bound
    # a steady stream of overlapping requests for a keeps it busy
    req = 100
    for t in range(2, 11):
        assert r.step(RequestArrived(req, "a"), at=t) == [Grant(req, "a")]
        r.step(RequestFinished(req - 1 if req > 100 else 1), at=t + 0.5)
        req += 1
    # past the bound: new requests for a wait, so a drains and b gets its turn
    assert r.step(Tick(), at=11) == []
    assert r.step(RequestArrived(500, "a"), at=11.5) == []
    assert r.s.view()[0].draining
    assert r.step(RequestFinished(req - 1), at=12) == [StopModel("a", LRU, "evicted to make room for b")]
    assert r.step(StopDone("a"), at=13) == [StartLoad("b")]
    assert r.step(LoadDone("b", True), at=14) == [Grant(2, "b")]
    # the request for a that waited during the drain is served next
    assert r.step(RequestFinished(2), at=15) == [StopModel("b", LRU, "evicted to make room for a")]


def test_step4_load_waits_for_the_evicted_model_to_finish_stopping() -> None:
    r = Run()
    r.loaded("a", 1)
    r.step(RequestFinished(1))
    assert r.step(RequestArrived(2, "b")) == [StopModel("a", LRU, "evicted to make room for b")]
    assert r.step(RequestArrived(3, "b")) == []
    assert r.step(Tick(), at=100) == []
    assert r.step(StopDone("a"), at=101) == [StartLoad("b")]


def test_step4_failed_model_does_not_hold_capacity() -> None:
    r = Run()
    r.step(RequestArrived(1, "a"))
    r.step(LoadDone("a", False, "bad"))
    assert r.step(RequestArrived(2, "b")) == [StartLoad("b")]


def test_step4_loads_do_not_overtake_a_blocked_one() -> None:
    r = Run({"a": 50, "b": 50, "small": 10}, max_resident=3, memory_gb=80, max_wait=100)
    r.loaded("a", 1)  # busy
    assert r.step(RequestArrived(2, "b")) == []  # needs a to drain
    assert r.step(RequestArrived(3, "small")) == []  # would fit, but b came first


def test_step4_pinned_model_is_never_evicted_but_counts_against_capacity() -> None:
    r = Run(max_resident=2)
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    r.step(SetPinned("a", True))
    r.loaded("b", 2)
    r.step(RequestFinished(2), at=2)
    assert r.step(RequestArrived(3, "c"), at=3) == [StopModel("b", LRU, "evicted to make room for c")]
    r.step(StopDone("b"))
    r.step(LoadDone("c", True))
    r.step(RequestFinished(3), at=4)
    assert r.step(RequestArrived(4, "b"), at=5) == [StopModel("c", LRU, "evicted to make room for b")]
    assert r.step(SetPinned("a", False)) == []  # c's stop makes room already: nothing more is evicted
    r.step(StopDone("c"))
    r.step(LoadDone("b", True))
    r.step(RequestFinished(4), at=6)
    assert r.step(RequestArrived(5, "c"), at=7) == [StopModel("a", LRU, "evicted to make room for c")]


# ---------------------------------------------------------------- (7) drains
def test_step7_admin_unload_waits_for_in_flight_and_force_does_not() -> None:
    r = Run(max_resident=2)
    r.loaded("a", 1)
    assert r.step(AdminUnload("a")) == []
    assert r.s.view()[0].draining
    assert r.step(RequestArrived(2, "a")) == []  # held back while draining
    assert r.step(RequestFinished(1)) == [StopModel("a", OPERATOR, "unloaded by operator")]
    assert r.step(StopDone("a")) == [StartLoad("a")]  # the held request brings it back
    r.loaded("b", 3)
    assert r.step(AdminUnload("b", force=True)) == [
        StopModel("b", OPERATOR_FORCED, "unloaded by operator (forced)", force=True)]


# ---------------------------------------------------------------- (8) grant again
def test_step8_a_lifted_drain_lets_held_back_requests_through_in_the_same_pass() -> None:
    r = Run(max_resident=1, max_wait=5)
    r.loaded("a", 1)  # busy
    assert r.step(RequestArrived(2, "b"), at=1) == []
    assert r.step(Tick(), at=6) == []  # past max_wait: a drains for b
    assert r.step(RequestArrived(3, "a"), at=7) == []  # newer than b's request: held back
    assert r.s.view()[0].draining
    # b's client goes away: nothing needs a to drain any more, and the held request is served at once
    assert r.step(RequestCancelled(2), at=8) == [Grant(3, "a")]
    assert not r.s.view()[0].draining


# ---------------------------------------------------------------- (9) the timer
def test_step9_a_tick_is_asked_for_once_at_the_earliest_deadline() -> None:
    s = Scheduler(SchedulerConfig({"a": 0.0, "b": 0.0}, 1, None, load_timeout=60, max_wait=30))
    assert s.handle(RequestArrived(1, "a"), 0) == [StartLoad("a"), TimerAt(60)]
    assert s.handle(RequestArrived(2, "a"), 10) == []  # the earliest deadline is still 60: not asked again
    assert s.handle(LoadDone("a", True), 20) == [Grant(1, "a"), Grant(2, "a")]  # nothing left to time
    assert s.handle(Tick(), 60) == []


# ---------------------------------------------------------------- adapters
def adapters_run(max_adapters: int = 2, **kw: object) -> Run:
    models = {
        "base": ModelSpec(10, max_adapters=max_adapters),
        "other": ModelSpec(10),
        "x": ModelSpec(base="base"),
        "y": ModelSpec(base="base"),
        "z": ModelSpec(base="base"),
    }
    return Run(models, **kw)  # type: ignore[arg-type]


def test_step4_adapter_loads_its_base_first_then_itself() -> None:
    r = adapters_run()
    assert r.step(RequestArrived(1, "x")) == [StartLoad("base")]
    assert r.step(RequestArrived(2, "x")) == []
    assert r.step(LoadDone("base", True)) == [StartLoad("x")]
    assert r.step(LoadDone("x", True)) == [Grant(1, "x"), Grant(2, "x")]
    views = {v.name: v for v in r.s.view()}
    assert views["base"].in_flight == 2  # a request on an adapter keeps its base busy


def test_step4_adapters_count_against_their_base_not_the_global_budget() -> None:
    r = adapters_run(max_adapters=2)
    for i, name in enumerate(["x", "y"], start=1):
        r.step(RequestArrived(i, name), at=i)
        r.step(LoadDone("base", True))
        r.step(LoadDone(name, True))
        r.step(RequestFinished(i), at=i + 0.5)
    assert r.step(RequestArrived(3, "z"), at=5) == [StopModel("x", LRU, "evicted to make room for z")]
    assert r.s.state_of("base") is State.LOADED
    assert r.step(StopDone("x")) == [StartLoad("z")]


def test_step4_base_with_adapter_in_flight_is_never_evicted() -> None:
    r = adapters_run()
    r.step(RequestArrived(1, "x"))
    r.step(LoadDone("base", True))
    r.step(LoadDone("x", True))  # request 1 in flight on x
    assert r.step(RequestArrived(2, "other")) == []
    assert r.step(RequestFinished(1)) == [StopModel("base", LRU, "evicted to make room for other")]


def test_step4_evicting_a_base_drops_its_adapters_without_separate_stops() -> None:
    r = adapters_run()
    r.step(RequestArrived(1, "x"))
    r.step(LoadDone("base", True))
    r.step(LoadDone("x", True))
    r.step(RequestFinished(1))
    assert r.step(RequestArrived(2, "other")) == [StopModel("base", LRU, "evicted to make room for other")]
    assert r.s.state_of("x") is State.UNLOADED
    r.step(StopDone("base"))
    r.step(LoadDone("other", True))
    r.step(RequestFinished(2), at=1)
    # the adapter comes back with its base
    assert r.step(RequestArrived(3, "x"), at=2) == [StopModel("other", LRU, "evicted to make room for base")]


def test_step0_failed_base_fails_its_adapter_waiters() -> None:
    r = adapters_run()
    r.step(RequestArrived(1, "x"))
    out = r.step(LoadDone("base", False, "no such model"))
    assert len(out) == 1 and isinstance(out[0], Reject) and out[0].status == 503
    assert "base model base" in out[0].message


def test_step0_adapter_unloaded_out_of_band_is_noticed_and_reloaded() -> None:
    r = adapters_run()
    r.step(RequestArrived(1, "x"))
    r.step(LoadDone("base", True))
    r.step(LoadDone("x", True))
    r.step(RequestFinished(1))
    assert r.step(ModelExited("x", "unloaded outside the router", failed=False)) == []
    v = {v.name: v for v in r.s.view()}["x"]
    assert (v.state, v.out_of_band, v.failures) == (State.UNLOADED, 1, 0)
    assert r.step(RequestArrived(2, "x")) == [StartLoad("x")]


def test_step3_adapters_loaded_out_of_band_are_counted_and_trimmed_to_budget() -> None:
    r = adapters_run(max_adapters=2)
    r.step(RequestArrived(1, "x"), at=1)
    r.step(LoadDone("base", True))
    r.step(LoadDone("x", True))
    r.step(RequestFinished(1), at=2)
    assert r.step(ModelFound("y"), at=3) == []
    # never used through the router, y is the least recently used
    assert r.step(ModelFound("z"), at=4) == [StopModel("y", OVER_CAPACITY, "over capacity (loaded outside the router)")]
    assert {v.name: v.out_of_band for v in r.s.view()} == {"base": 0, "other": 0, "x": 0, "y": 1, "z": 1}


def test_step3_models_found_over_the_memory_pool_are_trimmed_to_it() -> None:
    r = Run({"a": ModelSpec(40), "b": ModelSpec(40)}, max_resident=10, memory_gb=70)
    assert r.step(ModelFound("a"), at=1) == []
    assert r.step(ModelFound("b"), at=2) == [StopModel("a", OVER_CAPACITY, "over capacity (loaded outside the router)")]


def test_step3_with_gpus_capacity_memory_gb_is_each_gpus_budget_not_a_pool_to_trim_to() -> None:
    # capacity.memory_gb is each GPU's budget once GPUs are known: 40 GB on each of two GPUs of 70 is within
    # it. Read as a pool (80 > 70), step 3 stopped the idle one after every load, and the next request for
    # it stopped the other: a swap per request on a machine with room for both.
    r = Run({"a": ModelSpec(40), "b": ModelSpec(40)}, max_resident=10, memory_gb=70,
            gpu_memory_gb={0: 70.0, 1: 70.0})
    assert r.step(RequestArrived(1, "a"), at=1) == [StartLoad("a", (0,))]
    r.step(LoadDone("a", True))
    r.step(RequestFinished(1), at=2)
    assert r.step(RequestArrived(2, "b"), at=3) == [StartLoad("b", (1,))]
    assert r.step(LoadDone("b", True), at=4) == [Grant(2, "b")]
    assert r.step(RequestArrived(3, "a"), at=5) == [Grant(3, "a")]


def test_step3_models_found_over_a_gpus_budget_are_trimmed_on_that_gpu() -> None:
    # found running behind the router's back (adopted after a restart with a smaller budget): 80 GB on a GPU
    # of 70 is over, and the least recently used idle model there goes; the other GPU is not touched
    r = Run({"a": ModelSpec(40), "b": ModelSpec(40), "c": ModelSpec(40)}, max_resident=10, memory_gb=70,
            gpu_memory_gb={0: 70.0, 1: 70.0})
    assert r.step(ModelFound("c", (1,)), at=1) == []
    assert r.step(ModelFound("a", (0,)), at=2) == []
    assert r.step(ModelFound("b", (0,)), at=3) == [
        StopModel("a", OVER_CAPACITY, "over capacity (loaded outside the router)")]
    assert r.step(StopDone("a"), at=4) == []
    assert {v.name: v.state for v in r.s.view()} == {"a": State.UNLOADED, "b": State.LOADED, "c": State.LOADED}


def test_step0_endpoint_mode_external_engine_is_never_managed() -> None:
    models = {"@engine": ModelSpec(external=True, max_adapters=1), "x": ModelSpec(base="@engine"),
              "y": ModelSpec(base="@engine")}
    r = Run(models, max_resident=1)  # type: ignore[arg-type]
    assert r.s.state_of("@engine") is State.LOADED
    assert r.step(RequestArrived(1, "@engine")) == [Grant(1, "@engine")]
    assert r.step(RequestArrived(2, "x")) == [StartLoad("x")]
    assert r.step(LoadDone("x", True)) == [Grant(2, "x")]
    r.step(RequestFinished(2))
    assert r.step(RequestArrived(3, "y")) == [StopModel("x", LRU, "evicted to make room for y")]
    assert r.step(AdminUnload("@engine")) == []
    assert r.s.resident() == ["x"]


# ---------------------------------------------------------------- GPUs
def gpu_run(**models: ModelSpec) -> Run:
    r = Run(dict(models), max_resident=4)  # type: ignore[arg-type]
    r.s = Scheduler(SchedulerConfig(dict(models), 4, None, 600.0, 30.0, gpu_memory_gb={0: 80.0, 1: 80.0}))
    return r


def test_step4_placement_best_fit_without_evicting() -> None:
    r = gpu_run(a=ModelSpec(50), b=ModelSpec(40), c=ModelSpec(30))
    assert r.step(RequestArrived(1, "a")) == [StartLoad("a", (0,))]
    assert r.step(RequestArrived(2, "b")) == [StartLoad("b", (1,))]  # does not fit next to a
    # c fits on both; best fit is the GPU with the least left over (a's: 30 left after it, b's: 10)
    assert r.step(RequestArrived(3, "c")) == [StartLoad("c", (0,))]
    assert {v.name: v.gpus for v in r.s.view()} == {"a": (0,), "b": (1,), "c": (0,)}


def test_step4_fixed_gpus_need_memory_on_each() -> None:
    r = gpu_run(tp=ModelSpec(50, gpus=(0, 1)), small=ModelSpec(40))
    r.step(RequestArrived(1, "small"))
    r.step(LoadDone("small", True))
    r.step(RequestFinished(1), at=1)
    # 50 on GPU 0 and on GPU 1: the small model (on GPU 0) must go
    assert r.step(RequestArrived(2, "tp"), at=2) == [StopModel("small", LRU, "evicted to make room for tp")]
    assert r.step(StopDone("small")) == [StartLoad("tp", (0, 1))]


def test_step4_eviction_only_on_the_gpu_that_frees_the_need() -> None:
    r = gpu_run(x=ModelSpec(60), y=ModelSpec(60), z=ModelSpec(70), w=ModelSpec(10))
    for i, name in enumerate(["x", "y"], start=1):
        r.step(RequestArrived(i, name), at=i)
        r.step(LoadDone(name, True))
        r.step(RequestFinished(i), at=i + 0.5)
    # y is busy again: z can only go where x is, and x alone is evicted (y is untouched)
    r.step(RequestArrived(10, "y"), at=5)
    assert r.step(RequestArrived(11, "z"), at=6) == [StopModel("x", LRU, "evicted to make room for z")]
    assert r.step(StopDone("x")) == [StartLoad("z", (0,))]
    # w (10 GB) fits next to z on GPU 0 or y on GPU 1 without evicting anything
    assert r.step(RequestArrived(12, "w"), at=7) == [StartLoad("w", (0,))]


# ---------------------------------------------------------------- sleep mode
def sleep_run(host: float | None = None, overflow: str = "stop", **models: ModelSpec) -> Run:
    r = Run(dict(models), max_resident=1)  # type: ignore[arg-type]
    r.s = Scheduler(SchedulerConfig(dict(models), 1, 40.0, 600.0, 30.0, host_memory_gb=host, host_overflow=overflow))
    return r


def test_step4_alternating_requests_sleep_and_wake_instead_of_stop_and_start() -> None:
    r = sleep_run(a=ModelSpec(30, sleep_level=1, weights_gb=8), b=ModelSpec(30, sleep_level=1, weights_gb=8))
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    assert r.step(RequestArrived(2, "b"), at=2) == [SleepModel("a", 1, LRU, "evicted to make room for b")]
    assert r.s.state_of("a") is State.FALLING_ASLEEP
    assert r.step(SleepDone("a", True)) == [StartLoad("b")]  # a keeps only its 1 GB residue: b fits
    r.step(LoadDone("b", True))
    r.step(RequestFinished(2), at=3)
    # back to a: b goes to sleep, then a wakes; no process is stopped or started
    assert r.step(RequestArrived(3, "a"), at=4) == [SleepModel("b", 1, LRU, "evicted to make room for a")]
    assert r.step(RequestArrived(4, "a"), at=4) == []  # never granted while a sleeps
    assert r.step(SleepDone("b", True)) == [WakeModel("a", 1)]
    assert r.s.state_of("a") is State.WAKING
    assert r.step(WakeDone("a", True)) == [Grant(3, "a"), Grant(4, "a")]
    v = {v.name: v for v in r.s.view()}
    assert (v["a"].loads, v["a"].wakes, v["b"].sleeps, v["b"].state) == (1, 1, 1, State.SLEEPING)


def test_step0_a_sleeper_being_stopped_holds_only_its_residue() -> None:
    # a (asleep, 1 GB residue) and b (awake, 30 GB) within 40 GB and max_resident 1; stopping a must not
    # make it count as 30 GB and a resident place again while it goes
    r = sleep_run(a=ModelSpec(30, sleep_level=1, sleeping_gb=1), b=ModelSpec(30, sleep_level=1, sleeping_gb=1))
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    r.step(RequestArrived(2, "b"), at=2)
    r.step(SleepDone("a", True))
    r.step(LoadDone("b", True))
    assert r.step(AdminUnload("a", False), at=3) == [StopModel("a", OPERATOR, "unloaded by operator")]
    v = {v.name: v for v in r.s.view()}
    assert v["a"].state is State.UNLOADING and not v["a"].resident
    assert r.s.resident() == ["b"]
    # a sleep that failed leaves all the memory held: that stop counts in full
    r2 = sleep_run(a=ModelSpec(30, sleep_level=1), b=ModelSpec(30, sleep_level=1))
    r2.loaded("a", 1)
    r2.step(RequestFinished(1), at=1)
    r2.step(RequestArrived(2, "b"), at=2)
    r2.step(SleepDone("a", False, "boom"))
    assert {v.name: v.resident for v in r2.s.view()}["a"]


def test_step6_host_budget_pushes_out_the_oldest_sleeper() -> None:
    specs = {n: ModelSpec(30, sleep_level=1, weights_gb=8) for n in ("a", "b", "c")}
    r = sleep_run(host=10, **specs)
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    r.step(RequestArrived(2, "b"), at=2)
    r.step(SleepDone("a", True))
    r.step(LoadDone("b", True))
    r.step(RequestFinished(2), at=3)
    # c: b falls asleep (8 GB of weights) next to a (8 GB): over the 10 GB host budget, a (older) goes
    out = r.step(RequestArrived(3, "c"), at=4)
    assert out == [SleepModel("b", 1, LRU, "evicted to make room for c"),
                   StopModel("a", HOST_BUDGET, "host memory budget for sleeping models exceeded")]
    assert r.s.host_usage() == 8


def test_step4_host_overflow_level2_drops_weights_instead() -> None:
    specs = {n: ModelSpec(30, sleep_level=1, weights_gb=8) for n in ("a", "b", "c")}
    r = sleep_run(host=10, overflow="level2", **specs)
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    r.step(RequestArrived(2, "b"), at=2)
    r.step(SleepDone("a", True))
    r.step(LoadDone("b", True))
    r.step(RequestFinished(2), at=3)
    assert r.step(RequestArrived(3, "c"), at=4) == [SleepModel("b", 2, LRU, "evicted to make room for c")]
    r.step(SleepDone("b", True))
    r.step(LoadDone("c", True))
    r.step(RequestFinished(3), at=5)
    assert r.step(RequestArrived(4, "b"), at=6)[0] == SleepModel("c", 2, LRU, "evicted to make room for b")


def test_step0_failed_wake_falls_back_to_stop_and_cold_start() -> None:
    r = sleep_run(a=ModelSpec(30, sleep_level=1), b=ModelSpec(30, sleep_level=1))
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    r.step(RequestArrived(2, "b"), at=2)
    r.step(SleepDone("a", True))
    r.step(LoadDone("b", True))
    r.step(RequestFinished(2), at=3)
    r.step(RequestArrived(3, "a"), at=4)
    assert r.step(SleepDone("b", True)) == [WakeModel("a", 1)]
    assert r.step(WakeDone("a", False, "500 from /wake_up")) == [StopModel("a", WAKE_FAILED, "wake failed", force=True)]
    assert r.step(StopDone("a")) == [StartLoad("a")]
    assert r.step(LoadDone("a", True)) == [Grant(3, "a")]


def test_step0_failed_sleep_stops_the_model() -> None:
    r = sleep_run(a=ModelSpec(30, sleep_level=1), b=ModelSpec(30, sleep_level=1))
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    assert r.step(RequestArrived(2, "b"), at=2) == [SleepModel("a", 1, LRU, "evicted to make room for b")]
    out = r.step(SleepDone("a", False, "500 from /sleep"))
    assert out == [StopModel("a", SLEEP_FAILED, "sleep failed", force=True)]
    assert r.step(StopDone("a")) == [StartLoad("b")]
    assert r.s.state_of("a") is State.UNLOADED


@pytest.mark.parametrize(("big", "expected"), [
    (38.5, [SleepModel("b", 1, LRU, "evicted to make room for big"),
            StopModel("a", LRU, "evicted to make room for big")]),
    (39.5, [StopModel("b", LRU, "evicted to make room for big"), StopModel("a", LRU, "evicted to make room for big")]),
])
def test_step4_sleepers_are_stopped_only_when_their_residue_is_in_the_way(big: float, expected: list[object]) -> None:
    r = sleep_run(a=ModelSpec(20, sleep_level=1), b=ModelSpec(20, sleep_level=1), big=ModelSpec(big))
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    r.step(RequestArrived(2, "b"), at=2)
    r.step(SleepDone("a", True))
    r.step(LoadDone("b", True))
    r.step(RequestFinished(2), at=3)
    # 38.5 of 40 GB: b sleeps (1 GB residue) and a's residue must go too; 39.5: even b's residue is too much
    assert r.step(RequestArrived(3, "big"), at=4) == expected


def test_step4_a_model_an_operator_unloads_is_stopped_not_put_to_sleep_when_evicted() -> None:
    """An operator's unload waits for a base busy with its adapter's load; meanwhile another model needs the
    room. Put to sleep, the base would wake for the adapter's waiter with the unload still pending, hold
    that waiter back (a drain), be evicted again, and so on for ever."""
    r = sleep_run(a=ModelSpec(10, sleep_level=1), a1=ModelSpec(base="a"), b=ModelSpec(10))
    assert r.step(RequestArrived(1, "a1")) == [StartLoad("a")]
    assert r.step(LoadDone("a", True)) == [StartLoad("a1")]
    assert r.step(RequestArrived(2, "b")) == []
    assert r.step(AdminUnload("a")) == []  # busy: its adapter is loading
    assert r.step(LoadDone("a1", True)) == [StopModel("a", OPERATOR, "unloaded by operator")]
    assert r.step(StopDone("a")) == [StartLoad("a")]  # the adapter's waiter came first: it brings a back
    assert r.step(LoadDone("a", True)) == [StartLoad("a1")]
    assert r.step(LoadDone("a1", True)) == [Grant(1, "a1")]


# ---------------------------------------------------------------- lifecycle policies
def test_step4_model_in_steady_use_is_kept_and_the_newcomer_waits_for_a_batch() -> None:
    r = Run(max_resident=1, keep_idle=10, max_wait=30)
    assert r.step(RequestArrived(1, "a"), at=-20) == [StartLoad("a")]
    assert r.step(LoadDone("a", True), at=0) == [Grant(1, "a")]  # a takes 20 s to load: worth keeping
    r.step(RequestFinished(1), at=0.5)
    for i, t in enumerate([2, 4, 6], start=2):  # a request for a every 2 s
        assert r.step(RequestArrived(i, "a"), at=t) == [Grant(i, "a")]
        r.step(RequestFinished(i), at=t + 0.5)
    # b arrives while a is idle but hot: no swap yet, more requests for b gather
    assert r.step(RequestArrived(10, "b"), at=7) == []
    assert r.step(RequestArrived(11, "b"), at=8) == []
    assert 16.5 in r.timers  # a Tick when a cools down: last used 6.5 + keep_idle 10
    assert r.step(Tick(), at=16.5) == [StopModel("a", LRU, "evicted to make room for b")]
    r.step(StopDone("a"))
    assert r.step(LoadDone("b", True), at=18) == [Grant(10, "b"), Grant(11, "b")]  # served together


def test_step4_fairness_bound_swaps_even_if_the_resident_stays_hot() -> None:
    r = Run(max_resident=1, keep_idle=10, max_wait=5)
    r.step(RequestArrived(1, "a"), at=-20)
    r.step(LoadDone("a", True), at=0)
    r.step(RequestFinished(1), at=0.5)
    r.step(RequestArrived(2, "a"), at=1)
    r.step(RequestFinished(2), at=1.5)
    assert r.step(RequestArrived(3, "b"), at=2) == []
    r.step(RequestArrived(4, "a"), at=3)
    r.step(RequestFinished(4), at=3.5)
    assert r.step(Tick(), at=7) == [StopModel("a", LRU, "evicted to make room for b")]  # waited max_wait (5 s)


def test_step4_a_model_that_reloads_quickly_is_protected_only_that_long() -> None:
    r = Run(max_resident=1, keep_idle=10)
    r.step(RequestArrived(1, "a"), at=-1)
    r.step(LoadDone("a", True), at=0)  # a 1 s load
    r.step(RequestFinished(1), at=0.2)
    r.step(RequestArrived(2, "a"), at=0.5)
    r.step(RequestFinished(2), at=0.7)  # steady use, gap 1.5 s
    assert r.step(RequestArrived(3, "b"), at=1.0) == []
    assert r.timers[-1] == 2.0  # a lone newcomer waits one of a's reloads (1 s) from its arrival
    assert r.step(Tick(), at=2.0) == [StopModel("a", LRU, "evicted to make room for b")]


def test_step4_light_traffic_swaps_at_once() -> None:
    r = Run(max_resident=1, keep_idle=10)
    r.loaded("a", 1)
    r.step(RequestFinished(1), at=1)
    assert r.step(RequestArrived(2, "b"), at=3) == [StopModel("a", LRU, "evicted to make room for b")]


def test_step0_queue_limits_give_429_with_retry_after() -> None:
    r = Run({"a": ModelSpec(max_waiting=2), "b": ModelSpec()}, max_resident=1,  # type: ignore[dict-item]
            max_waiting_total=3, retry_after=7.0)
    r.step(RequestArrived(1, "a"))
    r.step(RequestArrived(2, "a"))
    out = r.step(RequestArrived(3, "a"))
    assert out == [Reject(3, "a", 429, "too many requests waiting for a; try again later", retry_after=7.0)]
    r.step(RequestArrived(4, "b"))
    assert r.step(RequestArrived(5, "b"))[0].status == 429  # type: ignore[union-attr]
    # a loaded model is served at once whatever the queue
    assert r.step(LoadDone("a", True)) == [Grant(1, "a"), Grant(2, "a")]
    assert r.step(RequestArrived(6, "a")) == [Grant(6, "a")]


def test_step5_ttl_unloads_idle_models() -> None:
    r = Run({"a": ModelSpec(ttl=60), "b": ModelSpec()}, max_resident=2)  # type: ignore[dict-item]
    r.loaded("a", 1)
    r.loaded("b", 2)
    r.step(RequestFinished(1), at=10)
    r.step(RequestFinished(2), at=10)
    assert 70 in r.timers
    assert r.step(Tick(), at=69) == []
    assert r.step(Tick(), at=70) == [StopModel("a", TTL, "idle for 60s (ttl)")]
    assert r.s.state_of("b") is State.LOADED  # no ttl: kept


def test_step4_priority_wins_a_contested_slot_and_is_evicted_last() -> None:
    r = Run({"low": ModelSpec(), "high": ModelSpec(priority=5), "x": ModelSpec()},  # type: ignore[dict-item]
            max_resident=1)
    r.loaded("x", 1)
    r.step(RequestArrived(2, "low"), at=1)
    r.step(RequestArrived(3, "high"), at=2)
    assert r.step(RequestFinished(1), at=3) == [StopModel("x", LRU, "evicted to make room for high")]
    r2 = Run({"low": ModelSpec(), "high": ModelSpec(priority=5), "x": ModelSpec()},  # type: ignore[dict-item]
             max_resident=2)
    r2.loaded("high", 1)
    r2.step(RequestFinished(1), at=1)
    r2.loaded("low", 2)
    r2.step(RequestFinished(2), at=2)
    r2.step(RequestFinished(2), at=2)
    # high is least recently used, but low goes first
    assert r2.step(RequestArrived(3, "x"), at=3) == [StopModel("low", LRU, "evicted to make room for x")]


def test_step0_preload_only_when_it_fits_without_evicting() -> None:
    r = Run(max_resident=2)
    assert r.step(Preload("a")) == [StartLoad("a")]
    r.step(LoadDone("a", True))
    assert r.step(Preload("b")) == [StartLoad("b")]
    r.step(LoadDone("b", True))
    assert r.step(Preload("c")) == []  # full: nothing is evicted for a guess
    assert r.step(Preload("a")) == []  # already there


def test_step4_restored_history_sets_the_lru_order() -> None:
    r = Run(max_resident=2, last_used={"a": 100.0, "b": 50.0})
    r.now = 200
    r.step(Preload("a"))
    r.step(LoadDone("a", True))
    r.step(Preload("b"))
    r.step(LoadDone("b", True))
    assert r.step(RequestArrived(1, "c"), at=201) == [StopModel("b", LRU, "evicted to make room for c")]


def test_step4_memory_used_by_others_steers_placement_to_another_gpu() -> None:
    r = gpu_run(a=ModelSpec(40), b=ModelSpec(45))
    assert r.step(GpuUsage(((0, 60.0),))) == []  # someone else's job takes 60 GB of GPU 0
    assert r.step(RequestArrived(1, "a")) == [StartLoad("a", (1,))]
    # GPU 1 has 40 left of its 80, GPU 0 only 20: b (45) cannot go anywhere without evicting a
    r.step(LoadDone("a", True))
    r.step(RequestFinished(1), at=1)
    assert r.step(RequestArrived(2, "b"), at=2) == [StopModel("a", LRU, "evicted to make room for b")]
    # the job ends: GPU 0 is free again, and the next placement uses it
    r.step(StopDone("a"))
    r.step(LoadDone("b", True))
    assert r.step(GpuUsage(())) == []
    assert r.step(RequestArrived(3, "a"), at=3) == [StartLoad("a", (0,))]


def test_step4_when_others_leave_no_gpu_it_could_fit_on_the_start_is_tried_anyway() -> None:
    # (the runtime's check before the start then names the processes that hold the memory)
    r = gpu_run(a=ModelSpec(40))
    r.step(GpuUsage(((0, 60.0), (1, 70.0))))
    assert r.step(RequestArrived(1, "a")) == [StartLoad("a", (0,))]


def test_two_adapters_of_a_base_that_is_out_evict_once_for_it() -> None:
    # both waiters want the base: planned once per pass, its room (P's memory) is not taken for someone
    # else's, and Q stays
    specs = {"P": ModelSpec(60.0), "Q": ModelSpec(60.0), "B": ModelSpec(50.0), "x": ModelSpec(1.0, base="B"),
             "y": ModelSpec(1.0, base="B")}
    r = Run(specs, max_resident=10, memory_gb=130.0)
    r.step(ModelFound("P"), at=0)
    r.step(ModelFound("Q"), at=0)
    assert r.step(RequestArrived(1, "x"), at=1) == [StopModel("P", StopReason.LRU, "evicted to make room for B")]
    assert r.step(RequestArrived(2, "y"), at=1) == []
    assert r.step(StopDone("P"), at=2) == [StartLoad("B")]
