"""Trace-driven simulation of residency scheduling, with a simulated clock (no processes, no sleeping).

Three ways to serve one request trace, for ``bench/simulate.py`` and the tests:

- ``simulate_router``: the router's own pure scheduler, fed through a discrete-event loop (a heap of
  timed events): arrivals, request completions after their service time, ``LoadDone`` a fixed load time
  after each ``StartLoad``, ``StopDone`` a fixed stop time after each ``StopModel``, and ``Tick`` when a
  ``TimerAt`` comes due. It checks the residency contract on the way (capacity, no busy model stopped,
  one process per model, every request answered exactly once) and raises ``SimulationError`` otherwise.
- ``simulate_naive_lru``: a plain swapper's policy: requests served strictly in arrival order (a FIFO queue
  with head-of-line blocking), the least recently used model evicted on every miss.
- ``belady_loads``: Belady's MIN on the sequence of requested models: the fewest loads any policy needs
  when requests are served in arrival order. A scheduler that reorders requests (serves those for a
  resident model first) can go below it, so it is a reference, not a floor for the router.

The traces it serves come from ``traces.py``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from vllm_model_router.scheduler import (
    Effect,
    Event,
    Grant,
    LoadDone,
    Reject,
    RequestArrived,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
    StartLoad,
    StopDone,
    StopModel,
    Tick,
    TimerAt,
)
from vllm_model_router.testing.traces import Trace

DEFAULT_STOP_TIME = 1.0
DEFAULT_MAX_WAIT = 30.0  # the router's default (config.DEFAULT_MAX_WAIT)
DEFAULT_LOAD_TIMEOUT = 20 * 60.0  # the router's default (config.DEFAULT_LOAD_TIMEOUT)


class SimulationError(AssertionError):
    """The scheduler broke the residency contract (or the simulation could not finish)."""


# ------------------------------------------------------------------------------------------- results
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class SimResult:
    loads: int
    waits: tuple[float, ...]  # arrival -> grant, for every granted request
    rejected: int = 0
    peak_resident: int = 0  # the most models holding capacity (loading, loaded or stopping) at once
    end: float = 0.0  # when the last event happened

    @property
    def mean_wait(self) -> float:
        return sum(self.waits) / len(self.waits) if self.waits else 0.0

    @property
    def p99_wait(self) -> float:
        return percentile(self.waits, 99)

    @property
    def max_wait(self) -> float:
        return max(self.waits, default=0.0)


# ------------------------------------------------------------------------------------------- Belady
def belady_loads(sequence: Sequence[str], capacity: int) -> int:
    """Misses of Belady's MIN (evict the resident item whose next request is furthest away, or never
    comes) on ``sequence`` with ``capacity`` slots, starting empty: the fewest loads possible when the
    requests are served in this order."""
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    n = len(sequence)
    next_use = [n] * n  # index of the next request for the same model (n: never)
    seen: dict[str, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = seen.get(sequence[i], n)
        seen[sequence[i]] = i
    resident: dict[str, int] = {}  # model -> index of its next request
    misses = 0
    for i, model in enumerate(sequence):
        if model not in resident:
            misses += 1
            if len(resident) >= capacity:
                victim = max(resident, key=lambda m: resident[m])
                del resident[victim]
        resident[model] = next_use[i]
    return misses


def lru_loads(sequence: Sequence[str], capacity: int) -> int:
    """Misses of plain LRU on ``sequence`` (what the naive simulator loads)."""
    resident: dict[str, None] = {}  # insertion order = recency order
    misses = 0
    for model in sequence:
        if model in resident:
            del resident[model]
        else:
            misses += 1
            if len(resident) >= capacity:
                del resident[next(iter(resident))]
        resident[model] = None
    return misses


# ----------------------------------------------------------------------------------------- naive LRU
def simulate_naive_lru(trace: Trace, load_time: float, stop_time: float = DEFAULT_STOP_TIME) -> SimResult:
    """A plain swapper's policy. Requests are granted strictly in arrival order; a request for a model that is
    not resident blocks everything behind it while the least recently used model finishes its requests
    in flight, stops, and the model loads. Granted requests for resident models run concurrently."""
    clock = 0.0  # when the head of the queue can be considered
    last_grant: dict[str, int] = {}  # resident models -> index of their last request (grants keep that order)
    busy_until: dict[str, float] = {}  # resident models -> when their requests in flight end
    waits: list[float] = []
    loads = 0
    for i, r in enumerate(trace.requests):
        clock = max(clock, r.at)
        if r.model not in last_grant:
            if len(last_grant) >= trace.capacity:
                victim = min(last_grant, key=lambda m: last_grant[m])
                clock = max(clock, busy_until.pop(victim)) + stop_time
                del last_grant[victim]
            clock += load_time
            loads += 1
            busy_until[r.model] = clock
        last_grant[r.model] = i
        busy_until[r.model] = max(busy_until[r.model], clock + r.service)
        waits.append(clock - r.at)
    end = max(busy_until.values(), default=0.0)
    return SimResult(loads, tuple(waits), 0, min(trace.capacity, len(set(trace.sequence))), end)


# ------------------------------------------------------------------------------------ the router's own
_ARRIVE, _FINISH, _LOAD_DONE, _STOP_DONE, _TICK = range(5)


def scheduler_config(trace: Trace, *, max_wait: float = DEFAULT_MAX_WAIT,
                     load_timeout: float = DEFAULT_LOAD_TIMEOUT, keep_idle: float | None = None,
                     keep_idle_reloads: float | None = None) -> SchedulerConfig:
    """The router's configuration for a trace: every model the same size, ``capacity`` slots; the idle
    protection (``keep_idle``, ``keep_idle_reloads``) the router's defaults unless given."""
    cfg = SchedulerConfig(
        models=dict.fromkeys(trace.models, 0.0),
        max_resident=trace.capacity,
        memory_gb=None,
        load_timeout=load_timeout,
        max_wait=max_wait,
    )
    if keep_idle is not None:
        cfg = replace(cfg, keep_idle=keep_idle)
    if keep_idle_reloads is not None:
        cfg = replace(cfg, keep_idle_reloads=keep_idle_reloads)
    return cfg


@dataclass(slots=True)
class RouterSim:
    trace: Trace
    scheduler: Scheduler
    load_time: float
    stop_time: float
    now: float = 0.0
    heap: list[tuple[float, int, int, int | str]] = field(default_factory=list)
    seq: int = 0
    timer: float | None = None  # when the scheduler's last TimerAt asked for a Tick
    running: set[str] = field(default_factory=set)  # a process exists: loading, up or stopping
    up: set[str] = field(default_factory=set)
    loading: dict[str, int] = field(default_factory=dict)  # model -> serial of its pending load
    pending: dict[int, str] = field(default_factory=dict)  # serial -> model, for loads not cancelled
    in_flight: dict[int, str] = field(default_factory=dict)
    answered: dict[int, bool] = field(default_factory=dict)  # req -> granted (True) or rejected
    waits: list[float] = field(default_factory=list)
    loads: int = 0
    peak: int = 0

    def push(self, when: float, kind: int, payload: int | str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, kind, payload))

    def feed(self, event: Event) -> None:
        for effect in self.scheduler.handle(event, self.now):
            self.apply(effect)

    def apply(self, effect: Effect) -> None:
        match effect:
            case StartLoad(model):
                if model in self.running:
                    raise SimulationError(f"t={self.now:.3f}: second process of {model}")
                self.running.add(model)
                if len(self.running) > self.trace.capacity:
                    raise SimulationError(f"t={self.now:.3f}: {sorted(self.running)} over capacity "
                                          f"{self.trace.capacity}")
                self.peak = max(self.peak, len(self.running))
                self.loads += 1
                self.loading[model] = self.loads
                self.pending[self.loads] = model
                self.push(self.now + self.load_time, _LOAD_DONE, self.loads)
            case StopModel(model, _, _, force):
                if model not in self.running:
                    raise SimulationError(f"t={self.now:.3f}: stop of {model}, which has no process")
                if not force and model in self.in_flight.values():
                    raise SimulationError(f"t={self.now:.3f}: stopped {model} with requests in flight")
                self.up.discard(model)
                serial = self.loading.pop(model, None)
                if serial is not None:  # a stop cancels a load in progress: no LoadDone comes back
                    del self.pending[serial]
                self.push(self.now + self.stop_time, _STOP_DONE, model)
            case Grant(req_id, model):
                if req_id in self.answered:
                    raise SimulationError(f"t={self.now:.3f}: request {req_id} answered twice")
                if model not in self.up:
                    raise SimulationError(f"t={self.now:.3f}: request {req_id} granted on {model}, not up")
                request = self.trace.requests[req_id]
                self.answered[req_id] = True
                self.in_flight[req_id] = model
                self.waits.append(self.now - request.at)
                self.push(self.now + request.service, _FINISH, req_id)
            case Reject(req_id, _, _, _):
                if req_id in self.answered:
                    raise SimulationError(f"t={self.now:.3f}: request {req_id} answered twice")
                self.answered[req_id] = False
            case TimerAt(when):
                # a deadline the scheduler found not yet due at this very instant (float rounding) comes
                # back as the same time: deliver it a hair later instead of looping on one instant
                when = max(when, math.nextafter(self.now, math.inf)) if when <= self.now else when
                self.timer = when
                if math.isfinite(when):
                    self.push(when, _TICK, 0)
            case _:
                raise SimulationError(f"the simulator does not know the effect {effect!r}: teach it how to "
                                      "carry it out (and which event completes it)")

    def run(self) -> SimResult:
        for i, r in enumerate(self.trace.requests):
            self.push(r.at, _ARRIVE, i)
        budget = 100 * len(self.trace.requests) + 10_000  # events; a guard against a livelock
        while self.heap:
            budget -= 1
            if budget < 0:
                raise SimulationError(f"t={self.now:.3f}: the simulation does not settle")
            when, _, kind, payload = heapq.heappop(self.heap)
            if kind == _TICK and when != self.timer:
                continue  # superseded by a later TimerAt
            self.now = when
            if kind == _ARRIVE:
                assert isinstance(payload, int)
                self.feed(RequestArrived(payload, self.trace.requests[payload].model))
            elif kind == _FINISH:
                assert isinstance(payload, int)
                del self.in_flight[payload]
                self.feed(RequestFinished(payload))
            elif kind == _LOAD_DONE:
                assert isinstance(payload, int)
                model = self.pending.pop(payload, None)
                if model is None:
                    continue  # cancelled by a stop
                del self.loading[model]
                self.up.add(model)
                self.feed(LoadDone(model, True))
            elif kind == _STOP_DONE:
                assert isinstance(payload, str)
                self.running.discard(payload)
                self.feed(StopDone(payload))
            else:
                self.timer = None
                self.feed(Tick())
        missing = len(self.trace.requests) - len(self.answered)
        if missing:
            raise SimulationError(f"{missing} requests were never answered")
        rejected = sum(1 for granted in self.answered.values() if not granted)
        return SimResult(self.loads, tuple(self.waits), rejected, self.peak, self.now)


def simulate_router(trace: Trace, load_time: float, *, stop_time: float = DEFAULT_STOP_TIME,
                    max_wait: float = DEFAULT_MAX_WAIT, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
                    config: SchedulerConfig | None = None,
                    make_scheduler: Callable[[SchedulerConfig], Scheduler] = Scheduler) -> SimResult:
    """Replay ``trace`` through the router's scheduler; loads take ``load_time`` and stops ``stop_time``
    seconds. ``config`` (default: ``scheduler_config(trace, ...)``) and ``make_scheduler`` let a caller
    try other settings or policies. Waits are arrival -> grant, in the order requests were granted."""
    cfg = config or scheduler_config(trace, max_wait=max_wait, load_timeout=load_timeout)
    return RouterSim(trace, make_scheduler(cfg), load_time, stop_time).run()


# ------------------------------------------------------------------------------------------ a report
@dataclass(frozen=True, slots=True)
class Comparison:
    """One trace and load time served three ways."""

    trace: str
    models: int
    capacity: int
    requests: int
    load_time: float
    router: SimResult
    naive: SimResult
    belady: int

    @property
    def ratio(self) -> float:
        """Router loads / Belady's (below 1: the router batched requests, which arrival order cannot)."""
        return self.router.loads / self.belady if self.belady else math.inf

    def as_dict(self) -> dict[str, object]:
        def summary(r: SimResult) -> dict[str, object]:
            return {"loads": r.loads, "mean_wait_s": round(r.mean_wait, 3), "p99_wait_s": round(r.p99_wait, 3),
                    "max_wait_s": round(r.max_wait, 3), "rejected": r.rejected}

        return {
            "trace": self.trace, "models": self.models, "capacity": self.capacity, "requests": self.requests,
            "load_time_s": self.load_time, "router": summary(self.router), "naive_lru": summary(self.naive),
            "belady_loads": self.belady, "router_over_belady": round(self.ratio, 3),
        }


def compare(trace: Trace, load_time: float, *, stop_time: float = DEFAULT_STOP_TIME,
            max_wait: float = DEFAULT_MAX_WAIT, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
            keep_idle: float | None = None, keep_idle_reloads: float | None = None) -> Comparison:
    cfg = scheduler_config(trace, max_wait=max_wait, load_timeout=load_timeout, keep_idle=keep_idle,
                           keep_idle_reloads=keep_idle_reloads)
    router = simulate_router(trace, load_time, stop_time=stop_time, config=cfg)
    naive = simulate_naive_lru(trace, load_time, stop_time)
    return Comparison(trace.name, len(trace.models), trace.capacity, len(trace.requests), load_time, router, naive,
                      belady_loads(trace.sequence, trace.capacity))
