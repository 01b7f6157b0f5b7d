"""Residency scheduler: which model is resident, who waits, who is granted, what is evicted.

``Scheduler.handle(event, now)`` is the only entry point. It never blocks, never reads a clock and
never touches a process or socket: it returns effects for the shell to carry out, and slow effects
(loads, stops) come back later as events. See docs/DESIGN.md for the reasoning.

Models live in capacity *domains*: top-level models share the global budget (``max_resident`` and
``memory_gb``); adapters share their base's ``max_adapters``. An adapter is servable only while its base
is loaded, a request on an adapter keeps its base busy too, and a base that goes away drops its
adapters. An *external* model (the engine in endpoint mode) is always loaded and never managed.

Every event goes through the same numbered steps (the scheduler tests are named after them):

  (0) the event itself: a request joins the queue (or gets 429), a finished load, sleep, wake or stop
      settles its model's state, an exit or an operator's unload takes the model out, and so on.
Then the planning pass (planning.py):
  (1) expire: a waiter older than ``load_timeout`` gets 504; a load (or wake) older than
      ``load_timeout`` is stopped and its waiters get 504.
  (2) grant every waiter whose model is loaded and not draining (before planning, so that a model
      with waiters is busy and never picked as a victim).
  (3) trim: a domain over its budget (something was loaded behind the router's back) stops idle
      models, least recently used first.
  (4) plan loads, by priority and then in the order of each model's oldest waiter (an adapter whose
      base is not loaded plans its base first):
      (a) it fits next to everything that holds capacity (loading, loaded, still stopping) → start or
          wake it;
      (b) evicting idle models, least recently used first (put to sleep where they can sleep), makes it
          fit → evict those, and start when their StopDone / SleepDone arrives (never while a victim
          still holds the memory);
      (c) otherwise it must wait for busy models to drain; resident models keep being served, but once
          its oldest waiter has waited ``max_wait`` the busy victims stop taking newer requests, so the
          load cannot starve. Later loads wait behind a blocked one (no overtaking).
  (4r) replicas: a model gets the replicas it keeps, and one more when its loaded ones are saturated
      (never while a waiter's load waits for room; evicting only idle models nobody waits for).
  (5) ttl: a model idle longer than its ``ttl`` is unloaded (an extra replica: after ``replica_idle``).
  (6) host budget: past ``host_memory_gb``, the oldest level-1 sleepers are stopped.
  (7) drains: an operator's unload waits for in-flight requests (the model drains), then stops; the
      drains of (4c) and (7) take effect.
  (8) grant again: (7) may have lifted a drain.
  (9) ask for a Tick at the earliest deadline (``TimerAt``).

The fast path (``_fast_path``) answers the commonest events, a request for a ready model and its end,
without the pass when nobody waits; a property test checks it decides as a full pass would.
"""

from __future__ import annotations

from vllm_model_router.scheduler.effects import Effect, Grant, Reject
from vllm_model_router.scheduler.events import (
    AdminUnload,
    Capacity,
    Event,
    GpuUsage,
    LoadDone,
    ModelAdded,
    ModelExited,
    ModelFound,
    Preload,
    ReplicaPressure,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    SetPinned,
    SetReplicas,
    SleepDone,
    StopDone,
    Tick,
    WakeDone,
)
from vllm_model_router.scheduler.eviction import Budget, choose_placement
from vllm_model_router.scheduler.planning import Planner
from vllm_model_router.scheduler.records import Group, ModelRecord, ModelView, Waiter
from vllm_model_router.scheduler.states import HOLDS_CAPACITY, LOADABLE, WANTS_IN, State, StopReason


class Scheduler(Planner):
    """Events in, effects out: (0) applies the event, the planning pass (1) to (9) decides the rest."""

    # ------------------------------------------------------------------ public
    def handle(self, event: Event, now: float) -> list[Effect]:
        fast = self._fast_path(event, now)
        if fast is not None:
            return fast
        out: list[Effect] = []
        self._apply(event, now, out)  # (0)
        self._pump(now, out)  # (1) to (9)
        return out

    def view(self) -> list[ModelView]:
        """Every unit; a model's waiters are counted on its first unit."""
        return [ModelView.of(m, self._waiting.count(m.group) if m.spec.replica == 0 else 0)
                for m in self._models.values()]

    def state_of(self, model: str) -> State:
        """The state of a unit (a model's name is its first unit's)."""
        return self._models[model].state

    def knows(self, model: str) -> bool:
        """A model, or one of its units."""
        return model in self._models

    def units(self, model: str) -> list[str]:
        """``model``'s units, by replica number (a model without replicas: itself)."""
        g = self._groups.get(model)
        return [u.name for u in g.members] if g is not None else [model]

    def is_waiting(self, req_id: int) -> bool:
        return req_id in self._waiting

    # ------------------------------------------------------------------ (0)
    def _apply(self, event: Event, now: float, out: list[Effect]) -> None:
        """What the event does by itself, before the planning pass."""
        if not isinstance(event, RequestArrived | RequestFinished | RequestCancelled):
            self._plan_gen += 1  # (a request's own moves reach step 4 through the index and the queue)
        if isinstance(event, SetPinned | SetReplicas | AdminUnload | ModelAdded):
            self._rules_gen += 1  # what may be evicted changed without a move (``Shortcuts._still_blocked``)
        match event:
            case RequestArrived(req_id, model, affinity, eligible):
                if model not in self._groups:
                    raise KeyError(f"unknown model {model!r}")
                if req_id in self._waiting or req_id in self._granted:
                    raise ValueError(f"duplicate request id {req_id}")
                g = self._groups[model]
                g.dormant = False
                self._note_arrivals(g, now)
                if self._unreachable(g, eligible):
                    out.append(Reject(req_id, model, 502, f"no vLLM engine that serves {model} is reachable"))
                elif self._pick(g, self._seq + 1, eligible=eligible) is None and self._queue_full(g.members[0]):
                    out.append(Reject(req_id, model, 429, f"too many requests waiting for {model}; try again later",
                                      retry_after=self.config.retry_after))
                else:
                    self._seq += 1
                    self._waiting.add(Waiter(req_id, model, now, self._seq, affinity, eligible),
                                      g.members[0].spec.priority)
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
                        self._stop(m, StopReason.SLEEP_FAILED, "sleep failed", now, out, force=True)
            case WakeDone(model, ok, error):
                m = self._models[model]
                if m.state is State.WAKING:
                    if ok:
                        m.wakes += 1
                        if m.load_started is not None:
                            m.wake_seconds = now - m.load_started
                        m.asleep_level = 0
                        m.last_error = None
                        self._set_state(m, State.LOADED, now)
                        self._group(m).saturated = False
                    else:  # fall back to stop + cold start: the waiters stay and bring it back cold
                        m.failures += 1
                        m.last_error = f"wake failed: {error}"
                        self._stop(m, StopReason.WAKE_FAILED, "wake failed", now, out, force=True)
            case StopDone(model):
                m = self._models[model]
                if m.state is State.UNLOADING:
                    failed = m.stop_reason is StopReason.LOAD_TIMEOUT
                    self._set_state(m, State.FAILED if failed else State.UNLOADED, now)
                    m.unload_requested = False
                    m.stop_reason = None
            case ModelExited(model, reason, failed) if self._models[model].spec.external:
                self._engine_down(self._models[model], reason, now, out)
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
            case ModelFound(model, gpus) if self._models[model].spec.external:
                m = self._models[model]
                if m.state is State.FAILED:  # an engine that answers again
                    m.last_error = None
                    self._set_state(m, State.LOADED, now)
            case ModelFound(model, gpus):
                m = self._models[model]
                base = self._models[m.base] if m.base else None
                if m.state in LOADABLE and (base is None or base.state is State.LOADED):
                    m.out_of_band += 1
                    if base is None:
                        m.placed = gpus  # before the move: the index counts its memory on these GPUs
                    self._set_state(m, State.LOADED, now)
                    self._trim_gpus(gpus, now, out)
            case ModelAdded(model, spec):
                if model not in self._models:
                    self._add(model, spec, now)
            case AdminUnload(model, force):
                if model in self._groups:
                    self._groups[model].dormant = True
                for unit in self.units(model):  # a model's name unloads all its replicas
                    self._admin_unload(self._models[unit], force, now, out)
            case SetPinned(model, pinned):
                m = self._models[model]
                m.pin = pinned
                m.pinned = m.pin or m.kept  # unpinning a kept replica leaves it kept
                self._index.busy_or_pin_changed(m)
                if m.spec.group is not None:
                    self._rerank(self._group(m))
            case SetReplicas(model, replicas, trim):
                self._set_replicas(self._groups[model], replicas, trim, now, out)
            case ReplicaPressure(model, saturated):
                self._groups[model].saturated = saturated
            case Preload(model):
                self._preload(self._models[model], now, out)
            case GpuUsage(foreign):
                self._foreign = dict(foreign)
                self._rebudget()
            case Capacity(gpus, nodes, offers):
                self._nominal = Budget(self.config.max_resident, self.config.memory_gb, dict(gpus))
                self._gpu_nodes = dict(nodes)
                self._node_resources = dict(offers)
                self._rebudget()
            case Tick():
                self._timer = None  # always re-arm: a timer may fire a hair before its deadline
            case _:
                raise TypeError(f"unknown event {event!r}")

    def _trim_gpus(self, gpus: tuple[int, ...], now: float, out: list[Effect]) -> None:
        """Step 3 on GPUs (step 3 itself trims the one pool): a model found running there behind the router's
        back may put a GPU over its budget (the nominal one: others' memory is not ours to trim for); the
        idle models there are stopped, least recently used first, until it fits again."""
        budgets = self._nominal.gpu_memory_gb
        for g in gpus:
            if g not in budgets:
                continue
            for victim in list(self._index.lru_on(None, State.LOADED, (g,))):
                if self._index.usage_on(None, (g,), None, True).gpu_gb.get(g, 0.0) <= budgets[g] + 1e-9:
                    break
                if not victim.pinned and not self._busy(victim):
                    self._stop(victim, StopReason.OVER_CAPACITY, "over capacity (loaded outside the router)", now,
                               out)

    def _rebudget(self) -> None:
        """The GPUs' budgets: the nominal ones (the config's, or the cluster's) less what others hold."""
        taken = self._foreign
        self.budget = Budget(self.config.max_resident, self.config.memory_gb,
                             {g: max(0.0, b - taken.get(g, 0.0)) for g, b in self._nominal.gpu_memory_gb.items()})
        if not taken:
            self.budget = self._nominal

    def _queue_full(self, m: ModelRecord) -> bool:
        return self._waiting.count(m.group) >= m.spec.max_waiting or len(self._waiting) >= self.config.max_waiting_total

    def _engine_down(self, m: ModelRecord, reason: str, now: float, out: list[Effect]) -> None:
        """One of several external engines stopped answering: it takes its adapters with it, and the
        requests that only an engine that is down could serve get 502 (the others go on elsewhere)."""
        if m.state is not State.LOADED or not self._group(m).replicated:
            return  # a single engine is never marked down: its requests get the proxy's 502 instead
        m.failures += 1
        m.last_error = reason
        self._set_state(m, State.FAILED, now)
        for model, first in self._waiting.firsts().items():
            g = self._groups[model]
            if self._unreachable(g, first.eligible):
                for w in self._waiting.of(model):
                    if self._unreachable(g, w.eligible):
                        self._waiting.pop(w.req_id)
                        out.append(Reject(w.req_id, model, 502, f"no vLLM engine that serves {model} is reachable"))

    def _note_arrivals(self, g: Group, now: float) -> None:
        for u in g.members:
            self._note_arrival(u, now)

    def _set_replicas(self, g: Group, n: int, trim: bool, now: float, out: list[Effect]) -> None:
        """Keep ``n`` replicas (clamped to the model's min and max). The ones kept are those serving now
        (awake first, then asleep, then by number), so that scaling down never takes away the copies that
        serve; they are pinned, and step 4r brings in the missing ones. With ``trim``, the others stop:
        at once when idle, after their requests when busy (they take no new ones meanwhile)."""
        spec = g.members[0].spec
        g.floor = max(spec.replicas_min, min(n, spec.replicas_max))
        g.dormant = False
        self._track_kept(g)
        awake = (State.LOADED, State.LOADING, State.WAKING)
        order = sorted(g.members, key=lambda u: (u.state not in awake, u.state not in HOLDS_CAPACITY
                                                 or u.state is State.UNLOADING, u.spec.replica))
        for rank, u in enumerate(order):
            u.kept = rank < g.floor
            u.pinned = u.pin or u.kept
            self._index.busy_or_pin_changed(u)
            if u.kept:
                u.unload_requested = False  # kept again: an earlier scale-down's drain is off
        self._rerank(g)
        for u in order[g.floor:] if trim and g.floor > 0 else ():
            if u.state in (*awake, State.SLEEPING) and not u.pin:
                self._admin_unload(u, False, now, out)

    def _load_done(self, m: ModelRecord, ok: bool, error: str, status: int, now: float, out: list[Effect]) -> None:
        if m.state is not State.LOADING:
            return  # a load that was cancelled by a stop; StopDone settles the state
        if ok:
            m.loads += 1
            m.last_error = None
            if m.load_started is not None:
                m.load_seconds = now - m.load_started
            self._set_state(m, State.LOADED, now)
            self._group(m).saturated = False  # a new copy: saturation must be seen again before another
            return
        m.failures += 1
        m.last_error = error or "model failed to load"
        self._set_state(m, State.FAILED, now)
        self._fail_waiters(m, status, f"Failed to load model {m.group}: {m.last_error}", out)
        # an adapter's waiters wait on its base too: a failed base fails them as well
        for child in self._children(m):
            self._fail_waiters(child, status, f"Failed to load base model {m.name} of {child.name}: "
                                              f"{m.last_error}", out)

    def _admin_unload(self, m: ModelRecord, force: bool, now: float, out: list[Effect]) -> None:
        """Anything on its way in, asleep or idle stops at once; a busy model drains first (step 7), unless
        ``force``."""
        if m.spec.external:
            return
        asleep = (State.LOADING, State.FALLING_ASLEEP, State.SLEEPING, State.WAKING)
        if m.state in asleep or (m.state is State.LOADED and (force or not self._busy(m))):
            if force:
                self._stop(m, StopReason.OPERATOR_FORCED, "unloaded by operator (forced)", now, out, force=True)
            else:
                self._stop(m, StopReason.OPERATOR, "unloaded by operator", now, out)
        elif m.state is State.LOADED:
            m.unload_requested = True  # stop once the in-flight requests finish
            self._unloads.add(m.name)

    def _preload(self, m: ModelRecord, now: float, out: list[Effect]) -> None:
        """Start (or wake) ``m`` only if it fits next to everything without evicting anything."""
        if m.state not in WANTS_IN or m.base is not None:
            return
        options = [m.placed] if m.state is State.SLEEPING and m.placed else self._options(m)
        if not options:
            return  # no node has the GPUs it needs
        placement, victims = choose_placement(m.memory_gb, self._index.held(None, but=m), [], self.budget, options)
        if victims == []:
            self._bring_in(m, placement, now, out)

    def _may_grow(self, g: Group) -> bool:
        """Whether step 4r would start another replica of ``g`` once one more request is granted: the fast
        path then leaves the request to a full pass (step 4r's own rule, asked ahead)."""
        awake, want = self._wanted(g, more=1)
        return len(awake) < want

    # ------------------------------------------------------------ fast path
    def _fast_path(self, event: Event, now: float) -> list[Effect] | None:
        """The common case, without a full pass: nobody is waiting, and a request arrives for a model that
        is ready (granted at once), or a request finishes on a model with nothing pending on its idleness
        (no ttl to arm, no operator unload waiting for it). Whatever a full pass would decide differently
        needs a waiter, a ttl or an unload request, so the decisions are the same (a property test drives
        it against a full pass on random event sequences), with two exceptions that cost nothing: it does
        not re-arm the timer (a Tick may come early, never late), and a budget that models loaded outside
        the router still overrun after step 3 is trimmed by the next full pass. Returns None when the full
        pass is needed."""
        if self._waiting:
            return None
        if isinstance(event, RequestArrived):
            g = self._groups.get(event.model)
            if g is None or event.req_id in self._granted:
                return None
            m = self._pick(g, self._seq + 1, event.affinity, event.eligible)
            if m is None or (g.replicated and (g.dormant or self._may_grow(g))):
                return None
            self._note_arrivals(g, now)
            self._seq += 1
            self._grant_one(event.req_id, m, now, event.affinity)
            return [Grant(event.req_id, m.name)]
        if isinstance(event, RequestFinished | RequestCancelled):
            model = self._granted.get(event.req_id)
            if model is None:
                return None
            chain = [self._models[model]]
            if chain[0].base is not None:
                chain.append(self._models[chain[0].base])
            if any(self._ttl(x) > 0 or x.unload_requested for x in chain) or \
                    (self._replicated and self._growing()):  # (a model that falls idle may make room)
                return None
            self._release(event.req_id, now)
            return []
        return None
