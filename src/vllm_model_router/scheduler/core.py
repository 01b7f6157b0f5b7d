"""Residency scheduler: which model is resident, who waits, who is granted, what is evicted.

``Scheduler.handle(event, now)`` is the only entry point. It never blocks, never reads a clock and
never touches a process or socket: it returns effects for the shell to carry out, and slow effects
(loads, stops) come back later as events. See docs/DESIGN.md for the reasoning.

Models live in capacity *domains*: top-level models share the global budget (``max_resident`` and
``memory_gb``); adapters share their base's ``max_adapters``. An adapter is servable only while its base
is loaded, a request on an adapter keeps its base busy too, and a base that goes away drops its
adapters. An *external* model (the engine in endpoint mode) is always loaded and never managed.

The decision on every event (``_pump``), numbered as in the tests:

  (1) expire: a waiter older than ``load_timeout`` gets 504; a load older than ``load_timeout`` is
      stopped and its waiters get 504.
  (2) grant every waiter whose model is loaded and not draining (before planning, so that a model
      with waiters is busy and never picked as a victim).
  (3) over budget (something was loaded behind the router's back) → stop idle ones, LRU first.
  (4) plan loads, for models with waiters in the order of their oldest waiter (an adapter whose base
      is not loaded plans its base first):
      (a) it fits next to everything that holds capacity (loading, loaded, still stopping) → start;
      (b) evicting idle loaded models, least recently used first, makes it fit → stop those and start
          the load when their StopDone arrives (never while a victim is still stopping);
      (c) otherwise it must wait for busy models to drain; resident models keep being served, but once
          its oldest waiter has waited ``max_wait`` the busy victims stop taking new requests, so the
          load cannot starve. Later loads wait behind a blocked one (no overtaking).
      An operator's unload waits for in-flight requests (the model drains), then stops.
  (5) grant again: planning may have lifted a drain.
  (6) ask to be woken at the earliest deadline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from vllm_model_router.scheduler.effects import (
    Effect,
    Grant,
    Reject,
    SleepModel,
    StartLoad,
    StopModel,
    WakeAt,
    WakeModel,
)
from vllm_model_router.scheduler.events import (
    AdminUnload,
    Event,
    GpuUsage,
    LoadDone,
    ModelAdded,
    ModelExited,
    ModelFound,
    ModelSpec,
    Preload,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    SetPinned,
    SleepDone,
    StopDone,
    Tick,
    WakeDone,
)
from vllm_model_router.scheduler.eviction import Budget, Candidate, Occupant, choose_placement


class State(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"
    FALLING_ASLEEP = "falling_asleep"
    SLEEPING = "sleeping"
    WAKING = "waking"


# holding memory (a sleeper only its residue); COUNTS: against max_resident (everything awake or on the way)
HOLDS_CAPACITY = frozenset({State.LOADING, State.LOADED, State.UNLOADING, State.FALLING_ASLEEP, State.SLEEPING,
                            State.WAKING})
COUNTS = HOLDS_CAPACITY - {State.SLEEPING}
LOADABLE = frozenset({State.UNLOADED, State.FAILED})  # cold: a load starts a process
WANTS_IN = LOADABLE | {State.SLEEPING}  # what a request can bring in: a cold load or a wake
TIMED_OUT = "Timed out waiting for model to load"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    models: Mapping[str, ModelSpec | float]  # name -> spec (or just memory_gb), in configuration order
    max_resident: int
    memory_gb: float | None
    load_timeout: float
    max_wait: float
    gpu_memory_gb: Mapping[int, float] | None = None  # per-GPU budgets when GPUs are known
    host_memory_gb: float | None = None  # what level-1 sleepers' weights may take in host RAM
    host_overflow: str = "stop"  # host budget full: "stop" the oldest level-1 sleeper, or sleep at "level2"
    keep_idle: float = 0.0  # a model in steady use is kept this long after its last request (0: off)
    max_waiting_total: int = 1000  # requests waiting for any model beyond this get 429
    retry_after: float = 5.0  # what a 429 suggests
    last_used: Mapping[str, float] | None = None  # restored history (scheduler clock), for the LRU order


@dataclass(slots=True)
class _Model:
    name: str
    spec: ModelSpec
    order: int
    state: State = State.UNLOADED
    since: float = 0.0
    last_used: float = -math.inf
    in_flight: set[int] = field(default_factory=set)
    loads: int = 0
    failures: int = 0
    out_of_band: int = 0
    last_error: str | None = None
    load_started: float | None = None
    drain_seq: int | None = None  # while set, waiters that arrived after this one are held back
    unload_requested: bool = False
    stop_reason: str | None = None
    pinned: bool = False
    placed: tuple[int, ...] = ()  # the GPUs it holds memory on while loading, loaded or stopping
    asleep_level: int = 0  # the level of the current sleep (falling asleep or sleeping)
    wakes: int = 0
    sleeps: int = 0
    last_arrival: float | None = None
    gap: float | None = None  # smoothed time between its requests: small means in steady use
    load_seconds: float | None = None  # how long its last cold load took: what evicting it would cost

    @property
    def memory_gb(self) -> float:
        return self.spec.memory_gb

    @property
    def base(self) -> str | None:
        return self.spec.base

    @property
    def draining(self) -> bool:
        return self.drain_seq is not None

    def admits(self, seq: int) -> bool:
        return self.state is State.LOADED and (self.drain_seq is None or seq <= self.drain_seq)


@dataclass(slots=True)
class _Waiter:
    req_id: int
    model: str
    arrived: float
    seq: int  # arrival order


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
    base: str | None = None
    external: bool = False
    out_of_band: int = 0
    gpus: tuple[int, ...] = ()
    sleep_level: int = 0  # the level it sleeps at now (0: not asleep)
    wakes: int = 0
    sleeps: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, now: float = 0.0) -> None:
        self.config = config
        self.budget = Budget(config.max_resident, config.memory_gb, dict(config.gpu_memory_gb or {}))
        self._nominal = self.budget  # without what other processes hold (see GpuUsage)
        self._models: dict[str, _Model] = {}
        for name, spec in config.models.items():
            self._add(name, spec if isinstance(spec, ModelSpec) else ModelSpec(memory_gb=spec), now)
        for name, at in (config.last_used or {}).items():
            if name in self._models:
                self._models[name].last_used = at
        self._waiting: dict[int, _Waiter] = {}  # insertion order = arrival order
        self._granted: dict[int, str] = {}
        self._seq = 0
        self._wake: float | None = None

    # ------------------------------------------------------------------ public
    def handle(self, event: Event, now: float) -> list[Effect]:
        fast = self._fast_path(event, now)
        if fast is not None:
            return fast
        out: list[Effect] = []
        match event:
            case RequestArrived(req_id, model):
                if model not in self._models:
                    raise KeyError(f"unknown model {model!r}")
                if req_id in self._waiting or req_id in self._granted:
                    raise ValueError(f"duplicate request id {req_id}")
                m = self._models[model]
                self._note_arrival(m, now)
                if not self._servable(m, self._seq + 1) and self._queue_full(m):
                    out.append(Reject(req_id, model, 429, f"too many requests waiting for {model}; try again later",
                                      retry_after=self.config.retry_after))
                else:
                    self._seq += 1
                    self._waiting[req_id] = _Waiter(req_id, model, now, self._seq)
            case RequestCancelled(req_id) | RequestFinished(req_id):
                self._release(req_id, now)
            case LoadDone(model, ok, error, status):
                self._load_done(self._models[model], ok, error, status, now, out)
            case SleepDone(model, ok, error):
                m = self._models[model]
                if m.state is State.FALLING_ASLEEP:
                    if ok:
                        m.sleeps += 1
                        self._set_state(m, State.SLEEPING, now)
                    else:
                        m.last_error = f"could not be put to sleep: {error}"
                        self._stop(m, "sleep failed", now, out, force=True)
            case WakeDone(model, ok, error):
                m = self._models[model]
                if m.state is State.WAKING:
                    if ok:
                        m.wakes += 1
                        m.asleep_level = 0
                        m.last_error = None
                        self._set_state(m, State.LOADED, now)
                    else:  # fall back to stop + cold start: the waiters stay and bring it back cold
                        m.failures += 1
                        m.last_error = f"wake failed: {error}"
                        self._stop(m, "wake failed", now, out, force=True)
            case StopDone(model):
                m = self._models[model]
                if m.state is State.UNLOADING:
                    failed = m.stop_reason == TIMED_OUT
                    self._set_state(m, State.FAILED if failed else State.UNLOADED, now)
                    m.unload_requested = False
                    m.stop_reason = None
            case ModelExited(model, reason, failed):
                m = self._models[model]
                awake_or_asleep = (State.LOADED, State.LOADING, State.FALLING_ASLEEP, State.SLEEPING, State.WAKING)
                if m.state in awake_or_asleep and not m.spec.external:
                    m.last_error = reason
                    m.unload_requested = False
                    if failed:
                        m.failures += 1
                    else:
                        m.out_of_band += 1
                    self._set_state(m, State.FAILED if failed else State.UNLOADED, now)
            case ModelFound(model, gpus):
                m = self._models[model]
                base = self._models[m.base] if m.base else None
                if m.state in LOADABLE and (base is None or base.state is State.LOADED):
                    m.out_of_band += 1
                    self._set_state(m, State.LOADED, now)
                    if base is None:
                        m.placed = gpus
            case ModelAdded(model, spec):
                if model not in self._models:
                    self._add(model, spec, now)
            case AdminUnload(model, force):
                self._admin_unload(self._models[model], force, now, out)
            case SetPinned(model, pinned):
                self._models[model].pinned = pinned
            case Preload(model):
                self._preload(self._models[model], now, out)
            case GpuUsage(foreign):
                taken = dict(foreign)
                nominal = self.config.gpu_memory_gb or {}
                self.budget = Budget(self.config.max_resident, self.config.memory_gb,
                                     {g: max(0.0, b - taken.get(g, 0.0)) for g, b in nominal.items()})
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
                base=m.base,
                external=m.spec.external,
                out_of_band=m.out_of_band,
                gpus=m.placed,
                sleep_level=m.asleep_level,
                wakes=m.wakes,
                sleeps=m.sleeps,
            )
            for m in self._models.values()
        ]

    def state_of(self, model: str) -> State:
        return self._models[model].state

    def knows(self, model: str) -> bool:
        return model in self._models

    def is_waiting(self, req_id: int) -> bool:
        return req_id in self._waiting

    def resident(self) -> list[str]:
        """Models holding a place against max_resident (sleepers excluded)."""
        return [m.name for m in self._models.values() if m.state in COUNTS and not m.spec.external]

    def host_usage(self) -> float:
        """Host RAM the level-1 sleepers' weights take (those being stopped excluded: on their way out)."""
        return sum(m.spec.weights_gb for m in self._models.values()
                   if m.state in (State.SLEEPING, State.FALLING_ASLEEP) and m.asleep_level == 1)

    # ----------------------------------------------------------------- private
    def _add(self, name: str, spec: ModelSpec, now: float) -> None:
        if spec.base is not None and spec.base not in self._models:
            raise KeyError(f"model {name!r}: unknown base {spec.base!r}")
        m = _Model(name, spec, len(self._models), since=now)
        if spec.external:
            m.state = State.LOADED
        self._models[name] = m

    def _children(self, base: _Model) -> list[_Model]:
        return [m for m in self._models.values() if m.base == base.name]

    def _set_state(self, m: _Model, state: State, now: float) -> None:
        m.state = state
        m.since = now
        if state not in (State.LOADING, State.WAKING):
            m.load_started = None
        if state in LOADABLE:
            m.placed = ()
            m.asleep_level = 0
        if state is not State.LOADED:
            m.drain_seq = None
            # a base that is no longer loaded takes its adapters with it
            for child in self._children(m):
                if child.state in HOLDS_CAPACITY:
                    child.last_error = f"base {m.name} is {state.value}"
                    child.unload_requested = False
                    self._set_state(child, State.UNLOADED, now)

    def _release(self, req_id: int, now: float) -> None:
        if self._waiting.pop(req_id, None) is not None:
            return
        model = self._granted.pop(req_id, None)
        if model is not None:
            m = self._models[model]
            m.in_flight.discard(req_id)
            m.last_used = now
            if m.base is not None:
                base = self._models[m.base]
                base.in_flight.discard(req_id)
                base.last_used = now

    def _reject_waiters(self, m: _Model, status: int, message: str, out: list[Effect]) -> None:
        for w in [w for w in self._waiting.values() if w.model == m.name]:
            del self._waiting[w.req_id]
            out.append(Reject(w.req_id, m.name, status, message))

    def _load_done(self, m: _Model, ok: bool, error: str, status: int, now: float, out: list[Effect]) -> None:
        if m.state is not State.LOADING:
            return  # a load that was cancelled by a stop; StopDone settles the state
        if ok:
            m.loads += 1
            m.last_error = None
            if m.load_started is not None:
                m.load_seconds = now - m.load_started
            self._set_state(m, State.LOADED, now)
            return
        m.failures += 1
        m.last_error = error or "model failed to load"
        self._set_state(m, State.FAILED, now)
        self._reject_waiters(m, status, f"Failed to load model {m.name}: {m.last_error}", out)
        # an adapter's waiters wait on its base too: a failed base fails them as well
        for child in self._children(m):
            self._reject_waiters(child, status, f"Failed to load base model {m.name} of {child.name}: "
                                                f"{m.last_error}", out)

    def _admin_unload(self, m: _Model, force: bool, now: float, out: list[Effect]) -> None:
        if m.spec.external:
            return
        asleep = (State.LOADING, State.FALLING_ASLEEP, State.SLEEPING, State.WAKING)
        if m.state in asleep or (m.state is State.LOADED and (force or not self._busy(m))):
            self._stop(m, "unloaded by operator" + (" (forced)" if force else ""), now, out, force=force)
        elif m.state is State.LOADED:
            m.unload_requested = True  # stop once the in-flight requests finish

    def _stop(self, m: _Model, reason: str, now: float, out: list[Effect], force: bool = False) -> None:
        m.stop_reason = reason
        self._set_state(m, State.UNLOADING, now)
        out.append(StopModel(m.name, reason, force=force))

    def _busy(self, m: _Model) -> bool:
        """In flight, or (for a base) an adapter of it is being loaded or unloaded."""
        if m.in_flight:
            return True
        return any(c.state in (State.LOADING, State.UNLOADING) for c in self._children(m))

    def _domain(self, base: str | None) -> tuple[list[_Model], Budget]:
        members = [
            m for m in self._models.values()
            if m.base == base and not m.spec.external and m.state in HOLDS_CAPACITY
        ]
        if base is None:
            return members, self.budget
        return members, Budget(self._models[base].spec.max_adapters, None)

    def _lru(self, models: Iterable[_Model]) -> list[_Model]:
        """Eviction order: lower priority first, then least recently used."""
        return sorted(models, key=lambda m: (m.spec.priority, m.last_used, m.since, m.order))

    def _queue_full(self, m: _Model) -> bool:
        waiting_here = sum(1 for w in self._waiting.values() if w.model == m.name)
        return waiting_here >= m.spec.max_waiting or len(self._waiting) >= self.config.max_waiting_total

    def _hot_until(self, m: _Model) -> float:
        """In steady use, a model's next request is expected within its usual gap: it stays protected until
        it is overdue (twice its smoothed gap), or keep_idle has passed since its last request, or as long
        as reloading it would take (protecting a model that comes back in 2 s for longer than 2 s only
        makes clients wait), whichever comes first. A model used once, or whose user has moved on, is not
        protected for long."""
        keep = self.config.keep_idle
        if keep <= 0 or m.gap is None:
            return -math.inf
        return m.last_used + min(keep, 2 * m.gap, m.load_seconds if m.load_seconds is not None else keep)

    def _hot(self, m: _Model, now: float) -> bool:
        """Protected from eviction for a newcomer until the newcomer has waited max_wait (swaps in batches)."""
        return now < self._hot_until(m)

    def _idle_for(self, m: _Model, now: float) -> float:
        return now - max(m.last_used, m.since)

    def _preload(self, m: _Model, now: float, out: list[Effect]) -> None:
        """Start (or wake) ``m`` only if it fits next to everything without evicting anything."""
        if m.state not in WANTS_IN or m.base is not None:
            return
        members, budget = self._domain(None)
        members = [x for x in members if x is not m]
        options = [m.placed] if m.state is State.SLEEPING and m.placed else self._options(m)
        placement, victims = choose_placement(m.memory_gb, self._occ(members), [], budget, options)
        if victims == []:
            self._bring_in(m, placement, now, out)

    def _bring_in(self, m: _Model, placement: tuple[int, ...], now: float, out: list[Effect]) -> None:
        """Wake a sleeper (where it sleeps) or start a cold load (on ``placement``)."""
        if m.state is State.SLEEPING:
            self._set_state(m, State.WAKING, now)
            out.append(WakeModel(m.name, m.asleep_level))
        else:
            self._set_state(m, State.LOADING, now)
            m.placed = placement
            out.append(StartLoad(m.name, placement))
        m.load_started = now

    def _servable(self, m: _Model, seq: int) -> bool:
        return m.admits(seq) and (m.base is None or self._models[m.base].admits(seq))

    def _fast_path(self, event: Event, now: float) -> list[Effect] | None:
        """The common case, without a full pass: nobody is waiting, and a request arrives for a model that
        is ready (granted at once), or a request finishes on a model with nothing pending on its idleness
        (no ttl to arm, no operator unload waiting for it). Whatever a full pass would decide differently
        needs a waiter, a ttl or an unload request, so the answer is the same (the property tests check
        it). Returns None when the full pass is needed."""
        if self._waiting:
            return None
        if isinstance(event, RequestArrived):
            m = self._models.get(event.model)
            if m is None or event.req_id in self._granted or not self._servable(m, self._seq + 1):
                return None
            self._note_arrival(m, now)
            self._seq += 1
            self._grant_one(event.req_id, m, now)
            return [Grant(event.req_id, m.name)]
        if isinstance(event, RequestFinished | RequestCancelled):
            model = self._granted.get(event.req_id)
            if model is None:
                return None
            chain = [self._models[model]]
            if chain[0].base is not None:
                chain.append(self._models[chain[0].base])
            if any(x.spec.ttl > 0 or x.unload_requested for x in chain):
                return None
            self._release(event.req_id, now)
            return []
        return None

    def _note_arrival(self, m: _Model, now: float) -> None:
        if m.last_arrival is not None:
            gap = now - m.last_arrival
            m.gap = gap if m.gap is None else 0.7 * m.gap + 0.3 * gap
        m.last_arrival = now

    def _grant_one(self, req_id: int, m: _Model, now: float) -> None:
        self._granted[req_id] = m.name
        m.in_flight.add(req_id)
        m.last_used = now
        if m.base is not None:
            base = self._models[m.base]
            base.in_flight.add(req_id)
            base.last_used = now

    def _grant(self, now: float, out: list[Effect]) -> None:
        for w in list(self._waiting.values()):
            m = self._models[w.model]
            if self._servable(m, w.seq):
                del self._waiting[w.req_id]
                self._grant_one(w.req_id, m, now)
                out.append(Grant(w.req_id, m.name))

    @staticmethod
    def _occ1(m: _Model) -> Occupant:
        if m.state is State.SLEEPING:
            return Occupant(m.name, m.spec.sleeping_gb, m.placed, counts=False)
        return Occupant(m.name, m.memory_gb, m.placed)

    def _occ(self, models: Iterable[_Model]) -> list[Occupant]:
        return [self._occ1(m) for m in models]

    def _candidates(self, loaded: Iterable[_Model], sleepers: Iterable[_Model], sleep: bool = True) -> list[Candidate]:
        """Ways to make room, in order: idle awake models, least recently used first (put to sleep when
        they can sleep and ``sleep``, else stopped), then sleepers, least recently used first (stopped)."""
        out = []
        for m in self._lru(loaded):
            can_sleep = sleep and m.spec.sleep_level
            asleep = Occupant(m.name, m.spec.sleeping_gb, m.placed, counts=False) if can_sleep else None
            out.append(Candidate(self._occ1(m), asleep))
        out += [Candidate(self._occ1(m)) for m in self._lru(sleepers)]
        return out

    def _evict(self, m: _Model, reason: str, now: float, out: list[Effect], sleep: bool = True) -> None:
        """Make room with ``m``: a sleeper is stopped; an awake model sleeps if it can (and ``sleep``), else
        it is stopped."""
        if m.state is State.LOADED and m.spec.sleep_level and sleep:
            level = m.spec.sleep_level
            budget = self.config.host_memory_gb
            if level == 1 and budget is not None and self.host_usage() + m.spec.weights_gb > budget + 1e-9:
                if m.spec.weights_gb > budget + 1e-9 or self.config.host_overflow == "level2":
                    level = 2  # its weights will not fit in host RAM: drop them instead of keeping them
                # with "stop", the oldest level-1 sleepers make way (step 3c)
            m.asleep_level = level
            self._set_state(m, State.FALLING_ASLEEP, now)
            m.stop_reason = reason
            out.append(SleepModel(m.name, level, reason))
        else:
            self._stop(m, reason, now, out)

    def _options(self, m: _Model) -> list[tuple[int, ...]]:
        """Where ``m`` may go: its fixed GPUs, any one GPU, or (no GPUs known, or an adapter) nowhere in
        particular."""
        if m.base is not None or not self.budget.gpu_memory_gb:
            return [()]
        if m.spec.gpus:
            return [m.spec.gpus]
        return [(g,) for g in sorted(self.budget.gpu_memory_gb)]

    def _pump(self, now: float, out: list[Effect]) -> None:
        cfg = self.config
        # (1) expire waiters and loads past load_timeout
        for w in [w for w in self._waiting.values() if now - w.arrived >= cfg.load_timeout]:
            del self._waiting[w.req_id]
            out.append(Reject(w.req_id, w.model, 504, f"{TIMED_OUT} {w.model} after {cfg.load_timeout:g}s"))
        for m in list(self._models.values()):
            if m.state in (State.LOADING, State.WAKING) and m.load_started is not None:
                if now - m.load_started >= cfg.load_timeout:
                    m.failures += 1
                    m.last_error = f"{TIMED_OUT}: not ready after {cfg.load_timeout:g}s"
                    self._stop(m, TIMED_OUT, now, out, force=True)
                    self._reject_waiters(m, 504, f"{TIMED_OUT} {m.name}: {m.last_error}", out)

        # (2) serve what can be served first, so a model about to be used is never chosen as a victim
        self._grant(now, out)

        # (3) over budget (loaded behind our back): stop idle ones until it fits again
        for domain in [None, *(m.name for m in self._models.values() if m.state is State.LOADED)]:
            members, budget = self._domain(domain)
            members = [m for m in members if m.state in COUNTS and m.state is not State.UNLOADING]
            over = len(members) - budget.max_resident
            if budget.memory_gb is not None:
                over = max(over, 1 if sum(m.memory_gb for m in members) > budget.memory_gb + 1e-9 else 0)
            if over > 0:
                idle = self._lru(m for m in members if m.state is State.LOADED and not m.pinned and not self._busy(m))
                for victim in idle[:over]:
                    self._stop(victim, "over capacity (loaded outside the router)", now, out)

        # (4) plan loads in the order of each model's oldest waiter
        # A drain holds back only the requests that arrived after the starved one: older requests for a
        # draining model are still served (otherwise a base drained for a newer request could be reloaded
        # for an older adapter request, and so on for ever).
        drain: dict[str, int] = {}
        oldest: dict[str, _Waiter] = {}
        for w in self._waiting.values():
            oldest.setdefault(w.model, w)
        blocked_since: float | None = None
        cooling: list[float] = []  # when hot models that hold a waiter back cool down
        by_priority = sorted(oldest.items(), key=lambda kv: (-self._models[kv[0]].spec.priority, kv[1].seq))
        for name, first_waiter in by_priority:
            first = first_waiter.arrived
            target = self._models[name]
            if target.state not in WANTS_IN:
                continue
            if target.base is not None:
                base = self._models[target.base]
                if base.state in WANTS_IN:
                    target = base  # the adapter needs its base first
                elif not base.admits(first_waiter.seq):
                    continue  # the base is on its way in or out: its adapters wait for it
            if target.state not in WANTS_IN:
                continue  # already started in this pass
            waking = target.state is State.SLEEPING
            members, budget = self._domain(target.base)
            members = [m for m in members if m is not target]  # a sleeper's own residue becomes its need
            options = [target.placed] if waking and target.placed else self._options(target)
            need = target.memory_gb
            if target.base is None and budget is not self._nominal and all(
                any(need > budget.gpu_memory_gb.get(g, 0.0) + 1e-9 for g in p) for p in options if p
            ):
                # others' use leaves no GPU where it could ever fit: plan as if it were not there, and let
                # the start-time check name the processes that hold the memory (a 503, not a long wait)
                budget = self._nominal
            placement, victims = choose_placement(need, self._occ(members), [], budget, options)
            if victims == []:  # (a)
                self._bring_in(target, placement, now, out)
                continue
            # what is already stopping (or falling asleep) will free its share: only evict more if that
            # is not enough
            staying = [
                Occupant(m.name, m.spec.sleeping_gb, m.placed, counts=False) if m.state is State.FALLING_ASLEEP
                else self._occ1(m)
                for m in members if m.state is not State.UNLOADING
            ]
            loaded = [m for m in members if m.state is State.LOADED and not m.pinned]
            idle = [m for m in loaded if not self._busy(m)]
            if now - first < cfg.max_wait:  # not yet at the fairness bound: models in steady use stay
                hot = [m for m in idle if self._hot(m, now)]
                idle = [m for m in idle if m not in hot]
                cooling += [self._hot_until(m) for m in hot]
            sleepers = [m for m in members if m.state is State.SLEEPING and not m.pinned]
            placement, victims = choose_placement(need, staying, self._candidates(idle, sleepers), budget, options)
            sleep = True
            if victims is None:  # residues in the way: stopping instead of sleeping may be enough
                sleep = False
                placement, victims = choose_placement(
                    need, staying, self._candidates(idle, sleepers, sleep=False), budget, options)
            if victims == []:  # room is on its way: start on the StopDone / SleepDone
                break
            if victims:  # (b)
                for v in victims:
                    self._evict(self._models[v], f"evicted to make room for {target.name}", now, out, sleep)
                break
            # (c) wait for busy models to drain; after max_wait stop feeding the busy victims
            blocked_since = first
            if now - first >= cfg.max_wait:
                _, needed = choose_placement(need, staying, self._candidates(loaded, sleepers), budget, options)
                for v in needed or []:
                    drain[v] = min(drain.get(v, first_waiter.seq), first_waiter.seq)
            break

        # (3d) time to live: a model idle longer than its ttl is unloaded
        for m in self._models.values():
            if m.spec.ttl > 0 and not m.pinned and m.state in (State.LOADED, State.SLEEPING) and not self._busy(m):
                if self._idle_for(m, now) >= m.spec.ttl and not any(w.model == m.name for w in self._waiting.values()):
                    self._stop(m, f"idle for {m.spec.ttl:g}s (ttl)", now, out)

        # (3c) the host budget: level-1 sleepers' weights; the oldest make way when it is exceeded
        if cfg.host_memory_gb is not None:
            for m in self._lru(m for m in self._models.values() if m.state is State.SLEEPING and m.asleep_level == 1):
                if self.host_usage() <= cfg.host_memory_gb + 1e-9:
                    break
                self._stop(m, "host memory budget for sleeping models exceeded", now, out)

        # operator unloads that were waiting for in-flight requests
        for m in self._models.values():
            if m.state is State.LOADED and m.unload_requested:
                if self._busy(m):
                    drain[m.name] = -1  # hold back every new request
                else:
                    self._stop(m, "unloaded by operator", now, out)
        for m in self._models.values():
            m.drain_seq = drain.get(m.name) if m.state is State.LOADED else None

        # (5) grant every waiter whose model is ready (again: a drain may just have been lifted)
        self._grant(now, out)

        # (6) the earliest deadline: a waiter's or a load's timeout, or the fairness bound
        deadlines = [w.arrived + cfg.load_timeout for w in self._waiting.values()]
        deadlines += [
            m.load_started + cfg.load_timeout
            for m in self._models.values()
            if m.state in (State.LOADING, State.WAKING) and m.load_started is not None
        ]
        if blocked_since is not None and now - blocked_since < cfg.max_wait:
            deadlines.append(blocked_since + cfg.max_wait)
        deadlines += [t for t in cooling if t > now]
        deadlines += [
            max(m.last_used, m.since) + m.spec.ttl
            for m in self._models.values()
            if m.spec.ttl > 0 and not m.pinned and m.state in (State.LOADED, State.SLEEPING) and not self._busy(m)
        ]
        wake = min(deadlines) if deadlines else None
        if wake is not None and wake != self._wake:
            out.append(WakeAt(wake))
        self._wake = wake
