"""Invariants of the scheduler under random event sequences (hypothesis).

A small simulated world carries out the effects the way the runtime does: loads and stops complete
later (or fail), clients finish or vanish, engines crash, operators unload, time passes. After every
step: capacity and memory are never over budget, a model with requests in flight is never stopped
(except by a forced operator unload), never two processes of one model, grants only go to loaded
models. At the end, once the world settles, every request was answered exactly once.

The world may hold a replicated model ``r`` (units ``r``, ``r@1``, ``r@2``): requests name ``r`` and are
granted on a unit; its engines report saturation now and then, and an operator rescales it. The same
invariants hold per unit (no busy replica stopped, no second process of a unit), plus: ``r`` never has
more units resident than its ``replicas_max``, and never fewer kept than it pins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from vllm_model_router.scheduler import (
    HOLDS_CAPACITY,
    AdminUnload,
    Effect,
    Event,
    Grant,
    LoadDone,
    ModelExited,
    ModelSpec,
    ModelView,
    Preload,
    Reject,
    ReplicaPressure,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
    SetReplicas,
    SleepDone,
    SleepModel,
    StartLoad,
    State,
    StopDone,
    StopModel,
    Tick,
    TimerAt,
    WakeDone,
    WakeModel,
)
from vllm_model_router.scheduler.passes import Pass
from vllm_model_router.scheduler.states import holds_residue_only

MODELS = {"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0, "e": 5.0}
ADAPTERS = {"a1": "a", "a2": "a", "a3": "a", "b1": "b"}  # adapter -> base
MAX_ADAPTERS = 2
REPLICATED = "r"
UNITS = ("r", "r@1", "r@2")
ALL = sorted([*MODELS, *ADAPTERS, REPLICATED])


def held_gb(v: ModelView) -> float:
    """Memory a model holds: a sleeper (or a sleeper being stopped) only its residue (1 GB here)."""
    return 1.0 if holds_residue_only(v.state, v.asleep_level) else v.memory_gb


def children(base: str) -> set[str]:
    return {a for a, b in ADAPTERS.items() if b == base}


@dataclass
class World:
    s: Scheduler
    budget_count: int
    budget_mem: float | None
    gpu_budgets: dict[int, float] | None = None
    now: float = 0.0
    next_id: int = 1
    running: set[str] = field(default_factory=set)  # models with a process (loading, up or stopping)
    loading: set[str] = field(default_factory=set)
    stopping: set[str] = field(default_factory=set)
    up: set[str] = field(default_factory=set)
    falling: set[str] = field(default_factory=set)  # being put to sleep
    asleep: set[str] = field(default_factory=set)
    waking: set[str] = field(default_factory=set)
    host_budget: float | None = None
    in_flight: dict[int, str] = field(default_factory=dict)
    waiting: set[int] = field(default_factory=set)
    answers: dict[int, int] = field(default_factory=dict)
    cancelled: set[int] = field(default_factory=set)
    timer: float | None = None  # when the scheduler asked for a Tick
    replicated: bool = False  # r is configured

    def drop_children(self, base: str) -> None:
        for c in children(base):
            for group in (self.running, self.loading, self.up, self.stopping):
                group.discard(c)

    def gone(self, m: str) -> None:
        for group in (self.loading, self.up, self.falling, self.asleep, self.waking):
            group.discard(m)

    def feed(self, event: Event) -> None:
        for e in self.s.handle(event, self.now):
            match e:
                case StartLoad(m):
                    assert m not in self.running, f"second process of {m}"
                    if m in ADAPTERS:
                        assert ADAPTERS[m] in self.up, f"adapter {m} loaded on a base that is not up"
                    self.running.add(m)
                    self.loading.add(m)
                case StopModel(m, _, _, force):
                    assert m in self.running
                    busy = [r for r, mm in self.in_flight.items() if m in (mm, ADAPTERS.get(mm))]
                    assert force or not busy, f"stopped busy model {m}"
                    self.gone(m)
                    self.stopping.add(m)
                    self.drop_children(m)
                case SleepModel(m, level, _, _):
                    assert m in self.up and level in (1, 2), f"sleep of {m} which is not up"
                    busy = [r for r, mm in self.in_flight.items() if m in (mm, ADAPTERS.get(mm))]
                    assert not busy, f"put busy model {m} to sleep"
                    self.up.discard(m)
                    self.falling.add(m)
                    self.drop_children(m)
                case WakeModel(m, _):
                    assert m in self.asleep, f"wake of {m} which is not asleep"
                    self.asleep.discard(m)
                    self.waking.add(m)
                case Grant(r, m):
                    assert m in self.up and m not in self.stopping, f"granted {r} on {m} not up"
                    if m in ADAPTERS:
                        assert ADAPTERS[m] in self.up, f"granted {r} on adapter {m} whose base is not up"
                    assert r in self.waiting
                    self.waiting.discard(r)
                    self.answers[r] = self.answers.get(r, 0) + 1
                    self.in_flight[r] = m
                case Reject(r, _, status, _, _):
                    assert status in (429, 502, 503, 504)
                    assert r in self.waiting
                    self.waiting.discard(r)
                    self.answers[r] = self.answers.get(r, 0) + 1
                case TimerAt(when):
                    assert when >= self.now - 1e-9
                    self.timer = when
        self.check()

    def check(self) -> None:
        holding = [v for v in self.s.view() if v.state in HOLDS_CAPACITY]
        top = [v for v in holding if v.base is None]
        assert len([v for v in top if v.resident]) <= self.budget_count
        if self.budget_mem is not None:
            assert sum(held_gb(v) for v in top) <= self.budget_mem + 1e-9
        if self.host_budget is not None:
            assert self.s.host_usage() <= self.host_budget + 1e-9, "host budget exceeded"
        if self.gpu_budgets:
            for g, cap in self.gpu_budgets.items():
                assert sum(held_gb(v) for v in top if g in v.gpus) <= cap + 1e-9, f"GPU {g} over budget"
            assert all(v.gpus for v in top), "a model holds memory on no GPU"
        states = {v.name: v.state for v in self.s.view()}
        for base in MODELS:
            held = [v for v in holding if v.base == base]
            assert len(held) <= MAX_ADAPTERS
            assert not held or states[base] is State.LOADED, f"adapters of {base} held while it is {states[base]}"
        assert {v.name for v in holding} == self.running
        assert len([v for v in top if v.group == REPLICATED and v.resident]) <= len(UNITS)
        assert all(v.group == v.name or v.group == REPLICATED for v in self.s.view())

    def step(self, op: int, pick: int, dt: float) -> None:
        self.now += dt
        if self.timer is not None and self.now >= self.timer:
            self.timer = None
            self.feed(Tick())
        if op == 0:
            r = self.next_id
            self.next_id += 1
            self.waiting.add(r)
            self.feed(RequestArrived(r, ALL[pick % len(ALL)]))
        elif op == 1 and self.in_flight:
            r = sorted(self.in_flight)[pick % len(self.in_flight)]
            del self.in_flight[r]
            self.feed(RequestFinished(r))
        elif op == 2 and self.waiting:
            r = sorted(self.waiting)[pick % len(self.waiting)]
            self.waiting.discard(r)
            self.cancelled.add(r)
            self.feed(RequestCancelled(r))
        elif op in (3, 4) and self.loading:
            m = sorted(self.loading)[pick % len(self.loading)]
            self.loading.discard(m)
            if op == 3:
                self.up.add(m)
                self.feed(LoadDone(m, True))
            else:
                self.running.discard(m)
                self.drop_children(m)
                self.feed(LoadDone(m, False, "boom"))
        elif op == 5 and self.stopping:
            m = sorted(self.stopping)[pick % len(self.stopping)]
            self.stopping.discard(m)
            self.running.discard(m)
            self.feed(StopDone(m))
        elif op == 6 and self.up:
            m = sorted(self.up)[pick % len(self.up)]
            self.up.discard(m)
            self.running.discard(m)
            self.drop_children(m)
            self.feed(ModelExited(m, "crash", failed=m not in ADAPTERS))
        elif op == 7:
            self.feed(AdminUnload(ALL[pick % len(ALL)], force=pick % 3 == 0))
        elif op == 10:
            self.feed(Preload(ALL[pick % len(ALL)]))
        elif op == 11 and self.replicated:
            self.feed(ReplicaPressure(REPLICATED, pick % 2 == 0))
        elif op == 12 and self.replicated:
            self.feed(SetReplicas(REPLICATED, pick % 4))
        elif op == 8 and self.falling:
            m = sorted(self.falling)[pick % len(self.falling)]
            self.falling.discard(m)
            if pick % 5:
                self.asleep.add(m)
            self.feed(SleepDone(m, pick % 5 != 0, "boom"))
        elif op == 9 and self.waking:
            m = sorted(self.waking)[pick % len(self.waking)]
            self.waking.discard(m)
            if pick % 5:
                self.up.add(m)
            self.feed(WakeDone(m, pick % 5 != 0, "boom"))

    def settle(self) -> None:
        """Let every pending thing complete until nothing is waiting."""
        for _ in range(1000):
            if self.in_flight:
                self.feed(RequestFinished(self.in_flight.popitem()[0]))
            elif self.stopping:
                m = self.stopping.pop()
                self.running.discard(m)
                self.feed(StopDone(m))
            elif self.falling:
                m = self.falling.pop()
                self.asleep.add(m)
                self.feed(SleepDone(m, True))
            elif self.waking:
                m = self.waking.pop()
                self.up.add(m)
                self.feed(WakeDone(m, True))
            elif self.loading:
                m = self.loading.pop()
                self.up.add(m)
                self.feed(LoadDone(m, True))
            elif self.waiting:
                self.now = max(self.now + 1, self.timer or 0)
                self.feed(Tick())
            else:
                return
        raise AssertionError("the world did not settle")


ops = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 100), st.floats(0, 20)), max_size=120)
settings = dict(max_resident=st.integers(1, 3), memory=st.sampled_from([None, 40.0, 60.0, 100.0]),
                max_wait=st.sampled_from([0.0, 5.0, 30.0]), gpus=st.booleans(), sleep=st.sampled_from([0, 1, 2]),
                host=st.sampled_from([None, 6.0, 20.0]), keep_idle=st.sampled_from([0.0, 10.0]),
                policies=st.booleans(), replicas=st.sampled_from([0, 1, 2]))


def run_world(
    make: Callable[[SchedulerConfig], Scheduler], ops: list[tuple[int, int, float]], max_resident: int,
    memory: float | None, max_wait: float, gpus: bool, sleep: int, host: float | None, keep_idle: float,
    policies: bool, replicas: int = 0, world: type[World] = World,
) -> World:
    """Play ``ops`` in a world around the scheduler ``make`` builds, then let it settle."""
    # with GPUs: two of ``memory`` GB each (or 50), "d" pinned to both, the others placed by the router
    gpu_budgets = {0: memory or 50.0, 1: memory or 50.0} if gpus else None
    limit = memory if not gpus else (memory or 50.0)
    specs: dict[str, ModelSpec | float] = {
        m: ModelSpec(g, max_adapters=MAX_ADAPTERS, gpus=(0, 1) if gpus and m == "d" else None,
                     gpu_count=2 if gpus and m == "b" and policies else 1,  # tensor parallel: both GPUs
                     sleep_level=sleep if m in ("a", "b", "c") else 0, weights_gb=g / 2, sleeping_gb=1.0,
                     ttl=30.0 if policies and m in ("b", "e") else 0.0, priority=3 if policies and m == "c" else 0,
                     max_waiting=2 if policies and m == "a" else 100)
        for m, g in MODELS.items() if limit is None or g <= limit
    }
    if replicas:  # r: up to 3 replicas of 10 GB; with 2, one is kept; more than 2 requests each → another
        specs.update({u: ModelSpec(10.0, group=REPLICATED, replica=i, replicas_min=replicas - 1, replicas_max=3,
                                   target_in_flight=2, replica_idle=15.0, sleep_level=sleep)
                      for i, u in enumerate(UNITS)})
    specs.update({a: ModelSpec(base=b) for a, b in ADAPTERS.items() if b in specs})
    cfg = SchedulerConfig(specs, max_resident, None if gpus else memory, load_timeout=300.0, max_wait=max_wait,
                          gpu_memory_gb=gpu_budgets, host_memory_gb=host, keep_idle=keep_idle,
                          max_waiting_total=6 if policies else 1000)
    w = world(make(cfg), max_resident, None if gpus else memory, gpu_budgets, host_budget=host)
    usable = sorted({(spec.group or name) if isinstance(spec, ModelSpec) else name for name, spec in specs.items()})
    w.replicated = REPLICATED in usable
    for op, pick, dt in ops:
        if op in (0, 7, 10):
            pick = ALL.index(usable[pick % len(usable)])
        w.step(op, pick, dt)
    w.settle()
    return w


@given(ops=ops, **settings)
def test_invariants_hold_and_every_request_is_answered_once(
    ops: list[tuple[int, int, float]], max_resident: int, memory: float | None, max_wait: float, gpus: bool,
    sleep: int, host: float | None, keep_idle: float, policies: bool, replicas: int,
) -> None:
    w = run_world(Scheduler, ops, max_resident, memory, max_wait, gpus, sleep, host, keep_idle, policies, replicas)
    assert not w.waiting
    for r in range(1, w.next_id):
        if r in w.cancelled:
            assert w.answers.get(r, 0) <= 1
        else:
            assert w.answers.get(r) == 1, f"request {r} answered {w.answers.get(r, 0)} times"


# ---------------------------------------------------------------- the fast path
class FullPassOnly(Scheduler):
    """The scheduler without its fast path: every event goes through (0) and the whole pass (1) to (9)."""

    def _fast_path(self, event: Event, now: float) -> list[Effect] | None:
        return None


class CheckedFastPath(Scheduler):
    """The scheduler, shadowed by one without the fast path that gets the same events at the same times:
    after every event both must have decided the same effects and show the same models.

    Timers are the one allowed difference: the fast path does not re-arm the timer when a grant takes
    away a model's ttl deadline, so it may ask for a Tick earlier than a full pass would (a Tick finds
    nothing to do), never later (no deadline is missed)."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.shadow = FullPassOnly(config)
        self.timer: float | None = None  # the Tick each one has asked for last
        self.shadow_timer: float | None = None

    def handle(self, event: Event, now: float) -> list[Effect]:
        fast = super().handle(event, now)
        full = self.shadow.handle(event, now)
        event_name = type(event).__name__
        assert [e for e in fast if not isinstance(e, TimerAt)] == [e for e in full if not isinstance(e, TimerAt)], (
            f"{event_name} at {now}: fast path {fast}, full pass {full}")
        assert self.view() == self.shadow.view(), f"{event_name} at {now}: the models differ"
        if isinstance(event, Tick):
            self.timer = self.shadow_timer = None
        self.timer = next((e.when for e in reversed(fast) if isinstance(e, TimerAt)), self.timer)
        self.shadow_timer = next((e.when for e in reversed(full) if isinstance(e, TimerAt)), self.shadow_timer)
        if self.shadow_timer is not None:
            assert self.timer is not None and self.timer <= self.shadow_timer, (
                f"{event_name} at {now}: the fast path asks for a Tick at {self.timer}, a full pass at "
                f"{self.shadow_timer}")
        return fast


class SameWorld(World):
    """The world of the invariants test, checking here only that the two schedulers agree (the budgets are
    the other test's business)."""

    def check(self) -> None:
        pass


@given(ops=ops, **settings)
def test_fast_path_decides_as_a_full_pass(
    ops: list[tuple[int, int, float]], max_resident: int, memory: float | None, max_wait: float, gpus: bool,
    sleep: int, host: float | None, keep_idle: float, policies: bool, replicas: int,
) -> None:
    run_world(CheckedFastPath, ops, max_resident, memory, max_wait, gpus, sleep, host, keep_idle, policies,
              replicas, world=SameWorld)


# ---------------------------------------------------------------- step 4's decision, kept while it stands
class PlansEveryPass(Scheduler):
    """The scheduler planning step 4 on every pass in full, never reusing the last decision, the finding
    that a load is blocked, nor that a load waiting in its room was still waiting."""

    def _plan_loads(self, p: Pass) -> None:
        self._step4 = None
        self._blocked.clear()
        self._room_seen.clear()
        self._front = None
        super()._plan_loads(p)


class CheckedStep4(CheckedFastPath):
    """The scheduler, shadowed by one that plans step 4 on every pass: the same effects, models and timers
    (no earlier or later Tick either) after every event."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.shadow = PlansEveryPass(config)


@given(ops=ops, **settings)
def test_a_kept_step_4_decision_is_what_planning_again_decides(
    ops: list[tuple[int, int, float]], max_resident: int, memory: float | None, max_wait: float, gpus: bool,
    sleep: int, host: float | None, keep_idle: float, policies: bool, replicas: int,
) -> None:
    run_world(CheckedStep4, ops, max_resident, memory, max_wait, gpus, sleep, host, keep_idle, policies,
              replicas, world=SameWorld)
