"""The planning pass: after every event, steps (1) to (9) decide who is granted, what is loaded, woken,
put to sleep or stopped, and when the scheduler wants to be called again.

The steps and their order are in ``Planner._pump``; the module docstring of core.py and docs/DESIGN.md
number them the same way, and the scheduler tests are named after the step they exercise.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence

from vllm_model_router.scheduler.effects import Effect, Reject, TimerAt
from vllm_model_router.scheduler.eviction import choose_placement, fits
from vllm_model_router.scheduler.index import in_table_order
from vllm_model_router.scheduler.kept import KeptWalk
from vllm_model_router.scheduler.passes import Hot, Pass, Step4, plus
from vllm_model_router.scheduler.records import Group, ModelRecord, Waiter
from vllm_model_router.scheduler.residency import TIMED_OUT
from vllm_model_router.scheduler.states import HOLDS_CAPACITY, RESIDENT, STARTING, WANTS_IN, State, StopReason

AWAKE = RESIDENT - {State.UNLOADING}  # what step 3 counts against a budget: resident, not on its way out
RETRY_FAILED_S = 30.0
"""A replica whose load failed is not started again for saturation (or to be kept) before this long."""


class _Wanting:
    """The models whose waiters need one of their units brought in (step 4 asks ``model in wanting``)."""

    def __init__(self, planner: Planner) -> None:
        self._planner = planner

    def __contains__(self, model: object) -> bool:
        g = self._planner._groups.get(model) if isinstance(model, str) else None
        return g is not None and self._planner._wants_in(g) is not None


class Planner(KeptWalk):
    """The planning pass, one method per step."""

    _step4: Step4 | None = None  # step 4's last decision, while it stands (``_plan_loads``)
    _read_serving = False  # this pass chose a unit by which models serve (``_room_by_eviction``): it keeps none

    def _pump(self, now: float, out: list[Effect]) -> None:
        p = Pass(now, out)
        self._expire(p)  # (1)
        self._grant(now, out)  # (2)
        self._trim(p)  # (3)
        self._plan_loads(p)  # (4)
        self._scale(p)  # (4r)
        self._expire_ttl(p)  # (5)
        self._fit_host_budget(p)  # (6)
        self._drain(p)  # (7)
        self._grant(now, out)  # (8)
        self._arm_timer(p)  # (9)

    # (1) ------------------------------------------------------------------------------------------
    def _expire(self, p: Pass) -> None:
        """A waiter older than ``load_timeout`` gets 504; a load (or wake) older than ``load_timeout`` is
        stopped, the model is left failed and its waiters get 504."""
        timeout = self.config.load_timeout
        for w in self._waiting.older_than(p.now, timeout):
            self._waiting.pop(w.req_id)
            p.out.append(Reject(w.req_id, w.model, 504, f"{TIMED_OUT} {w.model} after {timeout:g}s"))
        late = [m for m in self._index.in_state(*STARTING) if m.load_started is not None
                and p.now - m.load_started >= timeout]
        for m in in_table_order(late):
            if m.state in STARTING:  # (a base stopped just before takes its adapters with it)
                m.failures += 1
                m.last_error = f"{TIMED_OUT}: not ready after {timeout:g}s"
                self._stop(m, StopReason.LOAD_TIMEOUT, TIMED_OUT, p.now, p.out, force=True)
                self._fail_waiters(m, 504, f"{TIMED_OUT} {m.group}: {m.last_error}", p.out)

    # (2) and (8): Residency._grant. Serving first means a model about to be used is busy, so it is
    # never chosen as a victim in (3) to (6); serving again after (7) lets through what a lifted drain
    # holds back no more.

    # (3) ------------------------------------------------------------------------------------------
    def _trim(self, p: Pass) -> None:
        """A domain over its budget (models loaded behind the router's back) stops idle members, least
        recently used first, until it fits again (its memory: the pool's; with GPUs, each has its own)."""
        for domain in [None, *(m.name for m in self._index.bases() if m.state is State.LOADED)]:
            budget = self._budget(domain)
            pool = None if budget.gpu_memory_gb else budget.memory_gb
            if self._index.count_holders(domain, AWAKE) <= budget.max_resident and (
                    pool is None or self._index.holders_gb(domain, AWAKE) <= pool + 1e-9):
                continue  # within its count and its memory: nothing to trim
            members = [m for m in self._index.holders(domain) if m.state in AWAKE]
            over = len(members) - budget.max_resident
            if pool is not None:
                over = max(over, 1 if sum(m.memory_gb for m in members) > pool + 1e-9 else 0)
            if over > 0:
                idle = self._lru(m for m in members if m.state is State.LOADED and not m.pinned and not self._busy(m))
                for victim in idle[:over]:
                    self._stop(victim, StopReason.OVER_CAPACITY, "over capacity (loaded outside the router)",
                               p.now, p.out)

    # (4) ------------------------------------------------------------------------------------------
    def _plan_loads(self, p: Pass) -> None:
        """Bring in what waiters need, by priority and then in the order of each model's oldest waiter. A load
        that evicts, or waits for room already on its way, reserves that room: the loads after it plan
        around it (on a cluster, swaps on other GPUs go on at the same time) and can never take it. A load
        blocked behind busy models blocks the ones after it (no overtaking), so a big model cannot starve
        behind small ones. A load keeps its room from pass to pass while the room is still on its way, and
        is not planned again: it starts there once the room is free. A base that waiters of several of its
        adapters want is one load, planned once per pass.

        When the last pass changed nothing here (every load waited) and nothing it read has changed since
        (the models' states, the first waiter of each model, the budgets, and, if it read the eviction
        candidates, which models are idle), the same decision stands without planning again: with
        hundreds of GPUs, most events (a request granted or finished on a resident model) change none of it.
        When only which models are idle changed, the walk starts again at the load it stopped at, blocked
        (``KeptWalk._resume``). A pass that chose a copy of an adapter by which models serve keeps no
        decision (``_room_by_eviction``); a drain step 7 starts or lifts counts as an event."""
        # only a model that is out (or asleep) can be brought in for its waiters (``_load_target``)
        self._read_serving = False
        wanting: Sequence[Container[str]] = [self._index.names_in(s) for s in WANTS_IN]
        if self._replicated:
            wanting = [_Wanting(self)]
        firsts = list(self._waiting.in_planning_order(wanting))
        key: tuple[object, ...] = (self._plan_gen, self._index.version, self.budget)
        order = tuple([(w.model, w.seq) for w in firsts])
        memo = self._step4
        same = memo is not None and p.now < memo.until and memo.key[:-1] == key \
            and (order[:len(memo.order)] if memo.unread_after else order) == memo.order
        if same and memo is not None and memo.key[-1] in (None, self._idle_gen):  # ("is not None": for mypy)
            p.room_pending, p.blocked_since = True, memo.blocked_since
            p.cooling.extend(memo.cooling)
            return
        emitted = len(p.out)
        # only models fell idle since (requests finished): the walk starts again at the load it stopped at
        if not same or not self._resume(p, firsts, self._load_target, self._plan_one):
            self._plan_in_order(p, firsts, self._load_target, self._plan_one)
        self._step4 = None
        self._rooms = p.rooms  # (a load not planned this pass, or started, keeps no room)
        if p.room_pending and len(p.out) == emitted and not p.drain and not self._draining \
                and not self._read_serving and (front := self._front) is not None:
            until = min([*p.cooling, p.blocked_since + self.config.max_wait if p.blocked_since is not None
                         else math.inf])
            self._step4 = Step4((*key, self._idle_gen if p.read_candidates else None),  # (read: to the blocked load)
                                order if front.stopped is None else order[:front.stopped + 1],
                                front.stopped is not None, until, p.blocked_since, tuple(p.cooling))

    def _wants_in(self, g: Group) -> ModelRecord | None:
        """The unit to bring in for ``g``'s waiters when none of its units is loaded or on its way in: a
        sleeping one first (a wake is quicker than a start), else the lowest replica that is out. An external
        engine is never brought in (it is up or down by itself)."""
        if not g.replicated:
            m = g.members[0]
            return m if m.state in WANTS_IN and not m.spec.external else None
        if any(u.state in (State.LOADED, *STARTING) for u in g.members):
            return None
        return self._next_unit(g)

    def _next_unit(self, g: Group, now: float | None = None) -> ModelRecord | None:
        """The unit of ``g`` to bring in next: a sleeping one first; an adapter on a base with a free slot
        before one that must evict; else the lowest replica that is out. Never an external engine, nor an
        adapter on one that is down. With ``now`` (a replica for saturation or for the ones kept, not for
        waiters), a unit whose load failed less than ``RETRY_FAILED_S`` ago is not retried yet: a copy that
        cannot start does not crash-loop."""
        out = [u for u in g.members if u.state in WANTS_IN and not u.spec.external and not self._down(u)
               and (now is None or u.state is not State.FAILED or now - u.since >= RETRY_FAILED_S)]
        return min(out, key=lambda u: (u.state is not State.SLEEPING, not self._slot_free(u),
                                       not self._room_by_eviction(u), u.spec.replica), default=None)

    def _room_by_eviction(self, u: ModelRecord) -> bool:
        """An adapter's base has an idle adapter that could make room for it (asked only when no base of
        its model has a free slot: an engine where room can be made at once beats one that must drain).
        Which unit comes in then depends on which models serve: step 4 keeps no decision that read it."""
        self._read_serving |= u.base is not None
        return u.base is None or next(iter(self._candidates(u.base, u)), None) is not None

    def _slot_free(self, u: ModelRecord) -> bool:
        """``u`` would fit in its domain without evicting anything (only asked of adapters: a base's
        slots are a count)."""
        if u.base is None:
            return True
        return self._index.count_holders(u.base, HOLDS_CAPACITY) < self._budget(u.base).max_resident

    def _load_target(self, g: Group, first: Waiter) -> ModelRecord | None:
        """What must come in for ``g``'s waiters: one of its units, or first that unit's base. None when
        nothing can: it is already in or on its way, or its base is on its way in or out (its adapters wait
        for it)."""
        m = self._wants_in(g)
        if m is None or self._down(m):
            return None
        if m.base is not None:
            base = self._models[m.base]
            if base.state in WANTS_IN:
                return base
            if not base.admits(first.seq):
                return None
        return m

    def _plan_one(self, p: Pass, target: ModelRecord, first: Waiter) -> bool:
        """(a) it fits next to everything that holds capacity (loading, loaded, still stopping) and the room
        earlier loads reserved → start or wake it; (b) evicting idle models makes it fit → evict them, and
        start when their StopDone or SleepDone arrives (never while a victim still holds the memory); (c)
        otherwise wait for busy models to drain. False when the load is blocked (c): later loads wait behind
        it. In (b), and while the room it evicted for is on its way, it reserves that room; it keeps it
        (``_rooms``) and starts there."""
        domain = target.base
        budget = self._budget(domain)
        reserved = p.reserved.get(domain)
        room = self._rooms.get(target.name)
        if room is not None and budget is self.budget:  # it evicted for this room: it waits for it there
            if self._room_as_seen(target, room, reserved):
                p.room_pending = True  # still on its way, as nothing it was found with has changed
                self._reserve(p, target, room, target.memory_gb)
                return True
            if fits(self._room_usage(False, target, room, reserved), target.memory_gb, budget, room):
                self._bring_in(target, room, p.now, p.out)
                return True
            if fits(self._room_usage(True, target, room, reserved), target.memory_gb, budget, room):
                p.room_pending = True  # still on its way
                self._room_seen_now(target, room, reserved)
                self._reserve(p, target, room, target.memory_gb)
                return True
            # (the room was taken after all: a model found running there, a node gone; plan afresh)
        waking = target.state is State.SLEEPING
        options = [target.placed] if waking and target.placed else self._options(target)
        if not options:  # no node has gpu_count GPUs: waiting would not help
            target.last_error = self._unplaceable(target)
            self._fail_waiters(target, 503, f"Failed to load model {target.group}: {target.last_error}", p.out)
            return True
        if self._still_blocked(p, target, first, options, reserved, budget):
            p.room_pending = p.read_candidates = True
            p.blocked_since = first.arrived
            return False
        need = target.memory_gb
        if target.base is None and budget is not self._nominal and all(
            any(need > budget.gpu_memory_gb.get(g, 0.0) + 1e-9 for g in placement) for placement in options if placement
        ):
            # others' use leaves no GPU where it could ever fit: plan as if it were not there, and let the
            # start-time check name the processes that hold the memory (a 503, not a long wait)
            budget = self._nominal
        # (a sleeper's own residue becomes its need: ``but=target``)
        held = plus(self._index.held(domain, but=target), reserved)
        ordered, fit = self._free_fit(False, need, held, budget, options, target, reserved)
        placement, victims = (fit or (), [] if fit else None) if ordered else \
            choose_placement(need, held, [], budget, options)
        if victims == []:  # (a)
            self._bring_in(target, placement, p.now, p.out)
            return True
        # what is already stopping (or falling asleep) will free its share: only evict more if that is
        # not enough
        staying = plus(self._index.staying(domain, but=target), reserved)
        ordered, fit = self._free_fit(True, need, staying, budget, options, target, reserved)
        # before the fairness bound models in steady use stay
        noted: list[tuple[float, tuple[int, ...]]] = []  # the hot models it found, with their GPUs
        hot: Container[str] = Hot(self, p.now, p.cooling, first, noted) \
            if p.now - first.arrived < self.config.max_wait and self.config.keep_idle > 0 else ()
        if fit:
            placement, victims, sleep = fit, [], True
        else:
            placement, victims, sleep = self._make_room(need, staying, target, hot, budget, options,
                                                        fits_nowhere=ordered)
        p.room_pending = True
        if victims is not None:  # (b), or room already on its way: start on the StopDone / SleepDone
            for v in victims:
                self._evict(self._models[v], f"evicted to make room for {target.name}", p.now, p.out, sleep)
            self._reserve(p, target, placement, need)
            return True
        # (c) resident models keep being served, but once the oldest waiter has waited max_wait the busy
        # victims stop taking requests newer than it (they drain), so the load cannot starve
        self._note_blocked(p, target, first, reserved, budget, options, noted)
        p.read_candidates = True
        p.blocked_since = first.arrived
        if p.now - first.arrived >= self.config.max_wait:
            _, needed = choose_placement(need, staying, self._candidates(domain, target, busy_too=True), budget,
                                         options)
            for v in needed or []:
                p.drain[v] = min(p.drain.get(v, first.seq), first.seq)
        return False

    # (4r) -----------------------------------------------------------------------------------------
    def _scale(self, p: Pass) -> None:
        """Replicas: a model keeps ``floor`` of them (once the shell has started it with ``SetReplicas``, and
        unless an operator unloaded it, until its next request),
        and gets one more (up to ``replicas_max``) when its
        loaded ones are saturated: their engines queue requests (``ReplicaPressure``), or more than
        ``target_in_flight`` requests per loaded replica are outstanding. Never while a waiter's load waits
        for room (step 4): another model's queued request is never made to wait longer; an extra replica
        may only evict idle models nobody waits for. One extra replica starts at a time."""
        if p.room_pending:
            return
        for g in self._may_want_more():
            awake, want = self._wanted(g)
            while len(awake) < want:
                target = self._next_unit(g, p.now)
                if target is None or not self._grow(p, g, target):
                    break
                awake.append(target)

    def _wanted(self, g: Group, more: int = 0) -> tuple[list[ModelRecord], int]:
        """``g``'s units that are loaded or on their way in, and how many it wants (with ``more`` requests
        outstanding than now: what a grant would make of it)."""
        awake = [u for u in g.members if u.state in (State.LOADED, *STARTING)]
        loaded = [u for u in awake if u.state is State.LOADED]
        spec = g.members[0].spec
        want = 0 if g.dormant else g.floor
        if loaded and len(awake) == len(loaded) and (
                g.saturated or sum(len(u.in_flight) for u in loaded) + self._waiting.count(g.name) + more
                > spec.target_in_flight * len(loaded)):
            want = max(want, len(awake) + 1)
        return awake, min(want, spec.replicas_max)

    def _may_want_more(self) -> list[Group]:
        """The replicated models that may want another replica: those with a loaded one (saturation) and
        those that keep some (their floor), in table order. The others want none: looking at these only
        keeps the step's cost in proportion to the replicated models loaded, not to the number of models
        (with several engines, every adapter is a replicated model) nor to everything loaded (a cluster
        has a thousand models up, and the step is read on every pass that plans no load)."""
        groups = {g.name: g for g in self._kept}
        for m in self._index.units_in(State.LOADED):
            if not m.spec.external:
                groups.setdefault(m.group, self._groups[m.group])
        return sorted(groups.values(), key=lambda g: g.members[0].order)

    def _growing(self) -> bool:
        """Whether some replicated model wants more replicas than it has (step 4r would act)."""
        for g in self._may_want_more():
            awake, want = self._wanted(g)
            if len(awake) < want:
                return True
        return False

    def _grow(self, p: Pass, g: Group, target: ModelRecord) -> bool:
        """Bring in ``target``, another replica of ``g``, if it fits, or once idle models nobody waits for
        have made room (evicted now; the start comes with a later pass). True when it was brought in. (An
        adapter's replica goes in its base's domain; its base must be loaded.)"""
        domain = target.base
        if domain is not None and self._models[domain].state is not State.LOADED:
            return False
        budget = self._budget(domain)
        options = [target.placed] if target.state is State.SLEEPING and target.placed else self._options(target)
        if not options:
            return False
        need = target.memory_gb
        placement, victims = choose_placement(need, self._index.held(domain, but=target), [], budget, options)
        if victims == []:
            self._bring_in(target, placement, p.now, p.out)
            return True
        hot: Container[str] = Hot(self, p.now, p.cooling) if self.config.keep_idle > 0 else ()  # (then they
        # may make room)
        candidates = (c for c in self._candidates(domain, target, hot=hot)
                      if self._models[c.name].group != g.name and not self._waiting.count(self._models[c.name].group))
        _, victims = choose_placement(need, self._index.staying(domain, but=target), candidates, budget, options)
        for v in victims or []:
            self._evict(self._models[v], f"evicted to make room for another replica of {g.name}", p.now, p.out)
        return False

    # (5) ------------------------------------------------------------------------------------------
    def _expire_ttl(self, p: Pass) -> None:
        """A model idle longer than its ttl (an extra replica: than its model's ``replicas.idle``), with
        nobody waiting for it, is unloaded."""
        for m in in_table_order(self._index.timed()):
            ttl = self._ttl(m)
            if self._ttl_applies(m) and self._idle_for(m, p.now) >= ttl and not self._waiting.count(m.group):
                if m.extra:
                    self._stop(m, StopReason.SCALE_DOWN, f"extra replica idle for {ttl:g}s", p.now, p.out)
                else:
                    self._stop(m, StopReason.TTL, f"idle for {ttl:g}s (ttl)", p.now, p.out)

    # (6) ------------------------------------------------------------------------------------------
    def _fit_host_budget(self, p: Pass) -> None:
        """Level-1 sleepers keep their weights in host RAM; past ``host_memory_gb`` the oldest are stopped."""
        budget = self.config.host_memory_gb
        if budget is None:
            return
        for m in self._lru(m for m in self._index.in_state(State.SLEEPING) if m.asleep_level == 1):
            if self.host_usage() <= budget + 1e-9:
                break
            self._stop(m, StopReason.HOST_BUDGET, "host memory budget for sleeping models exceeded", p.now, p.out)

    # (7) ------------------------------------------------------------------------------------------
    def _drain(self, p: Pass) -> None:
        """An operator's unload that waits for in-flight requests stops its model once idle, and until then
        holds back every new request; then every loaded model's drain (these and step 4's) takes effect.
        A drain holds back only requests newer than the starved waiter: older ones for a draining model
        are still served (otherwise a base drained for a newer request could be reloaded for an older
        adapter request, and so on for ever)."""
        asked = [m for m in map(self._models.__getitem__, self._unloads) if m.unload_requested]
        self._unloads = {m.name for m in asked}  # (not every model loaded: a pass costs what is asked)
        for m in in_table_order([m for m in asked if m.state is State.LOADED]):
            if m.state is not State.LOADED:
                continue  # its base was stopped just before, and took it along
            if self._busy(m):
                p.drain[m.name] = -1
            else:
                self._stop(m, StopReason.OPERATOR, "unloaded by operator", p.now, p.out)
        # only a loaded model drains (leaving ``loaded`` lifts the drain, see ``_set_state``), and only this
        # step sets a drain: the ones to settle are those it set last time and those it sets now
        for name in self._draining | p.drain.keys():
            m = self._models[name]
            seq = p.drain.get(name) if m.state is State.LOADED else None
            self._plan_gen += seq != m.drain_seq  # (who it admits changed: step 4 read it, ``base.admits``)
            m.drain_seq = seq
        self._draining = {name for name in p.drain if self._models[name].state is State.LOADED}

    # (9) ------------------------------------------------------------------------------------------
    def _arm_timer(self, p: Pass) -> None:
        """Ask for a Tick at the earliest deadline: a waiter's or a load's timeout, the fairness bound of a
        blocked load, a hot model cooling down, a ttl running out."""
        cfg = self.config
        first = self._waiting.first_arrival()
        deadlines = [] if first is None else [first + cfg.load_timeout]
        deadlines += [m.load_started + cfg.load_timeout for m in self._index.in_state(*STARTING)
                      if m.load_started is not None]
        if p.blocked_since is not None and p.now - p.blocked_since < cfg.max_wait:
            deadlines.append(p.blocked_since + cfg.max_wait)
        deadlines += [t for t in p.cooling if t > p.now]
        deadlines += [max(m.last_used, m.since) + self._ttl(m) for m in self._index.timed() if self._ttl_applies(m)]
        for g in self._kept:  # a kept replica whose load failed is tried again after RETRY_FAILED_S
            deadlines += [u.since + RETRY_FAILED_S for u in g.members
                          if u.state is State.FAILED and u.kept and u.since + RETRY_FAILED_S > p.now]
        when = min(deadlines) if deadlines else None
        if when is not None and when != self._timer:
            p.out.append(TimerAt(when))
        self._timer = when
