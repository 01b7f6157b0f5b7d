"""The scheduler's table of models and waiting requests, and the moves every rule is made of.

``Residency`` holds the state (models, waiters, grants, budgets) and the primitive transitions (start,
stop, put to sleep, grant, release) with the bookkeeping that must never be forgotten along the way: a
base that leaves ``loaded`` takes its adapters with it, a request on an adapter is in flight on its base
too. The planning pass (planning.py) and the event handling (core.py) are built from these moves.

The table has indexes (index.py: models by state and by domain, adapters by base; waiting.py: waiters per
model), so that a pass costs in proportion to what it looks at rather than to the number of configured
models. ``_set_state`` is the one place a model changes state, and it keeps the index in step.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm_model_router.scheduler.effects import Effect, Grant, Reject, SleepModel, StartLoad, StopModel, WakeModel
from vllm_model_router.scheduler.events import ModelSpec
from vllm_model_router.scheduler.eviction import Budget, Candidate, FreeOrder, Occupant
from vllm_model_router.scheduler.index import TIMED, ModelIndex, in_table_order, lru_key, occupant
from vllm_model_router.scheduler.records import Group, ModelRecord, Waiter
from vllm_model_router.scheduler.states import (
    HOLDS_CAPACITY,
    LOADABLE,
    RESIDENT,
    STARTING,
    State,
    StopReason,
    is_resident,
)
from vllm_model_router.scheduler.waiting import WaitQueue

if TYPE_CHECKING:
    from vllm_model_router.scheduler.shortcuts import Blocked

TIMED_OUT = "Timed out waiting for model to load"
CHURNING = (State.LOADING, State.UNLOADING)  # an adapter on its way in or out keeps its base busy
IDLE_RELOADS = 4.0  # an idle model in steady use is protected for at most this many of its reloads (``_hot_until``)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    models: Mapping[str, ModelSpec | float]  # name -> spec (or just memory_gb), in configuration order
    max_resident: int
    memory_gb: float | None
    load_timeout: float
    max_wait: float
    gpu_memory_gb: Mapping[int, float] | None = None  # per-GPU budgets when GPUs are known
    gpu_nodes: Mapping[int, str] | None = None  # the node each GPU is on (even empty: a cluster); None: one machine
    node_resources: Mapping[str, Collection[str]] | None = None  # what each node offers (``ModelSpec.needs``)
    host_memory_gb: float | None = None  # what level-1 sleepers' weights may take in host RAM
    host_overflow: str = "stop"  # host budget full: "stop" the oldest level-1 sleeper, or sleep at "level2"
    keep_idle: float = 60.0  # a model in steady use is kept at most this long after its last request (0: off)
    keep_idle_reloads: float = 6.5  # ... and a newcomer waits for it at most this many of its reloads
    max_waiting_total: int = 1000  # requests waiting for any model beyond this get 429
    retry_after: float = 5.0  # what a 429 suggests
    last_used: Mapping[str, float] | None = None  # restored history (scheduler clock), for the LRU order


class Residency:
    """The state every step reads and writes, and the moves that keep it consistent."""

    def __init__(self, config: SchedulerConfig, now: float = 0.0) -> None:
        self.config = config
        self.budget = Budget(config.max_resident, config.memory_gb, dict(config.gpu_memory_gb or {}))
        self._nominal = self.budget  # without what other processes hold (see GpuUsage)
        self._gpu_nodes: dict[int, str] = dict(config.gpu_nodes or {})  # which node each GPU is on (Capacity)
        self._node_resources: dict[str, frozenset[str]] = {
            n: frozenset(r) for n, r in (config.node_resources or {}).items()}  # what each node offers (Capacity)
        self._foreign: dict[int, float] = {}  # what other processes hold per GPU (GpuUsage)
        self._layout_cache: tuple[Budget, dict[int, str], dict[str, frozenset[str]], dict[
            frozenset[str], tuple[list[tuple[int, ...]], dict[str, list[int]]]]] | None = None
        self._models: dict[str, ModelRecord] = {}
        self._groups: dict[str, Group] = {}  # model -> its units (a model without replicas: one)
        self._replicated: list[Group] = []  # the groups of more than one unit, in table order
        self._kept: list[Group] = []  # the replicated groups that keep some replicas (floor > 0), in table order
        self._index = ModelIndex()  # who is in which state and domain: the passes never scan the table
        for name, spec in config.models.items():
            self._add(name, spec if isinstance(spec, ModelSpec) else ModelSpec(memory_gb=spec), now)
        for name, at in (config.last_used or {}).items():
            if name in self._models:
                self._index.used(self._models[name], at)
        self._waiting = WaitQueue()
        self._granted: dict[int, str] = {}
        self._seq = 0
        self._draining: set[str] = set()  # the models step 7 left draining
        self._timer: float | None = None  # when the last TimerAt asked for a Tick
        # what step 4 decided last, and what it read (``Planner._plan_loads``): bumped by every event but a
        # request's arrival or end (``_plan_gen``), and by every request's end (``_idle_gen``)
        self._plan_gen = self._idle_gen = 0
        self._rules_gen = 0
        self._free_orders: dict[bool, tuple[int, Budget, FreeOrder]] = {}  # (``Planner._free_fit``)
        self._moved_on: list[int] = []  # the GPUs of each move, in order: what a kept FreeOrder must read again
        self._rooms: dict[str, tuple[int, ...]] = {}  # the GPUs each load waiting for room reserved (step 4)
        self._room_seen: dict[str, tuple[tuple[int, ...], int, Budget, tuple[float, ...]]] = {}  # (``Shortcuts``)
        self._blocked: dict[str, Blocked] = {}  # loads found blocked behind busy models (``_still_blocked``)
        self._unloads: set[str] = set()  # asked to unload once idle (step 7), and perhaps no longer
        # when something last changed on each GPU (a model moved, or fell idle, there): a counter
        self._gpu_stamp: dict[int, int] = {}
        self._stamp = 0
        self._touch_log: list[tuple[int, int]] = []  # (stamp, GPU) of each touch, oldest first; bounded
        self._touch_floor = 0  # the touches up to this stamp have left the log
        # ``Placement._options``: per (gpu_count, needs), the log's length, budget, layout, each node's option
        self._option_cache: dict[tuple[int, frozenset[str]], tuple[int, Budget, object, dict[str, tuple[int, ...]],
                                                                  list[tuple[int, ...]]]] = {}

    # ------------------------------------------------------------------ queries
    def resident(self) -> list[str]:
        """The resident models (see ``states.RESIDENT``): those holding a place against max_resident."""
        return [m.name for m in in_table_order(self._index.in_state(*RESIDENT))
                if is_resident(m.state, m.spec.external, m.asleep_level)]

    def host_usage(self) -> float:
        """Host RAM the level-1 sleepers' weights take (those being stopped excluded: on their way out)."""
        return sum(m.spec.weights_gb for m in in_table_order(self._index.in_state(State.SLEEPING, State.FALLING_ASLEEP))
                   if m.asleep_level == 1)

    # ------------------------------------------------------------ the table
    def _add(self, name: str, spec: ModelSpec, now: float) -> None:
        if spec.base is not None and spec.base not in self._models:
            raise KeyError(f"model {name!r}: unknown base {spec.base!r}")
        m = ModelRecord(name, spec, len(self._models), since=now)
        if spec.external:
            m.state = State.LOADED
        self._models[name] = m
        self._index.added(m, self._models[spec.base] if spec.base is not None else None)
        g = self._groups.get(m.group)
        if g is None:
            g = self._groups[m.group] = Group(m.group, floor=spec.replicas_min)
        g.members.append(m)
        if len(g.members) == 2:
            self._replicated.append(g)
            self._track_kept(g)
        m.kept = m.pinned = spec.replica < g.floor  # the replicas a model keeps are pinned

    def _children(self, base: ModelRecord) -> Sequence[ModelRecord]:
        return self._index.children(base)

    def _set_state(self, m: ModelRecord, state: State, now: float) -> None:
        self._touch(m)
        self._moved_on.extend(m.placed)
        if len(self._moved_on) > 8192:  # (no kept order has read it for long: each is made afresh instead)
            self._moved_on, self._free_orders, self._option_cache = [], {}, {}
        self._index.moving(m)
        m.state = state
        m.since = now  # (before ``moved``: the eviction order reads it)
        self._index.moved(m)
        if m.spec.group is not None:
            self._rerank(self._group(m))
        if state not in STARTING:
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

    def _touch(self, m: ModelRecord) -> None:
        """Something that can make room changed on ``m``'s GPUs (and its base's: an adapter's move changes
        whether the base is busy): stamp them (``Shortcuts._still_blocked`` reads the stamps)."""
        self._stamp += 1
        for g in (*m.placed, *(self._models[m.base].placed if m.base is not None else ())):
            self._gpu_stamp[g] = self._stamp
            self._touch_log.append((self._stamp, g))
        if len(self._touch_log) > 65536:  # (a blocked load found before then reads every option again)
            self._touch_floor, self._touch_log = self._touch_log[32767][0], self._touch_log[32768:]

    # ------------------------------------------------------------ replicas
    def _group(self, m: ModelRecord) -> Group:
        return self._groups[m.group]

    def _track_kept(self, g: Group) -> None:
        """Keep ``_kept`` (the replicated groups with a floor) up to date after ``g``'s floor changed."""
        if g.floor > 0 and g.replicated and g not in self._kept:
            self._kept.append(g)
            self._kept.sort(key=lambda k: k.members[0].order)
        elif g.floor == 0 and g in self._kept:
            self._kept.remove(g)

    def _rerank(self, g: Group) -> None:
        """Which of ``g``'s units are extra: of those holding capacity (not on their way out), pinned ones
        first, then awake ones, then by replica number, the first and the pinned ones are kept and the rest
        are extra (evicted first, stopped when idle for ``replica_idle``)."""
        holding = sorted((u for u in g.members if u.state in HOLDS_CAPACITY and u.state is not State.UNLOADING
                          and not u.spec.external),
                         key=lambda u: (not u.pinned, u.state in (State.SLEEPING, State.FALLING_ASLEEP),
                                        u.spec.replica))
        extra = {u.name for rank, u in enumerate(holding) if rank > 0 and not u.pinned}
        for u in g.members:
            if u.extra != (u.name in extra):
                u.extra = u.name in extra
                self._index.rekeyed(u)

    def _pick(self, g: Group, seq: int, affinity: int | None = None,
              eligible: frozenset[str] | None = None) -> ModelRecord | None:
        """The unit a request (the ``seq``-th to arrive) goes to: of the units that admit it (and are
        ``eligible``), the one with the fewest requests outstanding; among those, the one that last served
        the same prompt prefix, else a kept one before an extra one (so that extras fall idle and go), else
        the lowest replica. None when no unit admits it now."""
        if not g.replicated:
            m = g.members[0]
            return m if self._servable(m, seq) else None
        best: ModelRecord | None = None
        best_key: tuple[int, bool, bool, int] | None = None
        warm = g.affinity.get(affinity) if affinity is not None else None
        for u in g.members:
            if not self._servable(u, seq) or (eligible is not None and u.name not in eligible):
                continue
            key = (len(u.in_flight), u.name != warm, u.extra, u.spec.replica)
            if best_key is None or key < best_key:
                best, best_key = u, key
        return best

    def _down(self, m: ModelRecord) -> bool:
        """``m`` is an external engine that is down, or lives on one (it cannot be served or brought in)."""
        if m.spec.external:
            return m.state is not State.LOADED
        base = self._models[m.base] if m.base is not None else None
        return base is not None and base.spec.external and base.state is not State.LOADED

    def _unreachable(self, g: Group, eligible: frozenset[str] | None = None) -> bool:
        """Every unit of ``g`` (that is ``eligible``) is an engine that is down, or lives on one."""
        return all(self._down(u) for u in g.members if eligible is None or u.name in eligible)

    def _fail_waiters(self, m: ModelRecord, status: int, message: str, out: list[Effect]) -> None:
        """``m`` could not be brought in: its model's waiters get ``status``, unless another of its
        replicas is loaded or on its way in to serve them."""
        g = self._group(m)
        if any(u is not m and u.state in (State.LOADED, *STARTING) for u in g.members):
            return
        self._reject_waiters(m, status, message, out)

    # ------------------------------------------------------------ requests
    def _grant_one(self, req_id: int, m: ModelRecord, now: float, affinity: int | None = None) -> None:
        if affinity is not None:
            self._group(m).served(affinity, m.name)
        self._granted[req_id] = m.name
        for u in (m,) if m.base is None else (m, self._models[m.base]):
            u.in_flight.add(req_id)
            self._index.used(u, now)
            if len(u.in_flight) == 1:
                self._index.busy_or_pin_changed(u)

    def _grant(self, now: float, out: list[Effect]) -> None:
        """Grant every waiter that one of its model's units (and their base) admits, in arrival order, each
        on the unit ``_pick`` chooses at that moment (so that a batch of grants is spread)."""
        loaded: Collection[str] = self._index.names_in(State.LOADED)
        if self._replicated:
            loaded = {self._models[name].group for name in loaded}
        for w in self._waiting.admitted(
                lambda w: self._pick(self._groups[w.model], w.seq, eligible=w.eligible) is not None, loaded):
            unit = self._pick(self._groups[w.model], w.seq, w.affinity, w.eligible)
            assert unit is not None  # a grant never takes a unit's admission away from another waiter
            self._waiting.pop(w.req_id)
            self._grant_one(w.req_id, unit, now, w.affinity)
            out.append(Grant(w.req_id, unit.name))

    def _release(self, req_id: int, now: float) -> None:
        if self._waiting.pop(req_id) is not None:
            return
        model = self._granted.pop(req_id, None)
        if model is not None:
            self._idle_gen += 1  # a model may have fallen idle: a candidate for eviction step 4 had not
            m = self._models[model]
            self._touch(m)
            for u in (m,) if m.base is None else (m, self._models[m.base]):
                u.in_flight.discard(req_id)
                self._index.used(u, now)
                if not u.in_flight:
                    self._index.busy_or_pin_changed(u)

    def _reject_waiters(self, m: ModelRecord, status: int, message: str, out: list[Effect]) -> None:
        """Every request waiting for ``m``'s model gets ``status``."""
        for w in self._waiting.of(m.group):
            self._waiting.pop(w.req_id)
            out.append(Reject(w.req_id, w.model, status, message))

    def _servable(self, m: ModelRecord, seq: int) -> bool:
        return m.admits(seq) and (m.base is None or self._models[m.base].admits(seq))

    # ------------------------------------------------------------ moves in and out
    def _bring_in(self, m: ModelRecord, placement: tuple[int, ...], now: float, out: list[Effect]) -> None:
        """Wake a sleeper (where it sleeps) or start a cold load (on ``placement``)."""
        self._blocked.pop(m.name, None)
        if m.state is State.SLEEPING:
            self._set_state(m, State.WAKING, now)
            out.append(WakeModel(m.name, m.asleep_level))
        else:
            m.placed = placement  # before the move: the index counts its memory on these GPUs
            self._set_state(m, State.LOADING, now)
            out.append(StartLoad(m.name, placement))
        m.load_started = now

    def _stop(self, m: ModelRecord, reason: StopReason, detail: str, now: float, out: list[Effect],
              force: bool = False) -> None:
        m.stop_reason = reason
        if m.state is not State.SLEEPING:  # a sleep or a wake that failed: it may hold all its memory
            m.asleep_level = 0
        self._set_state(m, State.UNLOADING, now)
        out.append(StopModel(m.name, reason, detail, force=force))

    def _evict(self, m: ModelRecord, detail: str, now: float, out: list[Effect], sleep: bool = True) -> None:
        """Make room with ``m``: a sleeper is stopped; an awake model sleeps if it can (and ``sleep``), else
        it is stopped. A model an operator asked to unload is stopped: put to sleep, it would wake with the
        request still pending and hold back its waiters for ever."""
        if m.unload_requested:
            self._stop(m, StopReason.OPERATOR, "unloaded by operator", now, out)
        elif m.state is State.LOADED and m.spec.sleep_level and sleep:
            level = m.spec.sleep_level
            budget = self.config.host_memory_gb
            if level == 1 and budget is not None and self.host_usage() + m.spec.weights_gb > budget + 1e-9:
                if m.spec.weights_gb > budget + 1e-9 or self.config.host_overflow == "level2":
                    level = 2  # its weights will not fit in host RAM: drop them instead of keeping them
                # with "stop", the oldest level-1 sleepers make way (step 6)
            m.asleep_level = level
            self._set_state(m, State.FALLING_ASLEEP, now)
            m.stop_reason = StopReason.LRU
            out.append(SleepModel(m.name, level, StopReason.LRU, detail))
        else:
            self._stop(m, StopReason.LRU, detail, now, out)

    # ------------------------------------------------------------ capacity
    def _busy(self, m: ModelRecord) -> bool:
        """In flight, or (for a base) an adapter of it is being loaded or unloaded."""
        if m.in_flight:
            return True
        return self._index.count_adapters(m, CHURNING) > 0

    def _budget(self, domain: str | None) -> Budget:
        """A capacity domain's budget: the global one for the top-level models, or a base's
        ``max_adapters`` for its adapters."""
        return self.budget if domain is None else Budget(self._models[domain].spec.max_adapters, None)

    def _candidates(self, domain: str | None, target: ModelRecord, sleep: bool = True, busy_too: bool = False,
                    hot: Container[str] = (), on: tuple[int, ...] | None = None) -> Iterator[Candidate]:
        """Ways to make room in ``domain`` for ``target``, in order, read lazily: idle awake models (or all
        awake ones, ``busy_too``) but the ``hot`` ones, least recently used first (put to sleep when they
        can sleep and ``sleep``, else stopped), then sleepers, least recently used first (stopped). Pinned
        models are never candidates. ``on``: only those placed on any of these GPUs."""
        index = self._index
        for m in index.lru(domain, State.LOADED) if on is None else index.lru_on(domain, State.LOADED, on):
            if m.pinned or (not busy_too and (self._busy(m) or m.name in hot)):
                continue
            asleep = Occupant(m.name, m.spec.sleeping_gb, m.placed, counts=False) if sleep and m.spec.sleep_level \
                else None
            yield Candidate(index.counted(m) or occupant(m), asleep)  # (what it holds: kept by the index)
        for m in index.lru(domain, State.SLEEPING) if on is None else index.lru_on(domain, State.SLEEPING, on):
            if not m.pinned and m is not target:
                yield Candidate(index.counted(m) or occupant(m))

    # ------------------------------------------------------------ use over time
    def _lru(self, models: Iterable[ModelRecord]) -> list[ModelRecord]:
        """Eviction order: extra replicas first, then lower priority first, then least recently used."""
        return sorted(models, key=lru_key)

    def _note_arrival(self, m: ModelRecord, now: float) -> bool:
        """A request for ``m`` arrived at ``now``; whether that changed its steadiness (``_steady``)."""
        steady = self._steady(m)
        if (last := m.last_arrival) is not None:
            m.gap = now - last if m.gap is None else 0.7 * m.gap + 0.3 * (now - last)
        m.last_arrival = now
        changed = self._steady(m) != steady
        self._plan_gen += changed  # how long it waits for hot models changed: step 4's decision expires
        return changed  # (and the findings that read it: ``Shortcuts._note_arrival``)

    def _reload_cost(self, m: ModelRecord) -> float:
        """What evicting ``m`` costs when it is next wanted, as measured: its last wake if it would be put to
        sleep and has woken before, else its last cold load; never measured (a model found running at
        startup, one never loaded), as costly as ``keep_idle`` allows."""
        if m.spec.sleep_level and m.wake_seconds is not None:
            return m.wake_seconds
        return m.load_seconds if m.load_seconds is not None else self.config.keep_idle / IDLE_RELOADS

    def _steady(self, m: ModelRecord) -> bool:
        """``m``'s requests come within ``keep_idle_reloads`` of its reloads of one another: waiting for it
        gathers a batch, and its next request is expected before protecting it costs much."""
        return m.gap is not None and m.gap <= self.config.keep_idle_reloads * self._reload_cost(m)

    def _hot_until(self, m: ModelRecord, newcomer: Waiter | None = None) -> float:
        """Until when ``m`` is protected from eviction: ski rental, keep paying for an idle model while that
        costs less than buying it back, both counted in its reloads (measured, ``_reload_cost``: cheap ones
        protect briefly, expensive ones long). A model in steady use (``_steady``) is kept while it has been
        idle less than ``IDLE_RELOADS`` reloads, twice its usual gap (after that its user has moved on) and
        ``keep_idle``; against a ``newcomer`` (its oldest waiter), only until that has waited
        ``keep_idle_reloads`` of ``m``'s reloads if the newcomer is in steady use too (its wait gathers a
        batch), else one reload (it gains nothing by waiting); the planner adds ``max_wait``."""
        if self.config.keep_idle <= 0 or not self._steady(m):
            return -math.inf
        cost = self._reload_cost(m)
        until = m.last_used + min(self.config.keep_idle, 2 * (m.gap or 0.0), IDLE_RELOADS * cost)
        if newcomer is None:
            return until
        batches = self._steady(self._groups[newcomer.model].members[0])
        return min(until, newcomer.arrived + (self.config.keep_idle_reloads if batches else 1.0) * cost)

    def _hot(self, m: ModelRecord, now: float, newcomer: Waiter | None = None) -> bool:
        """Protected from eviction for a ``newcomer`` until ``_hot_until`` (and, the planner sees to it, at
        most until the newcomer has waited max_wait): swaps in batches."""
        return now < self._hot_until(m, newcomer)

    def _idle_for(self, m: ModelRecord, now: float) -> float:
        return now - max(m.last_used, m.since)

    @staticmethod
    def _ttl(m: ModelRecord) -> float:
        """How long ``m`` may stay idle: an extra replica its model's ``replicas.idle``, others their ttl."""
        return m.spec.replica_idle if m.extra else m.spec.ttl

    def _ttl_applies(self, m: ModelRecord) -> bool:
        """Whether ``m``'s ttl clock runs now: it has one, is not pinned, is loaded or asleep, and idle."""
        return self._ttl(m) > 0 and not m.pinned and m.state in TIMED and not self._busy(m) and not m.spec.external
