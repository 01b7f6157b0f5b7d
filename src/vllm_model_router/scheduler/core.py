"""Residency scheduler: which model is resident, who waits, who is granted, what is evicted.

``Scheduler.handle(event, now)`` is the only entry point. It never blocks, never reads a clock and
never touches a process or socket: it returns effects for the shell to carry out, and slow effects
(loads, stops) come back later as events. See docs/DESIGN.md for the reasoning.

The decision on every event (``_pump``), numbered as in the tests:

  (1) expire: a waiter older than ``load_timeout`` gets 504; a load older than ``load_timeout`` is
      stopped and its waiters get 504.
  (2) grant every waiter whose model is loaded and not draining (before planning, so that a model
      with waiters is busy and never picked as a victim).
  (3) plan loads, for models with waiters in the order of their oldest waiter:
      (a) it fits next to everything that holds capacity (loading, loaded, still stopping) → start;
      (b) evicting idle loaded models, least recently used first, makes it fit → stop those and start
          the load when their StopDone arrives (never while a victim is still stopping);
      (c) otherwise it must wait for busy models to drain; resident models keep being served, but once
          its oldest waiter has waited ``max_wait`` the busy victims stop taking new requests, so the
          load cannot starve. Later loads wait behind a blocked one (no overtaking).
      An operator's unload waits for in-flight requests (the model drains), then stops.
  (4) grant again: planning may have lifted a drain.
  (5) ask to be woken at the earliest deadline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from vllm_model_router.scheduler.effects import Effect, Grant, Reject, StartLoad, StopModel, WakeAt
from vllm_model_router.scheduler.events import (
    AdminUnload,
    Event,
    LoadDone,
    ModelExited,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    SetPinned,
    StopDone,
    Tick,
)
from vllm_model_router.scheduler.eviction import Budget, Occupant, fits, plan_eviction


class State(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


HOLDS_CAPACITY = frozenset({State.LOADING, State.LOADED, State.UNLOADING})
TIMED_OUT = "Timed out waiting for model to load"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    models: Mapping[str, float]  # name -> memory_gb, in configuration order
    max_resident: int
    memory_gb: float | None
    load_timeout: float
    max_wait: float


@dataclass(slots=True)
class _Model:
    name: str
    memory_gb: float
    order: int
    state: State = State.UNLOADED
    since: float = 0.0
    last_used: float = -math.inf
    in_flight: set[int] = field(default_factory=set)
    loads: int = 0
    failures: int = 0
    last_error: str | None = None
    load_started: float | None = None
    draining: bool = False
    unload_requested: bool = False
    stop_reason: str | None = None
    pinned: bool = False


@dataclass(slots=True)
class _Waiter:
    req_id: int
    model: str
    arrived: float


@dataclass(frozen=True, slots=True)
class ModelView:
    """A read-only snapshot of one model, for the admin API and metrics."""

    name: str
    state: State
    since: float
    last_used: float | None
    in_flight: int
    waiting: int
    memory_gb: float
    loads: int
    failures: int
    last_error: str | None
    draining: bool
    pinned: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, now: float = 0.0) -> None:
        self.config = config
        self.budget = Budget(config.max_resident, config.memory_gb)
        self._models = {
            name: _Model(name, mem, i, since=now) for i, (name, mem) in enumerate(config.models.items())
        }
        self._waiting: dict[int, _Waiter] = {}  # insertion order = arrival order
        self._granted: dict[int, str] = {}
        self._wake: float | None = None

    # ------------------------------------------------------------------ public
    def handle(self, event: Event, now: float) -> list[Effect]:
        out: list[Effect] = []
        match event:
            case RequestArrived(req_id, model):
                if model not in self._models:
                    raise KeyError(f"unknown model {model!r}")
                if req_id in self._waiting or req_id in self._granted:
                    raise ValueError(f"duplicate request id {req_id}")
                self._waiting[req_id] = _Waiter(req_id, model, now)
            case RequestCancelled(req_id) | RequestFinished(req_id):
                self._release(req_id, now)
            case LoadDone(model, ok, error):
                self._load_done(self._models[model], ok, error, now, out)
            case StopDone(model):
                m = self._models[model]
                if m.state is State.UNLOADING:
                    failed = m.stop_reason == TIMED_OUT
                    self._set_state(m, State.FAILED if failed else State.UNLOADED, now)
                    m.unload_requested = False
                    m.stop_reason = None
            case ModelExited(model, reason):
                m = self._models[model]
                if m.state in (State.LOADED, State.LOADING):
                    m.failures += 1
                    m.last_error = reason
                    m.unload_requested = False
                    self._set_state(m, State.FAILED, now)
            case AdminUnload(model, force):
                self._admin_unload(self._models[model], force, now, out)
            case SetPinned(model, pinned):
                self._models[model].pinned = pinned
            case Tick():
                self._wake = None  # always re-arm: a timer may fire a hair before its deadline
            case _:
                raise TypeError(f"unknown event {event!r}")
        self._pump(now, out)
        return out

    def view(self) -> list[ModelView]:
        waiting: dict[str, int] = {}
        for w in self._waiting.values():
            waiting[w.model] = waiting.get(w.model, 0) + 1
        return [
            ModelView(
                name=m.name,
                state=m.state,
                since=m.since,
                last_used=None if m.last_used == -math.inf else m.last_used,
                in_flight=len(m.in_flight),
                waiting=waiting.get(m.name, 0),
                memory_gb=m.memory_gb,
                loads=m.loads,
                failures=m.failures,
                last_error=m.last_error,
                draining=m.draining,
                pinned=m.pinned,
            )
            for m in self._models.values()
        ]

    def state_of(self, model: str) -> State:
        return self._models[model].state

    def is_waiting(self, req_id: int) -> bool:
        return req_id in self._waiting

    def resident(self) -> list[str]:
        return [m.name for m in self._models.values() if m.state in HOLDS_CAPACITY]

    # ----------------------------------------------------------------- private
    def _set_state(self, m: _Model, state: State, now: float) -> None:
        m.state = state
        m.since = now
        if state is not State.LOADING:
            m.load_started = None

    def _release(self, req_id: int, now: float) -> None:
        if self._waiting.pop(req_id, None) is not None:
            return
        model = self._granted.pop(req_id, None)
        if model is not None:
            m = self._models[model]
            m.in_flight.discard(req_id)
            m.last_used = now

    def _load_done(self, m: _Model, ok: bool, error: str, now: float, out: list[Effect]) -> None:
        if m.state is not State.LOADING:
            return  # a load that was cancelled by a stop; StopDone settles the state
        if ok:
            m.loads += 1
            m.last_error = None
            self._set_state(m, State.LOADED, now)
            return
        m.failures += 1
        m.last_error = error or "model failed to load"
        self._set_state(m, State.FAILED, now)
        message = f"Failed to load model {m.name}: {m.last_error}"
        for w in [w for w in self._waiting.values() if w.model == m.name]:
            del self._waiting[w.req_id]
            out.append(Reject(w.req_id, m.name, 503, message))

    def _admin_unload(self, m: _Model, force: bool, now: float, out: list[Effect]) -> None:
        if m.state is State.LOADING or (m.state is State.LOADED and (force or not m.in_flight)):
            self._stop(m, "unloaded by operator" + (" (forced)" if force else ""), now, out, force=force)
        elif m.state is State.LOADED:
            m.unload_requested = True  # stop once the in-flight requests finish; step (3)

    def _stop(self, m: _Model, reason: str, now: float, out: list[Effect], force: bool = False) -> None:
        m.stop_reason = reason
        m.draining = False
        self._set_state(m, State.UNLOADING, now)
        out.append(StopModel(m.name, reason, force=force))

    def _occupants(self) -> list[Occupant]:
        return [Occupant(m.name, m.memory_gb) for m in self._models.values() if m.state in HOLDS_CAPACITY]

    def _lru(self, models: Iterable[_Model]) -> list[_Model]:
        return sorted(models, key=lambda m: (m.last_used, m.since, m.order))

    def _grant(self, now: float, out: list[Effect]) -> None:
        for w in list(self._waiting.values()):
            m = self._models[w.model]
            if m.state is State.LOADED and not m.draining:
                del self._waiting[w.req_id]
                self._granted[w.req_id] = m.name
                m.in_flight.add(w.req_id)
                m.last_used = now
                out.append(Grant(w.req_id, m.name))

    def _pump(self, now: float, out: list[Effect]) -> None:
        cfg = self.config
        # (1) expire waiters and loads past load_timeout
        for w in [w for w in self._waiting.values() if now - w.arrived >= cfg.load_timeout]:
            del self._waiting[w.req_id]
            out.append(Reject(w.req_id, w.model, 504, f"{TIMED_OUT} {w.model} after {cfg.load_timeout:g}s"))
        for m in self._models.values():
            if m.state is State.LOADING and m.load_started is not None:
                if now - m.load_started >= cfg.load_timeout:
                    m.failures += 1
                    m.last_error = f"{TIMED_OUT}: not ready after {cfg.load_timeout:g}s"
                    self._stop(m, TIMED_OUT, now, out, force=True)
                    for w in [w for w in self._waiting.values() if w.model == m.name]:
                        del self._waiting[w.req_id]
                        out.append(Reject(w.req_id, m.name, 504, f"{TIMED_OUT} {m.name}: {m.last_error}"))

        # (2) serve what can be served first, so a model about to be used is never chosen as a victim
        self._grant(now, out)
        # (3) plan loads in the order of each model's oldest waiter
        drain: set[str] = set()
        oldest: dict[str, float] = {}
        for w in self._waiting.values():
            oldest.setdefault(w.model, w.arrived)
        blocked_since: float | None = None
        for name, first in oldest.items():
            target = self._models[name]
            if target.state not in (State.UNLOADED, State.FAILED):
                continue
            occupied = self._occupants()
            if fits(occupied, target.memory_gb, self.budget):  # (a)
                self._set_state(target, State.LOADING, now)
                target.load_started = now
                out.append(StartLoad(name))
                continue
            # what is already stopping will free its share: only evict more if that is not enough
            staying = [o for o in occupied if self._models[o.name].state is not State.UNLOADING]
            loaded = [m for m in self._models.values() if m.state is State.LOADED]
            idle = self._lru(m for m in loaded if not m.in_flight and not m.pinned)
            victims = plan_eviction(
                target.memory_gb, staying, [Occupant(m.name, m.memory_gb) for m in idle], self.budget
            )
            if victims == []:  # room is on its way: start on the StopDone
                break
            if victims:  # (b)
                for v in victims:
                    self._stop(self._models[v], f"evicted to make room for {name}", now, out)
                break
            # (c) wait for busy models to drain; after max_wait stop feeding the busy victims
            blocked_since = first
            if now - first >= cfg.max_wait:
                everyone = self._lru(m for m in loaded if not m.pinned)
                needed = plan_eviction(
                    target.memory_gb, staying, [Occupant(m.name, m.memory_gb) for m in everyone], self.budget
                )
                drain.update(needed or [])
            break

        # (3b) operator unloads that were waiting for in-flight requests
        for m in self._models.values():
            if m.state is State.LOADED and m.unload_requested:
                if m.in_flight:
                    drain.add(m.name)
                else:
                    self._stop(m, "unloaded by operator", now, out)
        for m in self._models.values():
            m.draining = m.state is State.LOADED and m.name in drain

        # (4) grant every waiter whose model is ready (again: a drain may just have been lifted)
        self._grant(now, out)

        # (5) the earliest deadline: a waiter's or a load's timeout, or the fairness bound
        deadlines = [w.arrived + cfg.load_timeout for w in self._waiting.values()]
        deadlines += [
            m.load_started + cfg.load_timeout
            for m in self._models.values()
            if m.state is State.LOADING and m.load_started is not None
        ]
        if blocked_since is not None and now - blocked_since < cfg.max_wait:
            deadlines.append(blocked_since + cfg.max_wait)
        wake = min(deadlines) if deadlines else None
        if wake is not None and wake != self._wake:
            out.append(WakeAt(wake))
        self._wake = wake
